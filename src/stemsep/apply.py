"""Apply the network and combine estimates: test-time augmentation and ensembles.

Two ways of averaging estimates, both here. Test-time augmentation (MSST's `use_tta`
scheme) averages, per batch of chunks, the network's estimate of the chunks as they are,
with the stereo channels swapped and with the polarity inverted, each transform undone on
its estimate (:func:`estimate`, which :class:`stemsep.runner.BatchRunner` calls). An
ensemble (MSST's `avg_wave`) averages, per song, the estimates of several models of the same
stems, each run on its own chunk schedule at its own rate (:func:`ensemble`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from stemsep.chunking import ProgressCallback, take

Network = Callable[[torch.Tensor], torch.Tensor]  # (batch, channels, samples) -> (batch, stems, channels, samples)
Song = Iterator[tuple[np.ndarray, np.ndarray]]  # (mix (channels, n), estimates (stems, channels, n)) blocks


def estimate(network: Network, batch: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """The float32 estimate (batch, stems, channels, samples) of `network` for `batch`
    (batch, channels, samples); with `tta`, the mean over the test-time augmentations of the
    module docstring. A mono network has no channels to swap: the mean of two. Three network
    passes (two for mono) instead of one."""
    views = [network(batch).float()]
    if tta:
        if batch.shape[1] == 2:
            views.append(network(batch.flip(1)).float().flip(2))  # swap the channels, and back
        views.append(-network(-batch).float())
        return torch.stack(views).mean(dim=0)
    return views[0]


def ensemble(
    members: Sequence[Callable[[Iterable[np.ndarray], ProgressCallback | None], Song]],
    blocks: Iterable[np.ndarray],
    on_progress: ProgressCallback | None = None,
) -> Song:
    """An ensemble's song: each of `members` (one per model: (blocks, progress) -> its song)
    runs on the same (channels, n) blocks, decoded once, and the result is the mean of their
    estimates, in (mix, estimates) blocks; `on_progress` gets their chunks added up."""
    done = [0] * len(members)
    total = [0] * len(members)

    def progress_of(i: int) -> ProgressCallback | None:
        if on_progress is None:
            return None

        def report(d: int, t: int) -> None:
            done[i], total[i] = d, t
            on_progress(sum(done), sum(total))

        return report

    copies = itertools.tee(blocks, len(members))
    return _mean_of([member(copy, progress_of(i)) for i, (member, copy) in enumerate(zip(members, copies))])


def _mean_of(songs: list[Song]) -> Song:
    """Merge songs' (mix, estimates) blocks, which cover the same input but in blocks of
    different sizes, into (mix, mean of the estimates) blocks: pull from whichever song is
    furthest behind, hand out what all of them have."""
    mixes: list[np.ndarray] = []  # the first song's mix blocks not yet handed out
    held: list[list[np.ndarray]] = [[] for _ in songs]  # each song's estimates not yet handed out
    have = [0] * len(songs)
    ended = [False] * len(songs)
    while not all(ended):
        i = min((j for j in range(len(songs)) if not ended[j]), key=lambda j: have[j])
        try:
            mix, estimates = next(songs[i])
        except StopIteration:
            ended[i] = True
            continue
        held[i].append(estimates)
        have[i] += estimates.shape[-1]
        if i == 0:
            mixes.append(mix)
        ready = min(have)
        if ready:
            parts = [take(h, ready) for h in held]
            have = [n - ready for n in have]
            yield take(mixes, ready), sum(parts[1:], parts[0]) / len(parts)
