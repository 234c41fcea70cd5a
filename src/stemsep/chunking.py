"""Cut a song into chunks for the network and add the estimates back up: chunking,
overlap-add and the song's way through the network, block by block.

The signal (at the model's sample rate) is cut into chunks of the config's `chunk_size`,
one every `chunk_size / overlap` samples from the start, plus one last chunk flush with
the end, so every sample is covered by about `overlap` chunks and no chunk hangs over the
signal: the network only ever sees real samples (the chunk schedule of audio-separator and
ZFTurbo's MSST, so at the same overlap both do the same number of forward passes). A signal
shorter than a chunk is one chunk of its own length. Chunks go through the network
`batch_size` at a time (a :class:`stemsep.runner.BatchRunner` puts them on the device);
each output chunk is weighted by a window and summed, and the sum is divided by the summed
weights, so every sample's estimate is a proper weighted mean. The window is a Hann taper
(low weight at chunk edges, where the network sees the least context), flat on the outer
half of the first and last chunks, where no other chunk covers the signal, and flat
everywhere when chunks do not overlap. :func:`separate_song` takes a song at its own rate
and channels there and back (:mod:`stemsep.resample`). This module knows nothing about
files or formats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from stemsep.errors import AudioDecodeError
from stemsep.resample import StreamResampler, resampled_length

ProgressCallback = Callable[[int, int], None]  # (chunks done, chunks total)
RESAMPLE_PAD_S = 0.05  # reflected context added around a song before resampling (soxr HQ rings ~ms)


class Runner(Protocol):
    """What puts batches of chunks through the network (:class:`stemsep.runner.BatchRunner`)."""

    def submit(self, chunks: np.ndarray) -> Future[torch.Tensor]:
        """(batch, channels, samples) -> a future of (batch, stems, channels, samples), float32, CPU."""


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
        run: Runner,
        *,
        groups: int,
        channels: int,
        chunk: int,
        overlap: int,
        stems: int = 1,
        batch_size: int = 1,
        on_progress: ProgressCallback | None = None,
        expected_length: int | None = None,
    ):
        self.run = run
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
    run: Runner,
    signal: np.ndarray,
    *,
    chunk: int,
    overlap: int,
    stems: int = 1,
    batch_size: int = 1,
    on_progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Run the network of `run` over a whole `signal` (groups, channels, samples) float32; the estimates
    come out (groups, stems, channels, samples).

    The one-block case of :class:`StreamingSeparation`. The result for a sample does not
    depend on `batch_size` beyond float round-off.
    """
    groups, channels, length = signal.shape
    stream = StreamingSeparation(
        run, groups=groups, channels=channels, chunk=chunk, overlap=overlap, stems=stems, batch_size=batch_size,
        on_progress=on_progress, expected_length=length,
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
    run: Runner,
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
