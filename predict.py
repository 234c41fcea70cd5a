"""The Cog runner behind the Replicate model: a thin adapter over :class:`stemsep.separator.Separator`.

``setup()`` loads the default model (GPU when there is one) from the weights baked into the
image at ``/weights`` (``$STEMSEP_WEIGHTS_DIR``, set by cog.yaml; a checkout's ``weights/``
when unset; ``$STEMSEP_CHECKPOINT`` / ``$STEMSEP_CONFIG`` name its files instead) and warms
it up, then returns: on a GPU ($STEMSEP_COMPILE) the network compiles in the background,
predictions run eagerly meanwhile, and the compiled network takes over between two
batches once it is built and checked against eager (stemsep.compilation). The other baked
models (:data:`BAKED_MODELS`) load on first use and stay loaded while GPU memory allows.
``run()`` turns the inputs into a library call and returns the chosen model's stems in the
model's order (``[vocals, instrumental]`` for 1297), the ``no_<stem>`` practice tracks asked
for after them (:meth:`stemsep.separator.Separator.chosen_stems`).
Library errors (:class:`stemsep.errors.StemsepError`) fail the prediction with their
one-sentence message and no traceback.

Each prediction writes into a fresh folder under ``$STEMSEP_WORK_DIR`` (default: the
system temp folder), so output names never collide. Cog reads the files after ``run()``
returns, so a successful prediction's folder is removed when the next prediction starts;
a failed or canceled one's is removed at once. The worker's temporary files, Cog's
downloads of URL inputs among them, go to ``tmp/`` in that folder, which each prediction
clears of what earlier ones left (a download that fails leaves its file behind).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path as FilePath
from typing import Optional

from cog import BaseRunner, Input, Path

ROOT = FilePath(__file__).resolve().parent
if (ROOT / "src" / "stemsep").is_dir() and str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))  # the image runs the checkout in /src, not an installed package

import torch  # noqa: E402

from stemsep import catalogue  # noqa: E402
from stemsep.compilation import use_compile_cache  # noqa: E402
from stemsep.errors import StemsepError, report_warnings  # noqa: E402
from stemsep.runner import resolve_device  # noqa: E402
from stemsep.reference import ReferenceEngine  # noqa: E402
from stemsep.separator import Separator  # noqa: E402

# The catalogue models cog.yaml bakes into the image, the default first: 1297, the
# MelBand-RoFormer vocals (kim-vocals) and vocals/instrumental (duality-v2) models and the
# karaoke model (lead vocals apart from backing vocals), kept because callers choose them;
# then the models with the highest Multisong SDR for vocals and for instrumental among those
# that may be served publicly (the HyperACE v2 pair), and MVSep Mega for guitar (with its
# other instruments). A model whose stated licence forbids commercial use, or whose provenance is
# disputed, is never served (catalogue.Model.servable). cog.yaml's build steps, the `model`
# input's choices and description below and the README list the same names
# (tests/test_cog_config.py checks that they all agree, and with the catalogue).
BAKED_MODELS = ("1297", "kim-vocals", "duality-v2", "karaoke", "hyperace-vocals", "hyperace-inst", "mega")

# A checkout's weights/. The image bakes them into /weights instead (cog.yaml sets
# $STEMSEP_WEIGHTS_DIR): `cog run`/`cog serve` mount the project over /src, which would hide
# anything built into /src/weights.
WEIGHTS_DIR = ROOT / "weights"


def model_files(name: str = catalogue.DEFAULT) -> tuple[FilePath, FilePath]:
    """The checkpoint and config of a baked model: its catalogue files in
    $STEMSEP_WEIGHTS_DIR (the image's /weights, filled and sha256-checked at build time), else
    in WEIGHTS_DIR; a config the package ships is read from there (a file of its name in
    the weights folder takes its place); for the default model $STEMSEP_CHECKPOINT /
    $STEMSEP_CONFIG first. Nothing is downloaded: a model missing from the image is one
    sentence."""
    weights = FilePath(os.environ.get("STEMSEP_WEIGHTS_DIR") or WEIGHTS_DIR)
    if name == catalogue.DEFAULT:
        checkpoint, config = catalogue.get(name).paths(weights)
        checkpoint = FilePath(os.environ.get("STEMSEP_CHECKPOINT") or checkpoint)
        config = FilePath(os.environ.get("STEMSEP_CONFIG") or config)
        return checkpoint, config
    checkpoint, config = catalogue.model_paths(name, weights)  # one sentence if a file is missing
    beside = weights / config.name
    return checkpoint, beside if beside.is_file() else config


def work_root() -> FilePath:
    root = FilePath(os.environ.get("STEMSEP_WORK_DIR") or FilePath(tempfile.gettempdir()) / "stemsep").absolute()
    root.mkdir(parents=True, exist_ok=True)
    return root


# the worker's temporary files ---------------------------------------------------------------
# Cog downloads a URL input in the worker process, into tempfile.NamedTemporaryFile(suffix=
# <URL's file name>, delete=False) in tempfile.gettempdir() (cog/types.py, URLPath.convert). It
# creates that file before the first byte arrives and deletes it only after a prediction that
# got its inputs: a 404, a stalled or a cut-short download fails the prediction and leaves the
# file behind. So the worker's temp folder is a folder of ours, which each run() clears.

WORKER_TMP = "tmp"
# tempfile's default names ("tmp" + 8 random characters + suffix): Cog's downloads and any
# library's leftovers. Named entries (a compiler's cache) are kept.
_TEMP_NAME = re.compile(r"^tmp[a-z0-9_]{8}")


def use_worker_temp_dir(root: FilePath) -> FilePath:
    """Point this process's temp folder (tempfile.tempdir, $TMPDIR for child processes) at
    `root`/tmp and return it. TorchInductor's cache (whose default follows the temp folder)
    goes to the persistent compile cache first, so compiled code never lives in the folder
    run() clears."""
    tmp = root / WORKER_TMP
    tmp.mkdir(parents=True, exist_ok=True)
    use_compile_cache()  # before TMPDIR moves: compiled code stays out of the folder run() clears
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = str(tmp)
    return tmp


def clear_worker_temp_dir(tmp: FilePath, keep: Iterable[os.PathLike[str] | str] = (), settle_s: float = 0.0) -> None:
    """Remove the temp files earlier predictions left in `tmp` (failed downloads above all),
    all but `keep` (the inputs of the predictions running now, which Cog downloaded there
    before run() and deletes after it) and, with `settle_s`, all but those changed in the
    last `settle_s` seconds (a download still under way for a prediction yet to start)."""
    kept = {FilePath(path).resolve() for path in keep}
    recent = time.time() - settle_s
    for entry in tmp.iterdir():
        if not _TEMP_NAME.match(entry.name) or entry.resolve() in kept:
            continue
        try:
            if settle_s and entry.lstat().st_mtime > recent:
                continue
        except FileNotFoundError:  # removed meanwhile (Cog deletes an input once its prediction ends)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def max_concurrency() -> int:
    """Predictions the server runs at once: $COG_MAX_CONCURRENCY, which cog.yaml's
    `concurrency.max` sets in the image (1 when unset, as coglet reads it)."""
    try:
        return max(1, int(os.environ.get("COG_MAX_CONCURRENCY") or 1))
    except ValueError:
        return 1


# Under concurrency, or while a network compiles, how long a temp file must have been left
# alone before a prediction clears it: Cog downloads a prediction's input before its run()
# starts (a download that stalls fails after Cog's 10-s read timeout), and the compiler
# writes and removes its temp files within seconds.
SETTLE_S = 60.0


# output names ----------------------------------------------------------------------------

# Cog saves a URL input as NamedTemporaryFile(suffix=<basename of the URL>): "tmp" + 8 random
# characters + the URL's file name; a data URL becomes "tmpXXXXXXXXfile" (+ an extension
# when the MIME type has one). Strip that prefix when it is there; a name that then says
# nothing ("file", empty) becomes "audio".
_COG_TEMP_NAME = re.compile(r"^tmp[a-z0-9_]{8}(?P<rest>.*)$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def output_name(audio: str | os.PathLike[str]) -> str:
    """The `<name>` in `<name>_vocals.wav`: the input's file name without Cog's temp prefix
    or the extension, made safe for a file name, or "audio" when nothing meaningful is left."""
    base = FilePath(audio).name
    match = _COG_TEMP_NAME.match(base)
    if match:
        base = match.group("rest")
    stem = FilePath(base).stem if "." in base.lstrip(".") else base
    stem = _UNSAFE.sub("_", stem).strip("._-")[:100]
    return "audio" if stem.lower() in ("", "file") else stem


def named_input(audio: FilePath, folder: FilePath, name: str) -> FilePath:
    """A symlink to the input named `<name><extension>`, so that error messages name the
    user's file ("song.mp3: not an audio file ...") rather than Cog's temp file."""
    suffix = audio.suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,5}", audio.suffix) else ""
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / f"{name}{suffix}"
    link.symlink_to(audio.resolve())
    return link


# warm-up -----------------------------------------------------------------------------------


def use_compile(device: str) -> bool:
    """$STEMSEP_COMPILE: "auto" (the default) compiles on a GPU, where torch.compile makes the
    network about 1.9x faster (benchmarks/results/separate_cuda_full.md); "1"/"0" force it.
    It compiles in the background: setup() and predictions never wait for it."""
    choice = os.environ.get("STEMSEP_COMPILE", "auto").strip().lower()
    if choice == "auto":
        return resolve_device(device).type == "cuda"
    return choice in ("1", "true", "yes")


def warm_up(separator: Separator) -> None:
    """On a GPU, one eager forward pass of one full chunk (the shape predictions use), so that
    the first prediction pays for no lazy initialization: cuBLAS/cuDNN handles, kernel
    loading, the caching allocator's first blocks. A whole batch of 1297's would add seconds
    on an A40 for nothing more (the compiled network, built in the background, is run on a
    whole batch before it takes over). On the CPU nothing is worth it: a full-size chunk
    takes over a minute there, and the first one costs no more than the others."""
    if separator.device.type != "cuda":
        return
    cfg = separator.config
    with torch.inference_mode():
        separator.model(torch.zeros(1, separator.network_channels, cfg.audio.chunk_size, device=separator.device))
    torch.cuda.synchronize(separator.device)


def network_in_use(separator: Separator) -> str:
    """What runs a prediction's chunks, for its logs."""
    compilation = separator.compilation
    if compilation is None:
        return "eager"
    if compilation.state == "compiled":
        return f"compiled (built in {compilation.seconds:.1f} s)"
    return "eager (compiling in the background)" if compilation.state == "compiling" else "eager (compiling failed)"


# inputs ------------------------------------------------------------------------------------
# Cog's build-time schema generator reads these from the source without running Python: it
# takes a string literal's text between its quotes as is, so each description is one plain
# literal (no implicit concatenation, no escapes), named here so that it can be long.

AUDIO_HELP = "The song to separate: WAV, FLAC, MP3, AAC/M4A, Ogg Vorbis/Opus or AIFF, at any sample rate, mono, stereo or more channels. Uploads are capped at 100 MB; pass a URL for larger files."
MODEL_HELP = "The model: 1297 (BS-RoFormer, vocals and instrumental, the default), kim-vocals (MelBand-RoFormer, vocals and instrumental), duality-v2 (MelBand-RoFormer, vocals and instrumental), karaoke (MelBand-RoFormer: karaoke = the lead vocals, other = the rest), hyperace-vocals (BS-RoFormer HyperACE v2, vocals and instrumental: the best published vocals SDR of these models, 11.39 dB on MVSEP's Multisong set), hyperace-inst (BS-RoFormer HyperACE v2, instrumental and vocals: the best published instrumental SDR of these models, 17.40 dB), mega (MVSep Mega BS-RoFormer, 53 overlapping stems: guitar, piano, bass, drums, vocal and many more; ask for a few with stems, e.g. guitar,no_guitar). The outputs are that model's stems in its order."
STEMS_HELP = "Comma-separated stems to return, e.g. instrumental. no_<stem> gives the song without that stem (mix minus stem, e.g. guitar,no_guitar to practise along); in WAV or FLAC the two add up to the song exactly. Leave empty for all of the model's stems. The files come in the model's stem order, practice tracks after. Choosing fewer costs no less time: one network pass gives them all."
FORMAT_HELP = "File format of the stems: wav (uncompressed), flac (lossless, about half the size), or the lossy mp3, m4a (AAC) and opus, which are much smaller but no longer add up to the mix exactly. Opus is always 48 kHz."
BITRATE_HELP = "Bitrate in kbit/s of mp3, m4a or opus stems. Leave empty for the format's default: 320 for mp3, 256 for m4a, 160 for opus."
TTA_HELP = "Quality mode: average the network's estimate over the song, its swapped channels and its inverted polarity. Three times the network time."
BIT_DEPTH_HELP = "Sample format of the stems. auto keeps the input's precision: 16-bit stays 16, 24 stays 24, 32-bit or float input gives 32-bit float WAV or 24-bit FLAC, MP3/AAC give 16. 32 means 32-bit float WAV, which never clips; FLAC has no 32-bit format, so choose 16 or 24 for it."
OVERLAP_HELP = "How many overlapping 8-second windows cover each moment of the song (1 to 16). Higher smooths the seams between windows and costs proportionally more time. Leave empty for the model's own setting (4)."
ENGINE_HELP = "native: stemsep's pipeline, which keeps the input's sample rate, length, channels and level, with stems that add up to the mix. audio-separator: the same weights through the audio-separator package, for comparison: it always outputs 44.1 kHz stereo, peak-normalizes the song and each stem to 0.9 (so the stems no longer add up to the mix and the loudness changes) and writes 16-bit precision whatever bit_depth says."


# the runner -------------------------------------------------------------------------------


class PredictionCanceled(Exception):
    """Raised between two chunks of a canceled prediction, to stop it and remove its files."""


class Runner(BaseRunner):
    """One prediction at a time by default; `concurrency.max` in cog.yaml ($COG_MAX_CONCURRENCY)
    lets more run at once, each in a thread of its own (run() is async for that: coglet runs
    async runners concurrently and sync ones one at a time). On a GPU their batches queue for
    the one GPU, so one prediction's decoding, encoding and upload overlap another's network
    time; on the CPU they share the cores."""

    def setup(self) -> None:
        # The work and temp folders first: the compiler's thread, which Separator starts,
        # writes temp files and must see the temp folder the process keeps.
        self.root = work_root()
        self.tmp = use_worker_temp_dir(self.root)
        clear_worker_temp_dir(self.tmp)  # what a previous worker left
        checkpoint, config = model_files()
        self.device = os.environ.get("STEMSEP_DEVICE", "auto")
        started = time.perf_counter()
        # a StemsepError fails setup with its message
        self.separator = Separator(checkpoint, config, device=self.device, compile=use_compile(self.device))
        loaded = time.perf_counter()
        warm_up(self.separator)
        warmed = time.perf_counter()
        self.loaded = {catalogue.DEFAULT: self.separator}  # the baked models loaded so far
        self.loading = threading.Lock()  # one model load at a time
        self.checkpoint = checkpoint
        self.reference: ReferenceEngine | None = None
        # predictions in flight (output folder -> input file) and the folder of the last to
        # return, whose files Cog may still be reading when the next starts (see _starting)
        self.lock = threading.Lock()
        self.in_flight: dict[FilePath, FilePath] = {}
        self.last_returned: FilePath | None = None
        report_warnings(lambda line: print(line, flush=True))  # into the logs of the prediction that raised it
        self.timings = {"load_s": loaded - started, "warm_up_s": warmed - loaded}
        print(
            f"stemsep: {checkpoint.name} loaded on {self.separator.device} in {self.timings['load_s']:.2f} s, "
            f"warmed up in {self.timings['warm_up_s']:.2f} s; network {network_in_use(self.separator)}",
            flush=True,
        )

    async def run(
        self,
        audio: Path = Input(description=AUDIO_HELP),
        model: str = Input(description=MODEL_HELP, choices=["1297", "kim-vocals", "duality-v2", "karaoke", "hyperace-vocals", "hyperace-inst", "mega"], default="1297"),
        stems: Optional[str] = Input(description=STEMS_HELP, default=None),
        output_format: str = Input(description=FORMAT_HELP, choices=["wav", "flac", "mp3", "m4a", "opus"], default="wav"),
        bit_depth: str = Input(description=BIT_DEPTH_HELP, choices=["auto", "16", "24", "32"], default="auto"),
        bitrate: Optional[int] = Input(description=BITRATE_HELP, ge=8, le=512, default=None),
        overlap: Optional[int] = Input(description=OVERLAP_HELP, ge=1, le=16, default=None),
        tta: bool = Input(description=TTA_HELP, default=False),
        engine: str = Input(description=ENGINE_HELP, choices=["native", "audio-separator"], default="native"),
    ) -> list[Path]:
        canceled = threading.Event()
        # to_thread copies this context, through which coglet sends the thread's prints to
        # this prediction's logs
        work = asyncio.ensure_future(asyncio.to_thread(
            self._prediction, canceled, audio, model, stems, output_format, bit_depth, bitrate, overlap, tta, engine))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            # Canceled: coglet has already answered. The separation stops before its next
            # chunk and removes its files; wait for that before the task ends.
            canceled.set()
            await asyncio.wait([work])
            raise

    def _prediction(self, canceled: threading.Event, audio, model, stems, output_format, bit_depth, bitrate, overlap,
                    tta, engine) -> list[Path]:
        """One prediction, in its own thread: the inputs as a library call."""
        output_dir = FilePath(tempfile.mkdtemp(prefix="prediction-", dir=self.root))
        name = output_name(audio)
        report = _progress_printer()

        def progress(done: int, total: int) -> None:
            if canceled.is_set():
                raise PredictionCanceled
            report(done, total)

        try:
            self._starting(output_dir, FilePath(audio))
            audio = named_input(FilePath(audio), output_dir / "input", name)
            chosen = [s.strip() for s in stems.split(",") if s.strip()] if stems else None
            if engine == "audio-separator":
                if (model, chosen, tta, bitrate) != (catalogue.DEFAULT, None, False, None) or output_format not in ("wav", "flac"):
                    raise StemsepError("the audio-separator engine runs the default model to wav or flac, with all stems and no quality mode")
                paths = self._reference().separate(audio, output_dir, output_format, overlap, name)
            else:
                separator = self._separator(model)
                print(f"stemsep: {model} network {network_in_use(separator)}", flush=True)
                paths = separator.separate(
                    audio,
                    output_dir,
                    output_format=output_format,
                    bit_depth=bit_depth if bit_depth == "auto" else int(bit_depth),
                    bitrate_kbps=bitrate,
                    overlap=overlap,
                    on_progress=progress,
                    name=name,
                    stems=chosen,
                    tta=tta,
                )
            if canceled.is_set():
                raise PredictionCanceled
        except BaseException as exc:  # failed or canceled: leave nothing behind
            shutil.rmtree(output_dir, ignore_errors=True)
            if isinstance(exc, StemsepError):
                raise StemsepError(str(exc)) from None  # one line in the prediction's error, no traceback
            raise
        finally:
            self._ended(output_dir)
        return [Path(path) for path in paths.values()]

    def _separator(self, name: str) -> Separator:
        """A baked model, loaded on first use. On a GPU, models loaded earlier (but the
        default) are let go first when free memory would not hold twice the new one's weights."""
        with self.loading:
            if name not in self.loaded:
                if name not in BAKED_MODELS:
                    raise StemsepError(f"model {name!r} is not in this image; its models are {', '.join(BAKED_MODELS)}")
                checkpoint, config = model_files(name)
                device = resolve_device(self.device)
                if device.type == "cuda" and torch.cuda.mem_get_info(device)[0] < 2 * checkpoint.stat().st_size:
                    for other in [n for n in self.loaded if n != catalogue.DEFAULT]:
                        del self.loaded[other]  # a prediction running on it keeps it until it ends
                    torch.cuda.empty_cache()
                started = time.perf_counter()
                self.loaded[name] = Separator(checkpoint, config, device=device, compile=use_compile(self.device))
                warm_up(self.loaded[name])
                print(f"stemsep: {name} loaded in {time.perf_counter() - started:.2f} s", flush=True)
            return self.loaded[name]

    def _reference(self) -> ReferenceEngine:
        with self.loading:
            if self.reference is None:
                self.reference = ReferenceEngine(self.checkpoint, self.separator.config, self.root)
            return self.reference

    def _starting(self, output_dir: FilePath, audio: FilePath) -> None:
        """Book a prediction in, and remove what no prediction needs any more: the output
        folders of predictions that have returned (Cog has read their files: it frees a
        prediction's slot only once its outputs are read and uploaded) and the worker's
        stray temp files. With more than one prediction at once, one can start while the
        prediction that returned last is still being read, so that one's folder is kept
        until the next start, and temp files are left alone until SETTLE_S after their last
        change (a download for a prediction yet to start); so they are while a network
        compiles in the background (the compiler's own temp files). The inputs of
        predictions in flight always stay."""
        with self.lock:
            self.in_flight[output_dir] = audio
            concurrent = max_concurrency() > 1
            keep = set(self.in_flight) | ({self.last_returned} if concurrent and self.last_returned else set())
            for old in self.root.glob("prediction-*"):
                if old not in keep:
                    shutil.rmtree(old, ignore_errors=True)
            compiling = any(sep.compilation is not None and sep.compilation.state == "compiling" for sep in self.loaded.values())
            settle = concurrent or compiling  # the compiler writes temp files too (Triton's, in the same folder)
            clear_worker_temp_dir(self.tmp, keep=self.in_flight.values(), settle_s=SETTLE_S if settle else 0.0)

    def _ended(self, output_dir: FilePath) -> None:
        """Book a prediction out; its folder, if it succeeded, is the one Cog reads next."""
        with self.lock:
            self.in_flight.pop(output_dir, None)
            if output_dir.exists():
                self.last_returned = output_dir


def _progress_printer():
    """A progress callback that prints about ten lines per prediction into its logs, in
    tqdm's format ("  40%|####      | 4/10 [chunks]"), which Replicate's clients parse into
    `Prediction.progress`."""
    last = [-1]

    def report(done: int, total: int) -> None:
        tenth = done * 10 // total
        if tenth != last[0]:
            last[0] = tenth
            print(f"{100 * done // total:3d}%|{'#' * tenth:<10}| {done}/{total} [chunks]", flush=True)

    return report
