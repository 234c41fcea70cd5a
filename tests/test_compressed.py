"""Compressed stems (stemsep.compressed): MP3, M4A (AAC) and Opus through PyAV's FFmpeg.

Each format is checked by decoding what was written, with stemsep's own reader and with
FFmpeg alone (what the `ffmpeg` CLI would give): channel count, length, alignment (lag 0
by cross-correlation, and a one-sample shift is caught), SNR to the input above a floor
a few dB under what was measured, level, file size against the bitrate, atomicity and
the errors for what cannot be written.

Measured on the test signal below (3 s + 777 samples of sines up to 7 kHz with fades,
written in blocks of 1, 0, 777 and 1000 samples), SNR in dB:

==========================  ======  =========  =========
format @ default bitrate    44.1 k  48 k mono  48 k stereo
==========================  ======  =========  =========
mp3 320 (mono 160)          77.8    79.0       80.0       (44.1 k mono 78.0)
m4a 256 (mono 128)          41.4    48.0       33.6       (44.1 k mono 44.3)
opus 160 (mono 80)          36.6    34.5       36.6       (44.1 k mono 34.5)
==========================  ======  =========  =========

and at 128 kbit/s stereo 44.1 kHz: mp3 54.9, m4a 22.6, opus 36.3. (SNR is not a
perceptual measure: AAC shapes its noise under the tones, which costs SNR, not quality.)
"""

from __future__ import annotations

import os

import av
import numpy as np
import pytest

from stemsep import compressed
from stemsep.choices import COMPRESSED_FORMATS
from stemsep.compilation import snr_db
from stemsep.compressed import CompressedWriter
from stemsep.decode import decode
from stemsep.errors import AudioEncodeError
from stemsep.resample import resample, resampled_length

# SNR floors (dB): measured (module docstring) minus 3-4 dB.
SNR_FLOOR = {("mp3", None): 74.0, ("m4a", None): 30.0, ("opus", None): 31.0,
             ("mp3", 128): 51.0, ("m4a", 128): 19.0, ("opus", 128): 33.0}
FRAME = {"mp3": 1152, "m4a": 1024, "opus": 960}


def _signal(rate: int, n: int, channels: int) -> np.ndarray:
    """A few sines per channel (all under 7 kHz), a different set on each channel, faded in and out."""
    t = np.arange(n) / rate
    sets = [(220, 1100, 5000), (330, 2500, 7000), (440, 880, 1760)]
    x = np.stack([sum(0.2 * np.sin(2 * np.pi * f * t + k) for k, f in enumerate(sets[c % 3])) for c in range(channels)])
    fade = min(2000, n // 4)
    x[:, :fade] *= np.linspace(0, 1, fade)
    x[:, n - fade :] *= np.linspace(1, 0, fade)
    return x.astype(np.float32)


def _write(path, x: np.ndarray, rate: int, fmt: str, bitrate_kbps=None, blocks=(1, 0, 777, 1000)) -> CompressedWriter:
    """Write `x` in blocks cycling through `blocks` (sizes that do not divide any frame size)."""
    with CompressedWriter(path, rate, x.shape[0], fmt, bitrate_kbps=bitrate_kbps) as writer:
        start, i = 0, 0
        while start < x.shape[1]:
            size = blocks[i % len(blocks)]
            writer.write(x[:, start : start + size])
            start, i = start + size, i + 1
    return writer


def _lag(ref: np.ndarray, y: np.ndarray) -> tuple[int, float]:
    """The shift of y against ref maximising their cross-correlation (summed over channels):
    the whole samples, and a parabolic sub-sample estimate."""
    size = 1 << int(np.ceil(np.log2(ref.shape[1] + y.shape[1])))
    cor = np.fft.irfft(np.fft.rfft(y, size) * np.conj(np.fft.rfft(ref, size)), size).sum(axis=0)
    k = int(np.argmax(cor))
    a, b, c = cor[k - 1], cor[k], cor[(k + 1) % size]
    lag = k if k < size // 2 else k - size
    return lag, lag + 0.5 * (a - c) / (a - 2 * b + c)


def _assert_aligned(ref: np.ndarray, y: np.ndarray) -> None:
    lag, exact = _lag(ref, y)
    assert lag == 0, f"decoded audio is shifted by {lag} samples"
    assert abs(exact) < 0.05, f"decoded audio is shifted by {exact:.3f} samples"


def _snr(ref: np.ndarray, y: np.ndarray) -> float:
    n = min(ref.shape[1], y.shape[1])
    return snr_db(ref[:, :n], y[:, :n])


def _ffmpeg_decode(path) -> tuple[np.ndarray, int]:
    """Decode with FFmpeg alone (libavformat's trimming only, as the `ffmpeg` CLI does), as
    packed float (PyAV cannot convert 8 planar channels to an array itself)."""
    out, resampler = [], None
    with av.open(os.fspath(path)) as container:
        stream = container.streams.audio[0]
        for frame in container.decode(stream):
            resampler = resampler or av.AudioResampler(format="flt", layout=frame.layout, rate=frame.sample_rate)
            for f in resampler.resample(frame):
                out.append(f.to_ndarray().reshape(-1, f.layout.nb_channels).T)
        rate = stream.codec_context.sample_rate
    return np.concatenate(out, axis=1), rate


def _left_behind(folder) -> list[str]:
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------------------------------
# pass-through: length, alignment, channels, SNR


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("rate", [44100, 48000])
@pytest.mark.parametrize("fmt", COMPRESSED_FORMATS)
def test_pass_through_is_aligned_full_length_and_close(tmp_path, fmt, rate, channels):
    n = 3 * rate + 777
    x = _signal(rate, n, channels)
    path = tmp_path / f"stem.{fmt}"
    writer = _write(path, x, rate, fmt)
    assert _left_behind(tmp_path) == [path.name]
    assert writer.clip.samples == 0

    y, info = decode(path)
    out_rate = 48000 if fmt == "opus" else rate
    assert (writer.output_rate, info.sample_rate, info.channels) == (out_rate, out_rate, channels)
    ref = resample(x, rate, out_rate)  # Opus at 44.1 kHz: compare at 48 kHz
    assert y.shape == ref.shape  # exact length, M4A included (stemsep trims by the edit list)
    _assert_aligned(ref, y)
    for shift in (1, FRAME[fmt]):  # the check catches a one-sample and a one-frame shift
        shifted = np.pad(y, ((0, 0), (shift, 0)))[:, :n]
        with pytest.raises(AssertionError):
            _assert_aligned(ref, shifted)
    assert _snr(ref, y) > SNR_FLOOR[fmt, None]
    gain = float(np.sum(y * ref) / np.sum(ref * ref))
    assert abs(gain - 1) < 0.01


@pytest.mark.parametrize("fmt", COMPRESSED_FORMATS)
def test_lower_bitrate_snr(tmp_path, fmt):
    x = _signal(44100, 3 * 44100 + 777, 2)
    writer = _write(tmp_path / f"s.{fmt}", x, 44100, fmt, bitrate_kbps=128)
    assert writer.settings.bitrate_kbps == 128
    y, _ = decode(tmp_path / f"s.{fmt}")
    ref = resample(x, 44100, writer.output_rate)
    assert y.shape == ref.shape
    _assert_aligned(ref, y)
    assert _snr(ref, y) > SNR_FLOOR[fmt, 128]


@pytest.mark.parametrize("fmt", COMPRESSED_FORMATS)
def test_ffmpeg_alone_decodes_aligned(tmp_path, fmt):
    """What FFmpeg by itself (the `ffmpeg` CLI's path) gives: MP3 and Opus exact; M4A keeps
    the last AAC frame's padding, (-n) mod 1024 samples of near-silence, since libavformat
    does not apply the end of an edit list."""
    n = 2 * 48000 + 333
    x = _signal(48000, n, 2)
    _write(tmp_path / f"s.{fmt}", x, 48000, fmt)
    y, rate = _ffmpeg_decode(tmp_path / f"s.{fmt}")
    assert rate == 48000
    extra = (-n) % 1024 if fmt == "m4a" else 0
    assert y.shape == (2, n + extra)
    _assert_aligned(x, y[:, :n])
    if extra:
        assert extra == 947
        assert np.max(np.abs(y[:, n:])) < 1e-2  # the padding decodes to (near) silence


def test_opus_resampled_back_matches_the_input(tmp_path):
    """Opus is 48 kHz; resampled back to 44.1 kHz it has the input's length (within one
    sample in general: two roundings) and no delay."""
    for n in (44100, 44101, 44102, 3 * 44100 + 777):  # the rounding: at most one sample either way
        assert abs(resampled_length(resampled_length(n, 44100, 48000), 48000, 44100) - n) <= 1
    n = 3 * 44100 + 777
    x = _signal(44100, n, 2)
    _write(tmp_path / "s.opus", x, 44100, "opus")
    y, info = decode(tmp_path / "s.opus")
    assert info.sample_rate == 48000
    back = resample(y, 48000, 44100)
    assert abs(back.shape[1] - n) <= 1
    _assert_aligned(x[:, : back.shape[1]], back[:, :n])
    assert _snr(x, back) > SNR_FLOOR["opus", None]


@pytest.mark.parametrize("fmt", COMPRESSED_FORMATS)
def test_block_sizes_do_not_matter(tmp_path, fmt):
    x = _signal(44100, 44100 + 123, 2)
    _write(tmp_path / f"a.{fmt}", x, 44100, fmt, blocks=(x.shape[1],))
    _write(tmp_path / f"b.{fmt}", x, 44100, fmt, blocks=(1, 7, 0, 3000, 959, 1153))
    a, _ = decode(tmp_path / f"a.{fmt}")
    b, _ = decode(tmp_path / f"b.{fmt}")
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n", [20, 46, 47, 3 * 1152 + 20, 3 * 1152 + 46, 3 * 1152 + 47])
def test_mp3_short_last_frame_keeps_the_length(tmp_path, n):
    """A last MP3 frame under 47 samples: FFmpeg's tag would claim up to 46 samples more;
    ours is rewritten, with a valid tag CRC."""
    x = np.full((2, n), 0.25, np.float32)
    compressed.write(tmp_path / "s.mp3", x, 44100, "mp3")
    y, _ = decode(tmp_path / "s.mp3")
    assert y.shape == (2, n)
    assert _ffmpeg_decode(tmp_path / "s.mp3")[0].shape == (2, n)
    data = (tmp_path / "s.mp3").read_bytes()
    start = 10 + ((data[6] & 0x7F) << 21 | (data[7] & 0x7F) << 14 | (data[8] & 0x7F) << 7 | (data[9] & 0x7F))
    frame = bytearray(data[start : start + 192])
    tag = frame.find(b"Info")
    stored = bytes(frame[tag + 154 : tag + 156])
    frame[tag + 154 : tag + 156] = b"\0\0"
    assert compressed._crc16(frame[:190]).to_bytes(2, "big") == stored


@pytest.mark.parametrize("kbps", [128, 192, 224])
def test_mp3_keeps_the_level_where_lame_scales_down(tmp_path, kbps):
    """LAME's presets scale by 0.95/0.97/0.98 at these rates; we compensate."""
    x = _signal(44100, 44100, 2)
    compressed.write(tmp_path / "s.mp3", x, 44100, "mp3", bitrate_kbps=kbps)
    y, _ = decode(tmp_path / "s.mp3")
    assert abs(float(np.sum(y * x) / np.sum(x * x)) - 1) < 0.003


# ---------------------------------------------------------------------------------------
# rates and channels


def test_output_rates():
    assert compressed.output_rate("opus", 44100) == 48000
    assert compressed.output_rate("opus", 16000) == 48000
    assert compressed.output_rate("mp3", 44100) == 44100
    assert compressed.output_rate("mp3", 8000) == 8000
    assert compressed.output_rate("mp3", 96000) == 48000
    assert compressed.output_rate("mp3", 37800) == 44100
    assert compressed.output_rate("m4a", 96000) == 96000
    assert compressed.output_rate("m4a", 192000) == 96000
    assert compressed.encode_settings("mp3", 8000, 2).bitrate_kbps == 64  # MPEG-2.5 tops out at 64
    assert compressed.encode_settings("mp3", 44100, 1).bitrate_kbps == 160
    assert compressed.encode_settings("m4a", 44100, 6).bitrate_kbps == 768
    assert compressed.encode_settings("opus", 48000, 2, 96).bitrate_kbps == 96


@pytest.mark.parametrize(("fmt", "rate", "out_rate"), [("mp3", 96000, 48000), ("m4a", 192000, 96000), ("mp3", 8000, 8000)])
def test_unsupported_rate_is_resampled(tmp_path, fmt, rate, out_rate):
    n = rate // 2 + 99
    if rate >= 16000:
        x = _signal(rate, n, 2)
    else:  # 8 kHz holds none of the 5 and 7 kHz tones
        x = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / rate) * np.hanning(n))[None].repeat(2, 0).astype(np.float32)
    writer = _write(tmp_path / f"s.{fmt}", x, rate, fmt)
    assert writer.output_rate == out_rate
    y, info = decode(tmp_path / f"s.{fmt}")
    ref = resample(x, rate, out_rate)
    assert info.sample_rate == out_rate and y.shape == ref.shape
    _assert_aligned(ref, y)
    assert _snr(ref, y) > 20


@pytest.mark.parametrize(("fmt", "channels"), [("m4a", 6), ("opus", 6), ("opus", 3), ("m4a", 8), ("opus", 8)])
def test_multichannel_keeps_channel_order(tmp_path, fmt, channels):
    """Channel i comes back as channel i; the 4th of 6-8 is the LFE (a 50 Hz tone here)."""
    n = 48000
    t = np.arange(n) / 48000
    x = np.stack([0.3 * np.sin(2 * np.pi * (50 if c == 3 else 300 * (c + 1)) * t) for c in range(channels)])
    x = (x * np.hanning(n)).astype(np.float32)
    _write(tmp_path / f"s.{fmt}", x, 48000, fmt)
    if channels < 8:
        y, info = decode(tmp_path / f"s.{fmt}")
        assert info.channels == channels and y.shape == x.shape
    else:  # stemsep's reader crashes PyAV on 8 planar channels; FFmpeg alone, trimmed to n
        y, _ = _ffmpeg_decode(tmp_path / f"s.{fmt}")
        assert y.shape[0] == channels
        y = y[:, :n]
    cor = (y @ x.T) / np.sqrt(np.outer(np.sum(y * y, 1), np.sum(x * x, 1)))
    assert list(np.argmax(cor, axis=1)) == list(range(channels))
    for c in range(channels):
        assert _snr(x[c : c + 1], y[c : c + 1]) > (15 if c == 3 and channels >= 6 else 30)


# ---------------------------------------------------------------------------------------
# size


@pytest.mark.parametrize("kbps", [None, 96])
@pytest.mark.parametrize("fmt", COMPRESSED_FORMATS)
def test_size_follows_the_bitrate(tmp_path, fmt, kbps):
    """10 s of broadband noise: the file is within 25% of bitrate x duration (measured:
    MP3 +0.6%, M4A +0.7% at 256 / +3% at 96, Opus -8% (VBR))."""
    rng = np.random.default_rng(7)
    x = (0.1 * rng.standard_normal((2, 10 * 44100))).astype(np.float32)
    writer = _write(tmp_path / f"s.{fmt}", x, 44100, fmt, bitrate_kbps=kbps, blocks=(65536,))
    expected = writer.settings.bitrate_kbps * 1000 / 8 * 10
    assert 0.75 < (tmp_path / f"s.{fmt}").stat().st_size / expected < 1.25


# ---------------------------------------------------------------------------------------
# levels


@pytest.mark.parametrize("fmt", COMPRESSED_FORMATS)
def test_overs_are_clipped_and_counted(tmp_path, fmt):
    n = 44100
    x = (1.5 * np.sin(2 * np.pi * 441 * np.arange(n) / 44100))[None].repeat(2, 0).astype(np.float32)
    writer = _write(tmp_path / f"s.{fmt}", x, 44100, fmt)
    assert writer.clip.samples == int(np.count_nonzero(np.abs(x) > 1))
    assert writer.clip.peak == pytest.approx(1.5, abs=1e-3)
    y, _ = decode(tmp_path / f"s.{fmt}")
    assert np.max(np.abs(y)) < 1.25  # clipped at 1; what is left is codec overshoot


def test_nan_is_refused_and_nothing_left(tmp_path):
    writer = CompressedWriter(tmp_path / "s.mp3", 44100, 2, "mp3")
    writer.write(np.zeros((2, 5000), np.float32))
    bad = np.zeros((2, 100), np.float32)
    bad[1, 50] = np.nan
    with pytest.raises(AudioEncodeError, match="NaN"):
        writer.write(bad)
    assert _left_behind(tmp_path) == []


# ---------------------------------------------------------------------------------------
# atomicity


@pytest.mark.parametrize("fmt", COMPRESSED_FORMATS)
def test_abort_leaves_no_file(tmp_path, fmt):
    writer = CompressedWriter(tmp_path / f"s.{fmt}", 44100, 2, fmt)
    writer.write(_signal(44100, 10000, 2))
    assert len(_left_behind(tmp_path)) == 1 and _left_behind(tmp_path)[0].endswith(".part")
    writer.abort()
    assert _left_behind(tmp_path) == []
    with pytest.raises(ValueError, match="closed"):
        writer.write(_signal(44100, 100, 2))


def test_failure_inside_with_keeps_the_old_file(tmp_path):
    target = tmp_path / "s.m4a"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), CompressedWriter(target, 44100, 2, "m4a") as writer:
        writer.write(_signal(44100, 10000, 2))
        raise RuntimeError("interrupted")
    assert _left_behind(tmp_path) == ["s.m4a"] and target.read_bytes() == b"old"


def test_close_replaces_the_old_file(tmp_path):
    target = tmp_path / "s.opus"
    target.write_bytes(b"old")
    compressed.write(target, _signal(48000, 4800, 2), 48000, "opus")
    assert _left_behind(tmp_path) == ["s.opus"]
    assert decode(target)[0].shape == (2, 4800)


# ---------------------------------------------------------------------------------------
# what cannot be written: one sentence, before any file exists


def _one_line_error(call) -> AudioEncodeError:
    with pytest.raises(AudioEncodeError) as caught:
        call()
    assert "\n" not in str(caught.value)
    return caught.value


def test_missing_folder(tmp_path):
    exc = _one_line_error(lambda: CompressedWriter(tmp_path / "nowhere" / "s.mp3", 44100, 2, "mp3"))
    assert exc.file == "s.mp3" and "does not exist" in str(exc)


@pytest.mark.skipif(not os.path.isdir("/sys"), reason="needs Linux's /sys")
def test_unwritable_folder():
    """/sys refuses new files even to root."""
    exc = _one_line_error(lambda: CompressedWriter("/sys/s.opus", 44100, 2, "opus"))
    assert exc.file == "s.opus" and "cannot be written into /sys" in str(exc)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        exc = _one_line_error(lambda: CompressedWriter(folder / "s.m4a", 44100, 2, "m4a"))
        assert "permission denied" in str(exc).lower()
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize(
    ("fmt", "rate", "channels", "kbps", "says"),
    [
        ("mp3", 44100, 3, None, "MP3 output takes mono or stereo, not 3 channels"),
        ("opus", 48000, 5, None, "Opus output of 5 channels is not supported"),
        ("opus", 48000, 9, None, "at most 8 channels, not 9"),
        ("m4a", 48000, 9, None, "at most 8 channels, not 9"),
        ("mp3", 4000, 2, None, "sample rate 4000 Hz is outside"),
        ("m4a", 768000, 2, None, "sample rate 768000 Hz is outside"),
        ("mp3", 44100, 2, 300, "MP3 bitrate 300 kbit/s is not one of 32, 40"),
        ("mp3", 22050, 2, 320, "MP3 bitrate 320 kbit/s is not one of 8, 16"),
        ("opus", 48000, 2, 600, "Opus bitrate 600 kbit/s is outside 6-512"),
        ("m4a", 44100, 2, 1000, "AAC bitrate 1000 kbit/s is outside 16-528"),
        ("ogg", 44100, 2, None, "compressed format 'ogg' is not one of mp3, m4a, opus"),
        ("mp3", 44100, 0, None, "channel count 0"),
    ],
)
def test_what_cannot_be_written(tmp_path, fmt, rate, channels, kbps, says):
    exc = _one_line_error(lambda: CompressedWriter(tmp_path / "s.out", rate, channels, fmt, bitrate_kbps=kbps))
    assert says in str(exc) and exc.file == "s.out"
    assert _left_behind(tmp_path) == []
