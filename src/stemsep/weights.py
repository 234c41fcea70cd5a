"""Fetching a catalogue model's files safely, and checking the ones on disk.

Which files a model has, their sha256, sizes and mirrors are in the catalogue
(:mod:`stemsep.catalogue`); this module only moves bytes. :func:`download` tries each
file's mirrors in order, streaming into a hidden ``.<name>.part`` file beside the
destination while hashing, and renames it into place only when the size and the sha256
match, so no file ever appears under its final name unchecked. Bytes that arrived whole
stay in the ``.part`` file when a transfer breaks off (a dropped connection, a timeout,
Ctrl-C), and the next try asks the next mirror, or the same one next time, for the rest
(an HTTP Range request; a server that ignores it sends the file again from its start).
Bytes that turn out wrong (the size or the sha256) are deleted, and a resumed file that
fails its checksum is fetched once more from its start. Free disk space is checked before
a file is fetched. A lock file (``.<name>.lock``, fcntl) lets one process at a time fetch
a file; another waits and then finds it in place. A file already on disk with the right
sha256 is kept without any network access.

:func:`model_files` is the first-use path: the paths of a model's files, fetched first if
they are missing, unless offline (the argument, or ``$STEMSEP_OFFLINE=1``). Progress goes
to a callback, ``(bytes done, bytes in all, file name)``, so any front end can show it.
:func:`verify` checks the files on disk. Errors are
:class:`stemsep.errors.WeightsDownloadError` (or
:class:`stemsep.catalogue.ModelNotDownloadedError` offline), one sentence naming the file
at fault.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import http.client
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from stemsep import catalogue
from stemsep.catalogue import Model, ModelNotDownloadedError, WeightFile
from stemsep.errors import WeightsDownloadError
from stemsep.files import sync_folder

_BLOCK = 1 << 20  # hash and stream in 1 MiB blocks: checkpoints are up to 1.7 GB
_USER_AGENT = "stemsep"
_FREE_SPACE_MARGIN = 64 << 20  # bytes left free after a download, for everything else
OFFLINE_ENV = "STEMSEP_OFFLINE"

# A download's progress: (bytes of the file done, its size or None if unknown, its name).
DownloadProgress = Callable[[int, "int | None", str], None]


# where the files live ---------------------------------------------------------------------


def offline_by_default() -> bool:
    """Whether ``$STEMSEP_OFFLINE`` turns first-use downloads off (1, true, yes or on)."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# first use --------------------------------------------------------------------------------


def model_files(
    model: str | Model | None = None,
    directory: str | os.PathLike[str] | None = None,
    *,
    offline: bool | None = None,
    on_progress: DownloadProgress | None = None,
    timeout: float = 60,
) -> tuple[Path, Path]:
    """The checkpoint and config paths of a catalogue model (default: the default model) in
    `directory` (default: :func:`stemsep.catalogue.default_dir`), downloading the files that are missing first
    (see :func:`download`). `offline` (default: ``$STEMSEP_OFFLINE``) forbids that: a missing
    file then raises :class:`ModelNotDownloadedError`. Files present are used as they are,
    without hashing them (:func:`verify` does; a download never leaves an unchecked file
    under a file's name, and loading a damaged checkpoint fails with its own error)."""
    model = catalogue.get(catalogue.DEFAULT if model is None else model)
    directory = catalogue.default_dir() if directory is None else Path(directory)
    if not all((directory / wf.name).is_file() for wf in model.files):
        if offline_by_default() if offline is None else offline:
            raise ModelNotDownloadedError(
                f"model {model.name} is not downloaded in {directory}, and offline mode forbids downloading it"
            )
        download(model, directory, progress=False, on_progress=on_progress, timeout=timeout)
    return model.paths(directory)


# checking ---------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    return _hash_prefix(Path(path), None).hexdigest()


def _hash_prefix(path: Path, length: int | None) -> hashlib._Hash:
    """A sha256 object fed with the first `length` bytes of `path` (None: all of them)."""
    digest = hashlib.sha256()
    left = length
    with open(path, "rb") as f:
        while left is None or left > 0:
            block = f.read(_BLOCK if left is None else min(_BLOCK, left))
            if not block:
                break
            digest.update(block)
            if left is not None:
                left -= len(block)
    return digest


def verify(model: str | Model | None = None, directory: str | os.PathLike[str] | None = None) -> list[Path]:
    """Check that a model's downloaded files (default: the default model's) are in
    `directory` (default: :func:`stemsep.catalogue.default_dir`) with their sizes and sha256; return their paths."""
    model = catalogue.get(catalogue.DEFAULT if model is None else model)
    directory = catalogue.default_dir() if directory is None else Path(directory)
    paths = []
    for wf in model.files:
        path = directory / wf.name
        if not path.is_file():
            raise WeightsDownloadError(f"{path} is missing: {catalogue.download_hint(model.name)}")
        size = path.stat().st_size
        if wf.size is not None and size != wf.size:
            raise WeightsDownloadError(
                f"{path} has {size} bytes, expected {wf.size}: {catalogue.download_hint(model.name, again=True)}"
            )
        got = sha256_file(path)
        if got != wf.sha256:
            raise WeightsDownloadError(
                f"{path} does not match its sha256 (got {got}, expected {wf.sha256}): "
                f"{catalogue.download_hint(model.name, again=True)}"
            )
        paths.append(path)
    return paths


# downloading ------------------------------------------------------------------------------


class ProgressBar:
    """A :data:`DownloadProgress` that draws one tqdm bar per file on stderr; ``close()``
    ends the last one."""

    def __init__(self) -> None:
        self._bar = None
        self._name: str | None = None

    def __call__(self, done: int, total: int | None, name: str) -> None:
        from tqdm import tqdm

        if name != self._name:
            self.close()
            self._name = name
            self._bar = tqdm(total=total, initial=done, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
                             file=sys.stderr, leave=False)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar = self._name = None


def download(
    model: str | Model | None = None,
    directory: str | os.PathLike[str] | None = None,
    *,
    progress: bool | None = None,
    on_progress: DownloadProgress | None = None,
    timeout: float = 60,
) -> list[Path]:
    """Fetch a model's files (default: the default model's) into `directory` (default:
    :func:`stemsep.catalogue.default_dir`, created if needed) and return their paths, checkpoint first.

    A file already present with the right sha256 is kept without any network access; a
    missing or corrupt one is fetched from its mirrors in order (see the module's notes on
    resuming and locking). ``progress`` shows a tqdm bar on stderr (default: when stderr is
    a terminal); ``on_progress`` is called with (bytes done, bytes in all, file name) as the
    bytes arrive. ``timeout`` is in seconds per connect or read, not for the whole file.
    Raises :class:`WeightsDownloadError` when every mirror of a file fails, naming each
    mirror's failure, or when the folder lacks the free space for it.
    """
    model = catalogue.get(catalogue.DEFAULT if model is None else model)
    directory = catalogue.default_dir() if directory is None else Path(directory)
    if progress is None:
        progress = sys.stderr.isatty()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsDownloadError(f"cannot create the weights folder {directory} ({_describe(exc)})") from None
    bar = ProgressBar() if progress else None
    report = _both(bar, on_progress)
    try:
        paths = []
        for wf in model.files:
            path = directory / wf.name
            with _locked(path):  # another process fetching the same file finishes first
                if not _matches(path, wf):
                    _fetch(wf, path, on_progress=report, timeout=timeout)
            paths.append(path)
        return paths
    finally:
        if bar is not None:
            bar.close()


def _both(*callbacks: DownloadProgress | None) -> DownloadProgress | None:
    chosen = [c for c in callbacks if c is not None]
    if len(chosen) <= 1:
        return chosen[0] if chosen else None

    def report(done: int, total: int | None, name: str) -> None:
        for callback in chosen:
            callback(done, total, name)

    return report


def _part(path: Path) -> Path:
    """Where the bytes of `path` gather while it downloads (kept for a resume)."""
    return path.with_name(f".{path.name}.part")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``.<name>.lock`` beside `path` (waiting for it). The lock
    file stays: removing it would let a process still waiting on the old one and a newcomer
    on a new one both hold "the" lock."""
    try:
        fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise WeightsDownloadError(f"cannot lock {path} for downloading ({_describe(exc)})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _matches(path: Path, wf: WeightFile) -> bool:
    try:
        if not path.is_file() or (wf.size is not None and path.stat().st_size != wf.size):
            return False
    except OSError:
        return False
    return sha256_file(path) == wf.sha256


def _fetch(wf: WeightFile, path: Path, *, on_progress: DownloadProgress | None, timeout: float) -> None:
    """Try `wf`'s mirrors in order until one gives the right bytes, then move them to `path`."""
    part = _part(path)
    _check_free_space(wf, part)
    failures = []
    for url in wf.urls:
        while True:
            resumed = part.exists() and part.stat().st_size > 0
            try:
                _stream(url, part, wf, on_progress=on_progress, timeout=timeout)
            except _WrongBytes as failed:
                part.unlink(missing_ok=True)
                if resumed:  # the bytes kept from before may be what was wrong: once more from the start
                    continue
                failures.append(f"{url}: {failed.reason}")
            except _MirrorFailed as failed:  # what arrived whole stays in the .part file
                failures.append(f"{url}: {failed.reason}")
            except _WriteFailed as failed:  # our side: the next mirror would fail the same way
                part.unlink(missing_ok=True)
                raise WeightsDownloadError(f"cannot write {path} ({_describe(failed.__cause__)})") from None
            else:
                os.replace(part, path)
                sync_folder(path.parent)
                return
            break
    tried = "; ".join(failures) if failures else "no mirrors listed"
    raise WeightsDownloadError(f"could not download {wf.name}: {tried}")


def _check_free_space(wf: WeightFile, part: Path) -> None:
    if wf.size is None:
        return
    have = part.stat().st_size if part.exists() else 0
    needed = max(wf.size - have, 0) + _FREE_SPACE_MARGIN
    free = shutil.disk_usage(part.parent).free
    if needed > free:
        raise WeightsDownloadError(
            f"not enough free disk space in {part.parent} for {wf.name}: about {needed / 2**20:.0f} MB needed, "
            f"{free / 2**20:.0f} MB free"
        )


class _MirrorFailed(Exception):
    """One mirror did not give the whole file; the next one is tried."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _WrongBytes(_MirrorFailed):
    """The bytes are not the file's (size or sha256): they are deleted."""


class _WriteFailed(Exception):
    """Writing the downloaded bytes failed (its cause is the OSError): not the mirror's fault."""


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def _stream(url: str, part: Path, wf: WeightFile, *, on_progress: DownloadProgress | None, timeout: float) -> None:
    """Bring `part` up to the whole of `wf` from `url`: ask for the bytes after those already
    in it, append them while hashing, and check the size and sha256. Raises
    :class:`_MirrorFailed` (bytes so far kept), :class:`_WrongBytes` (to delete) or
    :class:`_WriteFailed`."""
    have = part.stat().st_size if part.exists() else 0
    if wf.size is not None and have > wf.size:
        raise _WrongBytes(f"the partial file is longer than the expected {wf.size} bytes")
    if wf.size is not None and have == wf.size:  # complete already: only the checksum is left
        _check_sha256(_hash_prefix(part, have), wf)
        return
    headers = {"User-Agent": _USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    received = 0
    expected = None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
            start = _start_of(response, have)
            length = response.headers.get("Content-Length")
            body = int(length) if length and length.isdigit() else None
            expected = None if body is None else start + body
            if expected is not None and wf.size is not None and expected != wf.size:
                raise _MirrorFailed(f"size mismatch (the server offers {expected} bytes, expected {wf.size})")
            digest = _hash_prefix(part, start) if start else hashlib.sha256()
            done = start
            try:
                out = open(part, "r+b" if start else "wb")
            except FileNotFoundError:
                out = open(part, "wb")
            with out:
                out.truncate(start)
                out.seek(start)
                if on_progress is not None:
                    on_progress(done, wf.size or expected, wf.name)
                while block := response.read(_BLOCK):
                    done += len(block)
                    received += len(block)
                    if wf.size is not None and done > wf.size:
                        raise _WrongBytes(f"size mismatch (more than the expected {wf.size} bytes)")
                    digest.update(block)
                    try:
                        out.write(block)
                    except OSError as exc:  # a full disk, say: kept apart from the network's OSErrors
                        raise _WriteFailed() from exc
                    if on_progress is not None:
                        on_progress(done, wf.size or expected, wf.name)
                try:
                    out.flush()
                    os.fsync(out.fileno())
                except OSError as exc:
                    raise _WriteFailed() from exc
    except urllib.error.HTTPError as exc:
        exc.close()
        raise _MirrorFailed(f"HTTP {exc.code}") from None
    except urllib.error.URLError as exc:  # DNS, refused connection, TLS, connect timeout
        raise _MirrorFailed(_describe(exc.reason)) from None
    except http.client.IncompleteRead:
        raise _MirrorFailed(_closed_early(received, expected or wf.size, have)) from None
    except (OSError, http.client.HTTPException) as exc:  # read timeout, reset, bad response
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _WriteFailed() from exc
        raise _MirrorFailed(_describe(exc)) from None
    total = expected if expected is not None else wf.size
    if total is not None and done != total:
        raise _MirrorFailed(_closed_early(received, total, start))
    _check_sha256(digest, wf)


def _start_of(response: http.client.HTTPResponse, have: int) -> int:
    """Where the response's body starts in the file: `have` for a 206 answer to our Range
    request, 0 for a whole file (a server that ignores Range); a 206 for other bytes than
    those asked for is a failure."""
    if response.status != 206:
        return 0
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    if not match or int(match.group(1)) != have:
        raise _MirrorFailed(f"the server sent another range than bytes {have}- ({response.headers.get('Content-Range')})")
    return have


def _check_sha256(digest: hashlib._Hash, wf: WeightFile) -> None:
    got = digest.hexdigest()
    if got != wf.sha256:
        raise _WrongBytes(f"sha256 mismatch (got {got[:8]}…, expected {wf.sha256[:8]}…)")


def _describe(reason: object) -> str:
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _closed_early(received: int, expected: int | None, start: int = 0) -> str:
    total = "an unknown number of" if expected is None else str(expected - start)
    return f"connection closed early (got {received} of {total} bytes)"
