"""Model config and checkpoint loading: yaml -> :class:`Config`, state dict -> network.

The config is the yaml schema of ZFTurbo's Music-Source-Separation-Training and
audio-separator (sections `audio`, `model`, `training`, `inference`). The architecture is
MSST's `model_type` where the yaml names it (at the top level, or in `training` where MSST
reads it), else told by the `model` section's band key: `freqs_per_bands` for BS-RoFormer,
`num_bands` for MelBand-RoFormer. Keys stemsep has no use for are tolerated, except model
keys that would change the network (see `_UNSUPPORTED_MODEL_KEYS`). Checkpoints are state
dicts read with ``torch.load(weights_only=True)``, bare or wrapped (`state_dict`, `model`,
a `module.` prefix), in any floating-point precision (cast to float32 on loading), and
loaded strictly; only the fixed rotary tables may be missing, all of them (splifft saves none).

A checkpoint's tensor names tell its network too (:func:`checkpoint_layout`): BS- or
MelBand-RoFormer, plain or HyperACE mask estimators. Read with its checkpoint, a yaml needs
to say neither: the checkpoint settles what the yaml leaves open (published HyperACE configs
are plain BS-RoFormer configs; some BS-RoFormer configs carry a stray `num_bands`), and a
yaml that says otherwise than the checkpoint is refused. Every failure is a
:class:`ConfigError` or :class:`CheckpointError` whose message names the file and the problem.
"""

from __future__ import annotations

import pickle
import re
import types
import typing
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from stemsep.errors import CheckpointError, ConfigError
from stemsep.files import first_line
from stemsep.hyperace import VARIANTS as HYPERACE_VARIANTS
from stemsep.model import (
    BSRoformerConfig,
    MelBandRoformerConfig,
    Roformer,
    build_network,
    mel_bands,
    rotary_frequencies,
)
from stemsep.stems import COMPLEMENTS, PRACTICE_PREFIX

ModelConfig = BSRoformerConfig | MelBandRoformerConfig
ARCHITECTURES: dict[str, type[ModelConfig]] = {c.model_type: c for c in (BSRoformerConfig, MelBandRoformerConfig)}
_BAND_KEYS = {BSRoformerConfig: "freqs_per_bands", MelBandRoformerConfig: "num_bands"}  # tells the architecture

# Model keys of the RoFormer implementations whose yamls stemsep reads (audio-separator
# 0.47.1, ZFTurbo's MSST, MSST-WebUI) that would change the network when set otherwise: the
# value stemsep runs, and what another value asks for. Refused with a ConfigError.
_UNSUPPORTED_MODEL_KEYS: dict[str, tuple[Any, str]] = {
    "linear_transformer_depth": (0, "linear-attention transformers, which no published RoFormer config uses"),
    "skip_connection": (False, "MSST's sums of earlier layers' outputs (audio-separator ignores the key)"),
    "use_pope": (False, "MSST's PoPE (polar) position embeddings instead of rotary ones"),
    "use_value_residual_learning": (False, "MSST's experimental value residuals"),
    "num_residual_streams": (1, "MSST's experimental hyper-connections"),
    "use_shared_bias": (False, "MSST-WebUI's shared attention biases"),
    "use_mask_estimator_fno": (False, "MSST-WebUI's FNO mask estimators (unwa's Inst-FNO), which stemsep has no implementation of"),
    "ff_mult": (4, "feed-forward layers of another width than 4 x dim"),
    "fmin": (0, "mel bands from another lowest frequency than 0 Hz"),
    "fmax": (None, "mel bands up to another frequency than half the sample rate"),
    "mel_scale": ("slaney", "mel bands on another mel scale than Slaney's"),
    "norm": (None, "another normalization than RMSNorm"),
}
# MSST's BS/MelBand-Conformer share the band keys but not the network.
_CONFORMER_KEYS = ("time_conformer_depth", "freq_conformer_depth", "linear_conformer_depth", "conv_kernel_size")

# Model keys accepted whatever their value: they change nothing at inference, here as in
# audio-separator's classes, which stemsep matches output for output.
IGNORED_MODEL_KEYS = frozenset(
    {
        "attn_dropout",  # training only
        "ff_dropout",  # training only
        "flash_attn",  # which attention kernel; the same attention
        "sage_attention",  # SageAttention's quantized kernel (MSST-WebUI); stemsep computes exact attention
        "use_torch_checkpoint",  # gradient checkpointing, training only
        # MSST zeroes the STFT's DC bin before its iSTFT when true (its default); audio-separator
        # and MSST-WebUI never do, and neither does stemsep (parity with audio-separator).
        "zero_dc",
        "match_input_audio_length",  # output length only: stemsep always returns the input's length
        "dim_freqs_in",  # stored by the reference classes, never used
        "stft_window_fn",  # a Python callable, never in a yaml; the window is Hann
        "multi_stft_resolution_loss_weight",  # the training loss, from here on
        "multi_stft_resolutions_window_sizes",
        "multi_stft_hop_size",
        "multi_stft_normalized",
        "multi_stft_window_fn",
    }
)


@dataclass(frozen=True)
class AudioConfig:
    sample_rate: int
    chunk_size: int  # samples per chunk at sample_rate (352800 = 8 s for 1297)
    num_channels: int = 2


@dataclass(frozen=True)
class TrainingConfig:
    instruments: tuple[str, ...]
    target_instrument: str | None = None


@dataclass(frozen=True)
class InferenceConfig:
    num_overlap: int = 4  # windows covering each sample (audio-separator's copy of 1297 says 4)
    batch_size: int = 1


def complement_name(target: str, instruments: Sequence[str]) -> str:
    """The name of what is left of the mix without `target`: from :data:`COMPLEMENTS`
    (vocals <-> instrumental), else the one other name in `instruments`, else
    ``no_<target>``. Names are compared and returned lowercased."""
    target = target.lower()
    if target in COMPLEMENTS:
        return COMPLEMENTS[target]
    others = [name.lower() for name in instruments if name.lower() != target]
    return others[0] if len(others) == 1 else PRACTICE_PREFIX + target


@dataclass(frozen=True)
class Config:
    audio: AudioConfig
    model: ModelConfig
    training: TrainingConfig
    inference: InferenceConfig
    path: Path

    @property
    def network_stems(self) -> tuple[str, ...]:
        """The stems the network outputs, in its output order, lowercased: the target alone
        for a single-target model (`training.target_instrument`), else `training.instruments`."""
        target = self.training.target_instrument
        return (target.lower(),) if target else tuple(name.lower() for name in self.training.instruments)

    @property
    def complement_stem(self) -> str | None:
        """For a single-target model, the name of the mix minus the target (see
        :func:`complement_name`); None for a multi-stem model."""
        target = self.training.target_instrument
        return complement_name(target, self.training.instruments) if target else None


# config --------------------------------------------------------------------------------------


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that also accepts `!!python/tuple` (used by the published 1297 yaml)."""


_ConfigLoader.add_constructor(
    "tag:yaml.org,2002:python/tuple", lambda loader, node: tuple(loader.construct_sequence(node))
)


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a yaml value fits a field's type: bool, int, str, None, tuple[X, ...], unions."""
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, type(None)):
        return isinstance(value, hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_conforms(v, args[0]) for v in value)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    raise TypeError(f"no yaml check for fields of type {hint}")


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}s"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    return "null" if hint is type(None) else hint.__name__


def _section(raw: Mapping, name: str, cls: type, path: Path, required: bool = True):
    section = raw.get(name)
    if section is None and not required:
        return cls()
    if not isinstance(section, Mapping):
        raise ConfigError(f"missing section '{name}' (is this a RoFormer model config?)", file=str(path))
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    missing = [f for f, spec in known.items() if spec.default is MISSING and f not in section]
    if missing:
        raise ConfigError(f"section '{name}' lacks required key(s) {', '.join(missing)}", file=str(path))
    values = {}
    for key, value in section.items():
        if key in known:
            if not _conforms(value, hints[key]):
                raise ConfigError(f"{name}.{key} should be {_describe(hints[key])}, got {value!r}", file=str(path))
            values[key] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def _architecture(raw: Mapping, path: Path, layout: Layout | None, checkpoint: str | Path | None) -> type[ModelConfig]:
    """MSST's `model_type` if the yaml names it, else the model section's band key; with a
    checkpoint's `layout`, the checkpoint's architecture, unless the yaml names another."""
    training = raw.get("training")
    named = raw.get("model_type", training.get("model_type") if isinstance(training, Mapping) else None)
    model = raw.get("model") if isinstance(raw.get("model"), Mapping) else {}
    if named is not None and (not isinstance(named, str) or named not in ARCHITECTURES):
        raise ConfigError(f"model_type {named!r} is not one stemsep runs ({' or '.join(ARCHITECTURES)})", file=str(path))
    present = [cls for cls, key in _BAND_KEYS.items() if key in model]
    stated = ARCHITECTURES[named] if named is not None else present[0] if len(present) == 1 else None
    if layout is not None:
        if stated not in (None, layout.architecture):
            raise CheckpointError(
                f"holds a {layout.architecture.title} ({layout.evidence}) but config {path.name} "
                f"describes a {stated.title}", file=str(checkpoint)
            )
        return layout.architecture
    if named is not None:
        other = next(k for c, k in _BAND_KEYS.items() if c is not stated)
        if other in model:
            raise ConfigError(f"model_type is {named} but the model section has {other}, a key of the other architecture", file=str(path))
    elif stated is None:
        what = "both" if present else "neither"
        raise ConfigError(
            f"{path}: cannot tell the architecture: the model section has {what} freqs_per_bands (BS-RoFormer) "
            "and num_bands (MelBand-RoFormer), and no model_type"
        )
    return stated


def _check_model_keys(model: Mapping, path: Path, architecture: type[ModelConfig]) -> None:
    conformer = [k for k in _CONFORMER_KEYS if k in model]
    if conformer:
        raise ConfigError(f"model.{conformer[0]} belongs to a Conformer model, which stemsep does not run", file=str(path))
    for key, (runs, meaning) in _UNSUPPORTED_MODEL_KEYS.items():
        if key in model and model[key] != runs:
            raise ConfigError(f"model.{key} {model[key]!r} asks for {meaning}; stemsep runs only {runs!r}", file=str(path))
    if architecture is MelBandRoformerConfig and model.get("use_mask_estimator_hyper_ace"):
        raise ConfigError("model.use_mask_estimator_hyper_ace asks for HyperACE mask estimators, which stemsep runs only "
                          "in a BS-RoFormer", file=str(path))


def _mask_estimators(model: ModelConfig, section: Mapping, layout: Layout, path: Path, checkpoint: str | Path) -> ModelConfig:
    """`model` with the checkpoint's mask estimators (plain or HyperACE) where the yaml says
    nothing of them; a yaml that asks for others is refused."""
    if not isinstance(model, BSRoformerConfig):
        return model  # a MelBand-RoFormer's are plain (checkpoint_layout refuses others)
    found = replace(model, use_mask_estimator_hyper_ace=layout.hyperace_version is not None, hyperace_version=layout.hyperace_version)
    asked = model.use_mask_estimator_hyper_ace
    if "use_mask_estimator_hyper_ace" in section and (
        asked != found.use_mask_estimator_hyper_ace or asked and model.hyperace_version not in (None, found.hyperace_version)
    ):
        raise CheckpointError(f"holds a {found.name} but config {path.name} asks for a {model.name}", file=str(checkpoint))
    return found


def _read_yaml(path: Path) -> Mapping:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("config file not found", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file ({exc.__class__.__name__})", file=str(path)) from None
    try:
        raw = yaml.load(text, Loader=_ConfigLoader)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"not valid YAML{line}", file=str(path)) from None
    if not isinstance(raw, Mapping):
        raise ConfigError("not a model config (expected a mapping with 'audio' and 'model' sections)", file=str(path))
    return raw


def load_config(path: str | Path, checkpoint: str | Path | None = None) -> Config:
    """Parse a RoFormer yaml config; raise :class:`ConfigError` naming the file on any problem.

    With `checkpoint`, the network is the one its tensor names tell (:func:`checkpoint_layout`)
    where the yaml leaves it open; a yaml that says otherwise raises :class:`CheckpointError`."""
    path = Path(path)
    raw = _read_yaml(path)
    layout = None if checkpoint is None else checkpoint_layout(load_state_dict(checkpoint), checkpoint)
    return _config(raw, path, layout, checkpoint)


def _config(raw: Mapping, path: Path, layout: Layout | None, checkpoint: str | Path | None) -> Config:
    audio = _section(raw, "audio", AudioConfig, path)
    model_cls = _architecture(raw, path, layout, checkpoint)
    model = _section(raw, "model", model_cls, path)
    _check_model_keys(raw["model"], path, model_cls)
    if layout is not None:
        model = _mask_estimators(model, raw["model"], layout, path, checkpoint)
    training = _section(raw, "training", TrainingConfig, path)
    inference = _section(raw, "inference", InferenceConfig, path, required=False)
    config = Config(audio, model, training, inference, path)
    _check(config)
    return config


def _check(config: Config) -> None:
    path, m = config.path, config.model
    hints = typing.get_type_hints(type(m))
    small = [f.name for f in fields(m) if hints[f.name] is int and getattr(m, f.name) < 1]
    if small:
        raise ConfigError(f"model.{small[0]} must be at least 1, got {getattr(m, small[0])}", file=str(path))
    if m.stft_win_length > m.stft_n_fft:
        raise ConfigError(f"model.stft_win_length {m.stft_win_length} is longer than stft_n_fft {m.stft_n_fft}", file=str(path))
    if isinstance(m, BSRoformerConfig):
        if not all(width > 0 for width in m.freqs_per_bands):
            raise ConfigError(f"model.freqs_per_bands should be a list of positive ints, got {list(m.freqs_per_bands)}", file=str(path))
        if sum(m.freqs_per_bands) != m.bins:
            raise ConfigError(
                f"{path}: freqs_per_bands sum to {sum(m.freqs_per_bands)} but an STFT of {m.stft_n_fft} has {m.bins} bins"
            )
        if m.use_mask_estimator_hyper_ace and m.hyperace_version not in HYPERACE_VARIANTS:
            versions = " or ".join(map(str, HYPERACE_VARIANTS))
            raise ConfigError(f"model.hyperace_version should be {versions} for HyperACE mask estimators, got {m.hyperace_version!r}",
                              file=str(path))
        if m.use_mask_estimator_hyper_ace and not m.stereo:
            raise ConfigError("HyperACE mask estimators need a stereo model (model.stereo true)", file=str(path))
    else:
        try:
            mel_bands(m.sample_rate, m.stft_n_fft, m.num_bands)
        except ValueError as exc:
            raise ConfigError(f"model.num_bands {m.num_bands} does not fit the STFT: {exc}", file=str(path)) from None
    _check_stems(config)
    if config.audio.chunk_size < m.stft_n_fft:
        raise ConfigError(f"audio.chunk_size {config.audio.chunk_size} is shorter than one STFT window", file=str(path))
    if config.inference.num_overlap < 1 or config.inference.batch_size < 1:
        raise ConfigError("inference.num_overlap and inference.batch_size must be at least 1", file=str(path))


def _check_stems(config: Config) -> None:
    """The network's outputs must be nameable: one per stem, names distinct."""
    path, stems = config.path, config.model.num_stems
    instruments, target = config.training.instruments, config.training.target_instrument
    lowered = [name.lower() for name in instruments]
    if len(set(lowered)) != len(lowered):
        raise ConfigError(f"training.instruments {list(instruments)} names a stem twice", file=str(path))
    if target:
        if stems != 1:
            raise ConfigError(f"model.num_stems is {stems} but a model with a target_instrument predicts one stem", file=str(path))
    elif len(instruments) < 2:
        raise ConfigError("training.target_instrument is not set and training.instruments names fewer than 2 stems", file=str(path))
    elif stems != len(instruments):
        raise ConfigError(
            f"{path}: model.num_stems is {stems} but training.instruments names {len(instruments)} stems "
            "(and no target_instrument)"
        )


# what a checkpoint's tensor names tell -------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The network a state dict's tensor names describe."""

    architecture: type[ModelConfig]
    hyperace_version: int | None  # its mask estimators: HyperACE v1 or v2, or None for plain ones
    evidence: str  # what tells the architecture, for messages

    def describes(self, model: ModelConfig) -> bool:
        hyperace = isinstance(model, BSRoformerConfig) and model.use_mask_estimator_hyper_ace
        return type(model) is self.architecture and (model.hyperace_version if hyperace else None) == self.hyperace_version


_ROFORMER_TENSOR = "band_split.to_features.0.0.gamma"  # the first band's norm
_BS_TENSOR = "final_norm.gamma"  # BS-RoFormer norms the tokens once, after all the transformers
_MEL_TENSOR = re.compile(r"layers\.\d+\.\d+\.norm\.gamma")  # MelBand-RoFormer after each transformer
_HYPERACE_TENSOR = re.compile(r"mask_estimators\.\d+\.segm\.")
_HYPERACE_V2_TENSOR = re.compile(r"mask_estimators\.\d+\.segm\.upsample_head\.block1\.out_conv\.")  # TFC-TDF blocks

# Tensor names of RoFormer variants stemsep does not run (matched from the name's start), and
# what they are: in MSST, MSST-WebUI and unwa's published variants.
_UNSUPPORTED_TENSORS = {
    r"mask_estimators\.\d+\.layers\.": "transformers inside its mask estimators (unwa's Large-Inst v2)",
    r"mask_estimators\.\d+\.to_freqs\.\d+\.0\.[a-z]": "FNO mask estimators (unwa's Inst-FNO)",
    r".*\.pope_embed\.": "PoPE (polar) position embeddings",
    r"layers\.\d+\.\d+\.layers\.\d+\.conv\.": "Conformer blocks",
    r"layers\.\d+\.2\.": "linear-attention transformers",
    r"linear_\d+_bias_\d+$|.*\.to_qkv\.bias$": "shared attention biases",
}


def checkpoint_layout(state: Mapping[str, torch.Tensor], checkpoint: str | Path) -> Layout | None:
    """The RoFormer `state`'s tensor names describe: BS-RoFormer (`final_norm.gamma`) or
    MelBand-RoFormer (`layers.*.*.norm.gamma`), with HyperACE v1 or v2 mask estimators
    (`mask_estimators.*.segm.*`; v2's head has TFC-TDF blocks) or plain ones. None for names
    that tell neither (not a RoFormer's: loading then names the tensors that differ); a
    :class:`CheckpointError` naming the variant for a RoFormer variant stemsep does not run."""
    if _ROFORMER_TENSOR not in state:
        return None
    for pattern, variant in _UNSUPPORTED_TENSORS.items():
        key = next((k for k in state if re.match(pattern, k)), None)
        if key is not None:
            raise CheckpointError(f"has {variant} ({key}), which stemsep does not run", file=str(checkpoint))
    per_transformer = next((k for k in state if _MEL_TENSOR.fullmatch(k)), None)
    if (_BS_TENSOR in state) == (per_transformer is not None):
        return None
    hyperace = [k for k in state if _HYPERACE_TENSOR.match(k)]
    version = (2 if any(_HYPERACE_V2_TENSOR.match(k) for k in hyperace) else 1) if hyperace else None
    if per_transformer is None:
        return Layout(BSRoformerConfig, version, f"one norm after all its transformers, {_BS_TENSOR}")
    if version is not None:
        raise CheckpointError("has HyperACE mask estimators on a MelBand-RoFormer, which stemsep does not run", file=str(checkpoint))
    return Layout(MelBandRoformerConfig, None, f"a norm after each transformer, {per_transformer}")


# checkpoint ----------------------------------------------------------------------------------


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict safely (weights_only); raise :class:`CheckpointError` naming the file.

    Accepts the wrappers training scripts save: the state dict under `state_dict`
    (Lightning) or `model`, and DataParallel's `module.` prefix on every key."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a checkpoint file" if path.is_dir() else "checkpoint file not found"
        raise CheckpointError(f"{what}", file=str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise CheckpointError(
                f"{path}: contains Python objects besides tensors; refusing to unpickle it (only plain state dicts load)"
            ) from None
        raise CheckpointError("not a PyTorch checkpoint (corrupt or truncated)", file=str(path)) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(f"not a readable PyTorch checkpoint (corrupt or truncated: {first_line(exc)})", file=str(path)) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError("not a state dict (expected a mapping of parameter names to tensors)", file=str(path))
    if all(k.startswith("module.") for k in obj):
        return {k.removeprefix("module."): v for k, v in obj.items()}
    return dict(obj)


def build_model(config: Config, device: str | torch.device = "cpu") -> Roformer:
    """An uninitialized-weights network for `config` (parameters on `device`)."""
    with torch.device(device):
        return build_network(config.model)


# Tokens per slice of the transformers on the CPU: the temporaries of 4,096 tokens (the
# feed-forward's hidden layer is 8 MB at dim 128) stay in cache. One 8-s chunk through the
# dim-128 benchmark network on 2 cores: 2.3 s at once, 1.6 s in slices of 4,096, 1.7 s in
# 8,192 or 1,024; peak RSS 820 -> 548 MB.
CPU_SLICE_TOKENS = 4096


def load_model(checkpoint: str | Path, config: str | Path | Config, device: str | torch.device = "cpu") -> Roformer:
    """Build the network from `config`, load `checkpoint` strictly, and return it in eval mode.

    ``model(audio)`` maps float32 ``(batch, channels, samples)`` at the config's sample
    rate to ``(batch, stems, channels, samples)``, the stems in `config.network_stems`
    order. On the CPU the transformers run over slices of `CPU_SLICE_TOKENS` tokens (same
    result; see `Roformer._by_slices`).

    The yaml is read with the checkpoint (see :func:`load_config`); so is a `Config` read
    without it, again, when the checkpoint holds another network than it describes (pass
    `load_config(yaml, checkpoint)` to keep the `Config` in step). Weights are cast to
    float32, whatever their precision in the file.
    """
    state = load_state_dict(checkpoint)
    layout = checkpoint_layout(state, checkpoint)
    if not isinstance(config, Config):
        config = _config(_read_yaml(Path(config)), Path(config), layout, checkpoint)
    elif layout is not None and not layout.describes(config.model):
        config = _config(_read_yaml(config.path), config.path, layout, checkpoint)
    model = build_model(config, device="meta")  # no time spent initializing weights we overwrite
    state = _with_rotary_tables(state, model)
    _check_fits(model, state, Path(checkpoint), config)
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=device, dtype=torch.float32).eval()
    model.requires_grad_(False)
    if torch.device(device).type == "cpu":
        model.slice_tokens = CPU_SLICE_TOKENS
    return model


def _with_rotary_tables(state: Mapping[str, torch.Tensor], model: Roformer) -> Mapping[str, torch.Tensor]:
    """`state`, given the standard rotary tables if it has none at all (splifft's checkpoints
    save none: the tables are fixed, never trained); one that has some keeps its own."""
    keys = [k for k in model.state_dict() if k.endswith("rotary_embed.freqs")]
    if not keys or any(k in state for k in keys):
        return state
    table = rotary_frequencies(model.config.dim_head)
    return {**state, **{k: table for k in keys}}


def _check_fits(model: torch.nn.Module, state: Mapping[str, torch.Tensor], checkpoint: Path, config: Config) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} parameter(s) missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointError(
            f"{checkpoint}: not a {config.model.name} checkpoint for {config.path.name}: {'; '.join(parts)}"
        )
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise CheckpointError(
                f"{checkpoint}: does not match config {config.path.name}: {key} has shape {tuple(state[key].shape)} "
                f"in the checkpoint but {tuple(shape)} in the config"
            )
