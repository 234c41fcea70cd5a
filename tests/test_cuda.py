"""The CUDA path on a real GPU: skipped where there is none (CI), run on a GPU machine with
`pytest tests/test_cuda.py`. The same code runs on the CPU in the other tests; here the parts
only CUDA exercises: batches run on a worker thread (one batch in flight while the host adds
up the last), pinned memory, fp32 parity with the CPU,
bf16/fp16 autocast, the batch size chosen from free memory, and torch.compile."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from stemsep.chunking import StreamingSeparation, separate_chunks
from stemsep.compilation import snr_db
from stemsep.runner import BatchRunner, default_batch_size
from stemsep.separator import Separator
from stemsep.testing import FAST_CONFIG, make_model_files, tones

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CHUNK = FAST_CONFIG["audio"]["chunk_size"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_model_files(tmp_path_factory.mktemp("model"), FAST_CONFIG)


@pytest.fixture(scope="module")
def cpu_fp32(files):
    mix = tones(44100, 6 * 4096, 2, level=0.5)
    return mix, Separator(*files, device="cpu", batch_size=1, precision="fp32").separate_array(mix, 44100)["vocals"]


def test_fp32_on_the_gpu_matches_the_cpu(files, cpu_fp32):
    mix, expected = cpu_fp32
    out = Separator(*files, device="cuda", batch_size=3, precision="fp32").separate_array(mix, 44100)["vocals"]
    assert np.abs(out - expected).max() < 1e-4


@pytest.mark.parametrize("precision, min_snr", [("bf16", 35), ("fp16", 50)])
def test_reduced_precision_on_the_gpu(files, cpu_fp32, precision, min_snr):
    mix, expected = cpu_fp32
    out = Separator(*files, device="cuda", precision=precision).separate_array(mix, 44100)["vocals"]
    value = snr_db(expected, out)
    print(f"cuda {precision} vs cpu fp32: SNR {value:.1f} dB")
    assert value > min_snr


def test_auto_picks_bf16_and_a_batch_from_free_memory(files):
    separator = Separator(*files, device="cuda")
    assert separator.precision == "bf16"
    cfg = separator.config
    tokens = (cfg.audio.chunk_size // cfg.model.stft_hop_length + 1) * len(separator.model.band_split.to_features)
    assert separator.batch_size == default_batch_size(tokens, cfg.model.dim, separator.device, "bf16") > 1


def test_batches_submitted_at_once_come_back_in_order_and_right(files):
    """The GPU worker thread runs queued batches in order; each result is that batch's."""
    model = Separator(*files, device="cuda", precision="fp32").model
    runner = BatchRunner(model, "cuda")
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((4, 2, CHUNK)).astype(np.float32) * 0.1 for _ in range(5)]
    futures = [runner.submit(b) for b in batches]
    for batch, future in zip(batches, futures):
        got = future.result()
        assert got.device.type == "cpu" and got.dtype == torch.float32
        with torch.inference_mode():
            want = model(torch.from_numpy(batch).cuda()).cpu()
        assert torch.equal(got, want)


def test_streaming_on_the_gpu_does_not_depend_on_block_sizes(files):
    model = Separator(*files, device="cuda", precision="fp32").model
    signal = (0.1 * np.random.default_rng(1).standard_normal((2, 2, 9 * CHUNK + 123))).astype(np.float32)
    whole = separate_chunks(BatchRunner(model, "cuda"), signal, chunk=CHUNK, overlap=4, batch_size=3)
    stream = StreamingSeparation(BatchRunner(model, "cuda"), groups=2, channels=2, chunk=CHUNK, overlap=4, batch_size=3)
    cuts = np.cumsum(np.random.default_rng(2).integers(1, 3 * CHUNK, 40))
    parts = [stream.push(block) for block in np.split(signal, cuts[cuts < signal.shape[-1]], axis=-1)]
    streamed = np.concatenate([*parts, stream.finish()], axis=-1)
    assert streamed.shape == whole.shape
    assert np.abs(streamed - whole).max() < 1e-6


def test_compiled_on_the_gpu_matches_eager(files, cpu_fp32):
    mix, expected = cpu_fp32
    eager = Separator(*files, device="cuda", batch_size=4, precision="bf16").separate_array(mix, 44100)["vocals"]
    separator = Separator(*files, device="cuda", batch_size=4, precision="bf16", compile=True)
    assert separator.wait_for_compile(timeout=600), separator.compilation.state  # compiled, not fallen back to eager
    assert separator.runner.compiled.shape[0] == 4
    compiled = separator.separate_array(mix, 44100)["vocals"]
    assert snr_db(eager, compiled) > 35
    assert snr_db(expected, compiled) > 35


def test_file_to_stems_on_the_gpu_adds_up_to_the_mix(files, tmp_path):
    mix = tones(48000, 200_000, 2, level=0.5)
    song = tmp_path / "song.wav"
    sf.write(song, mix.T, 48000, subtype="PCM_24")
    (tmp_path / "out").mkdir()
    stems = Separator(*files, device="cuda").separate(song, tmp_path / "out", bit_depth=24)
    vocals, rate = sf.read(stems["vocals"], dtype="int32")
    instrumental, _ = sf.read(stems["instrumental"], dtype="int32")
    original, _ = sf.read(song, dtype="int32")
    assert rate == 48000 and vocals.shape == original.shape
    assert np.array_equal(vocals.astype(np.int64) + instrumental, original)
