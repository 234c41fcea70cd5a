"""Engine options against the fp32 eager batch-1 output on the same random weights: precision,
batch size, torch.compile and the CUDA out-of-memory fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stemsep import compilation
from stemsep.compilation import TOLERANCE_DB
from stemsep.errors import StemsepError
from stemsep.chunking import separate_chunks
from stemsep.runner import BatchRunner
from stemsep.separator import Separator
from stemsep.testing import FAST_CONFIG, make_model_files, tones


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_model_files(tmp_path_factory.mktemp("model"), FAST_CONFIG)


@pytest.fixture(scope="module")
def reference(files):
    mix = tones(44100, 6 * 4096, 2, level=0.5)
    return mix, Separator(*files, device="cpu", batch_size=1, precision="fp32").separate_array(mix, 44100)["vocals"]


@pytest.mark.parametrize("precision, min_snr", [("bf16", 40), ("fp16", 55)])  # measured 46.2 and 65.0 dB
def test_reduced_precision_stays_within_its_stated_tolerance(files, reference, precision, min_snr):
    mix, fp32 = reference
    out = Separator(*files, device="cpu", precision=precision).separate_array(mix, 44100)["vocals"]
    value = compilation.snr_db(fp32, out)
    print(f"{precision} vs fp32: SNR {value:.1f} dB")
    assert value > min_snr


def test_auto_precision_is_fp32_on_cpu_and_bad_names_are_refused(files):
    assert Separator(*files, device="cpu").precision == "fp32"
    with pytest.raises(StemsepError, match="precision must be one of auto, fp32, bf16, fp16"):
        Separator(*files, device="cpu", precision="int8")


@pytest.mark.parametrize("batch_size", [2, 5, 16])
def test_batch_size_changes_nothing_beyond_round_off(files, reference, batch_size):
    mix, fp32 = reference
    out = Separator(*files, device="cpu", batch_size=batch_size).separate_array(mix, 44100)["vocals"]
    assert np.abs(out - fp32).max() < 1e-6


@pytest.mark.slow
def test_compiling_never_blocks_and_the_compiled_network_takes_over_matching_eager(files, reference):
    mix, fp32 = reference
    separator = Separator(*files, device="cpu", batch_size=3, compile=True)
    assert separator.compilation.state == "compiling" and not separator.compiled  # returned before compiling
    during = separator.separate_array(mix, 44100)["vocals"]  # eager, or compiled if it finished meanwhile
    assert np.abs(during - fp32).max() < 1e-5
    assert separator.wait_for_compile(timeout=900), separator.compilation.state
    assert separator.compiled and separator.runner.compiled.shape == (3, 2, 4096)
    assert separator.compilation.snr_db >= TOLERANCE_DB["fp32"]
    out = separator.separate_array(mix, 44100)["vocals"]
    assert np.abs(out - fp32).max() < 1e-5


def test_a_compile_failure_gives_one_warning_and_eager_stays(files, reference, monkeypatch):
    def broken_compile(model, **kwargs):
        def fail(*args):
            raise RuntimeError("inductor exploded")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match="torch.compile failed, running eagerly: inductor exploded") as caught:
        separator = Separator(*files, device="cpu", compile=True)
        assert not separator.wait_for_compile(timeout=60)
    assert len(caught) == 1 and separator.compilation.state == "failed" and not separator.compiled
    mix, fp32 = reference
    assert np.abs(separator.separate_array(mix, 44100)["vocals"] - fp32).max() < 1e-6


def test_a_compiled_network_that_disagrees_with_eager_is_not_used(files, reference, monkeypatch):
    monkeypatch.setattr(compilation, "compile_regions", lambda model: lambda x: 0.5 * model(x))  # a miscompilation
    with pytest.warns(UserWarning, match=r"the compiled network's output is 6\.0 dB from eager's, under the 60 dB allowed"):
        separator = Separator(*files, device="cpu", compile=True)
        assert not separator.wait_for_compile(timeout=60)
    mix, fp32 = reference
    assert np.abs(separator.separate_array(mix, 44100)["vocals"] - fp32).max() < 1e-6


@pytest.mark.slow
def test_regional_compilation_has_room_for_the_regions_of_several_networks(tmp_path, monkeypatch):
    """Dynamo keeps a function's compiled variants (a transformer's: one per input shape,
    across networks) up to its recompile limit and runs the rest eagerly without a word, so
    a second network would pass the check against eager yet not be compiled. With the limit
    at 2, the first network's time and frequency transformers fill it; compile_regions
    raises it, so the second network's four regions compile too."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from stemsep.checkpoint import load_model
    from stemsep.testing import FAST_MODEL, config_dict

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    torch._dynamo.reset()
    x = compilation.check_batch((2, 2, 4096))
    for dim in (16, 24):
        config = config_dict(model={**FAST_MODEL, "dim": dim}, audio={"chunk_size": 4096}, inference=FAST_CONFIG["inference"])
        model = load_model(*make_model_files(tmp_path / f"dim{dim}", config))
        network = compilation.compile_regions(model)
        before = counters["stats"]["unique_graphs"]
        with torch.inference_mode():
            assert compilation.snr_db(model(x), network(x)) > TOLERANCE_DB["fp32"]
        assert counters["stats"]["unique_graphs"] - before == 4  # time and frequency transformers, band split, mask estimator


class Recorder(torch.nn.Module):
    """The identity times `gain`, remembering the shape of every batch it was given."""

    def __init__(self, gain: float):
        super().__init__()
        self.gain, self.shapes = gain, []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return (x * self.gain).unsqueeze(1)  # (batch, stems, channels, samples)


def test_the_compiled_network_sees_only_its_shape_and_other_lengths_run_eagerly():
    eager, compiled = Recorder(1.0), Recorder(2.0)
    runner = BatchRunner(eager)
    runner.use_compiled(compiled, (4, 2, 256))
    full = np.ones((3, 2, 256), np.float32)  # a last, short batch of full chunks: padded to the shape
    assert torch.equal(runner(full)[:, 0], 2 * torch.from_numpy(full))
    short = np.ones((1, 2, 100), np.float32)  # a song shorter than one chunk
    assert torch.equal(runner(short)[:, 0], torch.from_numpy(short))
    assert compiled.shapes == [(4, 2, 256)] and eager.shapes == [(1, 2, 100)]


def test_the_compiled_network_takes_over_between_batches_of_a_running_song():
    """The swap happens mid-song: batches before it ran eagerly, batches after it compiled,
    for the runner and for the test-time-augmentation view made before the swap."""
    eager, compiled = Recorder(1.0), Recorder(1.0)
    runner = BatchRunner(eager)
    tta = runner.with_tta()
    batch = np.ones((2, 2, 256), np.float32)
    runner(batch), tta(batch)
    runner.use_compiled(compiled, (2, 2, 256))
    runner(batch), tta(batch)
    assert len(eager.shapes) == 1 + 3 and len(compiled.shapes) == 1 + 3  # a TTA batch is three passes


class RunsOutOfMemoryAbove(torch.nn.Module):
    """Raises CUDA's out-of-memory error for batches above `limit`, like a GPU that is too small."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.batches = limit, []

    def forward(self, x):
        self.batches.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return (x * 0.5).unsqueeze(1)  # (batch, stems, channels, samples)


def test_out_of_memory_halves_the_batch_and_finishes():
    model = RunsOutOfMemoryAbove(limit=2)
    signal = np.random.default_rng(0).standard_normal((1, 2, 5000)).astype(np.float32)
    with pytest.warns(UserWarning, match="GPU out of memory: continuing with 4 chunks per batch"):
        out = separate_chunks(BatchRunner(model), signal, chunk=256, overlap=4, batch_size=8)
    np.testing.assert_allclose(out[:, 0], 0.5 * signal, atol=1e-6)
    assert model.batches[:3] == [8, 4, 2] and max(model.batches[3:]) <= 2  # later batches stay small


def test_out_of_memory_in_the_compiled_network_drops_it_for_eager_at_the_real_size():
    """A compiled network pads every batch to its shape: when that does not fit, eager runs
    the same chunks unpadded (no halving yet), and no compiled network is taken afterwards."""
    eager, compiled = Recorder(1.0), RunsOutOfMemoryAbove(limit=0)
    runner = BatchRunner(eager)
    runner.use_compiled(compiled, (4, 2, 256))
    one = np.ones((1, 2, 256), np.float32)  # a last chunk, padded to 4
    with pytest.warns(UserWarning, match="GPU out of memory: continuing with the eager network"):
        assert torch.equal(runner(one)[:, 0], torch.from_numpy(one))
    assert compiled.batches == [4] and eager.shapes == [(1, 2, 256)] and runner.compiled is None
    with pytest.raises(StemsepError, match="the GPU ran out of memory meanwhile, so the network compiled for batches of 4 is not used"):
        runner.use_compiled(compiled, (4, 2, 256))


def test_out_of_memory_on_a_single_chunk_is_a_clear_error():
    with pytest.raises(StemsepError, match="the GPU ran out of memory on a single chunk"):
        separate_chunks(BatchRunner(RunsOutOfMemoryAbove(limit=0)), np.zeros((1, 2, 1000), np.float32),
                        chunk=256, overlap=2, batch_size=4)


COMPILE_RUN = """
import json, sys, time
from torch._dynamo.utils import counters
started = time.perf_counter()
from stemsep.separator import Separator
separator = Separator(sys.argv[1], sys.argv[2], device="cpu", batch_size=2, compile=True)
print(json.dumps({"compiled": separator.wait_for_compile(), "seconds": time.perf_counter() - started,
                  "cache_hits": counters["inductor"]["fxgraph_cache_hit"]}))
"""


@pytest.mark.slow
def test_a_second_run_reuses_the_compiled_code_from_the_cache_folder(files, tmp_path):
    """torch.compile's code goes to $STEMSEP_CACHE_DIR/inductor, which outlives the process:
    a second process compiling the same network takes it from there (FX graph cache hits)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["STEMSEP_CACHE_DIR"] = str(tmp_path / "cache")
    runs = []
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", COMPILE_RUN, *map(str, files)], capture_output=True, text=True,
                                timeout=900, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(f"setup with compile: first run {runs[0]['seconds']:.1f} s, second run {runs[1]['seconds']:.1f} s")
    assert runs[0]["compiled"] and runs[1]["compiled"]
    assert any((tmp_path / "cache" / "inductor").iterdir())
    assert runs[0]["cache_hits"] == 0 and runs[1]["cache_hits"] > 0
