"""Hostile input through the whole file path: decode -> separate -> write.

The contract, for any input: `Separator.separate` either writes two complete stems (at the
input's rate, with its channels and decoded length, adding up to the mix) or raises a
StemsepError whose message is one line naming the file; it returns within a time bound (a
hang fails the test); the output folder then holds exactly the two stems or nothing (no
`.part` files); the input is unchanged.

Three layers check it: a hand-made corpus of hostile files built here (truncations, header
fields that lie, absurd rates and channel counts, NaN floats, things that are not files, odd
names); hypothesis mutating small real files of each format with a fixed seed (byte flips,
truncations, insertions, deletions, header field overwrites); and the real CLI in a
subprocess. Every file that ever broke the contract is kept in tests/corpus/hostile/ (its
README.md says what each is) and replayed.

A longer fuzzing run offline (a failing input is saved under $STEMSEP_FUZZ_FAILURES, default
$TMPDIR/stemsep-fuzz-failures/):

    STEMSEP_FUZZ_EXAMPLES=5000 STEMSEP_FUZZ_SEED=3 .venv/bin/pytest tests/test_hostile_input.py -k mutated --hypothesis-show-statistics
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st

from stemsep.decode import decode, display_name
from stemsep.errors import ClippingWarning, StemsepError
from stemsep.separator import Separator
from stemsep.testing import FAST_CONFIG, av_encode, make_model_files, tones

pytestmark = pytest.mark.filterwarnings(f"ignore::{ClippingWarning.__module__}.{ClippingWarning.__name__}")

CORPUS = Path(__file__).parent / "corpus" / "hostile"
TIME_BOUND = 60.0  # seconds one file may take; the decoder's own guards should stop it long before
FUZZ_EXAMPLES = int(os.environ.get("STEMSEP_FUZZ_EXAMPLES", "1500"))  # ~45 s on an idle 2-core machine
FUZZ_SEED = os.environ.get("STEMSEP_FUZZ_SEED")  # unset: hypothesis's fixed derandomized sequence
FUZZ_FAILURES = Path(os.environ.get("STEMSEP_FUZZ_FAILURES") or Path(tempfile.gettempdir()) / "stemsep-fuzz-failures")
RATE = 44100
FRAMES = RATE // 5  # 0.2 s: many chunks of the fast model, a fraction of a second to separate


@pytest.fixture(scope="module")
def separator(tmp_path_factory) -> Separator:
    """The pass-through model (vocals = mix) with the test suite's small STFT and chunks."""
    return Separator(*make_model_files(tmp_path_factory.mktemp("model"), FAST_CONFIG, mask=1.0), device="cpu")


# the contract ------------------------------------------------------------------------------


def bounded(call: Callable[[], object], seconds: float = TIME_BOUND) -> object:
    """`call()` in a daemon thread: its result or its exception, or a failure after `seconds`
    (a thread, not SIGALRM, so that a hang inside C code is caught as well)."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise AssertionError(f"still running after {seconds:.0f} s: a hang")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]


def fingerprint(path: str | bytes | os.PathLike) -> tuple | None:
    """What must not change: a regular file's bytes and mtime; anything else's inode and mtime
    (a FIFO is never read here); None for nothing."""
    if not os.path.lexists(path):
        return None
    st_ = os.lstat(path)
    if os.path.isfile(path) and not os.path.islink(path):
        with open(path, "rb") as f:
            return st_.st_mtime_ns, hashlib.sha256(f.read()).hexdigest()
    return st_.st_mode, st_.st_ino, st_.st_mtime_ns


def keeps_the_contract(separator: Separator, path: str | bytes | os.PathLike, out_dir: Path, **options) -> str:
    """Separate `path` into the empty folder `out_dir` (with separate()'s `options`) and check
    the contract of the module docstring. Returns "stems" or the error message."""
    name = display_name(os.path.basename(os.fsdecode(path).rstrip("/")))  # control characters escaped
    before = fingerprint(path)
    out_dir.mkdir(exist_ok=True)
    assert os.listdir(out_dir) == []
    try:
        paths = bounded(lambda: separator.separate(path, out_dir, overlap=1, **options))
    except StemsepError as exc:
        message = str(exc)
        assert message and "\n" not in message and "\r" not in message, repr(message)
        assert message.startswith(f"{name}: "), f"the message does not start with the file's name: {message!r}"
        assert os.listdir(out_dir) == [], "a failed separation left files behind"
        outcome = message
    else:
        assert sorted(os.listdir(out_dir)) == sorted(p.name for p in paths.values())  # and no .part files
        stems_are_the_input_split(path, paths)
        outcome = "stems"
    assert fingerprint(path) == before, "the input changed"
    return outcome


def stems_are_the_input_split(path, paths: dict[str, Path]) -> None:
    """The stems have the input's rate, channels and decoded length, and add up to the mix as
    written (clipped to the integer range for PCM stems) except where the instrumental itself
    had to be clipped, which separate() reports with a ClippingWarning."""
    mix, info = decode(path)  # (channels, frames)
    vocals_path, instrumental_path = os.fsencode(paths["vocals"]), os.fsencode(paths["instrumental"])  # (names may not be UTF-8)
    vocals, rate_v = soundfile.read(vocals_path, dtype="float64", always_2d=True)  # (frames, channels)
    instrumental, rate_i = soundfile.read(instrumental_path, dtype="float64", always_2d=True)
    assert rate_v == rate_i == info.sample_rate
    assert vocals.shape == instrumental.shape == (info.frames, info.channels)
    as_written = mix.T.astype(np.float64)
    clipped = np.zeros(as_written.shape, bool)
    if soundfile.info(vocals_path).subtype != "FLOAT":
        as_written = np.clip(as_written, -1, 1 - 2**-15)
        clipped = (instrumental <= -1) | (instrumental >= 1 - 2**-15)
    assert np.abs(vocals + instrumental - as_written)[~clipped].max(initial=0) <= 2**-14


# small real files of every format ------------------------------------------------------------


def real_files(folder: Path) -> dict[str, bytes]:
    """0.2-s stereo files (44.1 kHz; 48 kHz for Opus), as each format's usual writer makes them."""
    x = tones(RATE, FRAMES, 2, level=0.5)  # (2, frames) float32
    made: dict[str, Path] = {}

    def sf_file(kind: str, fmt: str, subtype: str | None, rate: int = RATE, data=x) -> None:
        made[kind] = folder / f"{kind}.{fmt.lower()}"
        soundfile.write(made[kind], data.T, rate, format=fmt, subtype=subtype)

    sf_file("wav", "WAV", "PCM_16")
    sf_file("float-wav", "WAV", "FLOAT")
    sf_file("aiff", "AIFF", "PCM_24")
    sf_file("flac", "FLAC", "PCM_16")
    sf_file("mp3", "MP3", None)
    sf_file("ogg", "OGG", "VORBIS")
    sf_file("opus", "OGG", "OPUS", rate=48000, data=tones(48000, 9600, 2, level=0.5))
    made["m4a"] = folder / "m4a.m4a"  # the index (moov) after the data, FFmpeg's default
    av_encode(made["m4a"], "aac", x, RATE)
    made["m4a-faststart"] = folder / "m4a-faststart.m4a"  # the index first, as streaming sites serve it
    av_encode(made["m4a-faststart"], "aac", x, RATE, container_options={"movflags": "faststart"})
    return {kind: path.read_bytes() for kind, path in made.items()}


EXTENSION = {"wav": "wav", "float-wav": "wav", "aiff": "aiff", "flac": "flac", "mp3": "mp3", "ogg": "ogg",
             "opus": "opus", "m4a": "m4a", "m4a-faststart": "m4a"}


class Samples(dict):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return f"<real files: {', '.join(self)}>"


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> dict[str, bytes]:
    return Samples(real_files(tmp_path_factory.mktemp("samples")))


def test_the_real_files_separate(separator, samples, tmp_path):
    """The starting points of the mutations are good files: any error below is the damage's."""
    for kind, data in samples.items():
        path = tmp_path / f"good.{EXTENSION[kind]}"
        path.write_bytes(data)
        assert keeps_the_contract(separator, path, tmp_path / f"out-{kind}") == "stems", kind
        path.unlink()


# a hand-made corpus: truncations --------------------------------------------------------------

CUTS = {  # name -> where to cut a file of n bytes
    "1-byte": lambda n: 1,
    "4-bytes": lambda n: 4,
    "12-bytes": lambda n: 12,
    "44-bytes": lambda n: 44,  # a canonical WAV header, no data
    "100-bytes": lambda n: 100,
    "a-third": lambda n: n // 3,
    "half": lambda n: n // 2,
    "all-but-1": lambda n: n - 1,
}


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("kind", EXTENSION)
def test_truncated_files_keep_the_contract(separator, samples, tmp_path, kind, cut):
    path = tmp_path / f"cut.{EXTENSION[kind]}"
    path.write_bytes(samples[kind][: CUTS[cut](len(samples[kind]))])
    outcome = keeps_the_contract(separator, path, tmp_path / "out")
    if cut in ("half", "all-but-1") and kind in ("wav", "float-wav", "aiff", "flac", "mp3", "m4a-faststart"):
        assert outcome == "stems"  # the audio before the cut, as players do
    if cut in ("1-byte", "4-bytes", "12-bytes"):
        assert outcome != "stems"


# a hand-made corpus: header fields that lie, absurd values, bad samples ----------------------------


def wav_file(
    *,
    tag: int = 1,
    channels: int = 2,
    rate: int = RATE,
    bits: int = 16,
    frames: int = FRAMES,
    payload: bytes | None = None,
    data_size: int | None = None,
    riff_size: int | None = None,
    block_align: int | None = None,
    byte_rate: int | None = None,
    fmt_size: int | None = None,
) -> bytes:
    """A canonical 44-byte-header WAV built field by field, each field free to lie. The payload
    defaults to `frames` frames of quiet noise for the *stated* layout (at most 1 MB)."""
    frame_bytes = max(channels * bits // 8, 1)
    if payload is None:
        size = min(frames * frame_bytes, 1 << 20)
        payload = np.random.default_rng(7).integers(-2000, 2000, (size + 1) // 2).astype("<i2").tobytes()[:size]
    block_align = channels * bits // 8 if block_align is None else block_align
    byte_rate = rate * block_align if byte_rate is None else byte_rate
    fmt = struct.pack("<HHIIHH", tag, channels & 0xFFFF, rate, byte_rate & 0xFFFFFFFF, block_align & 0xFFFF, bits)
    fmt_chunk = b"fmt " + struct.pack("<I", len(fmt) if fmt_size is None else fmt_size) + fmt
    data_chunk = b"data" + struct.pack("<I", len(payload) if data_size is None else data_size) + payload
    body = b"WAVE" + fmt_chunk + data_chunk
    return b"RIFF" + struct.pack("<I", len(body) if riff_size is None else riff_size) + body


def with_info_chunk(wav: bytes, title: bytes) -> bytes:
    """`wav` with a LIST/INFO chunk holding the title INAM = `title` (as Windows tools write it) before its data."""
    text = title + b"\0" * (2 - len(title) % 2)
    info = b"INFO" + b"INAM" + struct.pack("<I", len(text)) + text
    at = wav.index(b"data")
    body = wav[12:at] + b"LIST" + struct.pack("<I", len(info)) + info + wav[at:]
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body


def float_wav(value: float, bits: int = 32) -> bytes:
    x = tones(RATE, FRAMES, 2).T.astype(np.float32 if bits == 32 else np.float64)  # (frames, 2)
    x[FRAMES // 2, 1] = value
    return wav_file(tag=3, bits=bits, payload=x.astype(f"<f{bits // 8}").tobytes())


def flac_claiming(total_samples: int, samples: dict[str, bytes]) -> bytes:
    """The FLAC sample with STREAMINFO's 36-bit total-samples field overwritten."""
    data = bytearray(samples["flac"])
    at = 8 + 13  # 'fLaC', the block header, then 10 bytes of sizes; rate/channels/bits/total from byte 10
    data[at] = (data[at] & 0xF0) | (total_samples >> 32) & 0x0F
    data[at + 1 : at + 5] = (total_samples & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(data)


STEMS = "stems"
# case -> (file name, bytes from the real samples, expected: "stems" or how the message starts)
HOSTILE: dict[str, tuple[str, Callable[[dict[str, bytes]], bytes], str]] = {
    # sizes that lie
    "riff size 0": ("riff0.wav", lambda s: wav_file(riff_size=0), STEMS),
    "riff size 4": ("riff4.wav", lambda s: wav_file(riff_size=4), STEMS),
    "riff size 4 GiB": ("riffmax.wav", lambda s: wav_file(riff_size=0xFFFFFFFF), STEMS),
    "data size 0 (a streaming writer's)": ("data0.wav", lambda s: wav_file(data_size=0), STEMS),
    "data size 4 GiB (a streaming writer's)": ("datamax.wav", lambda s: wav_file(data_size=0xFFFFFFFF), STEMS),
    "data size past the end": ("datalong.wav", lambda s: wav_file(data_size=0x7FFFFFF0), STEMS),
    "data size a quarter": ("datashort.wav", lambda s: wav_file(data_size=FRAMES), STEMS),
    "data size under one frame": ("data2.wav", lambda s: wav_file(data_size=2), "data2.wav: contains no audio samples"),
    "data size odd, 1 frame": ("data7.wav", lambda s: wav_file(data_size=7), "data7.wav: audio is too short to separate"),
    "zero-length data chunk": ("nodata.wav", lambda s: wav_file(payload=b""), "nodata.wav: contains no audio samples"),
    "fmt size 4 GiB": ("fmtmax.wav", lambda s: wav_file(fmt_size=0xFFFFFFFF), "fmtmax.wav: "),
    "fmt size 0": ("fmt0.wav", lambda s: wav_file(fmt_size=0), "fmt0.wav: "),
    "no fmt chunk": ("nofmt.wav", lambda s: b"RIFF\x24\x00\x00\x00WAVEdata\x10\x00\x00\x00" + bytes(16), "nofmt.wav: "),
    "block align 0": ("align0.wav", lambda s: wav_file(block_align=0), STEMS),
    "byte rate 0": ("byterate0.wav", lambda s: wav_file(byte_rate=0), STEMS),
    # the stated length is trusted for the early refusal of over-long input (the real audio is 0.2 s)
    "FLAC claiming 2^36 samples": ("long.flac", lambda s: flac_claiming(2**36 - 1, s), "long.flac: 432:51:05 long, over the 3:00:00 limit"),
    "FLAC claiming 0 samples (unknown)": ("unknown.flac", lambda s: flac_claiming(0, s), STEMS),
    # rates and channel counts
    "1 Hz": ("1hz.wav", lambda s: wav_file(rate=1), "1hz.wav: sample rate 1 Hz is outside the supported 8000-384000 Hz"),
    "0 Hz": ("0hz.wav", lambda s: wav_file(rate=0), "0hz.wav: not an audio file"),
    "768 kHz": ("768k.wav", lambda s: wav_file(rate=768_000), "768k.wav: sample rate 768000 Hz is outside"),
    "2^32-1 Hz": ("maxhz.wav", lambda s: wav_file(rate=0xFFFFFFFF), "maxhz.wav: "),
    "8 kHz mono (the lowest rate)": ("8k.wav", lambda s: wav_file(rate=8000, channels=1, frames=1600), STEMS),
    "384 kHz (the highest rate)": ("384k.wav", lambda s: wav_file(rate=384_000, frames=20_000), STEMS),
    "65535 channels": ("wide.wav", lambda s: wav_file(channels=65535, frames=4), "wide.wav: "),
    "0 channels": ("mute.wav", lambda s: wav_file(channels=0), "mute.wav: the audio stream does not state its sample rate or channels"),
    "65 channels": ("65.wav", lambda s: wav_file(channels=65, frames=500), "65.wav: has 65 channels, more than the 64 supported"),
    "64 channels": ("64.wav", lambda s: wav_file(channels=64, frames=300), STEMS),
    # sample formats
    "0 bits": ("0bits.wav", lambda s: wav_file(bits=0), "0bits.wav: "),
    "13 bits": ("13bits.wav", lambda s: wav_file(bits=13), STEMS),
    "64-bit integer PCM": ("s64.wav", lambda s: wav_file(bits=64, frames=2000), STEMS),
    "unknown format tag": ("tag.wav", lambda s: wav_file(tag=0x1234), "tag.wav: the audio is in a format FFmpeg cannot decode"),
    "extensible tag without its extension": ("ext.wav", lambda s: wav_file(tag=0xFFFE), "ext.wav: "),
    "float tag with 16 bits": ("float16.wav", lambda s: wav_file(tag=3), "float16.wav: "),
    "ADPCM tag over PCM data": ("adpcm.wav", lambda s: wav_file(tag=2), "adpcm.wav: "),
    "NaN in float32": ("nan.wav", lambda s: float_wav(np.nan), "nan.wav: contains NaN or infinite samples"),
    "+inf in float32": ("inf.wav", lambda s: float_wav(np.inf), "inf.wav: contains NaN or infinite samples"),
    "-inf in float64": ("ninf.wav", lambda s: float_wav(-np.inf, bits=64), "ninf.wav: contains NaN or infinite samples"),
    "1e30 in float32": ("huge.wav", lambda s: float_wav(1e30), "huge.wav: has float samples of 1e+30 times full scale"),
    "1e5 in float32 (an over, but sound)": ("over.wav", lambda s: float_wav(1e5), STEMS),
    "float32 max": ("max.wav", lambda s: float_wav(np.finfo(np.float32).max), "max.wav: has float samples of 3.4e+38"),
    "1e300 in float64": ("huge64.wav", lambda s: float_wav(1e300, bits=64), "huge64.wav: contains NaN or infinite samples"),
    "all zeros": ("zeros.wav", lambda s: wav_file(payload=bytes(FRAMES * 4)), "zeros.wav: the audio is silent"),
    # not audio, or not what the name says
    "empty file": ("empty.wav", lambda s: b"", "empty.wav: is empty (0 bytes)"),
    "one byte": ("one.mp3", lambda s: b"\xff", "one.mp3: "),
    "random bytes": ("noise.wav", lambda s: np.random.default_rng(1).bytes(20_000), "noise.wav: not an audio file"),
    "random bytes after a RIFF/WAVE magic": ("riffnoise.wav", lambda s: b"RIFF\x00\x00\x01\x00WAVE" + np.random.default_rng(2).bytes(20_000), "riffnoise.wav: "),
    "text named .wav": ("notes.wav", lambda s: b"la la la\n" * 500, "notes.wav: not an audio file"),
    "HTML error page named .mp3": ("page.mp3", lambda s: b"<!DOCTYPE html><html><body>403 Forbidden</body></html>\n" * 20, "page.mp3: not an audio file"),
    "an ID3 tag and nothing else": ("tag.mp3", lambda s: b"ID3\x04\x00\x00\x00\x00\x00\x10" + bytes(16), "tag.mp3: "),
    "WAV named .mp3": ("really-wav.mp3", lambda s: s["wav"], STEMS),
    "MP3 named .wav": ("really-mp3.wav", lambda s: s["mp3"], STEMS),
    "FLAC named .m4a": ("really-flac.m4a", lambda s: s["flac"], STEMS),
    "M4A with no extension": ("m4a-no-extension", lambda s: s["m4a"], STEMS),
    "a Latin-1 title tag": ("latin1.wav", lambda s: with_info_chunk(wav_file(), b"Caf\xe9 \xe0 minuit"), STEMS),
    "two files concatenated (WAV then MP3)": ("two.wav", lambda s: s["wav"] + s["mp3"], STEMS),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_files_keep_the_contract(separator, samples, tmp_path, case):
    name, make, expected = HOSTILE[case]
    path = tmp_path / name
    path.write_bytes(make(samples))
    outcome = keeps_the_contract(separator, path, tmp_path / "out")
    if expected == STEMS:
        assert outcome == STEMS
    else:
        assert outcome.startswith(expected)


# a hand-made corpus: things that are not files, and names -----------------------------------------


NOT_FILES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "directory": ("folder.wav", lambda p: p.mkdir(), "folder.wav: is a directory, not an audio file"),
    "FIFO with no writer": ("pipe.wav", lambda p: os.mkfifo(p), "pipe.wav: is not a regular file"),
    "link to /dev/zero": ("zero.wav", lambda p: p.symlink_to("/dev/zero"), "zero.wav: is not a regular file"),
    "link to /dev/urandom": ("urandom.mp3", lambda p: p.symlink_to("/dev/urandom"), "urandom.mp3: is not a regular file"),
    "dangling link": ("gone.wav", lambda p: p.symlink_to(p.parent / "nowhere.wav"), "gone.wav: file not found"),
    "link loop": ("loop.wav", lambda p: p.symlink_to(p), "loop.wav: cannot be read"),
    "missing": ("missing.wav", lambda p: None, "missing.wav: file not found"),
}


@pytest.mark.parametrize("case", NOT_FILES)
def test_things_that_are_not_audio_files_are_refused_at_once(separator, tmp_path, case):
    name, make, expected = NOT_FILES[case]
    path = tmp_path / name
    make(path)
    assert keeps_the_contract(separator, path, tmp_path / "out").startswith(expected)


LONG_NAME = "n" * 251 + ".wav"  # 255 bytes, the most a Linux file name can have
NON_UTF8 = b"caf\xe9 \xff.wav"  # Latin-1 bytes, as an old file system or archive leaves them
NAMES = {
    "255-byte name": LONG_NAME,
    "non-UTF-8 name (str, as Python gives it)": os.fsdecode(NON_UTF8),
    "non-UTF-8 name (bytes)": NON_UTF8,
    "spaces, quotes and a dash first": "-n 'x' \"y\" $(z).wav",
    "non-ASCII": "Sigur Rós – Hoppípolla 🎵.wav",
    "newline in the name": "two\nlines.wav",
    "no extension, a dot first": ".hidden",
}


@pytest.mark.parametrize("case", NAMES)
@pytest.mark.parametrize("content", ["good", "junk"])
def test_odd_file_names_separate_or_fail_in_one_line(separator, samples, tmp_path, case, content):
    name = NAMES[case]
    path = os.path.join(os.fsencode(tmp_path), name) if isinstance(name, bytes) else tmp_path / name
    with open(path, "wb") as f:
        f.write(samples["wav"] if content == "good" else b"not audio\n" * 100)
    outcome = keeps_the_contract(separator, path, tmp_path / "out")
    if content == "good":
        assert outcome == STEMS
    else:
        assert "not an audio file" in outcome


# the corpus of found cases ----------------------------------------------------------------------


def corpus_files() -> list[Path]:
    return sorted(p for p in CORPUS.iterdir() if p.is_file() and p.name != "README.md") if CORPUS.is_dir() else []


def test_every_corpus_file_is_described():
    described = (CORPUS / "README.md").read_text()
    for path in corpus_files():
        assert f"`{path.name}`" in described, f"{path.name} is not described in {CORPUS / 'README.md'}"
        assert path.stat().st_size < 50_000


@pytest.mark.parametrize("bit_depth", ["auto", 16])
@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_corpus_file_keeps_the_contract(separator, tmp_path, path, bit_depth):
    """Files that once broke the contract (from this file's cases or the fuzzer), replayed under
    their own names (`song.wav.bin` -> `song.wav`: the `.bin` keeps them out of the *.wav/*.mp3
    ignore rules), with float and 16-bit stems."""
    copy = tmp_path / path.name.removesuffix(".bin")
    shutil.copyfile(path, copy)
    keeps_the_contract(separator, copy, tmp_path / "out", bit_depth=bit_depth)


# fuzzing: mutations of the real files ------------------------------------------------------------

INTERESTING = [0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 8000, 44100, 48000, 768_000,
               0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]
position = st.one_of(st.integers(0, 127), st.integers(0, 1 << 20))  # the header more often; wraps around the file
MUTATION = st.one_of(
    st.tuples(st.just("flip"), position, st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20)),
    st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), position, st.integers(1, 512)),
    st.tuples(st.just("field"), st.integers(0, 127), st.sampled_from([1, 2, 4]), st.sampled_from(["little", "big"]),
              st.one_of(st.sampled_from(INTERESTING), st.integers(0, 0xFFFFFFFF))),
)


def mutate(data: bytes, mutations: list[tuple]) -> bytes:
    out = bytearray(data)
    for kind, at, *args in mutations:
        at %= len(out) + 1
        if kind == "flip" and at < len(out):
            out[at] ^= args[0]
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = args[0]
        elif kind == "delete":
            del out[at : at + args[0]]
        elif kind == "field":  # a header field of 1, 2 or 4 bytes set to a value (RIFF is little-endian, AIFF big)
            size, byteorder, value = args
            out[at : at + size] = (value & ((1 << 8 * size) - 1)).to_bytes(size, byteorder)
        if not out:
            break
    return bytes(out)


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.slow
@seed(int(FUZZ_SEED or 0))
@settings(
    derandomize=FUZZ_SEED is None,  # the same examples on every run: a CI failure reproduces locally
    database=None,
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    kind=st.sampled_from(sorted(EXTENSION)),
    wrong_extension=st.booleans(),
    mutations=st.lists(MUTATION, min_size=1, max_size=4),
)
def test_mutated_real_files_keep_the_contract(separator, samples, fuzz_root, kind, wrong_extension, mutations):
    data = mutate(samples[kind], mutations)
    folder = Path(tempfile.mkdtemp(dir=fuzz_root))
    path = folder / f"fuzz.{'mp3' if wrong_extension and kind != 'mp3' else EXTENSION[kind]}"
    path.write_bytes(data)
    try:
        outcome = keeps_the_contract(separator, path, folder / "out")
        event(f"{kind}: {'stems' if outcome == 'stems' else outcome.split(': ', 1)[1][:70]}")
    except BaseException:
        FUZZ_FAILURES.mkdir(parents=True, exist_ok=True)
        saved = FUZZ_FAILURES / f"{kind}-{hashlib.sha256(data).hexdigest()[:12]}.bin"
        saved.write_bytes(data)
        print(f"failing input saved as {saved} ({path.name}); keep it in {CORPUS} with a line in README.md")
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# the real CLI -----------------------------------------------------------------------------------


def test_the_cli_prints_one_line_per_hostile_input_and_no_traceback(separator, samples, tmp_path):
    checkpoint, config = separator.model_files
    inputs = {  # (a folder is an input of its own: every audio file under it; see test_cli.py)
        "pipe.wav": lambda p: os.mkfifo(p),
        "empty.mp3": lambda p: p.write_bytes(b""),
        "notes.wav": lambda p: p.write_bytes(b"la la la\n" * 500),
        "tag.wav": lambda p: p.write_bytes(wav_file(tag=0x1234)),
        "nan.wav": lambda p: p.write_bytes(float_wav(np.nan)),
        "cut.m4a": lambda p: p.write_bytes(samples["m4a"][:4000]),
        "1hz.wav": lambda p: p.write_bytes(wav_file(rate=1)),
        os.fsdecode(NON_UTF8): lambda p: p.write_bytes(np.random.default_rng(3).bytes(5000)),
        "two\nlines.wav": lambda p: p.write_bytes(b"not audio\n" * 100),
    }
    for name, make in inputs.items():
        make(tmp_path / name)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "stemsep.cli", "separate", *(os.fsencode(tmp_path / n) for n in inputs),
            "-o", out, "--overlap", "1", "--checkpoint", checkpoint, "--config", config]
    result = subprocess.run(argv, capture_output=True, timeout=300)
    stderr = result.stderr.decode("utf-8", "backslashreplace")
    assert result.returncode == 1, stderr
    assert "Traceback" not in stderr and result.stdout == b""
    lines = stderr.splitlines()
    assert len(lines) == len(inputs), stderr
    for line, name in zip(lines, inputs):
        shown = display_name(name).encode("utf-8", "backslashreplace").decode()  # stderr shows undecodable bytes as \udcXX
        assert line.startswith(f"stemsep: error: {shown}: "), line
    assert list(out.iterdir()) == []


def test_the_cli_separates_good_audio_under_odd_names(separator, samples, tmp_path):
    checkpoint, config = separator.model_files
    names = [LONG_NAME, os.fsdecode(NON_UTF8), "really-wav.mp3"]
    for name in names:
        (tmp_path / name).write_bytes(samples["wav"])
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "stemsep.cli", "separate", *(os.fsencode(tmp_path / n) for n in names),
            "-o", out, "--overlap", "1", "--checkpoint", checkpoint, "--config", config]
    result = subprocess.run(argv, capture_output=True, timeout=300)
    assert result.returncode == 0 and result.stderr == b"", result.stderr.decode(errors="backslashreplace")
    printed = [os.fsdecode(line) for line in result.stdout.splitlines()]
    assert sorted(printed) == sorted(str(p) for p in out.iterdir()) and len(printed) == 2 * len(names)


def test_the_cli_prints_a_non_utf8_output_path_on_a_strict_stdout(separator, samples, tmp_path):
    checkpoint, config = separator.model_files
    name = os.fsdecode(NON_UTF8)
    (tmp_path / name).write_bytes(samples["wav"])
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "stemsep.cli", "separate", os.fsencode(tmp_path / name), "-o", out, "--overlap", "1",
            "--checkpoint", checkpoint, "--config", config]
    result = subprocess.run(argv, capture_output=True, timeout=300, env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr.decode(errors="backslashreplace")
    assert sorted(result.stdout.splitlines()) == sorted(os.fsencode(p) for p in out.iterdir())
