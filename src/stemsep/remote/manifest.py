"""The state of a batch run, in ``<output folder>/stemsep-remote.sqlite3``: one row per song
(its input, output name, state, prediction, files, error, billed time) and the settings
(Replicate model, model inputs) every run of that folder must share. The file name and
schema are those of the first release, so folders from any earlier run resume.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from stemsep.errors import RemoteError
from stemsep.remote.client import input_name

MANIFEST_NAME = "stemsep-remote.sqlite3"
LOCK_NAME = ".stemsep-remote.lock"
SONG_STATES = ("queued", "submitting", "submitted", "succeeded", "failed")


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


_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,           -- model (the Replicate model) | inputs (JSON)
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
    """A batch's state in ``<output folder>/stemsep-remote.sqlite3``: one row per input,
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
        """The Replicate model and model inputs of this batch: recorded by the first run, and a
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


class FolderLock:
    """One batch run per output folder at a time (the kernel drops the lock if the
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
