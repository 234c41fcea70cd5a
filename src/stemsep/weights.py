"""Fetching a catalogue model's files safely, and checking the ones on disk.

Which files a model has, their sha256, sizes and mirrors are in the catalogue
(:mod:`stemsep.catalogue`); this module only moves bytes. :func:`download` tries each
file's mirrors in order, streaming into a hidden ``.part`` file beside the destination
(:func:`stemsep.files.atomic_file`) while hashing, and keeps it only when the size and the
sha256 match; anything else (HTTP error, wrong size, dropped connection, timeout, wrong
bytes, Ctrl-C) leaves no file behind and moves on to the next mirror. A file already on
disk with the right sha256 is kept without any network access. :func:`verify` checks the
files on disk. Both raise :class:`stemsep.errors.WeightsDownloadError` with one sentence
naming the file at fault.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from stemsep import catalogue
from stemsep.catalogue import Model, WeightFile
from stemsep.errors import WeightsDownloadError
from stemsep.files import atomic_file

_BLOCK = 1 << 20  # hash and stream in 1 MiB blocks: checkpoints are up to 1.7 GB
_USER_AGENT = "stemsep"


# where the files live ---------------------------------------------------------------------


def default_dir() -> Path:
    """The weights folder: ``$STEMSEP_WEIGHTS_DIR`` if set, else ``weights/`` at the
    repository root when running from a checkout (the folder holding ``pyproject.toml``
    above ``src/stemsep/``), else ``weights/`` in the current directory."""
    env = os.environ.get("STEMSEP_WEIGHTS_DIR")
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parents[2]  # src/stemsep/weights.py -> repo root
    if (repo_root / "pyproject.toml").is_file():
        return repo_root / "weights"
    return Path.cwd() / "weights"


# checking ---------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def verify(model: str | Model | None = None, directory: str | os.PathLike[str] | None = None) -> list[Path]:
    """Check that a model's files (default: the default model's) are in `directory`
    (default: :func:`default_dir`) with their sizes and sha256; return their paths."""
    model = catalogue.get(catalogue.DEFAULT if model is None else model)
    directory = default_dir() if directory is None else Path(directory)
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


def download(
    model: str | Model | None = None,
    directory: str | os.PathLike[str] | None = None,
    *,
    progress: bool | None = None,
    timeout: float = 60,
) -> list[Path]:
    """Fetch a model's files (default: the default model's) into `directory` (default:
    :func:`default_dir`, created if needed) and return their paths, checkpoint first.

    A file already present with the right sha256 is kept without any network access; a
    missing or corrupt one is fetched from its mirrors in order. ``progress`` shows a tqdm
    bar on stderr (default: when stderr is a terminal). ``timeout`` is in seconds per
    connect or read, not for the whole file. Raises :class:`WeightsDownloadError` when
    every mirror of a file fails, naming each mirror's failure.
    """
    model = catalogue.get(catalogue.DEFAULT if model is None else model)
    directory = default_dir() if directory is None else Path(directory)
    if progress is None:
        progress = sys.stderr.isatty()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsDownloadError(f"cannot create the weights folder {directory} ({_describe(exc)})") from None
    paths = []
    for wf in model.files:
        path = directory / wf.name
        if not _matches(path, wf):
            _fetch(wf, path, progress=progress, timeout=timeout)
        paths.append(path)
    return paths


def _matches(path: Path, wf: WeightFile) -> bool:
    try:
        if not path.is_file() or (wf.size is not None and path.stat().st_size != wf.size):
            return False
    except OSError:
        return False
    return sha256_file(path) == wf.sha256


def _fetch(wf: WeightFile, path: Path, *, progress: bool, timeout: float) -> None:
    """Try `wf`'s mirrors in order until one gives the right bytes at `path`."""
    failures = []
    for url in wf.urls:
        try:
            # The .part file is removed on every way out of this block but success, Ctrl-C included.
            with atomic_file(path) as out:
                _stream(url, out, wf, progress=progress, timeout=timeout)
            return
        except _MirrorFailed as failed:
            failures.append(f"{url}: {failed.reason}")
        except (OSError, _WriteFailed) as exc:  # our side: the next mirror would fail the same way
            cause = exc.__cause__ if isinstance(exc, _WriteFailed) else exc
            raise WeightsDownloadError(f"cannot write {path} ({_describe(cause)})") from None
    tried = "; ".join(failures) if failures else "no mirrors listed"
    raise WeightsDownloadError(f"could not download {wf.name}: {tried}")


class _MirrorFailed(Exception):
    """One mirror did not give the right bytes; the next one is tried."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _WriteFailed(Exception):
    """Writing the downloaded bytes failed (its cause is the OSError): not the mirror's fault."""


def _stream(url: str, out: BinaryIO, wf: WeightFile, *, progress: bool, timeout: float) -> None:
    """Copy `url`'s body into `out`, checking its size and sha256 against `wf`; raise
    :class:`_MirrorFailed` saying why when they do not match or the transfer fails."""
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    digest = hashlib.sha256()
    received = 0
    offered = None
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            offered = int(length) if length and length.isdigit() else None
            if offered is not None and wf.size is not None and offered != wf.size:
                raise _MirrorFailed(f"size mismatch (the server offers {offered} bytes, expected {wf.size})")
            with tqdm(
                total=wf.size or offered, desc=wf.name, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, disable=not progress, leave=False,
            ) as bar:
                while block := response.read(_BLOCK):
                    received += len(block)
                    if wf.size is not None and received > wf.size:
                        raise _MirrorFailed(f"size mismatch (more than the expected {wf.size} bytes)")
                    digest.update(block)
                    try:
                        out.write(block)
                    except OSError as exc:  # a full disk, say: kept apart from the network's OSErrors
                        raise _WriteFailed() from exc
                    bar.update(len(block))
    except urllib.error.HTTPError as exc:
        exc.close()
        raise _MirrorFailed(f"HTTP {exc.code}") from None
    except urllib.error.URLError as exc:  # DNS, refused connection, TLS, connect timeout
        raise _MirrorFailed(_describe(exc.reason)) from None
    except http.client.IncompleteRead:
        raise _MirrorFailed(_closed_early(received, offered or wf.size)) from None
    except (OSError, http.client.HTTPException) as exc:  # read timeout, reset, bad response
        raise _MirrorFailed(_describe(exc)) from None
    expected = offered if offered is not None else wf.size
    if expected is not None and received != expected:
        raise _MirrorFailed(_closed_early(received, expected))
    got = digest.hexdigest()
    if got != wf.sha256:
        raise _MirrorFailed(f"sha256 mismatch (got {got[:8]}…, expected {wf.sha256[:8]}…)")


def _describe(reason: object) -> str:
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _closed_early(received: int, expected: int | None) -> str:
    total = "an unknown number of" if expected is None else str(expected)
    return f"connection closed early (got {received} of {total} bytes)"


# The default model's files, for callers written before the catalogue; new code reads
# `catalogue.get(name).files`. Derived from the catalogue, not a second table.
WEIGHT_FILES: tuple[WeightFile, ...] = catalogue.get(catalogue.DEFAULT).files
