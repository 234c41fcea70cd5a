"""Encode a song's stems: the writer for each output format, and all stems written together.

WAV and FLAC go through :mod:`stemsep.pcm` (exact integers: PCM stems add up to the mix),
MP3, M4A and Opus through :mod:`stemsep.compressed`. :func:`stem_encoding` checks the
choices for a song before any work; :class:`StemWriter` then writes its stems side by side,
all or nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stemsep.choices import COMPRESSED_FORMATS, parse_format
from stemsep.compressed import CompressedWriter, EncodeSettings, encode_settings
from stemsep.decode import AudioInfo
from stemsep.errors import AudioEncodeError
from stemsep.files import AllOrNothing
from stemsep.pcm import AudioWriter, ClipReport, bytes_per_sample, output_subtype


@dataclass(frozen=True)
class StemEncoding:
    """How the stems of one song are written: `format` (one of OUTPUT_FORMATS), with the
    soundfile `subtype` for WAV and FLAC or the `compressed` settings for MP3, M4A and Opus."""

    format: str
    subtype: str | None = None  # "PCM_16", "PCM_24" or "FLOAT"; None for compressed formats
    compressed: EncodeSettings | None = None

    def estimated_bytes(self, frames: int, channels: int) -> int:
        """One stem's approximate file size for `frames` samples of `channels` (for free-space checks)."""
        if self.compressed is not None:
            return self.compressed.estimated_bytes(frames)
        return frames * channels * bytes_per_sample(self.subtype)


def stem_encoding(
    info: AudioInfo, output_format: str, bit_depth: str | int = "auto", bitrate_kbps: int | None = None
) -> StemEncoding:
    """Check the output choices for stems of the file `info` describes: AudioEncodeError in one
    sentence if they cannot be written (`bit_depth` applies to WAV and FLAC, `bitrate_kbps` to
    the compressed formats, None for the format's default)."""
    fmt = parse_format(output_format)
    if fmt in COMPRESSED_FORMATS:
        return StemEncoding(fmt, compressed=encode_settings(fmt, info.sample_rate, info.channels, bitrate_kbps))
    if bitrate_kbps is not None:
        raise AudioEncodeError(f"a bitrate applies to {', '.join(COMPRESSED_FORMATS)} output, not {fmt}")
    return StemEncoding(fmt, subtype=output_subtype(info, fmt, bit_depth))


class StemWriter(AllOrNothing):
    """Writes several stems of one song side by side, all or nothing.

    One writer per stem (`paths` maps stem names to files), as `encoding` says: an
    :class:`stemsep.pcm.AudioWriter` for WAV and FLAC (WAV data over 4 GiB of
    `expected_frames` is written as RF64), a :class:`stemsep.compressed.CompressedWriter`
    for MP3, M4A and Opus. `write` takes a dict of (channels, n) blocks, one per stem.
    `close` moves every file into place; if any write or close fails, or the writer is left
    by an exception, no stem stays behind (those already moved into place are removed
    again), so a song's stems appear together or not at all. `clip` accumulates each stem's
    clip report.
    """

    def __init__(
        self, paths: Mapping[str, os.PathLike[str] | str], sample_rate: int, channels: int, encoding: StemEncoding,
        *, expected_frames: int | None = None,
    ):
        self.paths = {stem: Path(path) for stem, path in paths.items()}
        self.clip = {stem: ClipReport() for stem in self.paths}
        self._writers: dict[str, AudioWriter | CompressedWriter] = {}
        try:
            for stem, path in self.paths.items():
                if encoding.compressed is not None:
                    writer = CompressedWriter(
                        path, sample_rate, channels, encoding.format, bitrate_kbps=encoding.compressed.bitrate_kbps
                    )
                else:
                    writer = AudioWriter(path, sample_rate, channels, encoding.subtype, encoding.format,
                                         expected_frames=expected_frames)
                self._writers[stem] = writer
        except BaseException:
            self.abort()
            raise

    def write(self, blocks: Mapping[str, np.ndarray], clips: Mapping[str, ClipReport] | None = None) -> None:
        """Append one block per stem; `clips` adds the clip reports of quantizing done before."""
        for stem, writer in self._writers.items():
            self.clip[stem] += writer.write(blocks[stem]) + (clips or {}).get(stem, ClipReport())

    def close(self) -> None:
        done: list[Path] = []
        try:
            for stem, writer in self._writers.items():
                writer.close()
                done.append(self.paths[stem])
        except BaseException:
            for path in done:
                path.unlink(missing_ok=True)
            self.abort()
            raise

    def abort(self) -> None:
        for writer in self._writers.values():
            writer.abort()
