"""`stemsep.remote` against the real `replicate` SDK pointed at a local server that records
what the SDK sends (the calls are checked on the wire, not inside our wrapper), and the one
naming rule that tells a prediction's outputs apart, for any model and any stems."""

from __future__ import annotations

import base64
import collections
import http.server
import io
import json
import re
import threading
import warnings
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

import pytest

from stemsep import catalogue, cli, remote
from stemsep.errors import RemoteError

REPO = Path(__file__).resolve().parents[1]
TS_OUTPUTS = REPO / "clients" / "typescript" / "src" / "outputs.ts"
TOKEN = "r8_test_token"
MODEL = "ryansmith/bs-roformer"


def stem_bytes(stem: str) -> bytes:
    """What the fake serves for a stem: different bytes for every stem."""
    return f"RIFF-{stem}-".encode() + bytes(range(256)) * 64


VOCALS, INSTRUMENTAL = stem_bytes("vocals"), stem_bytes("instrumental")


class FakeReplicate:
    """Answers the Replicate HTTP API calls the SDK makes, records every request, and serves
    the output files. A prediction starts, is `processing` on the first poll, then ends.

    Its outputs are what predict.py returns: one `<song>_<stem>.wav` per stem of the
    catalogue model that the `model` input names (1297 by default), only those that the
    `stems` input asks for, in the model's order (`stems` overrides that list). `style` "data"
    gives data URLs, which carry no name; `reverse` lists them the other way round, as
    Replicate can when the uploads finish in another order."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.predictions: dict[str, dict] = {}
        self.polls: collections.Counter[str] = collections.Counter()
        self.outcome = "succeeded"  # or "failed", "aborted"
        self.style = "named"
        self.reverse = False
        self.stems: list[str] | None = None
        self.files: dict[str, str] = {}  # path of each output file served -> its stem
        self.lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _reply(self, status: int, payload, content_type: str = "application/json") -> None:
                body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with fake.lock:
                    fake.requests.append(
                        {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
                    )
                if self.path.startswith("/files/"):
                    stem = fake.files.get(self.path)
                    return self._reply(200, stem_bytes(stem), "audio/wav") if stem else self._reply(404, {"detail": "no file"})
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._reply(401, {"title": "Unauthenticated", "detail": "You did not pass a valid authentication token", "status": 401})
                if self.command == "POST" and self.path == "/v1/files":
                    return self._reply(201, {
                        "id": "file123", "name": "upload", "content_type": "audio/wav", "size": len(body),
                        "etag": "e", "checksums": {}, "metadata": {}, "created_at": "2025-01-01T00:00:00Z",
                        "expires_at": None, "urls": {"get": "https://api.replicate.com/v1/files/file123"},
                    })
                if self.command == "POST" and (self.path == "/v1/predictions" or self.path.endswith("/predictions")):
                    request = json.loads(body)
                    pid = f"pred{len(fake.predictions) + 1:04d}"
                    prediction = {
                        "id": pid, "model": MODEL, "version": request.get("version", "v1"), "status": "starting",
                        "input": request.get("input"), "output": None, "error": None, "logs": "",
                        "urls": {"get": f"{fake.url}/v1/predictions/{pid}", "cancel": f"{fake.url}/v1/predictions/{pid}/cancel"},
                    }
                    fake.predictions[pid] = prediction
                    return self._reply(201, prediction)
                if self.command == "GET" and self.path.startswith("/v1/predictions/"):
                    pid = self.path.rsplit("/", 1)[-1]
                    prediction = fake.predictions[pid]
                    fake.polls[pid] += 1
                    if fake.polls[pid] == 1:
                        prediction["status"] = "processing"
                    elif fake.outcome == "succeeded":
                        prediction.update(status="succeeded", metrics={"predict_time": 1.5}, output=fake.outputs(prediction))
                    else:
                        prediction.update(status=fake.outcome, error="ValueError: song.mp3: not an audio file\nTraceback ...")
                    return self._reply(200, prediction)
                return self._reply(404, {"detail": f"no route {self.command} {self.path}"})

            do_GET = do_POST = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def outputs(self, prediction: dict) -> list[str]:
        inputs = prediction["input"]
        stems = self.stems or catalogue.get(inputs.get("model", catalogue.DEFAULT)).stems
        if inputs.get("stems"):
            stems = [s for s in stems if s in inputs["stems"].split(",")]
        audio = inputs["audio"]
        song = Path(unquote(urlparse(audio).path)).stem if audio.startswith("http") else "audio"
        if self.style == "data":
            urls = ["data:audio/wav;base64," + base64.b64encode(stem_bytes(stem)).decode() for stem in stems]
        else:
            paths = {f"/files/{prediction['id']}/{quote(song)}_{stem}.wav": stem for stem in stems}
            self.files.update(paths)
            urls = [self.url + path for path in paths]
        return urls[::-1] if self.reverse else urls

    def api_requests(self) -> list[dict]:
        return [r for r in self.requests if r["path"].startswith("/v1/")]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api(monkeypatch):
    fake = FakeReplicate()
    monkeypatch.setenv("REPLICATE_POLL_INTERVAL", "0.01")
    monkeypatch.delenv("REPLICATE_API_TOKEN", raising=False)
    monkeypatch.delenv("REPLICATE_MODEL", raising=False)
    monkeypatch.delenv("REPLICATE_BASE_URL", raising=False)
    yield fake
    fake.close()


@pytest.fixture
def song(tmp_path) -> Path:
    path = tmp_path / "song.wav"
    path.write_bytes(b"RIFF" + bytes(1000))
    return path


def _create_request(api: FakeReplicate) -> dict:
    creates = [r for r in api.api_requests() if r["method"] == "POST" and r["path"].endswith("predictions")]
    assert len(creates) == 1
    return creates[0]


# separate (replicate.run) ------------------------------------------------------------------


def test_separate_with_a_url_creates_a_model_prediction_waits_and_returns_both_stem_urls(api):
    stems = remote.separate("https://example.com/song.mp3", replicate_model=MODEL, api_token=TOKEN, base_url=api.url)

    assert stems == {"vocals": f"{api.url}/files/pred0001/song_vocals.wav",
                     "instrumental": f"{api.url}/files/pred0001/song_instrumental.wav"}
    create = _create_request(api)
    assert create["path"] == f"/v1/models/{MODEL}/predictions"
    assert json.loads(create["body"]) == {"input": {"audio": "https://example.com/song.mp3"}}
    assert create["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert create["headers"]["Prefer"] == "wait"  # replicate.run's blocking create
    polls = [r for r in api.api_requests() if r["method"] == "GET"]
    assert [r["path"] for r in polls] == ["/v1/predictions/pred0001"] * 2
    assert not any(r["path"] == "/v1/files" for r in api.requests)


def test_separate_uploads_a_local_file_and_passes_its_url(api, song):
    remote.separate(song, replicate_model=MODEL, api_token=TOKEN, base_url=api.url)

    upload, create = api.api_requests()[:2]
    assert (upload["method"], upload["path"]) == ("POST", "/v1/files")
    assert upload["headers"]["Content-Type"].startswith("multipart/form-data")
    assert b'filename="song.wav"' in upload["body"] and song.read_bytes() in upload["body"]
    assert json.loads(create["body"])["input"] == {"audio": "https://api.replicate.com/v1/files/file123"}


def test_separate_uploads_an_open_file_from_its_start(api, song):
    with open(song, "rb") as f:
        f.read(10)
        remote.separate(f, replicate_model=MODEL, api_token=TOKEN, base_url=api.url)
    upload = api.api_requests()[0]
    assert upload["path"] == "/v1/files" and song.read_bytes() in upload["body"]


def test_extra_keyword_arguments_are_model_inputs(api):
    remote.separate("https://example.com/a.wav", replicate_model=MODEL, api_token=TOKEN, base_url=api.url,
                    input={"output_format": "flac"}, overlap=2)
    assert json.loads(_create_request(api)["body"])["input"] == {
        "audio": "https://example.com/a.wav", "output_format": "flac", "overlap": 2,
    }


def test_the_model_input_passes_through_and_names_the_karaoke_stems(api, tmp_path):
    stems = remote.separate("https://example.com/song.mp3", replicate_model=MODEL, api_token=TOKEN, base_url=api.url,
                            input={"model": "karaoke"})
    assert json.loads(_create_request(api)["body"])["input"] == {"audio": "https://example.com/song.mp3", "model": "karaoke"}
    assert stems == {"karaoke": f"{api.url}/files/pred0001/song_karaoke.wav", "other": f"{api.url}/files/pred0001/song_other.wav"}
    paths = remote.download_stems(stems, tmp_path, "song")
    assert paths == {"karaoke": tmp_path / "song_karaoke.wav", "other": tmp_path / "song_other.wav"}
    assert paths["karaoke"].read_bytes() == stem_bytes("karaoke") and paths["other"].read_bytes() == stem_bytes("other")


def test_model_as_a_keyword_is_the_model_input_beside_replicate_model(api):
    stems = remote.separate("https://example.com/song.mp3", replicate_model=MODEL, api_token=TOKEN, base_url=api.url,
                            model="karaoke", stems="other")
    assert json.loads(_create_request(api)["body"])["input"]["model"] == "karaoke"
    assert list(stems) == ["other"]


def test_the_old_model_keyword_still_names_the_replicate_model_with_a_deprecation_warning(api, song):
    with pytest.warns(DeprecationWarning, match="replicate_model="):
        stems = remote.separate("https://example.com/a.wav", model=MODEL, api_token=TOKEN, base_url=api.url)
    assert list(stems) == ["vocals", "instrumental"]
    with pytest.warns(DeprecationWarning):
        remote.submit(song, "https://h/webhooks/replicate", model=f"{MODEL}:abc123", api_token=TOKEN, base_url=api.url)
    creates = [r for r in api.api_requests() if r["method"] == "POST" and r["path"].endswith("predictions")]
    assert [r["path"] for r in creates] == [f"/v1/models/{MODEL}/predictions", "/v1/predictions"]
    assert all("model" not in json.loads(r["body"])["input"] for r in creates)


def test_a_model_keyword_that_is_no_replicate_model_is_an_input_without_a_warning(api, monkeypatch):
    monkeypatch.setenv("REPLICATE_MODEL", MODEL)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        stems = remote.separate("https://example.com/a.wav", api_token=TOKEN, base_url=api.url, model="karaoke")
    assert list(stems) == ["karaoke", "other"]
    with pytest.raises(RemoteError, match="model input 'model' is given twice"):
        remote.separate("https://example.com/a.wav", api_token=TOKEN, base_url=api.url, model="karaoke", input={"model": "1297"})


def test_a_pinned_version_creates_the_prediction_by_version(api):
    remote.separate("https://example.com/a.wav", replicate_model=f"{MODEL}:abc123", api_token=TOKEN, base_url=api.url)
    create = _create_request(api)
    assert create["path"] == "/v1/predictions"
    assert json.loads(create["body"]) == {"input": {"audio": "https://example.com/a.wav"}, "version": "abc123"}


def test_model_token_and_base_url_come_from_the_environment(api, monkeypatch):
    monkeypatch.setenv("REPLICATE_MODEL", MODEL)
    monkeypatch.setenv("REPLICATE_API_TOKEN", TOKEN)
    monkeypatch.setenv("REPLICATE_BASE_URL", api.url)
    assert set(remote.separate("https://example.com/a.wav")) == {"vocals", "instrumental"}
    create = _create_request(api)
    assert create["path"] == f"/v1/models/{MODEL}/predictions"
    assert create["headers"]["Authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize("outcome", ["failed", "aborted"])
def test_a_prediction_that_ends_otherwise_raises_the_first_line_of_its_error(api, outcome):
    """`aborted` is terminal too (the SDK cannot parse it: the raw answer is read)."""
    api.outcome = outcome
    with pytest.raises(RemoteError) as caught:
        remote.separate("https://example.com/a.wav", replicate_model=MODEL, api_token=TOKEN, base_url=api.url)
    assert str(caught.value) == f"prediction pred0001 {outcome}: ValueError: song.mp3: not an audio file"


def test_a_rejected_token_is_a_one_sentence_error(api):
    with pytest.raises(RemoteError, match=r"HTTP 401\): You did not pass a valid authentication token"):
        remote.separate("https://example.com/a.wav", replicate_model=MODEL, api_token="r8_wrong", base_url=api.url)


def test_an_unreachable_api_is_a_clear_error(api):
    api.close()
    with pytest.raises(RemoteError, match="could not reach the Replicate API"):
        remote.separate("https://example.com/a.wav", replicate_model=MODEL, api_token=TOKEN, base_url=api.url)


# submit (predictions.create with a webhook) ----------------------------------------------


def test_submit_sends_the_webhook_with_the_completed_filter_and_returns_the_id_without_waiting(api, song):
    pid = remote.submit(song, "https://api.fretwise.ai/webhooks/replicate", replicate_model=MODEL, api_token=TOKEN, base_url=api.url)

    assert pid == "pred0001"
    create = _create_request(api)
    assert create["path"] == f"/v1/models/{MODEL}/predictions"
    assert json.loads(create["body"]) == {
        "input": {"audio": "https://api.replicate.com/v1/files/file123"},
        "webhook": "https://api.fretwise.ai/webhooks/replicate",
        "webhook_events_filter": ["completed"],
    }
    assert "Prefer" not in create["headers"]
    assert not any(r["method"] == "GET" for r in api.api_requests())


def test_submit_refuses_a_webhook_that_is_not_http(api):
    with pytest.raises(RemoteError, match="not an http"):
        remote.submit("https://example.com/a.wav", "ftp://x/hook", replicate_model=MODEL, api_token=TOKEN, base_url=api.url)
    assert api.requests == []


# errors before any request -----------------------------------------------------------------


@pytest.mark.parametrize("call", ["separate", "submit"])
def test_a_missing_token_is_a_clear_error_and_sends_nothing(api, song, call):
    args = (song, "https://h/webhooks/replicate") if call == "submit" else (song,)
    with pytest.raises(RemoteError, match=r"no Replicate API token: pass one or set REPLICATE_API_TOKEN"):
        getattr(remote, call)(*args, replicate_model=MODEL, base_url=api.url)
    assert api.requests == []


def test_a_missing_model_is_a_clear_error(api, song):
    with pytest.raises(RemoteError, match=r"no Replicate model given.*REPLICATE_MODEL"):
        remote.separate(song, api_token=TOKEN, base_url=api.url)
    with pytest.raises(RemoteError, match="not of the form owner/name"):
        remote.separate(song, replicate_model="bs-roformer", api_token=TOKEN, base_url=api.url)
    assert api.requests == []


def test_a_local_file_over_100_mb_is_refused_with_a_hint_to_pass_a_url(api, tmp_path):
    big = tmp_path / "long-mix.wav"
    with open(big, "wb") as f:
        f.truncate(remote.MAX_UPLOAD_BYTES + 1)  # sparse: no 100 MB written
    for audio in (big, str(big)):
        with pytest.raises(RemoteError, match=r"long-mix\.wav: 100 MB is over Replicate's 100 MB upload limit.*URL"):
            remote.separate(audio, replicate_model=MODEL, api_token=TOKEN, base_url=api.url)
    with open(big, "rb") as f, pytest.raises(RemoteError, match="upload limit"):
        remote.submit(f, "https://h/webhooks/replicate", replicate_model=MODEL, api_token=TOKEN, base_url=api.url)
    assert api.requests == []


def test_a_file_exactly_at_the_cap_is_uploaded(api, tmp_path):
    edge = tmp_path / "edge.wav"
    with open(edge, "wb") as f:
        f.truncate(remote.MAX_UPLOAD_BYTES)
    assert remote.audio_input(edge) == edge


def test_a_missing_local_file_is_named(api, tmp_path):
    with pytest.raises(RemoteError, match="nope.wav: no such file"):
        remote.separate(tmp_path / "nope.wav", replicate_model=MODEL, api_token=TOKEN, base_url=api.url)


# outputs and downloads ---------------------------------------------------------------------


def test_stem_urls_rejects_what_is_not_a_list_of_urls():
    for bad in (None, "https://a/v.wav", [], [1, 2], {"../x": "https://a/v.wav"}, {"vocals": 3}):  # not a path
        with pytest.raises(RemoteError, match="output"):
            remote.stem_urls(bad)


def test_stem_urls_identifies_stems_by_file_name_before_position():
    """On Replicate the list follows upload completion, so it can arrive swapped: the file
    names decide, the model's documented order only when they cannot."""
    vocals = "https://replicate.delivery/xz/abc/my_song_vocals.flac"
    instrumental = "https://replicate.delivery/xz/def/my_song_instrumental.flac"
    expected = {"vocals": vocals, "instrumental": instrumental}
    assert remote.stem_urls([instrumental, vocals]) == expected  # swapped
    assert remote.stem_urls((vocals, instrumental)) == expected
    assert list(remote.stem_urls([instrumental, vocals])) == ["vocals", "instrumental"]  # the model's order
    # a name that itself contains a stem word: only the suffix counts
    tricky = ["https://a/x/vocals_and_more_instrumental.wav", "https://a/y/instrumental_mix_vocals.wav?sig=1"]
    assert remote.stem_urls(tricky) == {"vocals": tricky[1], "instrumental": tricky[0]}
    assert remote.stem_urls(["https://a/x/my%20song_instrumental.wav", "https://a/y/my%20song_vocals.wav"])["vocals"].endswith("_vocals.wav")
    # names that do not tell both apart: the default model's order
    for pair in (
        ["data:audio/wav;base64,AAAA", "data:audio/wav;base64,BBBB"],
        ["https://a/v.wav", "https://a/i.wav"],
        ["https://a/b_vocals.wav", "https://a/c_vocals.wav"],
        ["https://a/out.wav", "https://a/b_vocals.wav"],
        ["https://a/b_vocals.wav/x.wav", "https://a/c_instrumental.wav/y.wav"],  # only the file name counts
    ):
        assert remote.stem_urls(pair) == {"vocals": pair[0], "instrumental": pair[1]}
    # an explicit mapping is taken as it is
    assert remote.stem_urls({"vocals": instrumental, "instrumental": vocals}) == {"vocals": instrumental, "instrumental": vocals}


def test_stem_urls_for_any_model_and_any_stems():
    karaoke = ["https://r.delivery/b/take_2_other.wav", "https://r.delivery/a/take_2_karaoke.wav"]
    assert remote.stem_urls(karaoke, {"model": "karaoke"}) == {"karaoke": karaoke[1], "other": karaoke[0]}
    four = [f"https://r.delivery/{s}/my_song_{s}.flac" for s in ("vocals", "other", "bass", "drums")]
    assert list(remote.stem_urls(four, {"model": "4stem"})) == ["drums", "bass", "other", "vocals"]
    one = ["https://r.delivery/a/song_instrumental.wav"]
    assert remote.stem_urls(one, {"stems": "instrumental"}) == {"instrumental": one[0]}
    practice = ["https://r.delivery/a/my_song_no_guitar.wav", "https://r.delivery/b/my_song_guitar.wav"]
    assert remote.stem_urls(practice, {"model": "some-guitar-model"}) == {"no_guitar": practice[0], "guitar": practice[1]}


def test_unnamed_outputs_take_the_documented_order_or_fail_in_one_sentence():
    data = [f"data:audio/wav;base64,{n}" for n in ("AA", "BB", "CC")]
    assert remote.stem_urls(data[:2], {"model": "karaoke"}) == {"karaoke": data[0], "other": data[1]}
    assert remote.stem_urls(data[:1], {"model": "karaoke", "stems": "other"}) == {"other": data[0]}
    assert remote.stem_urls(data[:2], {"model": "4stem", "stems": "vocals, drums"}) == {"drums": data[0], "vocals": data[1]}
    for inputs, reason in (
        ({"model": "someone-else"}, "model 'someone-else' is not in the catalogue, so its stem order is unknown"),
        ({}, "model '1297' documents 2 of them, not 3"),
    ):
        with pytest.raises(RemoteError) as caught:
            remote.stem_urls(data, inputs)
        message = str(caught.value)
        assert message == f"cannot tell which stem each of the prediction's 3 outputs is: their file names do not say and {reason}"


@pytest.mark.parametrize("name, known, stem", [
    ("song_vocals.WAV", None, "vocals"),
    ("my_song_drums.flac", None, "drums"),
    ("my_song_no_guitar.wav", None, "no_guitar"),  # a practice track
    ("My Song_No_Guitar.wav", None, "no_guitar"),
    ("my_song_lead_vocals.wav", None, "vocals"),  # unknown stems: the last part
    ("my_song_lead_vocals.wav", ("vocals", "lead_vocals"), "lead_vocals"),  # known: the longest
    ("my_song_acoustic_guitar.mp3", ("guitar", "acoustic_guitar", "no_acoustic_guitar"), "acoustic_guitar"),
    ("my_song_no_acoustic_guitar.mp3", ("guitar", "acoustic_guitar", "no_acoustic_guitar"), "no_acoustic_guitar"),
    ("no_guitar_karaoke.wav", ("karaoke", "other"), "karaoke"),
    ("song_other.wav", ("karaoke", "other", "no_karaoke", "no_other"), "other"),
    ("vocals.wav", ("vocals",), None),  # no song before the stem
    ("song_vocals", None, None),  # no extension
    ("song_voc@ls.wav", None, None),
])
def test_file_stem(name, known, stem):
    assert remote.file_stem(name, known) == stem


def test_known_and_expected_stems_come_from_the_catalogue():
    assert remote.known_stems() == ("vocals", "instrumental", "no_vocals", "no_instrumental")
    assert remote.known_stems({"model": "karaoke"})[:2] == catalogue.get("karaoke").stems
    assert remote.expected_stems({"model": "4stem", "stems": "vocals,bass"}) == ("bass", "vocals")
    assert remote.known_stems({"model": "x"}) is remote.expected_stems({"model": "x"}) is None


def test_url_stem():
    assert remote.url_stem("https://replicate.delivery/x/song_vocals.WAV?sig=1") == "vocals"
    assert remote.url_stem("https://replicate.delivery/x/song_instrumental.flac") == "instrumental"
    assert remote.url_stem("https://replicate.delivery/x/my%20song_no_guitar.wav") == "no_guitar"
    assert remote.url_stem("https://replicate.delivery/x/vocals.wav") is None  # no `<name>_` before it
    assert remote.url_stem("https://replicate.delivery/x/song_vocals") is None
    assert remote.url_stem("data:audio/wav;base64,AAAA") is None


def test_the_typescript_client_has_the_same_terminal_statuses():
    """(Its stems of each model are written from the catalogue's data file when it is built.)"""
    match = re.search(r"export const TERMINAL_STATUSES\b[^=]*=\s*(.+?)(?: as const)?;\n", TS_OUTPUTS.read_text())
    assert match, f"TERMINAL_STATUSES is not in {TS_OUTPUTS}"
    assert tuple(json.loads(match[1])) == remote.TERMINAL_STATUSES


def test_url_extension():
    assert remote.url_extension("https://replicate.delivery/x/vocals.WAV?sig=1") == "wav"
    assert remote.url_extension("data:audio/x-wav;base64,AAAA") == "wav"
    assert remote.url_extension("data:audio/flac;base64,AAAA") == "flac"
    assert remote.url_extension("https://replicate.delivery/x/out") == "bin"


def test_download_decodes_a_data_url(tmp_path):
    url = "data:audio/wav;base64," + base64.b64encode(VOCALS).decode()
    assert remote.download(url, tmp_path / "v.wav").read_bytes() == VOCALS


def test_download_does_not_retry_a_404_and_leaves_nothing_behind(api, tmp_path):
    with pytest.raises(RemoteError, match="HTTP 404"):
        remote.download(f"{api.url}/files/gone.wav", tmp_path / "gone.wav", retry=remote.RetryPolicy(backoff=0.01))
    assert [r["path"] for r in api.requests] == ["/files/gone.wav"]
    assert list(tmp_path.iterdir()) == []


def test_download_gives_up_after_its_attempts_on_a_dead_server(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    port = server.server_address[1]
    server.server_close()  # nothing listens there now
    with pytest.raises(RemoteError, match="after 3 attempts"):
        remote.download(f"http://127.0.0.1:{port}/v.wav", tmp_path / "v.wav", retry=remote.RetryPolicy(attempts=3, backoff=0.01))
    assert list(tmp_path.iterdir()) == []


# the CLI -----------------------------------------------------------------------------------


def test_cli_remote_downloads_both_stems(api, song, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REPLICATE_API_TOKEN", TOKEN)
    monkeypatch.setenv("REPLICATE_BASE_URL", api.url)
    out = tmp_path / "stems"
    assert cli.main(["remote", str(song), "-o", str(out), "--model", MODEL, "-i", "overlap=2"]) == 0
    assert (out / "song_vocals.wav").read_bytes() == VOCALS
    assert (out / "song_instrumental.wav").read_bytes() == INSTRUMENTAL
    assert capsys.readouterr().out.split() == [str(out / "song_vocals.wav"), str(out / "song_instrumental.wav")]
    assert json.loads(_create_request(api)["body"])["input"]["overlap"] == 2


@pytest.fixture
def cli_env(api, monkeypatch):
    monkeypatch.setenv("REPLICATE_API_TOKEN", TOKEN)
    monkeypatch.setenv("REPLICATE_BASE_URL", api.url)
    return api


def test_cli_remote_passes_the_model_input_and_saves_the_karaoke_stems(cli_env, tmp_path, capsys):
    out = tmp_path / "stems"
    args = ["remote", "https://example.com/song.mp3", "-o", str(out), "--model", MODEL, "-i", "model=karaoke"]
    assert cli.main(args) == 0
    assert capsys.readouterr().out.split() == [str(out / "song_karaoke.wav"), str(out / "song_other.wav")]
    assert (out / "song_karaoke.wav").read_bytes() == stem_bytes("karaoke")
    assert (out / "song_other.wav").read_bytes() == stem_bytes("other")
    create = _create_request(cli_env)
    assert create["path"] == f"/v1/models/{MODEL}/predictions"  # --model is still the Replicate model
    assert json.loads(create["body"])["input"] == {"audio": "https://example.com/song.mp3", "model": "karaoke"}


@pytest.mark.parametrize("style", ["named", "data"])
def test_cli_remote_with_one_stem_chosen_saves_one_file(cli_env, tmp_path, capsys, style):
    cli_env.style = style
    out = tmp_path / "stems"
    assert cli.main(["remote", "https://example.com/song.mp3", "-o", str(out), "--model", MODEL, "-i", "stems=instrumental"]) == 0
    assert capsys.readouterr().out.split() == [str(out / "song_instrumental.wav")]
    assert sorted(p.name for p in out.iterdir()) == ["song_instrumental.wav"]
    assert (out / "song_instrumental.wav").read_bytes() == INSTRUMENTAL


def test_cli_remote_data_url_outputs_take_the_documented_order(cli_env, tmp_path, capsys):
    cli_env.style = "data"
    out = tmp_path / "stems"
    assert cli.main(["remote", "https://example.com/song.mp3", "-o", str(out), "--model", MODEL, "-i", "model=karaoke"]) == 0
    assert (out / "song_karaoke.wav").read_bytes() == stem_bytes("karaoke")
    assert (out / "song_other.wav").read_bytes() == stem_bytes("other")


def test_cli_remote_unnamed_outputs_of_an_unknown_model_fail_in_one_line(cli_env, tmp_path, capsys):
    cli_env.style, cli_env.stems = "data", ["left", "right"]
    out = tmp_path / "stems"
    assert cli.main(["remote", "https://example.com/song.mp3", "-o", str(out), "--model", MODEL, "-i", "model=stereo-split"]) == 1
    err = capsys.readouterr().err
    assert err == ("stemsep: error: cannot tell which stem each of the prediction's 2 outputs is: their file names do not "
                   "say and model 'stereo-split' is not in the catalogue, so its stem order is unknown\n")
    assert not out.exists() or not list(out.iterdir())


def test_cli_remote_names_stems_by_file_name_whatever_the_order(cli_env, tmp_path, capsys):
    cli_env.reverse = True
    out = tmp_path / "stems"
    assert cli.main(["remote", "https://example.com/song.mp3", "-o", str(out), "--model", MODEL]) == 0
    assert (out / "song_vocals.wav").read_bytes() == VOCALS
    assert (out / "song_instrumental.wav").read_bytes() == INSTRUMENTAL


def test_cli_remote_with_a_webhook_prints_the_prediction_id(api, monkeypatch, capsys):
    monkeypatch.setenv("REPLICATE_BASE_URL", api.url)
    monkeypatch.setenv("REPLICATE_MODEL", MODEL)
    args = ["remote", "https://example.com/long.wav", "--token", TOKEN, "--webhook", "https://h/webhooks/replicate"]
    assert cli.main(args) == 0
    assert capsys.readouterr().out.strip() == "pred0001"
    assert json.loads(_create_request(api)["body"])["webhook_events_filter"] == ["completed"]


def test_cli_remote_without_a_token_prints_one_line(api, song, capsys):
    assert cli.main(["remote", str(song), "--model", MODEL]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("stemsep: error: no Replicate API token")


def test_non_iobase_readers_are_buffered_for_the_sdk():
    class Reader:
        name = "/x/clip.wav"

        def read(self, n=-1):
            return b"abc"

    buffered = remote.audio_input(Reader())
    assert isinstance(buffered, io.BytesIO) and buffered.name == "clip.wav" and buffered.read() == b"abc"
