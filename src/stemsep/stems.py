"""From the network's estimates to the stems a user gets, named.

A single-target model (1297 predicts vocals) gives its target and the complement, the mix
minus the target. A multi-stem model gives each stem it predicts. For PCM output the
complement is computed in the integer domain from the quantized mix and target, so the two
written stems add up to the mix bit-exactly; only a complement sample outside the integer
range breaks that, and it is clipped and counted. This module knows nothing about files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stemsep.pcm import PCM_BITS, ClipReport, quantize

# A single target's complement (the mix minus the target) by the target's name; any other
# target's is named from the model's config (stemsep.checkpoint.complement_name).
COMPLEMENTS = {"vocals": "instrumental", "instrumental": "vocals"}


@dataclass(frozen=True)
class StemLayout:
    """What a model's network predicts (`predicted`, in its output order) and, for a
    single-target model, the name of the complement (mix - target)."""

    predicted: tuple[str, ...]
    complement: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """Every stem a separation gives, in order: the predicted ones, then the complement."""
        return self.predicted + ((self.complement,) if self.complement else ())


def stem_samples(
    layout: StemLayout, mix: np.ndarray, estimates: np.ndarray, subtype: str | None = None
) -> tuple[dict[str, np.ndarray], dict[str, ClipReport]]:
    """The stems of one block as they will be written, and what clipping each needed.

    `mix` is (channels, n), `estimates` (stems, channels, n) float32 in `layout.predicted`
    order. Float output (`subtype` None or "FLOAT"): float32, complement = mix - target.
    PCM output ("PCM_16"/"PCM_24"): integers, complement = quantized mix - quantized target.
    """
    bits = PCM_BITS.get(subtype)
    stems: dict[str, np.ndarray] = {}
    clips: dict[str, ClipReport] = {}
    for name, estimate in zip(layout.predicted, estimates):
        if bits is None:
            stems[name], clips[name] = estimate, ClipReport()
        else:
            stems[name], clips[name] = quantize(estimate, bits)
    if layout.complement:
        target = stems[layout.predicted[0]]
        if bits is None:
            stems[layout.complement], clips[layout.complement] = mix - target, ClipReport()
        else:
            mix_q, _ = quantize(mix, bits)  # exact for input of this or lower bit depth
            complement = mix_q.astype(np.int64) - target
            limit = 1 << (bits - 1)
            out_of_range = (complement < -limit) | (complement >= limit)
            clips[layout.complement] = ClipReport(int(out_of_range.sum()), float(np.abs(complement).max(initial=0)) / limit)
            stems[layout.complement] = np.clip(complement, -limit, limit - 1).astype(target.dtype)
    return stems, clips


def stem_layout(config) -> StemLayout:
    """The stems of a model config (see :class:`stemsep.checkpoint.Config`)."""
    return StemLayout(config.network_stems, config.complement_stem)
