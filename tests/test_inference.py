"""Chunking and overlap-add: coverage, exact length, seamless joins, batch-size invariance.

The stand-in networks map (batch, channels, samples) to (batch, stems, channels, samples),
as every stemsep network does."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stemsep.chunking import StreamingSeparation, chunk_window, from_groups, plan_chunks, separate_chunks, to_groups
from stemsep.runner import BatchRunner


class Gain(torch.nn.Module):
    """A stand-in network whose output is known: a constant gain."""

    def __init__(self, gain=1.0):
        super().__init__()
        self.gain = gain

    def forward(self, x):
        return (x * self.gain).unsqueeze(1)


class ChunkMean(torch.nn.Module):
    """Output depends on the whole chunk (its mean), like a real network's context."""

    def forward(self, x):
        return (x + x.mean(dim=-1, keepdim=True)).unsqueeze(1)


def streamed_chunk_starts(length: int, chunk: int, overlap: int, block: int = 97) -> list[int]:
    """Where the streaming separation cuts its chunks, fed in blocks: the signal is its own
    sample index, so each chunk's first sample says where it starts."""
    model = RecordsChunks()
    stream = StreamingSeparation(BatchRunner(model), groups=1, channels=1, chunk=chunk, overlap=overlap)
    signal = np.arange(length, dtype=np.float32).reshape(1, 1, length)
    for start in range(0, length, block):
        stream.push(signal[..., start : start + block])
    stream.finish()
    return model.starts


@settings(max_examples=150, deadline=None)
@given(length=st.integers(1, 3000), chunk=st.integers(1, 500), overlap=st.integers(1, 16))
def test_chunks_cover_every_sample_overlap_times_inside_the_signal_and_weights_never_vanish(length, chunk, overlap):
    plan = plan_chunks(length, chunk, overlap)
    starts = streamed_chunk_starts(length, chunk, overlap)
    assert len(starts) == plan.count and starts == sorted(set(starts))
    assert starts[0] == 0 and starts[-1] + plan.chunk == length  # none hangs over either end
    assert plan.chunk == min(chunk, length)
    coverage = np.zeros(length, int)
    weight = np.zeros(length)
    for i, start in enumerate(starts):
        coverage[start : start + plan.chunk] += 1
        window = chunk_window(plan.chunk, plan.step, first=i == 0, last=i == len(starts) - 1).numpy()
        weight[start : start + plan.chunk] += window
    assert (weight > 0).all()
    assert (coverage >= 1).all()
    edge = max(0, plan.chunk - plan.step)  # within this of either end, fewer chunks can reach a sample
    assert (coverage[edge : length - edge] >= plan.chunk // plan.step).all()


def test_chunk_schedule_is_audio_separators():
    """One chunk every step while a chunk fits before the end, then one flush with the end:
    audio-separator 0.47.1's `_roformer_chunk_starts` for the same length, chunk and overlap."""
    mdxc = pytest.importorskip("audio_separator.separator.architectures.mdxc_separator").MDXCSeparator
    for length, chunk, overlap in [(1000, 100, 2), (1050, 100, 4), (100, 100, 4), (57, 100, 2), (352800 * 3 + 7, 352800, 4)]:
        step = chunk // overlap
        expected = mdxc._roformer_chunk_starts(length, chunk, step)
        assert streamed_chunk_starts(length, chunk, overlap, block=44100) == expected


def test_windows_taper_inside_and_hold_flat_at_the_signal_edges():
    hann = torch.hann_window(8, periodic=True)
    assert torch.equal(chunk_window(8, 4), hann)
    assert torch.equal(chunk_window(8, 4, first=True), torch.cat([torch.ones(4), hann[4:]]))
    assert torch.equal(chunk_window(8, 4, last=True), torch.cat([hann[:4], torch.ones(4)]))
    assert torch.equal(chunk_window(8, 8), torch.ones(8))  # no overlap: flat
    assert torch.equal(chunk_window(5, 4, first=True, last=True), torch.ones(5))  # a lone chunk


class RecordsChunks(torch.nn.Module):
    """The identity, remembering the shape of every batch it was given."""

    def __init__(self):
        super().__init__()
        self.shapes = []
        self.starts = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        self.starts.extend(int(c) for c in x[:, 0, 0])  # the signal is its own sample index
        return x.unsqueeze(1)


def test_a_signal_shorter_than_a_chunk_is_one_chunk_of_its_own_length():
    model = RecordsChunks()
    signal = np.random.default_rng(0).standard_normal((2, 2, 333)).astype(np.float32)
    out = separate_chunks(BatchRunner(model), signal, chunk=1000, overlap=4, batch_size=4)
    assert model.shapes == [(2, 2, 333)] and np.array_equal(out[:, 0], signal)


def test_the_network_runs_as_many_chunks_as_audio_separator():
    model = RecordsChunks()
    separate_chunks(BatchRunner(model), np.zeros((1, 2, 10_000), np.float32), chunk=1000, overlap=4, batch_size=1)
    assert len(model.shapes) == plan_chunks(10_000, 1000, 4).count == 37  # ceil((10000 - 1000) / 250) + 1


@pytest.mark.parametrize("overlap", [1, 2, 4, 8])
@pytest.mark.parametrize("length", [1, 99, 100, 101, 1234])
def test_identity_network_reproduces_the_input_exactly_at_any_length(overlap, length):
    signal = np.random.default_rng(0).standard_normal((3, 2, length)).astype(np.float32)
    out = separate_chunks(BatchRunner(Gain(1.0)), signal, chunk=100, overlap=overlap, batch_size=3)
    assert out.shape == (3, 1, 2, length)
    np.testing.assert_allclose(out[:, 0], signal, rtol=0, atol=1e-6)


def test_overlap_add_has_no_bump_at_chunk_boundaries():
    """A constant-gain network on a constant signal: any seam error would show as a bump."""
    signal = np.ones((1, 2, 10_000), np.float32)
    out = separate_chunks(BatchRunner(Gain(0.5)), signal, chunk=256, overlap=4)
    assert np.abs(out - 0.5).max() < 1e-6


def test_batch_size_does_not_change_the_result():
    signal = np.random.default_rng(1).standard_normal((2, 2, 3000)).astype(np.float32)
    reference = separate_chunks(BatchRunner(ChunkMean()), signal, chunk=256, overlap=4, batch_size=1)
    for batch_size in (2, 5, 64):
        out = separate_chunks(BatchRunner(ChunkMean()), signal, chunk=256, overlap=4, batch_size=batch_size)
        np.testing.assert_allclose(out, reference, rtol=0, atol=1e-6)


def test_progress_reports_every_batch_up_to_the_total():
    seen = []
    separate_chunks(BatchRunner(Gain()), np.zeros((1, 2, 1000), np.float32), chunk=100, overlap=2, batch_size=4,
                    on_progress=lambda done, total: seen.append((done, total)))
    total = plan_chunks(1000, 100, 2).count
    assert seen[-1] == (total, total) and [d for d, _ in seen] == sorted(d for d, _ in seen)


@settings(max_examples=60, deadline=None)
@given(
    length=st.integers(1, 3000),
    overlap=st.integers(1, 8),
    batch_size=st.integers(1, 5),
    groups=st.integers(1, 3),
    cuts=st.lists(st.integers(0, 3000), max_size=12),
)
def test_streaming_in_blocks_is_bit_identical_to_the_whole_signal(length, overlap, batch_size, groups, cuts):
    signal = np.random.default_rng(length).standard_normal((groups, 2, length)).astype(np.float32)
    whole = separate_chunks(BatchRunner(ChunkMean()), signal, chunk=128, overlap=overlap, batch_size=batch_size)
    stream = StreamingSeparation(BatchRunner(ChunkMean()), groups=groups, channels=2, chunk=128, overlap=overlap, batch_size=batch_size)
    edges = sorted({0, length, *(c for c in cuts if c < length)})
    parts = [stream.push(signal[..., a:b]) for a, b in zip(edges[:-1], edges[1:])]
    parts.append(stream.finish())
    streamed = np.concatenate(parts, axis=-1)
    assert streamed.shape == whole.shape
    assert np.array_equal(streamed, whole)


def test_streaming_memory_stays_a_few_chunks_whatever_the_length():
    stream = StreamingSeparation(BatchRunner(Gain()), groups=1, channels=2, chunk=256, overlap=4, batch_size=2)
    block = np.ones((1, 2, 1000), np.float32)
    largest = 0
    for _ in range(200):
        stream.push(block)
        largest = max(largest, stream.input.shape[-1], stream.output.shape[-1])
    assert largest <= 1000 + 3 * 256  # one block plus a few chunks, after 200,000 samples


class Stems(torch.nn.Module):
    """A stand-in multi-stem network: stem i is the input times gains[i]."""

    def __init__(self, gains):
        super().__init__()
        self.gains = torch.tensor(gains)

    def forward(self, x):  # (b, c, n) -> (b, stems, c, n)
        return x.unsqueeze(1) * self.gains.view(1, -1, 1, 1)


@pytest.mark.parametrize("overlap", [1, 3])
def test_each_stem_of_a_multi_stem_network_is_overlap_added_on_its_own(overlap):
    signal = np.random.default_rng(2).standard_normal((2, 2, 2345)).astype(np.float32)
    out = separate_chunks(BatchRunner(Stems([1.0, 0.5, 0.0, -2.0])), signal, chunk=300, overlap=overlap, stems=4, batch_size=3)
    assert out.shape == (2, 4, 2, 2345)
    for i, gain in enumerate([1.0, 0.5, 0.0, -2.0]):
        np.testing.assert_allclose(out[:, i], gain * signal, rtol=0, atol=1e-5)


def test_channel_groups_pair_stereo_and_give_back_the_song_channels():
    mix = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)  # 5 channels
    pairs = to_groups(mix, 2)  # (3, 2, 4): 1+2, 3+4, 5 as dual mono
    assert pairs.shape == (3, 2, 4) and np.array_equal(pairs[2, 0], pairs[2, 1])
    assert np.array_equal(from_groups(pairs[:, None], 5)[0], mix)
    singles = to_groups(mix, 1)  # a mono network takes each channel alone
    assert singles.shape == (5, 1, 4)
    stacked = np.stack([singles, 2 * singles], axis=1)  # two stems
    assert np.array_equal(from_groups(stacked, 5), np.stack([mix, 2 * mix]))
