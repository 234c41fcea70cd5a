"""The Cog runner behind the Replicate model: a thin adapter over :class:`stemsep.separator.Separator`.

``setup()`` loads the default model (GPU when there is one) from the weights baked into the
image at ``/weights`` (``$STEMSEP_WEIGHTS_DIR``, set by cog.yaml; a checkout's ``weights/``
when unset; ``$STEMSEP_CHECKPOINT`` / ``$STEMSEP_CONFIG`` name its files instead) and warms
it up; the other baked models (:data:`BAKED_MODELS`) load on first use and stay loaded while
GPU memory allows. ``run()`` turns the inputs into a library call and returns the chosen
model's stems in the model's order (``[vocals, instrumental]`` for 1297).
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

import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path as FilePath
from typing import Optional

from cog import BaseRunner, Input, Path

ROOT = FilePath(__file__).resolve().parent
if (ROOT / "src" / "stemsep").is_dir() and str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))  # the image runs the checkout in /src, not an installed package

import torch  # noqa: E402

from stemsep import catalogue  # noqa: E402
from stemsep.errors import StemsepError  # noqa: E402
from stemsep.inference import resolve_device, use_compile_cache  # noqa: E402
from stemsep.reference import ReferenceEngine  # noqa: E402
from stemsep.separator import Separator  # noqa: E402

# The catalogue models cog.yaml bakes into the image, the default first: 1297, the best
# vocals and the best instrumental MelBand-RoFormer by published SDR, and the karaoke model
# (lead vocals apart from backing vocals), the most asked-for of the rest. The `model`
# input's choices below list the same names (tests/test_cog_server.py checks all three agree).
BAKED_MODELS = ("1297", "kim-vocals", "duality-v2", "karaoke")

# A checkout's weights/. The image bakes them into /weights instead (cog.yaml sets
# $STEMSEP_WEIGHTS_DIR): `cog run`/`cog serve` mount the project over /src, which would hide
# anything built into /src/weights.
WEIGHTS_DIR = ROOT / "weights"


def model_files(name: str = catalogue.DEFAULT) -> tuple[FilePath, FilePath]:
    """The checkpoint and config of a baked model: its catalogue files in
    $STEMSEP_WEIGHTS_DIR (the image's /weights, filled and sha256-checked at build time), else
    in WEIGHTS_DIR; for the default model $STEMSEP_CHECKPOINT / $STEMSEP_CONFIG first."""
    weights = FilePath(os.environ.get("STEMSEP_WEIGHTS_DIR") or WEIGHTS_DIR)
    if name == catalogue.DEFAULT:
        checkpoint, config = catalogue.get(name).paths(weights)
        checkpoint = FilePath(os.environ.get("STEMSEP_CHECKPOINT") or checkpoint)
        config = FilePath(os.environ.get("STEMSEP_CONFIG") or config)
        return checkpoint, config
    return catalogue.model_paths(name, weights)  # one sentence if a file is missing


def work_root() -> FilePath:
    root = FilePath(os.environ.get("STEMSEP_WORK_DIR") or FilePath(tempfile.gettempdir()) / "stemsep")
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


def clear_worker_temp_dir(tmp: FilePath, keep: os.PathLike[str] | str | None = None) -> None:
    """Remove the temp files earlier predictions left in `tmp` (failed downloads above all),
    all but `keep`: this prediction's input, which Cog downloaded there before run() and
    deletes after it."""
    kept = FilePath(keep).resolve() if keep is not None else None
    for entry in tmp.iterdir():
        if not _TEMP_NAME.match(entry.name) or (kept is not None and entry.resolve() == kept):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


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
    network about 1.9x faster for about 100 s of setup on an H100 (measured: 101.8 s,
    benchmarks/results/cog_predict_cuda.json); "1"/"0" force it."""
    choice = os.environ.get("STEMSEP_COMPILE", "auto").strip().lower()
    if choice == "auto":
        return resolve_device(device).type == "cuda"
    return choice in ("1", "true", "yes")


def warm_up(separator: Separator) -> None:
    """On a GPU, one forward pass of one full chunk (the shape predictions use), so that the
    first prediction pays for no lazy initialization: cuBLAS/cuDNN handles, kernel loading,
    the caching allocator's first blocks. A whole batch of 1297's would add seconds on an A40
    for nothing more (a compiled model was already warmed up with a whole batch when it was
    compiled). On the CPU nothing is worth it: a full-size chunk takes over a minute there,
    and the first one costs no more than the others."""
    if separator.device.type != "cuda" or separator.compiled:
        return
    cfg = separator.config
    channels = 2 if cfg.model.stereo else 1
    with torch.inference_mode():
        separator.model(torch.zeros(1, channels, cfg.audio.chunk_size, device=separator.device))
    torch.cuda.synchronize(separator.device)


# inputs ------------------------------------------------------------------------------------
# Cog's build-time schema generator reads these from the source without running Python: it
# takes a string literal's text between its quotes as is, so each description is one plain
# literal (no implicit concatenation, no escapes), named here so that it can be long.

AUDIO_HELP = "The song to separate: WAV, FLAC, MP3, AAC/M4A, Ogg Vorbis/Opus or AIFF, at any sample rate, mono, stereo or more channels. Uploads are capped at 100 MB; pass a URL for larger files."
MODEL_HELP = "The model: 1297 (BS-RoFormer, vocals and instrumental, the default), kim-vocals (MelBand-RoFormer, vocals and instrumental), duality-v2 (MelBand-RoFormer, best published instrumental SDR), karaoke (MelBand-RoFormer: karaoke = the lead vocals, other = the rest). The outputs are that model's stems in its order."
STEMS_HELP = "Comma-separated stems to return, e.g. instrumental. Leave empty for all of the model's stems. Choosing one costs no less time: the complement is computed from the target."
FORMAT_HELP = "File format of the stems: wav (uncompressed), flac (lossless, about half the size), or the lossy mp3, m4a (AAC) and opus, which are much smaller but no longer add up to the mix exactly. Opus is always 48 kHz."
BITRATE_HELP = "Bitrate in kbit/s of mp3, m4a or opus stems. Leave empty for the format's default: 320 for mp3, 256 for m4a, 160 for opus."
TTA_HELP = "Quality mode: average the network's estimate over the song, its swapped channels and its inverted polarity. Three times the network time."
BIT_DEPTH_HELP = "Sample format of the stems. auto keeps the input's precision: 16-bit stays 16, 24 stays 24, 32-bit or float input gives 32-bit float WAV or 24-bit FLAC, MP3/AAC give 16. 32 means 32-bit float WAV, which never clips; FLAC has no 32-bit format, so choose 16 or 24 for it."
OVERLAP_HELP = "How many overlapping 8-second windows cover each moment of the song (1 to 16). Higher smooths the seams between windows and costs proportionally more time. Leave empty for the model's own setting (4)."
ENGINE_HELP = "native: stemsep's pipeline, which keeps the input's sample rate, length, channels and level, with stems that add up to the mix. audio-separator: the same weights through the audio-separator package, for comparison: it always outputs 44.1 kHz stereo, peak-normalizes the song and each stem to 0.9 (so the stems no longer add up to the mix and the loudness changes) and writes 16-bit precision whatever bit_depth says."


# the runner -------------------------------------------------------------------------------


class Runner(BaseRunner):
    def setup(self) -> None:
        checkpoint, config = model_files()
        self.device = os.environ.get("STEMSEP_DEVICE", "auto")
        started = time.perf_counter()
        # a StemsepError fails setup with its message
        self.separator = Separator(checkpoint, config, device=self.device, compile=use_compile(self.device))
        loaded = time.perf_counter()
        warm_up(self.separator)
        warmed = time.perf_counter()
        self.loaded = {catalogue.DEFAULT: self.separator}  # the baked models loaded so far
        self.checkpoint = checkpoint
        self.root = work_root()
        self.tmp = use_worker_temp_dir(self.root)
        clear_worker_temp_dir(self.tmp)  # what a previous worker left
        self.reference: ReferenceEngine | None = None
        self.timings = {"load_s": loaded - started, "warm_up_s": warmed - loaded}
        print(
            f"stemsep: {checkpoint.name} loaded on {self.separator.device}{' and compiled' if self.separator.compiled else ''} "
            f"in {self.timings['load_s']:.2f} s, "
            f"warmed up in {self.timings['warm_up_s']:.2f} s",
            flush=True,
        )

    def run(
        self,
        audio: Path = Input(description=AUDIO_HELP),
        model: str = Input(description=MODEL_HELP, choices=["1297", "kim-vocals", "duality-v2", "karaoke"], default="1297"),
        stems: Optional[str] = Input(description=STEMS_HELP, default=None),
        output_format: str = Input(description=FORMAT_HELP, choices=["wav", "flac", "mp3", "m4a", "opus"], default="wav"),
        bit_depth: str = Input(description=BIT_DEPTH_HELP, choices=["auto", "16", "24", "32"], default="auto"),
        bitrate: Optional[int] = Input(description=BITRATE_HELP, ge=8, le=512, default=None),
        overlap: Optional[int] = Input(description=OVERLAP_HELP, ge=1, le=16, default=None),
        tta: bool = Input(description=TTA_HELP, default=False),
        engine: str = Input(description=ENGINE_HELP, choices=["native", "audio-separator"], default="native"),
    ) -> list[Path]:
        self._remove_previous_outputs()
        clear_worker_temp_dir(self.tmp, keep=audio)
        output_dir = FilePath(tempfile.mkdtemp(prefix="prediction-", dir=self.root))
        name = output_name(audio)
        try:
            audio = named_input(FilePath(audio), output_dir / "input", name)
            chosen = [s.strip() for s in stems.split(",") if s.strip()] if stems else None
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if engine == "audio-separator":
                    if (model, chosen, tta, bitrate) != (catalogue.DEFAULT, None, False, None) or output_format not in ("wav", "flac"):
                        raise StemsepError("the audio-separator engine runs the default model to wav or flac, with all stems and no quality mode")
                    paths = self._reference().separate(audio, output_dir, output_format, overlap, name)
                else:
                    paths = self._separator(model).separate(
                        audio,
                        output_dir,
                        output_format=output_format,
                        bit_depth=bit_depth if bit_depth == "auto" else int(bit_depth),
                        bitrate_kbps=bitrate,
                        overlap=overlap,
                        on_progress=_progress_printer(),
                        name=name,
                        stems=chosen,
                        tta=tta,
                    )
        except BaseException as exc:  # failed or canceled: leave nothing behind
            shutil.rmtree(output_dir, ignore_errors=True)
            if isinstance(exc, StemsepError):
                raise StemsepError(str(exc)) from None  # one line in the prediction's error, no traceback
            raise
        for warning in caught:
            if not issubclass(warning.category, (DeprecationWarning, FutureWarning)):
                print(f"warning: {warning.message}", flush=True)
        return [Path(path) for path in paths.values()]

    def _separator(self, name: str) -> Separator:
        """A baked model, loaded on first use. On a GPU, models loaded earlier (but the
        default) are let go first when free memory would not hold twice the new one's weights."""
        if name not in self.loaded:
            if name not in BAKED_MODELS:
                raise StemsepError(f"model {name!r} is not in this image; its models are {', '.join(BAKED_MODELS)}")
            checkpoint, config = model_files(name)
            device = resolve_device(self.device)
            if device.type == "cuda" and torch.cuda.mem_get_info(device)[0] < 2 * checkpoint.stat().st_size:
                for other in [n for n in self.loaded if n != catalogue.DEFAULT]:
                    del self.loaded[other]
                torch.cuda.empty_cache()
            started = time.perf_counter()
            self.loaded[name] = Separator(checkpoint, config, device=device, compile=use_compile(self.device))
            warm_up(self.loaded[name])
            print(f"stemsep: {name} loaded in {time.perf_counter() - started:.2f} s", flush=True)
        return self.loaded[name]

    def _reference(self) -> ReferenceEngine:
        if self.reference is None:
            self.reference = ReferenceEngine(self.checkpoint, self.separator.config, self.root)
        return self.reference

    def _remove_previous_outputs(self) -> None:
        """Cog has read the previous prediction's files by the time a new one can start
        (one prediction at a time; a second request gets 409)."""
        for folder in self.root.glob("prediction-*"):
            shutil.rmtree(folder, ignore_errors=True)


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
