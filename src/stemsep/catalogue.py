"""The models stemsep knows by name: what each one separates, where its files come from.

The catalogue is one data file in the package, ``models.json``. Each entry names a
checkpoint and its yaml config, each with its sha256, its size in bytes and download
mirrors in the order to try them, plus the model's architecture, the stems a separation
gives, a licence note where the author states one, and published quality figures with
their sources. Every checkpoint checksum comes from a published file (named under
``sources`` in the data file); nothing is trusted on first use. Downloading and checking
the files is :mod:`stemsep.weights`' job; this module only reads the catalogue and finds
a model's files on disk.

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
ARCHITECTURES = {"bs_roformer": "BS-RoFormer", "mel_band_roformer": "MelBand-RoFormer"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CatalogueError(StemsepError):
    """A model name is unknown, or a catalogue file is malformed."""


class ModelNotDownloadedError(StemsepError):
    """A known model's files are not in the weights folder."""


@dataclass(frozen=True)
class WeightFile:
    """One file of a model: its name on disk, sha256, size in bytes (None where no source
    records it) and the mirrors to try, in order."""

    name: str
    sha256: str
    size: int | None
    urls: tuple[str, ...]


@dataclass(frozen=True)
class Score:
    """A published quality figure: SDR in dB of one stem, the number of tracks it is a
    median over (None where the source does not say), and where it was published (a key of
    :data:`SOURCES`)."""

    stem: str
    sdr: float
    tracks: int | None
    source: str


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

    @property
    def files(self) -> tuple[WeightFile, WeightFile]:
        """The checkpoint and the config, in download order."""
        return self.checkpoint, self.config

    @property
    def size(self) -> int:
        """Bytes to download (the files whose size is known)."""
        return sum(f.size or 0 for f in self.files)

    def paths(self, folder: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Where the checkpoint and the config live in `folder` (present or not)."""
        folder = Path(folder)
        return folder / self.checkpoint.name, folder / self.config.name


# reading the data file ------------------------------------------------------------------------


def load(path: str | os.PathLike[str] | None = None) -> tuple[dict[str, Model], str, dict[str, dict[str, str]]]:
    """Read and check a catalogue file (default: the one in the package).

    Returns the models by name (in file order), the default model's name and the sources
    table. Raises :class:`CatalogueError` naming the first problem.
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


def _parse(raw: Mapping[str, Any]) -> tuple[dict[str, Model], str, dict[str, dict[str, str]]]:
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
        if files[0].size is None:
            raise ValueError(f"model {name!r}: the checkpoint has no size")
        scores = tuple(Score(s["stem"], float(s["sdr"]), s.get("tracks"), s["source"]) for s in entry.get("scores", ()))
        for score in scores:
            if score.source not in sources:
                raise ValueError(f"model {name!r}: score source {score.source!r} is not in 'sources'")
        stems = tuple(entry["stems"])
        if not stems or not all(isinstance(s, str) and s for s in stems):
            raise ValueError(f"model {name!r}: 'stems' should be a list of names")
        models[name] = Model(
            name=name, title=entry["title"], architecture=entry["architecture"], stems=stems,
            checkpoint=files[0], config=files[1], licence=entry.get("licence"), scores=scores, notes=entry.get("notes"),
        )
    default = raw["default"]
    if default not in models:
        raise ValueError(f"the default model {default!r} is not listed")
    return models, default, sources


def _file(raw: Mapping[str, Any], what: str, sources: Mapping[str, Any]) -> WeightFile:
    name, sha256, size, urls = raw["name"], raw["sha256"], raw["size"], tuple(raw["urls"])
    if not isinstance(name, str) or Path(name).name != name or name.startswith(".") or name in ("", ".."):
        raise ValueError(f"{what}: {name!r} is not a plain file name")
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise ValueError(f"{what}: sha256 should be 64 lower-case hex digits")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise ValueError(f"{what}: size should be a positive number of bytes or null")
    if not urls or not all(isinstance(u, str) and u.startswith(("https://", "http://")) for u in urls):
        raise ValueError(f"{what}: urls should be a non-empty list of http(s) addresses")
    if raw["checksum_source"] not in sources:
        raise ValueError(f"{what}: checksum source {raw['checksum_source']!r} is not in 'sources'")
    return WeightFile(name, sha256, size, urls)


MODELS, DEFAULT, SOURCES = load()


# looking models up ----------------------------------------------------------------------------


def names() -> list[str]:
    """The known model names, in catalogue order."""
    return list(MODELS)


def get(name: str | Model) -> Model:
    """The catalogue entry called `name` (a :class:`Model` is returned as it is); an unknown
    name raises :class:`CatalogueError` listing the known ones."""
    if isinstance(name, Model):
        return name
    try:
        return MODELS[name]
    except KeyError:
        raise CatalogueError(f"unknown model {name!r}; the known models are {', '.join(MODELS)}") from None


def download_hint(name: str, again: bool = False) -> str:
    """How to get a model's files, for messages."""
    return f"download it {'again' if again else 'first'} (stemsep models download {name})"


def is_downloaded(model: str | Model, folder: str | os.PathLike[str] | None = None) -> bool:
    """Whether both files are in the weights folder with their catalogue sizes (a quick
    check: no hashing; :func:`stemsep.weights.verify` hashes them)."""
    model = get(model)
    for wf, path in zip(model.files, model.paths(_folder(folder))):
        try:
            size = path.stat().st_size
        except OSError:
            return False
        if not path.is_file() or (wf.size is not None and size != wf.size):
            return False
    return True


def model_paths(name: str | Model | None = None, folder: str | os.PathLike[str] | None = None) -> tuple[Path, Path]:
    """The checkpoint and config paths of a downloaded model (default: :data:`DEFAULT`)
    in `folder` (default: :func:`stemsep.weights.default_dir`).

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


def _folder(folder: str | os.PathLike[str] | None) -> Path:
    if folder is not None:
        return Path(folder)
    from stemsep.weights import default_dir  # weights imports this module

    return default_dir()
