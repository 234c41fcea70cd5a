"""The webhook receiver, run as `stemsep serve-webhooks` in a subprocess and spoken to over
real HTTP on 127.0.0.1. Deliveries are signed with the `standardwebhooks` library's own
signer; outputs are served by a local file server the tests control."""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import http.server
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from cogserver import free_port, wait_for
from standardwebhooks import Webhook

from stemsep.webhooks import WEBHOOK_PATH, Store

REPO = Path(__file__).resolve().parents[1]
SECRET = "whsec_" + base64.b64encode(b"stemsep-test-signing-secret-32b!").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"somebody-else's-secret-32-bytes!").decode()
VOCALS = b"RIFF-vocals-" + os.urandom(300_000)
INSTRUMENTAL = b"RIFF-instrumental-" + os.urandom(300_000)
STEMS = {"vocals": VOCALS, "instrumental": INSTRUMENTAL, "karaoke": b"RIFF-karaoke-" + os.urandom(1000),
         "other": b"RIFF-other-" + os.urandom(1000)}
TIMEOUT = 20.0


# a file server for the prediction outputs --------------------------------------------------


class FileServer:
    """Serves each of STEMS as /out/song_<stem>.wav, the way the model names its outputs;
    can answer 503 a number of times per path first, or hold every request until `gate` is
    set (with `midway`, after sending half the body)."""

    def __init__(self) -> None:
        self.files = {f"/out/song_{stem}.wav": data for stem, data in STEMS.items()}
        self.failures: collections.Counter[str] = collections.Counter()
        self.hits: collections.Counter[str] = collections.Counter()
        self.gate = threading.Event()
        self.gate.set()
        self.requested = threading.Event()
        self.midway = False
        self.lock = threading.Lock()
        fs = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                with fs.lock:
                    fs.hits[path] += 1
                    fail = fs.failures[path] > 0
                    fs.failures[path] -= fail
                fs.requested.set()
                body = fs.files.get(path)
                status = 503 if fail else 200 if body is not None else 404
                body = body if status == 200 else b"unavailable"
                half = len(body) // 2 if fs.midway else 0
                if not half:
                    fs.gate.wait(TIMEOUT)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:half])
                self.wfile.flush()
                if half:
                    fs.gate.wait(TIMEOUT)
                self.wfile.write(body[half:])

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:
                pass  # a receiver killed mid-download leaves a broken pipe behind

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def output(self, stems=("vocals", "instrumental")) -> list[str]:
        return [f"{self.url}/out/song_{stem}.wav" for stem in stems]

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def files():
    fs = FileServer()
    yield fs
    fs.close()


# the receiver, through the real CLI ----------------------------------------------------------


class Receiver:
    def __init__(self, store: Path, *options: str, secret: str | None = SECRET) -> None:
        self.store = store
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}{WEBHOOK_PATH}"
        self.log = store.parent / f"{store.name}-{self.port}.log"
        command = [sys.executable, "-m", "stemsep.cli", "serve-webhooks", "--store", str(store),
                   "--port", str(self.port), "--retries", "5", "--retry-delay", "0.05", *options]
        if secret:
            command += ["--secret", secret]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            wait_for(lambda: self.process.poll() is not None or self._healthy(), what="the receiver to start", timeout=TIMEOUT)
        except AssertionError:
            self.stop()
            raise
        assert self.process.poll() is None, self.log.read_text()

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def post(self, body: bytes, headers: dict[str, str]) -> httpx.Response:
        return httpx.post(self.url, content=body, headers={"Content-Type": "application/json", **headers}, timeout=10)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(TIMEOUT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def running(store: Path, *options: str, secret: str | None = SECRET):
    receiver = Receiver(store, *options, secret=secret)
    try:
        yield receiver
    finally:
        receiver.stop()


@pytest.fixture(scope="module")
def receiver(tmp_path_factory):
    """One signed receiver shared by the tests that do not restart it."""
    with running(tmp_path_factory.mktemp("shared") / "store") as r:
        yield r


_ids = iter(range(10**6))


def new_id(prefix: str = "pred") -> str:
    return f"{prefix}{next(_ids):04d}{os.getpid()}"


def prediction(pid: str, status: str = "succeeded", output=None, **extra) -> bytes:
    body = {"id": pid, "model": "ryansmith/bs-roformer", "version": "v1", "status": status,
            "input": {"audio": "https://example.com/song.mp3"}, "output": output, "error": None, "logs": "",
            "metrics": {"predict_time": 12.5} if status == "succeeded" else {},
            "urls": {"get": f"https://api.replicate.com/v1/predictions/{pid}"}, **extra}
    return json.dumps(body).encode()


def signed(body: bytes, secret: str = SECRET, msg_id: str | None = None, age: timedelta = timedelta(0)) -> dict[str, str]:
    """Headers for `body`, made by the standardwebhooks library's signer."""
    msg_id = msg_id or new_id("msg_")
    when = datetime.now(tz=timezone.utc) - age
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, when, body.decode()),
    }


def record(store: Path, pid: str) -> dict | None:
    s = Store(store)
    try:
        return s.prediction(pid)
    finally:
        s.close()


def deliveries(store: Path, pid: str) -> list[dict]:
    s = Store(store)
    try:
        return s.deliveries(pid)
    finally:
        s.close()


def wait_downloaded(store: Path, pid: str) -> dict:
    rec = wait_for(lambda: (r := record(store, pid)) and r["download"] in ("done", "failed") and r, what=f"{pid}'s download", timeout=TIMEOUT)
    assert rec["download"] == "done", rec
    return rec


def assert_stems_in_store(store: Path, pid: str, stems=("vocals", "instrumental")) -> None:
    for stem in stems:
        assert (store / pid / f"{stem}.wav").read_bytes() == STEMS[stem]
    assert sorted(p.name for p in (store / pid).iterdir()) == sorted(f"{s}.wav" for s in stems)  # no .part left


def downloads_in_progress(receiver) -> int:
    return httpx.get(f"http://127.0.0.1:{receiver.port}/health", timeout=5).json()["downloads"]


# signatures --------------------------------------------------------------------------------


def test_a_signed_delivery_is_accepted_and_recorded(receiver):
    pid = new_id()
    body = prediction(pid, "failed", error="ValueError: song.mp3: not an audio file", metrics={"predict_time": 0.4})
    response = receiver.post(body, signed(body))
    assert response.status_code == 200 and response.json()["outcome"] == "accepted"
    rec = record(receiver.store, pid)
    assert (rec["status"], rec["error"], rec["predict_time"], rec["download"]) == (
        "failed", "ValueError: song.mp3: not an audio file", 0.4, None)


def _tampered(body, headers):
    return body.replace(b'"status": "failed"', b'"status": "succeeded"'), headers


def _wrong_secret(body, headers):
    return body, signed(body, secret=OTHER_SECRET, msg_id=headers["webhook-id"])


def _stale(body, headers):
    return body, signed(body, msg_id=headers["webhook-id"], age=timedelta(minutes=6))


def _without(name):
    return lambda body, headers: (body, {k: v for k, v in headers.items() if k != name})


@pytest.mark.parametrize("spoil", [
    _tampered, _wrong_secret, _stale,
    _without("webhook-id"), _without("webhook-timestamp"), _without("webhook-signature"),
    lambda body, headers: (body, {}),
    lambda body, headers: (body, {**headers, "webhook-signature": "v1,not base64!"}),
    lambda body, headers: (body, {**headers, "webhook-signature": "garbage"}),
], ids=["tampered-body", "wrong-secret", "timestamp-6-min-old", "no-id", "no-timestamp", "no-signature",
        "no-headers", "malformed-signature", "signature-without-version"])
def test_unverifiable_deliveries_get_401_and_change_nothing(receiver, spoil):
    pid = new_id()
    body = prediction(pid, "failed", error="boom")
    bad_body, bad_headers = spoil(body, signed(body))
    response = receiver.post(bad_body, bad_headers)
    assert response.status_code == 401, response.text
    assert record(receiver.store, pid) is None and deliveries(receiver.store, pid) == []


def test_a_four_minute_old_timestamp_is_still_accepted(receiver):
    body = prediction(new_id(), "canceled")
    assert receiver.post(body, signed(body, age=timedelta(minutes=4))).status_code == 200


def test_a_signed_body_that_is_not_a_prediction_gets_400(receiver):
    for body in (b"not json", b"[1, 2]", json.dumps({"id": "../../etc", "status": "succeeded"}).encode(),  # not a path
                 json.dumps({"id": "abc", "status": "weird"}).encode()):
        assert receiver.post(body, signed(body)).status_code == 400


# idempotency and ordering ------------------------------------------------------------------


def test_the_same_delivery_three_times_is_processed_once(receiver, files):
    pid = new_id()
    body = prediction(pid, output=files.output())
    headers = signed(body)
    with ThreadPoolExecutor(3) as pool:  # all three at once: the record decides, not timing
        responses = list(pool.map(lambda _: receiver.post(body, headers), range(3)))

    assert [r.status_code for r in responses] == [200, 200, 200]
    assert sorted(r.json()["outcome"] for r in responses) == ["accepted", "duplicate", "duplicate"]
    wait_downloaded(receiver.store, pid)
    assert_stems_in_store(receiver.store, pid)
    assert receiver.post(body, headers).json()["outcome"] == "duplicate"  # later retries too
    # A delivery schedules its download before it is answered: once every answer is in and
    # nothing is queued or downloading, no further request can come.
    wait_for(lambda: downloads_in_progress(receiver) == 0, what="the downloads to finish", timeout=TIMEOUT)
    assert files.hits == {"/out/song_vocals.wav": 1, "/out/song_instrumental.wav": 1}
    assert len(deliveries(receiver.store, pid)) == 1


def test_a_processing_event_after_succeeded_is_ignored(receiver, files):
    pid = new_id()
    done = prediction(pid, output=files.output())
    assert receiver.post(done, signed(done)).json()["outcome"] == "accepted"
    late = prediction(pid, "processing")
    response = receiver.post(late, signed(late))
    assert response.status_code == 200 and response.json()["outcome"] == "ignored"
    rec = wait_downloaded(receiver.store, pid)
    assert (rec["status"], rec["predict_time"]) == ("succeeded", 12.5)
    assert [d["outcome"] for d in deliveries(receiver.store, pid)] == ["accepted", "ignored"]


def test_a_processing_event_before_the_terminal_one_is_recorded_then_superseded(receiver):
    pid = new_id()
    early = prediction(pid, "processing")
    assert receiver.post(early, signed(early)).json()["outcome"] == "accepted"
    assert record(receiver.store, pid)["status"] == "processing"
    end = prediction(pid, "canceled")
    assert receiver.post(end, signed(end)).json()["outcome"] == "accepted"
    assert record(receiver.store, pid)["status"] == "canceled"


# downloads -------------------------------------------------------------------------------


def test_a_succeeded_prediction_lands_both_stems_in_the_store(receiver, files):
    pid = new_id()
    body = prediction(pid, output=files.output())
    response = receiver.post(body, signed(body))
    assert response.status_code == 200
    rec = wait_downloaded(receiver.store, pid)
    assert_stems_in_store(receiver.store, pid)
    assert rec["files"] == {"vocals": f"{pid}/vocals.wav", "instrumental": f"{pid}/instrumental.wav"}
    assert (rec["status"], rec["predict_time"], rec["error"]) == ("succeeded", 12.5, None)


def test_the_answer_does_not_wait_for_the_download(receiver, files):
    files.gate.clear()  # the file server holds every request
    pid = new_id()
    body = prediction(pid, output=files.output())
    response = receiver.post(body, signed(body))
    assert response.status_code == 200
    assert record(receiver.store, pid)["download"] == "pending"
    files.gate.set()
    wait_downloaded(receiver.store, pid)


def test_a_file_server_failing_twice_then_succeeding_still_lands_the_stems(receiver, files):
    files.failures.update({"/out/song_vocals.wav": 2, "/out/song_instrumental.wav": 2})
    pid = new_id()
    body = prediction(pid, output=files.output())
    assert receiver.post(body, signed(body)).status_code == 200
    wait_downloaded(receiver.store, pid)
    assert_stems_in_store(receiver.store, pid)
    assert files.hits == {"/out/song_vocals.wav": 3, "/out/song_instrumental.wav": 3}


def test_a_download_that_keeps_failing_is_recorded_as_failed(receiver, files):
    files.failures.update({"/out/song_vocals.wav": 100})
    pid = new_id()
    body = prediction(pid, output=files.output())
    assert receiver.post(body, signed(body)).status_code == 200
    rec = wait_for(lambda: (r := record(receiver.store, pid)) and r["download"] == "failed" and r, timeout=TIMEOUT)
    assert "after 5 attempts (HTTP 503)" in rec["download_error"]
    assert files.hits["/out/song_vocals.wav"] == 5
    assert not (receiver.store / pid / "vocals.wav").exists()


def test_an_output_that_is_not_a_list_of_urls_is_recorded_as_a_failed_download(receiver):
    pid = new_id()
    body = prediction(pid, output="https://example.com/only-one.wav")
    assert receiver.post(body, signed(body)).status_code == 200
    rec = record(receiver.store, pid)
    assert rec["download"] == "failed" and "not a list of stem URLs" in rec["download_error"]


def test_a_karaoke_prediction_s_stems_are_stored_under_their_names(receiver, files):
    pid = new_id()
    body = prediction(pid, output=files.output(("other", "karaoke")), input={"audio": "https://e.com/song.mp3", "model": "karaoke"})
    assert receiver.post(body, signed(body)).json()["outcome"] == "accepted"
    rec = wait_downloaded(receiver.store, pid)
    assert rec["files"] == {"karaoke": f"{pid}/karaoke.wav", "other": f"{pid}/other.wav"}
    assert rec["input"] == {"model": "karaoke"}  # what names the stems; not the audio, which can be a whole song
    assert_stems_in_store(receiver.store, pid, ("karaoke", "other"))


def test_one_chosen_stem_is_one_file_in_the_store(receiver, files):
    pid = new_id()
    body = prediction(pid, output=files.output(("instrumental",)), input={"audio": "x", "stems": "instrumental"})
    assert receiver.post(body, signed(body)).status_code == 200
    assert wait_downloaded(receiver.store, pid)["files"] == {"instrumental": f"{pid}/instrumental.wav"}
    assert_stems_in_store(receiver.store, pid, ("instrumental",))


def test_an_aborted_delivery_is_accepted_and_final(receiver):
    pid = new_id()
    body = prediction(pid, "aborted", error="the prediction was aborted")
    response = receiver.post(body, signed(body))
    assert response.status_code == 200 and response.json()["outcome"] == "accepted"
    rec = record(receiver.store, pid)
    assert (rec["status"], rec["error"], rec["download"]) == ("aborted", "the prediction was aborted", None)
    for status in ("processing", "succeeded"):  # the first terminal status wins
        late = prediction(pid, status)
        assert receiver.post(late, signed(late)).json()["outcome"] == "ignored"
    assert record(receiver.store, pid)["status"] == "aborted"


def test_the_receiver_killed_after_acknowledging_resumes_on_restart(tmp_path, files):
    store = tmp_path / "store"
    files.gate.clear()
    files.midway = True  # half of the first stem arrives, then the server holds
    pid = new_id()
    body = prediction(pid, output=files.output())
    with running(store) as receiver:
        assert receiver.post(body, signed(body)).status_code == 200
        wait_for(lambda: list((store / pid).glob(".*.part")), what="a partial download", timeout=TIMEOUT)
        receiver.kill()  # the process dies mid-write
    assert record(store, pid)["download"] == "pending"
    assert not list((store / pid).glob("*.wav"))  # nothing half-written under a final name
    files.gate.set()
    with running(store):
        wait_downloaded(store, pid)
    assert_stems_in_store(store, pid)


def test_a_clean_shutdown_mid_download_also_resumes(tmp_path, files):
    store = tmp_path / "store"
    files.gate.clear()
    pid = new_id()
    body = prediction(pid, output=files.output())
    with running(store) as receiver:
        assert receiver.post(body, signed(body)).status_code == 200
        assert files.requested.wait(TIMEOUT)
        receiver.process.send_signal(signal.SIGINT)
        files.gate.set()  # the held request completes while the receiver shuts down
        receiver.process.wait(TIMEOUT)
    rec = record(store, pid)
    if rec["download"] != "done":  # interrupted: it must still be pending, and resume
        assert rec["download"] == "pending"
        with running(store):
            wait_downloaded(store, pid)
    assert_stems_in_store(store, pid)


# The store's schema as the first release created it in <store>/webhooks.sqlite3.
OLD_STORE_SCHEMA = """
CREATE TABLE deliveries (
    webhook_id TEXT PRIMARY KEY, prediction_id TEXT NOT NULL, status TEXT NOT NULL, outcome TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE TABLE predictions (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, error TEXT, predict_time REAL, output TEXT, download TEXT,
    download_error TEXT, files TEXT, updated_at REAL NOT NULL
);
"""


def test_a_store_written_before_this_release_reads_and_resumes(tmp_path, files):
    """What the first release left (its schema, a finished download, a pending one, a
    delivery) opens in the receiver: the pending download resumes, the rest reads as it was."""
    store = tmp_path / "store"
    (store / "old-done").mkdir(parents=True)
    (store / "old-done" / "vocals.wav").write_bytes(b"kept")
    now = time.time()
    with sqlite3.connect(store / "webhooks.sqlite3") as db:
        db.executescript(OLD_STORE_SCHEMA)
        db.execute("INSERT INTO deliveries VALUES ('msg_old', 'old-done', 'succeeded', 'accepted', ?)", (now,))
        db.execute("INSERT INTO predictions VALUES ('old-done', 'succeeded', NULL, 7.5, ?, 'done', NULL, ?, ?)",
                   (json.dumps(files.output()), json.dumps({"vocals": "old-done/vocals.wav"}), now))
        db.execute("INSERT INTO predictions VALUES ('old-pending', 'succeeded', NULL, 2.0, ?, 'pending', NULL, NULL, ?)",
                   (json.dumps(files.output()), now))
    with running(store) as receiver:
        rec = wait_downloaded(store, "old-pending")
        body = prediction("old-done", output=files.output())
        assert receiver.post(body, signed(body, msg_id="msg_old")).json()["outcome"] == "duplicate"
    assert rec["files"] == {"vocals": "old-pending/vocals.wav", "instrumental": "old-pending/instrumental.wav"}
    assert rec["input"] is None
    assert_stems_in_store(store, "old-pending")
    done = record(store, "old-done")
    assert (done["status"], done["predict_time"], done["files"], done["input"]) == ("succeeded", 7.5, {"vocals": "old-done/vocals.wav"}, None)
    assert (store / "old-done" / "vocals.wav").read_bytes() == b"kept"
    assert files.hits == {"/out/song_vocals.wav": 1, "/out/song_instrumental.wav": 1}  # only the pending one's


# unsigned local use ------------------------------------------------------------------------


def test_insecure_mode_accepts_unsigned_deliveries_and_still_processes_a_retry_once(tmp_path, files):
    store = tmp_path / "store"
    pid = new_id()
    body = prediction(pid, output=files.output())
    with running(store, "--insecure-no-verify", secret=None) as receiver:
        outcomes = [receiver.post(body, {}).json()["outcome"] for _ in range(3)]
        assert outcomes == ["accepted", "duplicate", "duplicate"]
        wait_downloaded(store, pid)
    assert_stems_in_store(store, pid)
    assert "NOT verified" in receiver.log.read_text()


def test_without_a_secret_the_receiver_refuses_to_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "REPLICATE_WEBHOOK_SECRET"}
    for options in ([], ["--secret", "not-a-whsec-secret"]):
        done = subprocess.run(
            [sys.executable, "-m", "stemsep.cli", "serve-webhooks", "--store", str(tmp_path / "s"), *options],
            capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO, env=env,
        )
        assert done.returncode == 1
        assert done.stderr.startswith("stemsep: error:") and done.stderr.count("\n") == 1


# end to end with the real Cog server -----------------------------------------------------

PREDICT_PY = REPO / "predict.py"


class SigningRelay:
    """Stands in for Replicate between Cog and the receiver: Cog's webhooks are unsigned, so
    the relay signs each one (standardwebhooks' signer; a retry of the same body keeps its
    webhook-id, as Replicate's retries do) and forwards it, answering with the receiver's status."""

    def __init__(self, target: str, secret: str = SECRET) -> None:
        self.forwarded: list[int] = []
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                msg_id = "msg_" + hashlib.sha256(body).hexdigest()[:24]
                now = datetime.now(tz=timezone.utc)
                headers = {"Content-Type": "application/json", "webhook-id": msg_id,
                           "webhook-timestamp": str(int(now.timestamp())),
                           "webhook-signature": Webhook(secret).sign(msg_id, now, body.decode())}
                status = httpx.post(target, content=body, headers=headers, timeout=10).status_code
                relay.forwarded.append(status)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhooks/replicate"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def cog(tmp_path_factory):
    """The real Cog HTTP server (coglet) running predict.py on a tiny random-weight model."""
    if not PREDICT_PY.is_file():
        pytest.skip("predict.py is not there yet")
    from stemsep.testing import TINY_MODEL, config_dict, make_model_files

    root = tmp_path_factory.mktemp("cog")
    checkpoint, config = make_model_files(root / "model", config_dict(model=TINY_MODEL))
    runner = "Runner" if "class Runner" in PREDICT_PY.read_text() else "Predictor"
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PORT": str(port), "COG_PREDICT_TYPE_STUB": f"predict.py:{runner}",
           "STEMSEP_CHECKPOINT": str(checkpoint), "STEMSEP_CONFIG": str(config),
           "STEMSEP_WORK_DIR": str(root / "work"), "STEMSEP_DEVICE": "cpu"}
    log_path = root / "cog.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"], cwd=REPO,
                                   env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def status():
        if process.poll() is not None:
            return "EXITED"
        try:
            return httpx.get(f"{url}/health-check", timeout=2).json().get("status")
        except (httpx.HTTPError, ValueError):
            return None

    try:
        state = wait_for(lambda: (s := status()) in ("READY", "SETUP_FAILED", "EXITED") and s, timeout=90,
                         what="Cog to be ready")
        assert state == "READY", log_path.read_text()[-3000:]
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(TIMEOUT)


def _song() -> tuple[str, int]:
    """A 1-s stereo WAV as a data URL, and its frame count."""
    import numpy as np
    import soundfile as sf

    t = np.arange(44100) / 44100
    mix = 0.3 * np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)], axis=1)
    buffer = io.BytesIO()
    sf.write(buffer, mix, 44100, format="WAV", subtype="PCM_16")
    return "data:audio/wav;base64," + base64.b64encode(buffer.getvalue()).decode(), len(t)


def _predict_async(cog_url: str, pid: str, webhook: str) -> None:
    audio, _ = _song()
    response = httpx.put(
        f"{cog_url}/predictions/{pid}",
        json={"id": pid, "input": {"audio": audio}, "webhook": webhook, "webhook_events_filter": ["completed"]},
        headers={"Prefer": "respond-async"}, timeout=30,
    )
    assert response.status_code == 202, response.text


def _assert_cog_stems(store: Path, pid: str) -> None:
    import soundfile as sf

    rec = wait_for(lambda: (r := record(store, pid)) and r["status"] in ("succeeded", "failed", "canceled") and r,
                   timeout=60, what=f"Cog's webhook for {pid}")
    assert rec["status"] == "succeeded", f"the Cog prediction {rec['status']}: {rec['error']}"
    rec = wait_downloaded(store, pid)
    assert rec["predict_time"] > 0
    _, frames = _song()
    for stem in ("vocals", "instrumental"):
        path = store / rec["files"][stem]
        assert path.parent.name == pid and path.name == f"{stem}.wav"
        info = sf.info(path)
        assert (info.frames, info.channels, info.samplerate) == (frames, 2, 44100)


@pytest.mark.slow
def test_cog_async_prediction_through_a_signing_relay_lands_both_stems(cog, tmp_path):
    store = tmp_path / "store"
    with running(store) as receiver:
        relay = SigningRelay(receiver.url)
        try:
            _predict_async(cog, "cogsigned1", relay.url)
            _assert_cog_stems(store, "cogsigned1")
        finally:
            relay.close()
    assert relay.forwarded and set(relay.forwarded) == {200}


@pytest.mark.slow
def test_cog_async_prediction_straight_to_an_insecure_receiver_lands_both_stems(cog, tmp_path):
    store = tmp_path / "store"
    with running(store, "--insecure-no-verify", secret=None) as receiver:
        _predict_async(cog, "cogunsigned1", receiver.url)
        _assert_cog_stems(store, "cogunsigned1")


@pytest.mark.slow
def test_cog_webhook_unsigned_is_refused_by_a_verifying_receiver(cog, tmp_path):
    store = tmp_path / "store"
    with running(store) as receiver:
        _predict_async(cog, "cogrefused1", receiver.url)
        log = wait_for(lambda: "rejected a webhook delivery" in receiver.log.read_text() and receiver.log.read_text(), timeout=TIMEOUT,
                       what="the receiver to reject Cog's unsigned webhook")
    assert "Missing required headers" in log
    assert record(store, "cogrefused1") is None
