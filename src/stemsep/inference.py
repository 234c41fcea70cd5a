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
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from stemsep.errors import StemsepError

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


class BatchRunner:
    """Puts one batch of chunks through the network: device transfer, precision, and the
    fallbacks a long job needs.

    The STFT/iSTFT and mask multiply stay float32 inside the model; autocast (`autocast_dtype`)
    lowers the transformers to bf16/fp16. `submit` returns a future. On CUDA the batches run
    in order on one worker thread, so the caller decodes, adds up and encodes while the GPU
    computes (the network itself waits for the GPU at points, e.g. torch.istft's window
    check, which would otherwise stall the caller); chunks go up from pinned memory. On the
    CPU, where the network already uses every core, a batch runs when it is submitted.
    `fixed_batch` pads short batches with silent chunks, so a compiled model sees one shape
    and never recompiles. If CUDA runs out of memory, the batch is split in halves (and later
    batches stay at the smaller size) down to a single chunk before giving up.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
        fixed_batch: int | None = None,
    ):
        self.model, self.device = model, torch.device(device)
        self.autocast_dtype, self.fixed_batch = autocast_dtype, fixed_batch
        self.max_batch: int | None = None  # lowered after an out-of-memory error
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="stemsep-gpu") if self.device.type == "cuda" else None

    def __call__(self, chunks: np.ndarray) -> torch.Tensor:  # (batch, channels, chunk) -> same, float32, CPU
        return self.submit(chunks).result()

    def submit(self, chunks: np.ndarray) -> Future[torch.Tensor]:
        if self.worker is not None:
            return self.worker.submit(self.compute, chunks)
        done: Future[torch.Tensor] = Future()
        done.set_result(self.compute(chunks))
        return done

    def compute(self, chunks: np.ndarray) -> torch.Tensor:
        limit = self.max_batch or len(chunks)
        if len(chunks) > limit:
            return torch.cat([self.compute(chunks[i : i + limit]) for i in range(0, len(chunks), limit)])
        try:
            return self._forward(chunks)
        except torch.OutOfMemoryError:
            if len(chunks) == 1:
                raise StemsepError(
                    "the GPU ran out of memory on a single chunk; free GPU memory or use --device cpu"
                ) from None
            torch.cuda.empty_cache()
            self.max_batch = len(chunks) // 2
            warnings.warn(f"GPU out of memory: continuing with {self.max_batch} chunks per batch", stacklevel=2)
            return self.compute(chunks)

    def _forward(self, chunks: np.ndarray) -> torch.Tensor:
        count = len(chunks)
        batch = torch.from_numpy(np.ascontiguousarray(chunks))
        if self.fixed_batch and count < self.fixed_batch:
            batch = torch.cat([batch, batch.new_zeros(self.fixed_batch - count, *batch.shape[1:])])
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        amp = torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
        with torch.inference_mode(), amp:
            estimate = self.model(batch.to(self.device, non_blocking=True))
        return estimate[:count].float().cpu()


class StreamingSeparation:
    """Overlap-add separation of a signal that arrives in blocks, in bounded memory.

    `push(block)` takes the next (groups, channels, n) samples and returns the output samples
    that are final (every chunk covering them has been through the network); `finish()` ends
    the signal and returns the rest. Chunks are cut, batched and summed in the same order
    whatever the block sizes, so the output does not depend on how the input was split.
    Memory holds a few chunks of input and output, whatever the signal's length.
    """

    def __init__(
        self,
        model: torch.nn.Module | BatchRunner,
        *,
        groups: int,
        channels: int,
        chunk: int,
        overlap: int,
        batch_size: int = 1,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
        on_progress: ProgressCallback | None = None,
        expected_length: int | None = None,
    ):
        self.run = model if isinstance(model, BatchRunner) else BatchRunner(model, device, autocast_dtype)
        self.groups, self.channels = groups, channels
        self.chunk, self.overlap = chunk, overlap
        plan = plan_chunks(1, chunk, overlap)  # step, border and window do not depend on the length
        self.step, self.border, self.window = plan.step, plan.border, chunk_window(plan)
        self.batch_size = batch_size
        self.on_progress = on_progress
        self.expected_jobs = plan_chunks(expected_length, chunk, overlap).count * groups if expected_length else 0

        empty = np.zeros((groups, channels, 0), np.float32)
        self.head = empty  # the first border + 1 samples: the start is mirrored from them
        self.input, self.input_base, self.received = empty, 0, 0  # input[..., i] is sample input_base + i
        self.next_start = 0  # padded position of the next chunk to cut
        self.queue: list[tuple[int, int, np.ndarray]] = []  # (group, start, samples) awaiting a batch
        self.in_flight: tuple[list[tuple[int, int]], Future[torch.Tensor]] | None = None  # the batch on the GPU: (group, start)s
        self.output = torch.zeros(groups, channels, 0)  # weighted sums; output[..., i] is padded position output_base + i
        self.weight = torch.zeros(0)
        self.output_base = 0
        self.done = 0

    def push(self, block: np.ndarray) -> np.ndarray:
        block = np.asarray(block, np.float32)
        if self.head.shape[-1] <= self.border:
            self.head = np.concatenate([self.head, block[..., : self.border + 1 - self.head.shape[-1]]], axis=-1)
        self.input = np.concatenate([self.input, block], axis=-1)
        self.received += block.shape[-1]
        # Before the end is known, cut the chunks whose samples (and mirrored head) have all arrived.
        while self.received > self.border and self.next_start - self.border + self.chunk <= self.received:
            self._cut(np.abs(np.arange(self.next_start - self.border, self.next_start - self.border + self.chunk)))
        in_flight = self.in_flight[0] if self.in_flight else []
        waiting = [start for _, start, _ in self.queue] + [start for _, start in in_flight]
        return self._emit(upto=min(waiting + [self.next_start]))

    def finish(self) -> np.ndarray:
        if self.received == 0:
            return self.input
        count = plan_chunks(self.received, self.chunk, self.overlap).count
        while self.next_start < count * self.step:
            first = self.next_start - self.border
            self._cut(reflect_indices(np.arange(first, first + self.chunk), self.received))
        self._run_batch()
        self._add_up(self.in_flight)
        self.in_flight = None
        return self._emit(upto=self.border + self.received)

    def _cut(self, positions: np.ndarray) -> None:
        """Queue the chunk made of signal samples at `positions` for every group."""
        first = positions[0] - self.input_base
        if positions[-1] - positions[0] == self.chunk - 1 and first >= 0 and first + self.chunk <= self.input.shape[-1]:
            samples = self.input[..., first : first + self.chunk]  # a plain run of held samples: no gather
        else:  # mirrored at a border
            in_head = positions < self.head.shape[-1]
            samples = np.empty((self.groups, self.channels, self.chunk), np.float32)
            samples[..., in_head] = self.head[..., positions[in_head]]
            samples[..., ~in_head] = self.input[..., positions[~in_head] - self.input_base]
        for g in range(self.groups):
            self.queue.append((g, self.next_start, samples[g]))
            if len(self.queue) == self.batch_size:
                self._run_batch()
        self.next_start += self.step
        # Keep one chunk of history before the next chunk: mirroring at the end reaches back that far.
        drop = self.next_start - self.border - self.chunk - self.input_base
        if drop > 0:
            self.input, self.input_base = self.input[..., drop:], self.input_base + drop

    def _run_batch(self) -> None:
        """Send the queued chunks to the network, then add up the batch sent before this one:
        the GPU works on the new batch while the host sums the last (same order as sending)."""
        if not self.queue:
            return
        batch = np.stack([samples for _, _, samples in self.queue])  # (batch, channels, chunk)
        in_flight, self.in_flight = self.in_flight, ([(g, start) for g, start, _ in self.queue], self.run.submit(batch))
        self.queue = []
        self._add_up(in_flight)

    def _add_up(self, in_flight: tuple[list[tuple[int, int]], Future[torch.Tensor]] | None) -> None:
        if in_flight is None:
            return
        positions, pending = in_flight
        estimate = pending.result()  # (batch, channels, chunk)
        grow = positions[-1][1] + self.chunk - self.output_base - self.output.shape[-1]
        if grow > 0:
            self.output = torch.cat([self.output, torch.zeros(self.groups, self.channels, grow)], dim=-1)
            self.weight = torch.cat([self.weight, torch.zeros(grow)])
        for (g, start), est in zip(positions, estimate):
            at = start - self.output_base
            self.output[g, :, at : at + self.chunk] += est * self.window
            if g == 0:  # one weight window per chunk position, whatever the number of groups
                self.weight[at : at + self.chunk] += self.window
        self.done += len(positions)
        if self.on_progress:
            self.on_progress(self.done, max(self.done, self.expected_jobs))

    def _emit(self, upto: int) -> np.ndarray:
        """Hand out the samples before padded position `upto` (no later chunk touches them),
        normalized by their summed weights, minus the border padding."""
        upto = min(upto, self.border + self.received)
        ready = upto - self.output_base
        if ready <= 0:
            return np.zeros((self.groups, self.channels, 0), np.float32)
        finished = (self.output[..., :ready] / self.weight[:ready]).numpy()
        self.output, self.weight = self.output[..., ready:], self.weight[ready:]
        skip = max(0, self.border - self.output_base)  # samples of the leading padding
        self.output_base = upto
        return finished[..., skip:]


def separate_chunks(
    model: torch.nn.Module | BatchRunner,
    signal: np.ndarray,
    *,
    chunk: int,
    overlap: int,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    on_progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Run `model` over a whole `signal` (groups, channels, samples) float32; same shape out.

    The one-block case of :class:`StreamingSeparation`. The result for a sample does not
    depend on `batch_size` beyond float round-off.
    """
    groups, channels, length = signal.shape
    stream = StreamingSeparation(
        model, groups=groups, channels=channels, chunk=chunk, overlap=overlap, batch_size=batch_size,
        device=device, autocast_dtype=autocast_dtype, on_progress=on_progress, expected_length=length,
    )
    return np.concatenate([stream.push(signal), stream.finish()], axis=-1)
