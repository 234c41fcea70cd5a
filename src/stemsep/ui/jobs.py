"""The queue of `stemsep ui`: songs wait their turn and are separated one at a time.

One worker thread takes the queued jobs in order and hands each to an engine
(:mod:`stemsep.ui.engines`: this computer's device, or the Replicate model). A job reports
its progress in chunks through the Separator's progress callback, and its remaining time
is estimated from the chunks done so far. Canceling a queued job drops it; canceling a
running one makes the progress callback raise :class:`Canceled` before the next chunk,
which stops the separation (the Separator removes its unfinished files). Whatever way a
job ends, its upload is removed, and unless it succeeded, its separation folder too.
"""

from __future__ import annotations

import datetime
import itertools
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from stemsep.errors import StemsepError
from stemsep.files import first_line
from stemsep.ui.library import Library, Record, probe

KEEP_FINISHED = 50  # finished jobs still listed on the page


class Canceled(Exception):
    """Raised from the progress callback to stop a canceled separation between two chunks."""


@dataclass(frozen=True)
class Options:
    """What the page asked for."""

    model: str  # a catalogue name, the custom model's key, or the hosted model's `model` input
    stems: tuple[str, ...] | None  # None: all of the model's
    output_format: str
    tta: bool
    engine: str  # "local" or "replicate"


class Engine(Protocol):
    def model_name(self, model: str) -> str:
        """How records name the model that `Options.model` chose."""

    def run(self, job: Job, folder: Path, on_progress: Callable[[int, int], None]) -> dict[str, Path]:
        """Separate `job.upload` into `folder`; the stem files by name."""


class Job:
    """One song on its way through the queue."""

    _ids = itertools.count(1)

    def __init__(self, song: str, upload: Path, options: Options):
        self.id = str(next(self._ids))
        self.song, self.upload, self.options = song, upload, options
        self.state = "queued"  # -> running -> done | failed | canceled
        self.stage = "waiting"
        self.error: str | None = None
        self.separation: str | None = None  # the record's id once done
        self.done = self.total = 0
        self.queued_at = time.time()
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self._first: tuple[float, int] | None = None  # (time, chunks done) at the first report
        self.cancel_requested = threading.Event()

    def progress(self, done: int, total: int, stage: str = "separating") -> None:
        """The Separator's progress callback (chunks; also a model download's, in bytes):
        record, or stop a canceled job."""
        if self.cancel_requested.is_set():
            raise Canceled
        if stage != self.stage:
            self.begin(stage)
        if self._first is None:
            self._first = (time.monotonic(), done)
        self.done, self.total = done, total

    def begin(self, stage: str) -> None:
        """A new stage: its progress and remaining time start afresh."""
        self.stage, self._first, self.done, self.total = stage, None, 0, 0

    def remaining_s(self) -> float | None:
        """Seconds left at the pace of this stage's progress since its first report."""
        if self.state != "running" or self._first is None or not self.total:
            return None
        t0, d0 = self._first
        if self.done <= d0:
            return None
        return (time.monotonic() - t0) / (self.done - d0) * (self.total - self.done)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "song": self.song, "state": self.state, "stage": self.stage, "error": self.error,
            "separation": self.separation, "done": self.done, "total": self.total, "remaining_s": self.remaining_s(),
            "model": self.options.model, "engine": self.options.engine,
            "queued_at": self.queued_at, "started_at": self.started_at, "ended_at": self.ended_at,
        }


class JobQueue:
    """Jobs in order, run one at a time by a worker thread with the engine named in their options."""

    def __init__(self, library: Library, engines: dict[str, Engine], record_options: dict[str, Any] | None = None):
        self.library, self.engines = library, engines
        self.record_options = record_options or {}  # settings every record notes (overlap...)
        self.jobs: list[Job] = []
        self._changed = threading.Condition()
        self._stopping = False
        self._worker = threading.Thread(target=self._work, name="stemsep-ui-worker", daemon=True)
        self._worker.start()

    def add(self, job: Job) -> Job:
        with self._changed:
            self.jobs.append(job)
            self._changed.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        return next((j for j in self.jobs if j.id == job_id), None)

    def listing(self) -> list[dict[str, Any]]:
        return [j.to_json() for j in self.jobs]

    def cancel(self, job: Job) -> None:
        with self._changed:
            job.cancel_requested.set()
            if job.state == "queued":
                self._end(job, "canceled")
            self._changed.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no job is queued or running; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while any(j.state in ("queued", "running") for j in self.jobs):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def close(self, timeout: float = 30) -> None:
        """Cancel every job and stop the worker (waiting at most `timeout` seconds for it)."""
        with self._changed:
            self._stopping = True
            for job in self.jobs:
                if job.state in ("queued", "running"):
                    job.cancel_requested.set()
                    if job.state == "queued":
                        self._end(job, "canceled")
            self._changed.notify_all()
        self._worker.join(timeout)

    # the worker ---------------------------------------------------------------------------

    def _next(self) -> Job | None:
        with self._changed:
            while not self._stopping:
                job = next((j for j in self.jobs if j.state == "queued"), None)
                if job is not None:
                    job.state, job.started_at = "running", time.time()
                    job.begin("starting")
                    self._changed.notify_all()
                    return job
                self._changed.wait()
        return None

    def _work(self) -> None:
        while (job := self._next()) is not None:
            sep_id, folder = self.library.new_separation(job.song)
            started = time.monotonic()
            try:
                engine = self.engines[job.options.engine]
                paths = engine.run(job, folder, job.progress)
                if job.cancel_requested.is_set():
                    raise Canceled
                duration_s, sample_rate = probe(next(iter(paths.values())))
                record = Record(
                    id=sep_id, song=job.song, model=engine.model_name(job.options.model), engine=job.options.engine,
                    options={"output_format": job.options.output_format, "stems": list(job.options.stems or ()) or None,
                             "tta": job.options.tta, **self.record_options},
                    stems={stem: path.name for stem, path in paths.items()},
                    created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    seconds=round(time.monotonic() - started, 3), duration_s=duration_s, sample_rate=sample_rate,
                )
                job.separation = self.library.finish(folder, record).id
                self._end(job, "done")
            except Canceled:
                self.library.discard(folder)
                self._end(job, "canceled")
            except StemsepError as exc:
                self.library.discard(folder)
                self._end(job, "failed", str(exc))
            except Exception as exc:  # a bug or an environment problem: one line on the page, the traceback on stderr
                self.library.discard(folder)
                traceback.print_exc(file=sys.stderr)
                self._end(job, "failed", f"{job.song}: the separation failed ({type(exc).__name__}: {first_line(exc)})")

    def _end(self, job: Job, state: str, error: str | None = None) -> None:
        with self._changed:
            job.state, job.stage, job.error, job.ended_at = state, state, error, time.time()
            self.library.discard_temp(job.upload)
            finished = [j for j in self.jobs if j.state not in ("queued", "running")]
            for old in finished[:-KEEP_FINISHED]:
                self.jobs.remove(old)
            self._changed.notify_all()
