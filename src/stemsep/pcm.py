"""WAV and FLAC stems: exact integers, clipping counted, files that appear whole.

Floats are quantized to integers here (round half to even, `quantize`), so a 16- or 24-bit
source decoded by :mod:`stemsep.decode` comes back bit for bit, and whatever had to be
clipped is counted in a `ClipReport`, never silent. `AudioWriter` writes a stem block by
block through soundfile into a hidden temporary file that is renamed over the target only
when complete; its failure policy (`EncodingWriter`) and temporary file (`open_part_file`)
serve the compressed writers (:mod:`stemsep.compressed`) too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

from stemsep.choices import PCM_FORMATS, parse_bit_depth, parse_format
from stemsep.decode import AudioInfo, display_name
from stemsep.errors import AudioEncodeError
from stemsep.files import AllOrNothing, commit_part, part_path, reason

PCM_BITS = {"PCM_16": 16, "PCM_24": 24}  # soundfile's integer subtypes and their bits
_FLOAT_SUBTYPE = "FLOAT"


def output_subtype(info: AudioInfo, output_format: str, bit_depth: str | int = "auto") -> str:
    """The soundfile subtype ("PCM_16", "PCM_24", "FLOAT") for writing stems of `info`'s file.

    32 means 32-bit float WAV (FLAC has no float). "auto" keeps the input's precision:
    16/24-bit stay, 8-bit becomes 16, 32-bit int and float become float WAV or 24-bit FLAC,
    lossy input becomes 16.
    """
    fmt = parse_format(output_format, PCM_FORMATS)
    depth = parse_bit_depth(bit_depth)
    if depth == "auto":
        if not info.lossless or info.bits is None:
            depth = 16
        elif info.is_float or info.bits > 24:
            depth = 32 if fmt == "wav" else 24
        else:
            depth = 16 if info.bits <= 16 else 24
    if depth == 32:
        if fmt == "flac":
            raise AudioEncodeError("bit depth 32 (float) is not available for FLAC; choose 16 or 24, or WAV")
        return _FLOAT_SUBTYPE
    return f"PCM_{depth}"


def bytes_per_sample(subtype: str) -> int:
    """Bytes one sample of `subtype` takes uncompressed (an upper bound for FLAC)."""
    return PCM_BITS[subtype] // 8 if subtype in PCM_BITS else 4


@dataclass(frozen=True)
class ClipReport:
    """What quantizing did to out-of-range samples: how many were clipped, the peak |x| seen."""

    samples: int = 0  # individual samples (all channels) set to the integer range's limit
    peak: float = 0.0  # largest |x| in full-scale units (1.0 = full scale)

    def __add__(self, other: ClipReport) -> ClipReport:
        return ClipReport(self.samples + other.samples, max(self.peak, other.peak))


def quantize(x: np.ndarray, bits: int) -> tuple[np.ndarray, ClipReport]:
    """float -> integers: rint(x * 2**(bits-1)) (half to even), clipped to the b-bit range.

    Returns int16 for 16 bits, int32 for 24 (the 24-bit value, not shifted), and the
    `ClipReport` of what was clipped. Inverse of decoding for values that came from b-bit
    integers. Scaling by a power of two is exact in float32, so x's dtype is kept.
    """
    if bits not in (16, 24):
        raise ValueError(f"quantize supports 16 or 24 bits, got {bits}")
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"quantize expects floats, got {x.dtype}")
    scale = 2.0 ** (bits - 1)
    lo, hi = -scale, scale - 1
    y = np.rint(x * x.dtype.type(scale))
    if np.isnan(y).any():
        raise ValueError("cannot quantize NaN samples")
    clipped = int(np.count_nonzero((y < lo) | (y > hi)))
    np.clip(y, lo, hi, out=y)
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    return y.astype(np.int16 if bits == 16 else np.int32), ClipReport(clipped, peak)


def open_part_file(path: str, name: str, flags: int) -> tuple[str, int]:
    """Create the hidden temporary file a writer fills for `path` (see
    :func:`stemsep.files.part_path`) and open it with `flags`; (its path, the descriptor).
    A missing or unwritable folder is an AudioEncodeError naming `name`."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise AudioEncodeError(f"cannot be written because the output directory {directory} {what}", file=name)
    tmp = os.fspath(part_path(Path(directory) / os.path.basename(path)))
    try:
        return tmp, os.open(tmp, flags | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
    except OSError as exc:
        raise AudioEncodeError(f"cannot be written into {directory} ({reason(exc)})", file=name) from None


class EncodingWriter(AllOrNothing):
    """A stem writer's failure policy: any failure inside `_aborting_on_error` aborts the
    file, and the encoder's own errors (`write_errors`) become one AudioEncodeError sentence
    naming the file (`name`)."""

    name: str
    write_errors: tuple[type[BaseException], ...] = (OSError,)

    @contextlib.contextmanager
    def _aborting_on_error(self, what: str) -> Iterator[None]:
        try:
            yield
        except BaseException as exc:
            self.abort()
            if isinstance(exc, self.write_errors):
                raise AudioEncodeError(f"{what} ({reason(exc)})", file=self.name) from None
            raise


class AudioWriter(EncodingWriter):
    """Writes a stem block by block, atomically.

    Data goes to a hidden `.<name>.<random>.part` file beside `path`, which replaces `path`
    only when the writer is closed without error (`with AudioWriter(...) as w:`); any
    failure removes it, so `path` is either the complete new file or untouched.
    Float blocks are quantized for PCM subtypes (the clip report accumulates in `clip`);
    integer blocks are taken as already quantized to the subtype's bits and written as is.
    WAV data over 4 GiB (`expected_frames`) is written as RF64.
    """

    write_errors = (soundfile.LibsndfileError, RuntimeError, OSError)

    def __init__(
        self,
        path: str | os.PathLike[str],
        sample_rate: int,
        channels: int,
        subtype: str,
        format: str = "wav",
        *,
        expected_frames: int | None = None,
    ):
        self.path = os.fspath(path)
        self.name = display_name(os.path.basename(self.path))
        self.subtype = subtype
        self.channels = channels
        self.clip = ClipReport()
        fmt = parse_format(format, PCM_FORMATS)
        valid = ("PCM_16", "PCM_24") if fmt == "flac" else ("PCM_16", "PCM_24", _FLOAT_SUBTYPE)
        if subtype not in valid:
            choices = ", ".join(valid)
            raise AudioEncodeError(f"subtype {subtype!r} is not one of {choices} for {fmt.upper()}", file=self.name)
        sf_format = fmt.upper()
        if fmt == "wav" and expected_frames is not None:
            if expected_frames * channels * bytes_per_sample(subtype) > 0xFFFFFFFF - (1 << 16):
                sf_format = "RF64"
        self._tmp, fd = open_part_file(self.path, self.name, os.O_WRONLY)
        self._fd: int | None = fd
        self._file: soundfile.SoundFile | None = None
        with self._aborting_on_error("cannot be written"):
            self._file = soundfile.SoundFile(
                fd, "w", samplerate=sample_rate, channels=channels, subtype=subtype, format=sf_format, closefd=False
            )

    def write(self, block: np.ndarray) -> ClipReport:
        """Append (channels, n) samples; returns this block's clip report."""
        if self._file is None:
            raise ValueError(f"{self.name}: the writer is already closed")
        with self._aborting_on_error("could not be written"):
            if block.ndim != 2 or block.shape[0] != self.channels:
                raise ValueError(f"expected a ({self.channels}, n) block, got shape {block.shape}")
            data, report = self._samples(block)  # (n, channels)
            self._file.write(data)
        self.clip += report
        return report

    def _samples(self, block: np.ndarray) -> tuple[np.ndarray, ClipReport]:
        bits = PCM_BITS.get(self.subtype)
        if np.issubdtype(block.dtype, np.integer):
            if bits is None:
                raise ValueError(f"integer samples need a PCM subtype, not {self.subtype}")
            lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
            if block.size and (block.min() < lo or block.max() > hi):
                raise ValueError(f"integer samples outside the {bits}-bit range")
            ints = block
            peak = float(np.max(np.abs(ints.astype(np.int64)))) / (1 << (bits - 1)) if block.size else 0.0
            report = ClipReport(0, peak)
        elif np.issubdtype(block.dtype, np.floating):
            if not np.isfinite(block).all():
                raise AudioEncodeError("refusing to write NaN or infinite samples", file=self.name)
            if bits is None:  # float output keeps everything, overs included
                peak = float(np.max(np.abs(block))) if block.size else 0.0
                return np.ascontiguousarray(block.T, dtype=np.float32), ClipReport(0, peak)
            ints, report = quantize(block, bits)
        else:
            raise ValueError(f"samples must be float or integer, got {block.dtype}")
        # libsndfile maps int16 to 16-bit PCM as is, and int32 to 24-bit PCM by its top 24 bits.
        if bits == 16:
            return np.ascontiguousarray(ints.T, dtype=np.int16), report
        return np.ascontiguousarray(ints.T, dtype=np.int32) << 8, report

    def close(self) -> None:
        """Finish the file and move it into place."""
        if self._file is None:
            return
        with self._aborting_on_error("could not be written"):
            self._file.close()
            self._file = None
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            commit_part(Path(self._tmp), Path(self.path))

    def abort(self) -> None:
        """Give up: close and remove the temporary file; `path` is left as it was."""
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None
        self._discard()

    def _discard(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        with contextlib.suppress(OSError):
            os.unlink(self._tmp)


_WRITE_BLOCK = 1 << 18  # frames per soundfile call: bounds the quantizing temporaries


def write(
    path: str | os.PathLike[str], x: np.ndarray, sample_rate: int, subtype: str, format: str = "wav"
) -> ClipReport:
    """Write (channels, frames) samples to `path` atomically; returns the clip report.

    Floats are quantized for PCM_16/PCM_24 (clipping counted, never silent) or written as
    32-bit float for FLOAT; integer arrays are taken as already quantized and stored exactly.
    """
    if x.ndim != 2:
        raise ValueError(f"expected samples shaped (channels, frames), got shape {x.shape}")
    with AudioWriter(path, sample_rate, x.shape[0], subtype, format, expected_frames=x.shape[1]) as writer:
        for start in range(0, x.shape[1], _WRITE_BLOCK):
            writer.write(x[:, start : start + _WRITE_BLOCK])
    return writer.clip
