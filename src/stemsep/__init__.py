"""stemsep: split a song into vocals and instrumental with BS-RoFormer (viperx 1297)."""

from stemsep.errors import (
    AudioDecodeError,
    AudioEncodeError,
    CheckpointError,
    ConfigError,
    RemoteError,
    StemsepError,
    WeightsDownloadError,
)

__all__ = [
    "Separator",
    "AudioDecodeError",
    "AudioEncodeError",
    "CheckpointError",
    "ConfigError",
    "RemoteError",
    "StemsepError",
    "WeightsDownloadError",
]


def __getattr__(name: str):
    # The Separator pulls in torch; importing it lazily keeps `import stemsep` (and commands
    # such as `stemsep weights verify`) light.
    if name == "Separator":
        from stemsep.separator import Separator

        return Separator
    raise AttributeError(f"module 'stemsep' has no attribute {name!r}")
