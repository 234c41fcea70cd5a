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
    "AudioDecodeError",
    "AudioEncodeError",
    "CheckpointError",
    "ConfigError",
    "RemoteError",
    "StemsepError",
    "WeightsDownloadError",
]
