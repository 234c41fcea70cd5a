"""Errors and warnings a user can act on.

Every exception stemsep raises on purpose derives from :class:`StemsepError`, and its
``str()`` is one sentence that names the file or value at fault and the problem. The file,
where there is one, is also the exception's ``file`` field (its display name), so callers
never parse messages. The library raises them; the edges (CLI, Cog predictor) print them
once, without a traceback. Messages name options by meaning ("bit depth 32"), not by any
one front end's spelling of them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable


class StemsepError(Exception):
    """A problem with the user's input, files or environment, described in one sentence.

    ``StemsepError("is empty (0 bytes)", file="song.wav")`` reads "song.wav: is empty (0 bytes)".
    """

    def __init__(self, message: str, *, file: str | None = None):
        super().__init__(f"{file}: {message}" if file else message)
        self.message, self.file = message, file


class ConfigError(StemsepError):
    """A model config file is missing, unreadable or lacks a required key."""


class CheckpointError(StemsepError):
    """A checkpoint is missing, corrupt, not a state dict, or does not fit the config."""


class WeightsDownloadError(StemsepError):
    """The model weights could not be fetched or failed their checksum."""


class AudioDecodeError(StemsepError):
    """An input is not audio we can read: missing, not audio, truncated, empty, or unusable."""


class NotAudioError(AudioDecodeError):
    """A file holds no audio at all (a text file, an image, a PDF...), as opposed to audio
    that is damaged or cannot be used."""


class AudioEncodeError(StemsepError):
    """A stem could not be written: bad format/bit-depth choice or an unwritable destination."""


class RemoteError(StemsepError):
    """A call to the Replicate API could not be made or failed."""


class EvaluationError(StemsepError):
    """A dataset, estimate or results file cannot be used for evaluation."""


class ClippingWarning(UserWarning):
    """A stem exceeded the integer range of the chosen bit depth and was clipped; ``file``
    names the stem's file."""

    def __init__(self, message: str, *, file: str | None = None):
        super().__init__(f"{file}: {message}" if file else message)
        self.message, self.file = message, file


def report_warnings(write: Callable[[str], None]) -> None:
    """From now on, hand each warning (but deprecations) to `write` as one line, "warning:
    <message>", when it is raised and in the thread that raised it: every time, not once
    per place as by default, so each song's clipping is reported, and warnings of the
    background compiler (:mod:`stemsep.compilation`) too. For the edges (CLI, Cog runner),
    which own their process's warning settings."""
    warnings.simplefilter("always")
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", FutureWarning)
    warnings.showwarning = lambda message, *args, **kwargs: write(f"warning: {message}")
