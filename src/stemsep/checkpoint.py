"""Model config and checkpoint loading: yaml -> :class:`Config`, state dict -> :class:`BSRoformer`.

The config is the yaml schema of ZFTurbo's Music-Source-Separation-Training and
audio-separator (sections `audio`, `model`, `training`, `inference`); unknown keys are
tolerated. Checkpoints are plain state dicts read with ``torch.load(weights_only=True)``
and loaded strictly. Every failure is a :class:`ConfigError` or :class:`CheckpointError`
whose message names the file and the problem.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from stemsep.errors import CheckpointError, ConfigError
from stemsep.model import BSRoformer


@dataclass(frozen=True)
class AudioConfig:
    sample_rate: int
    chunk_size: int  # samples per chunk at sample_rate (352800 = 8 s for 1297)
    num_channels: int = 2


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    depth: int
    freqs_per_bands: tuple[int, ...]
    stereo: bool = False
    num_stems: int = 1
    time_transformer_depth: int = 2
    freq_transformer_depth: int = 2
    linear_transformer_depth: int = 0
    dim_head: int = 64
    heads: int = 8
    stft_n_fft: int = 2048
    stft_hop_length: int = 512
    stft_win_length: int = 2048
    stft_normalized: bool = False
    mask_estimator_depth: int = 2
    mlp_expansion_factor: int = 4


@dataclass(frozen=True)
class TrainingConfig:
    instruments: tuple[str, ...]
    target_instrument: str | None = None


@dataclass(frozen=True)
class InferenceConfig:
    num_overlap: int = 4  # windows covering each sample (audio-separator's copy of 1297 says 4)
    batch_size: int = 1


@dataclass(frozen=True)
class Config:
    audio: AudioConfig
    model: ModelConfig
    training: TrainingConfig
    inference: InferenceConfig
    path: Path

    def network_kwargs(self) -> dict[str, Any]:
        """Arguments for :class:`BSRoformer` (the model options it implements)."""
        m = self.model
        return dict(
            dim=m.dim,
            depth=m.depth,
            freqs_per_bands=m.freqs_per_bands,
            stereo=m.stereo,
            time_transformer_depth=m.time_transformer_depth,
            freq_transformer_depth=m.freq_transformer_depth,
            dim_head=m.dim_head,
            heads=m.heads,
            stft_n_fft=m.stft_n_fft,
            stft_hop_length=m.stft_hop_length,
            stft_win_length=m.stft_win_length,
            stft_normalized=m.stft_normalized,
            mask_estimator_depth=m.mask_estimator_depth,
            mlp_expansion_factor=m.mlp_expansion_factor,
        )


# config --------------------------------------------------------------------------------------


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that also accepts `!!python/tuple` (used by the published 1297 yaml)."""


_ConfigLoader.add_constructor(
    "tag:yaml.org,2002:python/tuple", lambda loader, node: tuple(loader.construct_sequence(node))
)


def _value(value: Any, annotation: str, where: str) -> Any:
    """Check one yaml value against its field's annotation; sequences become tuples."""
    ok = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "str | None": lambda v: v is None or isinstance(v, str),
        "tuple[int, ...]": lambda v: isinstance(v, (list, tuple)) and all(isinstance(i, int) and i > 0 for i in v),
        "tuple[str, ...]": lambda v: isinstance(v, (list, tuple)) and all(isinstance(i, str) for i in v),
    }[annotation]
    if not ok(value):
        raise ConfigError(f"{where} should be {annotation.replace('tuple[', 'a list of ').replace(', ...]', 's')}, got {value!r}")
    return tuple(value) if isinstance(value, list) else value


def _section(raw: Mapping, name: str, cls: type, path: Path, required: bool = True):
    section = raw.get(name)
    if section is None and not required:
        return cls()
    if not isinstance(section, Mapping):
        raise ConfigError(f"{path}: missing section '{name}' (is this a BS-RoFormer model config?)")
    fields = cls.__dataclass_fields__
    missing = [f for f, spec in fields.items() if spec.default is MISSING and f not in section]
    if missing:
        raise ConfigError(f"{path}: section '{name}' lacks required key(s) {', '.join(missing)}")
    return cls(
        **{k: _value(v, fields[k].type, f"{path}: {name}.{k}") for k, v in section.items() if k in fields}
    )


def load_config(path: str | Path) -> Config:
    """Parse a BS-RoFormer yaml config; raise :class:`ConfigError` naming the file on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.__class__.__name__})") from None
    try:
        raw = yaml.load(text, Loader=_ConfigLoader)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{path}: not valid YAML{line}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: not a model config (expected a mapping with 'audio' and 'model' sections)")

    audio = _section(raw, "audio", AudioConfig, path)
    model = _section(raw, "model", ModelConfig, path)
    training = _section(raw, "training", TrainingConfig, path)
    inference = _section(raw, "inference", InferenceConfig, path, required=False)
    config = Config(audio, model, training, inference, path)
    _check(config)
    return config


def _check(config: Config) -> None:
    path, m = config.path, config.model
    bins = m.stft_n_fft // 2 + 1
    if sum(m.freqs_per_bands) != bins:
        raise ConfigError(
            f"{path}: freqs_per_bands sum to {sum(m.freqs_per_bands)} but an STFT of {m.stft_n_fft} has {bins} bins"
        )
    if m.num_stems != 1:
        raise ConfigError(f"{path}: num_stems is {m.num_stems}; stemsep runs single-target (vocals) models only")
    if m.linear_transformer_depth:
        raise ConfigError(f"{path}: linear_transformer_depth > 0 is not supported (1297 uses 0)")
    target = (config.training.target_instrument or "").lower()
    if target != "vocals":
        raise ConfigError(
            f"{path}: training.target_instrument is {config.training.target_instrument!r}; stemsep needs a vocals model"
        )
    if config.audio.chunk_size < m.stft_n_fft:
        raise ConfigError(f"{path}: audio.chunk_size {config.audio.chunk_size} is shorter than one STFT window")
    if config.inference.num_overlap < 1 or config.inference.batch_size < 1:
        raise ConfigError(f"{path}: inference.num_overlap and inference.batch_size must be at least 1")


# checkpoint ----------------------------------------------------------------------------------


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict safely (weights_only); raise :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a checkpoint file" if path.is_dir() else "checkpoint file not found"
        raise CheckpointError(f"{path}: {what}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise CheckpointError(
                f"{path}: contains Python objects besides tensors; refusing to unpickle it (only plain state dicts load)"
            ) from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (corrupt or truncated)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated: {_first_line(exc)})") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):  # Lightning-style wrapper
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(f"{path}: not a state dict (expected a mapping of parameter names to tensors)")
    return dict(obj)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else exc.__class__.__name__


def build_model(config: Config, device: str | torch.device = "cpu") -> BSRoformer:
    """An uninitialized-weights network for `config` (parameters on `device`)."""
    with torch.device(device):
        return BSRoformer(**config.network_kwargs())


# Tokens per slice of the transformers on the CPU: the temporaries of 4,096 tokens (the
# feed-forward's hidden layer is 8 MB at dim 128) stay in cache. One 8-s chunk through the
# dim-128 benchmark network on 2 cores: 2.3 s at once, 1.6 s in slices of 4,096, 1.7 s in
# 8,192 or 1,024; peak RSS 820 -> 548 MB.
CPU_SLICE_TOKENS = 4096


def load_model(checkpoint: str | Path, config: str | Path | Config, device: str | torch.device = "cpu") -> BSRoformer:
    """Build the network from `config`, load `checkpoint` strictly, and return it in eval mode.

    ``model(audio)`` maps float32 ``(batch, channels, samples)`` at the config's sample
    rate to the predicted vocals of the same shape. On the CPU the transformers run over
    slices of `CPU_SLICE_TOKENS` tokens (same result; see `BSRoformer._by_slices`).
    """
    config = config if isinstance(config, Config) else load_config(config)
    state = load_state_dict(checkpoint)
    model = build_model(config, device="meta")  # no time spent initializing weights we overwrite
    _check_fits(model, state, Path(checkpoint), config.path)
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=device, dtype=torch.float32).eval()
    model.requires_grad_(False)
    if torch.device(device).type == "cpu":
        model.slice_tokens = CPU_SLICE_TOKENS
    return model


def _check_fits(model: torch.nn.Module, state: Mapping[str, torch.Tensor], checkpoint: Path, config: Path) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} parameter(s) missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointError(f"{checkpoint}: not a BS-RoFormer checkpoint for {config.name}: {'; '.join(parts)}")
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise CheckpointError(
                f"{checkpoint}: does not match config {config.name}: {key} has shape {tuple(state[key].shape)} "
                f"in the checkpoint but {tuple(shape)} in the config"
            )
