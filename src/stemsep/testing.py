"""What the tests and benchmarks build instead of real models and songs.

Configs and checkpoints with constructed weights, in the real file formats, and test music.

Tests and benchmarks cannot download the real weights, so they build their own:
random weights (for parity and speed, full 1297 or Kim MelBand shapes, or smaller), or
weights whose mask estimators emit a known constant complex mask per stem (``mask=1``
reproduces the input, ``mask=0`` silence, ``mask=0.5`` half of it), which makes the
pipeline's output known. None of these is a stand-in for a real model's output.
"""

from __future__ import annotations

import copy
import fractions
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
import yaml

from stemsep.checkpoint import build_model, load_config

# The 1297 config's values (audio-separator's copy of the yaml).
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

# Kimberley Jensen's MelBand-RoFormer vocals model (MSST-WebUI's Kim_MelBandRoformer.ckpt.yaml):
# 1297's keys but its band layout (and no linear_transformer_depth), at another size, without dropout.
CONFIG_KIM_MEL_BAND: dict[str, Any] = {
    "audio": {**CONFIG_1297["audio"], "dim_t": 256, "min_mean_abs": 0.0},
    "model": {
        **{k: v for k, v in CONFIG_1297["model"].items() if k not in ("freqs_per_bands", "linear_transformer_depth")},
        "dim": 384,
        "depth": 6,
        "num_bands": 60,
        "sample_rate": 44100,
        "attn_dropout": 0,
        "ff_dropout": 0,
    },
    "training": {"instruments": ["vocals", "other"], "target_instrument": "vocals"},
    "inference": {"batch_size": 1, "dim_t": 256, "num_overlap": 4},
}

# A network small enough for unit tests: real STFT and band layout, tiny transformers.
TINY_MODEL = {"dim": 16, "depth": 1, "dim_head": 8, "heads": 2}


def config_dict(
    model: dict[str, Any] | None = None, audio: dict[str, Any] | None = None, base: dict[str, Any] = CONFIG_1297, **sections: dict
) -> dict:
    """`base` (the 1297 config) with the given keys of `model`, `audio` (and other sections) replaced."""
    config = copy.deepcopy(base)
    for name, overrides in {"model": model or {}, "audio": audio or {}, **sections}.items():
        config[name].update(overrides)
    return config


def write_config(path: str | Path, config: dict[str, Any]) -> Path:
    """Write `config` as the real 1297 yaml is written: model sequences tagged `!!python/tuple`
    (audio-separator's classes type-check them as tuples)."""
    path = Path(path)
    config = {**config, "model": {k: tuple(v) if isinstance(v, list) else v for k, v in config["model"].items()}}
    path.write_text(yaml.dump(config, Dumper=yaml.Dumper, sort_keys=False))
    return path


def random_state_dict(config_path: str | Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """PyTorch's default initialization of the network for `config_path`, seeded."""
    torch.manual_seed(seed)
    return build_model(load_config(config_path)).state_dict()


def set_constant_mask(state: dict[str, torch.Tensor], mask: complex | Sequence[complex], gate: float = 30.0) -> dict[str, torch.Tensor]:
    """Make each stem's mask estimator emit a constant mask whatever its input: `mask` for
    every stem, or one value per stem (in the network's output order).

    Each band's MLP ends in Linear -> GLU: output = a * sigmoid(g). Zeroing the last
    Linear's weight and setting its bias to (re, im, re, im, ...) for `a` and a large value
    for `g` makes the output the constant re + i*im (sigmoid(30) = 1 - 1e-13). Where
    MelBand-RoFormer's bands overlap, the mean of equal masks is that mask.
    """
    last_linear: dict[tuple[int, int], int] = {}  # (stem, band) -> index of its MLP's last Linear
    for key in state:
        parts = key.split(".")  # mask_estimators.{stem}.to_freqs.{band}.0.{layer}.weight
        if parts[0] == "mask_estimators" and parts[-1] == "weight":
            stem, band, layer = int(parts[1]), int(parts[3]), int(parts[5])
            last_linear[stem, band] = max(last_linear.get((stem, band), -1), layer)
    stems = 1 + max(stem for stem, _ in last_linear)
    masks = [complex(m) for m in mask] if isinstance(mask, Sequence) else [complex(mask)] * stems
    if len(masks) != stems:
        raise ValueError(f"{len(masks)} masks given for a network of {stems} stems")
    for (stem, band), layer in last_linear.items():
        name = f"mask_estimators.{stem}.to_freqs.{band}.0.{layer}"
        weight, bias = state[name + ".weight"], state[name + ".bias"]
        half = bias.numel() // 2
        values = torch.tensor([masks[stem].real, masks[stem].imag], dtype=bias.dtype).repeat(half // 2)
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
    mask: complex | Sequence[complex] | None = None,
    seed: int = 0,
    name: str = "model",
) -> tuple[Path, Path]:
    """Write `<name>.ckpt` + `<name>.yaml` in `directory`: random weights, or a constant `mask`
    (one for all stems, or one per stem)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_path = write_config(directory / f"{name}.yaml", config)
    state = random_state_dict(config_path, seed)
    if mask is not None:
        state = set_constant_mask(state, mask)
    return write_checkpoint(directory / f"{name}.ckpt", state), config_path


# a fast model and test music ---------------------------------------------------------------

# A small STFT keeps the network fast; the 1297 STFT and band layout are covered in test_model.py.
FAST_MODEL = {**TINY_MODEL, "stft_n_fft": 256, "stft_win_length": 256, "stft_hop_length": 64, "freqs_per_bands": [8] * 16 + [1]}
FAST_CHUNK = 4096  # 93 ms at 44.1 kHz: even short files span many chunks
FAST_CONFIG = config_dict(model=FAST_MODEL, audio={"chunk_size": FAST_CHUNK},
                          inference={"num_overlap": 4, "dim_t": FAST_CHUNK // 64 + 1})


def tones(sample_rate: int, frames: int, channels: int, level: float = 0.25, seed: int = 0) -> np.ndarray:
    """Band-limited test music: a few sines below 0.4 x min(rate, 44.1 kHz), faded in and out
    (an abrupt step would ring after resampling: band-limiting, not an error)."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames) / sample_rate
    top = 0.4 * min(sample_rate, 44100)
    x = np.zeros((channels, frames))
    for c in range(channels):
        for f in rng.uniform(40, top, 6):
            x[c] += np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    fade = min(frames // 4, int(0.02 * sample_rate))
    ramp = np.sin(np.linspace(0, np.pi / 2, fade)) ** 2
    x[:, :fade] *= ramp
    x[:, frames - fade :] *= ramp[::-1]
    return (level * x / np.abs(x).max()).astype(np.float32)


def db(x: float) -> float:
    """An amplitude in dB (full scale = 0)."""
    return 20 * math.log10(max(float(x), 1e-300))


def av_encode(path: str | Path, codec: str, x: np.ndarray, rate: int, *, container_format: str | None = None,
              container_options: dict | None = None, sample_format: str | None = None) -> None:
    """Encode float32 (channels, n) with PyAV, feeding 1000-sample frames."""
    channels, n = x.shape
    with av.open(str(path), "w", format=container_format, options=container_options or {}) as out:
        s = out.add_stream(codec, rate=rate)
        s.layout = {1: "mono", 2: "stereo", 6: "5.1"}[channels]
        fmt = av.AudioFormat(sample_format or s.codec_context.codec.audio_formats[0].name)
        s.format = fmt.name
        for i in range(0, n, 1000):
            block = x[:, i : i + 1000]
            if fmt.name.startswith("s16"):
                block = np.round(block * 32767).astype(np.int16)
            elif fmt.name.startswith("s32"):
                block = np.round(block * 2**31).astype(np.int32)
            data = block if fmt.is_planar else block.T.reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=fmt.name, layout=s.layout.name)
            frame.sample_rate, frame.pts, frame.time_base = rate, i, fractions.Fraction(1, rate)
            for packet in s.encode(frame):
                out.mux(packet)
        for packet in s.encode(None):
            out.mux(packet)
