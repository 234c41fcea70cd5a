"""The Cog runner behind the Replicate model: a thin adapter over :class:`stemsep.separator.Separator`.

``setup()`` loads the model once (GPU when there is one) from the weights baked into the
image at ``/src/weights`` (or ``$STEMSEP_CHECKPOINT`` / ``$STEMSEP_CONFIG``) and warms it
up; ``run()`` turns the inputs into a library call and returns ``[vocals, instrumental]``.
Library errors (:class:`stemsep.errors.StemsepError`) fail the prediction with their
one-sentence message and no traceback.

Each prediction writes into a fresh folder under ``$STEMSEP_WORK_DIR`` (default: the
system temp folder), so output names never collide. Cog reads the files after ``run()``
returns, so a successful prediction's folder is removed when the next prediction starts;
a failed or canceled one's is removed at once.
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

from stemsep.errors import StemsepError  # noqa: E402
from stemsep.reference import ReferenceEngine  # noqa: E402
from stemsep.separator import CHECKPOINT_NAME, CONFIG_NAME, Separator, resolve_device  # noqa: E402

WEIGHTS_DIR = ROOT / "weights"  # /src/weights in the image, filled and sha256-checked at build time


def model_files() -> tuple[FilePath, FilePath]:
    """The checkpoint and config to serve: $STEMSEP_CHECKPOINT / $STEMSEP_CONFIG, else the baked 1297 files."""
    checkpoint = FilePath(os.environ.get("STEMSEP_CHECKPOINT") or WEIGHTS_DIR / CHECKPOINT_NAME)
    config = FilePath(os.environ.get("STEMSEP_CONFIG") or WEIGHTS_DIR / CONFIG_NAME)
    return checkpoint, config


def work_root() -> FilePath:
    root = FilePath(os.environ.get("STEMSEP_WORK_DIR") or FilePath(tempfile.gettempdir()) / "stemsep")
    root.mkdir(parents=True, exist_ok=True)
    return root


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
FORMAT_HELP = "File format of both stems: wav (uncompressed) or flac (lossless, about half the size)."
BIT_DEPTH_HELP = "Sample format of the stems. auto keeps the input's precision: 16-bit stays 16, 24 stays 24, 32-bit or float input gives 32-bit float WAV or 24-bit FLAC, MP3/AAC give 16. 32 means 32-bit float WAV, which never clips; FLAC has no 32-bit format, so choose 16 or 24 for it."
OVERLAP_HELP = "How many overlapping 8-second windows cover each moment of the song (1 to 16). Higher smooths the seams between windows and costs proportionally more time. Leave empty for the model's own setting (4)."
ENGINE_HELP = "native: stemsep's pipeline, which keeps the input's sample rate, length, channels and level, with stems that add up to the mix. audio-separator: the same weights through the audio-separator package, for comparison: it always outputs 44.1 kHz stereo, peak-normalizes the song and each stem to 0.9 (so the stems no longer add up to the mix and the loudness changes) and writes 16-bit precision whatever bit_depth says."


# the runner -------------------------------------------------------------------------------


class Runner(BaseRunner):
    def setup(self) -> None:
        checkpoint, config = model_files()
        device = os.environ.get("STEMSEP_DEVICE", "auto")
        started = time.perf_counter()
        # a StemsepError fails setup with its message
        self.separator = Separator(checkpoint, config, device=device, compile=use_compile(device))
        loaded = time.perf_counter()
        warm_up(self.separator)
        warmed = time.perf_counter()
        self.checkpoint = checkpoint
        self.root = work_root()
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
        output_format: str = Input(description=FORMAT_HELP, choices=["wav", "flac"], default="wav"),
        bit_depth: str = Input(description=BIT_DEPTH_HELP, choices=["auto", "16", "24", "32"], default="auto"),
        overlap: Optional[int] = Input(description=OVERLAP_HELP, ge=1, le=16, default=None),
        engine: str = Input(description=ENGINE_HELP, choices=["native", "audio-separator"], default="native"),
    ) -> list[Path]:
        self._remove_previous_outputs()
        output_dir = FilePath(tempfile.mkdtemp(prefix="prediction-", dir=self.root))
        name = output_name(audio)
        try:
            audio = named_input(FilePath(audio), output_dir / "input", name)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if engine == "audio-separator":
                    stems = self._reference().separate(audio, output_dir, output_format, overlap, name)
                else:
                    stems = self.separator.separate(
                        audio,
                        output_dir,
                        output_format=output_format,
                        bit_depth=bit_depth if bit_depth == "auto" else int(bit_depth),
                        overlap=overlap,
                        on_progress=_progress_printer(),
                        name=name,
                    )
        except BaseException as exc:  # failed or canceled: leave nothing behind
            shutil.rmtree(output_dir, ignore_errors=True)
            if isinstance(exc, StemsepError):
                raise StemsepError(str(exc)) from None  # one line in the prediction's error, no traceback
            raise
        for warning in caught:
            if not issubclass(warning.category, (DeprecationWarning, FutureWarning)):
                print(f"warning: {warning.message}", flush=True)
        return [Path(stems["vocals"]), Path(stems["instrumental"])]

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
    """A progress callback that prints about ten lines per prediction into its logs."""
    last = [-1]

    def report(done: int, total: int) -> None:
        tenth = done * 10 // total
        if tenth != last[0]:
            last[0] = tenth
            print(f"separating: {done}/{total} chunks", flush=True)

    return report
