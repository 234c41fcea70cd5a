"""Quality evaluation: score vocals/instrumental estimates against MUSDB18(-HQ) references.

A track's references are its vocals and its instrumental, taken as mixture - vocals (what a
vocals/instrumental split can recover from the mixture). Estimates come from the model
(:func:`separator_estimates`) or from stem files another tool wrote (:func:`file_estimates`).
Two figures per stem and track:

- ``sdr``: the "SDR" of ZFTurbo's Music-Source-Separation-Training and the MVSEP leaderboard,
  ``10·log10((Σs² + ε) / (Σ(s - ŝ)² + ε))`` over the whole track and all channels, ε = 1e-7.
  A perfect estimate scores ``10·log10(Σs²/ε + 1)``, the metric's ceiling.
- ``bsseval_sdr``: museval's BSSEval v4 SDR, the median over 1-s frames, with vocals and
  instrumental evaluated together as ``museval.eval_mus_track`` does for vocals/accompaniment.
  museval leaves a frame undefined (NaN) when any reference or estimate in it is all zeros, so
  one silent stem blanks both stems' frames; the median skips undefined frames, and a track
  with none defined (for one, an estimate that is all zeros, which museval refuses) scores
  NaN. A perfect estimate scores +inf. In v4 ("images") mode the SDR of a frame works out to
  ``10·log10(Σs² / Σ(s - ŝ)²)`` over that frame.

Over tracks, the median and mean of each figure are reported (NaN tracks left out).
:func:`evaluate` runs the loop: it scores tracks in order and rewrites a JSON file atomically
after each one, so an interrupted run resumes where it stopped. Nothing here prints.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stemsep import audio
from stemsep.errors import StemsepError

STEMS = ("vocals", "instrumental")
EPS = 1e-7  # MSST's `sdr()`: added to both energies
BSSEVAL_FRAME_S = 1.0  # museval's default window and hop for MUSDB (SiSEC 2018)
MUSDB_STREAMS = {"mixture": 0, "drums": 1, "bass": 2, "other": 3, "vocals": 4}  # in a .stem.mp4
AUDIO_SUFFIXES = (".wav", ".flac")
STEM_ALIASES = {"vocals": ("vocals",), "instrumental": ("instrumental", "accompaniment")}
RUNTIME_SETTINGS = ("device", "batch_size")  # recorded, but a resumed run may change them
JSON_FORMAT = 1


class EvaluationError(StemsepError):
    """A dataset, estimate or results file cannot be used for evaluation."""


# metrics ----------------------------------------------------------------------------------


def sdr(reference: np.ndarray, estimate: np.ndarray, eps: float = EPS) -> float:
    """MSST/MVSEP SDR in dB of one stem over the whole track (all channels), in float64."""
    s = np.asarray(reference, dtype=np.float64)
    error = s - np.asarray(estimate, dtype=np.float64)
    return float(10 * np.log10((np.sum(s * s) + eps) / (np.sum(error * error) + eps)))


def _silent(x: np.ndarray) -> bool:
    """All zeros as museval sees a (channels, samples) source: every sample's channel sum is 0."""
    return not np.any(np.sum(x, axis=0))


def bsseval_sdr(references: dict[str, np.ndarray], estimates: dict[str, np.ndarray], sample_rate: int) -> dict[str, float]:
    """museval BSSEval v4 SDR per stem: median over 1-s frames (NaN frames skipped).

    `references`/`estimates` map each of STEMS to (channels, samples); all stems are evaluated
    in one museval call, as museval does for MUSDB's vocals/accompaniment.
    """
    try:
        import museval
    except ImportError:
        raise EvaluationError(
            "the BSSEval figure needs museval: `pip install museval==0.4.1`, or skip it with --no-bsseval"
        ) from None
    if any(_silent(x) for x in (*references.values(), *estimates.values())):
        return {stem: math.nan for stem in STEMS}  # museval refuses; it would leave every frame undefined
    win = round(BSSEVAL_FRAME_S * sample_rate)
    refs = np.stack([np.asarray(references[s], dtype=np.float64).T for s in STEMS])  # (stems, samples, channels)
    ests = np.stack([np.asarray(estimates[s], dtype=np.float64).T for s in STEMS])
    frames = museval.evaluate(refs, ests, win=win, hop=win)[0]  # SDR, (stems, frames)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "All-NaN slice": no frame defined
        medians = np.nanmedian(frames, axis=1)
    return {stem: float(m) for stem, m in zip(STEMS, medians)}


def score(
    mixture: np.ndarray, vocals: np.ndarray, estimates: dict[str, np.ndarray], sample_rate: int, bsseval: bool = True
) -> tuple[dict[str, float], dict[str, float] | None]:
    """(sdr, bsseval_sdr) per stem of `estimates` against vocals and mixture - vocals."""
    mixture = np.asarray(mixture, dtype=np.float64)
    references = {"vocals": np.asarray(vocals, dtype=np.float64)}
    references["instrumental"] = mixture - references["vocals"]
    for stem in STEMS:
        if estimates[stem].shape != mixture.shape:
            raise EvaluationError(f"the {stem} estimate is shaped {estimates[stem].shape}, the mixture {mixture.shape}")
    sdrs = {stem: sdr(references[stem], estimates[stem]) for stem in STEMS}
    return sdrs, bsseval_sdr(references, estimates, sample_rate) if bsseval else None


# datasets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Track:
    """One reference track: where its mixture and vocals are (file and audio stream)."""

    name: str
    mixture: Path
    vocals: Path
    mixture_stream: int = 0
    vocals_stream: int = 0

    def load(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(mixture, vocals, sample_rate), both float32 (channels, samples)."""
        mixture, info = audio.decode(self.mixture, self.mixture_stream)
        vocals, vocals_info = audio.decode(self.vocals, self.vocals_stream)
        if (vocals_info.sample_rate, vocals.shape) != (info.sample_rate, mixture.shape):
            raise EvaluationError(
                f"{self.name}: the vocals ({vocals_info.sample_rate} Hz, {vocals.shape[0]} ch, {vocals.shape[1]} samples) "
                f"do not match the mixture ({info.sample_rate} Hz, {mixture.shape[0]} ch, {mixture.shape[1]} samples)"
            )
        return mixture, vocals, info.sample_rate


def _audio_file(folder: Path, stem: str) -> Path | None:
    for suffix in AUDIO_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def _tracks_in(folder: Path) -> list[Track]:
    tracks = []
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            mixture = _audio_file(entry, "mixture")
            if mixture is None:
                continue
            vocals = _audio_file(entry, "vocals")
            if vocals is None:
                raise EvaluationError(f"{entry}: has a mixture but no vocals.wav")
            tracks.append(Track(entry.name, mixture, vocals))
        elif entry.name.endswith(".stem.mp4") and entry.is_file():
            tracks.append(
                Track(entry.name.removesuffix(".stem.mp4"), entry, entry, MUSDB_STREAMS["mixture"], MUSDB_STREAMS["vocals"])
            )
    return tracks


def find_tracks(dataset: str | Path, split: str = "test") -> list[Track]:
    """The tracks of a MUSDB18-HQ or MUSDB18 dataset, sorted by name.

    MUSDB18-HQ: a folder per track holding `mixture.wav` and `vocals.wav` (`.flac` accepted;
    the other stems are not needed). MUSDB18: `<track>.stem.mp4` files. Both datasets keep
    their tracks in `train/` and `test/`: `dataset/<split>` is used when it exists, otherwise
    `dataset` itself must hold the tracks.
    """
    dataset = Path(dataset)
    if not dataset.is_dir():
        raise EvaluationError(f"dataset folder {dataset} does not exist")
    folder = dataset / split if (dataset / split).is_dir() else dataset
    tracks = _tracks_in(folder)
    if not tracks:
        splits = [p.name for p in (dataset / "train", dataset / "test") if p.is_dir()]
        hint = f" (it has {', '.join(s + '/' for s in splits)}; choose one with --split)" if splits else ""
        raise EvaluationError(
            f"{folder}: no MUSDB18-HQ track folders (mixture.wav + vocals.wav) or MUSDB18 .stem.mp4 files{hint}"
        )
    names = [t.name for t in tracks]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise EvaluationError(f"{folder}: track {twice[0]!r} is there both as a folder and as a .stem.mp4 file")
    return tracks


# estimates --------------------------------------------------------------------------------

# Given a track's mixture (channels, samples) at its rate, return float (channels, samples)
# arrays for each of STEMS.
Estimator = Callable[[Track, np.ndarray, int], dict[str, np.ndarray]]


def separator_estimates(separator: Any, overlap: int | None = None) -> Estimator:
    """Estimates from a :class:`stemsep.separator.Separator` run on each mixture."""

    def estimate(track: Track, mixture: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
        return separator.separate_array(mixture, sample_rate, overlap=overlap)

    return estimate


def _stem_matches(base: str, stem: str) -> bool:
    """`base` (lower case, no suffix) names `stem`: `vocals`, `x_vocals`, `x_(vocals)_model`."""
    return any(base == a or base.endswith(f"_{a}") or f"_({a})" in base for a in STEM_ALIASES[stem])


def find_estimates(directory: str | Path, track: str) -> dict[str, Path]:
    """The estimate files of `track` in `directory` (case-insensitive names, .wav or .flac):

    - `directory/<track>/vocals.wav`, `instrumental.wav` (or `accompaniment.wav`), also any
      `<anything>_vocals.wav` or audio-separator's `<anything>_(Vocals)_<model>.wav` in there;
    - `directory/<track>_vocals.wav` (stemsep separate's names) or
      `directory/<track>_(Vocals)_<model>.wav` (audio-separator's).

    Returns the stems found (one or both); a stem matched by several files is an error.
    """
    directory = Path(directory)
    candidates: dict[str, list[Path]] = {stem: [] for stem in STEMS}
    prefix = f"{track.lower()}_"
    folder = directory / track
    for place, files in ((folder, folder.iterdir() if folder.is_dir() else ()), (directory, directory.iterdir())):
        for path in files:
            if path.suffix.lower() not in AUDIO_SUFFIXES or not path.is_file():
                continue
            base = path.stem.lower()
            if place is directory:
                if not base.startswith(prefix):
                    continue
                base = "_" + base[len(prefix) :]  # "_vocals" or "_(vocals)_model"
            for stem in STEMS:
                if _stem_matches(base, stem):
                    candidates[stem].append(path)
    found = {}
    for stem, paths in candidates.items():
        if len(paths) > 1:
            names = ", ".join(sorted(str(p.relative_to(directory)) for p in paths))
            raise EvaluationError(f"{directory}: several {stem} estimates for {track!r} ({names}); keep one")
        if paths:
            found[stem] = paths[0]
    return found


def load_estimate(path: Path, reference: np.ndarray, sample_rate: int) -> np.ndarray:
    """An estimate file as float32 (channels, samples); it must match the reference's rate,
    channel count and length exactly (nothing is resampled, padded or cut)."""
    x, info = audio.decode(path)
    ref_channels, ref_samples = reference.shape
    if info.sample_rate != sample_rate:
        raise EvaluationError(f"{path}: is {info.sample_rate} Hz but the reference is {sample_rate} Hz; resample it first")
    if x.shape[0] != ref_channels:
        raise EvaluationError(f"{path}: has {x.shape[0]} channels but the reference has {ref_channels}")
    if x.shape[1] != ref_samples:
        raise EvaluationError(
            f"{path}: has {x.shape[1]} samples but the reference has {ref_samples}; estimates must have the mixture's length"
        )
    return x


def file_estimates(directory: str | Path) -> Estimator:
    """Estimates read from stem files (see :func:`find_estimates`). A missing stem is derived
    from the other one and the reference mixture: instrumental = mixture - vocals, and back."""
    directory = Path(directory)
    if not directory.is_dir():
        raise EvaluationError(f"estimates folder {directory} does not exist")

    def estimate(track: Track, mixture: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
        paths = find_estimates(directory, track.name)
        if not paths:
            raise EvaluationError(f"{directory}: no vocals or instrumental estimate for {track.name!r}")
        stems = {stem: load_estimate(path, mixture, sample_rate).astype(np.float64) for stem, path in paths.items()}
        for stem, other in (("vocals", "instrumental"), ("instrumental", "vocals")):
            if stem not in stems:
                stems[stem] = mixture.astype(np.float64) - stems[other]
        return stems

    return estimate


# results ----------------------------------------------------------------------------------


@dataclass
class TrackScore:
    """One track's figures (dB per stem; bsseval_sdr is None when it was not computed)."""

    name: str
    duration: float  # seconds
    sdr: dict[str, float]
    bsseval_sdr: dict[str, float] | None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "duration": self.duration,
            "sdr": _json_numbers(self.sdr),
            "bsseval_sdr": None if self.bsseval_sdr is None else _json_numbers(self.bsseval_sdr),
            "settings": self.settings,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrackScore:
        bss = data.get("bsseval_sdr")
        return cls(
            data["name"], float(data["duration"]), _numbers(data["sdr"]), None if bss is None else _numbers(bss),
            data.get("settings", {}),
        )


def _json_number(x: float) -> float | str | None:
    """Strict JSON has no NaN or infinity: NaN -> null, ±inf -> "inf"/"-inf"."""
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _json_numbers(values: dict[str, float]) -> dict[str, float | str | None]:
    return {k: _json_number(v) for k, v in values.items()}


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    return {k: math.nan if v is None else float(v) for k, v in values.items()}


def summarize(scores: Iterable[TrackScore]) -> dict[str, Any]:
    """Median and mean over tracks of each figure and stem (NaN tracks left out; None if none)."""
    scores = list(scores)
    summary: dict[str, Any] = {"tracks": len(scores)}
    for metric in ("sdr", "bsseval_sdr"):
        per_stem = {stem: [] for stem in STEMS}
        for s in scores:
            for stem, value in (getattr(s, metric) or {}).items():
                if not math.isnan(value):
                    per_stem[stem].append(value)
        summary[metric] = {
            name: {stem: float(fn(v)) if v else math.nan for stem, v in per_stem.items()}
            for name, fn in (("median", np.median), ("mean", np.mean))
        }
    return summary


def _summary_json(summary: dict[str, Any]) -> dict[str, Any]:
    return {
        k: {agg: _json_numbers(stems) for agg, stems in v.items()} if isinstance(v, dict) else v
        for k, v in summary.items()
    }


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in RUNTIME_SETTINGS}


def read_results(path: str | Path, settings: dict[str, Any]) -> dict[str, TrackScore]:
    """Tracks already scored in the results file at `path` (none if it does not exist).

    The file must have been written with the same settings (device and batch size aside):
    mixing figures from different settings in one file would make its summary meaningless.
    """
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        stored = data["settings"]
        tracks = [TrackScore.from_json(t) for t in data["tracks"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EvaluationError(f"{path}: is not a stemsep eval results file ({exc}); choose another --json file") from None
    wanted, had = _comparable(settings), _comparable(stored)
    if wanted != had:
        diff = ", ".join(f"{k}: {had.get(k, 'unset')!r} there, {wanted.get(k, 'unset')!r} now"
                         for k in sorted(wanted.keys() | had.keys()) if wanted.get(k) != had.get(k))
        raise EvaluationError(f"{path}: holds results for other settings ({diff}); choose another --json file or delete it")
    return {t.name: t for t in tracks}


def write_results(path: str | Path, scores: Iterable[TrackScore], settings: dict[str, Any]) -> None:
    """Write all `scores` and their summary to `path` atomically (temporary file, then rename)."""
    path = Path(path)
    scores = sorted(scores, key=lambda s: s.name)
    data = {
        "format": JSON_FORMAT,
        "settings": settings,
        "summary": _summary_json(summarize(scores)),
        "tracks": [s.to_json() for s in scores],
    }
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# the loop ---------------------------------------------------------------------------------

# Called after each track with its score, whether it was read back from the results file
# (True) or scored now (False), its position (1-based) and the number of tracks.
TrackCallback = Callable[[TrackScore, bool, int, int], None]


@dataclass
class Report:
    scores: list[TrackScore]  # the tracks asked for, in order
    resumed: int  # how many of them were read back from the results file
    summary: dict[str, Any]  # summarize(scores)


def evaluate(
    tracks: list[Track],
    estimator: Estimator,
    settings: dict[str, Any] | None = None,
    results_path: str | Path | None = None,
    bsseval: bool = True,
    on_track: TrackCallback | None = None,
) -> Report:
    """Score each track's estimates; with `results_path`, skip the tracks already in that
    file and rewrite it after each new one (tracks it holds beyond `tracks` are kept)."""
    settings = {**(settings or {}), "bsseval": bsseval}
    if results_path and not Path(results_path).parent.is_dir():
        raise EvaluationError(f"results folder {Path(results_path).parent} does not exist")
    done = read_results(results_path, settings) if results_path else {}
    scores, resumed = [], 0
    for i, track in enumerate(tracks, 1):
        result = done.get(track.name)
        was_resumed = result is not None
        if was_resumed:
            resumed += 1
        else:
            mixture, vocals, sample_rate = track.load()
            estimates = estimator(track, mixture, sample_rate)
            sdrs, bss = score(mixture, vocals, estimates, sample_rate, bsseval)
            result = TrackScore(track.name, mixture.shape[1] / sample_rate, sdrs, bss, settings)
            done[track.name] = result
            if results_path:
                write_results(results_path, done.values(), settings)
        scores.append(result)
        if on_track:
            on_track(result, was_resumed, i, len(tracks))
    return Report(scores, resumed, summarize(scores))
