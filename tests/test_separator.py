"""The whole pipeline on real files: known outputs from constructed checkpoints, exact shapes,
bit-exact stems, no normalization, clipping reported, bad input refused, parity with audio-separator."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import soundfile as sf

from stemsep.compilation import snr_db
from stemsep.decode import decode
from stemsep.errors import (
    AudioDecodeError,
    AudioEncodeError,
    ClippingWarning,
    StemsepError,
)
from stemsep.pcm import AudioWriter
from stemsep.separator import Separator
from stemsep.testing import FAST_CHUNK, FAST_CONFIG, db, make_model_files, tones

CHUNK = FAST_CHUNK


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Separators whose vocals are known: mask 1 (= mix), 0 (silence), 0.5 (half), and random weights."""
    root = tmp_path_factory.mktemp("models")
    made = {name: make_model_files(root / name, FAST_CONFIG, mask=mask) for name, mask in
            [("pass", 1.0), ("mute", 0.0), ("half", 0.5), ("double", 2.0), ("random", None)]}
    return {name: Separator(*files, device="cpu", batch_size=4) for name, files in made.items()}


# known outputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("sample_rate", [8000, 22050, 44100, 48000, 96000])
@pytest.mark.parametrize("channels", [1, 2, 6])
def test_constant_masks_give_the_mix_silence_and_half_at_every_rate_and_channel_count(models, sample_rate, channels):
    mix = tones(sample_rate, sample_rate // 2, channels)
    worst = 0.0
    for name, gain in [("pass", 1.0), ("mute", 0.0), ("half", 0.5)]:
        stems = models[name].separate_array(mix, sample_rate)
        assert stems["vocals"].shape == stems["instrumental"].shape == mix.shape
        worst = max(worst, np.abs(stems["vocals"] - gain * mix).max(), np.abs(stems["instrumental"] - (1 - gain) * mix).max())
    print(f"{sample_rate} Hz x{channels}: worst error {db(worst):.0f} dBFS")
    assert db(worst) < (-110 if sample_rate == 44100 else -60)


@pytest.mark.parametrize("overlap", [1, 2, 4, 8])
@pytest.mark.parametrize("frames", [300, CHUNK - 1, CHUNK, CHUNK + 1, 7 * CHUNK + 5])
def test_pass_through_is_exact_at_any_length_and_overlap(models, frames, overlap):
    """Shorter than one chunk, exactly one, one either side, and several: no seams, exact length."""
    mix = tones(44100, frames, 2)
    vocals = models["pass"].separate_array(mix, 44100, overlap=overlap)["vocals"]
    assert vocals.shape == mix.shape
    assert db(np.abs(vocals - mix).max()) < -110


@pytest.mark.slow
def test_several_minutes_separate_with_exact_length_and_no_seams(models):
    mix = tones(48000, 3 * 60 * 48000 + 17, 2)
    vocals = models["pass"].separate_array(mix, 48000, overlap=2)["vocals"]
    assert vocals.shape == mix.shape
    error = np.abs(vocals - mix).max()
    print(f"3-min 48 kHz pass-through: worst error {db(error):.0f} dBFS")
    assert db(error) < -60


def test_batch_size_does_not_change_the_result(models, tmp_path):
    mix = tones(44100, 5 * CHUNK, 2)
    random = models["random"]
    expected = random.separate_array(mix, 44100)["vocals"]
    for batch_size in (1, 3, 16):
        other = Separator(random.model_files[0], random.model_files[1], device="cpu", batch_size=batch_size)
        np.testing.assert_allclose(other.separate_array(mix, 44100)["vocals"], expected, rtol=0, atol=1e-6)


# files ----------------------------------------------------------------------------------------


def write_input(path, mix, sample_rate, subtype=None, fmt=None):
    sf.write(path, mix.T, sample_rate, subtype=subtype, format=fmt)
    return path


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name, subtype, fmt", [
    ("song.wav", "PCM_16", "WAV"), ("song.wav", "PCM_24", "WAV"), ("song.wav", "PCM_U8", "WAV"),
    ("song.wav", "PCM_32", "WAV"), ("song.wav", "FLOAT", "WAV"), ("song.flac", "PCM_24", "FLAC"),
    ("song.aiff", "PCM_16", "AIFF"), ("song.mp3", "MPEG_LAYER_III", "MP3"), ("song.opus", "OPUS", "OGG"),
])
def test_pass_through_files_keep_rate_length_channels_and_samples(models, tmp_path, name, subtype, fmt):
    rate = 48000 if fmt == "OGG" else 44100
    source = write_input(tmp_path / name, tones(rate, rate, 2), rate, subtype, fmt)
    mix, info = decode(source)
    before = sha256(source)
    paths = models["pass"].separate(source, tmp_path)
    assert paths == {"vocals": tmp_path / "song_vocals.wav", "instrumental": tmp_path / "song_instrumental.wav"}
    assert sha256(source) == before  # the input is never modified
    expected_bits = {"PCM_16": 16, "PCM_24": 24, "PCM_U8": 16, "PCM_32": 32, "FLOAT": 32}.get(subtype, 16)
    for stem, expected in [("vocals", mix), ("instrumental", np.zeros_like(mix))]:
        out, out_info = decode(paths[stem])
        assert (out_info.sample_rate, out_info.channels, out_info.frames) == (info.sample_rate, info.channels, info.frames)
        assert out_info.bits == expected_bits
        lsb = 2.0 ** -(expected_bits - 1) if expected_bits < 32 else 1e-6
        error = np.abs(out - expected)
        if rate == 44100:
            assert error.max() <= lsb, stem
        else:  # Opus at 48 kHz goes through 44.1 kHz and back, and ends mid-waveform, which
            # rings in its last ms after resampling: -84 dBFS inside (2 LSB), -60 at the border
            border = rate // 500  # 2 ms
            assert db(error[:, border:-border].max()) < -80, stem
            assert db(error.max()) < -55, stem
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "song_vocals.wav", "song_instrumental.wav"])


@pytest.mark.parametrize("subtype, bits", [("PCM_16", 16), ("PCM_24", 24)])
@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_stems_sum_to_mix_bit_exactly_for_pcm_with_random_weights(models, tmp_path, subtype, bits, fmt):
    source = write_input(tmp_path / "song.wav", tones(44100, 3 * CHUNK, 2, level=0.5), 44100, subtype)
    paths = models["random"].separate(source, tmp_path, output_format=fmt)
    mix = sf.read(source, dtype="int32")[0] >> (32 - bits)
    vocals = sf.read(paths["vocals"], dtype="int32")[0] >> (32 - bits)
    instrumental = sf.read(paths["instrumental"], dtype="int32")[0] >> (32 - bits)
    assert np.abs(vocals).max() > 0 and np.abs(instrumental).max() > 0  # a real split, not a copy
    assert np.array_equal(vocals + instrumental, mix)


def test_no_normalization_a_minus_20_dbfs_song_stays_minus_20_dbfs(models, tmp_path):
    mix = tones(44100, 44100, 2, level=10 ** (-20 / 20))
    source = write_input(tmp_path / "quiet.wav", mix, 44100, "FLOAT")
    vocals = sf.read(models["pass"].separate(source, tmp_path)["vocals"], dtype="float32")[0].T
    assert db(np.abs(vocals).max()) == pytest.approx(-20, abs=1e-4)
    rms = lambda x: np.sqrt(np.mean(x.astype(np.float64) ** 2))  # noqa: E731
    assert db(rms(vocals)) == pytest.approx(db(rms(mix)), abs=1e-4)


def test_clipping_is_reported_never_silent_and_float_keeps_the_overs(models, tmp_path):
    source = write_input(tmp_path / "loud.wav", tones(44100, 44100, 2, level=0.8), 44100, "PCM_16")
    with pytest.warns(ClippingWarning, match=r"loud_vocals.wav: \d+ samples clipped \(peak 1.6"):
        paths = models["double"].separate(source, tmp_path)  # vocals = 2 x mix
    assert np.abs(sf.read(paths["vocals"], dtype="int16")[0]).max() == 32767
    paths = models["double"].separate(source, tmp_path, bit_depth=32)
    assert np.abs(sf.read(paths["vocals"])[0]).max() == pytest.approx(1.6, abs=1e-3)


def test_flac_and_explicit_bit_depths(models, tmp_path):
    source = write_input(tmp_path / "song.wav", tones(44100, 44100, 1), 44100, "PCM_16")
    paths = models["pass"].separate(source, tmp_path, output_format="flac", bit_depth=24)
    info = sf.info(paths["vocals"])
    assert (paths["vocals"].name, info.format, info.subtype, info.channels) == ("song_vocals.flac", "FLAC", "PCM_24", 1)
    with pytest.raises(AudioEncodeError, match="32 .* not available for FLAC"):
        models["pass"].separate(source, tmp_path, output_format="flac", bit_depth=32)


# bad input ------------------------------------------------------------------------------------


def bad_inputs(tmp_path):
    (tmp_path / "notes.txt").write_text("not audio at all\n" * 100)
    (tmp_path / "empty.wav").write_bytes(b"")
    write_input(tmp_path / "silent.wav", np.zeros((2, 44100), np.float32), 44100, "PCM_16")
    write_input(tmp_path / "blip.wav", tones(44100, 100, 2), 44100, "PCM_16")
    nan = tones(44100, 44100, 2)
    nan[0, 500] = np.nan
    write_input(tmp_path / "nan.wav", nan, 44100, "FLOAT")
    return {
        "notes.txt": "notes.txt: not an audio file",
        "empty.wav": "empty.wav: .*empty",
        "silent.wav": "silent.wav: the audio is silent",
        "blip.wav": "blip.wav: audio is too short to separate",
        "nan.wav": "nan.wav: .*NaN",
        "absent.wav": "absent.wav: .*(not found|does not exist|no such)",
    }


def test_bad_inputs_give_one_clear_sentence_and_no_output(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name, message in bad_inputs(tmp_path).items():
        with pytest.raises(AudioDecodeError, match=message) as caught:
            models["pass"].separate(tmp_path / name, out)
        assert "\n" not in str(caught.value)
    assert list(out.iterdir()) == []


def test_a_missing_output_folder_is_created_with_its_parents(models, tmp_path):
    source = write_input(tmp_path / "song.wav", tones(44100, 44100, 2), 44100, "PCM_16")
    paths = models["pass"].separate(source, tmp_path / "new" / "folder")
    assert sorted(p.name for p in (tmp_path / "new" / "folder").iterdir()) == ["song_instrumental.wav", "song_vocals.wav"]
    assert list(paths) == ["vocals", "instrumental"]


def test_an_output_folder_that_is_a_file_is_one_clear_sentence(models, tmp_path):
    source = write_input(tmp_path / "song.wav", tones(44100, 44100, 2), 44100, "PCM_16")
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(AudioEncodeError, match=r"^output folder \S*taken/sub cannot be created \(Not a directory\)$"):
        models["pass"].separate(source, tmp_path / "taken" / "sub")


def test_a_failed_second_stem_removes_the_first(models, tmp_path, monkeypatch):
    source = write_input(tmp_path / "song.wav", tones(44100, 44100, 2), 44100, "PCM_16")
    real_close = AudioWriter.close

    def failing_close(writer):
        if "instrumental" in writer.path:
            raise AudioEncodeError("disk full")
        return real_close(writer)

    monkeypatch.setattr(AudioWriter, "close", failing_close)
    with pytest.raises(AudioEncodeError, match="disk full"):
        models["pass"].separate(source, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["song.wav"]


@pytest.mark.parametrize("sample_rate, channels", [(44100, 2), (48000, 1), (22050, 3)])
def test_streaming_in_small_blocks_gives_bit_identical_stems(models, sample_rate, channels):
    """The file path decodes and separates block by block; the result must not depend on the
    block size: 1,000-sample blocks vs the whole signal at once, random weights."""
    random = models["random"]
    mix = tones(sample_rate, 9 * CHUNK + 123, channels)
    whole = np.concatenate([v for _, v in random._song([mix], sample_rate, channels, 4, None, None)], axis=-1)
    blocks = [mix[:, i : i + 1000] for i in range(0, mix.shape[1], 1000)]
    pairs = list(random._song(blocks, sample_rate, channels, 4, None, None))
    streamed_mix = np.concatenate([m for m, _ in pairs], axis=-1)
    streamed = np.concatenate([v for _, v in pairs], axis=-1)
    assert np.array_equal(streamed_mix, mix)  # the mix blocks are paired with their own vocals
    assert streamed.shape == whole.shape == (1, *mix.shape)  # (stems, channels, samples)
    assert np.array_equal(streamed, whole)


def test_inputs_over_the_duration_limit_are_refused_before_any_work(models, tmp_path):
    source = write_input(tmp_path / "long.wav", tones(44100, 5 * 44100, 2), 44100, "PCM_16")
    with pytest.raises(AudioDecodeError, match=r"long.wav: 0:00:05 long, over the 0:00:04 limit"):
        models["pass"].separate(source, tmp_path, max_duration_s=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.wav"]


def test_overlap_out_of_range_is_refused(models):
    with pytest.raises(Exception, match="overlap must be an integer from 1 to 16"):
        models["pass"].separate_array(tones(44100, 44100, 2), 44100, overlap=17)


# real audio and the reference tool ---------------------------------------------------------------


def test_musdb_excerpt_separates_at_its_own_rate_and_length(models, tmp_path):
    import stempeg

    excerpt = next((p for p in __import__("pathlib").Path(stempeg.__file__).parent.glob("data/*.stem.mp4")))
    paths = models["random"].separate(excerpt, tmp_path)
    for path in paths.values():
        info = sf.info(path)
        assert (info.samplerate, info.channels, info.frames, info.subtype) == (44100, 2, 268288, "PCM_16")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="audio-separator needs the ffmpeg binary (apt-get install ffmpeg)")
def test_pipeline_parity_with_audio_separator_on_the_same_random_weights(models, tmp_path):
    """Same checkpoint through audio-separator's Separator: close, not identical (its Hamming
    window and unpadded borders differ from our Hann window and reflect-padded borders)."""
    from audio_separator.separator import Separator as ReferenceSeparator

    from stemsep.reference import CHECKPOINT_NAME, audio_separator_model_dir

    random = models["random"]
    weights = audio_separator_model_dir(*random.model_files, tmp_path / "weights")
    mix = tones(44100, 30 * CHUNK, 2, level=0.5)  # below the 0.9 peak it normalizes to
    source = write_input(tmp_path / "song.wav", mix, 44100, "FLOAT")
    reference = ReferenceSeparator(model_file_dir=str(weights), output_dir=str(tmp_path / "ref"), output_format="WAV",
                                   mdxc_params={"overlap": 4, "batch_size": 1, "pitch_shift": 0,
                                                # its chunk = hop x (segment_size - 1): pin it to ours, or it
                                                # picks a longer chunk for short files by itself
                                                "segment_size": FAST_CONFIG["inference"]["dim_t"],
                                                "override_model_segment_size": True})
    reference.load_model(model_filename=CHECKPOINT_NAME)
    outputs = reference.separate(str(source))
    theirs = sf.read(tmp_path / "ref" / next(o for o in outputs if "Vocals" in o), dtype="float32")[0].T
    ours = random.separate_array(mix, 44100, overlap=4)["vocals"]
    value = snr_db(theirs, ours)
    print(f"SDR between audio-separator's and stemsep's vocals (random weights): {value:.1f} dB")
    assert theirs.shape == ours.shape
    assert value > 30  # measured 37.8 dB


# compressed output, chosen stems, quality mode, ensembles ------------------------------------------


@pytest.mark.parametrize("fmt, rate, min_snr", [("mp3", 44100, 45), ("m4a", 44100, 25), ("opus", 48000, 25)])
def test_compressed_stems_decode_aligned_at_the_input_length(models, tmp_path, fmt, rate, min_snr):
    """Pass-through model: the vocals are the song, through the codec; the decoded file has the
    input's length and channels (Opus: at 48 kHz) and lines up with it."""
    mix = tones(rate, rate, 2, level=0.5)
    source = write_input(tmp_path / "song.wav", mix, rate, "PCM_24")
    paths = models["pass"].separate(source, tmp_path / "out", output_format=fmt)
    assert sorted(p.name for p in paths.values()) == [f"song_instrumental.{fmt}", f"song_vocals.{fmt}"]
    vocals, info = decode(paths["vocals"])
    assert (info.sample_rate, vocals.shape) == (rate, mix.shape)
    value, off = snr_db(mix, vocals), snr_db(mix, np.roll(vocals, 1, axis=-1))
    print(f"{fmt}: SNR {value:.1f} dB aligned, {off:.1f} dB one sample off")
    assert value > min_snr and value > off + 3


def test_a_bitrate_for_a_lossless_format_is_refused(models, tmp_path):
    source = write_input(tmp_path / "song.wav", tones(44100, 44100, 2), 44100, "PCM_16")
    with pytest.raises(AudioEncodeError, match="^a bitrate applies to mp3, m4a, opus output, not flac$"):
        models["pass"].separate(source, tmp_path / "out", output_format="flac", bitrate_kbps=320)


def test_chosen_stems_write_only_those_with_the_complement_still_exact(models, tmp_path):
    source = write_input(tmp_path / "song.wav", tones(44100, 44100, 2), 44100, "PCM_16")
    both = models["random"].separate(source, tmp_path / "both")
    only = models["random"].separate(source, tmp_path / "only", stems=["instrumental"])
    assert list(only) == ["instrumental"] and [p.name for p in (tmp_path / "only").iterdir()] == ["song_instrumental.wav"]
    assert np.array_equal(sf.read(only["instrumental"], dtype="int16")[0], sf.read(both["instrumental"], dtype="int16")[0])
    with pytest.raises(Exception, match="^unknown stem 'drums': this model gives vocals, instrumental, and no_<stem> for the mix "
                                        "without one of them$"):
        models["random"].separate(source, tmp_path / "x", stems=["drums"])


def test_tta_of_a_pass_through_model_is_the_input(models):
    mix = tones(44100, 3 * CHUNK, 2)
    vocals = models["pass"].separate_array(mix, 44100, tta=True)["vocals"]
    assert db(np.abs(vocals - mix).max()) < -110


def test_tta_is_the_mean_of_the_three_transformed_runs(models, tmp_path):
    random = models["random"]
    mix = tones(44100, 5 * CHUNK + 17, 2, seed=3)
    plain = random.separate_array(mix, 44100)["vocals"]
    swapped = random.separate_array(mix[::-1].copy(), 44100)["vocals"][::-1]
    inverted = -random.separate_array(-mix, 44100)["vocals"]
    tta = random.separate_array(mix, 44100, tta=True)
    expected = (plain + swapped + inverted) / 3
    assert np.abs(tta["vocals"] - expected).max() < 1e-6 * np.abs(expected).max() + 1e-7
    assert np.array_equal(tta["instrumental"], mix - tta["vocals"])  # complement after averaging
    source = write_input(tmp_path / "song.wav", mix, 44100, "PCM_16")
    paths = random.separate(source, tmp_path / "out", tta=True)
    vocals, instrumental = (sf.read(paths[s], dtype="int16")[0].astype(np.int32) for s in ("vocals", "instrumental"))
    assert np.array_equal(vocals + instrumental, sf.read(source, dtype="int16")[0])  # still bit-exact


def test_an_ensemble_is_the_average_of_its_members_exactly(models, tmp_path):
    from stemsep.separator import Ensemble

    mix = tones(44100, 7 * CHUNK + 3, 3, seed=4)
    a = models["random"].separate_array(mix, 44100)["vocals"]
    b = models["half"].separate_array(mix, 44100)["vocals"]
    both = Ensemble([models["random"], models["half"]]).separate_array(mix, 44100)
    assert np.array_equal(both["vocals"], (a + b) / 2)
    assert np.array_equal(both["instrumental"], mix - both["vocals"])
    source = write_input(tmp_path / "song.wav", mix, 44100, "FLOAT")
    paths = Ensemble([models["random"], models["half"]]).separate(source, tmp_path / "out")
    assert np.array_equal(sf.read(paths["vocals"], dtype="float32")[0].T, (a + b) / 2)


# multi-stem models -------------------------------------------------------------------------------

FOUR_STEMS = {"instruments": ["drums", "bass", "other", "vocals"], "target_instrument": None}
FOUR_GAINS = [1.0, 0.5, 0.0, -0.25]


@pytest.fixture(scope="module")
def four_stems(tmp_path_factory):
    """A 4-stem model whose stems are known: gains 1, 0.5, 0 and -0.25 of the mix."""
    config = {**FAST_CONFIG, "model": {**FAST_CONFIG["model"], "num_stems": 4}, "training": FOUR_STEMS}
    files = make_model_files(tmp_path_factory.mktemp("four"), config, mask=FOUR_GAINS)
    return Separator(*files, device="cpu", batch_size=3)


@pytest.mark.parametrize("sample_rate, channels", [(44100, 2), (48000, 1), (22050, 3)])
def test_a_four_stem_model_gives_its_known_stems_at_any_rate_and_channel_count(four_stems, sample_rate, channels):
    mix = tones(sample_rate, sample_rate // 2, channels)
    stems = four_stems.separate_array(mix, sample_rate)
    assert four_stems.stems == ("drums", "bass", "other", "vocals") and list(stems) == list(four_stems.stems)
    for name, gain in zip(four_stems.stems, FOUR_GAINS):
        assert stems[name].shape == mix.shape
        assert db(np.abs(stems[name] - gain * mix).max()) < (-110 if sample_rate == 44100 else -60), name


def test_a_four_stem_model_streams_bit_identically_and_writes_every_stem(four_stems, tmp_path):
    mix = tones(44100, 9 * CHUNK + 55, 2, seed=7)
    whole = np.concatenate([e for _, e in four_stems._song([mix], 44100, 2, 4, None, None)], axis=-1)
    blocks = [mix[:, i : i + 777] for i in range(0, mix.shape[1], 777)]
    streamed = np.concatenate([e for _, e in four_stems._song(blocks, 44100, 2, 4, None, None)], axis=-1)
    assert whole.shape == (4, *mix.shape) and np.array_equal(streamed, whole)
    paths = four_stems.separate(write_input(tmp_path / "song.flac", mix, 44100, "PCM_24"), tmp_path / "out")
    assert [p.name for p in paths.values()] == ["song_drums.wav", "song_bass.wav", "song_other.wav", "song_vocals.wav"]
    assert sf.info(paths["bass"]).subtype == "PCM_24"


def test_an_ensemble_of_models_with_other_stems_is_refused(models, four_stems):
    from stemsep.separator import Ensemble

    with pytest.raises(StemsepError, match="models of an ensemble must give the same stems"):
        Ensemble([models["pass"], four_stems])


def test_network_channels_is_the_networks_width_and_channels_a_deprecated_alias(models, tmp_path):
    mono = Separator(*make_model_files(tmp_path, {**FAST_CONFIG, "model": {**FAST_CONFIG["model"], "stereo": False}}))
    assert (models["pass"].network_channels, mono.network_channels) == (2, 1)
    with pytest.warns(DeprecationWarning, match="Separator.channels is deprecated; use Separator.network_channels"):
        assert models["pass"].channels == 2
