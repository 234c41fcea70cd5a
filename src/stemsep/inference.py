"""Apply the network to a signal of any length: chunking, batching and overlap-add.

The signal (at the model's sample rate) is cut into chunks of the config's `chunk_size`,
one every `chunk_size / overlap` samples, so every sample is covered by `overlap` chunks.
The borders are reflect-padded by `chunk_size - step` so the first and last samples are
covered as often as the middle ones. Chunks go through the network `batch_size` at a time;
each output chunk is weighted by a window (Hann when chunks overlap, flat when they don't)
and summed, and the sum is divided by the summed weights, so every sample's estimate is a
proper weighted mean whatever the length. This module knows nothing about files or formats.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

ProgressCallback = Callable[[int, int], None]  # (chunks done, chunks total)


@dataclass(frozen=True)
class ChunkPlan:
    """Where the chunks of a `length`-sample signal start, in the border-padded signal."""

    length: int
    chunk: int
    step: int
    border: int  # padding before the signal (and at least this much after it)
    count: int  # number of chunks

    @property
    def padded_length(self) -> int:
        return (self.count - 1) * self.step + self.chunk

    def starts(self) -> range:
        return range(0, self.count * self.step, self.step)


def plan_chunks(length: int, chunk: int, overlap: int) -> ChunkPlan:
    """Chunks of `chunk` samples every `chunk // overlap`, covering each sample `overlap` times."""
    if length < 1 or chunk < 1 or overlap < 1:
        raise ValueError("length, chunk and overlap must be positive")
    step = max(1, chunk // overlap)
    border = chunk - step
    count = max(1, math.ceil((length + 2 * border - chunk) / step) + 1)
    return ChunkPlan(length, chunk, step, border, count)


def chunk_window(plan: ChunkPlan) -> torch.Tensor:
    """Weights for one output chunk: flat without overlap, else a Hann taper (low weight at the
    chunk edges, where the network sees the least context). The periodic Hann window is zero
    only at its first sample, and with overlap >= 2 every real sample is also covered by a
    chunk whose window is positive there, so the summed weights never vanish."""
    if plan.step == plan.chunk:
        return torch.ones(plan.chunk)
    return torch.hann_window(plan.chunk, periodic=True)  # (chunk,)


def reflect_indices(positions: np.ndarray, length: int) -> np.ndarray:
    """Map positions outside [0, length) back inside by mirroring at the ends (numpy 'reflect',
    repeated as often as needed, so signals shorter than the padding still work)."""
    if length == 1:
        return np.zeros_like(positions)
    period = 2 * (length - 1)
    folded = np.abs(positions) % period
    return np.where(folded >= length, period - folded, folded)


def padded_chunk(signal: np.ndarray, plan: ChunkPlan, start: int) -> np.ndarray:
    """The chunk starting at `start` in the border-padded signal. signal: (..., length)."""
    first = start - plan.border
    if first >= 0 and first + plan.chunk <= plan.length:
        return signal[..., first : first + plan.chunk]
    return signal[..., reflect_indices(np.arange(first, first + plan.chunk), plan.length)]


def separate_chunks(
    model: torch.nn.Module,
    signal: np.ndarray,
    *,
    chunk: int,
    overlap: int,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    on_progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Run `model` over `signal` (groups, channels, samples) float32; return the same shape.

    Each group (e.g. a stereo pair) is chunked independently; chunks of all groups share
    the batches. The result for a sample does not depend on `batch_size` beyond float
    round-off.
    """
    groups, channels, length = signal.shape
    plan = plan_chunks(length, chunk, overlap)
    window = chunk_window(plan)
    device = torch.device(device)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()

    output = torch.zeros(groups, channels, plan.padded_length)
    weight = torch.zeros(plan.padded_length)
    for start in plan.starts():
        weight[start : start + plan.chunk] += window
    jobs = [(g, start) for start in plan.starts() for g in range(groups)]
    done = 0
    with torch.inference_mode():
        for i in range(0, len(jobs), batch_size):
            batch = jobs[i : i + batch_size]
            chunks = np.stack([padded_chunk(signal[g], plan, start) for g, start in batch])  # (batch, channels, chunk)
            with amp:
                estimate = model(torch.from_numpy(chunks).to(device)).float().cpu()  # (batch, channels, chunk)
            for (g, start), est in zip(batch, estimate):
                output[g, :, start : start + plan.chunk] += est * window
            done += len(batch)
            if on_progress:
                on_progress(done, len(jobs))
    inner = slice(plan.border, plan.border + length)
    return (output[..., inner] / weight[inner]).numpy()
