"""Quality evaluation: score stem estimates against MUSDB18(-HQ) references.

MUSDB has four reference stems, vocals, drums, bass and other; a fifth, the instrumental, is
taken as mixture - vocals (what a vocals/instrumental split can recover from the mixture).
Every stem an estimator gives is scored against its reference: a vocals/instrumental model's
two, a 4-stem model's four. Model stem names map to these case-insensitively, `accompaniment`
is the instrumental and `vocal` the vocals (:data:`STEM_ALIASES`); a stem with no reference
("karaoke", "reverb", ...) cannot be scored and is refused, except from a model that splits
MUSDB's stems further (:func:`musdb_mapping`): one that gives vocals, drums, bass and other
and more (SW's guitar and piano) has the others summed into MUSDB's other, which holds
them; one that gives vocals, drums and bass but no other (MVSep Mega, whose 53 stems
overlap, so that no sum of them is MUSDB's other) is scored on those three and the rest is
left out. A track loads its mixture and only the references its estimates need. Estimates come from a model
(:func:`separator_estimates`) or from stem files another tool wrote (:func:`file_estimates`).
Two figures per stem and track:

- ``sdr``: the "SDR" of ZFTurbo's Music-Source-Separation-Training and the MVSEP leaderboard,
  ``10·log10((Σs² + ε) / (Σ(s - ŝ)² + ε))`` over the whole track and all channels, ε = 1e-7.
  A perfect estimate scores ``10·log10(Σs²/ε + 1)``, the metric's ceiling.
- ``bsseval_sdr``: museval's BSSEval v4 SDR, the median over 1-s frames, with all scored stems
  evaluated together as ``museval.eval_mus_track`` does for MUSDB's targets. museval leaves a
  frame undefined (NaN) when any reference or estimate in it is all zeros, so one silent
  stem blanks every stem's frames; the median skips undefined frames, and a track with none
  defined (for one, an estimate that is all zeros, which museval refuses) scores NaN. A
  perfect estimate scores +inf. In v4 ("images") mode the SDR of a frame works out to
  ``10·log10(Σs² / Σ(s - ŝ)²)`` over that frame, whatever the other stems.

Every track of a run is scored on the same stems. Over tracks, the median and mean of each
figure are reported (NaN tracks left out). :func:`evaluate` runs the loop: it scores tracks
in order and rewrites a JSON file atomically after each one, so an interrupted run resumes
where it stopped. Nothing here prints.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stemsep.decode import decode
from stemsep.errors import EvaluationError
from stemsep.files import atomic_file
from stemsep.stems import COMPLEMENTS, PRACTICE_PREFIX  # mixture - one is the other

MUSDB_STEMS = ("vocals", "drums", "bass", "other")  # the reference stems a MUSDB track has
STEMS = ("vocals", "instrumental", "drums", "bass", "other")  # what can be scored (instrumental = mixture - vocals)
STEM_ALIASES = {  # a stem's names, lower case, in models and in estimate files
    "vocals": ("vocals", "vocal"),
    "instrumental": ("instrumental", "accompaniment"),
    "drums": ("drums",),
    "bass": ("bass",),
    "other": ("other",),
}
EPS = 1e-7  # MSST's `sdr()`: added to both energies
BSSEVAL_FRAME_S = 1.0  # museval's default window and hop for MUSDB (SiSEC 2018)
MUSDB_STREAMS = {"mixture": 0, "drums": 1, "bass": 2, "other": 3, "vocals": 4}  # in a .stem.mp4
AUDIO_SUFFIXES = (".wav", ".flac")
RUNTIME_SETTINGS = ("device", "batch_size")  # recorded, but a resumed run may change them
JSON_FORMAT = 2  # 2: any scored stems (format 1 always had vocals and instrumental), "stems", tta


# stems ------------------------------------------------------------------------------------


def reference_stem(name: str) -> str | None:
    """The scored stem (one of STEMS) that a model's or file's stem `name` is, case-insensitively;
    None when MUSDB has no reference for it."""
    key = name.strip().lower()
    return next((stem for stem, aliases in STEM_ALIASES.items() if key in aliases), None)


def reference_stems(names: Iterable[str], known: Mapping[str, str] | None = None) -> dict[str, str]:
    """{name: scored stem} for each of `names`, in order (`known` names taken as given).

    A name with no MUSDB reference, or two names for the same reference, is an error.
    """
    known = known or {}
    stems: dict[str, str] = {}
    for name in names:
        stem = known.get(name) or reference_stem(name)
        if stem is None:
            raise EvaluationError(
                f"the {name!r} stem cannot be scored: MUSDB has references for {', '.join(MUSDB_STEMS)} "
                "and the instrumental (mixture - vocals) only"
            )
        twin = next((n for n, s in stems.items() if s == stem), None)
        if twin is not None:
            raise EvaluationError(f"the {twin!r} and {name!r} stems would both be scored as the {stem}; only one can be")
        stems[name] = stem
    return stems


@dataclass(frozen=True)
class MusdbMapping:
    """How a model's stems are scored on MUSDB: `stem_map` ({model stem: scored stem}, in the
    model's order), the model stems `summed` into one scored stem ({scored stem: the model
    stems added up, the one named for it first}), and the model stems `left_out`."""

    stem_map: dict[str, str]
    summed: dict[str, tuple[str, ...]] = field(default_factory=dict)
    left_out: tuple[str, ...] = ()


def musdb_mapping(names: Iterable[str], known: Mapping[str, str] | None = None) -> MusdbMapping:
    """The scoring of a model giving the stems `names` (`known` names taken as given): each
    stem as its reference (:func:`reference_stems`), except that stems with no reference
    are summed into `other` when the model also gives vocals, drums, bass and other (its
    stems then split MUSDB's other further), or left out when it gives vocals, drums and bass
    but no other (its stems overlap: MVSep Mega); otherwise they are refused."""
    names, known = tuple(names), dict(known or {})
    mapped = {name: known.get(name) or reference_stem(name) for name in names}
    unmapped = tuple(name for name, stem in mapped.items() if stem is None)
    scored = set(mapped.values())
    if unmapped and set(MUSDB_STEMS) <= scored:
        other = next(name for name, stem in mapped.items() if stem == "other")
        stem_map = reference_stems([n for n in names if n not in unmapped], known)
        return MusdbMapping(stem_map, {"other": (other, *unmapped)})
    if unmapped and {"vocals", "drums", "bass"} <= scored:
        return MusdbMapping(reference_stems([n for n in names if n not in unmapped], known), left_out=unmapped)
    return MusdbMapping(reference_stems(names, known))


def _source_of(stem: str) -> str:
    """The MUSDB file a scored stem's reference comes from."""
    return "vocals" if stem == "instrumental" else stem


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
    """museval BSSEval v4 SDR per stem of `references`: median over 1-s frames (NaN frames skipped).

    `references`/`estimates` map each stem to (channels, samples); all stems are evaluated in
    one museval call, as museval does for MUSDB's targets.
    """
    try:
        import museval
    except ImportError:
        raise EvaluationError(
            "the BSSEval figure needs museval (`pip install museval==0.4.1`); install it or skip that figure"
        ) from None
    except RuntimeError as exc:  # museval imports stempeg, which refuses to load without the ffmpeg programs
        why = "its stempeg needs the ffmpeg and ffprobe programs" if "ffmpeg" in str(exc) else str(exc).splitlines()[0]
        raise EvaluationError(f"museval, which the BSSEval figure needs, does not load ({why}); fix that or skip that figure") from None
    stems = tuple(references)
    if any(_silent(x) for x in (*references.values(), *(estimates[s] for s in stems))):
        return {stem: math.nan for stem in stems}  # museval refuses; it would leave every frame undefined
    win = round(BSSEVAL_FRAME_S * sample_rate)
    refs = np.stack([np.asarray(references[s], dtype=np.float64).T for s in stems])  # (stems, samples, channels)
    ests = np.stack([np.asarray(estimates[s], dtype=np.float64).T for s in stems])
    frames = museval.evaluate(refs, ests, win=win, hop=win)[0]  # SDR, (stems, frames)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "All-NaN slice": no frame defined
        medians = np.nanmedian(frames, axis=1)
    return {stem: float(m) for stem, m in zip(stems, medians)}


def score(
    references: dict[str, np.ndarray], estimates: dict[str, np.ndarray], sample_rate: int, bsseval: bool = True
) -> tuple[dict[str, float], dict[str, float] | None]:
    """(sdr, bsseval_sdr) for each stem of `references` (see :meth:`Track.references`), in
    its order; `estimates` must hold the same stems, each shaped like its reference."""
    for stem, reference in references.items():
        if stem not in estimates:
            raise EvaluationError(f"there is no {stem} estimate to score against the {stem} reference")
        if estimates[stem].shape != reference.shape:
            raise EvaluationError(f"the {stem} estimate is shaped {estimates[stem].shape}, the mixture {reference.shape}")
    sdrs = {stem: sdr(reference, estimates[stem]) for stem, reference in references.items()}
    return sdrs, bsseval_sdr(references, estimates, sample_rate) if bsseval else None


# datasets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Track:
    """One reference track: its mixture file and the MUSDB stem files it has (`sources`, by
    stem), with the audio stream of each in its file (`streams`, by "mixture" or stem; 0
    where absent). A .stem.mp4 is the one file of all five."""

    name: str
    mixture: Path
    sources: dict[str, Path] = field(default_factory=dict)
    streams: dict[str, int] = field(default_factory=dict)

    def load_mixture(self) -> tuple[np.ndarray, int]:
        """(mixture float32 (channels, samples), sample rate)."""
        mixture, info = decode(self.mixture, self.streams.get("mixture", 0))
        return mixture, info.sample_rate

    def check(self, stems: Iterable[str]) -> None:
        """Raise unless the track has the files that the references of scored `stems` need."""
        stems = tuple(stems)
        for source in dict.fromkeys(_source_of(s) for s in stems):
            if source not in self.sources:
                users = [s for s in stems if _source_of(s) == source]
                raise EvaluationError(
                    f"{self.mixture.parent}: has a mixture but no {source}.wav, which scoring the "
                    f"{' and '.join(users)} estimate{'s' * (len(users) > 1)} needs"
                )

    def references(self, stems: Iterable[str], mixture: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
        """The float64 (channels, samples) reference of each scored stem, in order: the MUSDB
        stem's file, or for the instrumental mixture - vocals. Only the files needed are read."""
        stems = tuple(stems)
        self.check(stems)
        mixture = np.asarray(mixture, dtype=np.float64)
        loaded: dict[str, np.ndarray] = {}
        for source in dict.fromkeys(_source_of(s) for s in stems):
            x, info = decode(self.sources[source], self.streams.get(source, 0))
            if (info.sample_rate, x.shape) != (sample_rate, mixture.shape):
                raise EvaluationError(
                    f"{self.name}: the {source} ({info.sample_rate} Hz, {x.shape[0]} ch, {x.shape[1]} samples) do not match "
                    f"the mixture ({sample_rate} Hz, {mixture.shape[0]} ch, {mixture.shape[1]} samples)"
                )
            loaded[source] = x.astype(np.float64)
        return {stem: mixture - loaded["vocals"] if stem == "instrumental" else loaded[stem] for stem in stems}


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
            sources = {stem: path for stem in MUSDB_STEMS if (path := _audio_file(entry, stem)) is not None}
            tracks.append(Track(entry.name, mixture, sources))
        elif entry.name.endswith(".stem.mp4") and entry.is_file():
            tracks.append(Track(entry.name.removesuffix(".stem.mp4"), entry, dict.fromkeys(MUSDB_STEMS, entry), MUSDB_STREAMS))
    return tracks


def find_tracks(dataset: str | Path, split: str = "test") -> list[Track]:
    """The tracks of a MUSDB18-HQ or MUSDB18 dataset, sorted by name.

    MUSDB18-HQ: a folder per track holding `mixture.wav` and the stems' `vocals.wav`,
    `drums.wav`, `bass.wav`, `other.wav` (`.flac` accepted; only the stems scored are needed,
    which :func:`evaluate` checks). MUSDB18: `<track>.stem.mp4` files. Both datasets keep
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
        hint = f" (it has {', '.join(s + '/' for s in splits)}; choose one of them as the split)" if splits else ""
        raise EvaluationError(f"no MUSDB18-HQ track folders (with a mixture.wav) or MUSDB18 .stem.mp4 files{hint}", file=str(folder))
    names = [t.name for t in tracks]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise EvaluationError(f"track {twice[0]!r} is there both as a folder and as a .stem.mp4 file", file=str(folder))
    return tracks


# estimates --------------------------------------------------------------------------------

# Given a track's mixture (channels, samples) at its rate, return float (channels, samples)
# arrays by stem name: the names of STEMS, or names that reference_stems maps to them. An
# estimator may have a `stem_map` attribute, {name it returns: scored stem} in its order,
# known before any track: evaluate() then checks the stems and the dataset before the first
# estimate (a model's stems are known when it is loaded; files are only found track by track).
# It may also have `summed` and `left_out` (see MusdbMapping), which the results record.
Estimator = Callable[[Track, np.ndarray, int], dict[str, np.ndarray]]


@dataclass
class SeparatorEstimates:
    """Estimator: a :class:`stemsep.separator.Separator` (or anything with its interface, an
    ensemble) run on each mixture, with `overlap` and `tta` (see its `separate_array`); its
    stems scored as :func:`musdb_mapping` says (the stems summed into MUSDB's other are added
    up in float64 and returned under the name of the model's own `other`)."""

    separator: Any
    overlap: int | None = None
    tta: bool = False
    stem_map: dict[str, str] = field(init=False)
    summed: dict[str, tuple[str, ...]] = field(init=False)
    left_out: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        # A single-target model's complement (mixture - target) is the instrumental of a vocals
        # target, and the vocals of an instrumental one, whatever the model calls it.
        layout = getattr(self.separator, "layout", None)
        predicted, complement = getattr(layout, "predicted", ()), getattr(layout, "complement", None)
        known = {}
        if complement and len(predicted) == 1 and reference_stem(predicted[0]) in COMPLEMENTS:
            known[complement] = COMPLEMENTS[reference_stem(predicted[0])]
        mapping = musdb_mapping(self.separator.stems, known)
        self.stem_map, self.summed, self.left_out = mapping.stem_map, mapping.summed, mapping.left_out

    def __call__(self, track: Track, mixture: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
        needed = [*self.stem_map, *(name for parts in self.summed.values() for name in parts[1:])]
        stems = self.separator.separate_array(mixture, sample_rate, overlap=self.overlap, tta=self.tta, stems=needed)
        for parts in self.summed.values():
            stems[parts[0]] = sum((stems.pop(name).astype(np.float64) for name in parts[1:]), stems[parts[0]].astype(np.float64))
        return stems


def separator_estimates(separator: Any, overlap: int | None = None, tta: bool = False) -> SeparatorEstimates:
    """Estimates from a :class:`stemsep.separator.Separator` run on each mixture; a model stem
    with no MUSDB reference is refused here, before any track is separated."""
    return SeparatorEstimates(separator, overlap, tta)


def _stem_matches(base: str, stem: str) -> bool:
    """`base` (lower case, no suffix) names `stem`: `vocals`, `x_vocals`, `x_(vocals)_model`;
    not a practice track, `x_no_vocals` (the mix without that stem)."""
    return any(base == a or (base.endswith(f"_{a}") and not base.endswith(f"_{PRACTICE_PREFIX}{a}")) or f"_({a})" in base
               for a in STEM_ALIASES[stem])


def find_estimates(directory: str | Path, track: str) -> dict[str, Path]:
    """The estimate files of `track` in `directory` (case-insensitive names, .wav or .flac),
    for each of STEMS (vocals, instrumental or accompaniment, drums, bass, other):

    - `directory/<track>/vocals.wav`, `instrumental.wav`, `drums.wav`, ..., also any
      `<anything>_vocals.wav` or audio-separator's `<anything>_(Vocals)_<model>.wav` in there;
    - `directory/<track>_vocals.wav` (stemsep separate's names) or
      `directory/<track>_(Vocals)_<model>.wav` (audio-separator's).

    Returns the stems found, in STEMS order; a stem matched by several files is an error.
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
            raise EvaluationError(f"several {stem} estimates for {track!r} ({names}); keep one", file=str(directory))
        if paths:
            found[stem] = paths[0]
    return found


def load_estimate(path: Path, reference: np.ndarray, sample_rate: int) -> np.ndarray:
    """An estimate file as float32 (channels, samples); it must match the reference's rate,
    channel count and length exactly (nothing is resampled, padded or cut)."""
    x, info = decode(path)
    ref_channels, ref_samples = reference.shape
    if info.sample_rate != sample_rate:
        raise EvaluationError(f"is {info.sample_rate} Hz but the reference is {sample_rate} Hz; resample it first", file=str(path))
    if x.shape[0] != ref_channels:
        raise EvaluationError(f"has {x.shape[0]} channels but the reference has {ref_channels}", file=str(path))
    if x.shape[1] != ref_samples:
        raise EvaluationError(
            f"{path}: has {x.shape[1]} samples but the reference has {ref_samples}; estimates must have the mixture's length"
        )
    return x


def file_estimates(directory: str | Path) -> Estimator:
    """Estimates read from stem files (see :func:`find_estimates`), in STEMS order. Of vocals
    and instrumental, one found without the other brings the other along, derived from it and
    the reference mixture: instrumental = mixture - vocals, and back."""
    directory = Path(directory)
    if not directory.is_dir():
        raise EvaluationError(f"estimates folder {directory} does not exist")

    def estimate(track: Track, mixture: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
        paths = find_estimates(directory, track.name)
        if not paths:
            raise EvaluationError(f"no {', '.join(STEMS)} estimate for {track.name!r}", file=str(directory))
        stems = {stem: load_estimate(path, mixture, sample_rate).astype(np.float64) for stem, path in paths.items()}
        for stem, other in COMPLEMENTS.items():
            if stem not in stems and other in stems:
                stems[stem] = mixture.astype(np.float64) - stems[other]
        return {stem: stems[stem] for stem in STEMS if stem in stems}

    return estimate


# results ----------------------------------------------------------------------------------


@dataclass
class TrackScore:
    """One track's figures (dB per scored stem; bsseval_sdr is None when it was not computed)."""

    name: str
    duration: float  # seconds
    sdr: dict[str, float]
    bsseval_sdr: dict[str, float] | None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def stems(self) -> tuple[str, ...]:
        return tuple(self.sdr)

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


def stems_of(scores: Iterable[TrackScore]) -> tuple[str, ...]:
    """The stems scored in `scores`, in the order they first appear (every track of a run has
    the same ones)."""
    return tuple(dict.fromkeys(stem for s in scores for stem in s.sdr))


def summarize(scores: Iterable[TrackScore]) -> dict[str, Any]:
    """Median and mean over tracks of each figure and stem (NaN tracks left out; NaN if none)."""
    scores = list(scores)
    stems = stems_of(scores)
    summary: dict[str, Any] = {"tracks": len(scores)}
    for metric in ("sdr", "bsseval_sdr"):
        per_stem: dict[str, list[float]] = {stem: [] for stem in stems}
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

    The file must be of this JSON_FORMAT and have been written with the same settings (device
    and batch size aside): mixing figures from different settings in one file would make its
    summary meaningless.
    """
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        stored, written_format = data["settings"], data["format"]
        tracks = [TrackScore.from_json(t) for t in data["tracks"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EvaluationError(f"is not a stemsep eval results file ({exc}); choose another results file", file=str(path)) from None
    if written_format != JSON_FORMAT:
        raise EvaluationError(
            f"{path}: holds results in format {written_format!r}, and this stemsep resumes format {JSON_FORMAT} only; "
            "choose another results file or delete it"
        )
    wanted, had = _comparable(settings), _comparable(stored)
    if wanted != had:
        diff = ", ".join(f"{k}: {had.get(k, 'unset')!r} there, {wanted.get(k, 'unset')!r} now"
                         for k in sorted(wanted.keys() | had.keys()) if wanted.get(k) != had.get(k))
        raise EvaluationError(f"holds results for other settings ({diff}); choose another results file or delete it", file=str(path))
    return {t.name: t for t in tracks}


def write_results(path: str | Path, scores: Iterable[TrackScore], settings: dict[str, Any]) -> None:
    """Write all `scores` and their summary to `path` atomically (temporary file, then rename)."""
    path = Path(path)
    scores = sorted(scores, key=lambda s: s.name)
    data = {
        "format": JSON_FORMAT,
        "settings": settings,
        "stems": list(stems_of(scores)),
        "summary": _summary_json(summarize(scores)),
        "tracks": [s.to_json() for s in scores],
    }
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    with atomic_file(path) as f:
        f.write(text.encode())


# the loop ---------------------------------------------------------------------------------

# Called after each track with its score, whether it was read back from the results file
# (True) or scored now (False), its position (1-based) and the number of tracks.
TrackCallback = Callable[[TrackScore, bool, int, int], None]


@dataclass
class Report:
    scores: list[TrackScore]  # the tracks asked for, in order
    resumed: int  # how many of them were read back from the results file
    summary: dict[str, Any]  # summarize(scores)
    stems: tuple[str, ...] = ()  # the scored stems, in the estimator's order


def _named_estimates(raw: dict[str, np.ndarray], stem_map: dict[str, str] | None) -> dict[str, np.ndarray]:
    """An estimator's output keyed by scored stem, in its order."""
    names = stem_map if stem_map is not None else reference_stems(raw)
    missing = [name for name in names if name not in raw]
    if missing:
        raise EvaluationError(f"the estimates lack the {missing[0]!r} stem that the estimator announced")
    return {stem: raw[name] for name, stem in names.items()}


def evaluate(
    tracks: list[Track],
    estimator: Estimator,
    settings: dict[str, Any] | None = None,
    results_path: str | Path | None = None,
    bsseval: bool = True,
    on_track: TrackCallback | None = None,
) -> Report:
    """Score each track's estimates; with `results_path`, skip the tracks already in that
    file and rewrite it after each new one (tracks it holds beyond `tracks` are kept).

    Every track is scored on the same stems: the estimator's `stem_map` if it has one (then a
    stem with no reference, a results file of other stems, or a track lacking a reference file
    is refused before the first estimate), else those of the first track. The settings
    recorded with the results add the estimator's `summed` and `left_out` stems, if any.
    """
    settings = {**(settings or {}), "bsseval": bsseval}
    for key in ("summed", "left_out"):
        value = getattr(estimator, key, None)
        if value:
            settings[key] = {stem: list(parts) for stem, parts in value.items()} if isinstance(value, Mapping) else list(value)
    if results_path and not Path(results_path).parent.is_dir():
        raise EvaluationError(f"results folder {Path(results_path).parent} does not exist")
    done = read_results(results_path, settings) if results_path else {}
    stem_map = getattr(estimator, "stem_map", None)
    stems: tuple[str, ...] | None = tuple(stem_map.values()) if stem_map is not None else None
    resuming = bool(done)
    if done:
        had = stems_of(done.values())
        if stems is not None and set(had) != set(stems):
            raise EvaluationError(
                f"{results_path}: holds scores of {', '.join(had)}, not of {', '.join(stems)}; "
                "choose another results file or delete it"
            )
        stems = stems or had
    if stem_map is not None:
        for track in tracks:
            if track.name not in done:
                track.check(stems)
    scores, resumed = [], 0
    for i, track in enumerate(tracks, 1):
        result = done.get(track.name)
        was_resumed = result is not None
        if was_resumed:
            resumed += 1
        else:
            mixture, sample_rate = track.load_mixture()
            estimates = _named_estimates(estimator(track, mixture, sample_rate), stem_map)
            if stems is None:
                stems = tuple(estimates)
            elif set(estimates) != set(stems):
                where = f"the tracks in {results_path}" if resuming else "the tracks before it"
                raise EvaluationError(
                    f"{track.name}: has estimates of {', '.join(estimates)} where {where} have {', '.join(stems)}; "
                    "every track must be scored on the same stems"
                )
            references = track.references(stems, mixture, sample_rate)
            sdrs, bss = score(references, estimates, sample_rate, bsseval)
            result = TrackScore(track.name, mixture.shape[1] / sample_rate, sdrs, bss, settings)
            done[track.name] = result
            if results_path:
                write_results(results_path, done.values(), settings)
        scores.append(result)
        if on_track:
            on_track(result, was_resumed, i, len(tracks))
    return Report(scores, resumed, summarize(scores), stems or ())
