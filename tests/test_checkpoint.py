"""Config parsing and checkpoint loading: the real yaml parses, the architecture and stem
names come from the config (or the checkpoint's tensor names where the yaml leaves them
open), wrapped and half-precision checkpoints load, every bad file gets one clear sentence."""

import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml

from stemsep.checkpoint import (
    _CONFORMER_KEYS,
    _UNSUPPORTED_MODEL_KEYS,
    IGNORED_MODEL_KEYS,
    _ConfigLoader,
    complement_name,
    load_config,
    load_model,
    load_state_dict,
)
from stemsep.errors import CheckpointError, ConfigError
from stemsep.model import (
    BSRoformer,
    BSRoformerConfig,
    HyperACEMaskEstimator,
    MaskEstimator,
    MelBandRoformer,
    MelBandRoformerConfig,
)
from stemsep.testing import (
    CONFIG_KIM_MEL_BAND,
    FAST_MODEL,
    TINY_MODEL,
    config_dict,
    make_model_files,
    random_state_dict,
    write_checkpoint,
    write_config,
)

REAL_CONFIG = Path(__file__).parent / "data" / "model_bs_roformer_ep_317_sdr_12.9755.yaml"


@pytest.fixture
def tiny(tmp_path):
    return make_model_files(tmp_path, config_dict(model=TINY_MODEL))


def test_real_1297_yaml_parses_with_its_python_tuple_tags():
    config = load_config(REAL_CONFIG)
    assert config.audio.sample_rate == 44100 and config.audio.chunk_size == 352800
    assert config.model.dim == 512 and config.model.depth == 12 and config.model.stereo
    assert len(config.model.freqs_per_bands) == 62 and sum(config.model.freqs_per_bands) == 1025
    assert (config.model.stft_hop_length, config.model.stft_n_fft) == (441, 2048)
    assert config.training.target_instrument == "vocals"
    assert (config.inference.num_overlap, config.inference.batch_size) == (2, 4)  # ZFTurbo's copy
    assert isinstance(config.model, BSRoformerConfig)
    assert config.network_stems == ("vocals",) and config.complement_stem == "instrumental"


def test_yaml_loader_stays_safe(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("audio: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="evil.yaml: not valid YAML"):
        load_config(evil)


def test_unknown_keys_are_tolerated_and_missing_inference_defaults(tmp_path):
    raw = config_dict(model=TINY_MODEL)
    raw["audio"]["something_new"] = 1
    raw["extra_section"] = {"x": 1}
    del raw["inference"]
    config = load_config(write_config(tmp_path / "c.yaml", raw))
    assert config.inference.num_overlap == 4 and config.inference.batch_size == 1


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c["model"].pop("dim"), r"c.yaml: section 'model' lacks required key\(s\) dim"),
        (lambda c: c.pop("audio"), r"c.yaml: missing section 'audio'"),
        (lambda c: c["model"].update(dim="big"), r"c.yaml: model.dim should be int, got 'big'"),
        (lambda c: c["model"].update(freqs_per_bands=[2, 2]), r"freqs_per_bands sum to 4 but an STFT of 2048 has 1025 bins"),
        (lambda c: c["model"].update(stereo="yes"), r"c.yaml: model.stereo should be bool, got 'yes'"),
        (lambda c: c["model"].update(freqs_per_bands=[2, "x"]), r"model.freqs_per_bands should be a list of ints"),
        (lambda c: c["training"].update(target_instrument=3), r"training.target_instrument should be str or null, got 3"),
        (lambda c: c["model"].update(dim=0), r"c.yaml: model.dim must be at least 1, got 0"),
        (lambda c: c["model"].update(stft_win_length=4096), r"stft_win_length 4096 is longer than stft_n_fft 2048"),
        (lambda c: c["model"].update(num_stems=2), r"num_stems is 2 but a model with a target_instrument predicts one stem"),
        (lambda c: c["training"].update(target_instrument=None), r"num_stems is 1 but training.instruments names 2 stems"),
        (lambda c: c["training"].update(target_instrument=None, instruments=["vocals"]), r"names fewer than 2 stems"),
        (lambda c: c["training"].update(instruments=["Vocals", "vocals"]), r"names a stem twice"),
        (lambda c: c["model"].update(linear_transformer_depth=1), r"model.linear_transformer_depth 1 asks for linear-attention"),
        (lambda c: c["model"].update(skip_connection=True), r"model.skip_connection True asks for MSST's sums"),
        (lambda c: c["model"].update(use_shared_bias=True), r"model.use_shared_bias True asks for"),
        (lambda c: c["model"].update(use_pope=True), r"model.use_pope True asks for MSST's PoPE \(polar\) position embeddings"),
        (lambda c: c["model"].update(use_mask_estimator_fno=True), r"asks for MSST-WebUI's FNO mask estimators \(unwa's Inst-FNO\)"),
        (lambda c: c["model"].update(use_mask_estimator_hyper_ace=True, hyperace_version=3),
         r"model.hyperace_version should be 1 or 2 for HyperACE mask estimators, got 3"),
        (lambda c: c["model"].update(use_mask_estimator_hyper_ace=True), r"model.hyperace_version should be 1 or 2 .*, got None"),
        (lambda c: c["model"].update(use_mask_estimator_hyper_ace=True, hyperace_version=2, stereo=False),
         r"c.yaml: HyperACE mask estimators need a stereo model"),
        (lambda c: c["model"].update(time_conformer_depth=1), r"model.time_conformer_depth belongs to a Conformer model"),
        (lambda c: c.update(model_type="htdemucs"), r"model_type 'htdemucs' is not one stemsep runs"),
        (lambda c: c.update(model_type="mel_band_roformer"), r"model_type is mel_band_roformer but the model section has freqs_per_bands"),
        (lambda c: c["model"].pop("freqs_per_bands"), r"cannot tell the architecture: the model section has neither"),
        (lambda c: c["model"].update(num_bands=60), r"cannot tell the architecture: the model section has both"),
    ],
)
def test_bad_config_gives_one_sentence_naming_the_file(tmp_path, mutate, message):
    raw = config_dict(model=TINY_MODEL)
    mutate(raw)
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path / "c.yaml", raw))


def test_missing_config_and_non_mapping_yaml(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: not a model config"):
        load_config(tmp_path / "list.yaml")


def test_good_checkpoint_loads_in_eval_mode_without_grad(tiny):
    model = load_model(*tiny)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    out = model(torch.zeros(1, 2, 4410))
    assert out.shape == (1, 1, 2, 4410)  # (batch, stems, channels, samples)


def test_missing_checkpoint(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="absent.ckpt: checkpoint file not found"):
        load_model(tmp_path / "absent.ckpt", tiny[1])
    with pytest.raises(CheckpointError, match="is a directory"):
        load_model(tmp_path, tiny[1])


@pytest.mark.parametrize("keep", [0, 100, 0.5])
def test_truncated_checkpoint(tiny, tmp_path, keep):
    data = tiny[0].read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match=r"cut.ckpt: not a (readable )?PyTorch checkpoint"):
        load_state_dict(cut)


def test_random_bytes_and_text_are_not_checkpoints(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(CheckpointError, match="junk.ckpt: not a"):
        load_state_dict(junk)


def test_pickle_with_code_is_refused_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.ckpt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(CheckpointError, match="evil.ckpt: contains Python objects besides tensors"):
        load_state_dict(path)


@pytest.mark.parametrize("obj", [[1, 2, 3], {"a": 1}, {}, torch.zeros(3)])
def test_pickle_that_is_not_a_state_dict(tmp_path, obj):
    path = tmp_path / "notsd.ckpt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="notsd.ckpt: not a state dict"):
        load_state_dict(path)


WRAPPERS = {
    "state_dict": lambda state: {"state_dict": state, "epoch": 317},
    "model": lambda state: {"model": state, "optimizer": {"lr": torch.tensor(1e-5)}},
    "module.": lambda state: {f"module.{k}": v for k, v in state.items()},
    "state_dict + module.": lambda state: {"state_dict": {f"module.{k}": v for k, v in state.items()}},
}


@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("base", [None, CONFIG_KIM_MEL_BAND], ids=["bs", "mel"])
def test_wrapped_checkpoints_load_strictly_and_match_the_reference(tmp_path, wrapper, base):
    """Saved by Lightning, by MSST (`model`), under DataParallel (`module.`): same network as bare."""
    reference = pytest.importorskip("audio_separator.separator.uvr_lib_v5.roformer.mel_band_roformer" if base else
                                    "audio_separator.separator.uvr_lib_v5.roformer.bs_roformer")
    config = config_dict(model=TINY_MODEL, **({"base": base} if base else {}))
    config_path = write_config(tmp_path / "model.yaml", config)
    torch.manual_seed(0)
    raw = yaml.load(config_path.read_text(), Loader=_ConfigLoader)["model"]
    ref = (reference.MelBandRoformer if base else reference.BSRoformer)(**raw).eval()
    path = tmp_path / "wrapped.ckpt"
    torch.save(WRAPPERS[wrapper](ref.state_dict()), path)
    model = load_model(path, config_path)
    assert isinstance(model, MelBandRoformer if base else BSRoformer)
    audio = 0.5 * torch.randn(1, 2, 441 * 20, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, actual = ref(audio)[:, None], model(audio)
    error = (expected - actual).abs().max().item()
    print(f"{wrapper} ({'mel' if base else 'bs'}): max abs error {error:.2e} of peak {expected.abs().max().item():.2f}")
    assert error <= 1e-5 * expected.abs().max().item()


def test_a_partial_module_prefix_is_not_stripped(tiny, tmp_path):
    state = torch.load(tiny[0], weights_only=True)
    first = next(iter(state))
    state[f"module.{first}"] = state.pop(first)
    path = tmp_path / "partial.ckpt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"1 parameter\(s\) missing .*; 1 unexpected \(e.g. module\."):
        load_model(path, tiny[1])


# architecture and stems ----------------------------------------------------------------------


def test_architecture_from_band_key_or_model_type(tmp_path):
    mel = load_config(write_config(tmp_path / "mel.yaml", config_dict(model=TINY_MODEL, base=CONFIG_KIM_MEL_BAND)))
    assert type(mel.model) is MelBandRoformerConfig and mel.model.num_bands == 60
    named = {**config_dict(model=TINY_MODEL), "model_type": "bs_roformer"}
    assert type(load_config(write_config(tmp_path / "bs.yaml", named)).model) is BSRoformerConfig
    # MSST itself reads it from `training`
    in_training = config_dict(model=TINY_MODEL, base=CONFIG_KIM_MEL_BAND)
    in_training["training"]["model_type"] = "mel_band_roformer"
    assert type(load_config(write_config(tmp_path / "t.yaml", in_training)).model) is MelBandRoformerConfig


def test_mel_band_defaults_where_the_yaml_is_silent(tmp_path):
    raw = config_dict(model=TINY_MODEL, base=CONFIG_KIM_MEL_BAND)
    for key in ("mask_estimator_depth", "sample_rate", "stereo", "time_transformer_depth"):
        del raw["model"][key]
    model = load_config(write_config(tmp_path / "m.yaml", raw)).model
    assert (model.mask_estimator_depth, model.sample_rate, model.stereo, model.time_transformer_depth) == (1, 44100, False, 2)


def test_too_many_mel_bands_for_the_stft_is_a_config_error(tmp_path):
    raw = config_dict(model={**TINY_MODEL, "num_bands": 60, "stft_n_fft": 256, "stft_win_length": 256},
                      audio={"chunk_size": 1024}, base=CONFIG_KIM_MEL_BAND)
    with pytest.raises(ConfigError, match=r"c.yaml: model.num_bands 60 does not fit the STFT: mel band \d+ of 60 gets no STFT bin"):
        load_config(write_config(tmp_path / "c.yaml", raw))


@pytest.mark.parametrize(
    "instruments, target, num_stems, stems, complement",
    [
        (["Vocals", "Instrumental"], "Vocals", 1, ("vocals",), "instrumental"),
        (["vocals", "other"], "vocals", 1, ("vocals",), "instrumental"),
        (["other", "vocals"], "other", 1, ("other",), "vocals"),
        (["Instrumental", "Vocals"], "Instrumental", 1, ("instrumental",), "vocals"),
        (["noreverb", "reverb"], "noreverb", 1, ("noreverb",), "reverb"),
        (["vocals", "bass", "drums", "other"], "drums", 1, ("drums",), "no_drums"),
        (["dry"], "dry", 1, ("dry",), "no_dry"),
        (["Drums", "Bass", "Other", "Vocals"], None, 4, ("drums", "bass", "other", "vocals"), None),
        (["Vocals", "Instrumental"], None, 2, ("vocals", "instrumental"), None),
    ],
)
def test_stem_names_come_from_the_config(tmp_path, instruments, target, num_stems, stems, complement):
    raw = config_dict(model={**TINY_MODEL, "num_stems": num_stems},
                      training={"instruments": instruments, "target_instrument": target})
    config = load_config(write_config(tmp_path / "c.yaml", raw))
    assert config.network_stems == stems and config.complement_stem == complement


def test_complement_name_rule():
    assert complement_name("Vocals", ["vocals", "other"]) == "instrumental"
    assert complement_name("instrumental", []) == "vocals"
    assert complement_name("crowd", ["crowd", "other"]) == "other"
    assert complement_name("bass", ["vocals", "bass", "drums"]) == "no_bass"


# Every model key of the published RoFormer configs (ZFTurbo's MSST configs/, MSST-WebUI's
# configs_backup/, June 2026): each is an option we implement, one we ignore (no effect at
# inference) or one we refuse unless set to what we run.
PUBLISHED_MODEL_KEYS = """
attn_dropout conv_dropout conv_expansion_factor conv_kernel_size depth dim dim_freqs_in dim_head ff_dropout ff_mult
flash_attn freq_conformer_depth freq_transformer_depth freqs_per_bands heads linear_transformer_depth
mask_estimator_depth match_input_audio_length mlp_expansion_factor multi_stft_hop_size multi_stft_normalized
multi_stft_resolution_loss_weight multi_stft_resolutions_window_sizes num_bands num_stems sage_attention sample_rate
skip_connection stereo stft_hop_length stft_n_fft stft_normalized stft_win_length time_conformer_depth
time_transformer_depth use_torch_checkpoint
""".split()


def test_every_published_model_key_is_implemented_ignored_or_refused():
    implemented = {f.name for cls in (BSRoformerConfig, MelBandRoformerConfig) for f in fields(cls)}
    conformer_only = {"conv_dropout", "conv_expansion_factor", "ff_mult"}  # beside a _CONFORMER_KEYS key in those configs
    known = implemented | IGNORED_MODEL_KEYS | set(_UNSUPPORTED_MODEL_KEYS) | set(_CONFORMER_KEYS) | conformer_only
    assert set(PUBLISHED_MODEL_KEYS) <= known
    assert not implemented & (IGNORED_MODEL_KEYS | set(_UNSUPPORTED_MODEL_KEYS))


def test_ignored_keys_load_with_any_value(tmp_path):
    model = {**TINY_MODEL, "zero_dc": True, "sage_attention": True, "flash_attn": False, "use_torch_checkpoint": True,
             "match_input_audio_length": True, "skip_connection": False, "linear_transformer_depth": 0}
    load_config(write_config(tmp_path / "c.yaml", config_dict(model=model)))


def test_state_dict_of_another_architecture(tiny, tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(CheckpointError, match=r"other.ckpt: not a BS-RoFormer checkpoint for model.yaml: \d+ parameter\(s\) missing"):
        load_model(path, tiny[1])


def test_state_dict_for_another_config_is_a_shape_mismatch(tiny, tmp_path):
    other_ckpt, _ = make_model_files(tmp_path / "other", config_dict(model={**TINY_MODEL, "dim": 24}))
    with pytest.raises(CheckpointError, match=r"model.ckpt: does not match config model.yaml: .* has shape \(24,\) in the checkpoint but \(16,\)"):
        load_model(other_ckpt, tiny[1])


def test_one_extra_key_is_reported(tiny, tmp_path):
    state = torch.load(tiny[0], weights_only=True)
    state["surprise"] = torch.zeros(1)
    path = tmp_path / "extra.ckpt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"1 unexpected \(e.g. surprise\)"):
        load_model(path, tiny[1])


def test_hyperace_keys_belong_to_bs_roformer(tmp_path):
    raw = config_dict(model={**TINY_MODEL, "use_mask_estimator_hyper_ace": True, "hyperace_version": 2}, base=CONFIG_KIM_MEL_BAND)
    with pytest.raises(ConfigError, match=r"c.yaml: model.use_mask_estimator_hyper_ace asks for HyperACE mask estimators, "
                                          r"which stemsep runs only in a BS-RoFormer"):
        load_config(write_config(tmp_path / "c.yaml", raw))


def test_hyperace_version_alone_changes_nothing(tmp_path):
    """MSST-WebUI reads the version only with the switch on."""
    model = load_config(write_config(tmp_path / "c.yaml", config_dict(model={**TINY_MODEL, "hyperace_version": 2}))).model
    assert not model.use_mask_estimator_hyper_ace and model.name == "BS-RoFormer"


# the checkpoint tells the network ------------------------------------------------------------

# HyperACE's convolutions have fixed widths whatever `dim`: a small token grid (FAST_MODEL's
# 17 bands) keeps it quick.
HYPERACE_KEYS = {"use_mask_estimator_hyper_ace": True, "hyperace_version": 2}


def checkpoint_for(tmp_path, model: dict, base=None, name="net", seed=0) -> Path:
    """A random checkpoint of the network `model` (a `model` section over `base`) describes."""
    config = write_config(tmp_path / f"{name}-source.yaml", config_dict(model=model, **({"base": base} if base else {})))
    return write_checkpoint(tmp_path / f"{name}.ckpt", random_state_dict(config, seed))


def separate(model, seed=1) -> torch.Tensor:
    audio = 0.5 * torch.randn(1, 2, 2048, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return model(audio)


@pytest.mark.slow
@pytest.mark.parametrize("version", [1, 2])
def test_a_plain_yaml_with_a_hyperace_checkpoint_builds_hyperace(tmp_path, version):
    """unwa's published HyperACE yamls are plain BS-RoFormer configs: the checkpoint's
    `mask_estimators.*.segm.*` tensors tell HyperACE, its head's TFC-TDF blocks v2."""
    checkpoint = checkpoint_for(tmp_path, {**FAST_MODEL, **HYPERACE_KEYS, "hyperace_version": version})
    plain = write_config(tmp_path / "plain.yaml", config_dict(model=FAST_MODEL))
    assert not load_config(plain).model.use_mask_estimator_hyper_ace  # the yaml alone: a plain network
    config = load_config(plain, checkpoint)
    assert (config.model.use_mask_estimator_hyper_ace, config.model.hyperace_version) == (True, version)
    assert config.model.name == f"BS-RoFormer with HyperACE v{version} mask estimators"

    explicit = load_model(checkpoint, write_config(tmp_path / "explicit.yaml", config_dict(model={**FAST_MODEL, **HYPERACE_KEYS,
                                                                                                   "hyperace_version": version})))
    expected = separate(explicit)
    for from_config in (plain, config, load_config(plain)):  # a path, a Config read with it, a Config read without it
        model = load_model(checkpoint, from_config)
        assert isinstance(model.mask_estimators[0], HyperACEMaskEstimator) and model.config.hyperace_version == version
        assert torch.equal(separate(model), expected)


def test_a_hyperace_yaml_without_its_version_takes_the_checkpoints(tmp_path):
    checkpoint = checkpoint_for(tmp_path, {**FAST_MODEL, **HYPERACE_KEYS})
    yaml_path = write_config(tmp_path / "c.yaml", config_dict(model={**FAST_MODEL, "use_mask_estimator_hyper_ace": True}))
    assert load_config(yaml_path, checkpoint).model.hyperace_version == 2


@pytest.mark.parametrize(
    "checkpoint_model, yaml_model, message",
    [
        ({}, HYPERACE_KEYS, r"net.ckpt: holds a BS-RoFormer but config c.yaml asks for a BS-RoFormer with HyperACE v2 mask estimators"),
        (HYPERACE_KEYS, {"use_mask_estimator_hyper_ace": False},
         r"holds a BS-RoFormer with HyperACE v2 mask estimators but config c.yaml asks for a BS-RoFormer$"),
        (HYPERACE_KEYS, {**HYPERACE_KEYS, "hyperace_version": 1},
         r"holds a BS-RoFormer with HyperACE v2 mask estimators but config c.yaml asks for a BS-RoFormer with HyperACE v1"),
    ],
    ids=["hyperace yaml, plain checkpoint", "plain yaml says so, hyperace checkpoint", "v1 yaml, v2 checkpoint"],
)
def test_mask_estimators_the_yaml_states_must_be_the_checkpoints(tmp_path, checkpoint_model, yaml_model, message):
    checkpoint = checkpoint_for(tmp_path, {**FAST_MODEL, **checkpoint_model})
    yaml_path = write_config(tmp_path / "c.yaml", config_dict(model={**FAST_MODEL, **yaml_model}))
    for load in (lambda: load_config(yaml_path, checkpoint), lambda: load_model(checkpoint, yaml_path)):
        with pytest.raises(CheckpointError, match=message):
            load()


@pytest.mark.parametrize("model_type", [None, "bs_roformer"])
def test_a_bs_yaml_with_a_stray_num_bands_builds_what_the_checkpoint_holds(tmp_path, model_type):
    """One published copy of BS-RoFormer-SW's yaml carries `num_bands: 60`: alone it cannot
    tell the architecture; with its checkpoint (final_norm.gamma) it is a BS-RoFormer."""
    checkpoint = checkpoint_for(tmp_path, FAST_MODEL)
    stray = config_dict(model={**FAST_MODEL, "num_bands": 60}, **({} if model_type is None else {"training": {"model_type": model_type}}))
    yaml_path = write_config(tmp_path / "sw.yaml", stray)
    with pytest.raises(ConfigError, match="sw.yaml: (cannot tell the architecture|model_type is bs_roformer but the model section has num_bands)"):
        load_config(yaml_path)
    assert type(load_config(yaml_path, checkpoint).model) is BSRoformerConfig
    clean = load_model(checkpoint, write_config(tmp_path / "clean.yaml", config_dict(model=FAST_MODEL)))
    assert torch.equal(separate(load_model(checkpoint, yaml_path)), separate(clean))


def test_a_yaml_with_both_band_keys_builds_a_mel_band_checkpoint_as_mel_band(tmp_path):
    mel = {**TINY_MODEL, "stft_n_fft": 512, "stft_win_length": 512, "stft_hop_length": 128, "num_bands": 16}
    checkpoint = checkpoint_for(tmp_path, mel, base=CONFIG_KIM_MEL_BAND)
    both = write_config(tmp_path / "both.yaml", config_dict(model={**mel, "freqs_per_bands": [2] * 128 + [1]}, base=CONFIG_KIM_MEL_BAND))
    model = load_model(checkpoint, both)
    assert isinstance(model, MelBandRoformer) and model.config.num_bands == 16


@pytest.mark.parametrize("mel_checkpoint", [False, True], ids=["bs checkpoint, mel yaml", "mel checkpoint, bs yaml"])
@pytest.mark.parametrize("named", [False, True], ids=["by band key", "by model_type"])
def test_a_yaml_that_describes_another_architecture_than_the_checkpoint_is_refused(tmp_path, mel_checkpoint, named):
    bs_model, mel_model = TINY_MODEL, {**TINY_MODEL, "num_bands": 60}
    checkpoint = checkpoint_for(tmp_path, mel_model if mel_checkpoint else bs_model, base=CONFIG_KIM_MEL_BAND if mel_checkpoint else None)
    raw = config_dict(model=bs_model) if mel_checkpoint else config_dict(model=mel_model, base=CONFIG_KIM_MEL_BAND)
    if named:
        raw["model_type"] = "bs_roformer" if mel_checkpoint else "mel_band_roformer"
    yaml_path = write_config(tmp_path / "c.yaml", raw)
    found = (r"holds a MelBand-RoFormer \(a norm after each transformer, layers.0.0.norm.gamma\) but config c.yaml describes a BS-RoFormer"
             if mel_checkpoint else
             r"holds a BS-RoFormer \(one norm after all its transformers, final_norm.gamma\) but config c.yaml describes a MelBand-RoFormer")
    with pytest.raises(CheckpointError, match=rf"net.ckpt: {found}"):
        load_model(checkpoint, yaml_path)


def _large_inst_v2_state(tmp_path) -> dict[str, torch.Tensor]:
    """splifft's network with unwa's Large-Inst v2 mask estimators (an axial transformer refiner)."""
    splifft = pytest.importorskip("splifft.models.bs_roformer")
    params = splifft.BSRoformerParams(chunk_size=4096, output_stem_names=("instrum",), dim=16, depth=1,
                                      band_config=splifft.FixedBandsConfig(kind="fixed"),
                                      mask_estimator=splifft.AxialRefinerLargeV2MaskEstimatorConfig(kind="axial_refiner_large_v2",
                                                                                                     axial_refiner_depth=1))
    return splifft.BSRoformer(params).state_dict()


def _linear_attention_state(tmp_path) -> dict[str, torch.Tensor]:
    reference = pytest.importorskip("audio_separator.separator.uvr_lib_v5.roformer.bs_roformer")
    raw = yaml.load(write_config(tmp_path / "l.yaml", config_dict(model=TINY_MODEL)).read_text(), Loader=_ConfigLoader)["model"]
    return reference.BSRoformer(**{**raw, "linear_transformer_depth": 1}).state_dict()


def _grafted(tmp_path, add: dict[str, torch.Tensor], drop: str = "") -> dict[str, torch.Tensor]:
    """A plain checkpoint with the tensors `add` and without those whose names match `drop`."""
    state = random_state_dict(write_config(tmp_path / "plain.yaml", config_dict(model=TINY_MODEL)))
    return {**{k: v for k, v in state.items() if not (drop and re.search(drop, k))}, **add}


# Checkpoints of RoFormer variants stemsep does not run, by what the refusal names: the first
# tensor that tells it, and the checkpoint. Real names where a reference is at hand (splifft's
# Large-Inst v2, audio-separator's linear attention), else those of the modules that hold them
# (neuraloperator's FNO, PoPE_pytorch's PoPE, MSST's ConformerBlock, MSST-WebUI's shared
# biases) grafted onto a plain checkpoint.
UNSUPPORTED_CHECKPOINTS = {
    "transformers inside its mask estimators (unwa's Large-Inst v2)": ("mask_estimators.0.layers.0.0.", _large_inst_v2_state),
    "FNO mask estimators (unwa's Inst-FNO)": ("mask_estimators.0.to_freqs.0.0.lifting.fcs.0.weight", lambda tmp: _grafted(
        tmp, {"mask_estimators.0.to_freqs.0.0.lifting.fcs.0.weight": torch.zeros(32, 16, 1)}, r"^mask_estimators")),
    "PoPE (polar) position embeddings": ("layers.0.0.layers.0.0.pope_embed.bias", lambda tmp: _grafted(
        tmp, {"layers.0.0.layers.0.0.pope_embed.bias": torch.zeros(2, 8)}, r"rotary_embed")),
    "Conformer blocks": ("layers.0.0.layers.0.conv.net.0.gamma", lambda tmp: _grafted(
        tmp, {"layers.0.0.layers.0.conv.net.0.gamma": torch.ones(16)})),
    "linear-attention transformers": ("layers.0.2.", _linear_attention_state),
    "shared attention biases": ("layers.0.0.layers.0.0.to_qkv.bias", lambda tmp: _grafted(
        tmp, {"layers.0.0.layers.0.0.to_qkv.bias": torch.ones(48)})),
}


@pytest.mark.parametrize("variant", UNSUPPORTED_CHECKPOINTS)
def test_checkpoints_of_variants_stemsep_does_not_run_are_refused_by_name(tmp_path, variant):
    key, make_state = UNSUPPORTED_CHECKPOINTS[variant]
    checkpoint = write_checkpoint(tmp_path / "variant.ckpt", make_state(tmp_path))
    yaml_path = write_config(tmp_path / "c.yaml", config_dict(model=TINY_MODEL))
    with pytest.raises(CheckpointError, match=re.escape(f"variant.ckpt: has {variant} ({key}") + r".*\), which stemsep does not run$"):
        load_model(checkpoint, yaml_path)


def test_hyperace_on_a_mel_band_checkpoint_is_refused(tmp_path):
    mel = config_dict(model={**TINY_MODEL, "num_bands": 60}, base=CONFIG_KIM_MEL_BAND)
    state = random_state_dict(write_config(tmp_path / "m.yaml", mel))
    state["mask_estimators.0.segm.backbone.stem.dwconv.weight"] = torch.zeros(16, 1, 3, 3)
    with pytest.raises(CheckpointError, match="x.ckpt: has HyperACE mask estimators on a MelBand-RoFormer, which stemsep does not run"):
        load_model(write_checkpoint(tmp_path / "x.ckpt", state), tmp_path / "m.yaml")


# precision -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, model",
    [(dtype, model) for dtype in (torch.float16, torch.bfloat16) for model in (TINY_MODEL, "mel")]
    + [pytest.param(torch.float16, {**FAST_MODEL, **HYPERACE_KEYS}, marks=pytest.mark.slow)],
    ids=["fp16-bs", "fp16-mel", "bf16-bs", "bf16-mel", "fp16-hyperace"],
)
def test_half_precision_checkpoints_load_as_their_float32_values(tmp_path, dtype, model):
    """Some checkpoints are published in fp16: cast to float32 on loading, the network is the
    one the float32 copy of the same values gives, output for output."""
    base = CONFIG_KIM_MEL_BAND if model == "mel" else None
    model = {**TINY_MODEL, "num_bands": 60} if model == "mel" else model
    config = write_config(tmp_path / "c.yaml", config_dict(model=model, **({"base": base} if base else {})))
    state = random_state_dict(config)
    half = write_checkpoint(tmp_path / "half.ckpt", {k: v.to(dtype) for k, v in state.items()})
    widened = write_checkpoint(tmp_path / "widened.ckpt", {k: v.to(dtype).float() for k, v in state.items()})
    loaded = load_model(half, config)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(separate(loaded), separate(load_model(widened, config)))


def test_a_half_precision_checkpoint_runs_under_bf16_autocast(tmp_path):
    config = write_config(tmp_path / "c.yaml", config_dict(model=TINY_MODEL))
    half = write_checkpoint(tmp_path / "half.ckpt", {k: v.half() for k, v in random_state_dict(config).items()})
    model = load_model(half, config)
    exact = separate(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        approximate = separate(model)
    assert approximate.dtype == torch.float32 and torch.isfinite(approximate).all()
    assert (approximate - exact).abs().max() <= 0.05 * exact.abs().max()


def test_a_checkpoint_without_rotary_tables_gets_the_fixed_ones(tmp_path):
    """splifft saves no rotary tables (they are fixed, never trained), e.g. its fp16 copy of
    BS-RoFormer-SW; a checkpoint missing only some of them is still refused."""
    tiny, config = make_model_files(tmp_path, config_dict(model=TINY_MODEL))
    state = torch.load(tiny, weights_only=True)
    tables = [k for k in state if k.endswith("rotary_embed.freqs")]
    without = write_checkpoint(tmp_path / "without.ckpt", {k: v.half() for k, v in state.items() if k not in tables})
    with_tables = write_checkpoint(tmp_path / "with.ckpt", {k: v.half() if k not in tables else v for k, v in state.items()})
    assert torch.equal(separate(load_model(without, config)), separate(load_model(with_tables, config)))
    partial = write_checkpoint(tmp_path / "partial.ckpt", {k: v for k, v in state.items() if k != tables[0]})
    with pytest.raises(CheckpointError, match=rf"partial.ckpt: not a BS-RoFormer checkpoint for model.yaml: 1 parameter\(s\) missing \(e.g. {tables[0]}\)"):
        load_model(partial, config)
