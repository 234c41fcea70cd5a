"""Config parsing and checkpoint loading: the real yaml parses, every bad file gets one clear sentence."""


import pytest
import torch

from stemsep.checkpoint import load_config, load_model, load_state_dict
from stemsep.errors import CheckpointError, ConfigError
from stemsep.synthetic import TINY_MODEL, config_dict, make_model_files, write_config

REAL_CONFIG = "../shared/configs/model_bs_roformer_ep_317_sdr_12.9755.msst.yaml"


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
        (lambda c: c["training"].update(target_instrument="drums"), r"stemsep needs a vocals model"),
        (lambda c: c["model"].update(num_stems=2), r"num_stems is 2"),
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
    assert out.shape == (1, 2, 4410)


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


def test_lightning_style_wrapper_is_unwrapped(tiny, tmp_path):
    path = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": torch.load(tiny[0], weights_only=True), "epoch": 317}, path)
    load_model(path, tiny[1])


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
