"""The output folder of `stemsep ui`: one subfolder per separation, and nothing else served.

Each finished separation is a subfolder of the output folder holding its stem files and a
small JSON record (:data:`RECORD_NAME`: the song, model, options, stems and when). A
separation is written into a hidden ``.<id>.part`` folder and renamed into place with its
record last, so a listed separation is always whole; a canceled or failed one's folder is
removed. Uploads wait in the hidden ``.uploads`` folder, each in a folder of its own under
the song's own file name (so errors name the user's file), and are removed once separated;
an exported mix waits there too while it is sent.

Only the files a record lists are ever served or deleted, and only when their real path
(symlinks resolved) is inside the output folder: anything else is "not found".
"""

from __future__ import annotations

import datetime
import json
import os
import re
import secrets
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stemsep.errors import StemsepError

RECORD_NAME = "stemsep-ui.json"
RECORD_VERSION = 1
UPLOADS = ".uploads"
PART_SUFFIX = ".part"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,150}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class NotFound(Exception):
    """No separation or file of that name is served."""


@dataclass
class Record:
    """What a separation's JSON record holds."""

    id: str
    song: str  # the uploaded file's name
    model: str
    engine: str  # "local" or "replicate"
    options: dict[str, Any]  # output format, stems asked for, tta, overlap...
    stems: dict[str, str]  # stem -> file name in the separation's folder, in the model's order
    created: str  # ISO 8601, UTC, when the separation finished
    seconds: float  # how long it took
    duration_s: float | None = None  # the stems' length, where their container tells
    sample_rate: int | None = None  # the stems' sample rate
    version: int = field(default=RECORD_VERSION)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Library:
    """The separations under `root` (created if missing)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).absolute()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StemsepError(f"output folder {self.root} cannot be created ({exc.strerror or exc})") from None
        self.real_root = self.root.resolve()
        self.uploads = self.root / UPLOADS
        self._clear_leftovers()

    def _clear_leftovers(self) -> None:
        """Remove what an earlier server left half-done: parts of separations and uploads."""
        for entry in self.root.glob(f".*{PART_SUFFIX}"):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
        if self.uploads.is_dir() and not self.uploads.is_symlink():
            shutil.rmtree(self.uploads, ignore_errors=True)

    # new separations ----------------------------------------------------------------------

    def temp_file(self, filename: str) -> Path:
        """A fresh path for an upload or a mix being sent, under its own (sanitized) name."""
        folder = self.uploads / secrets.token_hex(8)
        folder.mkdir(parents=True)
        return folder / safe_filename(filename)

    @staticmethod
    def discard_temp(path: Path) -> None:
        shutil.rmtree(path.parent, ignore_errors=True)

    def new_separation(self, song: str) -> tuple[str, Path]:
        """An id for a separation of `song` and the hidden folder to write its stems into."""
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = _UNSAFE.sub("_", Path(song).stem).strip("._-")[:80] or "song"
        sep_id = f"{base}-{stamp}-{secrets.token_hex(2)}"
        part = self.root / f".{sep_id}{PART_SUFFIX}"
        part.mkdir()
        return sep_id, part

    def finish(self, part: Path, record: Record) -> Record:
        """Write the record into `part` and move the folder into place."""
        (part / RECORD_NAME).write_text(json.dumps(record.to_json(), indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(part, self.root / record.id)
        return record

    @staticmethod
    def discard(part: Path) -> None:
        shutil.rmtree(part, ignore_errors=True)

    # reading ------------------------------------------------------------------------------

    def records(self) -> list[Record]:
        """Every whole separation, newest first (folders whose record cannot be read are left out)."""
        found = []
        for entry in self.root.iterdir():
            if _ID.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
                try:
                    found.append(self.record(entry.name))
                except NotFound:
                    continue
        return sorted(found, key=lambda r: r.created, reverse=True)

    def record(self, sep_id: str) -> Record:
        folder = self._folder(sep_id)
        try:
            raw = json.loads(self._inside(folder / RECORD_NAME).read_text(encoding="utf-8"))
            record = Record(**raw)
        except (OSError, ValueError, TypeError):
            raise NotFound(sep_id) from None
        if record.id != sep_id or not all(isinstance(n, str) and safe_filename(n) == n for n in record.stems.values()):
            raise NotFound(sep_id)
        return record

    def stem_file(self, sep_id: str, filename: str) -> Path:
        """The path of a stem file that `sep_id`'s record lists, checked to be inside the folder."""
        record = self.record(sep_id)
        if filename not in record.stems.values():
            raise NotFound(filename)
        return self._inside(self._folder(sep_id) / filename)

    def stem_files(self, sep_id: str) -> list[Path]:
        record = self.record(sep_id)
        return [self.stem_file(sep_id, name) for name in record.stems.values()]

    def delete(self, sep_id: str) -> None:
        """Remove a separation: its listed stem files (a symlink among them: the link, never
        its target), its record, then its folder if that left it empty."""
        folder = self._folder(sep_id)
        for name in self.record(sep_id).stems.values():  # plain names (see record()): inside the folder
            (folder / name).unlink(missing_ok=True)
        (folder / RECORD_NAME).unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:
            pass  # something else was put there: left alone

    def zip_stream(self, sep_id: str, block: int = 1 << 20) -> Iterator[bytes]:
        """A zip of a separation's stems (stored, not compressed: audio does not shrink), as
        bytes to send while it is made; nothing is written to disk."""
        paths = self.stem_files(sep_id)
        sink = _Sink()
        with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as archive:
            for path in paths:
                info = zipfile.ZipInfo.from_file(path, arcname=path.name)
                with open(path, "rb") as src, archive.open(info, "w", force_zip64=info.file_size >= zipfile.ZIP64_LIMIT) as dst:
                    while chunk := src.read(block):
                        dst.write(chunk)
                        yield sink.take()
                yield sink.take()
        yield sink.take()

    def _folder(self, sep_id: str) -> Path:
        if not isinstance(sep_id, str) or not _ID.fullmatch(sep_id):
            raise NotFound(sep_id)
        folder = self.root / sep_id
        if folder.is_symlink() or not folder.is_dir():
            raise NotFound(sep_id)
        return self._inside(folder)

    def _inside(self, path: Path) -> Path:
        """`path` if it is no symlink and really lies inside the output folder, else NotFound."""
        if path.is_symlink():
            raise NotFound(path.name)
        real = path.resolve()
        if real == self.real_root or self.real_root not in real.parents:
            raise NotFound(path.name)
        return path


def probe(path: Path) -> tuple[float | None, int | None]:
    """A stem file's length in seconds and sample rate, where its container tells (else None)."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.audio[0]
            return (container.duration / 1e6 if container.duration else None), stream.rate or None
    except (av.FFmpegError, OSError, ValueError, IndexError):
        return None, None


def safe_filename(name: str) -> str:
    """`name` as a plain file name: its last path component, without control characters or
    a leading dot; "audio" when nothing is left."""
    name = re.split(r"[\\/]", str(name))[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip().lstrip(".")
    return name[:200] or "audio"


class _Sink:
    """A write-only, unseekable file that hands what was written to whoever takes it."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._written = 0

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        self._written += len(data)
        return len(data)

    def tell(self) -> int:
        return self._written

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data
