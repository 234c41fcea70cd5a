"""unwa's HyperACE mask estimators against splifft 0.0.9's implementation of them, on the
same random weights at the published sizes, and our tensors against the published
checkpoints' names, shapes and sizes."""

import re

import pytest
import torch
from einops import rearrange

from stemsep.checkpoint import build_model, load_config, load_model
from stemsep.model import BSRoformer, HyperACEMaskEstimator, rotary_frequencies
from stemsep.testing import BANDS_1297, config_dict, write_checkpoint, write_config

splifft = pytest.importorskip("splifft.models.bs_roformer")
splifft_hyperace = pytest.importorskip("splifft.models.utils.hyperace")

# unwa's published HyperACE checkpoints: dim 256, depth 12, 960,000-sample chunks as splifft
# 0.0.9's data/config/bs_roformer-unwa-hyperace_*.json give them, MSST's BS-RoFormer values for
# the rest (stereo, one time and one frequency transformer per layer, 1297's 62 bands, hop
# 512); sizes in bytes from splifft 0.0.9's data/registry.json (v2 vocals 54cf516f..., v2
# instrumental 4d61178e..., v1 instrumental 907ac3c8...).
PUBLISHED_SIZES = {2: (288_724_430, 288_725_646), 1: (274_890_855,)}
HEADS = {1: "HyperAceResidualV1MaskEstimatorConfig", 2: "HyperAceResidualV2MaskEstimatorConfig"}
SEGM = {1: "SegmModelHyperAceV1", 2: "SegmModelHyperAceV2"}
HOP = 512


def published_config(version: int, depth: int = 12) -> dict:
    model = {"dim": 256, "depth": depth, "stft_hop_length": HOP, "use_mask_estimator_hyper_ace": True, "hyperace_version": version}
    return config_dict(model=model, audio={"chunk_size": 960_000})


def splifft_network(version: int, depth: int = 12, frames: int = 960_000 // HOP + 1):
    """splifft's BSRoformer with HyperACE mask estimators; its rotary tables span `frames` frames."""
    head = getattr(splifft, HEADS[version])(kind=f"hyperace_residual_v{version}")
    params = splifft.BSRoformerParams(chunk_size=(frames - 1) * HOP, output_stem_names=("vocals",), dim=256, depth=depth,
                                      band_config=splifft.FixedBandsConfig(kind="fixed"), mask_estimator=head)
    assert params.band_config.freqs_per_bands == BANDS_1297
    return splifft.BSRoformer(params).eval()


ATTENTION_NORM = re.compile(r"(layers\.\d+\.\d+\.layers\.\d+\.0\.)norm\.gamma")


def in_published_layout(state: dict[str, torch.Tensor], dim_head: int = 64) -> dict[str, torch.Tensor]:
    """splifft's state dict under the published checkpoints' names. They were saved from
    unwa's MSST code (vendored by MSST-WebUI as modules/bs_roformer), whose attention layers
    hold lucidrains' rotary table `rotary_embed.freqs` ahead of their norm; splifft computes
    the table instead and saves none. Every other name is the same, in the same order."""
    published = {}
    for key, tensor in state.items():
        if attention := ATTENTION_NORM.fullmatch(key):
            published[attention[1] + "rotary_embed.freqs"] = rotary_frequencies(dim_head)
        published[key] = tensor
    return published


# layout --------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [2, 1])
def test_tensors_are_the_published_checkpoints_and_their_size(tmp_path, version):
    """Names, order and shapes of every tensor as in the published checkpoints; their float32
    bytes within the pickle's overhead (+0.5%) of the published files' sizes."""
    config = load_config(write_config(tmp_path / "c.yaml", published_config(version)))
    ours = build_model(config, "meta").state_dict()
    published = in_published_layout(splifft_network(version).state_dict())
    assert list(ours) == list(published)
    assert all(ours[k].shape == published[k].shape for k in ours)
    assert any(k.startswith("mask_estimators.0.segm.hyperace.") for k in ours)
    weight_bytes = 4 * sum(t.numel() for t in ours.values())
    for size in PUBLISHED_SIZES[version]:
        assert weight_bytes <= size <= 1.005 * weight_bytes, (weight_bytes, size)


# parity --------------------------------------------------------------------------------------


SMALL_BANDS = (8,) * 16 + (1,)  # a 256-point STFT's 129 bins


@pytest.mark.parametrize(
    "version, bands, frames",
    [pytest.param(version, BANDS_1297, 44, marks=pytest.mark.slow, id=f"v{version}-published") for version in (2, 1)]
    + [pytest.param(version, SMALL_BANDS, 8, id=f"v{version}-small") for version in (2, 1)],
)
def test_mask_estimator_matches_splifft_in_float32(version, bands, frames):
    """One stem's mask estimator, the same tokens in: band MLPs plus the HyperACE residual,
    float32, to 1e-5 of the peak; at the published sizes (dim 256, 62 bands, 1025 bins,
    0.5 s of frames) and on a small token grid for the quick loop."""
    widths = tuple(4 * bins for bins in bands)  # stereo x re/im values per band
    torch.manual_seed(version)
    segm = getattr(splifft_hyperace, SEGM[version])(in_bands=len(widths), in_dim=256, out_bins=sum(bands),
                                                    num_hyperedges=16 * version)
    reference = splifft.HyperAceResidualMaskEstimator(dim=256, dim_inputs=widths, depth=2, mlp_expansion_factor=4, segm=segm).eval()
    with torch.device("meta"):
        ours = HyperACEMaskEstimator(256, widths, hidden_layers=1, expansion=4, version=version, bins=sum(bands))
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    tokens = torch.randn(1, frames, len(widths), 256, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, actual = reference(tokens), ours.eval()(tokens)
    assert actual.shape == expected.shape == (1, frames, sum(widths))
    error, peak = (expected - actual).abs().max().item(), expected.abs().max().item()
    print(f"v{version} mask estimator, {len(bands)} bands, float32: max abs error {error:.2e} of peak {peak:.2f}")
    assert error <= 1e-5 * peak


def splifft_estimate(reference, audio: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """The stem splifft's network estimates: its mask on our STFT of `audio`, our iSTFT."""
    b, channels, samples = audio.shape
    stft = dict(n_fft=2048, hop_length=HOP, win_length=2048, window=window, center=True)
    spec = torch.stft(audio.reshape(b * channels, samples), return_complex=True, **stft)  # ((b s), f, t)
    spec = rearrange(spec, "(b s) f t -> b 1 (f s) t", s=channels)
    mask = torch.view_as_complex(reference(torch.view_as_real(spec[:, 0])).contiguous())  # (b, n, (f s), t)
    stems = torch.istft(rearrange(spec * mask, "b n (f s) t -> (b n s) f t", s=channels), length=samples, **stft)
    return rearrange(stems, "(b n s) t -> b n s t", b=b, s=channels)


def with_exact_rotary_tables(reference, dtype: torch.dtype):
    """splifft computes its rotary cos/sin tables in float32; a float64 comparison gives it
    the float64 ones of the same (stored) frequencies."""
    for module in reference.modules():
        if isinstance(module, splifft.RotaryEmbedding):
            angles = torch.arange(module.cos_emb.shape[0], dtype=torch.float64)[:, None] * \
                rotary_frequencies(64).double().repeat_interleave(2)
            module.cos_emb, module.sin_emb = angles.cos().to(dtype), angles.sin().to(dtype)
    return reference


@pytest.mark.slow
def test_whole_network_matches_splifft(tmp_path):
    """The published HyperACE v2 network whole (depth 12), random weights saved by splifft
    in the published layout and loaded through a plain BS-RoFormer yaml, 0.24 s of noise.

    In float64 the two agree to 1e-5 of the peak (they compute the same function). In float32
    they cannot: the HyperACE network amplifies its input's rounding about a thousandfold
    (40-odd instance-normed layers; a 1e-6 change of its input moves its output 5e-4), and
    our transformers round differently from splifft's. So float32 is held to splifft's own
    float32 error: ours may be at most twice as far from the float64 result as splifft's is."""
    hops = 21
    torch.manual_seed(0)
    reference = splifft_network(2, frames=hops + 1)
    checkpoint = write_checkpoint(tmp_path / "hyperace.ckpt", in_published_layout(reference.state_dict()))
    plain = published_config(2)
    del plain["model"]["use_mask_estimator_hyper_ace"], plain["model"]["hyperace_version"]  # as the published yaml
    ours = load_model(checkpoint, write_config(tmp_path / "plain.yaml", plain))
    assert isinstance(ours, BSRoformer) and ours.config.hyperace_version == 2
    audio = 0.5 * torch.randn(1, 2, hops * HOP, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    results = {}
    with torch.inference_mode():
        for dtype in (torch.float32, torch.float64):  # float32 first, with splifft's own rotary tables
            ref = with_exact_rotary_tables(reference.to(dtype), dtype) if dtype == torch.float64 else reference.to(dtype)
            results[dtype] = ours.to(dtype)(audio.to(dtype)), splifft_estimate(ref, audio.to(dtype), ours.window)
    (ours64, ref64), (ours32, ref32) = results[torch.float64], results[torch.float32]
    peak = ref64.abs().max().item()
    error64 = (ours64 - ref64).abs().max().item()
    error32, splifft_error32 = (ours32.double() - ref64).abs().max().item(), (ref32.double() - ref64).abs().max().item()
    print(f"float64: max abs error {error64:.2e} of peak {peak:.2f}; float32 from the float64 result: "
          f"ours {error32:.2e}, splifft's {splifft_error32:.2e}")
    assert error64 <= 1e-5 * peak
    assert error32 <= 2 * splifft_error32 + 1e-6 * peak
