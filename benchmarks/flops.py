"""How much arithmetic the network does: FLOPs per chunk and per second of audio.

Counted from the config, a multiply-add as 2 FLOPs, matrix products only (norms, GELU,
softmax and the STFT are a fraction of a percent). The benchmarks divide by wall time and
the GPU's peak to report model FLOP utilization; a test checks the count against torch's
own FlopCounterMode.
"""

from __future__ import annotations

from stemsep.checkpoint import Config


def flops_per_chunk(config: Config) -> int:
    """FLOPs of one forward pass over one chunk of `config.audio.chunk_size` samples."""
    m = config.model
    frames = config.audio.chunk_size // m.stft_hop_length + 1
    bands = len(m.freqs_per_bands)
    tokens = frames * bands
    d, inner, channels = m.dim, m.heads * m.dim_head, 2 if m.stereo else 1
    widths = [2 * bins * channels for bins in m.freqs_per_bands]

    band_split = sum(2 * frames * w * d for w in widths)
    per_layer = (
        2 * tokens * d * 3 * inner  # to_qkv
        + 2 * tokens * d * m.heads  # to_gates
        + 2 * tokens * inner * d  # to_out
        + 2 * 2 * tokens * d * 4 * d  # feed-forward, 4x expansion
    )
    # Scores and weighted sum: 2 x (2 n^2 e) per head per sequence.
    time_attention = 4 * bands * m.heads * frames**2 * m.dim_head  # `bands` sequences of `frames` tokens
    freq_attention = 4 * frames * m.heads * bands**2 * m.dim_head  # `frames` sequences of `bands` tokens
    transformers = m.depth * (
        m.time_transformer_depth * (per_layer + time_attention) + m.freq_transformer_depth * (per_layer + freq_attention)
    )
    hidden = m.mlp_expansion_factor * d
    mlp_dims = lambda w: [d, *[hidden] * (m.mask_estimator_depth - 1), 2 * w]  # noqa: E731
    mask = sum(2 * frames * a * b for w in widths for a, b in zip(mlp_dims(w)[:-1], mlp_dims(w)[1:]))
    return band_split + transformers + mask


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
