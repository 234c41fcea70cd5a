"""From the network's estimates to the stems a user gets, named.

A single-target model (1297 predicts vocals) gives its target and the complement, the mix
minus the target. A multi-stem model gives each stem it predicts. Any stem S a model gives
can also be asked for as a practice track, ``no_S``: the mix minus S (a single-target
model's ``no_<target>`` is its complement and ``no_<complement>`` its target, under the name
asked for). For PCM output every "mix minus" is computed in the integer domain from the
quantized mix and stem, so the two add up to the mix bit-exactly; only a sample outside the
integer range breaks that, and it is clipped and counted. This module knows nothing about
files.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from stemsep.pcm import PCM_BITS, ClipReport, quantize

# A single target's complement (the mix minus the target) by the target's name; any other
# target's is named from the model's config (stemsep.checkpoint.complement_name).
COMPLEMENTS = {"vocals": "instrumental", "instrumental": "vocals"}

PRACTICE_PREFIX = "no_"  # no_<stem>: the mix without that stem


def stem_choices(names: Iterable[str]) -> tuple[str, ...]:
    """Every stem that can be asked of a model giving `names`, in the order a separation
    returns them: `names`, then ``no_<name>`` for each (the practice tracks)."""
    names = tuple(names)
    return tuple(dict.fromkeys((*names, *(PRACTICE_PREFIX + name for name in names))))


@dataclass(frozen=True)
class StemLayout:
    """What a model's network predicts (`predicted`, in its output order) and, for a
    single-target model, the name of the complement (mix - target)."""

    predicted: tuple[str, ...]
    complement: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The model's stems, in order: the predicted ones, then the complement."""
        return self.predicted + ((self.complement,) if self.complement else ())

    @property
    def choices(self) -> tuple[str, ...]:
        """Every stem a separation can give (see :func:`stem_choices`)."""
        return stem_choices(self.names)

    def source(self, name: str) -> tuple[str, bool]:
        """How stem `name` (one of :attr:`choices`) is made: (the predicted stem it comes
        from, whether it is the mix minus that stem). A single-target model's complement and
        ``no_<target>`` are the mix minus the target; its ``no_<complement>`` is the target."""
        if name in self.predicted:
            return name, False
        if name == self.complement:
            return self.predicted[0], True
        removed = name.removeprefix(PRACTICE_PREFIX)
        if removed == self.complement:
            return self.predicted[0], False
        return removed, True


def stem_samples(
    layout: StemLayout, mix: np.ndarray, estimates: np.ndarray, subtype: str | None = None,
    wanted: Sequence[str] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, ClipReport]]:
    """The stems `wanted` (default: the model's, :attr:`StemLayout.names`) of one block as
    they will be written, in that order, and what clipping each needed.

    `mix` is (channels, n), `estimates` (stems, channels, n) float32 in `layout.predicted`
    order. Float output (`subtype` None or "FLOAT"): float32, mix minus a stem in float.
    PCM output ("PCM_16"/"PCM_24"): integers, mix minus a stem = quantized mix - quantized stem.
    """
    bits = PCM_BITS.get(subtype)
    predicted: dict[str, tuple[np.ndarray, ClipReport]] = {}
    mix_q: list[np.ndarray] = []  # the quantized mix, once needed

    def estimate(name: str) -> tuple[np.ndarray, ClipReport]:
        if name not in predicted:
            block = estimates[layout.predicted.index(name)]
            predicted[name] = (block, ClipReport()) if bits is None else quantize(block, bits)
        return predicted[name]

    def mix_minus(stem: np.ndarray) -> tuple[np.ndarray, ClipReport]:
        if bits is None:
            return mix - stem, ClipReport()
        if not mix_q:
            mix_q.append(quantize(mix, bits)[0])  # exact for input of this or lower bit depth
        rest = mix_q[0].astype(np.int64) - stem
        limit = 1 << (bits - 1)
        out_of_range = (rest < -limit) | (rest >= limit)
        report = ClipReport(int(out_of_range.sum()), float(np.abs(rest).max(initial=0)) / limit)
        return np.clip(rest, -limit, limit - 1).astype(stem.dtype), report

    stems: dict[str, np.ndarray] = {}
    clips: dict[str, ClipReport] = {}
    for name in layout.names if wanted is None else wanted:
        origin, subtracted = layout.source(name)
        stems[name], clips[name] = mix_minus(estimate(origin)[0]) if subtracted else estimate(origin)
    return stems, clips


def stem_layout(config) -> StemLayout:
    """The stems of a model config (see :class:`stemsep.checkpoint.Config`)."""
    return StemLayout(config.network_stems, config.complement_stem)
