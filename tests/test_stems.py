"""Practice tracks: `no_<stem>` (the mix without one stem) for single- and multi-stem models.

A 6-stem BS-RoFormer laid out like SW (bass, drums, other, vocals, guitar, piano) and a
single-target guitar model (its complement `other`, as the catalogue's guitar config names
it), both tiny and with random weights so that every stem is an arbitrary signal: through
the CLI, `--stems guitar,no_guitar` writes those two files and, in 16- and 24-bit WAV and
FLAC, they add up to the song bit for bit. The same through the library (`separate_array`,
`Ensemble`), the order practice tracks come in, and the Python client's documented order
for outputs without a file name.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from stemsep import catalogue, cli
from stemsep.errors import StemsepError
from stemsep.pcm import quantize
from stemsep.remote import outputs
from stemsep.separator import Ensemble, Separator
from stemsep.stems import StemLayout, stem_choices, stem_samples
from stemsep.testing import FAST_CHUNK, FAST_MODEL, config_dict, make_model_files, tones

SW_STEMS = ("bass", "drums", "other", "vocals", "guitar", "piano")
RATE = 44100


def six_stem_config() -> dict:
    return config_dict(model={**FAST_MODEL, "num_stems": 6}, audio={"chunk_size": FAST_CHUNK},
                       training={"instruments": list(SW_STEMS), "target_instrument": None})


def guitar_config() -> dict:
    return config_dict(model=FAST_MODEL, audio={"chunk_size": FAST_CHUNK},
                       training={"instruments": ["guitar", "other"], "target_instrument": "guitar"})


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny networks gain nothing from threads, and OpenMP threads spinning on a busy
    shared CPU make the same separation take a second or twenty."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "six": make_model_files(root, six_stem_config(), name="six"),
        "guitar": make_model_files(root, guitar_config(), name="guitar"),
        "guitar-2": make_model_files(root, guitar_config(), seed=1, name="guitar-2"),
    }


@pytest.fixture(scope="module")
def separators(model_files):
    return {name: Separator(*files, device="cpu", batch_size=4) for name, files in model_files.items()}


# the layout --------------------------------------------------------------------------------------


def test_every_stem_of_a_model_has_its_practice_track_after_the_models_stems():
    six = StemLayout(SW_STEMS)
    assert six.choices == (*SW_STEMS, *(f"no_{s}" for s in SW_STEMS))
    assert [six.source(s) for s in ("guitar", "no_guitar")] == [("guitar", False), ("guitar", True)]
    guitar = StemLayout(("guitar",), "other")
    assert guitar.choices == ("guitar", "other", "no_guitar", "no_other")
    # the complement and no_<target> are the mix minus the target; no_<complement> is the target
    assert [guitar.source(s) for s in guitar.choices] == [("guitar", False), ("guitar", True), ("guitar", True), ("guitar", False)]
    assert stem_choices(("guitar", "no_guitar")) == ("guitar", "no_guitar", "no_no_guitar")  # each name once


@pytest.mark.parametrize("subtype, bits", [("PCM_16", 16), ("PCM_24", 24)])
def test_a_stem_and_its_practice_track_add_up_to_the_mix_in_integers(subtype, bits):
    rng = np.random.default_rng(0)
    mix = quantize(rng.uniform(-0.5, 0.5, (2, 1000)).astype(np.float32), bits)[0] / np.float32(2 ** (bits - 1))
    estimates = rng.uniform(-0.3, 0.3, (6, 2, 1000)).astype(np.float32)
    stems, clips = stem_samples(StemLayout(SW_STEMS), mix, estimates, subtype, wanted=("no_guitar", "guitar"))
    assert list(stems) == ["no_guitar", "guitar"] and stems["guitar"].dtype == (np.int16 if bits == 16 else np.int32)
    assert np.array_equal(stems["guitar"].astype(np.int64) + stems["no_guitar"], quantize(mix, bits)[0])
    assert clips["no_guitar"].samples == 0
    floats, _ = stem_samples(StemLayout(SW_STEMS), mix, estimates, None, wanted=("no_piano",))
    assert np.array_equal(floats["no_piano"], mix - estimates[5])


def test_a_practice_track_that_leaves_the_integer_range_is_clipped_and_counted():
    mix = np.full((1, 4), 0.9, np.float32)
    estimates = np.array([[[-0.5, 0.0, 0.5, 0.2]]], np.float32)  # mix - stem: 1.4 (clips), 0.9, 0.4, 0.7
    stems, clips = stem_samples(StemLayout(("guitar", "bass")), mix, np.concatenate([estimates, estimates]), "PCM_16",
                                wanted=("no_guitar",))
    assert stems["no_guitar"][0, 0] == 32767 and clips["no_guitar"].samples == 1
    assert clips["no_guitar"].peak == pytest.approx(1.4, abs=1e-4)


# through the command line ---------------------------------------------------------------------------


def read_ints(path, bits: int) -> np.ndarray:
    """A 16- or 24-bit file's samples as the integers written (soundfile reads 24-bit as int32 << 8)."""
    x, _ = sf.read(path, dtype="int16" if bits == 16 else "int32", always_2d=True)
    return x.astype(np.int64) if bits == 16 else x.astype(np.int64) >> 8


@pytest.mark.parametrize("model", ["six", "guitar"])
@pytest.mark.parametrize("fmt, bits", [("wav", 16), ("flac", 16), ("wav", 24), ("flac", 24)])
def test_the_cli_writes_the_guitar_and_the_song_without_it_adding_up_exactly(model_files, tmp_path, model, fmt, bits, capsys):
    mix = tones(RATE, 5 * FAST_CHUNK + 123, 2, level=0.3, seed=2)
    song = tmp_path / f"song.{fmt}"
    sf.write(song, mix.T, RATE, subtype=f"PCM_{bits}")
    checkpoint, config = model_files[model]
    argv = ["separate", str(song), "-o", str(tmp_path / "out"), "--checkpoint", str(checkpoint), "--config", str(config),
            "--device", "cpu", "--stems", "no_guitar,guitar", "--format", fmt]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "clipped" not in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"song_guitar.{fmt}", f"song_no_guitar.{fmt}"]
    guitar, no_guitar = (read_ints(tmp_path / "out" / f"song_{s}.{fmt}", bits) for s in ("guitar", "no_guitar"))
    assert sf.info(tmp_path / "out" / f"song_guitar.{fmt}").subtype == f"PCM_{bits}"
    assert np.any(guitar) and np.any(no_guitar)  # both are something: the sum below is a real check
    assert np.array_equal(guitar + no_guitar, read_ints(song, bits))


def test_a_single_target_models_no_target_is_its_complement_under_the_name_asked_for(separators, tmp_path):
    mix = tones(RATE, 3 * FAST_CHUNK, 2, level=0.3, seed=5)
    song = tmp_path / "song.wav"
    sf.write(song, mix.T, RATE, subtype="PCM_16")
    guitar = separators["guitar"]
    paths = guitar.separate(song, tmp_path / "out", stems=["no_other", "other", "no_guitar"])
    assert list(paths) == ["other", "no_guitar", "no_other"]  # the model's stems first, then the practice tracks
    other, no_guitar, no_other = (sf.read(paths[s], dtype="int16")[0] for s in paths)
    assert np.array_equal(no_guitar, other)
    assert np.array_equal(no_other, sf.read(guitar.separate(song, tmp_path / "all")["guitar"], dtype="int16")[0])


# through the library ----------------------------------------------------------------------------------


def test_separate_array_gives_the_stems_asked_for_in_the_order_they_come(separators):
    mix = tones(RATE, 2 * FAST_CHUNK + 9, 2, seed=1)
    six = separators["six"]
    every = six.separate_array(mix, RATE)
    assert tuple(every) == SW_STEMS
    chosen = six.separate_array(mix, RATE, stems=["no_guitar", "piano", "guitar"])
    assert list(chosen) == ["guitar", "piano", "no_guitar"]
    assert np.array_equal(chosen["guitar"], every["guitar"]) and np.array_equal(chosen["no_guitar"], mix - every["guitar"])


def test_an_ensemble_gives_practice_tracks_from_its_mean(separators):
    mix = tones(RATE, 2 * FAST_CHUNK, 2, seed=3)
    a, b = (separators[name].separate_array(mix, RATE)["guitar"] for name in ("guitar", "guitar-2"))
    both = Ensemble([separators["guitar"], separators["guitar-2"]]).separate_array(mix, RATE, stems=["no_guitar"])
    assert list(both) == ["no_guitar"] and np.array_equal(both["no_guitar"], mix - (a + b) / 2)


def test_an_unknown_stem_is_one_sentence_saying_what_can_be_asked_for(separators, tmp_path):
    message = ("unknown stem 'no_banjo': this model gives guitar, other, and no_<stem> for the mix without one of them")
    with pytest.raises(StemsepError) as caught:
        separators["guitar"].separate_array(np.zeros((2, 4096), np.float32), RATE, stems=["guitar", "no_banjo"])
    assert str(caught.value) == message
    with pytest.raises(StemsepError, match="^no stems chosen: this model gives bass, drums, other, vocals, guitar, piano, and"):
        separators["six"].chosen_stems([])


def test_the_clients_documented_order_is_the_order_the_stems_come(separators):
    """Outputs without a file name (data URLs) are matched to stems in the order
    stemsep.remote documents: the same order a separation returns them in."""
    assert catalogue.get("sw").stems == separators["six"].stems
    asked = "no_guitar, piano,guitar,no_vocals"
    assert outputs.expected_stems({"model": "sw", "stems": asked}) == separators["six"].chosen_stems(
        [s.strip() for s in asked.split(",")])
    urls = [f"data:audio/wav;base64,{i}" for i in range(4)]
    assert list(outputs.stem_urls(urls, {"model": "sw", "stems": asked})) == ["guitar", "piano", "no_vocals", "no_guitar"]
