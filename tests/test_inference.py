"""Chunking and overlap-add: coverage, exact length, seamless joins, batch-size invariance."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stemsep.inference import chunk_window, padded_chunk, plan_chunks, reflect_indices, separate_chunks


class Gain(torch.nn.Module):
    """A stand-in network whose output is known: a constant gain."""

    def __init__(self, gain=1.0):
        super().__init__()
        self.gain = gain

    def forward(self, x):
        return x * self.gain


class ChunkMean(torch.nn.Module):
    """Output depends on the whole chunk (its mean), like a real network's context."""

    def forward(self, x):
        return x + x.mean(dim=-1, keepdim=True)


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 5000), chunk=st.integers(1, 700), overlap=st.integers(1, 16))
def test_every_sample_is_covered_by_overlap_chunks_and_weights_never_vanish(length, chunk, overlap):
    plan = plan_chunks(length, chunk, overlap)
    coverage = np.zeros(plan.padded_length, int)
    weight = np.zeros(plan.padded_length)
    window = chunk_window(plan).numpy()
    for start in plan.starts():
        coverage[start : start + chunk] += 1
        weight[start : start + chunk] += window
    real = slice(plan.border, plan.border + length)
    assert (coverage[real] >= min(overlap, chunk)).all()
    if chunk % plan.step == 0:
        assert (coverage[real] == chunk // plan.step).all()
    assert (weight[real] > 0).all()


def test_reflect_indices_mirror_like_numpy_even_for_short_signals():
    for length in (1, 2, 3, 7):
        x = np.arange(length)
        for pad in (0, 1, 5, 23):
            expected = np.pad(x, pad, mode="reflect") if length > 1 else np.full(length + 2 * pad, 0)
            assert (x[reflect_indices(np.arange(-pad, length + pad), length)] == expected).all()


def test_padded_chunk_slices_inside_and_reflects_at_borders():
    signal = np.arange(20, dtype=np.float32)[None]
    plan = plan_chunks(20, 8, 2)  # step 4, border 4
    assert (padded_chunk(signal, plan, 0)[0] == [4, 3, 2, 1, 0, 1, 2, 3]).all()
    assert (padded_chunk(signal, plan, 8)[0] == np.arange(4, 12)).all()


@pytest.mark.parametrize("overlap", [1, 2, 4, 8])
@pytest.mark.parametrize("length", [1, 99, 100, 101, 1234])
def test_identity_network_reproduces_the_input_exactly_at_any_length(overlap, length):
    signal = np.random.default_rng(0).standard_normal((3, 2, length)).astype(np.float32)
    out = separate_chunks(Gain(1.0), signal, chunk=100, overlap=overlap, batch_size=3)
    assert out.shape == signal.shape
    np.testing.assert_allclose(out, signal, rtol=0, atol=1e-6)


def test_overlap_add_has_no_bump_at_chunk_boundaries():
    """A constant-gain network on a constant signal: any seam error would show as a bump."""
    signal = np.ones((1, 2, 10_000), np.float32)
    out = separate_chunks(Gain(0.5), signal, chunk=256, overlap=4)
    assert np.abs(out - 0.5).max() < 1e-6


def test_batch_size_does_not_change_the_result():
    signal = np.random.default_rng(1).standard_normal((2, 2, 3000)).astype(np.float32)
    reference = separate_chunks(ChunkMean(), signal, chunk=256, overlap=4, batch_size=1)
    for batch_size in (2, 5, 64):
        out = separate_chunks(ChunkMean(), signal, chunk=256, overlap=4, batch_size=batch_size)
        np.testing.assert_allclose(out, reference, rtol=0, atol=1e-6)


def test_progress_reports_every_batch_up_to_the_total():
    seen = []
    separate_chunks(Gain(), np.zeros((1, 2, 1000), np.float32), chunk=100, overlap=2, batch_size=4,
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
    from stemsep.inference import StreamingSeparation

    signal = np.random.default_rng(length).standard_normal((groups, 2, length)).astype(np.float32)
    whole = separate_chunks(ChunkMean(), signal, chunk=128, overlap=overlap, batch_size=batch_size)
    stream = StreamingSeparation(ChunkMean(), groups=groups, channels=2, chunk=128, overlap=overlap, batch_size=batch_size)
    edges = sorted({0, length, *(c for c in cuts if c < length)})
    parts = [stream.push(signal[..., a:b]) for a, b in zip(edges[:-1], edges[1:])]
    parts.append(stream.finish())
    streamed = np.concatenate(parts, axis=-1)
    assert streamed.shape == whole.shape
    assert np.array_equal(streamed, whole)


def test_streaming_memory_stays_a_few_chunks_whatever_the_length():
    from stemsep.inference import StreamingSeparation

    stream = StreamingSeparation(Gain(), groups=1, channels=2, chunk=256, overlap=4, batch_size=2)
    block = np.ones((1, 2, 1000), np.float32)
    largest = 0
    for _ in range(200):
        stream.push(block)
        largest = max(largest, stream.input.shape[-1], stream.output.shape[-1])
    assert largest <= 1000 + 3 * 256  # one block plus a few chunks, after 200,000 samples
