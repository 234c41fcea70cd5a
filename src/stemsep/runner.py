"""Put batches of chunks through the network on a device: device, precision, batch size,
and the fallbacks a long job needs (see :class:`BatchRunner`).

The network's estimate of a batch, and its mean over test-time augmentations, come from
:mod:`stemsep.apply`; a compiled network is handed over by :mod:`stemsep.compilation`.
"""

from __future__ import annotations

import contextvars
import copy
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from stemsep.apply import estimate
from stemsep.choices import PRECISIONS
from stemsep.errors import StemsepError


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StemsepError("device 'cuda' was requested but no CUDA GPU is available")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """One of PRECISIONS but "auto": bf16 on a GPU that has it (fp16 on older ones, e.g. a T4),
    fp32 on the CPU."""
    if precision not in PRECISIONS:
        raise StemsepError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    """What autocast lowers the transformers to at a resolved `precision` (None: fp32, no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def default_batch_size(tokens_per_chunk: int, dim: int, device: torch.device, precision: str) -> int | None:
    """Chunks per forward pass on a GPU: as many as half the free memory holds, estimating a
    chunk's activations at 16 values of `dim` per token (band x frame), capped at 16. Too
    many is caught by the OOM fallback. None elsewhere (batching gains little on a CPU: use
    the model config's)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    per_chunk = 16 * tokens_per_chunk * dim * (4 if precision == "fp32" else 2)
    return max(1, min(16, int(0.5 * free // per_chunk)))


class BatchRunner:
    """Puts one batch of chunks through the network: device transfer, precision, and the
    fallbacks a long job needs.

    The STFT/iSTFT and mask multiply stay float32 inside the model; autocast (`autocast_dtype`)
    lowers the transformers to bf16/fp16. `submit` returns a future. On CUDA the batches run
    in order on one worker thread, so the caller decodes, adds up and encodes while the GPU
    computes (the network itself waits for the GPU at points, e.g. torch.istft's window
    check, which would otherwise stall the caller); chunks go up from pinned memory. On the
    CPU, where the network already uses every core, a batch runs when it is submitted.

    :meth:`use_compiled` hands over a compiled network for batches of exactly `shape`
    (batch, channels, samples), at any time (see :mod:`stemsep.compilation`): each batch
    reads it once, so the swap happens between batches. Batches of fewer chunks are padded
    with silent chunks to that shape, so it never recompiles, and chunks of another length
    (a song shorter than one chunk) go through the eager `model`. If CUDA runs out of
    memory, a compiled network is dropped first (eager runs the chunks unpadded), then the
    batch is split in halves (and later batches stay at the smaller size) down to a single
    chunk before giving up. The views :meth:`with_tta` makes share
    all of this with the runner.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None):
        self.model, self.device = model, torch.device(device)
        self.autocast_dtype = autocast_dtype
        self._shared = _RunnerState()
        self.tta = False  # see with_tta
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="stemsep-gpu") if self.device.type == "cuda" else None

    @property
    def compiled(self) -> CompiledNetwork | None:
        """The compiled network in use, if any."""
        return self._shared.compiled

    def use_compiled(self, network: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, int, int]) -> None:
        """Run batches of `shape` through `network` from the next batch on; refused (an
        error) once the GPU has run out of memory, since its shape is what did not fit."""
        if self._shared.out_of_memory:
            raise StemsepError(f"the GPU ran out of memory meanwhile, so the network compiled for batches of {shape[0]} is not used")
        self._shared.compiled = CompiledNetwork(network, tuple(shape))

    def __call__(self, chunks: np.ndarray) -> torch.Tensor:  # (batch, channels, samples) -> (batch, stems, channels, samples), float32, CPU
        return self.submit(chunks).result()

    def submit(self, chunks: np.ndarray) -> Future[torch.Tensor]:
        if self.worker is not None:  # in the caller's context: what it prints or warns lands in the caller's logs
            return self.worker.submit(contextvars.copy_context().run, self.compute, chunks)
        done: Future[torch.Tensor] = Future()
        done.set_result(self.compute(chunks))
        return done

    def compute(self, chunks: np.ndarray) -> torch.Tensor:
        limit = self._shared.max_batch or len(chunks)
        if len(chunks) > limit:
            return torch.cat([self.compute(chunks[i : i + limit]) for i in range(0, len(chunks), limit)])
        try:
            return self._forward(chunks)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            self._shared.out_of_memory = True
            if self._shared.compiled is not None:  # its batches are padded to its shape: eager runs just the chunks
                self._shared.compiled = None
                warnings.warn("GPU out of memory: continuing with the eager network", stacklevel=2)
                return self.compute(chunks)
            if len(chunks) == 1:
                raise StemsepError(
                    "the GPU ran out of memory on a single chunk; free GPU memory or run on the CPU"
                ) from None
            self._shared.max_batch = len(chunks) // 2
            warnings.warn(f"GPU out of memory: continuing with {len(chunks) // 2} chunks per batch", stacklevel=2)
            return self.compute(chunks)

    def _forward(self, chunks: np.ndarray) -> torch.Tensor:
        count = len(chunks)
        batch = torch.from_numpy(np.ascontiguousarray(chunks))  # (count, channels, samples)
        network, compiled = self.model, self._shared.compiled  # read once: a swap takes effect from the next batch
        if compiled is not None and compiled.shape[1:] == batch.shape[1:]:
            network = compiled.network
            if count < compiled.shape[0]:
                batch = torch.cat([batch, batch.new_zeros(compiled.shape[0] - count, *batch.shape[1:])])
        return self.apply(network, batch)[:count]

    def apply(self, network: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        """`network` (the eager model or a compiled one) on `batch` (batch, channels, samples),
        on this runner's device and precision: (batch, stems, channels, samples), float32, CPU."""
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        amp = torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
        with torch.inference_mode(), amp:
            batch = batch.to(self.device, non_blocking=True)
            return estimate(network, batch, tta=self.tta).cpu()  # (batch, stems, channels, samples)

    def with_tta(self, tta: bool = True) -> BatchRunner:
        """A view of this runner (same network, worker, compiled network and batch limit),
        averaging over test-time augmentations (:func:`stemsep.apply.estimate`) when `tta` is true."""
        if tta == self.tta:
            return self
        other = copy.copy(self)
        other.tta = tta
        return other


@dataclass(frozen=True)
class CompiledNetwork:
    network: Callable[[torch.Tensor], torch.Tensor]
    shape: tuple[int, int, int]  # the one batch shape it takes: (batch, channels, samples)


@dataclass
class _RunnerState:
    """What a runner shares with its :meth:`BatchRunner.with_tta` views."""

    compiled: CompiledNetwork | None = None
    max_batch: int | None = None  # lowered after an out-of-memory error
    out_of_memory: bool = False  # once true, no compiled network is taken
