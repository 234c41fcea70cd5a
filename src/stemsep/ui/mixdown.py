"""The mixer's export: a separation's stems summed with the page's gains, in one WAV file.

The stems are decoded by stemsep's own decoder (16- and 24-bit samples come back exactly)
and summed block by block in float64, so memory stays a few blocks whatever the length.
When every gain is 0 or 1 and the stems are integer PCM, the mix is written at the stems'
bit depth by stemsep's own writer: the stems of a PCM separation at unity give back the song
bit for bit. Other gains, lossy or float stems, or a sum that would clip give a 32-bit float
WAV, which never clips.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stemsep.decode import AudioReader
from stemsep.errors import StemsepError
from stemsep.pcm import PCM_BITS, AudioWriter, ClipReport, output_subtype

FLOAT = "FLOAT"


def mixdown(paths: Sequence[Path], gains: Sequence[float], dest: Path) -> str:
    """Write sum(gain x stem) to `dest` (a WAV file, whole or not at all); its soundfile subtype."""
    if len(paths) != len(gains) or not paths:
        raise StemsepError(f"{len(gains)} gains given for {len(paths)} stems")
    readers = [AudioReader(path) for path in paths]
    first = readers[0].header
    for reader in readers[1:]:
        if (reader.header.sample_rate, reader.header.channels) != (first.sample_rate, first.channels):
            raise StemsepError("the stems differ in sample rate or channel count", file=reader.name)
    subtype = output_subtype(first, "wav") if all(g in (0, 1) for g in gains) else FLOAT
    if subtype in PCM_BITS and not _write(readers, gains, dest, subtype).samples:
        return subtype
    _write(readers, gains, dest, FLOAT)
    return FLOAT


def _write(readers: Sequence[AudioReader], gains: Sequence[float], dest: Path, subtype: str) -> ClipReport:
    header = readers[0].header
    with AudioWriter(dest, header.sample_rate, header.channels, subtype, "wav") as writer:
        for blocks in itertools.zip_longest(*(reader.blocks() for reader in readers)):
            frames = max(block.shape[1] for block in blocks if block is not None)
            mix = np.zeros((header.channels, frames))  # (channels, frames), float64: exact sums
            for gain, block in zip(gains, blocks):
                if block is not None and gain:
                    mix[:, : block.shape[1]] += gain * block.astype(np.float64)
            writer.write(mix)
    return writer.clip
