"""Receive Replicate's prediction webhooks and keep the stems: the receiving end done right.

``POST /webhooks/replicate`` takes the prediction object that Replicate sends when a
prediction created with ``webhook_events_filter=["completed"]`` ends. Each delivery is

1. verified: Standard Webhooks signature (``webhook-id``, ``webhook-timestamp``,
   ``webhook-signature``; HMAC-SHA256 over ``id.timestamp.body`` with the ``whsec_`` secret)
   and a timestamp no more than 5 minutes off; anything else gets 401;
2. recorded in one SQLite transaction before the answer: the ``webhook-id`` (an idempotency
   key: a retried delivery is acknowledged and not processed again) and the prediction's
   status, error, ``metrics.predict_time`` and output. A terminal status is final: a late
   non-terminal event (or a second terminal one) is acknowledged and ignored;
3. acknowledged at once (200); a succeeded prediction's outputs, whatever the model and
   the stems asked for, are named by :func:`stemsep.remote.stem_urls` (from the output and
   the prediction's ``model`` and ``stems`` inputs, which are recorded too) and downloaded
   in the background (atomic writes, :class:`~stemsep.remote.RetryPolicy`) to
   ``<store>/<prediction id>/<stem>.<ext>``. A download recorded as pending survives a
   crash and resumes when the receiver starts.

Stores written by earlier releases open as they are: the ``input`` column is added to them
(empty for what they recorded, which then names stems by the default model's).

Cog's own webhooks are unsigned: ``verify=False`` (``--insecure-no-verify``) accepts them
for local use, keying retries by the body's hash.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from stemsep.errors import RemoteError, StemsepError
from stemsep.files import PART_SUFFIX
from stemsep.remote import TERMINAL_STATUSES, DownloadInterrupted, RetryPolicy, download_stems, stem_urls

WEBHOOK_PATH = "/webhooks/replicate"  # where an app receives Replicate's deliveries
DB_NAME = "webhooks.sqlite3"
PREDICTION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")  # also a folder name in the store
STATUSES = ("starting", "processing", *TERMINAL_STATUSES)

log = logging.getLogger("stemsep.webhooks")


# durable record --------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    webhook_id    TEXT PRIMARY KEY,   -- the idempotency key
    prediction_id TEXT NOT NULL,
    status        TEXT NOT NULL,      -- the status the delivery carried
    outcome       TEXT NOT NULL,      -- accepted | ignored
    received_at   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS predictions (
    id             TEXT PRIMARY KEY,
    status         TEXT NOT NULL,     -- starting | processing | succeeded | failed | canceled | aborted
    error          TEXT,              -- the prediction's error (failed / canceled / aborted)
    predict_time   REAL,              -- metrics.predict_time, seconds
    output         TEXT,              -- the output as received, JSON
    download       TEXT,              -- NULL (nothing to fetch) | pending | done | failed
    download_error TEXT,
    files          TEXT,              -- JSON {stem: path relative to the store}
    updated_at     REAL NOT NULL,
    input          TEXT               -- the prediction's inputs but audio, JSON (NULL in older stores)
);
"""


class Store:
    """The receiver's state: ``<directory>/webhooks.sqlite3`` and the stem files beside it.

    Safe to share between threads; every write is one committed (fsynced) transaction.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.directory / DB_NAME, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            columns = {row["name"] for row in self._db.execute("PRAGMA table_info(predictions)")}
            if "input" not in columns:  # a store from before the inputs were recorded
                self._db.execute("ALTER TABLE predictions ADD COLUMN input TEXT")
        except (OSError, sqlite3.Error) as exc:
            raise StemsepError(f"cannot open the webhook store ({exc})", file=str(self.directory)) from None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _transaction(self, fn):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result

    def record_delivery(self, webhook_id: str, prediction: dict[str, Any]) -> str:
        """Record one verified delivery; returns ``accepted``, ``duplicate`` or ``ignored``.

        ``accepted`` with status ``succeeded`` means a download is now pending.
        """
        pid, status = prediction["id"], prediction["status"]

        def apply(db: sqlite3.Connection) -> str:
            now = time.time()
            seen = db.execute("SELECT 1 FROM deliveries WHERE webhook_id = ?", (webhook_id,)).fetchone()
            if seen:
                return "duplicate"
            row = db.execute("SELECT status FROM predictions WHERE id = ?", (pid,)).fetchone()
            outcome = "ignored" if row and row["status"] in TERMINAL_STATUSES else "accepted"
            db.execute("INSERT INTO deliveries VALUES (?, ?, ?, ?, ?)", (webhook_id, pid, status, outcome, now))
            if outcome == "accepted":
                db.execute(
                    "INSERT INTO predictions"
                    " (id, status, error, predict_time, output, input, download, download_error, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET status = excluded.status,"
                    " error = excluded.error, predict_time = excluded.predict_time, output = excluded.output,"
                    " input = excluded.input, download = excluded.download,"
                    " download_error = excluded.download_error, updated_at = excluded.updated_at",
                    (pid, status, *_terminal_fields(prediction), now),
                )
            return outcome

        return self._transaction(apply)

    def pending(self) -> list[str]:
        """Ids of succeeded predictions whose stems are not downloaded yet, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM predictions WHERE download = 'pending' ORDER BY updated_at"
            ).fetchall()
        return [row["id"] for row in rows]

    def prediction(self, prediction_id: str) -> dict[str, Any] | None:
        """The record of one prediction (``output``, ``input`` and ``files`` decoded), or None."""
        with self._lock:
            row = self._db.execute("SELECT * FROM predictions WHERE id = ?", (prediction_id,)).fetchone()
        if row is None:
            return None
        record = dict(row)
        for key in ("output", "input", "files"):
            record[key] = json.loads(record[key]) if record[key] is not None else None
        return record

    def deliveries(self, prediction_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM deliveries WHERE prediction_id = ? ORDER BY received_at", (prediction_id,)
            ).fetchall()
        return [dict(row) for row in rows]

    def finish_download(self, prediction_id: str, files: dict[str, str]) -> None:
        self._transaction(lambda db: db.execute(
            "UPDATE predictions SET download = 'done', download_error = NULL, files = ?, updated_at = ? WHERE id = ?",
            (json.dumps(files), time.time(), prediction_id),
        ))

    def fail_download(self, prediction_id: str, error: str) -> None:
        self._transaction(lambda db: db.execute(
            "UPDATE predictions SET download = 'failed', download_error = ?, updated_at = ? WHERE id = ?",
            (error, time.time(), prediction_id),
        ))


def _naming_inputs(prediction: dict[str, Any]) -> dict[str, Any] | None:
    """The prediction's inputs but ``audio`` (which can be a whole song as a data URL)."""
    inputs = prediction.get("input")
    return {k: v for k, v in inputs.items() if k != "audio"} if isinstance(inputs, dict) else None


def _terminal_fields(prediction: dict[str, Any]) -> tuple:
    """(error, predict_time, output JSON, input JSON, download, download_error) for a delivery."""
    status = prediction["status"]
    metrics = prediction.get("metrics") if isinstance(prediction.get("metrics"), dict) else {}
    predict_time = metrics.get("predict_time")
    predict_time = float(predict_time) if isinstance(predict_time, (int, float)) else None
    error = prediction.get("error")
    error = None if error is None else str(error)
    output = json.dumps(prediction.get("output"))
    inputs = _naming_inputs(prediction)
    download, download_error = None, None
    if status == "succeeded":
        try:
            stem_urls(prediction.get("output"), inputs)
            download = "pending"
        except RemoteError as exc:
            download, download_error = "failed", str(exc)
    return error, predict_time, output, None if inputs is None else json.dumps(inputs), download, download_error


# background downloads --------------------------------------------------------------------


class Downloader:
    """Fetch the stems of pending predictions on a few worker threads.

    A prediction is queued at most once at a time; a stem already in the store is not fetched
    again, so a resumed job only does what is left. :meth:`stop` interrupts running downloads
    and leaves their predictions pending for the next start.
    """

    def __init__(self, store: Store, *, retry: RetryPolicy | None = None, workers: int = 2):
        self.store = store
        self.retry = retry or RetryPolicy()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stemsep-download")
        self._queued: set[str] = set()
        self._lock = threading.Lock()

    def schedule(self, prediction_id: str) -> None:
        with self._lock:
            if prediction_id in self._queued or self._stop.is_set():
                return
            self._queued.add(prediction_id)
        self._pool.submit(self._run, prediction_id)

    def active(self) -> int:
        """How many predictions are queued or downloading now."""
        with self._lock:
            return len(self._queued)

    def resume(self) -> list[str]:
        pending = self.store.pending()
        for prediction_id in pending:
            self.schedule(prediction_id)
        if pending:
            log.info("resuming %d pending download(s): %s", len(pending), ", ".join(pending))
        return pending

    def stop(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, prediction_id: str) -> None:
        try:
            self._fetch(prediction_id)
        except DownloadInterrupted:
            log.info("prediction %s: download interrupted, it stays pending", prediction_id)
        except StemsepError as exc:
            log.error("prediction %s: %s", prediction_id, exc)
            self.store.fail_download(prediction_id, str(exc))
        except Exception as exc:  # a bug must not kill the worker silently
            log.exception("prediction %s: unexpected error while downloading", prediction_id)
            self.store.fail_download(prediction_id, f"unexpected error: {exc!r}")
        finally:
            with self._lock:
                self._queued.discard(prediction_id)

    def _fetch(self, prediction_id: str) -> None:
        record = self.store.prediction(prediction_id)
        if record is None or record["download"] != "pending":
            return
        folder = self.store.directory / prediction_id
        for leftover in folder.glob(f".*{PART_SUFFIX}"):  # from a crash mid-write
            leftover.unlink(missing_ok=True)
        stems = stem_urls(record["output"], record["input"])  # no input recorded (an older store): the default model's
        paths = download_stems(stems, folder, keep_existing=True, retry=self.retry, stop=self._stop)
        files = {stem: path.relative_to(self.store.directory).as_posix() for stem, path in paths.items()}
        self.store.finish_download(prediction_id, files)
        log.info("prediction %s: stems saved: %s", prediction_id, ", ".join(files.values()))


# the app ---------------------------------------------------------------------------------


def _verifier(secret: str):
    from standardwebhooks import Webhook

    if not secret.startswith("whsec_"):
        raise StemsepError("the webhook signing secret must start with whsec_ (GET /v1/webhooks/default/secret)")
    try:
        return Webhook(secret)
    except Exception:
        raise StemsepError("the webhook signing secret is not whsec_ followed by base64") from None


def _parse_prediction(body: bytes) -> dict[str, Any] | str:
    """The prediction in a delivery's body, or a sentence saying what is wrong with it."""
    try:
        prediction = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "the body is not JSON"
    if not isinstance(prediction, dict):
        return "the body is not a prediction object"
    if not isinstance(prediction.get("id"), str) or not PREDICTION_ID.fullmatch(prediction["id"]):
        return "the prediction has no valid id"
    if prediction.get("status") not in STATUSES:
        return f"the prediction's status {prediction.get('status')!r} is not one of {', '.join(STATUSES)}"
    return prediction


def create_app(
    store: str | Path,
    secret: str | None = None,
    *,
    verify: bool = True,
    retry: RetryPolicy | None = None,
    workers: int = 2,
):
    """The ASGI app: ``POST /webhooks/replicate`` and ``GET /health`` (which also says how
    many predictions' downloads are queued or running).

    `secret` is the ``whsec_...`` signing secret; ``verify=False`` accepts unsigned
    deliveries (local Cog testing only). `retry` tunes download retries.
    """
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    if verify:
        if not secret:
            raise StemsepError(
                "no webhook signing secret: give the whsec_... secret or set REPLICATE_WEBHOOK_SECRET"
                " (or turn verification off, for local tests only)"
            )
        verifier = _verifier(secret)
    else:
        verifier = None
        log.warning("webhook signatures are NOT verified: anyone who can reach this port can post predictions")

    state = Store(store)
    downloader = Downloader(state, retry=retry, workers=workers)

    async def receive(request: Request) -> JSONResponse:
        body = await request.body()
        if verifier is not None:
            try:
                verifier.verify(body, dict(request.headers), json_parse=False)
            except Exception as exc:  # missing/invalid headers, stale timestamp, bad signature
                log.warning("rejected a webhook delivery: %s", exc or type(exc).__name__)
                return JSONResponse({"error": f"signature verification failed: {exc}"}, status_code=401)
            delivery_id = request.headers["webhook-id"]
        else:
            delivery_id = request.headers.get("webhook-id") or "sha256:" + hashlib.sha256(body).hexdigest()
        prediction = _parse_prediction(body)
        if isinstance(prediction, str):
            return JSONResponse({"error": prediction}, status_code=400)
        outcome = await run_in_threadpool(state.record_delivery, delivery_id, prediction)
        log.info("delivery %s: prediction %s %s: %s", delivery_id, prediction["id"], prediction["status"], outcome)
        if outcome == "accepted" and prediction["status"] == "succeeded":
            downloader.schedule(prediction["id"])
        return JSONResponse({"outcome": outcome, "prediction": prediction["id"]})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True, "verify": verifier is not None, "downloads": downloader.active()})

    @asynccontextmanager
    async def lifespan(app):
        downloader.resume()
        try:
            yield
        finally:
            await run_in_threadpool(downloader.stop)
            state.close()

    app = Starlette(
        routes=[Route(WEBHOOK_PATH, receive, methods=["POST"]), Route("/health", health, methods=["GET"])],
        lifespan=lifespan,
    )
    app.state.store = state
    app.state.downloader = downloader
    return app


def serve(
    store: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    secret: str | None = None,
    verify: bool = True,
    retry: RetryPolicy | None = None,
) -> None:
    """Run the receiver with uvicorn until interrupted."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    app = create_app(store, secret, verify=verify, retry=retry)
    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["loggers"]["stemsep"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    uvicorn.run(app, host=host, port=port, log_config=log_config, timeout_graceful_shutdown=5)
