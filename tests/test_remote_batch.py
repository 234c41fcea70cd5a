"""`stemsep remote` over a batch of songs (`stemsep.remote.separate_many`): the real `replicate`
SDK against a local server that plays Replicate's HTTP API, runs each prediction for a
few milliseconds, serves the outputs, and counts what matters (predictions in flight,
create requests per input). Faults are injected there: 429 storms, 5xx, dropped answers,
and a SIGKILLed client process."""

from __future__ import annotations

import collections
import datetime
import http.server
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pytest

from stemsep import catalogue, cli, remote
from stemsep.errors import RemoteError

TOKEN = "r8_test_token"
MODEL = "ryansmith/bs-roformer"
FAST = remote.RetryPolicy(attempts=8, backoff=0.01, max_wait=0.05)


class FakeReplicate:
    """Replicate's prediction API, time-based: a prediction ends `duration` seconds after it
    is created; an input whose name contains "bad" fails like a non-audio file does."""

    def __init__(self, duration: float = 0.02) -> None:
        self.duration = duration
        self.lock = threading.Lock()
        self.predictions: dict[str, dict] = {}
        self.uploads: dict[str, str] = {}  # file URL -> uploaded file name
        self.creates: collections.Counter[str] = collections.Counter()  # by song (input URL or uploaded name)
        self.outstanding: set[str] = set()  # created, and the client has not yet seen it end
        self.max_outstanding = 0
        self.downloads: collections.Counter[str] = collections.Counter()
        self.storm = 0  # answer this many more API requests with 429
        self.throttled = 0
        self.fail_polls = 0  # answer this many more polls with 502
        self.drop_create_answers = 0  # create the prediction, then drop the connection
        self.on_create = None  # called (prediction id) after a create is recorded
        self.list_calls = 0
        self.requests: list[tuple[str, str]] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()  # headers and body go out in two writes: without this, Nagle
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # + delayed ACK = 40 ms each

            def log_message(self, *args) -> None:
                pass

            def reply(self, status: int, payload, content_type="application/json", headers=()) -> None:
                body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in headers:
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def handle_request(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                url = urlparse(self.path)
                with fake.lock:
                    fake.requests.append((self.command, url.path))
                if url.path.startswith("/files/"):
                    with fake.lock:
                        fake.downloads[url.path] += 1
                    stem = unquote(url.path).rsplit("_", 1)[-1].split(".")[0]
                    return self.reply(200, f"{stem} of {url.path}".encode(), "audio/wav")
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self.reply(401, {"detail": "You did not pass a valid authentication token", "status": 401})
                with fake.lock:
                    throttle = fake.storm > 0
                    fake.storm -= throttle
                    fake.throttled += throttle
                if throttle:
                    # The SDK retries GETs itself, sleeping Retry-After: keep those short.
                    wait = "1" if self.command == "POST" else "0"
                    return self.reply(429, {"title": "Request was throttled.", "status": 429,
                                            "detail": "Request was throttled. Expected available in 1 second."},
                                      headers=[("Retry-After", wait)])
                if self.command == "POST" and url.path == "/v1/files":
                    name = re.search(rb'filename="([^"]+)"', body).group(1).decode()
                    with fake.lock:
                        file_url = f"https://api.replicate.com/v1/files/f{len(fake.uploads) + 1}"
                        fake.uploads[file_url] = name
                    return self.reply(201, {
                        "id": file_url.rsplit("/", 1)[-1], "name": name, "content_type": "audio/wav", "size": len(body),
                        "etag": "e", "checksums": {}, "metadata": {}, "created_at": "2026-01-01T00:00:00Z",
                        "expires_at": None, "urls": {"get": file_url},
                    })
                if self.command == "POST" and url.path.endswith("/predictions"):
                    return self.create(json.loads(body), url.path)
                if self.command == "GET" and url.path == "/v1/predictions":
                    return self.list(parse_qs(url.query))
                if self.command == "GET" and url.path.startswith("/v1/predictions/"):
                    with fake.lock:
                        if fake.fail_polls > 0:
                            fake.fail_polls -= 1
                            return self.reply(502, {"detail": "Bad Gateway"})  # (the SDK itself retries 503)
                        prediction = fake.predictions.get(url.path.rsplit("/", 1)[-1])
                        if prediction is None:
                            return self.reply(404, {"detail": "Not found."})
                        view = fake.view(prediction)
                        if view["status"] in remote.TERMINAL_STATUSES:
                            fake.outstanding.discard(prediction["id"])
                    return self.reply(200, view)
                return self.reply(404, {"detail": f"no route {self.command} {url.path}"})

            def create(self, request: dict, path: str) -> None:
                audio = request["input"]["audio"]
                with fake.lock:
                    song = fake.uploads.get(audio, audio)
                    pid = f"p{len(fake.predictions) + 1:05d}"
                    fake.predictions[pid] = {
                        "id": pid, "model": MODEL, "version": request.get("version", "v1"), "input": request["input"],
                        "song": song, "created": time.time(), "ends": time.monotonic() + fake.duration,
                        "webhook": request.get("webhook"), "webhook_events_filter": request.get("webhook_events_filter"),
                    }
                    fake.creates[song] += 1
                    fake.outstanding.add(pid)
                    fake.max_outstanding = max(fake.max_outstanding, len(fake.outstanding))
                    drop = fake.drop_create_answers > 0
                    fake.drop_create_answers -= drop
                    view = fake.view(fake.predictions[pid])
                if fake.on_create is not None:
                    fake.on_create(pid)
                if drop:  # the prediction exists, but its answer never arrives
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.reply(201, view)

            def list(self, query: dict) -> None:
                start = int(query.get("cursor", ["0"])[0])
                with fake.lock:
                    fake.list_calls += 1
                    newest_first = sorted(fake.predictions.values(), key=lambda p: p["created"], reverse=True)
                    page = [fake.view(p) for p in newest_first[start:start + 5]]
                    more = start + 5 < len(newest_first)
                base = f"http://{self.headers['Host']}"
                self.reply(200, {"previous": None, "next": f"{base}/v1/predictions?cursor={start + 5}" if more else None,
                                 "results": page})

            do_GET = do_POST = handle_request

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def view(self, p: dict) -> dict:
        done = time.monotonic() >= p["ends"]
        name = Path(unquote(urlparse(p["song"]).path)).stem if "://" in p["song"] else Path(p["song"]).stem
        bad = "bad" in name
        status = ("failed" if bad else "succeeded") if done else "processing"
        inputs = p["input"]  # as predict.py: the chosen model's stems, those asked for, uploaded last to first
        stems = [s for s in catalogue.get(inputs.get("model", catalogue.DEFAULT)).stems
                 if not inputs.get("stems") or s in inputs["stems"].split(",")]
        outputs = [f"{self.url}/files/{p['id']}/{name}_{stem}.wav" for stem in reversed(stems)]
        return {
            "id": p["id"], "model": p["model"], "version": p["version"], "input": p["input"], "status": status,
            "output": outputs if status == "succeeded" else None, "logs": "",
            "error": f"ValueError: {name}: not an audio file" if status == "failed" else None,
            "metrics": {"predict_time": 2.5} if done else {},
            "created_at": datetime.datetime.fromtimestamp(p["created"], datetime.UTC).isoformat().replace("+00:00", "Z"),
            "urls": {"get": f"{self.url}/v1/predictions/{p['id']}", "cancel": f"{self.url}/v1/predictions/{p['id']}/cancel"},
            "webhook": p["webhook"], "webhook_events_filter": p["webhook_events_filter"],
        }

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api(monkeypatch):
    fake = FakeReplicate()
    for name in ("REPLICATE_API_TOKEN", "REPLICATE_MODEL", "REPLICATE_BASE_URL", "REPLICATE_POLL_INTERVAL"):
        monkeypatch.delenv(name, raising=False)
    yield fake
    fake.close()


def urls(n: int, start: int = 1) -> list[str]:
    return [f"https://example.com/album/song-{i:03d}.mp3" for i in range(start, start + n)]


def run(api: FakeReplicate, inputs, out: Path, **options) -> remote.BatchReport:
    options = {"replicate_model": MODEL, "api_token": TOKEN, "base_url": api.url, "poll_interval": 0.005, "retry": FAST, **options}
    return remote.separate_many(inputs, out, **options)


def manifest_rows(out: Path) -> list[dict]:
    with sqlite3.connect(out / remote.MANIFEST_NAME) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM songs ORDER BY position")]


def assert_all_done_once(api: FakeReplicate, out: Path, songs: list[str], stems=("vocals", "instrumental")) -> None:
    rows = manifest_rows(out)
    assert [r["state"] for r in rows] == ["succeeded"] * len(songs)
    assert sorted(api.creates) == sorted(songs) and set(api.creates.values()) == {1}, "one prediction per song"
    for row in rows:
        files = json.loads(row["files"])
        assert list(files) == list(stems)
        for stem, name in files.items():
            assert name == f"{row['name']}_{stem}.wav"
            assert (out / name).read_bytes().startswith(stem.encode())
    assert not list(out.glob(".*.part"))


# in flight, in order, once ---------------------------------------------------------------


def test_200_songs_at_concurrency_8_never_have_more_than_8_in_flight(api, tmp_path):
    api.duration = 0.05
    songs = urls(200)
    finished = []
    report = run(api, songs, tmp_path / "out", concurrency=8, on_song=finished.append)

    assert api.max_outstanding == 8, "the limit is reached and never passed"
    assert report.succeeded == 200 and report.failed == 0 and report.pending == 0 and not report.interrupted
    assert len(finished) == 200 and {s.key for s in finished} == set(songs)
    assert report.predict_time == pytest.approx(200 * 2.5)
    assert report.cost(0.001) == pytest.approx(0.5)
    assert_all_done_once(api, tmp_path / "out", songs)


def test_a_rerun_does_nothing_for_done_songs_and_only_adds_new_ones(api, tmp_path):
    out = tmp_path / "out"
    run(api, urls(5), out)
    before = sum(api.creates.values())
    report = run(api, urls(7), out)  # two new
    assert sum(api.creates.values()) == before + 2
    assert sorted(s.key for s in report.finished) == urls(2, start=6)
    assert report.succeeded == 7
    report = run(api, [], out)  # nothing given: resume the folder's manifest
    assert report.finished == [] and report.succeeded == 7
    assert_all_done_once(api, out, urls(7))


def _read_lines(stream, lines: list[str]) -> None:
    for line in stream:  # one at a time: the test watches `lines` grow
        lines.append(line)  # noqa: PERF402


def start_run(api, args: list[str], done: int) -> tuple[list[str], dict, subprocess.Popen, list[str], threading.Thread]:
    """`stemsep remote ARGS` in a child process, returned once `done` songs are finished (or
    60 s passed, or it ended): (its command, its environment, the process, the stdout lines
    so far, which keep growing, and the thread reading them)."""
    env = {**os.environ, "REPLICATE_API_TOKEN": TOKEN, "REPLICATE_BASE_URL": api.url, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "stemsep.cli", "remote", *args, "--model", MODEL, "--poll-interval", "0.01"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while sum(line.startswith("ok ") for line in lines) < done and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.005)
    return command, env, process, lines, reader


@pytest.mark.slow
def test_sigkill_mid_run_then_restart_finishes_every_song_once(api, tmp_path):
    """Kill the CLI (SIGKILL: no cleanup at all) while predictions are in flight, start it
    again: every song ends succeeded exactly once and no input is submitted twice."""
    api.duration = 0.15
    local = []
    for i in range(3):  # uploads too: their reconciliation goes by the uploaded file's URL
        path = tmp_path / "local" / f"take {i}.wav"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"RIFF" + bytes(64))
        local.append(path)
    songs = urls(37)
    listing = tmp_path / "songs.txt"
    listing.write_text("# my songs\n" + "\n".join(songs[:20]) + "\n\nlocal/take 0.wav\nlocal/take 1.wav\n"
                       + "\n".join(songs[20:]) + f"\n{local[2]}\n")
    out = tmp_path / "out"
    command, env, first, lines, reader = start_run(api, ["--from", str(listing), "-o", str(out), "--concurrency", "8"], done=12)
    with api.lock:
        in_flight = len(api.outstanding)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    reader.join(5)
    assert first.returncode == -signal.SIGKILL, first.stderr.read()
    assert in_flight > 0, "the kill must land while predictions are in flight"
    done_before = sum(line.startswith("ok ") for line in lines)
    assert 12 <= done_before < 40
    creates_before = sum(api.creates.values())

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines()[-1].startswith("40 songs: 40 succeeded (")
    keys = songs[:20] + ["take 0.wav", "take 1.wav"] + songs[20:] + ["take 2.wav"]
    assert_all_done_once(api, out, keys)
    assert sum(api.creates.values()) == 40 and creates_before <= 40
    rows = {r["key"]: r for r in manifest_rows(out)}
    assert rows[str(local[0])]["name"] == "take 0" and rows[songs[0]]["name"] == "song-001"
    assert all(r["creates"] <= 2 for r in rows.values())


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_next_run_resumes(api, tmp_path):
    api.duration = 0.15
    songs = urls(24)
    out = tmp_path / "out"
    command, env, first, lines, reader = start_run(api, [*songs, "-o", str(out), "--concurrency", "4"], done=4)
    first.send_signal(signal.SIGINT)
    assert first.wait(30) == 130
    reader.join(5)
    stderr = first.stderr.read()
    assert re.fullmatch(r"stemsep: error: interrupted: run the same command again to resume \(manifest: .*\)\n", stderr), stderr
    assert re.match(r"24 songs: \d+ succeeded, 0 failed, \d+ not finished;", lines[-1])
    states = collections.Counter(r["state"] for r in manifest_rows(out))
    assert states["submitted"] > 0 and states["succeeded"] >= 4

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert second.returncode == 0, second.stderr
    assert_all_done_once(api, out, songs)


def test_a_create_whose_answer_is_lost_is_found_again_not_sent_twice(api, tmp_path):
    api.drop_create_answers = 3
    report = run(api, urls(6), tmp_path / "out", concurrency=3)
    assert report.succeeded == 6
    assert api.list_calls >= 3, "the lost ones were looked up among the recent predictions"
    assert_all_done_once(api, tmp_path / "out", urls(6))


def test_a_run_stopped_between_create_and_answer_resumes_by_finding_the_prediction(api, tmp_path):
    """The first run dies after the create request left and before its answer was recorded
    (the song is `submitting`); the next run finds that prediction instead of creating one."""
    out = tmp_path / "out"
    stop = threading.Event()
    api.drop_create_answers = 1
    api.on_create = lambda pid: stop.set()
    report = run(api, urls(1), out, stop=stop)
    assert report.interrupted and report.pending == 1
    assert manifest_rows(out)[0]["state"] == "submitting"
    api.on_create = None
    report = run(api, [], out)
    assert report.succeeded == 1
    assert manifest_rows(out)[0]["prediction_id"] == "p00001"
    assert_all_done_once(api, out, urls(1))


# retries ------------------------------------------------------------------------------------


def test_a_429_storm_is_survived(api, tmp_path):
    api.storm = 120  # the next 120 API requests are throttled, creates and polls alike
    songs = urls(20)
    report = run(api, songs, tmp_path / "out", concurrency=8,
                 retry=remote.RetryPolicy(attempts=40, backoff=0.01, max_wait=0.02))
    assert api.throttled == 120
    assert report.succeeded == 20 and report.failed == 0
    assert_all_done_once(api, tmp_path / "out", songs)


def test_5xx_on_polls_is_retried(api, tmp_path):
    api.fail_polls = 10
    report = run(api, urls(3), tmp_path / "out")
    assert report.succeeded == 3 and api.fail_polls == 0


def test_retry_after_is_honoured_up_to_the_cap():
    policy = remote.RetryPolicy(backoff=1.0, max_wait=60.0)
    assert policy.delay(1, remote.parse_retry_after("7")) == 7
    assert policy.delay(1, remote.parse_retry_after("3600")) == 60
    when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=30)
    assert 25 < remote.parse_retry_after(when.strftime("%a, %d %b %Y %H:%M:%S GMT")) <= 30
    assert remote.parse_retry_after("soon") is None
    assert 2.0 <= policy.delay(3) <= 4.0  # jittered exponential backoff


def test_an_unreachable_api_fails_each_song_with_the_reason(api, tmp_path):
    base = api.url
    api.close()
    report = remote.separate_many(urls(2), tmp_path / "out", replicate_model=MODEL, api_token=TOKEN, base_url=base,
                                  retry=remote.RetryPolicy(attempts=2, backoff=0.001))
    assert report.failed == 2
    assert all(re.match(r"could not create a prediction after 2 attempts \(ConnectError", s.error) for s in report.songs)


# failures stay with their song ----------------------------------------------------------------


def test_a_bad_input_among_good_ones_fails_alone(api, tmp_path):
    songs = urls(3) + ["https://example.com/album/bad-file.txt", str(tmp_path / "missing.wav")] + urls(3, start=4)
    report = run(api, songs, tmp_path / "out", concurrency=4)
    assert report.succeeded == 6 and report.failed == 2
    failed = {s.key: s for s in report.songs if s.state == "failed"}
    bad = failed["https://example.com/album/bad-file.txt"]
    assert re.fullmatch(r"prediction p\d{5} failed: ValueError: bad-file: not an audio file", bad.error)
    assert bad.predict_time == 2.5  # failed predictions are billed too
    assert failed[str(tmp_path / "missing.wav")].error == f"{tmp_path / 'missing.wav'}: no such file"
    assert report.predict_time == pytest.approx(7 * 2.5)


def test_failed_songs_are_retried_only_when_asked(api, tmp_path):
    out = tmp_path / "out"
    bad = "https://example.com/album/bad-take.mp3"
    run(api, [bad, *urls(2)], out)
    first_id = manifest_rows(out)[0]["prediction_id"]
    assert run(api, [], out).finished == []  # stays failed
    assert api.creates[bad] == 1
    report = run(api, [], out, retry_failed=True)
    assert [s.key for s in report.finished] == [bad] and api.creates[bad] == 2
    row = manifest_rows(out)[0]
    assert row["past_ids"] == first_id and row["prediction_id"] not in (None, first_id)


# webhooks, settings, inputs --------------------------------------------------------------------


def test_with_a_webhook_songs_are_only_submitted_and_a_later_run_collects_them(api, tmp_path):
    out = tmp_path / "out"
    api.duration = 0.05
    report = run(api, urls(4), out, webhook="https://app.example/webhooks/replicate")
    assert [s.state for s in report.finished] == ["submitted"] * 4
    assert not any(method == "GET" for method, _ in api.requests)
    assert all(p["webhook"] == "https://app.example/webhooks/replicate" and p["webhook_events_filter"] == ["completed"]
               for p in api.predictions.values())
    assert run(api, urls(4), out, webhook="https://app.example/webhooks/replicate").finished == []  # nothing resent
    report = run(api, [], out)  # no webhook: poll the submitted ones by id, download
    assert report.succeeded == 4
    assert_all_done_once(api, out, urls(4))


def test_the_manifest_keeps_the_model_and_inputs(api, tmp_path):
    out = tmp_path / "out"
    run(api, urls(1), out, output_format="flac")
    assert api.predictions["p00001"]["input"] == {"output_format": "flac", "audio": urls(1)[0]}
    with pytest.raises(RemoteError, match="was made with model ryansmith/bs-roformer, not a/b"):
        run(api, urls(2), out, replicate_model="a/b")
    with pytest.raises(RemoteError, match=r"was made with model inputs \{\"output_format\": \"flac\"\}"):
        run(api, urls(2), out, output_format="wav")
    run(api, urls(2), out, replicate_model=None)  # left out: the recorded ones
    assert api.predictions["p00002"]["input"]["output_format"] == "flac"


def test_one_run_per_output_folder(api, tmp_path):
    """The first run holds the folder while the fake holds its create request (it has taken
    the lock by then); the second run is refused; then the first is let go and finishes."""
    out = tmp_path / "out"
    creating, release = threading.Event(), threading.Event()

    def hold(pid: str) -> None:
        creating.set()
        release.wait(30)

    api.on_create = hold
    report: list[remote.BatchReport] = []
    first = threading.Thread(target=lambda: report.append(run(api, urls(1), out)))
    first.start()
    try:
        assert creating.wait(30)
        with pytest.raises(RemoteError, match="another stemsep remote run is using this folder"):
            run(api, urls(1), out)
    finally:
        release.set()
        first.join(30)
    assert report[0].succeeded == 1
    assert_all_done_once(api, out, urls(1))


def test_expand_inputs(tmp_path, monkeypatch):
    album = tmp_path / "album"
    (album / "disc 2").mkdir(parents=True)
    for name in ("02.flac", "01.wav", "cover.jpg", ".hidden.wav", "disc 2/01.MP3"):
        (album / name).write_bytes(b"x")
    listing = tmp_path / "lists" / "more.txt"
    listing.parent.mkdir()
    listing.write_text("# comment\n\n../album/01.wav\nhttps://example.com/x.mp3\n  ../solo.wav  \n")
    monkeypatch.chdir(tmp_path)
    keys = remote.expand_inputs(["album", "https://example.com/x.mp3"], [listing])
    assert keys == [str(album / "01.wav"), str(album / "02.flac"), str(album / "disc 2" / "01.MP3"),
                    "https://example.com/x.mp3", str(tmp_path / "solo.wav")]


def test_any_model_s_stems_land_under_their_names(api, tmp_path):
    out = tmp_path / "out"
    report = run(api, urls(2), out, input={"model": "karaoke"})
    assert report.succeeded == 2
    assert sorted(p["input"]["audio"] for p in api.predictions.values()) == urls(2)
    assert all(p["input"]["model"] == "karaoke" for p in api.predictions.values())
    assert_all_done_once(api, out, urls(2), stems=("karaoke", "other"))
    assert sorted(p.name for p in out.glob("*.wav")) == [f"song-00{n}_{s}.wav" for n in (1, 2) for s in ("karaoke", "other")]


def test_one_stem_chosen_gives_one_file_per_song(api, tmp_path):
    out = tmp_path / "out"
    assert run(api, urls(2), out, stems="instrumental").succeeded == 2
    assert_all_done_once(api, out, urls(2), stems=("instrumental",))


def test_a_manifest_written_before_this_release_resumes(api, tmp_path):
    """A manifest as the first release wrote it (its schema, file name and settings, by hand
    here): its done song is left alone, its submitted one polled, its queued one run."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "song-001_vocals.wav").write_bytes(b"vocals from the first release")
    with sqlite3.connect(out / "stemsep-remote.sqlite3") as db:
        db.executescript(OLD_MANIFEST_SCHEMA)
        db.execute("INSERT INTO settings VALUES ('model', ?), ('inputs', '{\"output_format\": \"wav\"}')", (MODEL,))
        now = time.time()
        db.execute("INSERT INTO songs (key, name, position, state, prediction_id, status, files, predict_time, creates,"
                   " updated_at) VALUES (?, 'song-001', 1, 'succeeded', 'old1', 'succeeded', ?, 3.0, 1, ?)",
                   (urls(1)[0], json.dumps({"vocals": "song-001_vocals.wav", "instrumental": "song-001_instrumental.wav"}), now))
        db.execute("INSERT INTO songs (key, name, position, state, updated_at) VALUES (?, 'song-002', 2, 'queued', ?)",
                   (urls(1, start=2)[0], now))
    report = run(api, [], out, replicate_model=None)
    assert [s.state for s in report.songs] == ["succeeded", "succeeded"]
    assert [s.key for s in report.finished] == urls(1, start=2)
    assert report.predict_time == pytest.approx(3.0 + 2.5)
    assert (out / "song-001_vocals.wav").read_bytes() == b"vocals from the first release"
    assert api.predictions["p00001"]["input"] == {"output_format": "wav", "audio": urls(1, start=2)[0]}
    assert report.songs[1].files == {"vocals": "song-002_vocals.wav", "instrumental": "song-002_instrumental.wav"}


# The manifest's schema as the first release created it (the file name, stemsep-remote.sqlite3, too).
OLD_MANIFEST_SCHEMA = """
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE songs (
    key TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, position INTEGER NOT NULL, state TEXT NOT NULL,
    prediction_id TEXT, input_url TEXT, submitted_at REAL, status TEXT, files TEXT, error TEXT, predict_time REAL,
    creates INTEGER NOT NULL DEFAULT 0, past_ids TEXT NOT NULL DEFAULT '', updated_at REAL NOT NULL
);
"""


def test_names_of_outputs_are_unique(api, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "song.wav").write_bytes(b"RIFF")
    report = run(api, [tmp_path / "a" / "song.wav", tmp_path / "b" / "song.wav", "https://e.com/song.mp3"], tmp_path / "out")
    assert [s.name for s in report.songs] == ["song", "song-2", "song-3"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.wav")) == sorted(
        f"{n}_{s}.wav" for n in ("song", "song-2", "song-3") for s in ("vocals", "instrumental"))


# the CLI ---------------------------------------------------------------------------------------


def test_cli_prints_a_line_per_song_and_a_summary_with_the_cost(api, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REPLICATE_API_TOKEN", TOKEN)
    monkeypatch.setenv("REPLICATE_BASE_URL", api.url)
    monkeypatch.setenv("REPLICATE_POLL_INTERVAL", "0.005")
    monkeypatch.chdir(tmp_path)
    args = ["remote", *urls(2), "https://example.com/bad.mp3", "-o", "out", "--model", MODEL, "--price-per-second", "0.001"]
    assert cli.main(args) == 1
    lines = capsys.readouterr().out.splitlines()
    assert sorted(line.split()[0] for line in lines[:-1]) == ["FAIL", "ok", "ok"]
    ok = next(line for line in lines if urls(1)[0] in line)
    assert re.fullmatch(rf"ok    {re.escape(urls(1)[0])} -> out/song-001_vocals\.wav, out/song-001_instrumental\.wav  \(p\d{{5}}, 2\.5 s\)", ok)
    assert any(re.fullmatch(r"FAIL  https://example\.com/bad\.mp3: prediction p\d{5} failed: ValueError: bad: not an audio file", line)
               for line in lines)
    assert lines[-1] == "3 songs: 2 succeeded, 1 failed; predict_time 7.5 s; estimated cost $0.01 at $0.001/s"

    assert cli.main(["remote", "-o", "out", "--retry-failed"]) == 1  # resumes from the folder alone
    assert capsys.readouterr().out.splitlines()[-1].startswith("3 songs: 2 succeeded (2 in earlier runs), 1 failed;")


def test_cli_batch_with_a_webhook_prints_the_ids(api, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REPLICATE_API_TOKEN", TOKEN)
    monkeypatch.setenv("REPLICATE_BASE_URL", api.url)
    folder = tmp_path / "album"
    folder.mkdir()
    for name in ("one.wav", "two.wav"):
        (folder / name).write_bytes(b"RIFF")
    args = ["remote", str(folder), "-o", str(tmp_path / "out"), "--model", MODEL, "--webhook", "https://h/webhooks/replicate"]
    assert cli.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == ["sent", "sent"]
    assert lines[-1] == "2 songs: 0 succeeded, 0 failed, 2 submitted, their results go to the webhook; predict_time 0.0 s"


def test_cli_with_nothing_to_do_says_so(api, tmp_path, capsys):
    assert cli.main(["remote", "-o", str(tmp_path / "empty"), "--model", MODEL, "--token", TOKEN]) == 1
    assert "nothing to do: no inputs given and no manifest" in capsys.readouterr().err


def test_cli_default_concurrency_is_the_library_s():
    args = cli.build_parser().parse_args(["remote", "x.wav"])
    assert args.concurrency == remote.DEFAULT_CONCURRENCY
