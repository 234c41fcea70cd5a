"""Many songs through the hosted model: :func:`separate_many` (``stemsep remote`` with
several inputs, a folder or ``--from FILE``) keeps at most N predictions in flight, records
every song's state in a SQLite manifest beside the stems (:mod:`stemsep.remote.manifest`),
resumes from it after a crash without submitting anything twice, and retries what is worth
retrying (docs/back-catalogue.md).
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stemsep.errors import RemoteError, StemsepError
from stemsep.files import PART_SUFFIX, first_line
from stemsep.remote.client import (
    audio_input,
    create_prediction,
    failure,
    get_prediction,
    make_client,
    model_inputs,
    poll_interval as default_poll_interval,
    prediction_dict,
    resolve_model,
)
from stemsep.remote.download import DownloadInterrupted, download_stems
from stemsep.remote.manifest import MANIFEST_NAME, FolderLock, Manifest, Song
from stemsep.remote.outputs import TERMINAL_STATUSES, is_url, stem_urls
from stemsep.remote.retry import RetryPolicy, parse_retry_after, retryable

DEFAULT_CONCURRENCY = 8
AUDIO_EXTENSIONS = frozenset(
    {"wav", "wave", "flac", "mp3", "m4a", "mp4", "aac", "ogg", "oga", "opus", "aif", "aiff", "aifc", "wv", "webm",
     "mka", "wma", "alac"}
)
# A create request whose answer was lost is looked for among the predictions created since
# a little before it was sent (clocks differ); further back is another run's.
RECONCILE_SKEW = 120.0
RECONCILE_PAGES = 50


@dataclass
class BatchReport:
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
    """The SDK calls a batch makes, each retried by :class:`RetryPolicy`."""

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
                if not retryable(status):
                    raise RemoteError(f"Replicate API refused to {what} (HTTP {status}): {detail}") from None
                if status == 429:
                    delay = self.policy.delay(attempt, parse_retry_after(self._local.retry_after))
                    self.cooldown.hold(delay)
                else:
                    delay, maybe_sent = self.policy.delay(attempt), True
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
        return self.call(f"poll prediction {prediction_id}", lambda: get_prediction(self.client, prediction_id))


def _epoch(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.datetime.fromisoformat(value).timestamp()  # "...Z" too, since Python 3.11
    except ValueError:
        return None


def _error_line(exc: BaseException) -> str:
    """One line for a failed song: a library error's sentence, any other exception's type too."""
    return first_line(exc) if isinstance(exc, StemsepError) else f"{type(exc).__name__}: {first_line(exc)}"


class _Batch:
    def __init__(self, manifest: Manifest, api: _Api, output_dir: Path, inputs: Mapping[str, Any], webhook: str | None,
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
            except (Interrupted, DownloadInterrupted):
                return
            except Exception as exc:  # noqa: BLE001 - one song's trouble must not end the batch
                self.manifest.update(song.key, state="failed", error=_error_line(exc))
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
        while prediction.get("status") not in TERMINAL_STATUSES:
            if self.stop.wait(self.poll_interval):
                raise Interrupted
            prediction = self.api.get(prediction_id)
        seen = {"status": prediction["status"], "predict_time": (prediction.get("metrics") or {}).get("predict_time")}
        try:
            if prediction["status"] != "succeeded":
                raise failure(prediction)
            stems = stem_urls(prediction.get("output"), self.inputs)
            paths = download_stems(stems, self.output_dir, song.name, retry=self.api.policy, stop=self.stop)
        except RemoteError as exc:
            self.manifest.update(song.key, state="failed", error=_error_line(exc), **seen)
        else:
            self.manifest.update(song.key, state="succeeded", files={s: p.name for s, p in paths.items()}, **seen)
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
            lambda: create_prediction(self.api.client, self.api.model, {**self.inputs, "audio": input_url}, **params),
            on_lost=lambda: self.api.find_lost(input_url, since, exclude),
        )
        prediction_id = prediction_dict(prediction)["id"]
        self.manifest.update(song.key, state="submitted", prediction_id=prediction_id)
        return prediction_id

    def upload(self, song: Song) -> str:
        path = audio_input(song.key)  # a clear error for a missing file or one over the cap
        uploaded = self.api.call(f"upload {path.name}", lambda: self.api.client.files.create(path))
        return uploaded.urls["get"]


def _remove_stale_parts(directory: Path, names: set[str]) -> None:
    """Temporary files a killed run left behind (``.<name>_<stem>.<ext>.<hex>.part``) for the
    songs of this batch: no other run can be writing them, the folder being locked."""
    for path in directory.glob(f".*{PART_SUFFIX}"):
        if any(path.name.startswith(f".{name}_") for name in names):
            path.unlink(missing_ok=True)


def separate_many(
    inputs: Iterable[str | os.PathLike] = (),
    output_dir: str | os.PathLike = "separated",
    *,
    from_files: Iterable[str | os.PathLike] = (),
    replicate_model: str | None = None,
    api_token: str | None = None,
    base_url: str | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    webhook: str | None = None,
    retry_failed: bool = False,
    poll_interval: float | None = None,
    retry: RetryPolicy | None = None,
    on_song: Callable[[Song], None] | None = None,
    stop: threading.Event | None = None,
    input: Mapping[str, Any] | None = None,
    **model_input: Any,
) -> BatchReport:
    """Separate many songs on Replicate into `output_dir`, at most `concurrency` at a time.

    `inputs` are the songs: files, URLs or folders (see :func:`expand_inputs`; `from_files`
    are lists of them). Every song's state is kept in ``<output_dir>/stemsep-remote.sqlite3``;
    calling again with the same folder (songs may be left out) resumes: songs in flight are
    polled by their prediction id, done ones are skipped, none is submitted twice. Failed
    songs stay failed unless `retry_failed`. With `webhook`, songs are only submitted
    (Replicate POSTs each result there) and their stems are not downloaded here.

    `replicate_model` is ``owner/name`` or ``owner/name:version``; the model inputs are
    `input` (a mapping) and any other keyword arguments, recorded in the manifest with the
    model. Deprecated, until the next release: ``model="owner/name"`` in place of
    `replicate_model`.

    `on_song(song)` is called as each song finishes. Ctrl-C (or setting `stop`) ends the
    call early with ``interrupted=True``; what was in flight is picked up by the next run.
    """
    replicate_model, model_input = model_inputs(replicate_model, input, model_input)
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
        poll_interval = default_poll_interval()
    stop = stop or threading.Event()

    with FolderLock(output_dir):
        manifest = Manifest(manifest_path)
        try:
            replicate_model, model_input = manifest.settings(replicate_model, model_input)
            replicate_model = resolve_model(replicate_model)
            api = _Api(api_token, base_url, replicate_model, retry or RetryPolicy(), stop)
            manifest.record_settings(replicate_model, model_input)
            manifest.add(keys)
            if retry_failed:
                manifest.requeue_failed()
            songs = manifest.songs()
            _remove_stale_parts(output_dir, {song.name for song in songs})
            # Songs in flight first (their outputs expire an hour after they end), then new ones.
            rank = {"submitted": 0, "submitting": 1, "queued": 2}
            todo = [s for s in songs if s.state in rank and not (webhook and s.state == "submitted")]
            todo.sort(key=lambda s: rank[s.state])
            batch = _Batch(manifest, api, output_dir, model_input, webhook, poll_interval, stop, on_song)
            n_workers = min(concurrency, len(todo))
            all_done = threading.Event()
            running = [n_workers]
            running_lock = threading.Lock()

            def worker() -> None:
                try:
                    batch.work(todo)
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
            return BatchReport(manifest_path, manifest.songs(), batch.finished, interrupted)
        finally:
            manifest.close()
