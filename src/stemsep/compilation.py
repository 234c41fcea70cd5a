"""torch.compile without waiting for it: regional compilation in a background thread.

Compiled, the network runs about twice as fast on a GPU, but compiling 1297 whole took
102 s on an H100. So nothing waits for the compiler: :class:`BackgroundCompile` builds the
compiled network in a daemon thread while separations run eagerly, checks it against the
eager network on a batch of noise, and hands it to the :class:`~stemsep.runner.BatchRunner`,
which uses it from its next batch on. A compiler error, or a compiled network that
disagrees with eager by more than :data:`TOLERANCE_DB`, gives one warning and eager stays.

Regional compilation (:func:`compile_regions`): the network is a stack of identical
transformer blocks (12 time and 12 frequency transformers for 1297); compiled one block
class at a time, the compiler traces one block and reuses its code for every instance of
the same input shape, instead of unrolling all 24 into one graph. The band split and the
mask estimators are compiled as regions of their own; the STFT, the layout changes between
blocks and the iSTFT stay eager. benchmarks/compile_regions.py measures the difference.

Compiled code is kept in a folder that outlives the process (:func:`use_compile_cache`), so
a second process on the same machine loads it instead of compiling again.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import threading
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from stemsep.files import first_line
from stemsep.model import BandSplit, MaskEstimator, Transformer

# Least SNR (dB) of the compiled network's output against eager on the check batch, by
# precision. In fp32 the compiled kernels differ from eager in summation order only (132 dB
# measured on the tests' small network). bf16 is itself about 35 dB from fp32 (35.2 dB
# measured for the compiled 1297 network on an H100), so compiled and eager bf16, rounding
# at different points, can be about 32 dB apart; 20 dB leaves room for that. A
# miscompilation (wrong values, not rounding) gives 0 dB or less.
TOLERANCE_DB = {"fp32": 60.0, "bf16": 20.0, "fp16": 20.0}

REGIONS = (Transformer, BandSplit, MaskEstimator)
RECOMPILE_LIMIT = 64
# Held while a network compiles: Dynamo and Inductor keep process-wide state and are not
# thread-safe (pytorch/pytorch#136833), so a second network (another baked model of the
# Cog image, loaded while the first still compiles) waits for the first to be done.
COMPILING = threading.Lock()


def use_compile_cache() -> Path:
    """Point torch.compile's caches (TorchInductor's and its FX graph cache, both under
    $TORCHINDUCTOR_CACHE_DIR) at a folder that outlives the process, so that a second run on
    the same machine reuses the compiled code: $STEMSEP_CACHE_DIR/inductor, by default under
    the user's cache folder ($XDG_CACHE_HOME or ~/.cache, then stemsep/). Without
    $STEMSEP_CACHE_DIR, a $TORCHINDUCTOR_CACHE_DIR already set is kept (torch sets its own,
    under the temp folder, once anything asks for it). Returns the folder in use."""
    root = os.environ.get("STEMSEP_CACHE_DIR")
    if root or "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        root = root or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stemsep"
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(root) / "inductor")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def compile_regions(model: nn.Module) -> nn.Module:
    """A copy of `model` that shares its parameters and buffers (no second copy of the
    weights), with each transformer, the band split and the mask estimators compiled for
    static shapes. `model` itself stays eager. Compilation happens on the first call."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    compiled = copy.deepcopy(model, memo=shared)
    # Dynamo keeps a function's compiled variants (a region class's forward: one per input
    # shape, across every network compiled in the process; a transformer has two per
    # network, four on the CPU's slices) up to `recompile_limit` (8) and runs the rest
    # eagerly without a word. Room for the baked models of a Cog image in one process:
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for module in compiled.modules():
        if isinstance(module, REGIONS):
            module.compile(dynamic=False)
    return compiled


def compile_whole(model: nn.Module) -> nn.Module:
    """The whole network as one graph, for static shapes (what :func:`compile_regions` is
    measured against)."""
    return torch.compile(model, dynamic=False)


def snr_db(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    """Signal-to-noise ratio of `estimate` against `reference` (tensors or arrays), in dB, in
    float64 (inf when equal)."""
    reference, estimate = torch.as_tensor(reference).double(), torch.as_tensor(estimate).double()
    noise = float(((reference - estimate) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((reference**2).sum()) / noise)


def check_batch(shape: tuple[int, int, int]) -> torch.Tensor:
    """The chunks a compiled network is checked on: seeded noise at -20 dBFS RMS, (batch, channels, samples)."""
    return 0.1 * torch.randn(shape, generator=torch.Generator().manual_seed(0))


class BackgroundCompile:
    """Compile `runner`'s network for batches of `shape` (batch, channels, samples) in a
    daemon thread; once compiled and checked, the runner uses it from its next batch on.

    `state` is "compiling", then "compiled" or "failed" (with one warning). The thread
    compiles by running the check batch, so on a GPU it computes alongside separations for
    a moment. One network compiles at a time (:data:`COMPILING`): a second one stays
    "compiling" until the first is done. `seconds` is how long its own compile and check
    took, `snr_db` the check's result."""

    def __init__(self, runner, shape: tuple[int, int, int], precision: str):
        self.runner, self.shape, self.precision = runner, shape, precision
        self.state = "compiling"
        self.seconds: float | None = None
        self.snr_db: float | None = None
        self._done = threading.Event()
        threading.Thread(target=self._compile, name="stemsep-compile", daemon=True).start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to `timeout` seconds (None: until done); True if the compiled network is in use."""
        self._done.wait(timeout)
        return self.state == "compiled"

    def _compile(self) -> None:
        with COMPILING:  # after any other network's compile
            started = time.perf_counter()
            try:
                network = compile_regions(self.runner.model)
                batch = check_batch(self.shape)
                compiled = self.runner.apply(network, batch)  # compiles: (batch, stems, channels, samples)
                self.snr_db = snr_db(self.runner.apply(self.runner.model, batch), compiled)
                if not self.snr_db >= TOLERANCE_DB[self.precision]:
                    raise ArithmeticError(
                        f"the compiled network's output is {self.snr_db:.1f} dB from eager's, "
                        f"under the {TOLERANCE_DB[self.precision]:.0f} dB allowed"
                    )
                self.runner.use_compiled(network, self.shape)
                state = "compiled"
            except Exception as exc:  # any compiler failure: eager is always correct
                state = "failed"
                warnings.warn(f"torch.compile failed, running eagerly: {first_line(exc)}", stacklevel=1)
            self.seconds = time.perf_counter() - started
        self.state = state  # last: whoever sees the state sees the rest
        self._done.set()
