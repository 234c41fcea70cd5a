"""Errors a user can act on.

Every exception stemsep raises on purpose derives from :class:`StemsepError`, and its
``str()`` is one sentence that names the file or value at fault and the problem. The
library raises them; the edges (CLI, Cog predictor) print them once, without a traceback.
"""


class StemsepError(Exception):
    """A problem with the user's input, files or environment, described in one sentence."""


class ConfigError(StemsepError):
    """A model config file is missing, unreadable or lacks a required key."""


class CheckpointError(StemsepError):
    """A checkpoint is missing, corrupt, not a state dict, or does not fit the config."""


class WeightsDownloadError(StemsepError):
    """The model weights could not be fetched or failed their checksum."""


class AudioDecodeError(StemsepError):
    """An input is not audio we can read: missing, not audio, truncated, empty, or unusable."""


class AudioEncodeError(StemsepError):
    """A stem could not be written: bad format/bit-depth choice or an unwritable destination."""


class RemoteError(StemsepError):
    """A call to the Replicate API could not be made or failed."""
