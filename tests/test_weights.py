"""Fetching and checking a model's files, against a real local HTTP server serving test bytes."""

from __future__ import annotations

import collections
import dataclasses
import errno
import hashlib
import http.server
import io
import os
import multiprocessing
import multiprocessing.synchronize
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from stemsep import catalogue, cli, weights
from stemsep.catalogue import Model, WeightFile
from stemsep.errors import WeightsDownloadError

# 1.5 MiB so a download spans more than one 1 MiB block.
PAYLOAD = random.Random(1297).randbytes(3 * 2**19)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
SAME_SIZE_WRONG = random.Random(1298).randbytes(len(PAYLOAD))  # right size, wrong bytes
CONFIG = b"audio:\n  sample_rate: 44100\n"
CONFIG_SHA = hashlib.sha256(CONFIG).hexdigest()
WRONG = b"these are not the weights you are looking for\n" * 1000


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 whose handler counts requests per path."""

    def __init__(self) -> None:
        self.hits: collections.Counter[str] = collections.Counter()
        self.ranges: list[tuple[str, str | None]] = []  # (path, Range header) per request
        self.active = self.most_active = 0  # /slow requests in flight, now and at most
        self.files: dict[str, bytes] = {}  # more paths to serve, with Range
        self.release = threading.Event()  # lets stalled handlers finish at teardown
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, body: bytes, length: int | None = None) -> None:
                self.send_response(200)
                if length != -1:  # -1: no Content-Length header, the body ends when the connection closes
                    self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)

            def _send_range(self, body: bytes) -> None:
                """`body`, or the part of it after a `Range: bytes=N-` request (206)."""
                asked = self.headers.get("Range")
                if asked is None:
                    self._send(body)
                    return
                start = int(asked.removeprefix("bytes=").removesuffix("-"))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:])

            def do_GET(self) -> None:
                server.hits[self.path] += 1
                server.ranges.append((self.path, self.headers.get("Range")))
                if self.path == "/flaky/model.ckpt" and server.hits[self.path] == 1:
                    # The first request breaks off after a third; later ones honour Range.
                    self._send(PAYLOAD[: len(PAYLOAD) // 3], length=len(PAYLOAD))
                    self.wfile.flush()
                    self.close_connection = True
                elif self.path in ("/flaky/model.ckpt", "/ranged/model.ckpt"):
                    self._send_range(PAYLOAD)
                elif self.path in server.files:
                    self._send_range(server.files[self.path])
                elif self.path == "/slow/model.ckpt":
                    # 24 pieces 50 ms apart: long enough for a second downloader to queue up.
                    server.active += 1
                    server.most_active = max(server.most_active, server.active)
                    try:
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(PAYLOAD)))
                        self.end_headers()
                        piece = len(PAYLOAD) // 24
                        for i in range(0, len(PAYLOAD), piece):
                            self.wfile.write(PAYLOAD[i : i + piece])
                            self.wfile.flush()
                            time.sleep(0.05)
                    finally:
                        server.active -= 1
                elif self.path in ("/good/model.ckpt", "/other/model.ckpt"):
                    self._send(PAYLOAD)
                elif self.path == "/good/model.yaml":
                    self._send(CONFIG)
                elif self.path == "/wrong/model.ckpt":
                    self._send(WRONG)
                elif self.path == "/same-size/model.ckpt":
                    self._send(SAME_SIZE_WRONG)
                elif self.path == "/unsized-too-long/model.ckpt":
                    self._send(PAYLOAD + b"trailing garbage", length=-1)
                    self.close_connection = True
                elif self.path == "/truncated/model.ckpt":
                    # Promise the whole payload, send a third, hang up.
                    self._send(PAYLOAD[: len(PAYLOAD) // 3], length=len(PAYLOAD))
                    self.wfile.flush()
                    self.close_connection = True
                elif self.path == "/stall/model.ckpt":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(PAYLOAD)))
                    self.end_headers()
                    self.wfile.write(PAYLOAD[:1000])
                    self.wfile.flush()
                    server.release.wait(5)
                    self.close_connection = True
                elif self.path == "/interrupt/model.ckpt":
                    # Ctrl-C arrives while the client is mid-body.
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(PAYLOAD)))
                    self.end_headers()
                    self.wfile.write(PAYLOAD[:1000])
                    self.wfile.flush()
                    os.kill(os.getpid(), signal.SIGINT)
                    server.release.wait(5)
                    self.close_connection = True
                else:
                    self.send_error(404)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # A short poll interval makes shutdown() quick.
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)

    def url(self, path: str) -> str:
        return self.base + path

    def ckpt(self, *mirrors: str) -> WeightFile:
        return WeightFile("model.ckpt", PAYLOAD_SHA, len(PAYLOAD), tuple(self.url(f"/{m}/model.ckpt") for m in mirrors))

    def yaml(self, size: int | None = len(CONFIG)) -> WeightFile:
        return WeightFile("model.yaml", CONFIG_SHA, size, (self.url("/missing/model.yaml"), self.url("/good/model.yaml")))

    def model(self, *mirrors: str, name: str = "test-model", yaml_size: int | None = len(CONFIG)) -> Model:
        """A catalogue entry whose checkpoint comes from `mirrors` (in order) and whose
        config comes from a 404 mirror, then a good one."""
        return Model(name=name, title="test", architecture="bs_roformer", stems=("vocals", "instrumental"),
                     checkpoint=self.ckpt(*mirrors), config=self.yaml(yaml_size), licence=None, scores=())


@pytest.fixture
def server():
    s = _Server()
    s.thread.start()
    try:
        yield s
    finally:
        s.release.set()
        s.httpd.shutdown()
        s.httpd.server_close()


def _leftovers(directory: Path) -> list[str]:
    """The files in `directory` but the lock files (which stay, see stemsep.weights._locked)."""
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".lock"))


PART = ".model.ckpt.part"  # where model.ckpt's bytes gather, kept for a resume


# the default model -------------------------------------------------------------------------


def test_the_default_model_files_hold_the_published_sha256_and_mirror_order():
    ckpt, yaml = catalogue.get(catalogue.DEFAULT).files
    assert ckpt.name == "model_bs_roformer_ep_317_sdr_12.9755.ckpt"
    assert ckpt.sha256 == "5b84f37e8d444c8cb30c79d77f613a41c05868ff9c9ac6c7049c00aefae115aa"
    assert ckpt.size == 639331213
    uvr = "https://github.com/TRvlvr/model_repo/releases/download/all_public_uvr_models"
    audio_separator = "https://github.com/nomadkaraoke/python-audio-separator/releases/download/model-configs"
    msst_webui = "https://huggingface.co/Sucial/MSST-WebUI/resolve/main/All_Models/vocal_models"
    assert ckpt.urls == (f"{msst_webui}/{ckpt.name}", f"{audio_separator}/{ckpt.name}", f"{uvr}/{ckpt.name}")
    assert yaml.name == "model_bs_roformer_ep_317_sdr_12.9755.yaml"
    assert yaml.sha256 == "2bfdd16c656bd9519aba757cc4f8834b7ede675eb1e00ec4772d74ae1c41af7f"
    assert yaml.size == 2273  # bs-roformer-infer 0.1.5 publishes it
    assert yaml.urls == (f"{audio_separator}/{yaml.name}",)


def test_default_dir_follows_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("STEMSEP_WEIGHTS_DIR", str(tmp_path / "w"))
    assert catalogue.default_dir() == tmp_path / "w"


def test_default_dir_is_weights_at_the_checkout_root(monkeypatch):
    monkeypatch.delenv("STEMSEP_WEIGHTS_DIR", raising=False)
    repo_root = Path(__file__).resolve().parents[1]
    assert catalogue.default_dir() == repo_root / "weights"


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(PAYLOAD)
    assert weights.sha256_file(path) == PAYLOAD_SHA


# download ---------------------------------------------------------------------------------


def test_download_falls_through_404_wrong_size_and_wrong_bytes_to_the_good_mirror(server, tmp_path):
    directory = tmp_path / "new" / "weights"  # created on demand
    paths = weights.download(server.model("missing", "wrong", "same-size", "good"), directory, progress=False)
    assert paths == [directory / "model.ckpt", directory / "model.yaml"]
    assert paths[0].read_bytes() == PAYLOAD
    assert paths[1].read_bytes() == CONFIG
    assert server.hits == {
        "/missing/model.ckpt": 1, "/wrong/model.ckpt": 1, "/same-size/model.ckpt": 1, "/good/model.ckpt": 1,
        "/missing/model.yaml": 1, "/good/model.yaml": 1,
    }
    assert _leftovers(directory) == ["model.ckpt", "model.yaml"]


def test_all_mirrors_failing_raises_one_sentence_and_leaves_nothing(server, tmp_path):
    with pytest.raises(WeightsDownloadError) as info:
        weights.download(server.model("missing", "wrong", "same-size"), tmp_path, progress=False)
    message = str(info.value)
    assert message == (
        f"could not download model.ckpt: {server.url('/missing/model.ckpt')}: HTTP 404; "
        f"{server.url('/wrong/model.ckpt')}: size mismatch (the server offers {len(WRONG)} bytes, expected {len(PAYLOAD)}); "
        f"{server.url('/same-size/model.ckpt')}: sha256 mismatch "
        f"(got {hashlib.sha256(SAME_SIZE_WRONG).hexdigest()[:8]}…, expected {PAYLOAD_SHA[:8]}…)"
    )
    assert "\n" not in message
    assert _leftovers(tmp_path) == []


def test_a_body_longer_than_the_catalogue_size_is_cut_off(server, tmp_path):
    with pytest.raises(WeightsDownloadError, match=r"unsized-too-long/model\.ckpt: size mismatch \(more than the expected"):
        weights.download(server.model("unsized-too-long"), tmp_path, progress=False)
    assert _leftovers(tmp_path) == []


def test_a_file_without_a_recorded_size_is_checked_by_sha256_alone(server, tmp_path):
    model = server.model("good", yaml_size=None)
    assert weights.download(model, tmp_path, progress=False)[1].read_bytes() == CONFIG
    assert weights.verify(model, tmp_path) == [tmp_path / "model.ckpt", tmp_path / "model.yaml"]


def test_existing_verified_files_are_not_fetched_again(server, tmp_path):
    model = server.model("good")
    weights.download(model, tmp_path, progress=False)
    assert server.hits["/good/model.ckpt"] == 1
    assert weights.download(model, tmp_path, progress=False) == [tmp_path / "model.ckpt", tmp_path / "model.yaml"]
    assert server.hits["/good/model.ckpt"] == 1 and server.hits["/good/model.yaml"] == 1


@pytest.mark.parametrize("corrupt", [PAYLOAD[:-1] + b"!", PAYLOAD[:-1]], ids=["flipped-byte", "short"])
def test_existing_corrupt_file_is_replaced(server, tmp_path, corrupt):
    (tmp_path / "model.ckpt").write_bytes(corrupt)
    weights.download(server.model("good"), tmp_path, progress=False)
    assert (tmp_path / "model.ckpt").read_bytes() == PAYLOAD
    assert server.hits["/good/model.ckpt"] == 1
    assert _leftovers(tmp_path) == ["model.ckpt", "model.yaml"]


def test_connection_dropped_mid_body_is_a_failure_and_keeps_only_the_part_file(server, tmp_path):
    with pytest.raises(WeightsDownloadError, match=r"truncated/model\.ckpt: connection closed early"):
        weights.download(server.model("truncated"), tmp_path, progress=False)
    assert _leftovers(tmp_path) == [PART]  # nothing under the final name
    assert (tmp_path / PART).read_bytes() == PAYLOAD[: len(PAYLOAD) // 3]


def test_connection_dropped_mid_body_moves_on_to_the_next_mirror_which_restarts_if_it_ignores_range(server, tmp_path):
    weights.download(server.model("truncated", "other"), tmp_path, progress=False)
    assert (tmp_path / "model.ckpt").read_bytes() == PAYLOAD
    assert _leftovers(tmp_path) == ["model.ckpt", "model.yaml"]
    assert ("/other/model.ckpt", f"bytes={len(PAYLOAD) // 3}-") in server.ranges  # asked for the rest, got it all


def test_an_interrupted_download_resumes_where_it_broke_off(server, tmp_path):
    """The first request breaks off after a third; the next asks for the rest only."""
    with pytest.raises(WeightsDownloadError, match="connection closed early"):
        weights.download(server.model("flaky"), tmp_path, progress=False)
    assert _leftovers(tmp_path) == [PART]
    weights.download(server.model("flaky"), tmp_path, progress=False)
    assert (tmp_path / "model.ckpt").read_bytes() == PAYLOAD
    assert [r for r in server.ranges if r[0] == "/flaky/model.ckpt"] == [
        ("/flaky/model.ckpt", None), ("/flaky/model.ckpt", f"bytes={len(PAYLOAD) // 3}-")]
    assert _leftovers(tmp_path) == ["model.ckpt", "model.yaml"]


def test_a_resume_on_wrong_kept_bytes_is_refused_then_fetched_again_from_the_start(server, tmp_path):
    (tmp_path / PART).write_bytes(SAME_SIZE_WRONG[:1000])  # not the file's first bytes
    weights.download(server.model("ranged"), tmp_path, progress=False)
    assert (tmp_path / "model.ckpt").read_bytes() == PAYLOAD
    assert [r[1] for r in server.ranges if r[0] == "/ranged/model.ckpt"] == ["bytes=1000-", None]
    assert _leftovers(tmp_path) == ["model.ckpt", "model.yaml"]


def test_a_complete_part_file_is_checked_without_a_request(server, tmp_path):
    (tmp_path / PART).write_bytes(PAYLOAD)
    weights.download(server.model("good"), tmp_path, progress=False)
    assert (tmp_path / "model.ckpt").read_bytes() == PAYLOAD and server.hits["/good/model.ckpt"] == 0


def test_stalled_server_times_out_and_leaves_nothing_under_the_final_name(server, tmp_path):
    with pytest.raises(WeightsDownloadError, match=r"stall/model\.ckpt: timed out"):
        weights.download(server.model("stall"), tmp_path, progress=False, timeout=0.3)
    assert _leftovers(tmp_path) == [PART]


def test_refused_connection_is_a_failure(server, tmp_path):
    server.httpd.shutdown()
    server.httpd.server_close()  # the port now refuses connections
    with pytest.raises(WeightsDownloadError, match=r"could not download model\.ckpt: .*good/model\.ckpt: "):
        weights.download(server.model("good"), tmp_path, progress=False, timeout=2)
    assert _leftovers(tmp_path) == []


def test_ctrl_c_mid_download_leaves_nothing_under_the_final_name(server, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        weights.download(server.model("interrupt"), tmp_path, progress=False, timeout=5)
    assert set(_leftovers(tmp_path)) <= {PART}  # the part file, if the body had begun


def test_progress_callback_gets_increasing_byte_counts_up_to_the_size(server, tmp_path):
    calls = []
    weights.download(server.model("good"), tmp_path, progress=False, on_progress=lambda *a: calls.append(a))
    ckpt = [(done, total) for done, total, name in calls if name == "model.ckpt"]
    assert ckpt[0] == (0, len(PAYLOAD)) and ckpt[-1] == (len(PAYLOAD), len(PAYLOAD)) and len(ckpt) >= 3
    assert all(a[0] < b[0] for a, b in zip(ckpt, ckpt[1:]))
    assert [c for c in calls if c[2] == "model.yaml"][-1] == (len(CONFIG), len(CONFIG), "model.yaml")


def test_progress_of_a_resumed_download_starts_at_the_bytes_kept(server, tmp_path):
    (tmp_path / PART).write_bytes(PAYLOAD[:1000])
    calls = []
    weights.download(server.model("ranged"), tmp_path, progress=False, on_progress=lambda *a: calls.append(a))
    assert calls[0] == (1000, len(PAYLOAD), "model.ckpt")


def test_free_space_is_checked_before_anything_is_fetched(server, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=10 << 20))
    with pytest.raises(WeightsDownloadError) as info:
        weights.download(server.model("good"), tmp_path, progress=False)
    assert str(info.value) == (
        f"not enough free disk space in {tmp_path} for model.ckpt: about 66 MB needed, 10 MB free"
    )
    assert sum(server.hits.values()) == 0 and _leftovers(tmp_path) == []


def _download_in_a_process(mirror: str, directory: str, start: multiprocessing.synchronize.Barrier) -> None:
    """What a second program does: fetch the test model (its own copy of the catalogue entry)."""
    model = Model(name="test-model", title="test", architecture="bs_roformer", stems=("vocals", "instrumental"),
                  checkpoint=WeightFile("model.ckpt", PAYLOAD_SHA, len(PAYLOAD), (mirror,), dtype="fp32"),
                  config=WeightFile("model.yaml", CONFIG_SHA, len(CONFIG), (mirror.replace("slow/model.ckpt", "good/model.yaml"),)),
                  licence=None, scores=())
    start.wait()
    weights.download(model, directory, progress=False)


@pytest.mark.slow
def test_two_processes_downloading_the_same_model_end_with_one_good_file(server, tmp_path):
    """Two programs fetch the same model at once: one downloads, the other waits for the
    lock and finds the file in place (the server sees one transfer, never two at a time)."""
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    processes = [context.Process(target=_download_in_a_process, args=(server.url("/slow/model.ckpt"), str(tmp_path), start))
                 for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert [p.exitcode for p in processes] == [0, 0]
    assert (tmp_path / "model.ckpt").read_bytes() == PAYLOAD
    assert server.hits["/slow/model.ckpt"] == 1 and server.most_active == 1
    assert _leftovers(tmp_path) == ["model.ckpt", "model.yaml"]


def test_a_lock_held_elsewhere_makes_a_download_wait(server, tmp_path):
    """While another process holds a file's lock, download() waits; once it is released the
    file is fetched."""
    import fcntl

    fd = os.open(tmp_path / ".model.ckpt.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (weights.download(server.model("good"), tmp_path, progress=False), done.set()))
    worker.start()
    assert not done.wait(0.5) and server.hits["/good/model.ckpt"] == 0
    os.close(fd)
    worker.join(10)
    assert done.is_set() and (tmp_path / "model.ckpt").read_bytes() == PAYLOAD


def test_progress_bar_goes_to_stderr_only_when_asked(server, tmp_path, capsys):
    weights.download(server.model("good"), tmp_path / "a", progress=False)
    assert capsys.readouterr().err == ""
    weights.download(server.model("good"), tmp_path / "b", progress=True)
    assert "model.ckpt" in capsys.readouterr().err


def test_a_write_failure_stops_at_once_and_leaves_nothing(server, tmp_path, monkeypatch):
    class FullDisk(io.BufferedWriter):
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_open = open

    def opening(path, mode="r", *args, **kwargs):
        if "b" in mode and ("w" in mode or "+" in mode):  # the part file, written
            return FullDisk(real_open(path, mode, buffering=0))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(weights, "open", opening, raising=False)
    with pytest.raises(WeightsDownloadError) as info:
        weights.download(server.model("good", "other"), tmp_path, progress=False)
    assert str(info.value) == f"cannot write {tmp_path / 'model.ckpt'} (No space left on device)"
    assert server.hits == {"/good/model.ckpt": 1}  # the other mirror would not help
    assert _leftovers(tmp_path) == []


def test_an_unusable_weights_folder_is_one_error(server, tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(WeightsDownloadError, match=r"^cannot create the weights folder .*file/weights \(Not a directory\)$"):
        weights.download(server.model("good"), tmp_path / "file" / "weights", progress=False)
    assert sum(server.hits.values()) == 0


def test_download_takes_a_catalogue_name(server, tmp_path, monkeypatch):
    monkeypatch.setattr(catalogue, "MODELS", {"test-model": server.model("good")})
    assert weights.download("test-model", tmp_path, progress=False) == [tmp_path / "model.ckpt", tmp_path / "model.yaml"]


# verify -----------------------------------------------------------------------------------


def test_verify_returns_the_paths_of_good_files(server, tmp_path):
    (tmp_path / "model.ckpt").write_bytes(PAYLOAD)
    (tmp_path / "model.yaml").write_bytes(CONFIG)
    assert weights.verify(server.model("good"), tmp_path) == [tmp_path / "model.ckpt", tmp_path / "model.yaml"]
    assert sum(server.hits.values()) == 0  # verify never touches the network


def test_verify_names_a_missing_file_and_says_how_to_fetch_it(server, tmp_path):
    with pytest.raises(WeightsDownloadError) as info:
        weights.verify(server.model("good"), tmp_path)
    assert str(info.value) == (
        f"{tmp_path / 'model.ckpt'} is missing: download it first (stemsep models download test-model)"
    )


def test_verify_names_a_file_of_the_wrong_size(server, tmp_path):
    (tmp_path / "model.ckpt").write_bytes(WRONG)
    with pytest.raises(WeightsDownloadError) as info:
        weights.verify(server.model("good"), tmp_path)
    assert str(info.value) == (
        f"{tmp_path / 'model.ckpt'} has {len(WRONG)} bytes, expected {len(PAYLOAD)}: "
        "download it again (stemsep models download test-model)"
    )


def test_verify_names_a_corrupt_file_with_both_hashes(server, tmp_path):
    (tmp_path / "model.ckpt").write_bytes(SAME_SIZE_WRONG)
    with pytest.raises(WeightsDownloadError) as info:
        weights.verify(server.model("good"), tmp_path)
    message = str(info.value)
    assert str(tmp_path / "model.ckpt") in message
    assert f"got {hashlib.sha256(SAME_SIZE_WRONG).hexdigest()}, expected {PAYLOAD_SHA}" in message


# the command line -------------------------------------------------------------------------


@pytest.fixture
def test_catalogue(server, monkeypatch):
    """The catalogue replaced by two models served by the local server; 'test-model' is the default."""
    other = server.model("wrong", name="other-model")
    other = dataclasses.replace(other, checkpoint=dataclasses.replace(other.checkpoint, name="other.ckpt"),
                                config=dataclasses.replace(other.config, name="other.yaml"))
    models = {"test-model": server.model("missing", "good"), "other-model": other}
    monkeypatch.setattr(catalogue, "MODELS", models)
    monkeypatch.setattr(catalogue, "DEFAULT", "test-model")
    return models


def test_cli_weights_verify_missing_file_prints_one_error_line_and_returns_1(test_catalogue, tmp_path, capsys):
    assert cli.main(["weights", "verify", "--dir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("stemsep: error: ") and "missing" in err and "stemsep models download test-model" in err


def test_cli_weights_download_then_verify_prints_the_paths(test_catalogue, tmp_path, capsys):
    expected = f"{tmp_path / 'model.ckpt'}\n{tmp_path / 'model.yaml'}\n"
    assert cli.main(["weights", "download", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == expected
    assert cli.main(["weights", "verify", "--dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out == expected
    assert err == ""


def test_cli_models_download_then_verify_then_list(test_catalogue, tmp_path, capsys, server):
    assert cli.main(["models", "download", "test-model", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'model.ckpt'}\n{tmp_path / 'model.yaml'}\n"
    assert cli.main(["models", "--dir", str(tmp_path), "verify"]) == 0  # every model with files in the folder
    out, err = capsys.readouterr()
    assert out == f"{tmp_path / 'model.ckpt'}\n{tmp_path / 'model.yaml'}\n" and err == ""
    assert cli.main(["models", "--dir", str(tmp_path)]) == 0
    rows = {line.split()[0]: line.split()[-1] for line in capsys.readouterr().out.splitlines()[1:3]}
    assert rows == {"test-model": "yes", "other-model": "no"}
    assert server.hits["/good/model.ckpt"] == 1


def test_cli_models_download_goes_on_after_a_failing_model_and_returns_1(test_catalogue, tmp_path, capsys):
    assert cli.main(["models", "download", "other-model", "test-model", "--dir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == f"{tmp_path / 'model.ckpt'}\n{tmp_path / 'model.yaml'}\n"
    assert err.count("\n") == 1 and err.startswith("stemsep: error: could not download other.ckpt: ")


def test_cli_models_download_checks_every_name_before_fetching_anything(test_catalogue, tmp_path, capsys, server):
    assert cli.main(["models", "download", "test-model", "no-such-model", "--dir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "stemsep: error: unknown model 'no-such-model'; the known models are test-model, other-model\n"
    assert sum(server.hits.values()) == 0


def test_cli_models_verify_names_the_corrupt_file(test_catalogue, tmp_path, capsys):
    (tmp_path / "model.ckpt").write_bytes(SAME_SIZE_WRONG)
    (tmp_path / "model.yaml").write_bytes(CONFIG)
    assert cli.main(["models", "verify", "test-model", "--dir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "does not match its sha256" in err and "stemsep models download test-model" in err


def test_cli_models_verify_with_nothing_downloaded_says_so(test_catalogue, tmp_path, capsys):
    assert cli.main(["models", "verify", "--dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (
        f"stemsep: error: no model is downloaded in {tmp_path}: download one first (stemsep models download NAME)\n"
    )


# first use -----------------------------------------------------------------------------------


@pytest.fixture
def tiny_catalogue(server, tmp_path, monkeypatch):
    """A catalogue whose one model, 'tiny' (the default), is a small real network served by
    the local server, behind a mirror that answers 404; the weights folder is empty."""
    from stemsep.testing import FAST_CONFIG, make_model_files

    ckpt, config = make_model_files(tmp_path / "made", FAST_CONFIG, mask=1.0, name="tiny")
    files = []
    for path in (ckpt, config):
        data = path.read_bytes()
        server.files[f"/tiny/{path.name}"] = data
        files.append(WeightFile(path.name, hashlib.sha256(data).hexdigest(), len(data),
                                (server.url(f"/missing/{path.name}"), server.url(f"/tiny/{path.name}")), dtype="fp32"))
    model = Model(name="tiny", title="tiny", architecture="bs_roformer", stems=("vocals", "instrumental"),
                  checkpoint=files[0], config=files[1], licence=None, scores=())
    monkeypatch.setattr(catalogue, "MODELS", {"tiny": model})
    monkeypatch.setattr(catalogue, "DEFAULT", "tiny")
    monkeypatch.setenv("STEMSEP_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.delenv(weights.OFFLINE_ENV, raising=False)
    return model


def test_model_files_downloads_a_missing_model_then_uses_it_as_it_is(tiny_catalogue, server, tmp_path):
    calls = []
    paths = weights.model_files("tiny", on_progress=lambda *a: calls.append(a))
    assert paths == tiny_catalogue.paths(tmp_path / "weights") and all(p.is_file() for p in paths)
    assert [c[2] for c in calls][-1] == tiny_catalogue.config.name and calls[-1][0] == calls[-1][1]
    assert server.hits[f"/tiny/{tiny_catalogue.checkpoint.name}"] == 1
    assert weights.model_files("tiny") == paths and server.hits[f"/tiny/{tiny_catalogue.checkpoint.name}"] == 1


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_offline_a_missing_model_is_one_sentence_and_no_request(tiny_catalogue, server, tmp_path, monkeypatch, how):
    from stemsep.catalogue import ModelNotDownloadedError

    if how == "environment":
        monkeypatch.setenv(weights.OFFLINE_ENV, "1")
    with pytest.raises(ModelNotDownloadedError) as info:
        weights.model_files("tiny", offline=True if how == "argument" else None)
    assert str(info.value) == (
        f"model tiny is not downloaded in {tmp_path / 'weights'}, and offline mode forbids downloading it"
    )
    assert sum(server.hits.values()) == 0 and not (tmp_path / "weights").exists()


def test_offline_false_overrides_the_environment(tiny_catalogue, monkeypatch):
    monkeypatch.setenv(weights.OFFLINE_ENV, "1")
    assert all(p.is_file() for p in weights.model_files("tiny", offline=False))


def test_separator_downloads_its_model_on_first_use_and_separates(tiny_catalogue, server):
    import numpy as np

    from stemsep.separator import Separator

    calls = []
    separator = Separator(model="tiny", device="cpu", download_progress=lambda *a: calls.append(a))
    assert {c[2] for c in calls} == {tiny_catalogue.checkpoint.name, tiny_catalogue.config.name}
    mix = np.random.default_rng(0).uniform(-0.5, 0.5, (2, 8000)).astype(np.float32)
    stems = separator.separate_array(mix, 44100)
    assert set(stems) == {"vocals", "instrumental"}
    np.testing.assert_allclose(stems["vocals"], mix, atol=1e-4)  # the constant mask 1 gives the mix back


def test_separator_offline_is_one_sentence(tiny_catalogue, server):
    from stemsep.catalogue import ModelNotDownloadedError
    from stemsep.separator import Separator

    with pytest.raises(ModelNotDownloadedError, match=r"^model tiny is not downloaded in .*, and offline mode forbids downloading it$"):
        Separator(model="tiny", device="cpu", offline=True)
    assert sum(server.hits.values()) == 0


def test_cli_separate_downloads_the_model_on_first_use(tiny_catalogue, server, tmp_path, capsys):
    import soundfile as sf

    from stemsep.testing import tones

    song = tmp_path / "song.wav"
    sf.write(song, tones(44100, 8000, 2).T, 44100)
    assert cli.main(["separate", str(song), "-o", str(tmp_path / "out"), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert out.split() == [str(tmp_path / "out" / "song_vocals.wav"), str(tmp_path / "out" / "song_instrumental.wav")]
    assert server.hits[f"/tiny/{tiny_catalogue.checkpoint.name}"] == 1


def test_cli_separate_offline_prints_one_sentence(tiny_catalogue, server, tmp_path, capsys):
    song = tmp_path / "song.wav"
    song.write_bytes(b"")
    assert cli.main(["separate", str(song), "--offline"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == (
        f"stemsep: error: model tiny is not downloaded in {tmp_path / 'weights'}, and offline mode forbids downloading it\n"
    )
    assert sum(server.hits.values()) == 0



@pytest.mark.parametrize("command", [["separate", "song.wav"], ["eval", "dataset"]])
def test_offline_is_an_option_of_the_commands_that_run_a_model(command):
    parser = cli.build_parser()
    assert parser.parse_args([*command, "--offline"]).offline is True
    assert parser.parse_args(command).offline is None  # then $STEMSEP_OFFLINE decides
