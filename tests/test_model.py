"""Our networks against audio-separator's BSRoformer and MelBandRoformer (the classes the
published checkpoints run in), on the same weights; and 1297's output pinned bit for bit."""

import inspect
import math
import warnings
from dataclasses import MISSING, fields
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from stemsep.checkpoint import (
    CPU_SLICE_TOKENS,
    _ConfigLoader,
    build_model,
    load_config,
    load_model,
)
from stemsep.model import (
    BSRoformerConfig,
    MelBandRoformer,
    MelBandRoformerConfig,
    mel_bands,
)
from stemsep.testing import (
    BANDS_1297,
    CONFIG_KIM_MEL_BAND,
    config_dict,
    make_model_files,
    write_checkpoint,
    write_config,
)

REAL_CONFIG = Path(__file__).parent / "data" / "model_bs_roformer_ep_317_sdr_12.9755.yaml"
ROFORMER = "audio_separator.separator.uvr_lib_v5.roformer"


def reference_class(mel: bool):
    module = pytest.importorskip(f"{ROFORMER}.{'mel_band_roformer' if mel else 'bs_roformer'}")
    return module.MelBandRoformer if mel else module.BSRoformer


def reference_model(config_path):
    """audio-separator's class for the yaml, built from its model section as audio-separator builds it."""
    raw = yaml.load(Path(config_path).read_text(), Loader=_ConfigLoader)["model"]
    return reference_class("num_bands" in raw)(**raw).eval()


def with_stem_axis(reference_output, stems):
    """The reference returns (b, c, n) for one stem, (b, stems, c, n) for more; ours always the latter."""
    return reference_output[:, None] if stems == 1 else reference_output


def max_error_vs_reference(tmp_path, config, hops, seed=0, slice_tokens="default", wrap=lambda state: state):
    """Max abs difference between our network and the reference on the reference's random
    weights (saved through `wrap`), and the output's peak."""
    config_path = write_config(tmp_path / "model.yaml", config)
    torch.manual_seed(seed)
    ref = reference_model(config_path)
    checkpoint = tmp_path / "model.ckpt"
    torch.save(wrap(ref.state_dict()), checkpoint)
    ours = load_model(checkpoint, config_path)
    if slice_tokens != "default":
        ours.slice_tokens = slice_tokens
    model = config["model"]
    channels = 2 if model["stereo"] else 1
    audio = 0.5 * torch.randn(2, channels, model["stft_hop_length"] * hops, generator=torch.Generator().manual_seed(seed + 1))
    with torch.inference_mode():
        expected, actual = with_stem_axis(ref(audio), model.get("num_stems", 1)), ours(audio)
    assert actual.shape == (2, model.get("num_stems", 1), channels, audio.shape[-1]) == expected.shape
    return (expected - actual).abs().max().item(), expected.abs().max().item()


# 1297 pinned ---------------------------------------------------------------------------------


def seeded_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Weights drawn from one seeded generator in state-dict order, scaled like an
    initialization; the rotary tables as the reference makes them. Independent of how the
    network initializes itself, so refactoring it cannot change them."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, tensor in model.state_dict().items():
        if key.endswith("rotary_embed.freqs"):
            d = 2 * tensor.shape[0]
            state[key] = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
        elif key.endswith("gamma"):
            state[key] = 1 + 0.1 * torch.randn(tensor.shape, generator=generator)
        elif key.endswith("weight"):
            state[key] = torch.randn(tensor.shape, generator=generator) * tensor.shape[1] ** -0.5
        else:
            state[key] = 0.1 * torch.randn(tensor.shape, generator=generator)
    return state


# Recorded before MelBand-RoFormer and multi-stem output were added (x86-64, torch 2.13.0
# CPU, 1 and 2 threads alike): the vocals at 8 evenly spaced positions and their RMS. An
# exact hash of the output held on the CPU it was recorded on but not on another x86-64
# model (AVX-512 kernels round differently: 2e-7 apart), so the check is to 1e-6.
GOLDEN_1297_SAMPLES = [0.038960810750722885, -0.01918417029082775, -0.16393740475177765, -0.12935929000377655,
                       -0.06460165232419968, 0.01982124149799347, -0.23652537167072296, 0.02218225970864296]
GOLDEN_1297_RMS = 0.1356758461610553


@pytest.mark.slow
def test_1297_output_matches_the_recorded_one():
    """Full 1297 shapes, seeded weights, 0.3 s of seeded noise: the vocals as recorded, to 1e-6."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model(load_config(REAL_CONFIG), "meta")
        model.load_state_dict(seeded_state(model, 1297), strict=True, assign=True)
        audio = 0.5 * torch.randn(1, 2, 13230, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            out = model.eval()(audio)
    finally:
        torch.set_num_threads(threads)
    assert out.shape == (1, 1, 2, 13230)
    vocals = out[:, 0].double()
    positions = torch.linspace(0, vocals.numel() - 1, 8).long()
    assert vocals.flatten()[positions].tolist() == pytest.approx(GOLDEN_1297_SAMPLES, abs=1e-6)
    assert float(vocals.pow(2).mean().sqrt()) == pytest.approx(GOLDEN_1297_RMS, rel=1e-6)


# layouts -------------------------------------------------------------------------------------


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


def test_state_dict_layout_is_exactly_the_mel_band_reference_layout(tmp_path):
    """Kim's vocals shapes: per-transformer norms, no final norm, 60 mel bands."""
    config_path = write_config(tmp_path / "kim.yaml", CONFIG_KIM_MEL_BAND)
    with torch.device("meta"):
        ours = build_model(load_config(config_path), "meta").state_dict()
        ref = reference_model(config_path).state_dict()
    assert list(ours) == list(ref)
    assert all(ours[k].shape == ref[k].shape for k in ref)
    assert "layers.0.0.norm.gamma" in ours and "final_norm.gamma" not in ours


# MSST-WebUI's BSRoformer keys for HyperACE mask estimators (audio-separator has none), and
# their defaults there (modules/bs_roformer/bs_roformer.py).
MSST_WEBUI_HYPERACE_DEFAULTS = {"use_mask_estimator_hyper_ace": False, "hyperace_version": None}


@pytest.mark.parametrize("config_class", [BSRoformerConfig, MelBandRoformerConfig])
def test_config_defaults_are_the_reference_class_defaults(config_class):
    """A key a yaml leaves out means what it means to audio-separator's class (MSST-WebUI's for HyperACE's)."""
    mel = config_class is MelBandRoformerConfig
    defaults = {name: p.default for name, p in inspect.signature(reference_class(mel).__init__).parameters.items()}
    if not mel:
        defaults.update(MSST_WEBUI_HYPERACE_DEFAULTS)
    for field in fields(config_class):
        if field.default is not MISSING:
            assert defaults[field.name] == field.default, field.name


@pytest.mark.parametrize(
    "sample_rate, n_fft, num_bands",
    [(44100, 2048, 60), (44100, 2048, 64), (44100, 1024, 32), (48000, 2048, 60), (22050, 512, 48), (16000, 4096, 128),
     (44100, 256, 8), (32000, 2048, 96)],
)
@pytest.mark.parametrize("stereo", [True, False])
def test_mel_band_layout_is_the_reference_layout(sample_rate, n_fft, num_bands, stereo):
    """Which bins feed which band, in which order, and each bin's divisor when the band masks are averaged."""
    torch.manual_seed(0)
    ref = reference_class(mel=True)(
        dim=8, depth=1, num_bands=num_bands, sample_rate=sample_rate, stft_n_fft=n_fft, stft_win_length=n_fft, stereo=stereo
    )
    config = MelBandRoformerConfig(
        dim=8, depth=1, num_bands=num_bands, sample_rate=sample_rate, stft_n_fft=n_fft, stft_win_length=n_fft, stereo=stereo
    )
    ours = MelBandRoformer(config)
    channels = 2 if stereo else 1
    assert torch.equal(ours.rows, ref.freq_indices)
    assert torch.equal(ours.bands_per_row, ref.num_bands_per_freq.repeat_interleave(channels).float())
    assert ours.band_split.band_widths == tuple(2 * channels * n for n in ref.num_freqs_per_band.tolist())
    assert np.array_equal(mel_bands(sample_rate, n_fft, num_bands), ref.freqs_per_band.numpy())


def test_mel_bands_are_librosas_filter_bank_support():
    """librosa itself (what the reference calls), over many sample rates, sizes and band counts."""
    filters = pytest.importorskip("librosa").filters
    checked = 0
    for sample_rate in (8000, 22050, 44100, 48000, 96000):
        for n_fft in (256, 1024, 2048, 4096):
            for num_bands in (8, 24, 60, 64, 128):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # librosa warns of empty filters, on layouts we refuse
                    expected = filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=num_bands) > 0
                expected[0, 0] = expected[-1, -1] = True
                if not (expected.any(axis=0).all() and expected.any(axis=1).all()):
                    with pytest.raises(ValueError, match="gets no STFT bin|is in no mel band"):
                        mel_bands(sample_rate, n_fft, num_bands)
                    continue
                assert np.array_equal(mel_bands(sample_rate, n_fft, num_bands), expected), (sample_rate, n_fft, num_bands)
                checked += 1
    assert checked > 60


# parity --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_parity_with_full_1297_shapes_on_half_a_second(tmp_path):
    raw = yaml.load(REAL_CONFIG.read_text(), Loader=_ConfigLoader)
    # 2 x 51 frames x 62 bands = 6,324 tokens: on the CPU the transformers run in slices of 4,096
    assert CPU_SLICE_TOKENS < 2 * 51 * 62
    error, peak = max_error_vs_reference(tmp_path, raw, hops=50)  # 50 hops = 0.5 s
    print(f"full 1297 shapes: max abs error {error:.2e} (output peak {peak:.2f})")
    assert error <= 1e-5 * peak


@pytest.mark.slow
def test_parity_with_kim_mel_band_shapes_on_a_quarter_second(tmp_path):
    """dim 384, depth 6, 60 mel bands, stereo, n_fft 2048, hop 441."""
    error, peak = max_error_vs_reference(tmp_path, CONFIG_KIM_MEL_BAND, hops=25)
    print(f"Kim MelBand shapes: max abs error {error:.2e} (output peak {peak:.2f})")
    assert error <= 1e-5 * peak


def test_parity_multi_stem_bs_roformer_with_mlp_expansion_2(tmp_path):
    """MSST's 4-stem BS-RoFormer keys (num_stems 4, mlp_expansion_factor 2), at a small size."""
    config = config_dict(
        model={"dim": 32, "depth": 2, "dim_head": 16, "heads": 2, "num_stems": 4, "mlp_expansion_factor": 2},
        training={"instruments": ["drums", "bass", "other", "vocals"], "target_instrument": None},
    )
    error, peak = max_error_vs_reference(tmp_path, config, hops=30)
    print(f"4-stem BS-RoFormer, mlp x2: max abs error {error:.2e} (output peak {peak:.2f})")
    assert error <= 1e-5 * peak


def test_mel_band_mlp_expansion_factor_is_msst_s(tmp_path):
    """audio-separator's MelBandRoformer drops `mlp_expansion_factor` (its mask estimators are
    always 4 x dim wide, so it cannot load MSST's factor-2 checkpoints); MSST passes it to
    the mask estimators. We follow MSST: the reference with its estimators rebuilt that way."""
    module = pytest.importorskip(f"{ROFORMER}.mel_band_roformer")
    model = {**CONFIG_KIM_MEL_BAND["model"], "dim": 32, "depth": 1, "dim_head": 16, "heads": 2,
             "num_stems": 2, "mlp_expansion_factor": 2}
    config_path = write_config(tmp_path / "m.yaml", config_dict(model=model, base=CONFIG_KIM_MEL_BAND, training={
        "instruments": ["vocals", "other"], "target_instrument": None}))
    torch.manual_seed(0)
    ref = reference_model(config_path)
    widths = ref.band_split.dim_inputs
    ref.mask_estimators = torch.nn.ModuleList(
        module.MaskEstimator(dim=32, dim_inputs=widths, depth=2, mlp_expansion_factor=2) for _ in range(2)
    )
    ours = load_model(write_checkpoint(tmp_path / "m.ckpt", ref.state_dict()), config_path)
    assert ours.mask_estimators[0].to_freqs[0][0][0].weight.shape == (64, 32)
    audio = 0.5 * torch.randn(1, 2, 441 * 20, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, actual = ref.eval()(audio), ours(audio)
    assert (expected - actual).abs().max() <= 1e-5 * expected.abs().max()


def random_bands(draw, bins):
    count = draw(st.integers(2, 12))
    cuts = sorted(draw(st.sets(st.integers(1, bins - 1), min_size=count - 1, max_size=count - 1)))
    return [b - a for a, b in zip([0, *cuts], [*cuts, bins])]


@st.composite
def small_configs(draw):
    """Either architecture, any shape options, 1-4 stems."""
    mel = draw(st.booleans())
    n_fft = draw(st.sampled_from([256, 512, 2048]))
    stems = draw(st.integers(1, 4))
    model = {
        "dim": draw(st.sampled_from([8, 16, 32])),
        "depth": draw(st.integers(1, 2)),
        "time_transformer_depth": draw(st.integers(1, 2)),
        "freq_transformer_depth": draw(st.integers(1, 2)),
        "heads": draw(st.integers(1, 3)),
        "dim_head": draw(st.sampled_from([4, 8, 16])),
        "stereo": draw(st.booleans()),
        "num_stems": stems,
        "mask_estimator_depth": draw(st.integers(1, 3)),
        "stft_n_fft": n_fft,
        "stft_win_length": n_fft,
        "stft_hop_length": draw(st.sampled_from([n_fft // 4, n_fft // 2, 441 if n_fft == 2048 else n_fft // 4])),
    }
    if mel:
        sample_rate = draw(st.sampled_from([22050, 44100, 48000]))
        num_bands = draw(st.integers(2, 64))
        try:
            mel_bands(sample_rate, n_fft, num_bands)
        except ValueError:
            assume(False)
        model.update(num_bands=num_bands, sample_rate=sample_rate)
    else:
        bins = n_fft // 2 + 1
        bands = list(BANDS_1297) if n_fft == 2048 and draw(st.booleans()) else random_bands(draw, bins)
        model.update(freqs_per_bands=bands, mlp_expansion_factor=draw(st.sampled_from([1, 2, 4])))
    names = ["vocals", "drums", "bass", "other"][:stems] if stems > 1 else ["vocals", "other"]
    training = {"instruments": names, "target_instrument": None if stems > 1 else "vocals"}
    base = CONFIG_KIM_MEL_BAND if mel else None
    return config_dict(model=model, audio={"chunk_size": 4 * n_fft}, training=training, **({"base": base} if mel else {}))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=small_configs(), seed=st.integers(0, 2**16), slice_tokens=st.sampled_from([None, 1, 37, 500]))
def test_parity_with_reference_on_random_small_configs(tmp_path, config, seed, slice_tokens):
    """Any config of either architecture, and the transformers over any slicing (1: one sequence at a time)."""
    error, peak = max_error_vs_reference(tmp_path, config, hops=24, seed=seed, slice_tokens=slice_tokens)
    assert error <= 1e-5 * peak, (error, peak)


# constructed weights, precision, slicing -----------------------------------------------------


def test_constant_masks_per_stem_give_known_stems_through_mel_band_averaging(tmp_path):
    """Masks 1, 0.5 and 0 on a 3-stem MelBand-RoFormer: the input, half of it, silence
    (overlapping bands average equal masks back to the same mask)."""
    config = config_dict(
        model={"dim": 16, "depth": 1, "dim_head": 8, "heads": 2, "num_stems": 3},
        base=CONFIG_KIM_MEL_BAND,
        training={"instruments": ["vocals", "drums", "other"], "target_instrument": None},
    )
    checkpoint, config_path = make_model_files(tmp_path, config, mask=[1, 0.5, 0])
    model = load_model(checkpoint, config_path)
    audio = 0.5 * torch.randn(1, 2, 441 * 40, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = model(audio)
    assert (out[:, 0] - audio).abs().max() < 1e-5
    assert (out[:, 1] - audio / 2).abs().max() < 1e-5
    assert out[:, 2].abs().max() < 1e-6


def test_wrong_channel_count_is_a_value_error(tmp_path):
    model = load_model(*make_model_files(tmp_path, config_dict(model={"dim": 8, "depth": 1, "dim_head": 4, "heads": 1})))
    with pytest.raises(ValueError, match="takes 2 audio channel"):
        model(torch.zeros(1, 1, 4410))


@pytest.mark.parametrize("mel", [False, True])
def test_bf16_autocast_on_cpu_stays_close_to_fp32(tmp_path, mel):
    """The GPU path's precision choice, exercised on CPU: same weights, bf16 transformers."""
    config = config_dict(model={"dim": 64, "depth": 2, "dim_head": 32, "heads": 2}, **({"base": CONFIG_KIM_MEL_BAND} if mel else {}))
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


@pytest.mark.parametrize("mel", [False, True])
def test_slices_split_the_transformers_input_and_change_nothing(tmp_path, mel):
    """Slicing really happens (more, smaller transformer calls) and gives the same output."""
    tiny = {"dim": 16, "depth": 1, "dim_head": 8, "heads": 2, **({"num_bands": 62} if mel else {})}
    config_path = write_config(tmp_path / "model.yaml", config_dict(model=tiny, **({"base": CONFIG_KIM_MEL_BAND} if mel else {})))
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
