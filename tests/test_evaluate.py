"""`stemsep eval` on the real MUSDB18 excerpt stempeg ships: ceilings, independent cross-checks
(numpy, museval), both dataset layouts, the pass-through model end to end, resuming; 4-stem
estimates on a MUSDB18-HQ-style folder of its stems, other stem orders and names, unscorable
stems, the table and JSON following the stems, --tta and ensembles."""

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import museval
import numpy as np
import pytest
import soundfile
import stempeg

from stemsep import cli, evaluate
from stemsep.decode import decode
from stemsep.testing import TINY_MODEL, config_dict, make_model_files

EXCERPT = Path(stempeg.__file__).parent / "data" / "The Easton Ellises - Falcon 69.stem.mp4"
TRACK = "The Easton Ellises - Falcon 69"
RATE = 44100
SMALL_STFT = {**TINY_MODEL, "stft_n_fft": 256, "stft_win_length": 256, "stft_hop_length": 64, "freqs_per_bands": [8] * 16 + [1]}


def write_float_wav(path: Path, x: np.ndarray) -> None:
    """Float WAV holds the decoded float32 samples exactly, so both layouts read the same audio."""
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, x.T, RATE, subtype="FLOAT")


def msst_sdr(s: np.ndarray, e: np.ndarray) -> float:
    s, e = s.astype(np.float64), np.asarray(e, dtype=np.float64)
    return 10 * np.log10((np.sum(s**2) + 1e-7) / (np.sum((s - e) ** 2) + 1e-7))


def framewise_median_sdr(s: np.ndarray, e: np.ndarray) -> float:
    """BSSEval v4 SDR by hand: 10·log10(Σs²/Σ(s-ŝ)²) per whole 1-s frame, median over frames."""
    s, e = s.astype(np.float64), np.asarray(e, dtype=np.float64)
    frames = [slice(k * RATE, (k + 1) * RATE) for k in range(s.shape[1] // RATE)]
    return float(np.median([10 * np.log10(np.sum(s[:, f] ** 2) / np.sum((s[:, f] - e[:, f]) ** 2)) for f in frames]))


@pytest.fixture(scope="module")
def excerpt(tmp_path_factory):
    """The excerpt's mixture and vocals, and the same track as MUSDB18 and MUSDB18-HQ datasets."""
    root = tmp_path_factory.mktemp("musdb")
    mixture, info = decode(EXCERPT, evaluate.MUSDB_STREAMS["mixture"])
    vocals, _ = decode(EXCERPT, evaluate.MUSDB_STREAMS["vocals"])
    assert info.sample_rate == RATE and mixture.shape == vocals.shape == (2, 268288)
    (root / "musdb18" / "test").mkdir(parents=True)
    shutil.copy(EXCERPT, root / "musdb18" / "test" / EXCERPT.name)
    write_float_wav(root / "musdb18hq" / "test" / TRACK / "mixture.wav", mixture)
    write_float_wav(root / "musdb18hq" / "test" / TRACK / "vocals.wav", vocals)
    (root / "musdb18hq" / "train").mkdir()
    return {"root": root, "mixture": mixture, "vocals": vocals}


def score_both_layouts(excerpt, estimates_dir: Path, bsseval: bool = True) -> evaluate.TrackScore:
    """Score `estimates_dir` against both layouts; they must agree exactly. Returns the score."""
    scores = []
    for layout in ("musdb18", "musdb18hq"):
        tracks = evaluate.find_tracks(excerpt["root"] / layout)
        assert [t.name for t in tracks] == [TRACK]
        report = evaluate.evaluate(tracks, evaluate.file_estimates(estimates_dir), bsseval=bsseval)
        scores.append(report.scores[0])
    from_stem_mp4, from_folder = scores
    assert from_stem_mp4.sdr == from_folder.sdr
    assert from_stem_mp4.bsseval_sdr == pytest.approx(from_folder.bsseval_sdr, nan_ok=True, abs=0)
    return from_folder


# metrics ----------------------------------------------------------------------------------


def test_msst_sdr_is_ten_log_ratio_of_energies_with_epsilon_over_all_channels():
    s = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    e = s + np.array([[0.1, 0.0, -0.2], [0.3, 0.0, 0.0]])
    assert evaluate.sdr(s, e) == pytest.approx(10 * math.log10((15.25 + 1e-7) / (0.14 + 1e-7)), rel=1e-12)
    assert evaluate.sdr(np.zeros((2, 8)), np.zeros((2, 8))) == 0.0  # silence estimated as silence: ε/ε
    assert evaluate.sdr(s, s) == pytest.approx(10 * math.log10(15.25 / 1e-7 + 1), rel=1e-12)  # the ceiling


def test_true_vocals_as_estimate_reach_the_ceiling_from_either_layout(excerpt, tmp_path):
    write_float_wav(tmp_path / TRACK / "vocals.wav", excerpt["vocals"])  # instrumental derived: mixture - vocals
    result = score_both_layouts(excerpt, tmp_path)
    vocals = excerpt["vocals"].astype(np.float64)
    instrumental = excerpt["mixture"].astype(np.float64) - vocals
    assert result.sdr["vocals"] == pytest.approx(10 * np.log10(np.sum(vocals**2) / 1e-7 + 1), rel=1e-12)
    assert result.sdr["instrumental"] == pytest.approx(10 * np.log10(np.sum(instrumental**2) / 1e-7 + 1), rel=1e-12)
    assert result.sdr["vocals"] == pytest.approx(103.724, abs=1e-3)
    assert result.bsseval_sdr == {"vocals": math.inf, "instrumental": math.inf}  # museval: zero error -> +inf


def test_mixture_as_both_estimates_matches_numpy_and_museval(excerpt, tmp_path):
    # MUSDB's classic "mix as estimate" baseline; stemsep's and audio-separator's file names
    write_float_wav(tmp_path / f"{TRACK}_vocals.wav", excerpt["mixture"])
    write_float_wav(tmp_path / f"{TRACK}_(Instrumental)_model_bs_roformer_ep_317_sdr_12.wav", excerpt["mixture"])
    result = score_both_layouts(excerpt, tmp_path)
    mixture, vocals = excerpt["mixture"], excerpt["vocals"]
    instrumental = mixture.astype(np.float64) - vocals
    assert result.sdr["vocals"] == pytest.approx(msst_sdr(vocals, mixture), abs=1e-9)
    assert result.sdr["instrumental"] == pytest.approx(msst_sdr(instrumental, mixture), abs=1e-9)
    assert result.sdr["vocals"] == pytest.approx(-7.0586, abs=1e-4)
    # museval called directly, the way museval.eval_mus_track does for vocals/accompaniment
    refs = np.stack([vocals.T, instrumental.T]).astype(np.float64)
    frames = museval.evaluate(refs, np.stack([mixture.T, mixture.T]), win=RATE, hop=RATE)[0]
    assert frames.shape == (2, 6)
    assert result.bsseval_sdr["vocals"] == pytest.approx(np.nanmedian(frames[0]), abs=1e-9)
    assert result.bsseval_sdr["instrumental"] == pytest.approx(np.nanmedian(frames[1]), abs=1e-9)
    assert result.bsseval_sdr["vocals"] == pytest.approx(framewise_median_sdr(vocals, mixture), abs=1e-6)
    assert result.bsseval_sdr["vocals"] == pytest.approx(-6.2327, abs=1e-4)


def test_mixture_as_vocals_alone_leaves_a_silent_instrumental_that_blanks_bsseval(excerpt, tmp_path):
    write_float_wav(tmp_path / TRACK / "vocals.wav", excerpt["mixture"])
    result = score_both_layouts(excerpt, tmp_path)
    assert result.sdr["vocals"] == pytest.approx(msst_sdr(excerpt["vocals"], excerpt["mixture"]), abs=1e-9)
    assert result.sdr["instrumental"] == 0.0  # (Σs² + ε) / (Σs² + ε)
    # museval leaves every frame undefined when an estimate is all zeros
    assert math.isnan(result.bsseval_sdr["vocals"]) and math.isnan(result.bsseval_sdr["instrumental"])
    assert evaluate.TrackScore.from_json(json.loads(json.dumps(result.to_json(), allow_nan=False))).sdr == result.sdr


# the CLI ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pass_through(tmp_path_factory):
    config = config_dict(model=SMALL_STFT, audio={"chunk_size": 4096})
    return make_model_files(tmp_path_factory.mktemp("model"), config, mask=1.0)


@pytest.fixture
def one_torch_thread():
    """The tiny network gains nothing from threads, and spinning OpenMP threads on a busy shared
    CPU made the same separation take 1 s or 100 s."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_pass_through_model_scores_like_the_mixture_and_a_rerun_resumes(
    excerpt, pass_through, one_torch_thread, tmp_path, capsys, monkeypatch
):
    checkpoint, config = pass_through
    results = tmp_path / "eval.json"
    argv = ["eval", str(excerpt["root"] / "musdb18hq"), "--checkpoint", str(checkpoint), "--config", str(config),
            "--device", "cpu", "--overlap", "2", "--json", str(results)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert TRACK in out and "1 track: 1 scored, 0 read from" in out
    data = json.loads(results.read_text())
    track = data["tracks"][0]
    assert track["name"] == TRACK and track["duration"] == pytest.approx(268288 / RATE)
    assert track["settings"]["overlap"] == 2 and track["settings"]["checkpoint"] == "model.ckpt"
    assert track["settings"]["tta"] is False and "model" not in track["settings"]
    assert data["format"] == 2 and data["stems"] == ["vocals", "instrumental"] and list(track["sdr"]) == data["stems"]
    mixture, vocals = excerpt["mixture"], excerpt["vocals"]
    assert track["sdr"]["vocals"] == pytest.approx(msst_sdr(vocals, mixture), abs=0.01)
    assert track["bsseval_sdr"]["vocals"] == pytest.approx(framewise_median_sdr(vocals, mixture), abs=0.01)
    assert abs(track["sdr"]["instrumental"]) < 0.01  # the mixture - (mixture ± 1e-7) instrumental
    assert data["summary"]["sdr"]["median"]["vocals"] == track["sdr"]["vocals"]

    def no_model(*args, **kwargs):
        raise AssertionError("a resumed track was separated again")

    monkeypatch.setattr("stemsep.separator.Separator.separate_array", no_model)
    before = results.read_text()
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "1 track: 0 scored, 1 read from" in out and f"{track['sdr']['vocals']:.3f}" in out
    assert results.read_text() == before

    assert cli.main([*argv[:-4], "--overlap", "1", "--json", str(results)]) == 1  # other settings: refused
    err = capsys.readouterr().err
    assert err.startswith("stemsep: error: ") and "overlap: 2 there, 1 now" in err and err.count("\n") == 1


def test_limit_takes_the_first_tracks_and_a_longer_run_scores_only_the_rest(excerpt, tmp_path, capsys):
    dataset = tmp_path / "data"
    for name in ("B song", "A song"):
        shutil.copytree(excerpt["root"] / "musdb18hq" / "test" / TRACK, dataset / name)
    estimates = tmp_path / "estimates"
    for name in ("A song", "B song"):
        write_float_wav(estimates / name / "vocals.wav", excerpt["vocals"])
    argv = ["eval", str(dataset), "--estimates", str(estimates), "--no-bsseval", "--json", str(tmp_path / "r.json")]
    assert cli.main([*argv, "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "A song" in out and "B song" not in out and "1 track: 1 scored" in out
    assert cli.main(argv) == 0
    assert "2 tracks: 1 scored, 1 read from" in capsys.readouterr().out
    data = json.loads((tmp_path / "r.json").read_text())
    assert [t["name"] for t in data["tracks"]] == ["A song", "B song"]
    assert data["tracks"][0]["bsseval_sdr"] is None and data["settings"]["bsseval"] is False


def test_model_options_with_estimates_are_refused(excerpt, tmp_path, capsys):
    assert cli.main(["eval", str(excerpt["root"] / "musdb18"), "--estimates", str(tmp_path), "--overlap", "2"]) == 1
    assert "--overlap cannot be used with --estimates" in capsys.readouterr().err
    argv = ["eval", str(excerpt["root"] / "musdb18"), "--estimates", str(tmp_path)]
    assert cli.main([*argv, "--tta", "--model", "a", "--model", "b"]) == 1
    assert capsys.readouterr().err == "stemsep: error: --model, --tta cannot be used with --estimates, which scores existing files\n"
    assert cli.main(argv) == 1  # no model options: the complaint is about the (missing) estimate files
    assert "no vocals, instrumental, drums, bass, other estimate for" in capsys.readouterr().err


# datasets and estimate files ----------------------------------------------------------------


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_dataset_root_split_folder_or_plain_folder_of_tracks(tmp_path):
    for split in ("train", "test"):
        for name in ("b", "a"):
            touch(tmp_path / "hq" / split / f"{split}-{name}" / "mixture.wav")
            touch(tmp_path / "hq" / split / f"{split}-{name}" / "vocals.wav")
    assert [t.name for t in evaluate.find_tracks(tmp_path / "hq")] == ["test-a", "test-b"]
    assert [t.name for t in evaluate.find_tracks(tmp_path / "hq", "train")] == ["train-a", "train-b"]
    assert [t.name for t in evaluate.find_tracks(tmp_path / "hq" / "train")] == ["train-a", "train-b"]
    touch(tmp_path / "mp4" / "test" / "z.stem.mp4")
    track = evaluate.find_tracks(tmp_path / "mp4")[0]
    assert (track.name, track.streams["mixture"], track.streams["vocals"], track.streams["drums"]) == ("z", 0, 4, 1)
    assert track.sources == dict.fromkeys(("vocals", "drums", "bass", "other"), tmp_path / "mp4" / "test" / "z.stem.mp4")
    with pytest.raises(evaluate.EvaluationError, match="it has train/, test/; choose one of them as the split"):
        evaluate.find_tracks(tmp_path / "hq", "valid")
    # a track needs only the references of the stems scored, checked when they are known
    touch(tmp_path / "partial" / "t" / "mixture.wav")
    touch(tmp_path / "partial" / "t" / "drums.flac")
    track = evaluate.find_tracks(tmp_path / "partial")[0]
    assert track.sources == {"drums": tmp_path / "partial" / "t" / "drums.flac"}
    track.check(["drums"])
    with pytest.raises(evaluate.EvaluationError, match="has a mixture but no vocals.wav, which scoring the vocals and instrumental estimates needs"):
        track.check(["drums", "vocals", "instrumental"])


def test_estimate_file_names_of_stemsep_audio_separator_and_musdb_folders(tmp_path):
    folder = {
        "vocals": touch(tmp_path / "T" / "Vocals.wav"),
        "instrumental": touch(tmp_path / "T" / "accompaniment.flac"),
    }
    assert evaluate.find_estimates(tmp_path, "T") == folder
    flat = {
        "vocals": touch(tmp_path / "U_vocals.wav"),
        "instrumental": touch(tmp_path / "U_(Instrumental)_model_bs_roformer_ep_317_sdr_12.wav"),
    }
    touch(tmp_path / "U2_vocals.wav")  # another track
    assert evaluate.find_estimates(tmp_path, "U") == flat
    separator_in_folder = touch(tmp_path / "V" / "mixture_(Vocals)_model_bs_roformer_ep_317_sdr_12.wav")
    assert evaluate.find_estimates(tmp_path, "V") == {"vocals": separator_in_folder}
    touch(tmp_path / "V_vocals.wav")
    with pytest.raises(evaluate.EvaluationError, match="several vocals estimates for 'V'"):
        evaluate.find_estimates(tmp_path, "V")


@pytest.mark.parametrize("rate, channels, frames, message", [
    (48000, 2, 268288, "is 48000 Hz but the reference is 44100 Hz"),
    (44100, 1, 268288, "has 1 channels but the reference has 2"),
    (44100, 2, 268287, "has 268287 samples but the reference has 268288"),
])
def test_estimates_at_another_rate_channel_count_or_length_are_refused(excerpt, tmp_path, rate, channels, frames, message):
    path = tmp_path / TRACK / "vocals.wav"
    path.parent.mkdir()
    soundfile.write(path, np.zeros((frames, channels), np.float32) + 0.1, rate, subtype="FLOAT")
    tracks = evaluate.find_tracks(excerpt["root"] / "musdb18hq")
    with pytest.raises(evaluate.EvaluationError, match=message):
        evaluate.evaluate(tracks, evaluate.file_estimates(tmp_path), bsseval=False)


# any stems: 4-stem models, other stem orders and names ---------------------------------------

FOUR = ("vocals", "drums", "bass", "other")
FOUR_SECONDS = 3 * RATE  # museval's cost grows with the square of the stems: keep the 4-stem track short


@pytest.fixture(scope="module")
def four_stems(tmp_path_factory):
    """A MUSDB18-HQ-style track of the excerpt's first 3 s: the four stems, and their sum as
    the mixture, as float WAVs (so the references read back exactly)."""
    root = tmp_path_factory.mktemp("musdb4")
    stems = {s: decode(EXCERPT, evaluate.MUSDB_STREAMS[s])[0][:, :FOUR_SECONDS] for s in FOUR}
    mixture = sum(stems[s] for s in FOUR).astype(np.float32)
    folder = root / "test" / TRACK
    write_float_wav(folder / "mixture.wav", mixture)
    for s in FOUR:
        write_float_wav(folder / f"{s}.wav", stems[s])
    return {"root": root, "mixture": mixture, "stems": stems}


class FakeSeparator:
    """The interface of stemsep.separator.Separator that eval uses, with `make(name, mix)` as
    the network: fast, and exactly known estimates."""

    def __init__(self, stems, make, layout=None, checkpoint="fake.ckpt"):
        self.stems, self.make, self.calls, self.asked = tuple(stems), make, [], []
        if layout is not None:
            self.layout = layout
        self.model_files = (Path(checkpoint), Path(checkpoint).with_suffix(".yaml"))
        self.config = SimpleNamespace(inference=SimpleNamespace(num_overlap=4))
        self.precision, self.device, self.batch_size = "fp32", "cpu", 1

    def separate_array(self, mix, sample_rate, overlap=None, on_progress=None, tta=False, stems=None):
        self.calls.append({"overlap": overlap, "tta": tta})
        self.asked.append(stems)
        return {name: self.make(name, mix) for name in self.stems if stems is None or name in stems}


def one_sentence(message: str) -> bool:
    return "\n" not in message and ". " not in message and not message.endswith(".")


def ceiling(s: np.ndarray) -> float:
    return 10 * np.log10(np.sum(s.astype(np.float64) ** 2) / 1e-7 + 1)


def test_four_stem_estimates_are_scored_on_each_musdb_stem_reading_only_the_files_needed(four_stems, monkeypatch):
    tracks = evaluate.find_tracks(four_stems["root"])
    decoded = []
    monkeypatch.setattr(evaluate, "decode", lambda path, stream=0: decoded.append(Path(path).name) or decode(path, stream))
    truth = four_stems["stems"]

    def true_stems(track, mixture, sample_rate):  # a 4-stem model's output order, MUSDB's
        return {s: truth[s] for s in ("drums", "bass", "other", "vocals")}

    report = evaluate.evaluate(tracks, true_stems, bsseval=False)
    assert report.stems == ("drums", "bass", "other", "vocals") and report.scores[0].stems == report.stems
    for s in FOUR:
        assert report.scores[0].sdr[s] == pytest.approx(ceiling(truth[s]), rel=1e-12)
    assert sorted(decoded) == ["bass.wav", "drums.wav", "mixture.wav", "other.wav", "vocals.wav"]

    # MUSDB's "mix as estimate" baseline for four stems: each stem estimated as the mixture / 4
    decoded.clear()
    mixture = four_stems["mixture"]
    report = evaluate.evaluate(tracks, lambda track, mix, rate: {s: mix / 4 for s in FOUR}, bsseval=True)
    result = report.scores[0]
    for s in FOUR:
        assert result.sdr[s] == pytest.approx(msst_sdr(truth[s], mixture / 4), abs=1e-9)
        assert result.bsseval_sdr[s] == pytest.approx(framewise_median_sdr(truth[s], mixture / 4), abs=1e-6)
    assert result.sdr["vocals"] == pytest.approx(0.3673, abs=1e-4) and result.bsseval_sdr["bass"] == pytest.approx(1.6158, abs=1e-4)
    assert report.summary["sdr"]["median"] == result.sdr

    # a vocals/instrumental estimator on the same folder reads the mixture and vocals only
    decoded.clear()
    report = evaluate.evaluate(tracks, lambda track, mix, rate: {"vocals": truth["vocals"], "instrumental": mix.astype(np.float64) - truth["vocals"]},
                               bsseval=False)
    assert sorted(decoded) == ["mixture.wav", "vocals.wav"]
    assert report.scores[0].sdr["instrumental"] == pytest.approx(ceiling(mixture.astype(np.float64) - truth["vocals"]), rel=1e-9)


def test_stem_order_and_names_of_the_model_change_the_columns_not_the_figures(excerpt):
    tracks = evaluate.find_tracks(excerpt["root"] / "musdb18hq")

    def make(name, mix):  # 0.3 of the mix as vocals, the rest as the instrumental
        return mix * (0.3 if name.lower() == "vocals" else 0.7)

    results = {}
    for stems in (("vocals", "instrumental"), ("Instrumental", "Vocals"), ("accompaniment", "vocals")):
        estimator = evaluate.separator_estimates(FakeSeparator(stems, make))
        report = evaluate.evaluate(tracks, estimator, bsseval=stems != ("accompaniment", "vocals"))  # museval twice is enough
        results[stems] = report
    first, *others = results.values()
    assert first.stems == ("vocals", "instrumental")
    assert results[("Instrumental", "Vocals")].stems == results[("accompaniment", "vocals")].stems == ("instrumental", "vocals")
    for report in others:
        assert list(report.scores[0].sdr) == list(report.stems)
        assert report.scores[0].sdr == pytest.approx(first.scores[0].sdr, abs=0)
        if report.scores[0].bsseval_sdr is not None:
            assert report.scores[0].bsseval_sdr == pytest.approx(first.scores[0].bsseval_sdr, abs=1e-9)
    vocals = excerpt["vocals"]
    assert first.scores[0].sdr["vocals"] == pytest.approx(msst_sdr(vocals, 0.3 * excerpt["mixture"]), abs=1e-9)


def test_a_stem_without_a_musdb_reference_is_refused_in_one_sentence_before_any_separation(excerpt, tmp_path, capsys, monkeypatch):
    def never(name, mix):
        raise AssertionError("separated although the stems cannot be scored")

    for stems, bad in ((("karaoke", "other"), "karaoke"), (("vocals", "reverb"), "reverb"), (("noise",), "noise")):
        with pytest.raises(evaluate.EvaluationError) as caught:
            evaluate.separator_estimates(FakeSeparator(stems, never))
        message = str(caught.value)
        assert message.startswith(f"the {bad!r} stem cannot be scored: MUSDB has references for vocals, drums, bass, other")
        assert one_sentence(message)
    with pytest.raises(evaluate.EvaluationError, match="the 'instrumental' and 'Accompaniment' stems would both be scored as the instrumental"):
        evaluate.separator_estimates(FakeSeparator(("vocals", "instrumental", "Accompaniment"), never))
    # estimators without a stem map (files, functions) are checked on their first track
    tracks = evaluate.find_tracks(excerpt["root"] / "musdb18hq")
    with pytest.raises(evaluate.EvaluationError, match="the 'noise' stem cannot be scored"):
        evaluate.evaluate(tracks, lambda track, mix, rate: {"vocals": mix, "noise": mix}, bsseval=False)
    # through the CLI: one line, nothing separated
    monkeypatch.setattr(cli, "_load_separator", lambda args: FakeSeparator(("karaoke", "other"), never))
    assert cli.main(["eval", str(excerpt["root"] / "musdb18hq"), "--no-bsseval"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("stemsep: error: the 'karaoke' stem cannot be scored") and err.count("\n") == 1


def test_a_single_target_models_complement_is_scored_as_mixture_minus_its_target():
    from stemsep.stems import StemLayout

    # a vocals model whose config calls the rest "other" (MelBand configs do): not MUSDB's other
    fake = FakeSeparator(("vocals", "other"), None, layout=StemLayout(("vocals",), "other"))
    assert evaluate.separator_estimates(fake).stem_map == {"vocals": "vocals", "other": "instrumental"}
    fake = FakeSeparator(("instrumental", "rest"), None, layout=StemLayout(("instrumental",), "rest"))
    assert evaluate.separator_estimates(fake).stem_map == {"instrumental": "instrumental", "rest": "vocals"}
    four = FakeSeparator(("bass", "drums", "other", "vocals"), None, layout=StemLayout(("bass", "drums", "other", "vocals")))
    assert evaluate.separator_estimates(four).stem_map == {s: s for s in ("bass", "drums", "other", "vocals")}


def test_a_missing_reference_file_is_refused_before_any_separation(excerpt):
    def never(name, mix):
        raise AssertionError("separated although a reference is missing")

    tracks = evaluate.find_tracks(excerpt["root"] / "musdb18hq")  # mixture.wav and vocals.wav only
    estimator = evaluate.separator_estimates(FakeSeparator(("bass", "drums", "other", "vocals"), never))
    with pytest.raises(evaluate.EvaluationError) as caught:
        evaluate.evaluate(tracks, estimator, bsseval=False)
    assert str(caught.value).endswith(f"{TRACK}: has a mixture but no bass.wav, which scoring the bass estimate needs")


def test_cli_table_and_json_follow_a_four_stem_models_stems_and_record_tta(four_stems, tmp_path, capsys, monkeypatch):
    fake = FakeSeparator(("bass", "drums", "other", "vocals"), lambda name, mix: mix / 4)
    monkeypatch.setattr(cli, "_load_separator", lambda args: fake)
    results = tmp_path / "eval.json"
    argv = ["eval", str(four_stems["root"]), "--no-bsseval", "--json", str(results), "--model", "fake-4-stem"]
    assert cli.main([*argv, "--tta"]) == 0
    assert fake.calls == [{"overlap": None, "tta": True}]
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["track", "seconds", "bass", "drums", "other", "vocals", "bass", "drums", "other", "vocals"]
    assert lines[0].split() == ["SDR", "(MSST),", "dB", "BSSEval", "v4", "SDR,", "dB"]
    row = lines[2][len(TRACK):].split()
    truth, mixture = four_stems["stems"], four_stems["mixture"]
    assert row == ["3.0", *(f"{msst_sdr(truth[s], mixture / 4):.3f}" for s in ("bass", "drums", "other", "vocals")), "-", "-", "-", "-"]
    assert lines[3].split()[1:] == row[1:] and lines[3].startswith("median")
    data = json.loads(results.read_text())
    assert data["format"] == 2 and data["stems"] == ["bass", "drums", "other", "vocals"]
    settings = data["settings"]
    assert settings["tta"] is True and settings["model"] == ["fake-4-stem"] and settings["checkpoint"] == "fake.ckpt"
    assert settings["overlap"] == 4 and settings["bsseval"] is False
    track = data["tracks"][0]
    assert list(track["sdr"]) == data["stems"] and track["bsseval_sdr"] is None
    assert list(data["summary"]["sdr"]["mean"]) == data["stems"]
    assert track["sdr"]["drums"] == pytest.approx(msst_sdr(truth["drums"], mixture / 4), abs=1e-9)

    assert cli.main(argv) == 1  # the same file without the quality mode: refused, not mixed
    err = capsys.readouterr().err
    assert "(tta: True there, False now); choose another results file or delete it" in err and err.count("\n") == 1


def test_cli_records_every_model_of_an_ensemble(excerpt, tmp_path, capsys, monkeypatch):
    members = [FakeSeparator(("vocals", "instrumental"), None, checkpoint=f"{name}.ckpt") for name in ("a", "b")]
    ensemble = FakeSeparator(("vocals", "instrumental"), lambda name, mix: mix / 2)
    ensemble.members = members
    monkeypatch.setattr(cli, "_load_separator", lambda args: ensemble)
    results = tmp_path / "eval.json"
    argv = ["eval", str(excerpt["root"] / "musdb18hq"), "--no-bsseval", "--json", str(results), "--model", "a", "--model", "b"]
    assert cli.main(argv) == 0
    settings = json.loads(results.read_text())["settings"]
    assert settings["model"] == ["a", "b"] and settings["checkpoint"] == ["a.ckpt", "b.ckpt"]
    assert settings["config"] == ["a.yaml", "b.yaml"] and settings["overlap"] == 4 and settings["tta"] is False
    assert "vocals" in capsys.readouterr().out


def test_estimate_files_of_the_four_musdb_stems(four_stems, tmp_path, capsys):
    folder = {s: touch(tmp_path / "layouts" / "T" / f"{s.title()}.wav") for s in ("bass", "drums", "other", "vocals")}
    assert evaluate.find_estimates(tmp_path / "layouts", "T") == {s: folder[s] for s in ("vocals", "drums", "bass", "other")}
    flat = {s: touch(tmp_path / "layouts" / f"U_({s.title()})_htdemucs.flac") for s in ("drums", "other")}
    flat["bass"] = touch(tmp_path / "layouts" / "U_bass.wav")
    assert evaluate.find_estimates(tmp_path / "layouts", "U") == {s: flat[s] for s in ("drums", "bass", "other")}

    # a 4-stem tool's true stems, as <track>_<stem>.wav: the four at the ceiling, and the
    # instrumental (mixture - the vocals file) too
    estimates = tmp_path / "estimates"
    for s in FOUR:
        write_float_wav(estimates / f"{TRACK}_{s}.wav", four_stems["stems"][s])
    results = tmp_path / "r.json"
    assert cli.main(["eval", str(four_stems["root"]), "--estimates", str(estimates), "--no-bsseval", "--json", str(results)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[2:7] == ["vocals", "instr.", "drums", "bass", "other"]
    data = json.loads(results.read_text())
    assert data["stems"] == ["vocals", "instrumental", "drums", "bass", "other"]
    track = data["tracks"][0]
    for s in FOUR:
        assert track["sdr"][s] == pytest.approx(ceiling(four_stems["stems"][s]), rel=1e-12)
    assert track["sdr"]["instrumental"] > 90


def test_every_track_is_scored_on_the_same_stems(excerpt, tmp_path):
    dataset = tmp_path / "data"
    for name in ("A song", "B song"):
        shutil.copytree(excerpt["root"] / "musdb18hq" / "test" / TRACK, dataset / name)
    estimates = tmp_path / "estimates"
    write_float_wav(estimates / "A song" / "vocals.wav", excerpt["vocals"])
    write_float_wav(estimates / "B song" / "vocals.wav", excerpt["vocals"])
    write_float_wav(estimates / "B song" / "drums.wav", excerpt["vocals"])
    with pytest.raises(evaluate.EvaluationError) as caught:
        evaluate.evaluate(evaluate.find_tracks(dataset), evaluate.file_estimates(estimates), bsseval=False)
    assert str(caught.value) == ("B song: has estimates of vocals, instrumental, drums where the tracks before it have "
                                 "vocals, instrumental; every track must be scored on the same stems")


def test_a_results_file_of_another_format_or_other_stems_is_refused(excerpt, tmp_path):
    tracks = evaluate.find_tracks(excerpt["root"] / "musdb18hq")
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"format": 1, "settings": {"bsseval": False}, "tracks": []}))
    with pytest.raises(evaluate.EvaluationError, match="holds results in format 1, and this stemsep resumes format 2 only"):
        evaluate.evaluate(tracks, evaluate.file_estimates(tmp_path), results_path=results, bsseval=False)
    score = evaluate.TrackScore(TRACK, 6.0, {"vocals": 1.0, "instrumental": 2.0}, None, {"bsseval": False})
    evaluate.write_results(results, [score], {"bsseval": False})
    estimator = evaluate.separator_estimates(FakeSeparator(FOUR, None))
    with pytest.raises(evaluate.EvaluationError, match="holds scores of vocals, instrumental, not of vocals, drums, bass, other"):
        evaluate.evaluate(tracks, estimator, results_path=results, bsseval=False)


# A real Separator (no fake) of a constructed 4-stem checkpoint with --tta, end to end through the CLI.
def test_real_four_stem_separator_with_tta_scores_like_the_mixture_over_four(four_stems, tmp_path, capsys, one_torch_thread):
    config = config_dict(
        model={**SMALL_STFT, "num_stems": 4}, audio={"chunk_size": 4096},
        training={"instruments": ["drums", "bass", "other", "vocals"], "target_instrument": None},
    )
    checkpoint, config_path = make_model_files(tmp_path / "model", config, mask=0.25)
    results = tmp_path / "eval.json"
    argv = ["eval", str(four_stems["root"]), "--checkpoint", str(checkpoint), "--config", str(config_path), "--device", "cpu",
            "--overlap", "2", "--tta", "--no-bsseval", "--json", str(results)]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[2:6] == ["drums", "bass", "other", "vocals"]
    data = json.loads(results.read_text())
    assert data["stems"] == ["drums", "bass", "other", "vocals"] and data["settings"]["tta"] is True
    truth, mixture = four_stems["stems"], four_stems["mixture"]
    for s in FOUR:
        assert data["tracks"][0]["sdr"][s] == pytest.approx(msst_sdr(truth[s], mixture / 4), abs=0.01)


# A real Ensemble of two constructed vocals models (masks 1 and 0.5: vocals = 0.75 of the mix)
# through the CLI, with both checkpoints recorded.
def test_real_ensemble_scores_the_mean_of_its_models(four_stems, tmp_path, capsys, one_torch_thread):
    config = config_dict(model=SMALL_STFT, audio={"chunk_size": 4096})
    files = [make_model_files(tmp_path / "models", config, mask=m, name=name) for m, name in ((1.0, "one"), (0.5, "half"))]
    results = tmp_path / "eval.json"
    argv = ["eval", str(four_stems["root"]), "--device", "cpu", "--overlap", "2", "--no-bsseval", "--json", str(results)]
    for checkpoint, config_path in files:
        argv += ["--checkpoint", str(checkpoint), "--config", str(config_path)]
    assert cli.main(argv) == 0
    data = json.loads(results.read_text())
    assert data["settings"]["checkpoint"] == ["one.ckpt", "half.ckpt"] and data["settings"]["overlap"] == 2
    mixture, vocals = four_stems["mixture"], four_stems["stems"]["vocals"]
    assert data["tracks"][0]["sdr"]["vocals"] == pytest.approx(msst_sdr(vocals, 0.75 * mixture), abs=0.01)
    assert data["tracks"][0]["sdr"]["instrumental"] == pytest.approx(msst_sdr(mixture - vocals, 0.25 * mixture), abs=0.01)


# models that split MUSDB's stems further: SW's six, MVSep Mega's 53 -----------------------------

SW_STEMS = ("bass", "drums", "other", "vocals", "guitar", "piano")
SW_MASKS = (0.1, 0.2, 0.3, 0.05, 0.15, 0.25)  # per stem, in that order: MUSDB's other = 0.3 + 0.15 + 0.25 = 0.7 of the mix


def test_stems_inside_musdbs_other_are_summed_into_it_and_overlapping_ones_left_out():
    from stemsep import catalogue

    sw = evaluate.musdb_mapping(catalogue.get("sw").stems)
    assert sw.stem_map == {s: s for s in ("bass", "drums", "other", "vocals")}
    assert sw.summed == {"other": ("other", "guitar", "piano")} and sw.left_out == ()
    mega = catalogue.get("mega").stems
    scored = evaluate.musdb_mapping(mega)
    assert scored.stem_map == {"bass": "bass", "drums": "drums", "vocal": "vocals"} and scored.summed == {}
    assert scored.left_out == tuple(s for s in mega if s not in ("bass", "drums", "vocal"))
    for stems in (("guitar", "other"), ("vocals", "guitar", "other"), ("vocals", "drums", "piano")):  # nothing to split
        with pytest.raises(evaluate.EvaluationError, match="stem cannot be scored: MUSDB has references for"):
            evaluate.musdb_mapping(stems)


def test_a_six_stem_models_other_guitar_and_piano_are_scored_as_musdbs_other(four_stems, tmp_path, capsys, one_torch_thread):
    """A constructed SW-like 6-stem BS-RoFormer through the CLI: the `other` scored is the sum
    of its other, guitar and piano (0.7 of the mix), not its other alone (0.3)."""
    config = config_dict(model={**SMALL_STFT, "num_stems": 6}, audio={"chunk_size": 4096},
                         training={"instruments": list(SW_STEMS), "target_instrument": None})
    checkpoint, config_path = make_model_files(tmp_path / "model", config, mask=list(SW_MASKS))
    results = tmp_path / "eval.json"
    argv = ["eval", str(four_stems["root"]), "--checkpoint", str(checkpoint), "--config", str(config_path), "--device", "cpu",
            "--overlap", "2", "--no-bsseval", "--json", str(results)]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[2:6] == ["bass", "drums", "other", "vocals"]
    data = json.loads(results.read_text())
    assert data["stems"] == ["bass", "drums", "other", "vocals"]
    assert data["settings"]["summed"] == {"other": ["other", "guitar", "piano"]} and "left_out" not in data["settings"]
    truth, mixture, sdr = four_stems["stems"], four_stems["mixture"], data["tracks"][0]["sdr"]
    for stem, gain in (("bass", 0.1), ("drums", 0.2), ("other", 0.7), ("vocals", 0.05)):
        assert sdr[stem] == pytest.approx(msst_sdr(truth[stem], gain * mixture), abs=0.01), stem
    assert abs(msst_sdr(truth["other"], 0.3 * mixture) - sdr["other"]) > 1  # other alone would score apart


def test_a_model_of_overlapping_stems_is_scored_on_those_musdb_has_and_says_what_it_left_out(four_stems):
    from stemsep import catalogue

    mega = catalogue.get("mega").stems
    fake = FakeSeparator(mega, lambda name, mix: mix / 4 if name in ("bass", "drums", "vocal") else mix)
    report = evaluate.evaluate(evaluate.find_tracks(four_stems["root"]), evaluate.separator_estimates(fake), bsseval=False)
    assert fake.asked == [["bass", "drums", "vocal"]]  # only what is scored
    assert report.stems == ("bass", "drums", "vocals")
    truth, mixture = four_stems["stems"], four_stems["mixture"]
    assert report.scores[0].sdr == pytest.approx({s: msst_sdr(truth[s], mixture / 4) for s in report.stems}, abs=1e-9)
    assert report.scores[0].settings["left_out"] == [s for s in mega if s not in ("bass", "drums", "vocal")]


def test_practice_track_files_are_not_estimates_of_their_stem(tmp_path):
    vocals = touch(tmp_path / "T_vocals.wav")
    touch(tmp_path / "T_no_vocals.wav")
    touch(tmp_path / "T" / "song_no_drums.flac")
    assert evaluate.find_estimates(tmp_path, "T") == {"vocals": vocals}
