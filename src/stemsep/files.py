"""Writing files so that a reader never sees half of one.

Every file stemsep writes (stems, downloaded weights, fetched outputs, evaluation results)
goes through :func:`atomic_file`: the bytes go to a hidden ``.<name>.<random>.part`` file
beside the destination, which is flushed to disk and then renamed over it, and the folder
entry is synced too. On any way out but success (an error, Ctrl-C) the temporary file is
removed and the destination is untouched: it is either absent, its old self, or complete.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Self

PART_SUFFIX = ".part"


def part_path(path: Path) -> Path:
    """The hidden temporary file that :func:`atomic_file` writes for `path`."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{PART_SUFFIX}")


@contextmanager
def atomic_file(path: str | Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Open a temporary binary file for `path`; on a clean exit it replaces `path` (with
    permissions `mode`), on any exception it is deleted and the exception goes on."""
    path = Path(path)
    tmp = part_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def commit_part(tmp: Path, path: Path) -> None:
    """Rename a finished, already-synced temporary file over `path` and sync the folder
    (for writers that hold their temporary file open across many calls)."""
    os.replace(tmp, path)
    sync_folder(path.parent)


def sync_folder(directory: Path) -> None:
    """Make a rename in `directory` durable; a file system that cannot sync folders is let be."""
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


class AllOrNothing:
    """A writer that is used as `with writer:`: `close()` (finish and move into place) on a
    clean exit, `abort()` (remove every trace) on an exception."""

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def first_line(what: BaseException | str, limit: int | None = 200) -> str:
    """The first line of an exception's text, or of a string, at most `limit` characters (None:
    all of it); leading blank lines are skipped. An exception without text gives its class
    name, empty text ""."""
    lines = str(what).strip().splitlines()
    if lines:
        return lines[0][:limit]
    return type(what).__name__ if isinstance(what, BaseException) else ""


def reason(exc: BaseException) -> str:
    """Why an OS or encoder call failed, for a message in parentheses: the error's own
    description (`strerror`, without the errno and file name) where it has one, else its
    first line; no final period."""
    return first_line(getattr(exc, "strerror", None) or exc, limit=None).rstrip(".")
