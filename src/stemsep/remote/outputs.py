"""What a prediction gives back: when it has ended, and which output URL is which stem.

The Cog model (predict.py) returns one file per stem, ``<song>_<stem>.<ext>``, in the
chosen model's stem order (only the stems asked for, when the ``stems`` input names some).
On Replicate the list arrives in upload-completion order, so a stem is told by its file
name, by one rule (mirrored in ``clients/typescript/src/outputs.ts``):

1. When the stems that can come back are known, the stem is the longest known one that
   the file name ends with as ``_<stem>.<ext>``. They are known when the prediction's
   ``model`` input (default: the catalogue's default model) names a catalogue model: its
   stems, and ``no_<stem>`` for each (stem names may hold underscores: ``lead_vocals``,
   ``no_guitar``).
2. Otherwise a name ending in ``_no_<x>.<ext>`` is stem ``no_<x>``, and any other the text
   after its last underscore.
3. Outputs that carry no file name (data URLs, from a Cog server without an upload URL)
   take the order the model documents: of the catalogue model's stems and then its
   ``no_<stem>`` practice tracks, in the model's stem order, those the ``stems`` input asks
   for (:func:`stemsep.stems.stem_choices`, the order predict.py returns them in). When that
   is not known either, the output is refused with one sentence.
"""

from __future__ import annotations

import mimetypes
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from stemsep import catalogue
from stemsep.errors import RemoteError
from stemsep.stems import PRACTICE_PREFIX, stem_choices

# Statuses after which a prediction never changes again ("aborted": Replicate's, newer than
# the Python SDK's list). Mirrored in clients/typescript/src/outputs.ts.
TERMINAL_STATUSES = ("succeeded", "failed", "canceled", "aborted")

STEM_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")  # what a stem may be called: also part of a file name
_NAME_PART = re.compile(r"[a-z0-9-]+")  # one underscore-free part of a stem name, by rule 2
_FILE = re.compile(r"(?P<base>.+)\.[A-Za-z0-9]{1,8}")  # <base>.<ext>


def is_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://", "data:"))


# what the model says it returns ---------------------------------------------------------


def model_stems(inputs: Mapping[str, Any] | None = None) -> tuple[str, ...] | None:
    """The stems of the catalogue model that the prediction's ``model`` input names (the
    catalogue's default when it names none), in the model's order; None for a name the
    catalogue does not know."""
    name = (inputs or {}).get("model") or catalogue.DEFAULT
    return catalogue.MODELS[name].stems if isinstance(name, str) and name in catalogue.MODELS else None


def expected_stems(inputs: Mapping[str, Any] | None = None) -> tuple[str, ...] | None:
    """The stems the prediction returns, in the order the model documents: the model's
    stems, or when the comma-separated ``stems`` input names any (as predict.py reads it),
    those of :func:`known_stems` it names, in that order; None when the model is not in the
    catalogue."""
    stems = model_stems(inputs)
    chosen = (inputs or {}).get("stems")
    if stems is None or not isinstance(chosen, str) or not chosen.strip():
        return stems
    wanted = {s.strip() for s in chosen.split(",")}
    return tuple(s for s in stem_choices(stems) if s in wanted)


def known_stems(inputs: Mapping[str, Any] | None = None) -> tuple[str, ...] | None:
    """Every stem name the prediction's outputs can carry, in the order they come: the
    model's stems, then ``no_<stem>`` for each; None when the model is not in the catalogue."""
    stems = model_stems(inputs)
    return None if stems is None else stem_choices(stems)


# the naming rule ----------------------------------------------------------------------------


def file_stem(file_name: str, known: Iterable[str] | None = None) -> str | None:
    """The stem an output file ``<song>_<stem>.<ext>`` holds (see the module's rule): the
    longest of `known` it ends with, else ``no_<x>`` or the part after the last underscore;
    None for a name of another shape (``vocals.wav`` names no song)."""
    match = _FILE.fullmatch(file_name)
    if match is None:
        return None
    base = match["base"].lower()
    for stem in sorted(known or (), key=len, reverse=True):
        if len(base) > len(stem) + 1 and base.endswith(f"_{stem}"):
            return stem
    head, _, last = base.rpartition("_")
    if not head or not _NAME_PART.fullmatch(last):
        return None
    if base.endswith(f"_{PRACTICE_PREFIX}{last}") and len(head) > len(PRACTICE_PREFIX):  # <song>_no_<x>
        return PRACTICE_PREFIX + last
    return last


def url_stem(url: str, known: Iterable[str] | None = None) -> str | None:
    """:func:`file_stem` of an output URL's file name (``https://.../my%20song_no_guitar.wav?sig=1``
    is ``no_guitar``); None for a data URL, which carries no name."""
    if url.startswith("data:"):
        return None
    return file_stem(unquote(urlparse(url).path).rsplit("/", 1)[-1], known)


def stem_urls(output: Any, inputs: Mapping[str, Any] | None = None) -> dict[str, str]:
    """A prediction's output as ``{stem: url}``, for any model and any choice of stems.

    `inputs` are the prediction's inputs (``model`` and ``stems`` tell which stems can come
    back, see the module's rule). A list of URLs is mapped by file name; only when the names
    do not tell every output apart (data URLs) does the model's documented order decide.
    The result follows the documented order where it is known, else the output's order. A
    ``{stem: url}`` mapping is taken as it is. Anything else raises :class:`RemoteError`.
    """
    if isinstance(output, Mapping):
        urls = {str(stem): url for stem, url in output.items()}
        if not urls or not all(STEM_NAME.fullmatch(stem) for stem in urls):
            raise RemoteError(f"the prediction's output is not a mapping of stem names to URLs but {_short(output)}")
    elif not isinstance(output, (list, tuple)) or not output:
        raise RemoteError(f"the prediction's output is not a list of stem URLs but {_short(output)}")
    if not all(is_url(url) for url in (urls.values() if isinstance(output, Mapping) else output)):
        raise RemoteError(f"the prediction's output holds something other than URLs: {_short(output)}")
    return urls if isinstance(output, Mapping) else _by_name(list(output), inputs)


def _by_name(output: list[str], inputs: Mapping[str, Any] | None) -> dict[str, str]:
    order = expected_stems(inputs)
    known = known_stems(inputs)
    names = [url_stem(url, known) for url in output]
    if None not in names and len(set(names)) == len(names):
        rank = {stem: i for i, stem in enumerate(order or ())}
        pairs = sorted(zip(names, output), key=lambda pair: rank.get(pair[0], len(rank)))  # stable: output order
        return dict(pairs)
    if order is not None and len(order) == len(output):
        return dict(zip(order, output))
    model = (inputs or {}).get("model") or catalogue.DEFAULT
    reason = (f"model {model!r} is not in the catalogue, so its stem order is unknown" if order is None
              else f"model {model!r} documents {len(order)} of them, not {len(output)}")
    raise RemoteError(f"cannot tell which stem each of the prediction's {len(output)} outputs is: "
                      f"their file names do not say and {reason}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def url_extension(url: str) -> str:
    """`wav` for `https://.../vocals.wav` or `data:audio/wav;base64,...`; `bin` when unknown."""
    if url.startswith("data:"):
        mime = url[5:].split(",", 1)[0].split(";", 1)[0].lower()
        known = {"audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/vnd.wave": "wav",
                 "audio/flac": "flac", "audio/x-flac": "flac", "audio/mpeg": "mp3", "audio/ogg": "ogg"}
        ext = known.get(mime) or (mimetypes.guess_extension(mime) or "").lstrip(".")
    else:
        ext = Path(unquote(urlparse(url).path)).suffix.lstrip(".").lower()
    return ext if re.fullmatch(r"[a-z0-9]{1,8}", ext or "") else "bin"
