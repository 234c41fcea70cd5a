"""Fetching a prediction's output files before Replicate deletes them (an hour after the
prediction ends): atomic writes, retries by :class:`~stemsep.remote.retry.RetryPolicy`."""

from __future__ import annotations

import base64
import binascii
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from stemsep.errors import RemoteError
from stemsep.files import atomic_file
from stemsep.remote.outputs import url_extension
from stemsep.remote.retry import RetryPolicy, parse_retry_after, retryable


class DownloadInterrupted(Exception):
    """The download was asked to stop (the process is shutting down); nothing was written."""


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
    retry: RetryPolicy | None = None,
    timeout: float = 60.0,
    stop: threading.Event | None = None,
) -> Path:
    """Fetch `url` (http(s) or a data URL) into `dest` atomically (:func:`stemsep.files.atomic_file`:
    a hidden temporary file beside it, fsynced, then renamed), so `dest` is either absent or
    complete.

    Connection errors, timeouts, 408, 425, 429 (after its ``Retry-After``) and 5xx are
    retried as `retry` says (default :class:`RetryPolicy`'s); other answers fail at once.
    Setting `stop` makes a waiting or running download raise :class:`DownloadInterrupted`.
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

    policy = retry or RetryPolicy()
    stop = stop or threading.Event()
    attempts = max(1, policy.attempts)
    last_error = "no attempt made"
    for attempt in range(1, attempts + 1):
        retry_after = None
        try:
            with _shared_http_client().stream("GET", url, timeout=timeout) as response:
                if response.status_code == 200:
                    with atomic_file(dest) as f:
                        for chunk in response.iter_bytes(1 << 20):
                            if stop.is_set():
                                raise DownloadInterrupted(url)
                            f.write(chunk)
                    return dest
                last_error = f"HTTP {response.status_code}"
                if not retryable(response.status_code):
                    raise RemoteError(f"could not download {url}: HTTP {response.status_code}")
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
        except httpx.HTTPError as exc:
            last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if attempt < attempts and stop.wait(policy.delay(attempt, retry_after)):
            raise DownloadInterrupted(url)
    raise RemoteError(f"could not download {url} after {attempts} attempts ({last_error})")


def stem_file_name(name: str, stem: str, url: str) -> str:
    """``<name>_<stem>.<ext>`` (``<stem>.<ext>`` for an empty `name`), the extension from `url`."""
    return f"{name}_{stem}.{url_extension(url)}" if name else f"{stem}.{url_extension(url)}"


def download_stems(
    stems: Mapping[str, str],
    directory: str | os.PathLike,
    name: str = "",
    *,
    keep_existing: bool = False,
    **download_options: Any,
) -> dict[str, Path]:
    """Download each stem URL (``{stem: url}``, e.g. from :func:`~stemsep.remote.outputs.stem_urls`)
    to ``directory/<name>_<stem>.<ext>``, in order. With `keep_existing`, a file already
    there (complete, since every write is atomic) is not fetched again. Returns the paths;
    other keyword arguments go to :func:`download`."""
    directory = Path(directory)
    paths = {}
    for stem, url in stems.items():
        path = directory / stem_file_name(name, stem, url)
        paths[stem] = path if keep_existing and path.exists() else download(url, path, **download_options)
    return paths
