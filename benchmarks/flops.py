"""How much arithmetic the network does: FLOPs per chunk and per second of audio.

Counted from the network, a multiply-add as 2 FLOPs, matrix products only (norms, GELU,
softmax and the STFT are a fraction of a percent). The benchmarks divide by wall time and
the GPU's peak to report model FLOP utilization; a test checks the count against torch's
own FlopCounterMode.
"""

from __future__ import annotations

from torch import nn

from stemsep.checkpoint import Config, build_model
from stemsep.model import Attention


def flops_per_chunk(config: Config) -> int:
    """FLOPs of one forward pass over one chunk of `config.audio.chunk_size` samples, read off
    the network the config builds (on the meta device: no memory, no time), so any
    architecture, band layout and stem count is counted as it runs."""
    m = config.model
    network = build_model(config, device="meta")
    frames = config.audio.chunk_size // m.stft_hop_length + 1
    bands = len(network.band_split.to_features)
    tokens = frames * bands

    def linears(module: nn.Module) -> int:  # multiply-adds of every Linear, per token it sees
        return sum(layer.in_features * layer.out_features for layer in module.modules() if isinstance(layer, nn.Linear))

    # Band split and mask estimators: one small MLP per band, each over that band's frames.
    per_band = 2 * frames * (linears(network.band_split) + linears(network.mask_estimators))
    # Transformers: every projection over every token, plus attention's scores and weighted
    # sum, 2 x (2 n^2 e) per head per sequence: time attention over `bands` sequences of
    # `frames` tokens, frequency attention over `frames` sequences of `bands` tokens.
    transformers = 0
    for time_transformer, freq_transformer in network.layers:
        for transformer, sequences, length in ((time_transformer, bands, frames), (freq_transformer, frames, bands)):
            attentions = sum(isinstance(layer, Attention) for layer in transformer.modules())
            transformers += 2 * tokens * linears(transformer)
            transformers += attentions * 4 * sequences * m.heads * length**2 * m.dim_head
    return per_band + transformers


def flops_per_second(config: Config) -> float:
    """FLOPs per second of audio per pass (one chunk's worth of work per chunk of audio)."""
    return flops_per_chunk(config) * config.audio.sample_rate / config.audio.chunk_size


# Dense (no sparsity) tensor-core peaks from the vendors' datasheets, TFLOP/s: (bf16, fp32).
DATASHEET_PEAKS = {
    "H100 80GB HBM3": (989.4, 66.9),  # SXM
    "H100 PCIe": (756.0, 51.2),
    "H200": (989.4, 66.9),
    "A100": (312.0, 19.5),
    "A40": (149.7, 37.4),
    "L40S": (362.1, 91.6),
    "A10": (125.0, 31.2),
    "T4": (65.0, 8.1),  # fp16 (the T4 has no bf16)
}


def datasheet_peak_tflops(gpu_name: str, precision: str) -> float | None:
    """The datasheet's dense peak of a GPU (by `torch.cuda.get_device_name`) for `precision`
    ("bf16"/"fp16" -> tensor-core half precision, "fp32" -> plain fp32), or None if unknown."""
    peaks = next((peak for key, peak in DATASHEET_PEAKS.items() if key in gpu_name), None)
    return None if peaks is None else peaks[1] if precision == "fp32" else peaks[0]
