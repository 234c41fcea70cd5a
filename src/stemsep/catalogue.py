"""The models stemsep knows by name: what each one separates, where its files come from.

The catalogue is one data file in the package, ``models.json``. Each entry names a
checkpoint and its yaml config, each with its sha256 and size in bytes, the published
lists that give them (``sha256_from``, keys of the file's ``sources`` table, each pinned to
a commit or a package version) and download mirrors in the order to try them; the
checkpoint also says in which precision it is published (``dtype``). A config is either
downloaded like the checkpoint or shipped in this package (``configs/``), written from the
published config's values. An entry also gives the model's architecture, the stems a
separation gives, its licence as the author states it (None where none is stated) and
whether it forbids commercial use (``non_commercial``), its provenance and whether that is
disputed (``provenance_disputed``), and published quality figures with their sources.
Every downloaded file's checksum comes from a published list; nothing is trusted on first
use. Downloading and
checking the files is :mod:`stemsep.weights`' job; this module only reads the catalogue
and finds a model's files on disk.

>>> get("1297").checkpoint.name
'model_bs_roformer_ep_317_sdr_12.9755.ckpt'
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from stemsep.errors import StemsepError

DATA_FILE = "models.json"
CONFIGS_FOLDER = "configs"  # the configs shipped in the package
ARCHITECTURES = {"bs_roformer": "BS-RoFormer", "mel_band_roformer": "MelBand-RoFormer"}
DTYPES = {"fp32": 4, "fp16": 2}  # a published checkpoint's precision: bytes per parameter
MULTISONG = "multisong"  # a source's `metric` when its figures are SDR on MVSEP's Multisong dataset
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CatalogueError(StemsepError):
    """A model name is unknown, or a catalogue file is malformed."""


class ModelNotDownloadedError(StemsepError):
    """A known model's files are not in the weights folder."""


@dataclass(frozen=True)
class Published:
    """Where a file's sha256 (and size) are published: a key of :data:`SOURCES` and the
    file's entry in that list (None where the list has one file per model)."""

    source: str
    entry: str | None = None


@dataclass(frozen=True)
class WeightFile:
    """One file of a model: its name on disk, sha256, size in bytes (None where no source
    records it), the mirrors to try in order, the lists that publish its sha256, the
    precision a checkpoint is published in (None for a config), and whether it ships in
    the package (no mirrors) instead of being downloaded."""

    name: str
    sha256: str
    size: int | None
    urls: tuple[str, ...]
    sha256_from: tuple[Published, ...] = ()
    dtype: str | None = None
    shipped: bool = False


@dataclass(frozen=True)
class Score:
    """A published quality figure: SDR in dB of one stem, the number of tracks it is a
    median over (None where the source does not say), where it was published (a key of
    :data:`SOURCES`), the source's own name for the entry, and a link to the entry where
    the source gives one (MVSEP's quality checker)."""

    stem: str
    sdr: float
    tracks: int | None
    source: str
    entry: str | None = None
    link: str | None = None

    @property
    def multisong(self) -> bool:
        """Whether this is SDR on MVSEP's Multisong dataset (comparable across models)."""
        return SOURCES.get(self.source, {}).get("metric") == MULTISONG


@dataclass(frozen=True)
class Model:
    """A catalogue entry."""

    name: str
    title: str
    architecture: str  # a key of ARCHITECTURES
    stems: tuple[str, ...]  # what a separation gives, in order
    checkpoint: WeightFile
    config: WeightFile
    licence: str | None
    scores: tuple[Score, ...]
    notes: str | None = None
    provenance: str | None = None
    non_commercial: bool = False  # the stated licence forbids commercial use
    provenance_disputed: bool = False  # reported to derive from someone else's product

    @property
    def servable(self) -> bool:
        """Whether the model may be served publicly: its stated licence allows commercial use
        and its provenance is not disputed."""
        return not (self.non_commercial or self.provenance_disputed)

    @property
    def files(self) -> tuple[WeightFile, ...]:
        """The files to download, in order: the checkpoint, then the config unless it ships
        in the package."""
        return (self.checkpoint,) if self.config.shipped else (self.checkpoint, self.config)

    @property
    def size(self) -> int:
        """Bytes to download (the files whose size is known)."""
        return sum(f.size or 0 for f in self.files)

    def paths(self, folder: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Where the checkpoint and the config live (present or not): in `folder`, or the
        config in the package where it ships there."""
        folder = Path(folder)
        config = shipped_config(self.config.name) if self.config.shipped else folder / self.config.name
        return folder / self.checkpoint.name, config

    def best_scores(self) -> dict[str, Score]:
        """The highest Multisong figure per stem this model has."""
        best: dict[str, Score] = {}
        for score in self.scores:
            if score.multisong and (score.stem not in best or score.sdr > best[score.stem].sdr):
                best[score.stem] = score
        return best


def shipped_config(name: str) -> Path:
    """The path of a config that ships in the package."""
    return Path(str(resources.files("stemsep").joinpath(CONFIGS_FOLDER, name)))


# reading the data file ------------------------------------------------------------------------


Catalogue = tuple[dict[str, Model], str, dict[str, dict[str, Any]], dict[str, str]]


def load(path: str | os.PathLike[str] | None = None) -> Catalogue:
    """Read and check a catalogue file (default: the one in the package).

    Returns the models by name (in file order), the default model's name, the sources
    table, and the models left out on purpose (name -> why). Raises
    :class:`CatalogueError` naming the first problem.
    """
    where = str(path) if path is not None else f"stemsep/{DATA_FILE}"
    try:
        if path is None:
            text = resources.files("stemsep").joinpath(DATA_FILE).read_text(encoding="utf-8")
        else:
            text = Path(path).read_text(encoding="utf-8")
        raw = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CatalogueError(f"cannot read the model catalogue ({type(exc).__name__})", file=where) from None
    try:
        return _parse(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise CatalogueError(f"malformed model catalogue: {exc}", file=where) from None


def _parse(raw: Mapping[str, Any]) -> Catalogue:
    sources = dict(raw["sources"])
    models: dict[str, Model] = {}
    by_file: dict[str, WeightFile] = {}
    for entry in raw["models"]:
        name = entry["name"]
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", name):
            raise ValueError(f"model name {name!r} should be lower-case letters, digits, dots and dashes")
        if name in models:
            raise ValueError(f"model {name!r} is listed twice")
        if entry["architecture"] not in ARCHITECTURES:
            raise ValueError(f"model {name!r}: unknown architecture {entry['architecture']!r}")
        files = []
        for role in ("checkpoint", "config"):
            wf = _file(entry[role], f"model {name!r} {role}", sources)
            seen = by_file.setdefault(wf.name, wf)
            if seen != wf:
                raise ValueError(f"model {name!r}: file {wf.name} is listed twice with different contents")
            files.append(wf)
        checkpoint, config = files
        if checkpoint.size is None:
            raise ValueError(f"model {name!r}: the checkpoint has no size")
        if checkpoint.shipped:
            raise ValueError(f"model {name!r}: a checkpoint cannot ship in the package")
        if checkpoint.dtype not in DTYPES:
            raise ValueError(f"model {name!r}: the checkpoint's dtype should be one of {', '.join(DTYPES)}")
        scores = tuple(
            Score(s["stem"], float(s["sdr"]), s.get("tracks"), s["source"], s.get("entry"), s.get("link"))
            for s in entry.get("scores", ())
        )
        for score in scores:
            if score.source not in sources:
                raise ValueError(f"model {name!r}: score source {score.source!r} is not in 'sources'")
        stems = tuple(entry["stems"])
        if not stems or not all(isinstance(s, str) and s for s in stems):
            raise ValueError(f"model {name!r}: 'stems' should be a list of names")
        flags = {key: entry.get(key, False) for key in ("non_commercial", "provenance_disputed")}
        for key, value in flags.items():
            if value is not True and value is not False:
                raise ValueError(f"model {name!r}: {key!r} should be true or false")
        models[name] = Model(
            name=name, title=entry["title"], architecture=entry["architecture"], stems=stems,
            checkpoint=checkpoint, config=config, licence=entry.get("licence"), scores=scores,
            notes=entry.get("notes"), provenance=entry.get("provenance"), **flags,
        )
    default = raw["default"]
    if default not in models:
        raise ValueError(f"the default model {default!r} is not listed")
    left_out = {e["name"]: f"{e['title']}: {e['reason']}" for e in raw.get("left_out", ())}
    if set(left_out) & set(models):
        raise ValueError(f"model {sorted(set(left_out) & set(models))[0]!r} is both listed and left out")
    return models, default, sources, left_out


def _file(raw: Mapping[str, Any], what: str, sources: Mapping[str, Any]) -> WeightFile:
    name, sha256, size = raw["name"], raw["sha256"], raw["size"]
    shipped = raw.get("shipped", False)
    urls = tuple(raw.get("urls", ()))
    if not isinstance(name, str) or Path(name).name != name or name.startswith(".") or name in ("", ".."):
        raise ValueError(f"{what}: {name!r} is not a plain file name")
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise ValueError(f"{what}: sha256 should be 64 lower-case hex digits")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise ValueError(f"{what}: size should be a positive number of bytes or null")
    if shipped is not True and shipped is not False:
        raise ValueError(f"{what}: 'shipped' should be true or false")
    if shipped and urls:
        raise ValueError(f"{what}: a file shipped in the package has no urls")
    if not shipped and (not urls or not all(isinstance(u, str) and u.startswith(("https://", "http://")) for u in urls)):
        raise ValueError(f"{what}: urls should be a non-empty list of http(s) addresses")
    published = tuple(Published(p["source"], p.get("entry")) for p in raw["sha256_from"])
    if not published:
        raise ValueError(f"{what}: sha256_from should name at least one source")
    for p in published:
        if p.source not in sources:
            raise ValueError(f"{what}: checksum source {p.source!r} is not in 'sources'")
    if not shipped and not any(sources[p.source].get("checksums") for p in published):
        raise ValueError(f"{what}: no source in sha256_from is a published checksum list")
    return WeightFile(name, sha256, size, urls, published, raw.get("dtype"), shipped)


MODELS, DEFAULT, SOURCES, LEFT_OUT = load()


# looking models up ----------------------------------------------------------------------------


def names() -> list[str]:
    """The known model names, in catalogue order."""
    return list(MODELS)


def get(name: str | Model) -> Model:
    """The catalogue entry called `name` (a :class:`Model` is returned as it is); an unknown
    name raises :class:`CatalogueError` listing the known ones."""
    if isinstance(name, Model):
        return name
    if name in LEFT_OUT:
        raise CatalogueError(f"model {name!r} is left out of the catalogue: {LEFT_OUT[name]}")
    try:
        return MODELS[name]
    except KeyError:
        raise CatalogueError(f"unknown model {name!r}; the known models are {', '.join(MODELS)}") from None


def with_stem(stem: str) -> list[Model]:
    """The models whose separation gives `stem`, in catalogue order."""
    return [m for m in MODELS.values() if stem in m.stems]


def best_per_stem(models: list[Model] | None = None) -> dict[str, tuple[Model, Score]]:
    """For each stem with a published Multisong figure, the model of `models` (default: all)
    with the highest one, and that figure; stems in order of first appearance."""
    best: dict[str, tuple[Model, Score]] = {}
    for model in MODELS.values() if models is None else models:
        for stem, score in model.best_scores().items():
            if stem not in best or score.sdr > best[stem][1].sdr:
                best[stem] = (model, score)
    return best


def download_hint(name: str, again: bool = False) -> str:
    """How to get a model's files, for messages."""
    return f"download it {'again' if again else 'first'} (stemsep models download {name})"


def is_downloaded(model: str | Model, folder: str | os.PathLike[str] | None = None) -> bool:
    """Whether the files to download are in the weights folder with their catalogue sizes (a
    quick check: no hashing; :func:`stemsep.weights.verify` hashes them)."""
    model = get(model)
    folder = _folder(folder)
    for wf in model.files:
        path = folder / wf.name
        try:
            size = path.stat().st_size
        except OSError:
            return False
        if not path.is_file() or (wf.size is not None and size != wf.size):
            return False
    return True


def model_paths(name: str | Model | None = None, folder: str | os.PathLike[str] | None = None) -> tuple[Path, Path]:
    """The checkpoint and config paths of a downloaded model (default: :data:`DEFAULT`)
    in `folder` (default: :func:`default_dir`).

    Raises :class:`CatalogueError` for an unknown name and :class:`ModelNotDownloadedError`
    when a file is missing, saying how to get it. Only presence is checked here; loading
    the checkpoint checks it fits the config.
    """
    model = get(DEFAULT if name is None else name)
    paths = model.paths(_folder(folder))
    for path in paths:
        if not path.is_file():
            raise ModelNotDownloadedError(f"model {model.name} is not downloaded ({path} is missing): {download_hint(model.name)}")
    return paths


def default_dir() -> Path:
    """The weights folder: ``$STEMSEP_WEIGHTS_DIR`` if set, else ``weights/`` at the
    repository root when running from a checkout (the folder holding ``pyproject.toml``
    above ``src/stemsep/``), else ``weights/`` in the current directory."""
    env = os.environ.get("STEMSEP_WEIGHTS_DIR")
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parents[2]  # src/stemsep/catalogue.py -> repo root
    if (repo_root / "pyproject.toml").is_file():
        return repo_root / "weights"
    return Path.cwd() / "weights"


def _folder(folder: str | os.PathLike[str] | None) -> Path:
    return default_dir() if folder is None else Path(folder)
