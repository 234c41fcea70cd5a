"""Compressed stems: MP3, AAC in M4A and Opus in Ogg, encoded through PyAV's bundled FFmpeg.

:class:`CompressedWriter` has the interface of :class:`stemsep.pcm.AudioWriter`: float32
blocks shaped (channels, n) go in through `write`, `close` moves the finished file into
place, `abort` (or any failure) leaves nothing behind, and it is a context manager. The data
goes to a hidden `.<name>.<random>.part` file beside the target (:func:`stemsep.files.part_path`),
which replaces the target only when complete (:func:`stemsep.files.commit_part`).
Encoding is streamed: memory stays bounded by one block plus one codec frame.

Formats and encoders (the FFmpeg that PyAV bundles):

=======  ===================  ==========  =======================  =========
format   encoder              container   sample rates written     channels
=======  ===================  ==========  =======================  =========
mp3      libmp3lame, CBR      MP3 + Xing  8-48 kHz (MPEG 1/2/2.5)  1-2
m4a      FFmpeg's native aac  MP4 (M4A)   7.35-96 kHz              1-8
opus     libopus, VBR         Ogg         48 kHz only              1-4, 6, 8
=======  ===================  ==========  =======================  =========

Default bitrates (`_CODECS`; for stereo: mono gets half, n channels n/2 times, within the
codec's limits at the rate written; `settings.bitrate_kbps` says what was used), and why:

* MP3 320 kbit/s: the top of MPEG-1 Layer III, the default of `demucs --mp3-bitrate` and of
  the Replicate demucs ports (their `mp3_bitrate` input defaults to 320). Separated stems
  carry artefacts and near-silent passages that lower rates smear audibly; the files are
  still 4.4 times smaller than 16-bit WAV.
* AAC 256 kbit/s: what Apple sells and streams (iTunes Plus / Apple Music files are 256
  kbit/s AAC). FFmpeg's own encoder is weaker than Apple's or FDK at low rates; at 256 its
  bandwidth reaches 20 kHz.
* Opus 160 kbit/s (VBR target): YouTube's best audio stream (format 251) is ~160 kbit/s
  Opus, and listening tests find Opus near transparent from ~128 kbit/s stereo; 160
  leaves margin for separation artefacts.

An explicit `bitrate_kbps` is the whole stream's rate and must be valid: for MP3 one of the
standard Layer III rates at the rate written (32-320 at 32-48 kHz, 8-160 at 16-24 kHz, 8-64
at 8-12 kHz, LAME's limit), for AAC 8 per channel up to the encoder's 6144 bits per channel
per frame (264 kbit/s per channel at 44.1 kHz), for Opus 6 up to 256 per channel.

Sample rates. Opus has no 44.1 kHz mode, and Opus decoders (FFmpeg's included) always give
48 kHz: Opus stems are written at 48 kHz, resampled with soxr HQ
(:class:`stemsep.resample.StreamResampler`); a decoded Opus stem is 48 kHz and
`resampled_length(n, rate, 48000)` long, and a caller that needs the input's rate resamples
back (which gives the input's length within a sample, and no delay). MP3 and AAC keep the
input's rate when the codec has it; otherwise (MP3 above 48 kHz, AAC above 96 kHz, or an
unusual rate such as 37.8 kHz) the stem is resampled, to the lowest rate the codec has at
or above the input's, else its highest (96 kHz -> 48 kHz MP3, 192 kHz -> 96 kHz AAC).
`output_rate(format, rate)` tells beforehand, `writer.output_rate` after. Rates outside
stemsep's 8-384 kHz are refused.

Channels. MP3 is mono or stereo; more are refused (no silent downmix). AAC takes up to 8
channels and Opus 1-4, 6 or 8 (mapping family 1), in the layouts both have: 3 = 3.0,
4 = quad, 5 = 5.0, 6 = 5.1, 7 = 6.1, 8 = 7.1, channel i of the block being channel i of
FFmpeg's order for the layout (the order FFmpeg decodes such files in). In 6-8 channel
output the 4th channel is the LFE, which both codecs band-limit. 5- and 7-channel Opus is
refused: through FFmpeg's libopus wrapper and its decoders three of the channels come back
rotated. (8-channel files are fine, but stemsep's reader cannot read 8-channel AAC/Opus
back: PyAV's `to_ndarray` overruns on 8 planar channels.)

Exactness. Frames carry timestamps from 0 at the first sample and hold exactly the
encoder's frame size, the last one shorter; the container records the encoder delay and
padding, so a decoder that honours it returns the input sample for sample, aligned:

* MP3: the Xing/LAME tag (written at close; the .part file is seekable). FFmpeg's muxer
  understates the end padding when the last frame holds fewer than 47 samples (it takes it
  from the encoder's last packet, which cannot carry more than a frame); we rewrite the
  padding from the tag's frame count and delay, and the tag's CRC as FFmpeg computes it.
  LAME's bitrate presets also scale the input down (0.95 up to 160 kbit/s, 0.97 at 192,
  0.98 at 224) "against clipping", which FFmpeg cannot switch off: we scale up by as much
  first, so stems keep the input's level and still sum to the mix.
* Opus: pre-skip and the last page's granule position.
* M4A: the edit list, whose end we make sample-exact by giving the movie the sample rate
  as timescale (FFmpeg's default of 1000 rounds the end up to the next millisecond, up to
  44 samples more at 44.1 kHz).

:func:`stemsep.decode.decode` returns exactly the input's length for all three (Opus at
48 kHz). FFmpeg by itself (libavformat, hence the `ffmpeg` CLI) applies MP3's and Opus's
trimming but not the end of an M4A edit list, and so keeps the last AAC frame's padding:
(-n) mod 1024 extra samples of near-silence at the end, never more than 1023.
Limits seen: MP3 files of a few frames (under ~0.1 s) can fail FFmpeg's content probe, and
at 8-24 kHz an MP3 of under 47 samples decodes 529 samples long.

Levels. Samples beyond full scale are clipped to +-1 and counted in `clip` (a
:class:`stemsep.pcm.ClipReport`), as the 16/24-bit PCM writer does; players would clip
them anyway. Lossy coding itself can overshoot full scale on decoding (ringing around loud
peaks); that happens in the decoder and is not counted. NaN or infinite samples are
refused. A writer closed without samples leaves a file with no audio frames, which
decoders (stemsep's included) refuse.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from stemsep.choices import COMPRESSED_FORMATS, parse_format
from stemsep.decode import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, display_name, ffmpeg_quiet
from stemsep.errors import AudioEncodeError
from stemsep.files import commit_part
from stemsep.pcm import ClipReport, EncodingWriter, open_part_file
from stemsep.resample import StreamResampler


@dataclass(frozen=True)
class _Codec:
    label: str  # how messages name it
    encoder: str  # FFmpeg encoder
    muxer: str  # FFmpeg muxer
    sample_format: str  # what we feed the encoder (float, planar or packed)
    rates: tuple[int, ...]  # sample rates it encodes, ascending
    max_channels: int
    default_kbps: int  # for stereo; scaled by channels / 2
    options: tuple[tuple[str, str], ...] = ()  # encoder options


_CODECS = {
    "mp3": _Codec("MP3", "libmp3lame", "mp3", "fltp", (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000), 2, 320),
    "m4a": _Codec(
        "AAC", "aac", "ipod", "fltp",
        (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000), 8, 256,
    ),
    "opus": _Codec("Opus", "libopus", "ogg", "flt", (48000,), 8, 160, options=(("application", "audio"), ("vbr", "on"))),
}
# Layouts AAC and Opus (mapping family 1) both accept, by channel count.
_LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}
# Channel counts whose Opus round trip through FFmpeg comes back permuted (5.0: FC/BL/BR
# rotate; 6.1: FC/BC/SL rotate): FFmpeg's libopus wrapper and its decoders disagree.
_OPUS_MISORDERED = (5, 7)
# MPEG Layer III bitrates (kbit/s) by the rates they apply to; LAME's MPEG-2.5 stops at 64.
_MP3_BITRATES = (
    ((32000, 44100, 48000), (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)),
    ((16000, 22050, 24000), (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)),
    ((8000, 11025, 12000), (8, 16, 24, 32, 40, 48, 56, 64)),
)


# LAME's bitrate presets (lame 3.100, presets.c, applied to CBR too) scale the input down
# "against clipping": by 0.95 up to 160 kbit/s, 0.97 at 192, 0.98 at 224. FFmpeg cannot
# set LAME's scale, so we scale up by as much first; decoded stems keep the input's level.
_LAME_SCALE = {192: 0.97, 224: 0.98, 256: 1.0, 320: 1.0}


def _lame_gain(kbps: int) -> float:
    return 1.0 / _LAME_SCALE.get(kbps, 0.95)


def _parse_format(format: str) -> str:
    return parse_format(format, COMPRESSED_FORMATS, kind="compressed")


def output_rate(format: str, sample_rate: int) -> int:
    """The sample rate a stem of `sample_rate` is written (and decodes) at in `format`."""
    rates = _CODECS[_parse_format(format)].rates
    if not _is_int(sample_rate) or not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise AudioEncodeError(
            f"sample rate {sample_rate!r} Hz is outside the supported {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz"
        )
    return next((r for r in rates if r >= sample_rate), rates[-1])


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _mp3_bitrates(rate: int) -> tuple[int, ...]:
    return next(table for rates, table in _MP3_BITRATES if rate in rates)


def bitrate_range(format: str, sample_rate: int, channels: int) -> tuple[int, int]:
    """The lowest and highest `bitrate_kbps` accepted (MP3 also wants one of its standard rates)."""
    fmt = _parse_format(format)
    rate = output_rate(fmt, sample_rate)
    if fmt == "mp3":
        table = _mp3_bitrates(rate)
        return table[0], table[-1]
    if fmt == "m4a":  # FFmpeg's aac caps a channel at 6144 bits per 1024-sample frame
        return 8 * channels, 6 * rate // 1000 * channels
    return 6, 256 * channels


def default_bitrate(format: str, sample_rate: int, channels: int) -> int:
    """The default kbit/s: the stereo default scaled by channels / 2, within the codec's range."""
    fmt = _parse_format(format)
    wanted = _CODECS[fmt].default_kbps * channels // 2
    lo, hi = bitrate_range(fmt, sample_rate, channels)
    if fmt == "mp3":
        table = _mp3_bitrates(output_rate(fmt, sample_rate))
        return max(b for b in table if b <= max(wanted, lo))
    return min(max(wanted, lo), hi)


@dataclass(frozen=True)
class EncodeSettings:
    """What a :class:`CompressedWriter` will write, checked before any file is touched."""

    format: str  # "mp3", "m4a", "opus"
    encoder: str  # FFmpeg encoder name
    sample_rate: int  # of the blocks written
    output_rate: int  # of the file (and of its decoded samples)
    channels: int
    layout: str  # FFmpeg channel layout name
    bitrate_kbps: int  # the whole stream's (Opus: the VBR target)

    def estimated_bytes(self, frames: int) -> int:
        """The file's approximate size for `frames` input samples (for free-space checks; Opus
        is VBR: measured -8% on noise, +5% on tones over noise)."""
        return int(frames / self.sample_rate * self.bitrate_kbps * 125) + 4096


def encode_settings(format: str, sample_rate: int, channels: int, bitrate_kbps: int | None = None) -> EncodeSettings:
    """Check a format/rate/channels/bitrate combination; AudioEncodeError in one sentence if
    it cannot be written. Call it before separating to fail fast."""
    fmt = _parse_format(format)
    codec = _CODECS[fmt]
    rate = output_rate(fmt, sample_rate)
    if not _is_int(channels) or channels < 1:
        raise AudioEncodeError(f"channel count {channels!r} is not a positive integer")
    sample_rate, channels = int(sample_rate), int(channels)
    if channels > codec.max_channels:
        limit = "mono or stereo" if codec.max_channels == 2 else f"at most {codec.max_channels} channels"
        raise AudioEncodeError(f"{fmt.upper()} output takes {limit}, not {channels} channels")
    if fmt == "opus" and channels in _OPUS_MISORDERED:
        raise AudioEncodeError(
            f"Opus output of {channels} channels is not supported (FFmpeg's Opus encoder and decoder disagree on "
            "the order of 5- and 7-channel layouts); choose M4A, or 1-4, 6 or 8 channels"
        )
    if bitrate_kbps is None:
        kbps = default_bitrate(fmt, sample_rate, channels)
    else:
        if not _is_int(bitrate_kbps):
            raise AudioEncodeError(f"bitrate {bitrate_kbps!r} is not a whole number of kbit/s")
        kbps = int(bitrate_kbps)
        lo, hi = bitrate_range(fmt, sample_rate, channels)
        where = f"{channels} channel{'s' if channels > 1 else ''} at {rate} Hz"
        if fmt == "mp3" and kbps not in _mp3_bitrates(rate):
            choices = ", ".join(map(str, _mp3_bitrates(rate)))
            raise AudioEncodeError(f"MP3 bitrate {kbps} kbit/s is not one of {choices} (the MP3 rates at {rate} Hz)")
        if not lo <= kbps <= hi:
            raise AudioEncodeError(f"{codec.label} bitrate {kbps} kbit/s is outside {lo}-{hi} kbit/s (the range for {where})")
    return EncodeSettings(fmt, codec.encoder, sample_rate, rate, channels, _LAYOUTS[channels], kbps)


class CompressedWriter(EncodingWriter):
    """Writes a stem as MP3, M4A (AAC) or Opus block by block, atomically.

    `sample_rate` and `channels` describe the blocks written; the file may be written at
    another rate (`output_rate`, see the module docstring). `bitrate_kbps` None takes the
    format's default (`settings.bitrate_kbps` says which). Blocks are float (channels, n);
    samples beyond full scale are clipped and counted in `clip`.
    """

    write_errors = (av.error.FFmpegError, OSError)

    def __init__(
        self,
        path: str | os.PathLike[str],
        sample_rate: int,
        channels: int,
        format: str,
        *,
        bitrate_kbps: int | None = None,
    ):
        self.path = os.fspath(path)
        self.name = display_name(os.path.basename(self.path))
        self.clip = ClipReport()
        try:
            self.settings = encode_settings(format, sample_rate, channels, bitrate_kbps)
        except AudioEncodeError as exc:
            raise AudioEncodeError(exc.message, file=self.name) from None
        self.channels = self.settings.channels
        self.sample_rate = self.settings.sample_rate
        self.output_rate = self.settings.output_rate
        self._container = self._stream = self._file = None
        self._closed = False
        self._tmp, fd = open_part_file(self.path, self.name, os.O_RDWR)
        # FFmpeg writes through this Python file, not by name: no URL parsing of odd file
        # names, and we can fsync it. It is seekable, so the muxer can go back to finish
        # the Xing tag / moov atom.
        self._file = os.fdopen(fd, "w+b")
        resample = self.output_rate != self.sample_rate
        self._resampler = StreamResampler(self.sample_rate, self.output_rate, self.channels) if resample else None
        self._pending = np.zeros((self.channels, 0), np.float32)  # samples waiting for a full frame
        self._pts = 0  # output samples sent to the encoder
        self._gain = np.float32(_lame_gain(self.settings.bitrate_kbps)) if self.settings.format == "mp3" else None
        with self._aborting_on_error("cannot be written"):
            self._open_encoder()

    def _open_encoder(self) -> None:
        s = self.settings
        codec = _CODECS[s.format]
        options = {"movie_timescale": str(s.output_rate)} if s.format == "m4a" else {}
        with ffmpeg_quiet():
            self._container = av.open(self._file, "w", format=codec.muxer, options=options)
            stream = self._container.add_stream(s.encoder, rate=s.output_rate)
            cc = stream.codec_context
            cc.layout = s.layout
            cc.format = codec.sample_format
            cc.bit_rate = s.bitrate_kbps * 1000
            cc.time_base = Fraction(1, s.output_rate)
            stream.time_base = Fraction(1, s.output_rate)
            cc.options = dict(codec.options)
            cc.open()
            self._container.start_encoding()  # the header now: problems show before any audio
        self._stream = stream
        self._frame_size = cc.frame_size or 1024
        self._planar = cc.format.is_planar
        self._converter: av.AudioResampler | None = None

    # -- writing ---------------------------------------------------------------------

    def write(self, block: np.ndarray) -> ClipReport:
        """Append (channels, n) float samples; returns this block's clip report."""
        if self._closed or self._container is None:
            raise ValueError(f"{self.name}: the writer is already closed")
        with self._aborting_on_error("could not be written"):
            if not isinstance(block, np.ndarray) or block.ndim != 2 or block.shape[0] != self.channels:
                raise ValueError(f"expected a ({self.channels}, n) block, got shape {np.shape(block)}")
            if not np.issubdtype(block.dtype, np.floating):
                raise ValueError(f"compressed output takes float samples, got {block.dtype}")
            if not np.isfinite(block).all():
                raise AudioEncodeError("refusing to write NaN or infinite samples", file=self.name)
            x = np.asarray(block, dtype=np.float32)
            peak = float(np.max(np.abs(x))) if x.size else 0.0
            over = int(np.count_nonzero(np.abs(x) > 1)) if peak > 1 else 0
            if over:
                x = np.clip(x, -1, 1)
            if self._gain is not None and self._gain != 1:
                x = x * self._gain
            if self._resampler is not None:
                x = self._resampler.process(x)
            self._feed(x, last=False)
        report = ClipReport(over, peak)
        self.clip += report
        return report

    def _feed(self, x: np.ndarray, last: bool) -> None:
        """Encode whole frames of pending + x; keep the rest, or send it as the short last frame."""
        buf = np.concatenate([self._pending, x], axis=1) if self._pending.shape[1] else x
        fs = self._frame_size
        full = buf.shape[1] - buf.shape[1] % fs
        for start in range(0, full, fs):
            self._encode(buf[:, start : start + fs])
        rest = buf[:, full:]
        if last and rest.shape[1]:
            self._encode(rest)
            rest = rest[:, :0]
        self._pending = np.array(rest, dtype=np.float32, copy=True)  # not a view of a big block

    def _encode(self, samples: np.ndarray | None) -> None:
        """Send one frame of (channels, n) samples to the encoder (None: drain it) and mux
        what comes out."""
        frame = None
        if samples is not None:
            n = samples.shape[1]
            if self._planar and self.channels < 8:
                frame = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(samples, dtype=np.float32), format="fltp", layout=self.settings.layout
                )
            else:  # packed; PyAV cannot fill 8 planes itself (its plane count runs past FFmpeg's 8 data pointers)
                data = np.ascontiguousarray(samples.T, dtype=np.float32).reshape(1, -1)
                frame = av.AudioFrame.from_ndarray(data, format="flt", layout=self.settings.layout)
            frame.sample_rate = self.output_rate
            if self._planar and self.channels >= 8:
                if self._converter is None:
                    self._converter = av.AudioResampler(format="fltp", layout=self.settings.layout, rate=self.output_rate)
                (frame,) = self._converter.resample(frame)  # a format change only: the same n samples
                if frame.samples != n:
                    raise RuntimeError(f"sample format conversion gave {frame.samples} samples for {n}")
            frame.time_base = Fraction(1, self.output_rate)
            frame.pts = self._pts
            self._pts += n
        with ffmpeg_quiet():
            packets = self._stream.encode(frame)
            self._container.mux(packets)

    # -- finishing -------------------------------------------------------------------

    def close(self) -> None:
        """Encode what is pending, finish the file (Xing tag, moov, last Ogg page) and move it
        into place."""
        if self._closed:
            return
        with self._aborting_on_error("could not be written"):
            if self._resampler is not None:
                self._feed(self._resampler.flush(), last=True)
            else:
                self._feed(np.zeros((self.channels, 0), np.float32), last=True)
            self._encode(None)  # drain the encoder
            with ffmpeg_quiet():
                self._container.close()  # the trailer
            self._container = None
            if self.settings.format == "mp3":
                _fix_mp3_padding(self._file, self._pts, self._frame_size)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            commit_part(Path(self._tmp), Path(self.path))
            self._closed = True

    def abort(self) -> None:
        """Give up: drop the encoder and remove the temporary file; `path` is left as it was."""
        self._closed = True
        if self._container is not None:
            container, self._container = self._container, None
            with contextlib.suppress(Exception), ffmpeg_quiet():
                container.close()
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        with contextlib.suppress(OSError):
            os.unlink(self._tmp)


def _crc16(data: bytes) -> int:
    """CRC-16/ARC (FFmpeg's AV_CRC_16_ANSI_LE), as the LAME tag's CRC uses."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def _fix_mp3_padding(f: Any, samples: int, frame_size: int) -> None:
    """Make the LAME tag's end padding match the `samples` encoded.

    FFmpeg's mp3 muxer takes the padding from the encoder's last packet, which cannot
    express more than one frame of it: when the last frame holds fewer than 47 samples
    (1152 minus LAME's 1105 samples of delay), the tag claims up to 46 samples too many.
    The padding is recomputed from the tag's own frame count and delay, and the tag's CRC
    redone as FFmpeg does (over the frame's first 190 bytes, CRC field zeroed).
    """
    f.seek(0)
    head = f.read(10)
    start = 0
    if len(head) == 10 and head[:3] == b"ID3":
        size = (head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7 | (head[9] & 0x7F)
        start = 10 + size + (10 if head[5] & 0x10 else 0)
    f.seek(start)
    frame = bytearray(f.read(192))
    tag = max(frame.find(b"Info", 4, 60), frame.find(b"Xing", 4, 60))
    if len(frame) < 192 or frame[0] != 0xFF or tag < 0 or int.from_bytes(frame[tag + 4 : tag + 8], "big") != 15:
        return  # not the tag layout FFmpeg writes: leave it
    frames = int.from_bytes(frame[tag + 8 : tag + 12], "big")
    field = tag + 141  # 120 bytes of Xing data, then the LAME tag's delay/padding at +21
    value = int.from_bytes(frame[field : field + 3], "big")
    delay, padding = value >> 12, value & 0xFFF
    wanted = frames * frame_size - delay - samples
    if wanted == padding or not 0 <= wanted < 1 << 12:
        return
    frame[field : field + 3] = (delay << 12 | wanted).to_bytes(3, "big")
    crc_at = tag + 154
    frame[crc_at : crc_at + 2] = b"\0\0"
    frame[crc_at : crc_at + 2] = _crc16(frame[:190]).to_bytes(2, "big")
    f.seek(start)
    f.write(frame)
    f.seek(0, os.SEEK_END)


_WRITE_BLOCK = 1 << 16


def write(
    path: str | os.PathLike[str], x: np.ndarray, sample_rate: int, format: str, *, bitrate_kbps: int | None = None
) -> ClipReport:
    """Write (channels, frames) float samples to `path` as `format`, atomically; returns the clip report."""
    if x.ndim != 2:
        raise ValueError(f"expected samples shaped (channels, frames), got shape {x.shape}")
    with CompressedWriter(path, sample_rate, x.shape[0], format, bitrate_kbps=bitrate_kbps) as writer:
        for start in range(0, x.shape[1], _WRITE_BLOCK):
            writer.write(x[:, start : start + _WRITE_BLOCK])
    return writer.clip
