"""Call the model hosted on Replicate, the way the tech design's callers do.

Two ways in, both through the official `replicate` client:

- :func:`separate` is `replicate.run(...)`: create a prediction, wait for it, and return the
  two output URLs as ``{"vocals": url, "instrumental": url}``. For short songs.
- :func:`submit` is `predictions.create(...)` with a ``webhook`` and
  ``webhook_events_filter=["completed"]``: return the prediction id at once and let Replicate
  POST the finished prediction to the webhook (see :mod:`stemsep.webhooks`). For long audio.

Replicate deletes outputs an hour after a prediction ends, so :func:`download` (atomic, with
retries) fetches them; the CLI and the webhook receiver both use it. The model name and the
API token come from the arguments, else ``REPLICATE_MODEL`` and ``REPLICATE_API_TOKEN``.
"""

from __future__ import annotations

import base64
import binascii
import io
import mimetypes
import os
import re
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlparse

from stemsep.errors import RemoteError

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


def make_client(api_token: str | None = None, base_url: str | None = None):
    """A `replicate.Client`; `base_url` (else ``REPLICATE_BASE_URL``) points it at another server."""
    import replicate

    return replicate.Client(api_token=resolve_token(api_token), base_url=base_url)


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
            raise RemoteError(f"{path}: no such file")
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


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    attempts: int = 6,
    backoff: float = 1.0,
    timeout: float = 60.0,
    stop: threading.Event | None = None,
) -> Path:
    """Fetch `url` (http(s) or a data URL) into `dest` atomically: stream into a temporary
    file beside it, fsync, then rename, so `dest` is either absent or complete.

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
            raise RemoteError(f"{dest.name}: the output data URL is not valid base64") from None
        _write_atomically(dest, [data])
        return dest

    stop = stop or threading.Event()
    last_error = "no attempt made"
    for attempt in range(max(1, attempts)):
        if attempt:
            if stop.wait(backoff * 2 ** (attempt - 1)):
                raise DownloadInterrupted(url)
        try:
            with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
                if response.status_code != 200:
                    last_error = f"HTTP {response.status_code}"
                    if _retryable(response.status_code):
                        continue
                    raise RemoteError(f"could not download {url}: HTTP {response.status_code}")
                _write_atomically(dest, response.iter_bytes(1 << 20), stop)
                return dest
        except httpx.HTTPError as exc:
            last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    raise RemoteError(f"could not download {url} after {max(1, attempts)} attempts ({last_error})")


def _write_atomically(dest: Path, chunks, stop: threading.Event | None = None) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                if stop is not None and stop.is_set():
                    raise DownloadInterrupted(str(dest))
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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

