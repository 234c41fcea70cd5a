"""Where the BS-RoFormer viperx 1297 weights come from, and fetching them safely.

The model is two files: the checkpoint ``model_bs_roformer_ep_317_sdr_12.9755.ckpt``
(639 MB) and its config ``model_bs_roformer_ep_317_sdr_12.9755.yaml``. Each has a list of
mirrors, tried in order (the same order audio-separator 0.47.1 uses), and a sha256.

:func:`download` streams a file into a hidden ``.part`` file next to its destination,
hashing as it goes, and moves it into place only when the sha256 matches; anything else
(HTTP error, dropped connection, timeout, wrong bytes, Ctrl-C) leaves no file behind and
moves on to the next mirror. :func:`verify` checks files already on disk. Both raise
:class:`stemsep.errors.WeightsDownloadError` with one sentence naming the file at fault.
The weights carry no licence statement from their author.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from stemsep.errors import WeightsDownloadError

_BLOCK = 1 << 20  # hash and stream in 1 MiB blocks: the checkpoint is 639 MB
_USER_AGENT = "stemsep"


@dataclass(frozen=True)
class WeightFile:
    """One file of the model: its name on disk, its sha256, and mirrors to try in order."""

    name: str
    sha256: str
    urls: tuple[str, ...]


# mirrors and checksums ----------------------------------------------------------------------

_UVR = "https://github.com/TRvlvr/model_repo/releases/download/all_public_uvr_models"
_AUDIO_SEPARATOR = "https://github.com/nomadkaraoke/python-audio-separator/releases/download/model-configs"
_STEM = "model_bs_roformer_ep_317_sdr_12.9755"

# The sha256 values come from one third-party source (REFERENCE.md, "Where the weights come
# from"), not from the model's author: confirm them on the first real download and record
# the confirmation here. The primary mirror was reported returning 404 in mid-2026.
WEIGHT_FILES: tuple[WeightFile, ...] = (
    WeightFile(
        name=f"{_STEM}.ckpt",
        sha256="5b84f37e8d444c8cb30c79d77f613a41c05868ff9c9ac6c7049c00aefae115aa",
        urls=(f"{_UVR}/{_STEM}.ckpt", f"{_AUDIO_SEPARATOR}/{_STEM}.ckpt"),
    ),
    WeightFile(
        name=f"{_STEM}.yaml",
        sha256="2bfdd16c656bd9519aba757cc4f8834b7ede675eb1e00ec4772d74ae1c41af7f",
        urls=(f"{_UVR}/mdx_model_data/mdx_c_configs/{_STEM}.yaml", f"{_AUDIO_SEPARATOR}/{_STEM}.yaml"),
    ),
)


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


def verify(directory: str | os.PathLike[str], files: Sequence[WeightFile] | None = None) -> list[Path]:
    """Check that every file is in ``directory`` with its sha256; return their paths.

    ``files`` defaults to :data:`WEIGHT_FILES` (read at call time).
    """
    files = WEIGHT_FILES if files is None else files
    directory = Path(directory)
    paths = []
    for wf in files:
        path = directory / wf.name
        if not path.is_file():
            raise WeightsDownloadError(f"{path} is missing: run `stemsep weights download` to fetch it")
        got = sha256_file(path)
        if got != wf.sha256:
            raise WeightsDownloadError(
                f"{path} does not match its sha256 (got {got}, expected {wf.sha256}): "
                "run `stemsep weights download` to replace it"
            )
        paths.append(path)
    return paths


# downloading ------------------------------------------------------------------------------


def download(
    directory: str | os.PathLike[str],
    files: Sequence[WeightFile] | None = None,
    *,
    progress: bool | None = None,
    timeout: float = 60,
) -> list[Path]:
    """Fetch every file into ``directory`` (created if needed) and return their paths.

    A file already present with the right sha256 is kept without any network access; a
    missing or corrupt one is fetched from its mirrors in order. ``files`` defaults to
    :data:`WEIGHT_FILES` (read at call time). ``progress`` shows a tqdm bar on stderr
    (default: when stderr is a terminal). ``timeout`` is in seconds per connect or read,
    not for the whole file. Raises :class:`WeightsDownloadError` when every mirror of a
    file fails, naming each mirror's failure.
    """
    files = WEIGHT_FILES if files is None else files
    if progress is None:
        progress = sys.stderr.isatty()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for wf in files:
        path = directory / wf.name
        if not (path.is_file() and sha256_file(path) == wf.sha256):
            _fetch(wf, path, progress=progress, timeout=timeout)
        paths.append(path)
    return paths


def _fetch(wf: WeightFile, path: Path, *, progress: bool, timeout: float) -> None:
    """Try ``wf``'s mirrors in order until one gives the right bytes at ``path``."""
    failures = []
    for url in wf.urls:
        reason = _fetch_one(url, wf, path, progress=progress, timeout=timeout)
        if reason is None:
            return
        failures.append(f"{url}: {reason}")
    tried = "; ".join(failures) if failures else "no mirrors listed"
    raise WeightsDownloadError(f"could not download {wf.name}: {tried}")


def _fetch_one(url: str, wf: WeightFile, path: Path, *, progress: bool, timeout: float) -> str | None:
    """Download ``url`` to ``path`` if its sha256 matches; return None, or why it failed.

    The bytes go to a hidden ``.part`` file in the same folder (so the final rename is
    atomic) that is removed on every way out but success, Ctrl-C included.
    """
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{wf.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            result = _stream(url, out, wf.name, progress=progress, timeout=timeout)
        if isinstance(result, str):
            return result
        got = result.hexdigest()
        if got != wf.sha256:
            return f"sha256 mismatch (got {got[:8]}…, expected {wf.sha256[:8]}…)"
        os.replace(tmp, path)
        return None
    finally:
        tmp.unlink(missing_ok=True)


def _stream(url: str, out: BinaryIO, label: str, *, progress: bool, timeout: float) -> hashlib._Hash | str:
    """Copy ``url``'s body into ``out``; return its sha256 object, or why it failed."""
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    digest = hashlib.sha256()
    received = 0
    expected = None
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            with tqdm(
                total=expected, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, disable=not progress, leave=False,
            ) as bar:
                while block := response.read(_BLOCK):
                    digest.update(block)
                    out.write(block)
                    received += len(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as exc:
        exc.close()
        return f"HTTP {exc.code}"
    except urllib.error.URLError as exc:  # DNS, refused connection, TLS, connect timeout
        return _describe(exc.reason)
    except http.client.IncompleteRead:
        return _closed_early(received, expected)
    except (OSError, http.client.HTTPException) as exc:  # read timeout, reset, bad response
        return _describe(exc)
    if expected is not None and received != expected:
        return _closed_early(received, expected)
    return digest


def _describe(reason: object) -> str:
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _closed_early(received: int, expected: int | None) -> str:
    total = "an unknown number of" if expected is None else str(expected)
    return f"connection closed early (got {received} of {total} bytes)"
