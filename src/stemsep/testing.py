"""Configs and checkpoints with constructed weights, in the 1297 file formats.

Tests and benchmarks cannot download the real weights, so they build their own:
random weights (for parity and speed, full 1297 shapes or smaller), or weights whose mask
estimator emits a known constant complex mask (``mask=1`` reproduces the input,
``mask=0`` silence, ``mask=0.5`` half of it), which makes the pipeline's output known.
None of these is a stand-in for the real model's output.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import yaml

from stemsep.checkpoint import build_model, load_config

# The 1297 config's values (REFERENCE.md; audio-separator's copy of the yaml).
BANDS_1297 = (2,) * 24 + (4,) * 12 + (12,) * 8 + (24,) * 8 + (48,) * 8 + (128, 129)

CONFIG_1297: dict[str, Any] = {
    "audio": {
        "chunk_size": 352800,
        "dim_f": 1024,
        "dim_t": 801,
        "hop_length": 441,
        "n_fft": 2048,
        "num_channels": 2,
        "sample_rate": 44100,
        "min_mean_abs": 0.001,
    },
    "model": {
        "dim": 512,
        "depth": 12,
        "stereo": True,
        "num_stems": 1,
        "time_transformer_depth": 1,
        "freq_transformer_depth": 1,
        "linear_transformer_depth": 0,
        "freqs_per_bands": list(BANDS_1297),
        "dim_head": 64,
        "heads": 8,
        "attn_dropout": 0.1,
        "ff_dropout": 0.1,
        "flash_attn": True,
        "dim_freqs_in": 1025,
        "stft_n_fft": 2048,
        "stft_hop_length": 441,
        "stft_win_length": 2048,
        "stft_normalized": False,
        "mask_estimator_depth": 2,
        "multi_stft_resolution_loss_weight": 1.0,
        "multi_stft_resolutions_window_sizes": [4096, 2048, 1024, 512, 256],
        "multi_stft_hop_size": 147,
        "multi_stft_normalized": False,
    },
    "training": {"instruments": ["Vocals", "Instrumental"], "target_instrument": "Vocals"},
    "inference": {"batch_size": 1, "dim_t": 801, "num_overlap": 4},
}

# A network small enough for unit tests: real STFT and band layout, tiny transformers.
TINY_MODEL = {"dim": 16, "depth": 1, "dim_head": 8, "heads": 2}


def config_dict(model: dict[str, Any] | None = None, audio: dict[str, Any] | None = None, **sections: dict) -> dict:
    """The 1297 config with the given keys of `model`, `audio` (and other sections) replaced."""
    config = copy.deepcopy(CONFIG_1297)
    for name, overrides in {"model": model or {}, "audio": audio or {}, **sections}.items():
        config[name].update(overrides)
    return config


def write_config(path: str | Path, config: dict[str, Any]) -> Path:
    """Write `config` as the real 1297 yaml is written: model sequences tagged `!!python/tuple`
    (audio-separator's BSRoformer type-checks them as tuples)."""
    path = Path(path)
    config = {**config, "model": {k: tuple(v) if isinstance(v, list) else v for k, v in config["model"].items()}}
    path.write_text(yaml.dump(config, Dumper=yaml.Dumper, sort_keys=False))
    return path


def random_state_dict(config_path: str | Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """PyTorch's default initialization of the network for `config_path`, seeded."""
    torch.manual_seed(seed)
    return build_model(load_config(config_path)).state_dict()


def set_constant_mask(state: dict[str, torch.Tensor], mask: complex, gate: float = 30.0) -> dict[str, torch.Tensor]:
    """Make every mask estimator emit `mask` whatever its input.

    Each band's MLP ends in Linear -> GLU: output = a * sigmoid(g). Zeroing the last
    Linear's weight and setting its bias to (re, im, re, im, ...) for `a` and a large value
    for `g` makes the output the constant re + i*im (sigmoid(30) = 1 - 1e-13).
    """
    mask = complex(mask)
    prefix = "mask_estimators.0.to_freqs."
    last_linear: dict[str, int] = {}  # band index -> index of its MLP's last Linear
    for key in state:
        if key.startswith(prefix) and key.endswith(".weight"):
            band, _, layer, _ = key[len(prefix) :].split(".")  # "{band}.0.{layer}.weight"
            last_linear[band] = max(last_linear.get(band, -1), int(layer))
    for band, layer in last_linear.items():
        name = f"{prefix}{band}.0.{layer}"
        weight, bias = state[name + ".weight"], state[name + ".bias"]
        half = bias.numel() // 2
        values = torch.tensor([mask.real, mask.imag], dtype=bias.dtype).repeat(half // 2)
        state[name + ".weight"] = torch.zeros_like(weight)
        state[name + ".bias"] = torch.cat([values, torch.full((half,), gate, dtype=bias.dtype)])
    return state


def write_checkpoint(path: str | Path, state: dict[str, torch.Tensor]) -> Path:
    path = Path(path)
    torch.save(state, path)
    return path


def make_model_files(
    directory: str | Path,
    config: dict[str, Any],
    mask: complex | None = None,
    seed: int = 0,
    name: str = "model",
) -> tuple[Path, Path]:
    """Write `<name>.ckpt` + `<name>.yaml` in `directory`: random weights, or a constant `mask`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_path = write_config(directory / f"{name}.yaml", config)
    state = random_state_dict(config_path, seed)
    if mask is not None:
        state = set_constant_mask(state, mask)
    return write_checkpoint(directory / f"{name}.ckpt", state), config_path
