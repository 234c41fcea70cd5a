"""stemsep: split songs into stems with BS-RoFormer and MelBand-RoFormer models (default: viperx 1297)."""

from stemsep.errors import (
    AudioDecodeError,
    AudioEncodeError,
    CheckpointError,
    ClippingWarning,
    ConfigError,
    NotAudioError,
    RemoteError,
    StemsepError,
    WeightsDownloadError,
)

__all__ = [
    "Separator",
    "Ensemble",
    "AudioDecodeError",
    "AudioEncodeError",
    "CheckpointError",
    "ClippingWarning",
    "ConfigError",
    "NotAudioError",
    "RemoteError",
    "StemsepError",
    "WeightsDownloadError",
]


def __getattr__(name: str):
    # The Separator pulls in torch; importing it lazily keeps `import stemsep` (and commands
    # such as `stemsep weights verify`) light.
    if name in ("Separator", "Ensemble"):
        from stemsep import separator

        return getattr(separator, name)
    raise AttributeError(f"module 'stemsep' has no attribute {name!r}")
