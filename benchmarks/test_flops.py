"""The benchmarks' FLOP count (for model FLOP utilization) against torch's own counter."""

from __future__ import annotations

import pytest
import torch
from flops import flops_per_chunk, flops_per_second
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from stemsep.checkpoint import build_model, load_config
from stemsep.testing import CONFIG_1297, CONFIG_KIM_MEL_BAND, config_dict, write_config

SMALL = {"dim": 64, "depth": 2, "heads": 4, "dim_head": 16, "time_transformer_depth": 2}


@pytest.mark.parametrize("model, base", [
    (SMALL, CONFIG_1297),  # BS-RoFormer, 1297's bands
    ({**SMALL, "num_stems": 4}, CONFIG_1297),  # four mask estimators
    ({**SMALL, "num_bands": 60}, CONFIG_KIM_MEL_BAND),  # MelBand-RoFormer, Kim's band count
], ids=["bs", "bs-4-stems", "mel-band"])
def test_flop_count_agrees_with_torch_flop_counter(tmp_path, model, base):
    training = {"instruments": ["bass", "drums", "other", "vocals"], "target_instrument": None} if model.get("num_stems") else {}
    config = load_config(write_config(tmp_path / "c.yaml", config_dict(
        model=model, audio={"chunk_size": 44100}, training=training, base=base)))
    model = build_model(config).eval()
    # The math SDPA backend decomposes attention into matmuls the counter sees.
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 2, config.audio.chunk_size))
    assert flops_per_chunk(config) == pytest.approx(counter.get_total_flops(), rel=0.05)


def test_flop_count_of_1297_and_kims_mel_band_model(tmp_path):
    config = load_config(write_config(tmp_path / "c.yaml", CONFIG_1297))
    assert flops_per_chunk(config) / 1e12 == pytest.approx(8.696, abs=0.001)  # per 8-s chunk
    assert flops_per_second(config) / 1e12 == pytest.approx(1.087, abs=0.001)  # per second of audio per pass
    config = load_config(write_config(tmp_path / "k.yaml", CONFIG_KIM_MEL_BAND))
    assert flops_per_second(config) / 1e12 == pytest.approx(0.388, abs=0.001)  # dim 384, depth 6, 60 bands
