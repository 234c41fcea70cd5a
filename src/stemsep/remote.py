"""Call the model hosted on Replicate from Python: one song, or a whole catalogue.

Two ways in, both through the official `replicate` client:

- :func:`separate` is `replicate.run(...)`: create a prediction, wait for it, and return the
  two output URLs as ``{"vocals": url, "instrumental": url}``. For short songs.
- :func:`submit` is `predictions.create(...)` with a ``webhook`` and
  ``webhook_events_filter=["completed"]``: return the prediction id at once and let Replicate
  POST the finished prediction to the webhook (see :mod:`stemsep.webhooks`). For long audio.

Replicate deletes outputs an hour after a prediction ends, so :func:`download` (atomic, with
retries) fetches them; the CLI and the webhook receiver both use it. The model name and the
API token come from the arguments, else ``REPLICATE_MODEL`` and ``REPLICATE_API_TOKEN``.

For many songs, :func:`separate_many` (``stemsep remote`` with several inputs, a folder or
``--from FILE``) keeps at most N predictions in flight, records every song's state in a
SQLite manifest beside the stems, resumes from it after a crash without submitting anything
twice, and retries what is worth retrying (docs/back-catalogue.md).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import email.utils
import io
import json
import mimetypes
import os
import random
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self
from urllib.parse import unquote, urlparse

from stemsep.errors import RemoteError
from stemsep.files import atomic_file

STEMS = ("vocals", "instrumental")  # the model's output list, in this order
MAX_UPLOAD_BYTES = 100 * 1024 * 1024  # Replicate's cap on files the SDK uploads
TERMINAL_STATUSES = ("succeeded", "failed", "canceled")

Audio = str | os.PathLike | IO[bytes]


# settings --------------------------------------------------------------------------------


def resolve_model(model: str | None = None) -> str:
    """`owner/name` or `owner/name:version`, from the argument or ``REPLICATE_MODEL``."""
    model = model or os.environ.get("REPLICATE_MODEL")
    if not model:
        raise RemoteError(
            "no Replicate model given: pass one as owner/name (e.g. ryansmith/bs-roformer) or set REPLICATE_MODEL"
        )
    if not re.fullmatch(r"[^/:\s]+/[^/:\s]+(:[0-9a-zA-Z]+)?", model):
        raise RemoteError(f"Replicate model {model!r} is not of the form owner/name or owner/name:version")
    return model


def resolve_token(api_token: str | None = None) -> str:
    """The API token, from the argument or ``REPLICATE_API_TOKEN``."""
    token = api_token or os.environ.get("REPLICATE_API_TOKEN")
    if not token:
        raise RemoteError(
            "no Replicate API token: pass one or set REPLICATE_API_TOKEN (https://replicate.com/account/api-tokens)"
        )
    return token


def make_client(api_token: str | None = None, base_url: str | None = None, **httpx_options: Any):
    """A `replicate.Client`; `base_url` (else ``REPLICATE_BASE_URL``) points it at another
    server; other keyword arguments go to its `httpx.Client`."""
    import replicate

    return replicate.Client(api_token=resolve_token(api_token), base_url=base_url, **httpx_options)


# inputs ----------------------------------------------------------------------------------


def is_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://", "data:"))


def audio_input(audio: Audio) -> Any:
    """What goes into the prediction's ``audio`` field: a URL as is, a local file as a file
    object for the SDK to upload (refused over the upload cap, where a URL is the way)."""
    if is_url(audio):
        return audio
    if isinstance(audio, (str, os.PathLike)):
        path = Path(audio)
        if not path.is_file():
            raise RemoteError("no such file", file=str(path))
        _check_size(path.stat().st_size, path.name)
        return path
    if hasattr(audio, "read"):
        name = Path(getattr(audio, "name", "audio")).name
        if hasattr(audio, "seek") and hasattr(audio, "tell"):  # the SDK uploads from offset 0
            start = audio.tell()
            size = audio.seek(0, io.SEEK_END)
            audio.seek(start)
            _check_size(size, name)
        if not isinstance(audio, io.IOBase):  # the SDK uploads only io.IOBase objects
            data = audio.read(MAX_UPLOAD_BYTES + 1)
            _check_size(len(data), name)
            audio = io.BytesIO(data)
            audio.name = name
        return audio
    raise RemoteError(f"audio must be a file path, an open file or a URL, not {type(audio).__name__}")


def _check_size(size: int, name: str) -> None:
    if size > MAX_UPLOAD_BYTES:
        raise RemoteError(
            f"{name}: {size / 2**20:.0f} MB is over Replicate's 100 MB upload limit; "
            "put the file on a web server or bucket and pass its URL instead"
        )


# calls -----------------------------------------------------------------------------------


def _create_prediction(client, model: str, input: dict, **params):
    """`owner/name` runs the model's latest version; `owner/name:version` that version."""
    ref, _, version = model.partition(":")
    owner, name = ref.split("/", 1)
    if version:
        return client.predictions.create(version=version, input=input, **params)
    return client.models.predictions.create(model=(owner, name), input=input, **params)


def _call(what: str, fn, *args, **kwargs):
    """Run an SDK call, turning its exceptions into one-sentence :class:`RemoteError`s."""
    import httpx
    from replicate.exceptions import ReplicateError

    try:
        return fn(*args, **kwargs)
    except ReplicateError as exc:
        detail = exc.detail or exc.title or "no detail"
        raise RemoteError(f"Replicate API refused to {what} (HTTP {exc.status}): {detail}") from None
    except httpx.HTTPError as exc:
        raise RemoteError(f"could not reach the Replicate API to {what}: {exc}") from None


def separate(
    audio: Audio,
    *,
    model: str | None = None,
    api_token: str | None = None,
    base_url: str | None = None,
    **inputs: Any,
) -> dict[str, str]:
    """Run the model on `audio` (a path, an open file or a URL) and wait for it.

    Returns ``{"vocals": url, "instrumental": url}``. Replicate deletes these files an hour
    after the prediction ends: fetch them (:func:`download_stems`). Extra keyword arguments
    are model inputs.
    """
    model = resolve_model(model)
    client = make_client(api_token, base_url)
    input = {"audio": audio_input(audio), **inputs}
    prediction = _call("create a prediction", _create_prediction, client, model, input, wait=True)
    if prediction.status not in TERMINAL_STATUSES:
        _call("poll the prediction", prediction.wait)
    if prediction.status != "succeeded":
        reason = prediction.error or "no error message"
        raise RemoteError(f"prediction {prediction.id} {prediction.status}: {reason}")
    return stem_urls(prediction.output)


def submit(
    audio: Audio,
    webhook_url: str,
    *,
    model: str | None = None,
    api_token: str | None = None,
    base_url: str | None = None,
    **inputs: Any,
) -> str:
    """Start a prediction on `audio` and return its id at once; Replicate POSTs the finished
    prediction (succeeded, failed or canceled) to `webhook_url`."""
    if not str(webhook_url).startswith(("http://", "https://")):
        raise RemoteError(f"webhook URL {webhook_url!r} is not an http(s) URL")
    model = resolve_model(model)
    client = make_client(api_token, base_url)
    input = {"audio": audio_input(audio), **inputs}
    prediction = _call(
        "create a prediction", _create_prediction, client, model, input,
        webhook=webhook_url, webhook_events_filter=["completed"],
    )
    return prediction.id


# outputs ---------------------------------------------------------------------------------


def stem_urls(output: Any) -> dict[str, str]:
    """The model's output, ``[vocals_url, instrumental_url]``, as ``{stem: url}``.

    Each stem is identified by its file name first (``<name>_vocals.<ext>``,
    ``<name>_instrumental.<ext>``), and by its position only when the names do not tell
    both apart (data URLs carry no name): on Replicate the server uploads the two files
    concurrently and lists each URL when its upload finishes, so the list can come back as
    ``[instrumental_url, vocals_url]`` (DESIGN.md, "Order of the two URLs")."""
    if isinstance(output, Mapping):
        urls = {str(k): v for k, v in output.items()}
    elif isinstance(output, (list, tuple)) and len(output) == len(STEMS):
        urls = dict(zip(STEMS, output))
    else:
        raise RemoteError(f"the prediction's output is not [vocals_url, instrumental_url] but {_short(output)}")
    if not all(isinstance(u, str) and is_url(u) for u in urls.values()):
        raise RemoteError(f"the prediction's output holds something other than URLs: {_short(output)}")
    if not isinstance(output, Mapping):
        named = {url_stem(url): url for url in output}
        if set(named) == set(STEMS):  # one of each, by name
            urls = {stem: named[stem] for stem in STEMS}
    return urls


_STEM_NAME = re.compile(r"_(?P<stem>vocals|instrumental)\.[A-Za-z0-9]{1,8}$")


def url_stem(url: str) -> str | None:
    """``"vocals"`` for ``https://.../song_vocals.wav?sig=1``, ``"instrumental"`` for
    ``..._instrumental.flac``; None when the URL's file name ends in neither (a data URL)."""
    if url.startswith("data:"):
        return None
    match = _STEM_NAME.search(unquote(urlparse(url).path).rsplit("/", 1)[-1])
    return match.group("stem") if match else None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def url_extension(url: str) -> str:
    """`wav` for `https://.../vocals.wav` or `data:audio/wav;base64,...`; `bin` when unknown."""
    if url.startswith("data:"):
        mime = url[5:].split(",", 1)[0].split(";", 1)[0].lower()
        known = {"audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/vnd.wave": "wav",
                 "audio/flac": "flac", "audio/x-flac": "flac", "audio/mpeg": "mp3", "audio/ogg": "ogg"}
        ext = known.get(mime) or (mimetypes.guess_extension(mime) or "").lstrip(".")
    else:
        ext = Path(unquote(urlparse(url).path)).suffix.lstrip(".").lower()
    return ext if re.fullmatch(r"[a-z0-9]{1,8}", ext or "") else "bin"


class DownloadInterrupted(Exception):
    """The download was asked to stop (the process is shutting down); nothing was written."""


def _retryable(status: int) -> bool:
    return status >= 500 or status in (408, 425, 429)


_http_client = None
_http_client_lock = threading.Lock()


def _shared_http_client():
    """One `httpx.Client` for all downloads (thread-safe; a new client per file would set up
    TLS and a connection every time)."""
    global _http_client
    import httpx

    with _http_client_lock:
        if _http_client is None:
            _http_client = httpx.Client(follow_redirects=True)
        return _http_client


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    attempts: int = 6,
    backoff: float = 1.0,
    timeout: float = 60.0,
    stop: threading.Event | None = None,
) -> Path:
    """Fetch `url` (http(s) or a data URL) into `dest` atomically (:func:`stemsep.files.atomic_file`:
    a hidden temporary file beside it, fsynced, then renamed), so `dest` is either absent or
    complete.

    Connection errors, timeouts, 5xx and 429 are retried up to `attempts` times in all,
    waiting `backoff`, 2×`backoff`, 4×`backoff`... between tries. Setting `stop` makes a
    waiting or running download raise :class:`DownloadInterrupted`.
    """
    import httpx

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        try:
            data = base64.b64decode(payload, validate=True) if header.endswith(";base64") else unquote(payload).encode()
        except binascii.Error:
            raise RemoteError("the output data URL is not valid base64", file=str(dest.name)) from None
        with atomic_file(dest) as f:
            f.write(data)
        return dest

    stop = stop or threading.Event()
    last_error = "no attempt made"
    for attempt in range(max(1, attempts)):
        if attempt and stop.wait(backoff * 2 ** (attempt - 1)):
            raise DownloadInterrupted(url)
        try:
            with _shared_http_client().stream("GET", url, timeout=timeout) as response:
                if response.status_code != 200:
                    last_error = f"HTTP {response.status_code}"
                    if _retryable(response.status_code):
                        continue
                    raise RemoteError(f"could not download {url}: HTTP {response.status_code}")
                with atomic_file(dest) as f:
                    for chunk in response.iter_bytes(1 << 20):
                        if stop.is_set():
                            raise DownloadInterrupted(url)
                        f.write(chunk)
                return dest
        except httpx.HTTPError as exc:
            last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    raise RemoteError(f"could not download {url} after {max(1, attempts)} attempts ({last_error})")


def download_stems(
    stems: Mapping[str, str],
    directory: str | os.PathLike,
    name: str = "",
    **download_options: Any,
) -> dict[str, Path]:
    """Download each stem URL to ``directory/<name>_<stem>.<ext>`` (``<stem>.<ext>`` when
    `name` is empty). Returns the paths."""
    directory = Path(directory)
    paths = {}
    for stem, url in stems.items():
        filename = f"{name}_{stem}" if name else stem
        paths[stem] = download(url, directory / f"{filename}.{url_extension(url)}", **download_options)
    return paths


def input_name(audio: Audio) -> str:
    """A name for output files: the input file's or URL's name without extension."""
    if isinstance(audio, str) and audio.startswith("data:"):
        return "audio"
    if is_url(audio):
        return Path(unquote(urlparse(audio).path)).stem or "audio"
    if isinstance(audio, (str, os.PathLike)):
        return Path(audio).stem
    return Path(getattr(audio, "name", "audio")).stem or "audio"



# outputs of any model --------------------------------------------------------------------

_ANY_STEM = re.compile(r"_(?P<stem>[A-Za-z0-9-]+)\.[A-Za-z0-9]{1,8}$")


def any_url_stem(url: str) -> str | None:
    """The stem an output URL names, for any model: the model writes ``<name>_<stem>.<ext>``,
    so it is what follows the file name's last underscore (``my_song_drums.flac`` is
    ``drums``); None for a data URL or a name of another shape."""
    if url.startswith("data:"):
        return None
    match = _ANY_STEM.search(unquote(urlparse(url).path).rsplit("/", 1)[-1])
    return match.group("stem").lower() if match else None


def output_stems(output: Any) -> dict[str, str]:
    """Every stem of a prediction's output as ``{stem: url}``, by file name; by position
    (``vocals``, ``instrumental``) only for two outputs whose names do not tell them apart.
    ``vocals`` and ``instrumental`` come first, then other stems in output order."""
    if isinstance(output, Mapping):
        return stem_urls(output)
    if not isinstance(output, (list, tuple)) or not output:
        raise RemoteError(f"the prediction's output is not a list of stem URLs but {_short(output)}")
    if not all(isinstance(u, str) and is_url(u) for u in output):
        raise RemoteError(f"the prediction's output holds something other than URLs: {_short(output)}")
    names = [any_url_stem(u) for u in output]
    if None not in names and len(set(names)) == len(names):
        pairs = list(zip(names, output))
    elif len(output) == len(STEMS):
        pairs = list(zip(STEMS, output))
    else:
        raise RemoteError(f"cannot tell the stems of the prediction's {len(output)} outputs apart by file name: {_short(output)}")
    pairs.sort(key=lambda pair: STEMS.index(pair[0]) if pair[0] in STEMS else len(STEMS))
    return dict(pairs)


# the back catalogue: many songs, a manifest, resume -------------------------------------

DEFAULT_CONCURRENCY = 8
MANIFEST_NAME = "stemsep-remote.sqlite3"
LOCK_NAME = ".stemsep-remote.lock"
FINAL_STATUSES = (*TERMINAL_STATUSES, "aborted")  # "aborted": Replicate's, newer than the SDK
AUDIO_EXTENSIONS = frozenset(
    {"wav", "wave", "flac", "mp3", "m4a", "mp4", "aac", "ogg", "oga", "opus", "aif", "aiff", "aifc", "wv", "webm",
     "mka", "wma", "alac"}
)
# A create request whose answer was lost is looked for among the predictions created since
# a little before it was sent (clocks differ); further back is another run's.
RECONCILE_SKEW = 120.0
RECONCILE_PAGES = 50

SONG_STATES = ("queued", "submitting", "submitted", "succeeded", "failed")


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures are retried: 429 (its ``Retry-After`` honoured, up to
    `max_wait`), 408, 5xx and connection errors, `attempts` tries in all per call, waiting
    about `backoff`, 2×, 4×... seconds (jittered) in between."""

    attempts: int = 8
    backoff: float = 1.0
    max_wait: float = 120.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_wait)
        base = self.backoff * 2 ** (attempt - 1)
        return min(base * random.uniform(0.5, 1.0), self.max_wait)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class Song:
    """One input's row in the manifest."""

    key: str  # the input: an absolute file path or a URL
    name: str  # output files are <name>_<stem>.<ext>
    state: str  # queued | submitting | submitted | succeeded | failed
    prediction_id: str | None = None
    input_url: str | None = None
    submitted_at: float | None = None
    status: str | None = None
    files: dict[str, str] | None = None  # stem -> file name in the output folder
    error: str | None = None
    predict_time: float | None = None
    creates: int = 0
    past_ids: tuple[str, ...] = ()


@dataclass
class CatalogueReport:
    """What :func:`separate_many` leaves: every song in the manifest, and which of them
    finished (or, with a webhook, were submitted) during this call."""

    manifest: Path
    songs: list[Song]
    finished: list[Song]
    interrupted: bool = False

    def count(self, *states: str) -> int:
        return sum(song.state in states for song in self.songs)

    @property
    def succeeded(self) -> int:
        return self.count("succeeded")

    @property
    def failed(self) -> int:
        return self.count("failed")

    @property
    def pending(self) -> int:
        return self.count("queued", "submitting", "submitted")

    @property
    def predict_time(self) -> float:
        """Seconds of model time billed so far, failed predictions included."""
        return sum(song.predict_time or 0.0 for song in self.songs)

    def cost(self, price_per_second: float | None) -> float | None:
        return None if price_per_second is None else self.predict_time * price_per_second


_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,           -- model | inputs
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS songs (
    key           TEXT PRIMARY KEY,   -- the input: an absolute file path or a URL
    name          TEXT NOT NULL UNIQUE, -- output files are <name>_<stem>.<ext>
    position      INTEGER NOT NULL,   -- order in which inputs were first listed
    state         TEXT NOT NULL,      -- queued | submitting | submitted | succeeded | failed
    prediction_id TEXT,               -- set once the create request answered
    input_url     TEXT,               -- the `audio` sent (an upload's URL for a local file)
    submitted_at  REAL,               -- when the create request was sent (epoch seconds)
    status        TEXT,               -- the prediction's status when last seen
    files         TEXT,               -- JSON {stem: file name}, once downloaded
    error         TEXT,               -- one line, for a failed song
    predict_time  REAL,               -- metrics.predict_time, seconds (billed)
    creates       INTEGER NOT NULL DEFAULT 0, -- create requests sent
    past_ids      TEXT NOT NULL DEFAULT '',   -- earlier predictions of a retried song
    updated_at    REAL NOT NULL
);
"""


class Manifest:
    """The catalogue's state in ``<output folder>/stemsep-remote.sqlite3``: one row per input,
    every change its own committed transaction. Safe to share between threads.

    Every commit survives the process being killed. The one that must also survive a power
    cut, "about to send the create request", is synced to disk before the request leaves;
    the others (write-ahead log, not synced each time) could roll back to an earlier state
    after one, which costs a poll, a lookup or a download again, never a second prediction.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise RemoteError(f"cannot open the manifest: {exc}", file=str(self.path)) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def settings(self, model: str | None, inputs: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """The model and model inputs of this catalogue: recorded by the first run, and a
        later run must match them (or leave them out to take the recorded ones)."""
        with self._lock:
            stored = dict(self._db.execute("SELECT key, value FROM settings"))
        old_model = stored.get("model")
        old_inputs = json.loads(stored["inputs"]) if "inputs" in stored else None
        if old_model is not None:
            if model and model != old_model:
                raise RemoteError(
                    f"{self.path} was made with model {old_model}, not {model}: "
                    "resume it without naming a model, or use another output folder"
                )
            if inputs and inputs != old_inputs:
                raise RemoteError(
                    f"{self.path} was made with model inputs {json.dumps(old_inputs)}, not {json.dumps(inputs)}: "
                    "leave them out to resume it, or use another output folder"
                )
            return old_model, old_inputs or {}
        return model, inputs

    def record_settings(self, model: str, inputs: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO settings VALUES ('model', ?)", (model,))
            self._db.execute("INSERT OR IGNORE INTO settings VALUES ('inputs', ?)", (json.dumps(inputs, sort_keys=True),))

    def add(self, keys: list[str]) -> int:
        """Queue the inputs not in the manifest yet; returns how many were new."""
        with self._lock:
            known = {row[0] for row in self._db.execute("SELECT key FROM songs")}
            names = {row[0] for row in self._db.execute("SELECT name FROM songs")}
            position = self._db.execute("SELECT COALESCE(MAX(position), 0) FROM songs").fetchone()[0]
            new = [key for key in dict.fromkeys(keys) if key not in known]
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for key in new:
                    base = input_name(key) or "audio"
                    name, n = base, 1
                    while name in names:
                        n += 1
                        name = f"{base}-{n}"
                    names.add(name)
                    position += 1
                    self._db.execute(
                        "INSERT INTO songs (key, name, position, state, updated_at) VALUES (?, ?, ?, 'queued', ?)",
                        (key, name, position, time.time()),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return len(new)

    def songs(self, key: str | None = None) -> list[Song]:
        """Every song in input order, or the one with `key`."""
        where = "WHERE key = ?" if key is not None else ""
        with self._lock:
            rows = self._db.execute(
                "SELECT key, name, state, prediction_id, input_url, submitted_at, status, files, error,"
                f" predict_time, creates, past_ids FROM songs {where} ORDER BY position",
                (key,) if key is not None else (),
            ).fetchall()
        return [
            Song(key, name, state, pid, url, at, status, json.loads(files) if files else None, error, ptime, creates,
                 tuple(past.split()))
            for key, name, state, pid, url, at, status, files, error, ptime, creates, past in rows
        ]

    def get(self, key: str) -> Song:
        return self.songs(key)[0]

    def update(self, key: str, **fields: Any) -> None:
        if "files" in fields and fields["files"] is not None:
            fields["files"] = json.dumps(fields["files"])
        if "past_ids" in fields:
            fields["past_ids"] = " ".join(fields["past_ids"])
        assert fields.get("state", "queued") in SONG_STATES
        columns = ", ".join(f"{name} = ?" for name in fields)
        with self._lock:
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                f"UPDATE songs SET {columns}, updated_at = ? WHERE key = ?", (*fields.values(), time.time(), key)
            )

    def count_create(self, key: str, input_url: str, submitted_at: float) -> None:
        """Mark the song as being submitted, synced to disk, before the create request goes out."""
        with self._lock:
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "UPDATE songs SET state = 'submitting', input_url = ?, submitted_at = ?, creates = creates + 1,"
                " updated_at = ? WHERE key = ?",
                (input_url, submitted_at, time.time(), key),
            )

    def known_predictions(self) -> set[str]:
        with self._lock:
            rows = self._db.execute("SELECT prediction_id, past_ids FROM songs").fetchall()
        return {pid for pid, _ in rows if pid} | {p for _, past in rows for p in past.split()}

    def requeue_failed(self) -> int:
        """Queue the failed songs again (``--retry-failed``); their old predictions are kept
        in ``past_ids``."""
        requeued = 0
        for song in self.songs():
            if song.state == "failed":
                past = song.past_ids + ((song.prediction_id,) if song.prediction_id else ())
                self.update(song.key, state="queued", prediction_id=None, status=None, error=None, past_ids=past)
                requeued += 1
        return requeued


class _FolderLock:
    """One catalogue run per output folder at a time (the kernel drops the lock if the
    process dies, SIGKILL included)."""

    def __init__(self, directory: Path):
        self.path = directory / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> Self:
        try:
            import fcntl
        except ImportError:  # not on POSIX: no lock
            return self
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            self._fd = None
            raise RemoteError("another stemsep remote run is using this folder", file=str(self.path.parent)) from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock


def expand_inputs(items: Iterable[str | os.PathLike] = (), from_files: Iterable[str | os.PathLike] = ()) -> list[str]:
    """The songs named by `items` and by the lists in `from_files`, as manifest keys, in
    order and without repeats: URLs as they are, files as absolute paths, folders as the
    audio files inside them (recursively, sorted). A list has one input per line; blank
    lines and ``#`` comments are skipped, and relative paths are relative to the list's
    folder (``-`` reads standard input, relative to the current folder). A path that does
    not exist is kept: that song fails alone, with its reason."""
    keys: list[str] = []

    def one(item: str | os.PathLike, base: Path | None) -> None:
        text = os.fspath(item)
        if is_url(text):
            keys.append(text)
            return
        path = Path(text).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path
        path = Path(os.path.abspath(path))
        if path.is_dir():
            found = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in AUDIO_EXTENSIONS
                     and not p.name.startswith(".")]
            keys.extend(str(p) for p in sorted(found))
        else:
            keys.append(str(path))

    for item in items:
        one(item, None)
    for list_file in from_files:
        list_file = os.fspath(list_file)
        try:
            if list_file == "-":
                text, base = sys.stdin.read(), None
            else:
                text, base = Path(list_file).read_text(encoding="utf-8"), Path(list_file).parent
        except (OSError, UnicodeDecodeError) as exc:
            raise RemoteError(f"cannot read the list of inputs: {exc}", file=str(list_file)) from None
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                one(line, base)
    return list(dict.fromkeys(keys))


class Interrupted(Exception):
    """The run was asked to stop; the song keeps its state for the next run."""


class _Cooldown:
    """After a 429 every worker waits, not only the one that got it: the limit is the account's."""

    def __init__(self) -> None:
        self._until = 0.0
        self._lock = threading.Lock()

    def hold(self, seconds: float) -> None:
        with self._lock:
            self._until = max(self._until, time.monotonic() + seconds)

    def wait(self, stop: threading.Event) -> None:
        while (remaining := self._until - time.monotonic()) > 0:
            if stop.wait(remaining):
                raise Interrupted


class _Api:
    """The SDK calls a catalogue makes, each retried by :class:`RetryPolicy`."""

    def __init__(self, api_token, base_url, model: str, policy: RetryPolicy, stop: threading.Event):
        self._local = threading.local()

        def remember_retry_after(response) -> None:  # ReplicateError keeps no headers
            if response.status_code == 429:
                self._local.retry_after = response.headers.get("Retry-After")

        self.client = make_client(api_token, base_url, event_hooks={"response": [remember_retry_after]})
        self.model = model
        self.policy = policy
        self.stop = stop
        self.cooldown = _Cooldown()

    def call(self, what: str, fn, on_lost=None):
        """`fn()`, retried. `on_lost()`, if given, runs after a failure that may have reached
        the server (5xx, timeout, dropped connection) and may return the result that was lost."""
        import httpx
        from replicate.exceptions import ReplicateError

        last = "no attempt made"
        attempts = max(1, self.policy.attempts)
        for attempt in range(1, attempts + 1):
            self.cooldown.wait(self.stop)
            self._local.retry_after = None
            maybe_sent = False
            try:
                return fn()
            except ReplicateError as exc:
                status = exc.status or 0
                detail = exc.detail or exc.title or "no detail"
                last = f"HTTP {status}: {detail}"
                if status == 429:
                    delay = self.policy.delay(attempt, parse_retry_after(self._local.retry_after))
                    self.cooldown.hold(delay)
                elif status >= 500 or status == 408:
                    delay, maybe_sent = self.policy.delay(attempt), True
                else:
                    raise RemoteError(f"Replicate API refused to {what} (HTTP {status}): {detail}") from None
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                delay = self.policy.delay(attempt)
                maybe_sent = not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
            if attempt == attempts and not (maybe_sent and on_lost is not None):
                break
            if self.stop.wait(delay):
                raise Interrupted
            if maybe_sent and on_lost is not None:
                found = on_lost()  # after the wait: a slow server may still be creating it
                if found is not None:
                    return found
        raise RemoteError(f"could not {what} after {attempts} attempts ({last})")

    def find_lost(self, input_url: str, since: float, exclude: set[str]) -> dict | None:
        """A prediction of our model on `input_url` created since `since`, not one of
        `exclude`: the one a create request made when its answer never arrived."""
        owner_name, _, version = self.model.partition(":")
        cursor = "/v1/predictions"
        for _ in range(RECONCILE_PAGES):
            # The raw page, not the SDK's parsed one: one prediction of a shape the SDK does
            # not know (a newer status, another kind of job) must not hide the others.
            page = self.call("list predictions", lambda url=cursor: self.client._request("GET", url).json())
            for p in page.get("results") or []:
                created = _epoch(p.get("created_at"))
                if created is not None and created < since - RECONCILE_SKEW:
                    return None  # newest first: the rest are older
                if (
                    (p.get("input") or {}).get("audio") == input_url
                    and p.get("model", owner_name) == owner_name
                    and (not version or p.get("version") == version)
                    and p.get("id") not in exclude
                ):
                    return p
            cursor = page.get("next")
            if not cursor:
                return None
        return None

    def get(self, prediction_id: str) -> dict:
        def fetch() -> dict:
            try:
                return _prediction_dict(self.client.predictions.get(prediction_id))
            except ValueError:  # pydantic's ValidationError: a status the SDK does not list
                return self.client._request("GET", f"/v1/predictions/{prediction_id}").json()

        return self.call(f"poll prediction {prediction_id}", fetch)


def _prediction_dict(prediction: Any) -> dict:
    if isinstance(prediction, dict):
        return prediction
    return {name: getattr(prediction, name, None) for name in ("id", "status", "output", "error", "metrics", "input")}


def _epoch(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.datetime.fromisoformat(value).timestamp()  # "...Z" too, since Python 3.11
    except ValueError:
        return None


def _first_line(text: Any, limit: int = 300) -> str:
    lines = str(text).strip().splitlines()
    return lines[0][:limit] if lines else "no error message"


class _Catalogue:
    def __init__(self, manifest: Manifest, api: _Api, output_dir: Path, inputs: dict[str, Any], webhook: str | None,
                 poll_interval: float, stop: threading.Event, on_song) -> None:
        self.manifest, self.api, self.output_dir = manifest, api, output_dir
        self.inputs, self.webhook, self.poll_interval, self.stop = inputs, webhook, poll_interval, stop
        self.on_song = on_song
        self.finished: list[Song] = []
        self._lock = threading.Lock()

    def work(self, queue: list[Song]) -> None:
        """One worker: take the next song, see it through, repeat (so at most one
        prediction per worker is ever in flight)."""
        while not self.stop.is_set():
            with self._lock:
                if not queue:
                    return
                song = queue.pop(0)
            try:
                self.song(song)
            except Interrupted:
                return
            except DownloadInterrupted:
                return
            except Exception as exc:  # noqa: BLE001 - one song's trouble must not end the catalogue
                error = str(exc) if isinstance(exc, RemoteError) else f"{type(exc).__name__}: {exc}"
                self.manifest.update(song.key, state="failed", error=_first_line(error))
                self.done(song.key)

    def done(self, key: str) -> None:
        song = self.manifest.get(key)
        with self._lock:
            self.finished.append(song)
            if self.on_song is not None:
                self.on_song(song)

    def song(self, song: Song) -> None:
        if song.state == "submitted" and song.prediction_id:
            prediction_id = song.prediction_id
        else:
            prediction_id = self.submit(song)
            if self.webhook:
                self.done(song.key)
                return
        prediction = self.api.get(prediction_id)
        while prediction.get("status") not in FINAL_STATUSES:
            if self.stop.wait(self.poll_interval):
                raise Interrupted
            prediction = self.api.get(prediction_id)
        status = prediction["status"]
        seen = {"status": status, "predict_time": (prediction.get("metrics") or {}).get("predict_time")}
        if status != "succeeded":
            reason = _first_line(prediction.get("error") or "no error message")
            self.manifest.update(song.key, state="failed", error=f"prediction {prediction_id} {status}: {reason}", **seen)
        else:
            files = {}
            try:
                for stem, url in output_stems(prediction.get("output")).items():
                    dest = self.output_dir / f"{song.name}_{stem}.{url_extension(url)}"
                    download(url, dest, attempts=self.api.policy.attempts, backoff=self.api.policy.backoff, stop=self.stop)
                    files[stem] = dest.name
            except RemoteError as exc:
                self.manifest.update(song.key, state="failed", error=_first_line(exc), **seen)
            else:
                self.manifest.update(song.key, state="succeeded", files=files, **seen)
        self.done(song.key)

    def submit(self, song: Song) -> str:
        exclude = self.manifest.known_predictions()
        if song.state == "submitting" and song.input_url and song.submitted_at:
            # The last run sent the create request and died before its answer was recorded.
            found = self.api.find_lost(song.input_url, song.submitted_at, exclude)
            if found is not None:
                self.manifest.update(song.key, state="submitted", prediction_id=found["id"])
                return found["id"]
        input_url = song.key if is_url(song.key) else self.upload(song)
        params = {"webhook": self.webhook, "webhook_events_filter": ["completed"]} if self.webhook else {}
        since = time.time()
        self.manifest.count_create(song.key, input_url, since)
        prediction = self.api.call(
            "create a prediction",
            lambda: _create_prediction(self.api.client, self.api.model, {**self.inputs, "audio": input_url}, **params),
            on_lost=lambda: self.api.find_lost(input_url, since, exclude),
        )
        prediction_id = _prediction_dict(prediction)["id"]
        self.manifest.update(song.key, state="submitted", prediction_id=prediction_id)
        return prediction_id

    def upload(self, song: Song) -> str:
        path = audio_input(song.key)  # a clear error for a missing file or one over the cap
        uploaded = self.api.call(f"upload {path.name}", lambda: self.api.client.files.create(path))
        return uploaded.urls["get"]


def _remove_stale_parts(directory: Path, names: set[str]) -> None:
    """Temporary files a killed run left behind (``.<name>_<stem>.<ext>.<hex>.part``)."""
    for path in directory.glob(".*.part"):
        if path.name[1:].rsplit("_", 1)[0] in names:
            path.unlink(missing_ok=True)


def separate_many(
    inputs: Iterable[str | os.PathLike] = (),
    output_dir: str | os.PathLike = "separated",
    *,
    from_files: Iterable[str | os.PathLike] = (),
    model: str | None = None,
    api_token: str | None = None,
    base_url: str | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    webhook: str | None = None,
    retry_failed: bool = False,
    poll_interval: float | None = None,
    retry: RetryPolicy | None = None,
    on_song: Callable[[Song], None] | None = None,
    stop: threading.Event | None = None,
    **model_inputs: Any,
) -> CatalogueReport:
    """Separate many songs on Replicate into `output_dir`, at most `concurrency` at a time.

    `inputs` are files, URLs or folders (see :func:`expand_inputs`; `from_files` are lists of
    them). Every song's state is kept in ``<output_dir>/stemsep-remote.sqlite3``; calling
    again with the same folder (inputs may be left out) resumes: songs in flight are polled
    by their prediction id, done ones are skipped, none is submitted twice. Failed songs stay
    failed unless `retry_failed`. With `webhook`, songs are only submitted (Replicate POSTs
    each result there) and their stems are not downloaded here.

    `on_song(song)` is called as each song finishes. Ctrl-C (or setting `stop`) ends the
    call early with ``interrupted=True``; what was in flight is picked up by the next run.
    Extra keyword arguments are model inputs, recorded in the manifest with the model.
    """
    if concurrency < 1:
        raise RemoteError(f"concurrency must be at least 1, not {concurrency}")
    if webhook is not None and not str(webhook).startswith(("http://", "https://")):
        raise RemoteError(f"webhook URL {webhook!r} is not an http(s) URL")
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RemoteError(f"cannot create the output folder: {exc.strerror}", file=str(output_dir)) from None
    keys = expand_inputs(inputs, from_files)
    manifest_path = output_dir / MANIFEST_NAME
    if not keys and not manifest_path.exists():
        raise RemoteError(f"nothing to do: no inputs given and no manifest in {output_dir} to resume")
    if poll_interval is None:
        poll_interval = float(os.environ.get("REPLICATE_POLL_INTERVAL", "1.0"))
    stop = stop or threading.Event()

    with _FolderLock(output_dir):
        manifest = Manifest(manifest_path)
        try:
            model, model_inputs = manifest.settings(model, model_inputs)
            model = resolve_model(model)
            api = _Api(api_token, base_url, model, retry or RetryPolicy(), stop)
            manifest.record_settings(model, model_inputs)
            manifest.add(keys)
            if retry_failed:
                manifest.requeue_failed()
            songs = manifest.songs()
            _remove_stale_parts(output_dir, {song.name for song in songs})
            # Songs in flight first (their outputs expire an hour after they end), then new ones.
            rank = {"submitted": 0, "submitting": 1, "queued": 2}
            todo = [s for s in songs if s.state in rank and not (webhook and s.state == "submitted")]
            todo.sort(key=lambda s: rank[s.state])
            catalogue = _Catalogue(manifest, api, output_dir, model_inputs, webhook, poll_interval, stop, on_song)
            n_workers = min(concurrency, len(todo))
            all_done = threading.Event()
            running = [n_workers]
            running_lock = threading.Lock()

            def worker() -> None:
                try:
                    catalogue.work(todo)
                finally:
                    with running_lock:
                        running[0] -= 1
                        if running[0] == 0:
                            all_done.set()

            if n_workers == 0:
                all_done.set()
            for i in range(n_workers):
                threading.Thread(target=worker, name=f"stemsep-remote-{i}", daemon=True).start()
            # Waiting on an Event, not Thread.join: a Ctrl-C that interrupts join() can make
            # Python 3.11 take a running thread for finished.
            interrupted = False
            try:
                while not all_done.wait(0.2):
                    pass
            except KeyboardInterrupt:
                interrupted = True
                stop.set()
                while not all_done.wait(0.2):
                    pass
            interrupted = interrupted or stop.is_set()
            return CatalogueReport(manifest_path, manifest.songs(), catalogue.finished, interrupted)
        finally:
            manifest.close()
