"""Fetching and checking the weights, against a real local HTTP server serving test bytes."""

from __future__ import annotations

import collections
import hashlib
import http.server
import os
import random
import signal
import threading
from pathlib import Path

import pytest

from stemsep import cli, weights
from stemsep.errors import WeightsDownloadError
from stemsep.weights import WeightFile

# 1.5 MiB so a download spans more than one 1 MiB block.
PAYLOAD = random.Random(1297).randbytes(3 * 2**19)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
CONFIG = b"audio:\n  sample_rate: 44100\n"
CONFIG_SHA = hashlib.sha256(CONFIG).hexdigest()
WRONG = b"these are not the weights you are looking for\n" * 1000


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 whose handler counts requests per path."""

    def __init__(self) -> None:
        self.hits: collections.Counter[str] = collections.Counter()
        self.release = threading.Event()  # lets stalled handlers finish at teardown
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, body: bytes, length: int | None = None) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                server.hits[self.path] += 1
                if self.path in ("/good/model.ckpt", "/other/model.ckpt"):
                    self._send(PAYLOAD)
                elif self.path == "/good/model.yaml":
                    self._send(CONFIG)
                elif self.path == "/wrong/model.ckpt":
                    self._send(WRONG)
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
        return WeightFile("model.ckpt", PAYLOAD_SHA, tuple(self.url(f"/{m}/model.ckpt") for m in mirrors))

    def yaml(self) -> WeightFile:
        return WeightFile("model.yaml", CONFIG_SHA, (self.url("/missing/model.yaml"), self.url("/good/model.yaml")))


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
    return sorted(p.name for p in directory.iterdir())


# the published files ----------------------------------------------------------------------


def test_weight_files_hold_the_published_sha256_and_mirror_order():
    ckpt, yaml = weights.WEIGHT_FILES
    assert ckpt.name == "model_bs_roformer_ep_317_sdr_12.9755.ckpt"
    assert ckpt.sha256 == "5b84f37e8d444c8cb30c79d77f613a41c05868ff9c9ac6c7049c00aefae115aa"
    assert ckpt.urls == (
        "https://github.com/TRvlvr/model_repo/releases/download/all_public_uvr_models/"
        "model_bs_roformer_ep_317_sdr_12.9755.ckpt",
        "https://github.com/nomadkaraoke/python-audio-separator/releases/download/model-configs/"
        "model_bs_roformer_ep_317_sdr_12.9755.ckpt",
    )
    assert yaml.name == "model_bs_roformer_ep_317_sdr_12.9755.yaml"
    assert yaml.sha256 == "2bfdd16c656bd9519aba757cc4f8834b7ede675eb1e00ec4772d74ae1c41af7f"
    assert yaml.urls == (
        "https://github.com/TRvlvr/model_repo/releases/download/all_public_uvr_models/"
        "mdx_model_data/mdx_c_configs/model_bs_roformer_ep_317_sdr_12.9755.yaml",
        "https://github.com/nomadkaraoke/python-audio-separator/releases/download/model-configs/"
        "model_bs_roformer_ep_317_sdr_12.9755.yaml",
    )


def test_default_dir_follows_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("STEMSEP_WEIGHTS_DIR", str(tmp_path / "w"))
    assert weights.default_dir() == tmp_path / "w"


def test_default_dir_is_weights_at_the_checkout_root(monkeypatch):
    monkeypatch.delenv("STEMSEP_WEIGHTS_DIR", raising=False)
    repo_root = Path(__file__).resolve().parents[1]
    assert weights.default_dir() == repo_root / "weights"


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(PAYLOAD)
    assert weights.sha256_file(path) == PAYLOAD_SHA


# download ---------------------------------------------------------------------------------


def test_download_falls_through_404_and_wrong_bytes_to_the_good_mirror(server, tmp_path):
    directory = tmp_path / "new" / "weights"  # created on demand
    paths = weights.download(directory, [server.ckpt("missing", "wrong", "good"), server.yaml()], progress=False)
    assert paths == [directory / "model.ckpt", directory / "model.yaml"]
    assert paths[0].read_bytes() == PAYLOAD
    assert paths[1].read_bytes() == CONFIG
    assert server.hits == {
        "/missing/model.ckpt": 1, "/wrong/model.ckpt": 1, "/good/model.ckpt": 1,
        "/missing/model.yaml": 1, "/good/model.yaml": 1,
    }
    assert _leftovers(directory) == ["model.ckpt", "model.yaml"]


def test_all_mirrors_failing_raises_one_sentence_and_leaves_nothing(server, tmp_path):
    with pytest.raises(WeightsDownloadError) as info:
        weights.download(tmp_path, [server.ckpt("missing", "wrong")], progress=False)
    message = str(info.value)
    assert message == (
        f"could not download model.ckpt: {server.url('/missing/model.ckpt')}: HTTP 404; "
        f"{server.url('/wrong/model.ckpt')}: sha256 mismatch "
        f"(got {hashlib.sha256(WRONG).hexdigest()[:8]}…, expected {PAYLOAD_SHA[:8]}…)"
    )
    assert "\n" not in message
    assert _leftovers(tmp_path) == []


def test_existing_verified_file_is_not_fetched_again(server, tmp_path):
    files = [server.ckpt("good")]
    weights.download(tmp_path, files, progress=False)
    assert server.hits["/good/model.ckpt"] == 1
    assert weights.download(tmp_path, files, progress=False) == [tmp_path / "model.ckpt"]
    assert server.hits["/good/model.ckpt"] == 1


def test_existing_corrupt_file_is_replaced(server, tmp_path):
    (tmp_path / "model.ckpt").write_bytes(PAYLOAD[:-1] + b"!")
    weights.download(tmp_path, [server.ckpt("good")], progress=False)
    assert (tmp_path / "model.ckpt").read_bytes() == PAYLOAD
    assert server.hits["/good/model.ckpt"] == 1
    assert _leftovers(tmp_path) == ["model.ckpt"]


def test_connection_dropped_mid_body_is_a_failure_and_leaves_nothing(server, tmp_path):
    with pytest.raises(WeightsDownloadError, match=r"truncated/model\.ckpt: connection closed early"):
        weights.download(tmp_path, [server.ckpt("truncated")], progress=False)
    assert _leftovers(tmp_path) == []


def test_connection_dropped_mid_body_moves_on_to_the_next_mirror(server, tmp_path):
    weights.download(tmp_path, [server.ckpt("truncated", "other")], progress=False)
    assert (tmp_path / "model.ckpt").read_bytes() == PAYLOAD
    assert _leftovers(tmp_path) == ["model.ckpt"]


def test_stalled_server_times_out_and_leaves_nothing(server, tmp_path):
    with pytest.raises(WeightsDownloadError, match=r"stall/model\.ckpt: timed out"):
        weights.download(tmp_path, [server.ckpt("stall")], progress=False, timeout=0.3)
    assert _leftovers(tmp_path) == []


def test_refused_connection_is_a_failure(server, tmp_path):
    server.httpd.shutdown()
    server.httpd.server_close()  # the port now refuses connections
    with pytest.raises(WeightsDownloadError, match=r"could not download model\.ckpt: .*good/model\.ckpt: "):
        weights.download(tmp_path, [server.ckpt("good")], progress=False, timeout=2)
    assert _leftovers(tmp_path) == []


def test_ctrl_c_mid_download_leaves_no_partial_file(server, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        weights.download(tmp_path, [server.ckpt("interrupt")], progress=False, timeout=5)
    assert _leftovers(tmp_path) == []


def test_progress_bar_goes_to_stderr_only_when_asked(server, tmp_path, capsys):
    weights.download(tmp_path / "a", [server.ckpt("good")], progress=False)
    assert capsys.readouterr().err == ""
    weights.download(tmp_path / "b", [server.ckpt("good")], progress=True)
    assert "model.ckpt" in capsys.readouterr().err


# verify -----------------------------------------------------------------------------------


def test_verify_returns_the_paths_of_good_files(server, tmp_path):
    (tmp_path / "model.ckpt").write_bytes(PAYLOAD)
    (tmp_path / "model.yaml").write_bytes(CONFIG)
    files = [server.ckpt("good"), server.yaml()]
    assert weights.verify(tmp_path, files) == [tmp_path / "model.ckpt", tmp_path / "model.yaml"]
    assert sum(server.hits.values()) == 0  # verify never touches the network


def test_verify_names_a_missing_file_and_says_how_to_fetch_it(server, tmp_path):
    with pytest.raises(WeightsDownloadError) as info:
        weights.verify(tmp_path, [server.ckpt("good")])
    assert str(info.value) == f"{tmp_path / 'model.ckpt'} is missing: run `stemsep weights download` to fetch it"


def test_verify_names_a_corrupt_file_with_both_hashes(server, tmp_path):
    (tmp_path / "model.ckpt").write_bytes(WRONG)
    with pytest.raises(WeightsDownloadError) as info:
        weights.verify(tmp_path, [server.ckpt("good")])
    message = str(info.value)
    assert str(tmp_path / "model.ckpt") in message
    assert f"got {hashlib.sha256(WRONG).hexdigest()}, expected {PAYLOAD_SHA}" in message


# the command line -------------------------------------------------------------------------


def test_cli_verify_missing_file_prints_one_error_line_and_returns_1(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(weights, "WEIGHT_FILES", (server.ckpt("good"),))
    assert cli.main(["weights", "verify", "--dir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("stemsep: error: ") and "missing" in err and "stemsep weights download" in err


def test_cli_download_then_verify_prints_the_paths(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(weights, "WEIGHT_FILES", (server.ckpt("missing", "good"), server.yaml()))
    expected = f"{tmp_path / 'model.ckpt'}\n{tmp_path / 'model.yaml'}\n"
    assert cli.main(["weights", "download", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == expected
    assert cli.main(["weights", "verify", "--dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out == expected
    assert err == ""
