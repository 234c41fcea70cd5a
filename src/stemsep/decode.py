"""Decode any audio file: the first step of a separation.

Decoding goes through PyAV (FFmpeg), which recognises the format from the file's content
(never from its name) and stays silent on stderr. Samples come out as float32 shaped
(channels, frames) on one scale: integer PCM of b bits is `int / 2**(b-1)` (8-bit WAV,
which is unsigned, is `(u - 128) / 128`), so 16- and 24-bit sources are recovered exactly
by `round(x * 2**(b-1))`; float sources pass through. Decoding is built on a block
iterator (`AudioReader.blocks`) so long files can be streamed; `decode` collects it.
This module knows nothing about the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import av
import av.logging
import numpy as np

from stemsep.errors import AudioDecodeError, NotAudioError
from stemsep.files import reason

# ---------------------------------------------------------------------------------------
# limits

MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 384_000
MAX_CHANNELS = 64
RUNAWAY_DECODE_S = 24 * 3600  # more audio than this is a decoder that never stops producing any: an error
# Float sources beyond this many times full scale (+120 dBFS) are damaged data, not sound (an
# integer-scaled float file peaks at 32768): float32 rounding around such a sample swamps the music.
MAX_FLOAT_LEVEL = 1e6
_MAX_IDLE_PACKETS = 10_000  # consecutive packets that decode to nothing: treat as a hang
_BLOCK_FRAMES = 1 << 16  # default block size of AudioReader.blocks (~1.5 s at 44.1 kHz)
_TAIL_WINDOW_S = 2.0  # how far before the container's end a lossless tail count starts
_MAX_EDIT_TRIM = 8192  # the most an MP4 edit list may cut off the end (encoder padding)

# Codecs whose decoded samples are the source's exact values (companded PCM is not).
_LOSSLESS = {"flac", "alac", "wavpack", "ape", "tta", "tak", "mlp", "truehd", "shorten"}
_LOSSY_PCM = {"pcm_alaw", "pcm_mulaw", "pcm_vidc"}


# ---------------------------------------------------------------------------------------
# what a file holds


@dataclass(frozen=True)
class AudioInfo:
    """One audio stream of a file, as decoded by this module."""

    sample_rate: int
    channels: int
    codec: str  # FFmpeg codec name: "pcm_s16le", "flac", "mp3", "aac", "vorbis", "opus", ...
    container: str  # FFmpeg demuxer name: "wav", "flac", "mp3", "mov,mp4,m4a,3gp,3g2,mj2", ...
    bits: int | None  # source precision for PCM/FLAC/ALAC (8, 16, 24, 32, 64); None for lossy
    is_float: bool  # the source stores float samples (float WAV/AIFF)
    lossless: bool  # the decoded samples are the source's exact values
    frames: int | None = None  # exact sample count per channel of the decoded stream; None until counted

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


@contextlib.contextmanager
def ffmpeg_quiet() -> Iterator[None]:
    """FFmpeg logging off for the duration (PyAV's default; someone may have turned it on)."""
    level = av.logging.get_level()
    if level is None:
        yield
        return
    av.logging.set_level(None)
    try:
        yield
    finally:
        av.logging.set_level(level)


def display_name(name: str) -> str:
    """A file name as messages show it: control characters (a newline...) escaped, so that a
    message naming the file stays one line."""
    return re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", lambda m: m.group().encode("unicode_escape").decode(), name)


def _check_regular_file(path: str, name: str) -> None:
    """Refuse early what FFmpeg would report badly or block on (directories, FIFOs, devices)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise AudioDecodeError("file not found", file=name) from None
    except PermissionError:
        raise AudioDecodeError("cannot be read (permission denied)", file=name) from None
    except OSError as exc:
        raise AudioDecodeError(f"cannot be read ({exc.strerror or exc})", file=name) from None
    if stat.S_ISDIR(st.st_mode):
        raise AudioDecodeError("is a directory, not an audio file", file=name)
    if not stat.S_ISREG(st.st_mode):
        raise AudioDecodeError("is not a regular file", file=name)
    if st.st_size == 0:
        raise AudioDecodeError("is empty (0 bytes)", file=name)
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise AudioDecodeError("cannot be read (permission denied)", file=name) from None
    except OSError as exc:
        raise AudioDecodeError(f"cannot be read ({exc.strerror or exc})", file=name) from None


def _flac_bits(extradata: bytes | None) -> int | None:
    """Bits per sample from a FLAC STREAMINFO block (34 bytes, maybe after 'fLaC' + header)."""
    if not extradata:
        return None
    if extradata[:4] == b"fLaC":
        extradata = extradata[8:]
    if len(extradata) < 34:
        return None
    # STREAMINFO: 16+16+24+24 bits of block/frame sizes, 20 rate, 3 channels-1, 5 bps-1
    return ((extradata[12] & 0x01) << 4 | extradata[13] >> 4) + 1


def _alac_bits(extradata: bytes | None) -> int | None:
    """Bits per sample from ALAC's magic cookie (size, 'alac', version, then the config)."""
    if not extradata or len(extradata) < 36 or extradata[4:8] != b"alac":
        return None
    return extradata[17] or None


def _source_bits(codec: str, sample_format: str, extradata: bytes | None) -> int | None:
    if m := re.fullmatch(r"pcm_[suf](\d+)(?:le|be)?(?:_planar)?", codec):
        return int(m.group(1))
    bits = {"flac": _flac_bits, "alac": _alac_bits}.get(codec, lambda _: None)(extradata)
    return bits or av.AudioFormat(sample_format).bits


_SAMPLE_DTYPES = {"u8": np.uint8, "s16": np.int16, "s32": np.int32, "s64": np.int64, "flt": np.float32, "dbl": np.float64}


def _to_float32(frame: av.AudioFrame, channels: int) -> np.ndarray:
    """One decoded frame as float32 (channels, n) on the module's scale."""
    fmt = frame.format
    kind = fmt.name.rstrip("p")
    # Read the planes ourselves rather than through to_ndarray: PyAV has no s64 there, and
    # for 8 or more planar channels it lists one plane too many (9 for 7.1 AAC), which
    # to_ndarray reads past the frame's end (a crash).
    count = frame.samples * (1 if fmt.is_planar else channels)
    planes = frame.planes[: channels if fmt.is_planar else 1]
    a = np.stack([np.frombuffer(plane, dtype=_SAMPLE_DTYPES[kind], count=count) for plane in planes])
    if not fmt.is_planar:
        a = a.reshape(-1, channels).T  # (n, channels) interleaved -> (channels, n)
    if kind in ("flt", "dbl"):
        with np.errstate(over="ignore"):  # a double beyond float32's range becomes inf, refused by the caller
            return np.ascontiguousarray(a, dtype=np.float32)
    if kind == "u8":
        return (a.astype(np.float32) - 128) * np.float32(1 / 128)
    # Signed integers fill the top bits (FFmpeg gives 24-bit PCM as s32 with a zero low
    # byte), so dividing by 2**(width-1) puts a b-bit integer at int / 2**(b-1) exactly.
    width = {"s16": 16, "s32": 32, "s64": 64}[kind]
    if width == 64:
        return (a.astype(np.float64) * 2.0 ** -63).astype(np.float32)
    return a.astype(np.float32) * np.float32(2.0 ** (1 - width))


class AudioReader:
    """Decodes one audio stream of a file as float32 blocks shaped (channels, n).

    `stream` picks among the file's audio streams (0 = the first; a MUSDB `.stem.mp4` holds
    the mixture then drums, bass, other, vocals). Opening reads and checks the header only;
    nothing stays open between calls. `blocks()` decodes from the start each time it is
    called, holding the file open only while its iterator runs. `info` has the exact frame
    count: read from the last seconds for PCM, counted by a decoding pass otherwise
    (containers do not state it exactly where there is encoder delay, padding or damage);
    cached.

    Exactness: decoders drop the encoder delay and padding the file describes (LAME/Xing
    for MP3, pre-skip and granule positions for Ogg, and the edit list for MP4, whose end
    FFmpeg does not apply itself: we trim it here).

    Damage is handled as players do: a truncated file gives the audio before the cut, and
    data that cannot be decoded is skipped, so the result is shorter than the file claims.
    `undecodable_packets` counts the packets the decoder rejected in the latest pass; FFmpeg's FLAC and Ogg
    demuxers resync past damage without telling, so a zero count does not prove a clean
    file. A file with no decodable audio at all raises AudioDecodeError.
    """

    def __init__(self, path: str | os.PathLike[str], stream: int = 0, *, max_duration_s: float = RUNAWAY_DECODE_S):
        self.path = os.fsdecode(path)  # bytes too: a name that is not UTF-8 arrives as either
        self.name = display_name(os.path.basename(self.path.rstrip("/")) or self.path)
        self.stream_index = stream
        self.max_duration_s = max_duration_s
        self.undecodable_packets = 0
        self._info: AudioInfo | None = None
        _check_regular_file(self.path, self.name)
        with self._open() as (container, st):
            cc = st.codec_context
            codec = cc.codec.canonical_name
            lossless = codec in _LOSSLESS or (codec.startswith("pcm_") and codec not in _LOSSY_PCM)
            fmt = cc.format.name if cc.format is not None else "flt"
            self.header = AudioInfo(  # what the header says; `info` adds the exact frame count
                sample_rate=cc.sample_rate,
                channels=cc.channels,
                codec=codec,
                container=container.format.name,
                bits=_source_bits(codec, fmt, cc.extradata) if lossless else None,
                is_float=lossless and fmt.rstrip("p") in ("flt", "dbl"),
                lossless=lossless,
            )
            # The container's own length, in samples, where it states one.
            self._stated_frames = None
            if st.duration and st.time_base:
                self._stated_frames = round(st.duration * st.time_base * self.sample_rate)
            self._start = round((st.start_time or 0) * st.time_base * self.sample_rate) if st.time_base else 0
        # An MP4 edit list's end is the stream duration; FFmpeg applies only its start.
        is_mov = self.header.container.startswith("mov,")
        self._trim_to = self._stated_frames if is_mov and self._stated_frames else None

    # -- header ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _open(self) -> Iterator[tuple[Any, Any]]:
        """Open the container and select the audio stream, checking the header."""
        name = self.name
        try:
            with ffmpeg_quiet():
                container = av.open(self.path, mode="r", metadata_errors="replace")  # tags need not be UTF-8
        except av.error.InvalidDataError:
            raise NotAudioError("not an audio file (unrecognised or damaged data)", file=name) from None
        except av.error.PermissionError:
            raise AudioDecodeError("cannot be read (permission denied)", file=name) from None
        except (av.error.FFmpegError, OSError) as exc:
            raise AudioDecodeError(f"cannot be opened ({reason(exc)})", file=name) from None
        try:
            streams = container.streams.audio
            if not streams:
                raise NotAudioError("not an audio file (no audio stream)", file=name)
            if not 0 <= self.stream_index < len(streams):
                count = f"{len(streams)} audio stream{'s' if len(streams) != 1 else ''}"
                raise AudioDecodeError(f"has {count}, so there is no audio stream {self.stream_index}", file=name)
            st = streams[self.stream_index]
            cc = st.codec_context
            if cc is None:  # FFmpeg has no decoder for the codec the header names
                raise AudioDecodeError("the audio is in a format FFmpeg cannot decode (unknown codec)", file=name)
            if cc.channels > MAX_CHANNELS:
                raise AudioDecodeError(f"has {cc.channels} channels, more than the {MAX_CHANNELS} supported", file=name)
            if cc.channels < 1 or cc.sample_rate < 1:
                raise AudioDecodeError("the audio stream does not state its sample rate or channels", file=name)
            if not MIN_SAMPLE_RATE <= cc.sample_rate <= MAX_SAMPLE_RATE:
                raise AudioDecodeError(
                    f"sample rate {cc.sample_rate} Hz is outside the supported {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz",
                    file=name,
                )
            yield container, st
        finally:
            container.close()

    @property
    def sample_rate(self) -> int:
        return self.header.sample_rate

    @property
    def channels(self) -> int:
        return self.header.channels

    @property
    def estimated_frames(self) -> int | None:
        """The container's stated length, free to read, not always exact (for progress bars)."""
        return self._info.frames if self._info else self._stated_frames

    @property
    def info(self) -> AudioInfo:
        """The header with the exact frame count (may decode the file once to count; cached)."""
        if self._info is None:
            frames = self._count_from_tail() if self.header.codec.startswith("pcm_") and self._trim_to is None else None
            if frames is None:
                frames = sum(block.shape[1] for block in self.blocks(1 << 20))
            if frames == 0:
                raise AudioDecodeError("contains no audio samples", file=self.name)
            self._info = dataclasses.replace(self.header, frames=frames)
        return self._info

    def _count_from_tail(self) -> int | None:
        """Exact length of a PCM stream from its last seconds: the end of its last frame.

        PCM packets carry exact sample positions and demuxers never drop any, so this is the
        decoded length for an intact file and for one cut short. (FLAC frames carry positions
        too, but its demuxer silently drops damaged frames, leaving gaps the decoded length
        does not have: FLAC is counted by decoding.) None where it cannot tell.
        """
        if not self._stated_frames:
            return None
        with self._open() as (container, st):
            target = self._start + self._stated_frames - round(_TAIL_WINDOW_S * self.sample_rate)
            if target > self._start:
                try:
                    with ffmpeg_quiet():
                        container.seek(round(target / self.sample_rate / st.time_base), stream=st, backward=True)
                except av.error.FFmpegError:
                    return None
            end = None
            for frame in self._frames(container, st, count_damage=False):
                if frame.pts is None:
                    return None
                end = round(frame.pts * frame.time_base * self.sample_rate) + frame.samples
            return None if end is None else end - self._start

    # -- decoding ----------------------------------------------------------------------

    def _frames(self, container: Any, st: Any, *, count_damage: bool = True) -> Iterator[av.AudioFrame]:
        """Decoded frames, with the damage policy of the class docstring and the hang guards."""
        name = self.name
        decoded = 0
        idle = 0
        limit = self.max_duration_s * self.sample_rate
        packets = container.demux(st)
        while True:
            try:
                with ffmpeg_quiet():
                    packet = next(packets)
            except StopIteration:
                return
            except av.error.FFmpegError:
                if decoded == 0:
                    raise AudioDecodeError("not readable audio (damaged or truncated data)", file=name) from None
                return  # a container that breaks off: keep what came before
            frames = []
            try:
                with ffmpeg_quiet():
                    frames = st.decode(packet)
            except av.error.FFmpegError:
                if count_damage:
                    self.undecodable_packets += 1
                idle += 1
            else:
                idle = 0 if frames else idle + 1
            if idle > _MAX_IDLE_PACKETS:
                raise AudioDecodeError(f"no audio could be decoded from {idle} packets in a row (damaged data)", file=name)
            for frame in frames:
                if frame.sample_rate != self.sample_rate or frame.layout.nb_channels != self.channels:
                    raise AudioDecodeError("changes sample rate or channel count mid-stream, which is not supported", file=name)
                decoded += frame.samples
                if decoded > limit:
                    raise AudioDecodeError(f"is longer than the {self.max_duration_s / 3600:g}-hour limit", file=name)
                yield frame

    def blocks(self, block_frames: int = _BLOCK_FRAMES) -> Iterator[np.ndarray]:
        """Decode from the start: float32 blocks (channels, block_frames), the last one shorter.

        Raises AudioDecodeError as soon as a problem shows: NaN/inf in a float source, a file
        that turns out unreadable before any audio, the duration guard, and (after the last
        block) no samples at all.
        """
        if block_frames < 1:
            raise ValueError(f"block_frames must be positive, got {block_frames}")
        self.undecodable_packets = 0
        holdback = _MAX_EDIT_TRIM if self._trim_to is not None else 0  # kept until the end is known
        pending: list[np.ndarray] = []  # each (channels, n)
        pending_n = 0
        total = 0
        with self._open() as (container, st):
            for frame in self._frames(container, st):
                x = _to_float32(frame, self.channels)  # (channels, n)
                if self.header.is_float and not np.isfinite(x).all():
                    raise AudioDecodeError("contains NaN or infinite samples", file=self.name)
                if self.header.is_float and x.size and (peak := float(np.abs(x).max())) > MAX_FLOAT_LEVEL:
                    raise AudioDecodeError(
                        f"has float samples of {peak:.3g} times full scale, beyond the {MAX_FLOAT_LEVEL:.0e} supported", file=self.name
                    )
                pending.append(x)
                pending_n += x.shape[1]
                total += x.shape[1]
                while pending_n >= block_frames + holdback:
                    buf = np.concatenate(pending, axis=1) if len(pending) > 1 else pending[0]
                    yield buf[:, :block_frames]
                    pending, pending_n = [buf[:, block_frames:]], pending_n - block_frames
        if self._trim_to is not None and 0 < total - self._trim_to <= holdback:
            cut = total - self._trim_to
            buf = np.concatenate(pending, axis=1)  # (channels, pending_n)
            pending, pending_n, total = [buf[:, : pending_n - cut]], pending_n - cut, total - cut
        if total == 0:
            raise AudioDecodeError("contains no audio samples", file=self.name)
        if pending_n:
            buf = np.concatenate(pending, axis=1) if len(pending) > 1 else pending[0]
            for start in range(0, pending_n, block_frames):
                yield buf[:, start : start + block_frames]
        if self._info is None:
            self._info = dataclasses.replace(self.header, frames=total)


def probe(path: str | os.PathLike[str], stream: int = 0) -> AudioInfo:
    """Describe one audio stream of a file, with its exact frame count.

    Cheap for PCM (WAV, AIFF, ...: header plus the last seconds); other formats are
    decoded once to count, since only decoding applies their delay and padding exactly.
    """
    return AudioReader(path, stream).info


def decode(path: str | os.PathLike[str], stream: int = 0) -> tuple[np.ndarray, AudioInfo]:
    """The whole stream as float32 (channels, frames), and its description."""
    reader = AudioReader(path, stream)
    blocks = list(reader.blocks(1 << 20))
    x = np.concatenate(blocks, axis=1) if len(blocks) > 1 else np.ascontiguousarray(blocks[0])  # (channels, frames)
    return x, reader.info


