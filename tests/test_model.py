"""Our network against audio-separator's BSRoformer (the class 1297 runs in), same weights."""

import math

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stemsep.checkpoint import CPU_SLICE_TOKENS, _ConfigLoader, build_model, load_config, load_model
from stemsep.synthetic import BANDS_1297, config_dict, write_checkpoint, write_config

Reference = pytest.importorskip("audio_separator.separator.uvr_lib_v5.roformer.bs_roformer").BSRoformer

REAL_CONFIG = "../shared/configs/model_bs_roformer_ep_317_sdr_12.9755.msst.yaml"


def reference_model(config_path):
    """audio-separator's BSRoformer built from the same yaml, the way it builds it."""
    raw = yaml.load(open(config_path), Loader=_ConfigLoader)["model"]
    return Reference(**raw).eval()


def max_error_vs_reference(tmp_path, config, seconds_of_hops, seed=0, channels=2, slice_tokens="default"):
    config_path = write_config(tmp_path / "model.yaml", config)
    torch.manual_seed(seed)
    ref = reference_model(config_path)
    checkpoint = write_checkpoint(tmp_path / "model.ckpt", ref.state_dict())
    ours = load_model(checkpoint, config_path)
    if slice_tokens != "default":
        ours.slice_tokens = slice_tokens
    hop = config["model"]["stft_hop_length"]
    audio = 0.5 * torch.randn(2, channels, hop * seconds_of_hops, generator=torch.Generator().manual_seed(seed + 1))
    with torch.inference_mode():
        expected, actual = ref(audio), ours(audio)
    assert actual.shape == audio.shape == expected.shape
    return (expected - actual).abs().max().item(), expected.abs().max().item()


def test_state_dict_layout_is_exactly_the_1297_checkpoint_layout():
    config = load_config(REAL_CONFIG)
    with torch.device("meta"):
        ours = build_model(config, "meta").state_dict()
        ref = reference_model(REAL_CONFIG).state_dict()
    assert list(ours) == list(ref)
    assert all(ours[k].shape == ref[k].shape for k in ref)
    assert len(ours) == 699
    model = build_model(config, "meta")
    assert sum(p.numel() for p in model.parameters()) == 159_758_092


def test_parity_with_full_1297_shapes_on_half_a_second(tmp_path):
    raw = yaml.load(open(REAL_CONFIG), Loader=_ConfigLoader)
    # 2 x 51 frames x 62 bands = 6,324 tokens: on the CPU the transformers run in slices of 4,096
    assert CPU_SLICE_TOKENS < 2 * 51 * 62
    error, peak = max_error_vs_reference(tmp_path, raw, seconds_of_hops=50)  # 50 hops = 0.5 s
    print(f"full 1297 shapes: max abs error {error:.2e} (output peak {peak:.2f})")
    assert error <= 1e-5


def random_bands(draw, bins):
    count = draw(st.integers(2, 12))
    cuts = sorted(draw(st.sets(st.integers(1, bins - 1), min_size=count - 1, max_size=count - 1)))
    return [b - a for a, b in zip([0, *cuts], [*cuts, bins])]


@st.composite
def tiny_configs(draw):
    n_fft = draw(st.sampled_from([256, 512, 2048]))
    bins = n_fft // 2 + 1
    bands = list(BANDS_1297) if n_fft == 2048 and draw(st.booleans()) else random_bands(draw, bins)
    model = {
        "dim": draw(st.sampled_from([8, 16, 32])),
        "depth": draw(st.integers(1, 2)),
        "time_transformer_depth": draw(st.integers(1, 2)),
        "freq_transformer_depth": draw(st.integers(1, 2)),
        "heads": draw(st.integers(1, 3)),
        "dim_head": draw(st.sampled_from([4, 8, 16])),
        "stereo": draw(st.booleans()),
        "mask_estimator_depth": draw(st.integers(1, 3)),
        "freqs_per_bands": bands,
        "stft_n_fft": n_fft,
        "stft_win_length": n_fft,
        "stft_hop_length": draw(st.sampled_from([n_fft // 4, n_fft // 2, 441 if n_fft == 2048 else n_fft // 4])),
    }
    return config_dict(model=model, audio={"chunk_size": 4 * n_fft})


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=tiny_configs(), seed=st.integers(0, 2**16), slice_tokens=st.sampled_from([None, 1, 37, 500]))
def test_parity_with_reference_on_random_small_configs(tmp_path, config, seed, slice_tokens):
    """Any config, and the transformers over any slicing (1: one sequence at a time)."""
    channels = 2 if config["model"]["stereo"] else 1
    error, peak = max_error_vs_reference(tmp_path, config, seconds_of_hops=40, seed=seed, channels=channels,
                                         slice_tokens=slice_tokens)
    assert error <= 1e-5, (error, peak)


def test_bf16_autocast_on_cpu_stays_close_to_fp32(tmp_path):
    """The GPU path's precision choice, exercised on CPU: same weights, bf16 transformers."""
    config = config_dict(model={"dim": 64, "depth": 2, "dim_head": 32, "heads": 2})
    config_path = write_config(tmp_path / "model.yaml", config)
    torch.manual_seed(0)
    checkpoint = write_checkpoint(tmp_path / "model.ckpt", reference_model(config_path).state_dict())
    model = load_model(checkpoint, config_path)
    audio = 0.5 * torch.randn(1, 2, 441 * 100, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        fp32 = model(audio)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(audio)
    assert bf16.dtype == torch.float32  # iSTFT output stays float32
    snr = 10 * math.log10(fp32.pow(2).sum() / (fp32 - bf16).pow(2).sum())
    print(f"bf16 autocast vs fp32: SNR {snr:.1f} dB")
    assert snr > 30


def test_slices_split_the_transformers_input_and_change_nothing(tmp_path):
    """Slicing really happens (more, smaller transformer calls) and gives the same output."""
    config_path = write_config(tmp_path / "model.yaml", config_dict(model={"dim": 16, "depth": 1, "dim_head": 8, "heads": 2}))
    torch.manual_seed(0)
    model = load_model(write_checkpoint(tmp_path / "model.ckpt", reference_model(config_path).state_dict()), config_path)
    assert model.slice_tokens == CPU_SLICE_TOKENS  # the CPU default
    calls = []
    for transformer in model.layers[0]:
        transformer.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    audio = 0.5 * torch.randn(1, 2, 441 * 200, generator=torch.Generator().manual_seed(1))  # 201 frames x 62 bands
    with torch.inference_mode():
        model.slice_tokens = None
        whole = model(audio)
        assert calls == [(62, 201, 16), (201, 62, 16)]
        calls.clear()
        model.slice_tokens = 1000
        sliced = model(audio)
    # time: 1000 // 201 = 4 sequences per slice (62 = 15 x 4 + 2); frequency: 16 per slice (201 = 12 x 16 + 9)
    assert calls == [(4, 201, 16)] * 15 + [(2, 201, 16)] + [(16, 62, 16)] * 12 + [(9, 62, 16)]
    assert (sliced - whole).abs().max() < 1e-6
