"""`stemsep eval` on the real MUSDB18 excerpt stempeg ships: ceilings, independent cross-checks
(numpy, museval), both dataset layouts, the pass-through model end to end, resuming."""

import json
import math
import shutil
from pathlib import Path

import museval
import numpy as np
import pytest
import soundfile
import stempeg

from stemsep import audio, cli, evaluate
from stemsep.synthetic import TINY_MODEL, config_dict, make_model_files

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
    mixture, info = audio.decode(EXCERPT, evaluate.MUSDB_STREAMS["mixture"])
    vocals, _ = audio.decode(EXCERPT, evaluate.MUSDB_STREAMS["vocals"])
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
    assert (track.name, track.mixture_stream, track.vocals_stream) == ("z", 0, 4)
    with pytest.raises(evaluate.EvaluationError, match="it has train/, test/; choose one with --split"):
        evaluate.find_tracks(tmp_path / "hq", "valid")
    touch(tmp_path / "broken" / "t" / "mixture.wav")
    with pytest.raises(evaluate.EvaluationError, match="has a mixture but no vocals.wav"):
        evaluate.find_tracks(tmp_path / "broken")


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
