"""`stemsep ui`'s server: its API on a constructed checkpoint, the queue (one separation at a
time, cancel leaves nothing), and its safety: loopback by default, Host and Origin checks,
the token off loopback, no file outside the output folder, upload caps."""

from __future__ import annotations

import base64
import email
import email.policy
import functools
import hashlib
import http.client
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from stemsep import cli, testing  # noqa: E402
from stemsep.ui.engines import ModelOptions  # noqa: E402
from stemsep.ui.library import RECORD_NAME  # noqa: E402
from stemsep.ui.server import Settings, bind, create_app  # noqa: E402

PORT = 8080
BASE = f"http://127.0.0.1:{PORT}"
SAME_ORIGIN = {"origin": BASE}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """A fast network whose masks are constant 0.5: vocals = half the mix."""
    return testing.make_model_files(tmp_path_factory.mktemp("model"), testing.FAST_CONFIG, mask=0.5)


def write_song(path: Path, seconds: float = 1.0, rate: int = 44100) -> Path:
    sf.write(path, testing.tones(rate, int(rate * seconds), 2).T, rate, subtype="PCM_16")
    return path


def make_app(tmp_path: Path, model_files, port: int = PORT, overlap: int | None = 1, **settings):
    checkpoint, config = model_files
    options = ModelOptions(checkpoint=checkpoint, config=config, overlap=overlap)
    return create_app(Settings(output_dir=tmp_path / "out", port=port, model_options=options, **settings))


@pytest.fixture
def app(tmp_path, model_files):
    return make_app(tmp_path, model_files)


@pytest.fixture
def client(app):
    with TestClient(app, base_url=BASE) as client:
        yield client


def upload(client, path: Path, **query) -> dict:
    params = {"name": path.name, **query}
    response = client.post("/api/jobs", params=params, content=path.read_bytes(), headers=SAME_ORIGIN)
    assert response.status_code == 202, response.text
    return response.json()


def finished(app, timeout: float = 120) -> list[dict]:
    assert app.state.ui.queue.wait_idle(timeout)
    return app.state.ui.queue.listing()


def separated(app, client, song: Path, **query) -> tuple[dict, dict]:
    """Upload `song`, wait for its separation to succeed; its job and its (only) record."""
    upload(client, song, **query)
    [job] = finished(app)
    assert job["state"] == "done", job["error"]
    [record] = client.get("/api/separations").json()["separations"]
    return job, record


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if not p.is_dir())


# separating ------------------------------------------------------------------------------------


def test_a_song_is_separated_into_its_own_folder_with_a_record_and_its_stems_are_served(app, client, tmp_path):
    song = write_song(tmp_path / "my song.wav")
    job, record = separated(app, client, song, stems="vocals,instrumental")
    assert record["id"] == job["separation"] and record["song"] == "my song.wav" and record["model"] == "model.ckpt"
    assert record["stems"] == {"vocals": "my song_vocals.wav", "instrumental": "my song_instrumental.wav"}
    assert record["sample_rate"] == 44100 and record["duration_s"] == pytest.approx(1.0, abs=0.01)
    folder = tmp_path / "out" / record["id"]
    assert json.loads((folder / RECORD_NAME).read_text())["options"]["stems"] == ["vocals", "instrumental"]
    mix, _ = sf.read(song, dtype="int16")
    for stem, name in record["stems"].items():
        response = client.get(f"/files/{record['id']}/{name}")
        assert response.status_code == 200 and response.content == (folder / name).read_bytes()
    vocals, _ = sf.read(folder / record["stems"]["vocals"], dtype="int16")
    instrumental, _ = sf.read(folder / record["stems"]["instrumental"], dtype="int16")
    assert np.array_equal(vocals.astype(np.int32) + instrumental, mix)  # the library's PCM contract holds
    zipped = zipfile.ZipFile(io.BytesIO(client.get(f"/api/separations/{record['id']}/zip").content))
    assert sorted(zipped.namelist()) == sorted(record["stems"].values())
    assert all(zipped.read(n) == (folder / n).read_bytes() for n in zipped.namelist())
    assert files_under(tmp_path / "out" / ".uploads") == []


def test_a_practice_track_is_separated_and_adds_up_to_the_song_with_its_stem(app, client, tmp_path):
    song = write_song(tmp_path / "tune.wav")
    _, record = separated(app, client, song, stems="vocals,no_vocals")
    assert record["stems"] == {"vocals": "tune_vocals.wav", "no_vocals": "tune_no_vocals.wav"}
    folder = tmp_path / "out" / record["id"]
    vocals, _ = sf.read(folder / "tune_vocals.wav", dtype="int16")
    rest, _ = sf.read(folder / "tune_no_vocals.wav", dtype="int16")
    assert np.array_equal(vocals.astype(np.int32) + rest, sf.read(song, dtype="int16")[0])


def test_the_mix_export_sums_the_stems_with_their_gains(app, client, tmp_path):
    song = write_song(tmp_path / "song.wav")
    _, record = separated(app, client, song)
    folder = tmp_path / "out" / record["id"]
    vocals, instrumental = (sf.read(folder / name, dtype="int16")[0] for name in record["stems"].values())

    def export(gains: str, dtype: str) -> np.ndarray:
        response = client.get(f"/api/separations/{record['id']}/mix", params={"gains": gains})
        assert response.status_code == 200, response.text
        assert response.headers["content-disposition"] == 'attachment; filename="song_mix.wav"'
        return sf.read(io.BytesIO(response.content), dtype=dtype)[0]

    assert np.array_equal(export("1,1", "int16"), sf.read(song, dtype="int16")[0])  # the song, bit for bit
    assert np.array_equal(export("0,1", "int16"), instrumental)
    half = export("0.5,1", "float32")  # other gains: float WAV
    assert np.allclose(half, (0.5 * vocals + instrumental) / 32768, atol=1e-7)
    for bad in ("1", "1,x", "1,-1", "1,99"):
        assert client.get(f"/api/separations/{record['id']}/mix", params={"gains": bad}).status_code == 400
    assert files_under(tmp_path / "out" / ".uploads") == []  # the mix file went once sent


def test_earlier_separations_are_listed_by_a_new_server_and_can_be_deleted(tmp_path, model_files, app, client):
    upload(client, write_song(tmp_path / "a.wav"))
    finished(app)
    again = make_app(tmp_path, model_files)
    with TestClient(again, base_url=BASE) as other:
        [record] = other.get("/api/separations").json()["separations"]
        assert other.get(f"/api/separations/{record['id']}").json() == record
        assert other.delete(f"/api/separations/{record['id']}", headers=SAME_ORIGIN).status_code == 200
        assert other.get("/api/separations").json()["separations"] == []
    assert not (tmp_path / "out" / record["id"]).exists()


def test_the_config_lists_the_models_with_their_practice_tracks(client):
    config = client.get("/api/config").json()
    custom = config["models"][0]
    assert config["model"] == custom["name"] == "custom"
    assert custom["stems"] == ["vocals", "instrumental"] and custom["practice"] == ["no_vocals", "no_instrumental"]
    listed = [m["name"] for m in config["models"][1:]]
    from stemsep import catalogue

    assert sorted(listed) == sorted(catalogue.MODELS)
    downloaded = [m["downloaded"] for m in config["models"][1:]]
    assert downloaded == sorted(downloaded, reverse=True)  # downloaded ones first
    assert "wav" in config["formats"] and "flac" in config["formats"]


def test_two_songs_are_separated_one_after_the_other(app, client, tmp_path):
    first = upload(client, write_song(tmp_path / "first.wav", 2.0))
    second = upload(client, write_song(tmp_path / "second.wav"))
    assert client.get("/api/jobs").json()["jobs"][1]["state"] == "queued"  # waits in the visible queue
    jobs = {job["id"]: job for job in finished(app)}
    a, b = jobs[first["id"]], jobs[second["id"]]
    assert a["state"] == b["state"] == "done"
    assert a["ended_at"] <= b["started_at"]
    records = client.get("/api/separations").json()["separations"]
    assert sorted(r["song"] for r in records) == ["first.wav", "second.wav"]
    assert len({r["id"] for r in records}) == 2


def test_cancel_stops_a_running_separation_and_leaves_nothing_behind(tmp_path, model_files):
    app = make_app(tmp_path, model_files, overlap=4)
    with TestClient(app, base_url=BASE) as client:
        job = upload(client, write_song(tmp_path / "long.wav", 20.0))
        queued = upload(client, write_song(tmp_path / "next.wav"))
        deadline = time.monotonic() + 60
        while client.get("/api/jobs").json()["jobs"][0]["done"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.post(f"/api/jobs/{queued['id']}/cancel", headers=SAME_ORIGIN).json()["state"] == "canceled"
        assert client.post(f"/api/jobs/{job['id']}/cancel", headers=SAME_ORIGIN).status_code == 200
        jobs = finished(app)
        assert [j["state"] for j in jobs] == ["canceled", "canceled"]
        assert 0 < jobs[0]["done"] < jobs[0]["total"]
        assert client.get("/api/separations").json()["separations"] == []
    assert files_under(tmp_path / "out") == []
    assert [p.name for p in (tmp_path / "out").iterdir()] in ([], [".uploads"])


def test_a_file_that_is_not_audio_fails_with_the_library_sentence_and_leaves_nothing(app, client, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a song\n" * 100)
    upload(client, notes)
    [job] = finished(app)
    assert job["state"] == "failed"
    assert job["error"].startswith("notes.txt: not an audio file")
    assert "\n" not in job["error"]
    assert files_under(tmp_path / "out") == []


def test_an_unknown_model_or_format_is_refused_with_one_sentence(client, tmp_path):
    song = write_song(tmp_path / "s.wav")
    response = client.post("/api/jobs", params={"name": "s.wav", "model": "nope"}, content=song.read_bytes(), headers=SAME_ORIGIN)
    assert response.status_code == 400 and response.json()["error"].startswith("unknown model 'nope'")
    response = client.post("/api/jobs", params={"name": "s.wav", "format": "exe"}, content=song.read_bytes(), headers=SAME_ORIGIN)
    assert response.status_code == 400 and "unknown output format 'exe'" in response.json()["error"]


def test_an_upload_over_the_byte_limit_is_refused_before_it_is_read(tmp_path, model_files):
    app = make_app(tmp_path, model_files, max_upload_bytes=1000)
    with TestClient(app, base_url=BASE) as client:
        response = client.post("/api/jobs", params={"name": "big.wav"}, content=b"x" * 1001, headers=SAME_ORIGIN)
        assert response.status_code == 413
        assert response.json()["error"] == "big.wav: the file is larger than this page's upload limit of 1000 bytes"
        assert client.get("/api/jobs").json()["jobs"] == []
    assert files_under(tmp_path / "out") == []


def test_the_upload_needs_as_much_free_space_as_it_is_long(tmp_path, model_files, monkeypatch):
    import shutil as shutil_module

    from stemsep.ui import server

    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(server.shutil, "disk_usage", lambda path: usage._replace(free=10 << 20))
    app = make_app(tmp_path, model_files)
    with TestClient(app, base_url=BASE) as client:
        response = client.post("/api/jobs", params={"name": "s.wav"}, content=b"x" * 1000, headers=SAME_ORIGIN)
    assert response.status_code == 507 and "not enough free disk space" in response.json()["error"]


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def downloadable(tmp_path, model_files, monkeypatch):
    """A catalogue model, `tiny`, whose files a local web server offers; the weights folder is empty."""
    from stemsep import catalogue

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for source, name in zip(model_files, ("tiny.ckpt", "tiny.yaml")):
        (mirror / name).write_bytes(source.read_bytes())
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietFiles, directory=mirror))
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()

    def offered(name: str) -> catalogue.WeightFile:
        data = (mirror / name).read_bytes()
        url = f"http://127.0.0.1:{server.server_address[1]}/{name}"
        return catalogue.WeightFile(name, hashlib.sha256(data).hexdigest(), len(data), (url,))

    model = catalogue.Model(name="tiny", title="a constructed model", architecture="bs_roformer",
                            stems=("vocals", "instrumental"), checkpoint=offered("tiny.ckpt"), config=offered("tiny.yaml"),
                            licence=None, scores=())
    monkeypatch.setitem(catalogue.MODELS, "tiny", model)
    monkeypatch.setenv("STEMSEP_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.delenv("STEMSEP_OFFLINE", raising=False)
    yield model
    server.shutdown()
    server.server_close()


def catalogue_app(tmp_path, **model_options):
    return create_app(Settings(output_dir=tmp_path / "out", port=PORT, model_options=ModelOptions(overlap=1, **model_options)))


def test_a_model_that_is_not_downloaded_is_downloaded_with_its_progress_shown(tmp_path, downloadable, monkeypatch):
    from stemsep.ui import jobs

    reports = []
    report = jobs.Job.progress
    monkeypatch.setattr(jobs.Job, "progress", lambda job, *args: (reports.append(args), report(job, *args))[1])
    app = catalogue_app(tmp_path)
    with TestClient(app, base_url=BASE) as client:
        [tiny] = [m for m in client.get("/api/config").json()["models"] if m["name"] == "tiny"]
        assert not tiny["downloaded"] and tiny["size"] == downloadable.size
        upload(client, write_song(tmp_path / "s.wav"), model="tiny")
        [job] = finished(app)
        assert job["state"] == "done", job["error"]
        assert [m for m in client.get("/api/config").json()["models"] if m["name"] == "tiny"][0]["downloaded"]
    size = downloadable.checkpoint.size
    assert (size, size, "downloading tiny.ckpt") in reports
    assert reports[-1][2:] == () and reports[-1][0] == reports[-1][1]  # then the separation's chunks, to the last
    assert sorted(p.name for p in (tmp_path / "weights").iterdir() if not p.name.endswith(".lock")) == ["tiny.ckpt", "tiny.yaml"]


def test_offline_a_model_that_is_not_downloaded_is_the_library_sentence(tmp_path, downloadable):
    app = catalogue_app(tmp_path, offline=True)
    with TestClient(app, base_url=BASE) as client:
        assert client.get("/api/config").json()["offline"]
        upload(client, write_song(tmp_path / "s.wav"), model="tiny")
        [job] = finished(app)
    assert job["state"] == "failed"
    assert job["error"].startswith("model tiny is not downloaded in ") and job["error"].endswith("offline mode forbids downloading it")
    assert files_under(tmp_path / "out") == []


def test_the_replicate_settings_from_the_page_are_checked_and_an_unreachable_api_is_one_sentence(client, monkeypatch):
    monkeypatch.setenv("REPLICATE_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    response = client.post("/api/replicate", json={"model": "not a model", "token": "t"}, headers=SAME_ORIGIN)
    assert response.status_code == 400 and "is not of the form owner/name" in response.json()["error"]
    assert client.post("/api/replicate", json=["x"], headers=SAME_ORIGIN).status_code == 400
    state = client.post("/api/replicate", json={"model": "owner/model", "token": "r8_x"}, headers=SAME_ORIGIN).json()
    assert state["configured"] and state["model"] == "owner/model" and state["choices"] == []
    assert state["error"].startswith("could not read the inputs of the Replicate model owner/model (")
    assert client.get("/api/config").json()["replicate"]["configured"]


# who may talk to it ---------------------------------------------------------------------------


def test_the_default_bind_is_loopback_only():
    assert Settings().host == "127.0.0.1"
    assert cli.build_parser().parse_args(["ui"]).host == "127.0.0.1"
    sock = bind(Settings().host, 0)
    try:
        assert sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()


def test_the_command_listens_on_loopback_without_a_token_and_a_busy_port_is_one_sentence(tmp_path):
    env = {**os.environ, "STEMSEP_WEIGHTS_DIR": str(tmp_path / "weights")}
    process = subprocess.Popen(
        [sys.executable, "-m", "stemsep.cli", "ui", "--no-browser", "--port", "0", "-o", str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("stemsep ui: http://127.0.0.1:") and "token" not in line
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/api/config")
        assert connection.getresponse().status == 200
        busy = subprocess.run([sys.executable, "-m", "stemsep.cli", "ui", "--no-browser", "--port", str(port)],
                              capture_output=True, text=True, env=env, timeout=60)
        assert busy.returncode == 1
        assert busy.stderr == f"stemsep: error: cannot listen on 127.0.0.1:{port}: the port is already in use\n"
    finally:
        process.terminate()
        process.wait(30)


def test_off_loopback_the_command_warns_and_prints_a_token(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "stemsep.cli", "ui", "--no-browser", "--host", "0.0.0.0", "--port", "0", "-o", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = process.stdout.readline()
        assert "?token=" in line
        port, token = int(line.split(":")[3].split("/")[0]), line.split("?token=")[1].split()[0]
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/api/config")
        assert connection.getresponse().status == 401
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/api/config", headers={"x-stemsep-token": token})
        assert connection.getresponse().status == 200
    finally:
        process.terminate()
        process.wait(30)
    assert "warning: listening on 0.0.0.0" in process.stderr.read()


@pytest.mark.parametrize("host", ["evil.example:8080", "127.0.0.1:9999", "localhost.evil.example:8080", ""])
def test_a_request_for_another_host_name_is_refused(client, host):
    assert client.get("/api/config", headers={"host": host}).status_code == 403


@pytest.mark.parametrize("host", ["127.0.0.1:8080", "localhost:8080", "LOCALHOST:8080", "[::1]:8080"])
def test_the_loopback_names_are_accepted(client, host):
    assert client.get("/api/config", headers={"host": host}).status_code == 200


@pytest.mark.parametrize("origin", [None, "http://evil.example", "http://localhost:8080", "null", "https://127.0.0.1:8080"])
def test_a_state_changing_request_needs_the_page_s_own_origin(app, client, tmp_path, origin):
    song = write_song(tmp_path / "s.wav")
    headers = {} if origin is None else {"origin": origin}
    response = client.post("/api/jobs", params={"name": "s.wav"}, content=song.read_bytes(), headers=headers)
    assert response.status_code == 403
    assert client.post("/api/replicate", json={"model": "a/b", "token": "t"}, headers=headers).status_code == 403
    assert client.get("/api/jobs").json()["jobs"] == []


def test_off_loopback_the_token_is_needed_in_the_url_once_then_in_a_cookie(tmp_path, model_files):
    app = make_app(tmp_path, model_files, host="192.0.2.7", token="s3cret-token")
    with TestClient(app, base_url=f"http://192.0.2.7:{PORT}") as client:
        assert client.get("/").status_code == 401
        assert client.get("/?token=wrong").status_code == 401
        assert client.get("/api/config", headers={"x-stemsep-token": "s3cret-token"}).status_code == 200
        first = client.get("/?token=s3cret-token", follow_redirects=False)
        assert first.status_code == 303 and first.headers["location"] == "/"
        assert "HttpOnly" in first.headers["set-cookie"] and "SameSite=strict" in first.headers["set-cookie"]
        assert client.get("/").status_code == 200  # the cookie now
        client.cookies.clear()
        assert client.get("/api/separations").status_code == 401


# no file outside the output folder ------------------------------------------------------------


@pytest.fixture
def live(tmp_path, model_files):
    """A real uvicorn server on 127.0.0.1 with one separation and a secret file outside its folder."""
    import uvicorn

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    app = make_app(tmp_path, model_files, port=port)
    out = tmp_path / "out"
    (tmp_path / "secret.txt").write_text("SECRET")
    sep = out / "song-1"
    sep.mkdir()
    (sep / "song_vocals.wav").write_bytes(b"RIFF vocals")
    (sep / "unlisted.wav").write_bytes(b"RIFF unlisted")
    (sep / "song_link.wav").symlink_to(tmp_path / "secret.txt")
    record = {"id": "song-1", "song": "song.wav", "model": "custom", "engine": "local", "options": {},
              "stems": {"vocals": "song_vocals.wav", "link": "song_link.wav"}, "created": "2026-01-01T00:00:00+00:00",
              "seconds": 1.0}
    (sep / RECORD_NAME).write_text(json.dumps(record))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret_vocals.wav").write_text("SECRET")
    (outside / RECORD_NAME).write_text(json.dumps({**record, "id": "linked", "stems": {"vocals": "secret_vocals.wav"}}))
    (out / "linked").symlink_to(outside)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield port, out, app
    server.should_exit = True
    thread.join(30)
    sock.close()


def raw_request(port: int, method: str, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    """Send `path` exactly as written (no client normalizes its dots)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close",
                 *(f"{k}: {v}" for k, v in (headers or {}).items()), "", ""]
        conn.sendall("\r\n".join(lines).encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


TRAVERSALS = [
    "/files/song-1/../../secret.txt",  # not a path
    "/files/song-1/..%2f..%2fsecret.txt",
    "/files/song-1/%2e%2e%2f%2e%2e%2fsecret.txt",
    "/files/song-1/%2e%2e/%2e%2e/secret.txt",
    "/files/..%2f..%2f/secret.txt",
    "/files/%2e%2e/secret.txt",
    "/files/song-1/%2Ftmp%2Fsecret.txt",
    "/files/song-1//etc/passwd",
    "/files/song-1/song_link.wav",  # listed, but a symlink out of the folder
    "/files/song-1/unlisted.wav",  # in the folder, but not a stem of the record
    "/files/song-1/stemsep-ui.json",
    "/files/linked/secret_vocals.wav",  # a separation folder that is a symlink out
    "/files/song-1/..\\..\\secret.txt",
    "/static/../../secret.txt",  # not a path
    "/static/%2e%2e/%2e%2e/%2e%2e/secret.txt",
    "/static/..%2f..%2f..%2fsecret.txt",
    "/api/separations/..%2f..%2fsecret.txt",
    "/api/separations/linked",
    "/api/separations/linked/zip",
    "/api/separations/%2e%2e/zip",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_traversal_never_serves_a_file_outside_the_output_folder(live, path):
    port, _, _ = live
    status, body = raw_request(port, "GET", path)
    assert status in (400, 404)
    assert b"SECRET" not in body


def test_the_listed_stem_is_served_and_traversal_deletes_nothing(live, tmp_path):
    port, out, _ = live
    status, body = raw_request(port, "GET", "/files/song-1/song_vocals.wav")
    assert (status, body) == (200, b"RIFF vocals")
    origin = {"Origin": f"http://127.0.0.1:{port}"}
    for path in ("/api/separations/linked", "/api/separations/..%2f..%2felsewhere", "/api/separations/%2e%2e"):
        assert raw_request(port, "DELETE", path, origin)[0] in (400, 404)
    assert (tmp_path / "elsewhere" / "secret_vocals.wav").exists() and (tmp_path / "secret.txt").exists()
    assert raw_request(port, "DELETE", "/api/separations/song-1", origin)[0] == 200
    assert (tmp_path / "secret.txt").read_text() == "SECRET"  # the symlink went, not its target
    assert not (out / "song-1" / "song_vocals.wav").exists()


def test_the_replicate_path_refuses_uploads_over_replicate_s_limit_before_reading_them(live):
    from stemsep.remote import MAX_UPLOAD_BYTES

    port, out, app = live
    app.state.ui.replicate.model, app.state.ui.replicate.token = "owner/model", "r8_test"
    headers = {"Origin": f"http://127.0.0.1:{port}", "Content-Length": str(MAX_UPLOAD_BYTES + 1)}
    status, body = raw_request(port, "POST", "/api/jobs?name=big.wav&engine=replicate", headers)
    assert status == 413
    assert json.loads(body) == {"error": "big.wav: the file is larger than Replicate's upload limit of 100 MB"}
    assert files_under(out / ".uploads") == []


# the Replicate path ---------------------------------------------------------------------------


class ReplicateRelay:
    """Replicate's HTTP API as the `replicate` SDK calls it, in front of the real Cog server:
    uploads are kept and handed to Cog as data URLs, a prediction runs on Cog and comes back
    finished, and the model's schema is Cog's own /openapi.json."""

    def __init__(self, cog_url: str, token: str):
        self.cog_url, self.token = cog_url, token
        self.files: dict[str, tuple[bytes, str]] = {}
        self.predictions: list[dict] = []
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def reply(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.headers.get("Authorization") != f"Bearer {relay.token}":
                    return self.reply(401, {"detail": "bad token", "status": 401})
                owner, name = self.path.removeprefix("/v1/models/").split("/")[:2]
                schema = httpx.get(f"{relay.cog_url}/openapi.json").json()
                version = {"id": "v1", "created_at": "2026-01-01T00:00:00Z", "cog_version": "0.23.1", "openapi_schema": schema}
                self.reply(200, {"url": f"https://replicate.com/{owner}/{name}", "owner": owner, "name": name,
                                 "description": None, "visibility": "private", "github_url": None, "paper_url": None,
                                 "license_url": None, "run_count": 0, "cover_image_url": None, "default_example": None,
                                 "latest_version": version})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Authorization") != f"Bearer {relay.token}":
                    return self.reply(401, {"detail": "bad token", "status": 401})
                if self.path == "/v1/files":
                    message = email.message_from_bytes(
                        f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body, policy=email.policy.HTTP)
                    part = next(p for p in message.iter_parts() if p.get_filename())
                    file_id = f"file{len(relay.files) + 1}"
                    relay.files[file_id] = (part.get_payload(decode=True), part.get_content_type())
                    return self.reply(201, {"id": file_id, "name": part.get_filename(), "content_type": part.get_content_type(),
                                            "size": len(relay.files[file_id][0]), "etag": "e", "checksums": {}, "metadata": {},
                                            "created_at": "2026-01-01T00:00:00Z", "expires_at": None,
                                            "urls": {"get": f"https://api.replicate.com/v1/files/{file_id}"}})
                request = json.loads(body)
                inputs = dict(request["input"])
                data, mime = relay.files[inputs["audio"].rsplit("/", 1)[-1]]
                inputs["audio"] = f"data:{mime};base64,{base64.b64encode(data).decode()}"
                answer = httpx.post(f"{relay.cog_url}/predictions", json={"input": inputs}, timeout=300).json()
                prediction = {"id": f"p{len(relay.predictions) + 1}", "model": "owner/stemsep", "version": "v1",
                              "input": request["input"], "status": answer["status"], "output": answer.get("output"),
                              "error": answer.get("error"), "logs": answer.get("logs", ""), "urls": {}}
                relay.predictions.append(prediction)
                self.reply(201, prediction)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_the_replicate_path_through_the_real_cog_server_gives_the_same_files_as_the_local_path(
        tmp_path, model_files, monkeypatch):
    from cogserver import cog_server

    checkpoint, config = model_files
    env = {"STEMSEP_CHECKPOINT": str(checkpoint), "STEMSEP_CONFIG": str(config), "STEMSEP_DEVICE": "cpu",
           "STEMSEP_COMPILE": "0", "STEMSEP_WORK_DIR": str(tmp_path / "cog")}
    with cog_server(env) as cog:
        assert cog.health()["status"] == "READY", cog.logs()[-3000:]
        relay = ReplicateRelay(cog.url, "r8_relay")
        try:
            monkeypatch.setenv("REPLICATE_BASE_URL", relay.url)
            monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_relay")
            monkeypatch.setenv("REPLICATE_MODEL", "owner/stemsep")
            app = make_app(tmp_path, model_files, overlap=None)  # the model's own overlap, as on Cog
            with TestClient(app, base_url=BASE) as client:
                hosted = client.get("/api/config").json()["replicate"]
                assert hosted["configured"] and hosted["model"] == "owner/stemsep"
                assert hosted["choices"] == ["1297", "kim-vocals", "duality-v2", "karaoke", "hyperace-vocals",
                                             "hyperace-inst", "mega"]  # from Cog's schema
                assert hosted["stems"]["karaoke"] == ["karaoke", "other"]
                assert hosted["practice"]["karaoke"] == ["no_karaoke", "no_other"]  # named by the library
                song = write_song(tmp_path / "duet.wav", 2.0)
                upload(client, song, engine="local")
                upload(client, song, engine="replicate", model="1297")
                jobs = finished(app, 300)
                assert [j["state"] for j in jobs] == ["done", "done"], [j["error"] for j in jobs]
                records = {r["engine"]: r for r in client.get("/api/separations").json()["separations"]}
        finally:
            relay.close()
    assert [p["input"]["model"] for p in relay.predictions] == ["1297"]
    local, hosted = records["local"], records["replicate"]
    assert hosted["model"] == "owner/stemsep (1297)"
    assert local["stems"] == hosted["stems"] == {"vocals": "duet_vocals.wav", "instrumental": "duet_instrumental.wav"}
    for name in local["stems"].values():
        assert (tmp_path / "out" / hosted["id"] / name).read_bytes() == (tmp_path / "out" / local["id"] / name).read_bytes()
