"""The file boundary: every format decodes to the right rate, channels, exact length and
values; every bad input gets one sentence naming the file; stems are written exactly and
atomically; resampling streams the same as it does in one go."""

import errno
import fractions
import hashlib
import importlib.util
import os
import pwd
import shutil
import stat
import tempfile
from pathlib import Path

import av
import av.logging
import numpy as np
import pytest
import soundfile
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stemsep import pcm
from stemsep.decode import AudioInfo, AudioReader, decode, probe
from stemsep.pcm import AudioWriter, ClipReport, output_subtype, quantize, write
from stemsep.resample import StreamResampler, resample, resampled_length
from stemsep.errors import AudioDecodeError, AudioEncodeError
from stemsep.testing import av_encode

# The MUSDB18 excerpt shipped by the stempeg package (found without importing stempeg).
STEMPEG_DIR = Path(importlib.util.find_spec("stempeg").submodule_search_locations[0])
STEM_MP4 = STEMPEG_DIR / "data" / "The Easton Ellises - Falcon 69.stem.mp4"
MOV = "mov,mp4,m4a,3gp,3g2,mj2"
LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}


# ---------------------------------------------------------------------------------------
# making test files


def tones(channels: int, frames: int, rate: int) -> np.ndarray:
    """A few sines per channel, well inside every codec's band: float32 (channels, frames)."""
    t = np.arange(frames) / rate
    c = np.arange(channels)[:, None]
    return (0.2 * np.sin(2 * np.pi * (220 + 110 * c) * t) + 0.1 * np.sin(2 * np.pi * (1000 + 37 * c) * t)).astype(np.float32)


def random_ints(channels: int, frames: int, bits: int, seed: int = 0) -> np.ndarray:
    """Full-range random b-bit integers, int32 (channels, frames), extremes included."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    ints = np.random.default_rng(seed).integers(lo, hi, (channels, frames), endpoint=True)
    ints[:, 0], ints[:, -1] = lo, hi
    return ints.astype(np.int32)


def sf_write_ints(path: Path, ints: np.ndarray, bits: int, rate: int, subtype: str, fmt: str) -> None:
    """Store b-bit integers exactly: libsndfile keeps the top bits of int16/int32 input."""
    if bits <= 16:
        data = (ints << (16 - bits)).astype(np.int16)
    else:
        data = (ints << (32 - bits)).astype(np.int32)
    soundfile.write(path, data.T, rate, subtype=subtype, format=fmt)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_sentence(message: str, name: str) -> None:
    assert message.startswith(f"{name}: ")
    assert "\n" not in message and ". " not in message and not message.endswith(".")


# ---------------------------------------------------------------------------------------
# lossless: exact values

LOSSLESS_INT = [
    # (container, subtype, bits, codec, rate, channels)
    ("WAV", "PCM_U8", 8, "pcm_u8", 8000, 1),
    ("WAV", "PCM_16", 16, "pcm_s16le", 22050, 2),
    ("WAV", "PCM_16", 16, "pcm_s16le", 44100, 6),
    ("WAV", "PCM_24", 24, "pcm_s24le", 48000, 2),
    ("WAV", "PCM_24", 24, "pcm_s24le", 96000, 6),
    ("WAV", "PCM_32", 32, "pcm_s32le", 44100, 2),
    ("FLAC", "PCM_16", 16, "flac", 44100, 2),
    ("FLAC", "PCM_16", 16, "flac", 8000, 1),
    ("FLAC", "PCM_24", 24, "flac", 96000, 6),
    ("FLAC", "PCM_24", 24, "flac", 48000, 2),
    ("AIFF", "PCM_S8", 8, "pcm_s8", 22050, 1),
    ("AIFF", "PCM_16", 16, "pcm_s16be", 44100, 2),
    ("AIFF", "PCM_24", 24, "pcm_s24be", 48000, 2),
]


@pytest.mark.parametrize("container, subtype, bits, codec, rate, channels", LOSSLESS_INT)
def test_integer_pcm_decodes_to_int_over_2_pow_bits_minus_1_exactly(tmp_path, container, subtype, bits, codec, rate, channels):
    # libsndfile pads odd-length 8-bit AIFF data with a sample and counts it: keep it even there
    frames = 12_346 if (container, bits) == ("AIFF", 8) else 12_345
    ints = random_ints(channels, frames, bits)
    path = tmp_path / f"song.{container.lower()}"
    sf_write_ints(path, ints, bits, rate, subtype, container)

    x, info = decode(path)

    assert x.dtype == np.float32 and x.shape == (channels, frames)
    assert info == AudioInfo(rate, channels, codec, container.lower(), bits, False, True, frames)
    expected = (ints / 2.0 ** (bits - 1)).astype(np.float32)  # exact for bits <= 24
    assert np.array_equal(x, expected)
    if bits <= 24:
        assert np.array_equal(np.round(x.astype(np.float64) * 2 ** (bits - 1)), ints)
    assert probe(path) == info


@pytest.mark.parametrize("subtype, dtype, bits", [("FLOAT", np.float32, 32), ("DOUBLE", np.float64, 64)])
def test_float_wav_passes_through(tmp_path, subtype, dtype, bits):
    x_in = np.random.default_rng(1).uniform(-1.5, 1.5, (2, 5000)).astype(dtype)  # overs allowed
    path = tmp_path / "float.wav"
    soundfile.write(path, x_in.T, 48000, subtype=subtype)

    x, info = decode(path)

    assert np.array_equal(x, x_in.astype(np.float32))
    assert (info.bits, info.is_float, info.lossless, info.frames) == (bits, True, True, 5000)


@pytest.mark.parametrize("bits, sample_format", [(16, "s16p"), (24, "s32p")])
def test_alac_in_m4a_is_exact(tmp_path, bits, sample_format):
    ints = random_ints(2, 5000, bits)
    path = tmp_path / "song.m4a"
    with av.open(str(path), "w") as out:
        s = out.add_stream("alac", rate=44100)
        s.layout, s.format = "stereo", sample_format
        data = ints.astype(np.int16) if bits == 16 else ints << 8
        frame = av.AudioFrame.from_ndarray(data, format=sample_format, layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = 44100, 0, fractions.Fraction(1, 44100)
        for packet in [*s.encode(frame), *s.encode(None)]:
            out.mux(packet)

    x, info = decode(path)

    assert (info.codec, info.bits, info.lossless, info.frames) == ("alac", bits, True, 5000)
    assert np.array_equal(x.astype(np.float64) * 2 ** (bits - 1), ints)


def test_long_pcm_length_comes_from_the_tail_and_matches_decoding(tmp_path):
    """Long enough that probe seeks near the end instead of decoding everything."""
    ints = random_ints(2, 8000 * 10 + 7, 16)
    for fmt, subtype, frame_bytes in [("WAV", "PCM_16", 4), ("AIFF", "PCM_24", 6), ("FLAC", "PCM_16", None)]:
        path = tmp_path / f"long.{fmt.lower()}"
        sf_write_ints(path, ints, 16, 8000, subtype, fmt)
        assert probe(path).frames == decode(path)[1].frames == 80_007
        if frame_bytes:  # cut well before the stated end, mid-frame: still exact
            data = path.read_bytes()
            path.write_bytes(data[: len(data) - frame_bytes * 30_000 - 1])
            x, info = decode(path)
            assert probe(path).frames == info.frames == 50_006
            assert np.array_equal(np.round(x.astype(np.float64) * 2**15), ints[:, :50_006])


# ---------------------------------------------------------------------------------------
# lossy: rate, channels and the exact sample count where the encoder wrote gapless info

LOSSY = [
    # (name, writer, codec, rate, channels)
    ("a.mp3", "sf_mp3", "mp3", 8000, 1),
    ("a.mp3", "sf_mp3", "mp3", 22050, 2),
    ("a.mp3", "sf_mp3", "mp3", 32000, 1),
    ("a.mp3", "sf_mp3", "mp3", 44100, 2),
    ("a.mp3", "sf_mp3", "mp3", 48000, 2),
    ("a.m4a", "aac", "aac", 44100, 2),
    ("a.mp4", "aac", "aac", 48000, 1),
    ("a.m4a", "aac", "aac", 96000, 6),
    ("a.ogg", "sf_vorbis", "vorbis", 44100, 2),
    ("a.ogg", "sf_vorbis", "vorbis", 22050, 1),
    ("a.ogg", "sf_vorbis", "vorbis", 48000, 6),
    ("a.opus", "opus", "opus", 48000, 2),
    ("a.opus", "opus", "opus", 48000, 1),
    ("a.opus", "opus", "opus", 48000, 6),
    ("b.ogg", "sf_opus", "opus", 48000, 2),
]


def make_lossy(path: Path, writer: str, x: np.ndarray, rate: int) -> None:
    if writer == "sf_mp3":  # libsndfile drives LAME itself and writes a correct LAME tag
        soundfile.write(path, x.T, rate, format="MP3")
    elif writer == "aac":  # a movie timescale of the sample rate lets the edit list be exact
        av_encode(path, "aac", x, rate, container_options={"movie_timescale": str(rate)})
    elif writer == "opus":
        av_encode(path, "libopus", x, rate, sample_format="flt")
    else:
        soundfile.write(path, x.T, rate, format="OGG", subtype=writer.removeprefix("sf_").upper())


# FFmpeg's order for 6 channels is FL FR FC LFE BL BR (WAV's); Vorbis stores FL FC FR BL BR LFE
# and FFmpeg maps it, while libsndfile writes our rows in Vorbis order unmapped.
VORBIS_6 = [0, 2, 1, 5, 3, 4]


@pytest.mark.parametrize("name, writer, codec, rate, channels", LOSSY)
def test_lossy_formats_decode_to_the_encoded_length(tmp_path, name, writer, codec, rate, channels):
    frames = rate + 4321  # not a multiple of any codec's frame size
    x_in = tones(channels, frames, rate)
    path = tmp_path / name
    make_lossy(path, writer, x_in, rate)

    x, info = decode(path)

    assert (info.codec, info.sample_rate, info.channels, info.lossless, info.bits) == (codec, rate, channels, False, None)
    assert info.frames == x.shape[1]
    if codec == "vorbis":
        # FFmpeg drops the last 128 (long block 2048) or 256 samples of most Ogg Vorbis files
        # (libvorbis via libsndfile or via ffmpeg alike; libvorbisfile reads them all)
        assert frames - 256 <= info.frames <= frames
    else:
        assert info.frames == frames  # encoder delay and padding removed exactly
    if codec == "vorbis" and channels == 6:
        x_in = x_in[VORBIS_6]
    if codec in ("aac", "vorbis") and channels == 6:
        x, x_in = np.delete(x, 3, 0), np.delete(x_in, 3, 0)  # their encoders low-pass the LFE channel
    # and aligned: the decoded signal is the original, not shifted by the encoder delay
    x_in = x_in[:, : info.frames]
    err = np.sqrt(np.mean((x - x_in) ** 2) / np.mean(x_in**2))
    assert err < 0.2, f"relative error {err:.3f}"
    assert probe(path) == info


def test_aac_with_a_millisecond_edit_list_is_off_by_the_muxer_rounding(tmp_path):
    """FFmpeg's MP4 muxer writes the edit list in ms unless told otherwise: the container then
    states the length only to the ms, and that is what we honour (here +9 and -3 samples)."""
    for rate, channels, frames, expected in [(44100, 2, 88323, 88332), (48000, 1, 88323, 88320)]:
        path = tmp_path / f"ms{rate}.m4a"
        av_encode(path, "aac", tones(channels, frames, rate), rate)
        assert probe(path).frames == expected == round(round(frames / rate * 1000) / 1000 * rate)


def test_musdb_stem_mp4_streams_are_selected_by_index():
    assert STEM_MP4.is_file()
    with av.open(str(STEM_MP4)) as container:
        stated = [s.duration * s.time_base * s.rate for s in container.streams.audio]
    assert stated == [268288] * 5

    decoded = [decode(STEM_MP4, stream=i) for i in range(5)]

    for x, info in decoded:
        assert (info.sample_rate, info.channels, info.frames, info.codec) == (44100, 2, 268288, "aac")
        assert x.shape == (2, 268288)
    mixture, stems = decoded[0][0], [d[0] for d in decoded[1:]]
    assert np.array_equal(decode(STEM_MP4)[0], mixture)  # stream 0 is the default
    assert len({hashlib.sha1(x.tobytes()).hexdigest() for x in [mixture, *stems]}) == 5
    residual = mixture - sum(stems)  # the mixture is about the sum of drums, bass, other, vocals
    assert np.sqrt(np.mean(residual**2) / np.mean(mixture**2)) < 0.25  # measured 0.17 (AAC-coded apart)
    with pytest.raises(AudioDecodeError, match="has 5 audio streams, so there is no audio stream 5"):
        probe(STEM_MP4, stream=5)


def test_format_comes_from_the_content_not_the_name(tmp_path):
    ints = random_ints(2, 3000, 16)
    wav = tmp_path / "song.wav"
    sf_write_ints(wav, ints, 16, 44100, "PCM_16", "WAV")
    mp3 = tmp_path / "song.mp3"
    soundfile.write(mp3, tones(2, 30_000, 44100).T, 44100, format="MP3")
    flac = tmp_path / "song.flac"
    sf_write_ints(flac, ints, 16, 44100, "PCM_16", "FLAC")

    cases = {"tmpabc123file": wav, "tmpdef456file": mp3, "tmpghi789file": flac, "really_flac.mp3": flac, "really_mp3.wav": mp3}
    for name, source in cases.items():
        shutil.copy(source, tmp_path / name)
        assert decode(tmp_path / name)[1] == decode(source)[1]
    assert probe(tmp_path / "tmpabc123file").codec == "pcm_s16le"
    assert probe(tmp_path / "tmpdef456file").codec == "mp3"


def test_decoding_never_modifies_the_input(tmp_path):
    path = tmp_path / "song.flac"
    sf_write_ints(path, random_ints(2, 20_000, 24), 24, 44100, "PCM_24", "FLAC")
    before, mtime = sha256(path), path.stat().st_mtime_ns
    decode(path)
    probe(path)
    list(AudioReader(path).blocks(1000))
    assert sha256(path) == before and path.stat().st_mtime_ns == mtime


def test_blocks_have_the_asked_size_and_concatenate_to_decode(tmp_path):
    path = tmp_path / "song.mp3"
    soundfile.write(path, tones(2, 50_000, 44100).T, 44100, format="MP3")
    reader = AudioReader(path)
    blocks = list(reader.blocks(4096))
    assert all(b.shape == (2, 4096) and b.dtype == np.float32 for b in blocks[:-1])
    assert 0 < blocks[-1].shape[1] <= 4096
    assert np.array_equal(np.concatenate(blocks, axis=1), decode(path)[0])
    assert reader.info.frames == 50_000 and reader.undecodable_packets == 0
    assert list(map(np.shape, reader.blocks(4096))) == list(map(np.shape, blocks))  # re-iterable


# ---------------------------------------------------------------------------------------
# damaged and truncated input: decode what is there


def test_truncated_wav_gives_the_samples_before_the_cut(tmp_path):
    ints = random_ints(2, 10_000, 24)
    path = tmp_path / "cut.wav"
    sf_write_ints(path, ints, 24, 44100, "PCM_24", "WAV")
    data = path.read_bytes()
    path.write_bytes(data[: 44 + 6 * 4000 + 5])  # 4000 whole frames and a partial one

    x, info = decode(path)

    assert info.frames == probe(path).frames == 4000
    assert np.array_equal(x.astype(np.float64) * 2**23, ints[:, :4000])


def test_truncated_flac_gives_an_exact_prefix(tmp_path):
    ints = random_ints(2, 44100, 16)
    path = tmp_path / "cut.flac"
    sf_write_ints(path, ints, 16, 44100, "PCM_16", "FLAC")
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])

    reader = AudioReader(path)
    x = np.concatenate(list(reader.blocks()), axis=1)

    assert 0 < x.shape[1] < 44100 and reader.info.frames == x.shape[1] == probe(path).frames
    assert np.array_equal(x.astype(np.float64) * 2**15, ints[:, : x.shape[1]])


def test_truncated_mp3_decodes_the_frames_that_are_there(tmp_path):
    path = tmp_path / "cut.mp3"
    soundfile.write(path, tones(2, 44100, 44100).T, 44100, format="MP3")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    x, info = decode(path)
    assert 15_000 < info.frames < 30_000 and probe(path).frames == info.frames


def test_damage_in_the_middle_is_skipped_and_counted(tmp_path, capfd):
    path = tmp_path / "scratched.mp3"
    soundfile.write(path, tones(2, 88200, 44100).T, 44100, format="MP3")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 300] = np.random.default_rng(5).integers(0, 256, 300, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))

    reader = AudioReader(path)
    x = np.concatenate(list(reader.blocks()), axis=1)

    assert 80_000 < x.shape[1] <= 88200 and reader.undecodable_packets >= 1
    assert probe(path).frames == x.shape[1]
    assert capfd.readouterr() == ("", "")


# ---------------------------------------------------------------------------------------
# errors: one sentence naming the file, nothing on stderr


def _no_audio_mp4(path: Path) -> None:
    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=25)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            frame.pts = i
            for packet in s.encode(frame):
                out.mux(packet)
        for packet in s.encode(None):
            out.mux(packet)


def _wav(path: Path, x: np.ndarray, rate: int = 44100, subtype: str = "PCM_16") -> None:
    soundfile.write(path, x, rate, subtype=subtype)


def _truncated_m4a(path: Path) -> None:
    av_encode(path, "aac", tones(2, 20_000, 44100), 44100)  # the index (moov) is at the end
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _nan(value: float):
    def make(path: Path) -> None:
        x = np.zeros((1000, 2), np.float32)
        x[500, 1] = value
        _wav(path, x, subtype="FLOAT")

    return make


BAD_FILES = {
    "missing": ("gone.wav", lambda p: None, "gone.wav: file not found"),
    "directory": ("folder.wav", lambda p: p.mkdir(), "folder.wav: is a directory, not an audio file"),
    "fifo": ("pipe.wav", lambda p: os.mkfifo(p), "pipe.wav: is not a regular file"),
    "empty": ("empty.mp3", lambda p: p.write_bytes(b""), "empty.mp3: is empty (0 bytes)"),
    "random bytes": (
        "noise.mp3",
        lambda p: p.write_bytes(np.random.default_rng(3).integers(0, 256, 50_000, dtype=np.uint8).tobytes()),
        "noise.mp3: not an audio file",
    ),
    "random bytes, no name": (
        "tmpabc123file",
        lambda p: p.write_bytes(np.random.default_rng(4).integers(0, 256, 5_000, dtype=np.uint8).tobytes()),
        "tmpabc123file: not an audio file",
    ),
    "text file": ("notes.txt", lambda p: p.write_text("la la la\n" * 200), "notes.txt: not an audio file"),
    "text file, no name": ("tmptextfile", lambda p: p.write_text("la la la\n" * 200), "tmptextfile: not an audio file"),
    "video only": ("clip.mp4", _no_audio_mp4, "clip.mp4: not an audio file (no audio stream)"),
    "zero frames": ("silence.wav", lambda p: _wav(p, np.zeros((0, 2), np.int16)), "silence.wav: contains no audio samples"),
    "header only": (
        "stub.wav",
        lambda p: (_wav(p, np.zeros((100, 2), np.int16)), p.write_bytes(p.read_bytes()[:30])),
        "stub.wav: not an audio file",
    ),
    "truncated m4a": ("cut.m4a", _truncated_m4a, "cut.m4a: not an audio file (unrecognised or damaged data)"),
    "65 channels": (
        "wide.wav",
        lambda p: _wav(p, np.zeros((100, 65), np.int16)),
        "wide.wav: has 65 channels, more than the 64 supported",
    ),
    "4 kHz": (
        "low.wav",
        lambda p: _wav(p, np.zeros((100, 1), np.int16), rate=4000),
        "low.wav: sample rate 4000 Hz is outside the supported 8000-384000 Hz",
    ),
    "400 kHz": (
        "high.wav",
        lambda p: _wav(p, np.zeros((100, 1), np.int16), rate=400_000),
        "high.wav: sample rate 400000 Hz is outside the supported 8000-384000 Hz",
    ),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_input_is_one_sentence_naming_the_file_and_silent(tmp_path, capfd, case):
    name, make, message = BAD_FILES[case]
    path = tmp_path / name
    make(path)
    for call in (probe, decode, lambda p: list(AudioReader(p).blocks())):
        with pytest.raises(AudioDecodeError) as caught:
            call(path)
        assert str(caught.value).startswith(message)
        assert_one_sentence(str(caught.value), name)
        assert str(tmp_path) not in str(caught.value)  # the name, not the temp directory
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize("value", [np.nan, -np.inf])
def test_nan_or_inf_in_float_wav_is_refused_when_decoding(tmp_path, capfd, value):
    path = tmp_path / "odd.wav"
    _nan(value)(path)
    assert probe(path).frames == 1000  # probe reads the header and the end, not every sample
    for call in (decode, lambda p: list(AudioReader(p).blocks())):
        with pytest.raises(AudioDecodeError) as caught:
            call(path)
        assert str(caught.value) == "odd.wav: contains NaN or infinite samples"
    assert capfd.readouterr() == ("", "")


def test_ffmpeg_logging_stays_off_even_when_someone_turned_it_on(tmp_path, capfd):
    path = tmp_path / "noise.wav"
    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(range(256)) * 40)
    previous = av.logging.get_level()
    av.logging.set_level(av.logging.VERBOSE)  # PyAV then routes FFmpeg logs to `logging`
    try:
        with pytest.raises(AudioDecodeError):
            decode(path)
        assert av.logging.get_level() == av.logging.VERBOSE  # restored after the call
    finally:
        av.logging.set_level(previous)
    assert capfd.readouterr() == ("", "")


def test_endless_audio_is_cut_off_by_the_duration_guard(tmp_path):
    path = tmp_path / "long.wav"
    _wav(path, np.zeros((20_000, 1), np.int16), rate=8000)
    with pytest.raises(AudioDecodeError, match="long.wav: is longer than the 0.0005-hour limit"):
        list(AudioReader(path, max_duration_s=1.8).blocks())


def _unprivileged(call) -> str:
    """`call()` (which returns a str) run without root, which ignores file permissions: as root,
    in a forked child that drops to 'nobody' (no exec, so the interpreter's location does not matter)."""
    if os.geteuid() != 0:
        return call()
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("running as root and there is no 'nobody' user to drop to")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        result = "child failed"
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            result = call()
        except BaseException as exc:
            result = f"child failed: {exc!r}"
        finally:
            os.write(write_end, result.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        result = pipe.read().decode()
    os.waitpid(pid, 0)
    return result


def _error_of(call) -> str:
    try:
        call()
    except Exception as exc:
        return f"{type(exc).__name__} {exc}"
    return "no error"


@pytest.fixture
def open_tmp():
    """A directory everyone can enter (pytest's tmp_path is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="stemsep-audio-"))
    path.chmod(0o755)
    yield path
    for p in [path, *path.rglob("*")]:
        p.chmod(0o755)
    shutil.rmtree(path)


def test_unreadable_file_says_permission_denied(open_tmp):
    path = open_tmp / "locked.wav"
    _wav(path, np.zeros((100, 2), np.int16))
    path.chmod(0)
    result = _unprivileged(lambda: _error_of(lambda: decode(path)))
    assert result == "AudioDecodeError locked.wav: cannot be read (permission denied)"


# ---------------------------------------------------------------------------------------
# resampling


@pytest.mark.parametrize("from_rate, to_rate", [(48000, 44100), (44100, 48000), (22050, 44100), (96000, 44100), (8000, 44100)])
def test_resample_length_and_content(from_rate, to_rate):
    n = 12_345
    x = tones(2, n, from_rate)
    y = resample(x, from_rate, to_rate)
    assert y.shape == (2, resampled_length(n, from_rate, to_rate)) and y.dtype == np.float32
    assert abs(y.shape[1] - n * to_rate / from_rate) <= 0.5
    inner = slice(to_rate // 50, -to_rate // 50)  # the borders ring (a step at the ends)
    reference = tones(2, y.shape[1], to_rate)
    assert np.max(np.abs(y[:, inner] - reference[:, inner])) < 1e-4


@pytest.mark.parametrize("from_rate, to_rate", [(48000, 44100), (44100, 22050), (8000, 44100), (44100, 96000), (3, 2)])
def test_resampled_length_is_what_soxr_returns(from_rate, to_rate):
    for n in [*range(1, 300), 12_345, 1_000_001]:
        assert resample(np.zeros((1, n), np.float32), from_rate, to_rate).shape[1] == resampled_length(n, from_rate, to_rate)
    assert resampled_length(240, 48000, 44100) == 220  # 220.5 in exact arithmetic


def test_resample_at_equal_rates_is_the_identity():
    x = tones(2, 1000, 44100)
    assert resample(x, 44100, 44100) is x
    s = StreamResampler(44100, 44100, 2)
    assert s.process(x) is x and s.flush().shape == (2, 0)


@settings(max_examples=15, deadline=None)
@given(
    rates=st.sampled_from([(48000, 44100), (44100, 48000), (32000, 44100), (96000, 44100)]),
    cuts=st.lists(st.integers(0, 20_000), max_size=6),
)
def test_stream_resampler_equals_one_shot(rates, cuts):
    x = np.random.default_rng(7).uniform(-1, 1, (2, 20_000)).astype(np.float32)
    edges = [0, *sorted(cuts), 20_000]
    s = StreamResampler(*rates, channels=2)
    pieces = [s.process(x[:, a:b]) for a, b in zip(edges, edges[1:])] + [s.flush()]
    streamed = np.concatenate(pieces, axis=1)
    one_shot = resample(x, *rates)
    assert streamed.shape == one_shot.shape
    assert np.max(np.abs(streamed - one_shot)) <= 1e-6  # measured: identical


# ---------------------------------------------------------------------------------------
# choosing the output precision


def info_of(codec: str, bits: int | None, is_float: bool = False) -> AudioInfo:
    return AudioInfo(44100, 2, codec, "x", bits, is_float, bits is not None, 1000)


SUBTYPES = [
    # (input, format, bit depth, subtype)
    (info_of("pcm_s16le", 16), "wav", "auto", "PCM_16"),
    (info_of("pcm_s24le", 24), "wav", "auto", "PCM_24"),
    (info_of("pcm_u8", 8), "wav", "auto", "PCM_16"),
    (info_of("pcm_s32le", 32), "wav", "auto", "FLOAT"),
    (info_of("pcm_f32le", 32, True), "wav", "auto", "FLOAT"),
    (info_of("pcm_f64le", 64, True), "wav", "auto", "FLOAT"),
    (info_of("flac", 16), "flac", "auto", "PCM_16"),
    (info_of("flac", 24), "flac", "auto", "PCM_24"),
    (info_of("pcm_s32le", 32), "flac", "auto", "PCM_24"),
    (info_of("pcm_f32le", 32, True), "flac", "auto", "PCM_24"),
    (info_of("alac", 24), "wav", "auto", "PCM_24"),
    (info_of("mp3", None), "wav", "auto", "PCM_16"),
    (info_of("aac", None), "flac", "auto", "PCM_16"),
    (info_of("vorbis", None), "wav", "auto", "PCM_16"),
    (info_of("opus", None), "wav", "auto", "PCM_16"),
    (info_of("mp3", None), "wav", 24, "PCM_24"),
    (info_of("mp3", None), "wav", "32", "FLOAT"),
    (info_of("pcm_s24le", 24), "wav", 16, "PCM_16"),
    (info_of("pcm_s24le", 24), "flac", "16", "PCM_16"),
    (info_of("pcm_s16le", 16), "FLAC", "24", "PCM_24"),
    (info_of("pcm_s16le", 16), "wav", 32, "FLOAT"),
]


@pytest.mark.parametrize("info, fmt, depth, subtype", SUBTYPES)
def test_output_subtype_table(info, fmt, depth, subtype):
    assert output_subtype(info, fmt, depth) == subtype


@pytest.mark.parametrize(
    "fmt, depth, message",
    [
        ("flac", 32, "bit depth 32 (float) is not available for FLAC; choose 16 or 24, or WAV"),
        ("flac", "32", "bit depth 32 (float) is not available for FLAC; choose 16 or 24, or WAV"),
        ("mp3", "auto", "output format 'mp3' is not one of wav, flac"),
        ("wav", 8, "bit depth 8 is not one of auto, 16, 24, 32"),
        ("wav", "twenty", "bit depth 'twenty' is not one of auto, 16, 24, 32"),
        ("wav", True, "bit depth True is not one of auto, 16, 24, 32"),
    ],
)
def test_output_subtype_rejects_what_cannot_be_written(fmt, depth, message):
    with pytest.raises(AudioEncodeError) as caught:
        output_subtype(info_of("pcm_s16le", 16), fmt, depth)
    assert str(caught.value) == message


# ---------------------------------------------------------------------------------------
# quantizing


def test_quantize_rounds_half_to_even_and_reports_clipping():
    x = np.array([[0.5, 1.5, 2.5, -0.5, -1.5, 32767.4, 32767.5, 32768.0, -32768.0, -32769.0]], np.float32) / 32768
    ints, report = quantize(x, 16)
    assert ints.dtype == np.int16
    assert ints.tolist() == [[0, 2, 2, 0, -2, 32767, 32767, 32767, -32768, -32768]]
    assert report == ClipReport(samples=3, peak=32769 / 32768)  # 32767.5 -> 32768, 32768, -32769


def test_quantize_24_bit_clip_and_peak():
    x = np.array([[0.25, -1.0, 1.0, 2.0, -np.inf]], np.float32)
    ints, report = quantize(x, 24)
    assert ints.dtype == np.int32
    assert ints.tolist() == [[2**21, -(2**23), 2**23 - 1, 2**23 - 1, -(2**23)]]
    assert report.samples == 3 and report.peak == np.inf


def test_quantize_refuses_nan_and_other_depths():
    with pytest.raises(ValueError):
        quantize(np.array([[np.nan]], np.float32), 16)
    with pytest.raises(ValueError):
        quantize(np.zeros((1, 4), np.float32), 8)


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.int16, hnp.array_shapes(min_dims=2, max_dims=2, max_side=64)))
def test_quantize_inverts_decoding_for_16_bit(ints):
    ints_back, report = quantize(ints.astype(np.float32) / 32768, 16)
    assert np.array_equal(ints_back, ints) and report.samples == 0


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.int32, st.tuples(st.integers(1, 3), st.integers(0, 64)), elements=st.integers(-(2**23), 2**23 - 1)))
def test_quantize_inverts_decoding_for_24_bit(ints):
    ints_back, report = quantize(ints.astype(np.float32) / 2**23, 24)
    assert np.array_equal(ints_back, ints) and report.samples == 0


# ---------------------------------------------------------------------------------------
# writing


@pytest.mark.parametrize("fmt", ["wav", "flac"])
@pytest.mark.parametrize("bits", [16, 24])
def test_written_integers_are_stored_exactly(tmp_path, fmt, bits):
    ints = random_ints(2, 10_000, bits)
    path = tmp_path / f"stem.{fmt}"

    report = write(path, ints.astype(np.int16) if bits == 16 else ints, 44100, f"PCM_{bits}", fmt)

    assert report.samples == 0 and report.peak == 1.0  # the -2**(b-1) extreme is in there
    read, rate = soundfile.read(path, dtype="int32" if bits == 24 else "int16", always_2d=True)
    assert rate == 44100 and soundfile.info(path).subtype == f"PCM_{bits}"
    assert np.array_equal((read >> 8 if bits == 24 else read).T, ints)  # libsndfile: top 24 bits
    x, info = decode(path)  # and our own decoder agrees
    assert np.array_equal(x.astype(np.float64) * 2 ** (bits - 1), ints) and info.bits == bits


@pytest.mark.parametrize("fmt, subtype", [("wav", "PCM_16"), ("wav", "PCM_24"), ("flac", "PCM_16"), ("flac", "PCM_24")])
def test_decode_then_write_is_bit_exact(tmp_path, fmt, subtype):
    bits = int(subtype[-2:])
    ints = random_ints(2, 5000, bits, seed=9)
    source = tmp_path / f"in.{fmt}"
    sf_write_ints(source, ints, bits, 48000, subtype, fmt.upper())
    x, info = decode(source)
    out = tmp_path / f"out.{fmt}"
    report = write(out, x, info.sample_rate, output_subtype(info, fmt, "auto"), fmt)
    assert report.samples == 0
    assert np.array_equal(decode(out)[0], x)


def test_float_wav_is_written_as_is_overs_included(tmp_path):
    x = np.random.default_rng(2).uniform(-1.5, 1.5, (2, 3000)).astype(np.float32)
    path = tmp_path / "stem.wav"
    report = write(path, x, 96000, "FLOAT", "wav")
    assert report.samples == 0 and report.peak == float(np.max(np.abs(x)))
    read, _ = soundfile.read(path, dtype="float32", always_2d=True)
    assert np.array_equal(read.T, x) and soundfile.info(path).subtype == "FLOAT"


def test_float_input_is_quantized_with_clipping_reported(tmp_path):
    x = np.array([[0.0, 0.5, 1.0, 1.25], [-1.0, -1.5, 0.25, 1 / 32768]], np.float32)
    path = tmp_path / "loud.wav"
    report = write(path, x, 44100, "PCM_16", "wav")
    assert report == ClipReport(samples=3, peak=1.5)  # 1.0, 1.25 and -1.5 do not fit
    read, _ = soundfile.read(path, dtype="int16", always_2d=True)
    assert read.T.tolist() == [[0, 16384, 32767, 32767], [-32768, -32768, 8192, 1]]


def test_writer_in_blocks_equals_one_write(tmp_path):
    x = tones(2, 30_000, 44100) * 5  # clips
    one = tmp_path / "one.flac"
    total = write(one, x, 44100, "PCM_24", "flac")
    blocks = tmp_path / "blocks.flac"
    with AudioWriter(blocks, 44100, 2, "PCM_24", "flac") as writer:
        for i in range(0, 30_000, 7000):
            writer.write(x[:, i : i + 7000])
    assert writer.clip == total and total.samples > 0
    assert np.array_equal(decode(one)[0], decode(blocks)[0])


def test_write_replaces_the_target_and_respects_the_umask(tmp_path):
    path = tmp_path / "stem.wav"
    path.write_bytes(b"old")
    write(path, np.zeros((1, 10), np.float32), 44100, "PCM_16", "wav")
    assert soundfile.info(path).frames == 10
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stem.wav"]


def test_a_failure_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    path = tmp_path / "stem.wav"
    path.write_bytes(b"the previous take")
    calls = []

    def disk_full(self, data):
        calls.append(len(data))
        if len(calls) == 2:  # the temporary file exists and holds a first block
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, data)

    original = soundfile.SoundFile.write
    monkeypatch.setattr(soundfile.SoundFile, "write", disk_full)
    monkeypatch.setattr(pcm, "_WRITE_BLOCK", 1000)
    with pytest.raises(AudioEncodeError) as caught:
        write(path, np.zeros((2, 5000), np.float32), 44100, "PCM_16", "wav")
    assert str(caught.value) == "stem.wav: could not be written (No space left on device)"
    assert path.read_bytes() == b"the previous take"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stem.wav"]


def test_rejected_data_after_the_file_is_open_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        with AudioWriter(tmp_path / "stem.flac", 44100, 2, "PCM_16", "flac") as writer:
            writer.write(np.zeros((2, 100), np.float32))
            writer.write(np.zeros((3, 100), np.float32))  # wrong channel count
    with pytest.raises(AudioEncodeError, match="stem.wav: refusing to write NaN or infinite samples"):
        write(tmp_path / "stem.wav", np.full((2, 100), np.nan, np.float32), 44100, "FLOAT", "wav")
    with pytest.raises(ValueError):
        write(tmp_path / "stem.wav", np.full((2, 100), 40_000, np.int32), 44100, "PCM_16", "wav")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "subtype, fmt, message",
    [
        ("FLOAT", "flac", "stem.out: subtype 'FLOAT' is not one of PCM_16, PCM_24 for FLAC"),
        ("PCM_8", "wav", "stem.out: subtype 'PCM_8' is not one of PCM_16, PCM_24, FLOAT for WAV"),
        ("PCM_16", "ogg", "output format 'ogg' is not one of wav, flac"),
    ],
)
def test_write_rejects_unknown_subtypes_and_formats(tmp_path, subtype, fmt, message):
    with pytest.raises(AudioEncodeError) as caught:
        write(tmp_path / "stem.out", np.zeros((1, 10), np.float32), 44100, subtype, fmt)
    assert str(caught.value) == message
    assert list(tmp_path.iterdir()) == []


def test_missing_output_directory_is_one_sentence(tmp_path):
    with pytest.raises(AudioEncodeError) as caught:
        write(tmp_path / "nope" / "stem.wav", np.zeros((1, 10), np.float32), 44100, "PCM_16", "wav")
    assert str(caught.value) == f"stem.wav: cannot be written because the output directory {tmp_path / 'nope'} does not exist"
    (tmp_path / "file").write_text("x")
    with pytest.raises(AudioEncodeError, match="is not a directory$"):
        write(tmp_path / "file" / "stem.wav", np.zeros((1, 10), np.float32), 44100, "PCM_16", "wav")


def test_read_only_output_directory_is_one_sentence(open_tmp):
    out = open_tmp / "out"
    out.mkdir()
    out.chmod(0o555)
    x = np.zeros((1, 10), np.float32)
    result = _unprivileged(lambda: _error_of(lambda: write(out / "stem.wav", x, 44100, "PCM_16", "wav")))
    assert result == f"AudioEncodeError stem.wav: cannot be written into {out} (Permission denied)"
    assert list(out.iterdir()) == []


def test_wav_over_4_gib_is_written_as_rf64(tmp_path):
    path = tmp_path / "huge.wav"
    with AudioWriter(path, 44100, 2, "FLOAT", "wav", expected_frames=600_000_000) as writer:
        writer.write(np.zeros((2, 100), np.float32))
    assert soundfile.info(path).format == "RF64"
    assert decode(path)[1].frames == 100


def test_eight_planar_channels_decode_without_reading_past_the_frame(tmp_path):
    """7.1 AAC decodes to 8 planar channels, for which PyAV lists a ninth plane that its
    to_ndarray would read past the frame's end (a segmentation fault). Run in a child
    process so a crash fails this test instead of ending the run. A 60-Hz tone, which the
    low-frequency channel keeps too."""
    import subprocess
    import sys

    script = """
import fractions, sys
import av, numpy as np
from stemsep.decode import decode
rate, n = 48000, 24000
x = (0.1 * np.sin(np.arange(n) * 2 * np.pi * 60 / rate)).astype(np.float32) * np.linspace(0.2, 1, 8)[:, None].astype(np.float32)
with av.open(sys.argv[1], "w") as out:
    stream = out.add_stream("aac", rate=rate)
    stream.layout = "7.1"
    for i in range(0, n, 1024):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, i : i + 1024].T.reshape(1, -1)), format="flt", layout="7.1")
        frame.sample_rate, frame.pts, frame.time_base = rate, i, fractions.Fraction(1, rate)
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)
y, info = decode(sys.argv[1])
levels = np.sqrt(np.mean(y[:, 4800:-4800].astype(np.float64) ** 2, axis=1)) / np.sqrt(np.mean(x[:, 4800:-4800].astype(np.float64) ** 2, axis=1))
print(y.shape, info.channels, np.round(levels, 1).tolist())
"""
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "surround.m4a")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "(8, 24000) 8 [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]"
