"""Apply the network to a signal of any length: chunking, batching and overlap-add.

The signal (at the model's sample rate) is cut into chunks of the config's `chunk_size`,
one every `chunk_size / overlap` samples from the start, plus one last chunk flush with
the end, so every sample is covered by about `overlap` chunks and no chunk hangs over the
signal: the network only ever sees real samples (the chunk schedule of audio-separator and
ZFTurbo's MSST, so at the same overlap both do the same number of forward passes). A signal
shorter than a chunk is one chunk of its own length. Chunks go through the network
`batch_size` at a time; each output chunk is weighted by a window and summed, and the sum
is divided by the summed weights, so every sample's estimate is a proper weighted mean. The
window is a Hann taper (low weight at chunk edges, where the network sees the least
context), flat on the outer half of the first and last chunks, where no other chunk covers
the signal, and flat everywhere when chunks do not overlap. This module knows nothing about
files or formats.
"""

from __future__ import annotations

import contextvars
import copy
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from stemsep.resample import StreamResampler, resampled_length
from stemsep.errors import AudioDecodeError, StemsepError

ProgressCallback = Callable[[int, int], None]  # (chunks done, chunks total)
RESAMPLE_PAD_S = 0.05  # reflected context added around a song before resampling (soxr HQ rings ~ms)


@dataclass(frozen=True)
class ChunkPlan:
    """Where the chunks of a `length`-sample signal start, and how long they are."""

    length: int
    chunk: int  # samples per chunk (the signal's length, if that is shorter)
    step: int

    @property
    def count(self) -> int:
        return math.ceil((self.length - self.chunk) / self.step) + 1


def plan_chunks(length: int, chunk: int, overlap: int) -> ChunkPlan:
    """Chunks of `chunk` samples every `chunk // overlap`, covering each sample about `overlap` times."""
    if length < 1 or chunk < 1 or overlap < 1:
        raise ValueError("length, chunk and overlap must be positive")
    return ChunkPlan(length, min(chunk, length), max(1, chunk // overlap))


def chunk_window(chunk: int, step: int, first: bool = False, last: bool = False) -> torch.Tensor:
    """Weights for one output chunk of `chunk` samples placed every `step`: flat without
    overlap, else a periodic Hann taper, held at its peak over the outer half of the first
    and the last chunk. The taper is zero only at a chunk's first sample, which (with
    overlap >= 2) the chunk before also covers with a positive weight, and the signal's
    first and last half-chunk have weight 1, so the summed weights never vanish."""
    if step >= chunk:
        return torch.ones(chunk)
    window = torch.hann_window(chunk, periodic=True)  # (chunk,), peak 1 at chunk // 2
    if first:
        window[: chunk // 2] = 1.0
    if last:
        window[chunk // 2 :] = 1.0
    return window


# device and precision ------------------------------------------------------------------------


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StemsepError("device 'cuda' was requested but no CUDA GPU is available")
    return device


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto": bf16 on a GPU that has it (fp16 on older ones, e.g. a T4), fp32 on the CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision not in PRECISIONS:
        raise StemsepError(f"precision must be one of auto, {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


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
            estimate = network(batch).float()  # (batch, stems, channels, samples)
            if self.tta:
                estimate = augmented_mean(network, batch, estimate)
        return estimate.cpu()

    def with_tta(self, tta: bool = True) -> BatchRunner:
        """A view of this runner (same network, worker, compiled network and batch limit),
        averaging over the test-time augmentations of :func:`augmented_mean` when `tta` is true."""
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


def augmented_mean(model: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """Test-time augmentation (MSST's `use_tta` scheme): the mean of the network's estimate
    for the chunks as they are (`estimate`, already computed), with the stereo channels
    swapped, and with the polarity inverted, each transform undone on its estimate before
    averaging. A mono network has no channels to swap: the mean of two. Three network passes
    (two for mono) per chunk instead of one."""
    views = [estimate]
    if batch.shape[1] == 2:  # batch: (b, channels, samples); estimate: (b, stems, channels, samples)
        views.append(model(batch.flip(1)).float().flip(2))
    views.append(-model(-batch).float())
    return torch.stack(views).mean(dim=0)


class StreamingSeparation:
    """Overlap-add separation of a signal that arrives in blocks, in bounded memory.

    `push(block)` takes the next (groups, channels, n) samples and returns the (groups, stems,
    channels, n) estimates that are final (every chunk covering them has been through the network); `finish()` ends
    the signal and returns the rest. A chunk on the step grid is cut once the samples after
    it show that it is not the last; the last chunk, flush with the end, once the end is
    known. Chunks are cut, batched and summed in the same order whatever the block sizes, so
    the output does not depend on how the input was split. Memory holds a few chunks of
    input and output, whatever the signal's length.
    """

    def __init__(
        self,
        model: torch.nn.Module | BatchRunner,
        *,
        groups: int,
        channels: int,
        chunk: int,
        overlap: int,
        stems: int = 1,
        batch_size: int = 1,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
        on_progress: ProgressCallback | None = None,
        expected_length: int | None = None,
    ):
        self.run = model if isinstance(model, BatchRunner) else BatchRunner(model, device, autocast_dtype)
        self.groups, self.channels = groups, channels
        self.chunk, self.step = chunk, plan_chunks(1, chunk, overlap).step
        self.batch_size = batch_size
        self.on_progress = on_progress
        self.expected_jobs = plan_chunks(expected_length, chunk, overlap).count * groups if expected_length else 0

        self.stems = stems
        self.input = np.zeros((groups, channels, 0), np.float32)  # input[..., i] is sample input_base + i
        self.input_base = self.received = 0
        self.next_start = 0  # start of the next chunk on the step grid
        self.windows: dict[tuple[int, bool, bool], torch.Tensor] = {}  # (samples, first, last) -> window
        self.queue: list[tuple[int, int, np.ndarray, torch.Tensor]] = []  # (group, start, samples, window) awaiting a batch
        self.in_flight: tuple[list[tuple[int, int, torch.Tensor]], Future[torch.Tensor]] | None = None  # the batch on the GPU
        self.output = torch.zeros(groups, stems, channels, 0)  # weighted sums; output[..., i] is sample output_base + i
        self.weight = torch.zeros(0)
        self.output_base = 0
        self.done = 0

    def push(self, block: np.ndarray) -> np.ndarray:
        self.input = np.concatenate([self.input, np.asarray(block, np.float32)], axis=-1)
        self.received += block.shape[-1]
        while self.next_start + self.chunk < self.received:  # samples after it: not the last chunk
            self._cut(self.next_start, self.chunk, last=False)
            self.next_start += self.step
        last_start = self.received - self.chunk  # the last chunk starts here or later
        keep = min(self.next_start, last_start) - self.input_base
        if keep > 0:
            self.input, self.input_base = self.input[..., keep:], self.input_base + keep
        in_flight = self.in_flight[0] if self.in_flight else []
        waiting = [start for _, start, _, _ in self.queue] + [start for _, start, _ in in_flight]
        return self._emit(upto=min(waiting + [last_start]))

    def finish(self) -> np.ndarray:
        if self.received == 0:
            return self.input
        samples = min(self.chunk, self.received)  # a signal shorter than a chunk is one chunk
        self._cut(self.received - samples, samples, last=True)
        self._run_batch()
        self._add_up(self.in_flight)
        self.in_flight = None
        return self._emit(upto=self.received)

    def _cut(self, start: int, samples: int, last: bool) -> None:
        """Queue the chunk of `samples` samples at `start` for every group."""
        key = (samples, start == 0, last)
        if key not in self.windows:
            self.windows[key] = chunk_window(samples, self.step, first=start == 0, last=last)
        at = start - self.input_base
        chunk = self.input[..., at : at + samples]  # (groups, channels, samples)
        for g in range(self.groups):
            self.queue.append((g, start, chunk[g], self.windows[key]))
            if len(self.queue) == self.batch_size:
                self._run_batch()

    def _run_batch(self) -> None:
        """Send the queued chunks to the network, then add up the batch sent before this one:
        the GPU works on the new batch while the host sums the last (same order as sending)."""
        if not self.queue:
            return
        batch = np.stack([samples for _, _, samples, _ in self.queue])  # (batch, channels, samples)
        sent = [(g, start, window) for g, start, _, window in self.queue]
        in_flight, self.in_flight = self.in_flight, (sent, self.run.submit(batch))
        self.queue = []
        self._add_up(in_flight)

    def _add_up(self, in_flight: tuple[list[tuple[int, int, torch.Tensor]], Future[torch.Tensor]] | None) -> None:
        if in_flight is None:
            return
        chunks, pending = in_flight
        estimate = pending.result()  # (batch, stems, channels, samples)
        grow = max(start + len(window) for _, start, window in chunks) - self.output_base - self.output.shape[-1]
        if grow > 0:
            self.output = torch.cat([self.output, torch.zeros(self.groups, self.stems, self.channels, grow)], dim=-1)
            self.weight = torch.cat([self.weight, torch.zeros(grow)])
        for (g, start, window), est in zip(chunks, estimate):
            at = start - self.output_base
            self.output[g, ..., at : at + len(window)] += est * window
            if g == 0:  # one weight window per chunk position, whatever the number of groups
                self.weight[at : at + len(window)] += window
        self.done += len(chunks)
        if self.on_progress:
            self.on_progress(self.done, max(self.done, self.expected_jobs))

    def _emit(self, upto: int) -> np.ndarray:
        """Hand out the samples before `upto` (no later chunk touches them), normalized by
        their summed weights."""
        ready = upto - self.output_base
        if ready <= 0:
            return np.zeros((self.groups, self.stems, self.channels, 0), np.float32)
        finished = (self.output[..., :ready] / self.weight[:ready]).numpy()
        self.output, self.weight = self.output[..., ready:], self.weight[ready:]
        self.output_base = upto
        return finished


def separate_chunks(
    model: torch.nn.Module | BatchRunner,
    signal: np.ndarray,
    *,
    chunk: int,
    overlap: int,
    stems: int = 1,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    on_progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Run `model` over a whole `signal` (groups, channels, samples) float32; the estimates
    come out (groups, stems, channels, samples).

    The one-block case of :class:`StreamingSeparation`. The result for a sample does not
    depend on `batch_size` beyond float round-off.
    """
    groups, channels, length = signal.shape
    stream = StreamingSeparation(
        model, groups=groups, channels=channels, chunk=chunk, overlap=overlap, stems=stems, batch_size=batch_size,
        device=device, autocast_dtype=autocast_dtype, on_progress=on_progress, expected_length=length,
    )
    return np.concatenate([stream.push(signal), stream.finish()], axis=-1)


# channels ------------------------------------------------------------------------------------


def to_groups(mix: np.ndarray, width: int) -> np.ndarray:
    """(channels, n) -> (groups, width, n): the network's input channels from the song's.
    For a stereo network, channels 1+2, 3+4, ... with a lone last channel as dual-mono; for
    a mono one, each channel alone."""
    if mix.shape[0] % width:
        mix = np.concatenate([mix, mix[-1:]])
    return mix.reshape(mix.shape[0] // width, width, mix.shape[-1])


def from_groups(groups: np.ndarray, channels: int) -> np.ndarray:
    """(groups, stems, width, n) -> (stems, channels, n), the inverse of :func:`to_groups`;
    a dual-mono pair gives back the mean of its two outputs."""
    g, stems, width, n = groups.shape
    flat = groups.transpose(1, 0, 2, 3).reshape(stems, g * width, n)
    if flat.shape[1] > channels:
        flat = np.concatenate([flat[:, : channels - 1], flat[:, channels - 1 :].mean(axis=1, keepdims=True)], axis=1)
    return flat


# a song --------------------------------------------------------------------------------------


def take(blocks: list[np.ndarray], n: int) -> np.ndarray:
    """Remove and return the first `n` samples (last axis) of a queue of blocks."""
    out, got = [], 0
    while got < n:
        block = blocks[0]
        if block.shape[-1] <= n - got:
            out.append(blocks.pop(0))
        else:
            out.append(block[..., : n - got])
            blocks[0] = block[..., n - got :]
        got += out[-1].shape[-1]
    return np.concatenate(out, axis=-1)


def separate_song(
    run: BatchRunner,
    blocks: Iterable[np.ndarray],
    *,
    sample_rate: int,
    model_rate: int,
    channels: int,
    width: int,
    stems: int,
    chunk: int,
    overlap: int,
    batch_size: int,
    min_samples: int,
    on_progress: ProgressCallback | None = None,
    expected_length: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Separate a song arriving as (channels, n) blocks at `sample_rate`: yield aligned
    (mix (channels, n), estimates (stems, channels, n)) blocks at that rate which together
    cover the input exactly.

    The song is resampled to `model_rate`, its channels grouped for a network of `width`
    channels, chunked through `run`, and the estimates brought back to the song's rate and
    channels. Resampling treats the world outside the file as silence, so a file that starts
    or ends mid-waveform would ring for a few ms at its borders: the signal is extended by
    reflection (RESAMPLE_PAD_S each side) before resampling and trimmed afterwards. Memory
    stays a few chunks whatever the length; one block gives the same samples as many. A
    song shorter than `min_samples` at the model's rate raises AudioDecodeError.
    """
    pad_wanted = 0 if sample_rate == model_rate else round(RESAMPLE_PAD_S * sample_rate)
    to_model = StreamResampler(sample_rate, model_rate, channels)
    to_input = StreamResampler(model_rate, sample_rate, stems * channels)
    expected = expected_length and resampled_length(expected_length + 2 * pad_wanted, sample_rate, model_rate)
    chunks = StreamingSeparation(
        run, groups=-(-channels // width), channels=width, chunk=chunk, overlap=overlap, stems=stems,
        batch_size=batch_size, on_progress=on_progress, expected_length=expected,
    )
    mix_waiting: list[np.ndarray] = []  # input blocks whose estimates have not come out yet
    pending: list[np.ndarray] = []  # input held until the leading reflection can be made
    tail = np.zeros((channels, 0), np.float32)  # the last pad + 1 input samples
    pad: int | None = None
    received = delivered = skipped = 0

    def network(x: np.ndarray, last: bool = False) -> np.ndarray:
        """Input-rate samples -> (stems, channels, n) estimates at the input rate (not yet
        trimmed); `last` flushes."""
        x = to_model.process(x)
        if last:
            x = np.concatenate([x, to_model.flush()], axis=-1)
        groups = chunks.push(to_groups(x, width))  # (groups, stems, width, n)
        if last:
            groups = np.concatenate([groups, chunks.finish()], axis=-1)
        y = to_input.process(from_groups(groups, channels).reshape(stems * channels, -1))
        if last:
            y = np.concatenate([y, to_input.flush()], axis=-1)
        return y.reshape(stems, channels, -1)

    def deliver(estimates: np.ndarray, upto: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Drop the leading padding, pair with the mix, never beyond input sample `upto`."""
        nonlocal delivered, skipped
        cut = min(estimates.shape[-1], pad - skipped)
        skipped += cut
        estimates = estimates[..., cut : cut + upto - delivered]
        if estimates.shape[-1]:
            mix = take(mix_waiting, estimates.shape[-1])
            delivered += estimates.shape[-1]
            yield mix, estimates

    for block in blocks:
        block = np.asarray(block, np.float32)
        received += block.shape[-1]
        mix_waiting.append(block)
        if pad is None:
            pending.append(block)
            if received <= pad_wanted:
                continue
            pad, block = pad_wanted, np.concatenate(pending, axis=-1)
            pending = []
            block = np.concatenate([block[:, pad:0:-1], block], axis=-1)  # mirror of samples 1..pad
        tail = np.concatenate([tail, block], axis=-1)[:, -(pad + 1) :]
        yield from deliver(network(block), received)

    if resampled_length(received, sample_rate, model_rate) < min_samples:
        raise AudioDecodeError(
            f"audio is too short to separate ({received} samples at {sample_rate} Hz; "
            f"need at least {min_samples / model_rate * 1000:.0f} ms)"
        )
    if pad is None:  # shorter than the padding: reflect the whole (short) signal at once
        pad = min(pad_wanted, received - 1)
        whole = np.concatenate(pending, axis=-1)
        tail = whole
        yield from deliver(network(np.pad(whole, [(0, 0), (pad, 0)], mode="reflect")), received)
    end = tail[:, -2 : -pad - 2 : -1] if pad else tail[:, :0]  # mirror of the last samples
    yield from deliver(network(end, last=True), received)
    if delivered < received:  # resampling rounded a sample off the end
        yield take(mix_waiting, received - delivered), np.zeros((stems, channels, received - delivered), np.float32)
