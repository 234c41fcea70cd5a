"""The model catalogue: its data, the published config copies in tests/data/configs/, the
networks each entry builds, and the `stemsep models` listing."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

from stemsep import catalogue, cli
from stemsep.catalogue import CatalogueError, ModelNotDownloadedError

CONFIGS = Path(__file__).parent / "data" / "configs"
RAW = json.loads((Path(catalogue.__file__).parent / catalogue.DATA_FILE).read_text(encoding="utf-8"))

# The 1297 yaml that its mirrors serve (sha256 2bfdd16c...) is not published anywhere this
# test can read offline. ZFTurbo's copy of the same config (Music-Source-Separation-Training,
# configs/viperx/, commit d9672dac) has the same `model` section and differs only in
# `audio.min_mean_abs`, the instrument names and the `inference` section: it stands in for
# the network-shape test, and is not checked against the catalogue's sha256.
STAND_INS = {"1297": CONFIGS / "model_bs_roformer_ep_317_sdr_12.9755.zfturbo.yaml"}
STAND_IN_SHA256 = "42e5635ceab7287b83d9591c9880966f0b61cff26a0a40a29d236bacb32e5f2c"


class _Loader(yaml.SafeLoader):
    """SafeLoader plus the `!!python/tuple` tag the published configs use."""


_Loader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: tuple(loader.construct_sequence(node)))


def _config_copy(model: catalogue.Model) -> Path:
    return STAND_INS.get(model.name, CONFIGS / model.config.name)


def _raw_config(model: catalogue.Model) -> dict:
    return yaml.load(_config_copy(model).read_text(encoding="utf-8"), Loader=_Loader)


# the data ----------------------------------------------------------------------------------


def test_the_catalogue_has_the_models_the_issue_asks_for():
    models = catalogue.MODELS
    assert catalogue.DEFAULT == "1297"
    assert {"1297", "kim-vocals", "duality-v2", "karaoke", "dereverb", "denoise", "4stem"} <= set(models)
    assert models["1297"].architecture == "bs_roformer" and models["1297"].stems == ("vocals", "instrumental")
    assert models["kim-vocals"].architecture == "mel_band_roformer" and models["kim-vocals"].stems[0] == "vocals"
    assert models["karaoke"].stems == ("karaoke", "other")
    assert models["duality-v2"].architecture == "mel_band_roformer" and "instrumental" in models["duality-v2"].stems
    assert len(models["4stem"].stems) == 4


def test_best_vocals_and_instrumental_melband_entries_lead_on_their_published_figures():
    """kim-vocals and duality-v2 are the chosen 'best' MelBand-RoFormers: no other MelBand
    entry has a higher published figure from the same source for that stem."""

    def best(stem: str, source: str) -> str:
        scored = [(s.sdr, m.name) for m in catalogue.MODELS.values() if m.architecture == "mel_band_roformer"
                  for s in m.scores if s.stem == stem and s.source == source]
        return max(scored)[1]

    assert best("vocals", "audio-separator-scores") == "kim-vocals"
    assert best("vocals", "zfturbo-pretrained-models") == "kim-vocals"
    assert best("instrumental", "audio-separator-scores") == "duality-v2"


PUBLISHED = Path(__file__).parent / "data" / "published"
# The published lists the tests can read offline (tests/data/published/README.md): by source
# key, each file's sha256 and size by its entry in the list.
_LISTS = {
    "msst-webui-models-info": {
        k: (v["sha256"], v["model_size"])
        for k, v in json.loads((PUBLISHED / "msst-webui-2aee2cc-models_info.excerpt.json").read_text()).items()
    },
    "bs-roformer-infer-checksums": {
        k: (v["sha256"], v["size"])
        for k, v in json.loads((PUBLISHED / "bs-roformer-infer-0.1.5-checksums.json").read_text())["files"].items()
    },
    # tests/data/configs holds these yamls as read at the pinned commit (`<name>.ckpt.yaml` there).
    "msst-webui-configs": {
        m.config.sha256_from[0].entry: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size)
        for m in catalogue.MODELS.values()
        if m.config.sha256_from[0].source == "msst-webui-configs" and (p := CONFIGS / m.config.name).is_file()
    },
}


def _pinned(source: dict) -> bool:
    """A source pinned to a commit of a repository or to a package version."""
    return bool(re.fullmatch(r"[0-9a-f]{40}", source.get("commit", ""))) or bool(
        re.fullmatch(r"\S+ \d+(\.\d+)+ \(PyPI\)", source.get("package", ""))
    )


def test_every_downloaded_file_checksum_comes_from_a_pinned_published_list():
    sources = RAW["sources"]
    for entry in RAW["models"]:
        for role in ("checkpoint", "config"):
            f = entry[role]
            if f.get("shipped"):
                continue
            listed = [sources[p["source"]] for p in f["sha256_from"]]
            assert any(s.get("checksums") and _pinned(s) for s in listed), (entry["name"], role)
        assert entry["checkpoint"]["size"] > 0 and entry["checkpoint"]["dtype"] in catalogue.DTYPES


@pytest.mark.parametrize("name", list(catalogue.MODELS))
def test_checksums_and_sizes_match_the_published_lists(name):
    """Each file's sha256 and size equal those of every published list that names it and
    that the tests hold a copy of; every downloaded file is in at least one such list."""
    model = catalogue.get(name)
    for wf in model.files:
        checked = 0
        for published in wf.sha256_from:
            listed = _LISTS.get(published.source, {}).get(published.entry)
            if listed is None:
                continue
            assert listed == (wf.sha256, wf.size), (wf.name, published)
            checked += 1
        assert checked, f"{wf.name}: no published list the tests hold names it"


def test_every_score_and_config_names_its_source_and_every_url_is_https():
    sources = RAW["sources"]
    for key, source in sources.items():
        assert source["label"] and source["what"], key
        assert "commit" not in source or re.fullmatch(r"[0-9a-f]{40}", source["commit"]), key
    for entry in RAW["models"]:
        for role in ("checkpoint", "config"):
            assert all(url.startswith("https://") for url in entry[role].get("urls", ())), (entry["name"], role)
        config = entry["config"]
        if config["sha256_from"][0]["source"] == "msst-webui-configs":  # a config read at a commit of its repository
            commit = sources["msst-webui-configs"]["commit"]
            assert config["urls"] == [
                f"https://raw.githubusercontent.com/SUC-DriverOld/MSST-WebUI/{commit}/configs_backup/"
                + config["sha256_from"][0]["entry"]
            ]
        for score in entry["scores"]:
            assert score["source"] in sources


def test_no_url_is_a_release_asset_under_a_folder():
    """A GitHub release asset's name cannot contain '/', so such a URL always answers 404
    (the 1297 yaml was once listed under .../all_public_uvr_models/mdx_model_data/...)."""
    for model in catalogue.MODELS.values():
        for wf in model.files:
            for url in wf.urls:
                tail = url.partition("/releases/download/")[2]
                assert tail.count("/") <= 1, url


def test_no_file_name_is_shared_between_models():
    names = [f.name for m in catalogue.MODELS.values() for f in m.files]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name", list(catalogue.MODELS))
def test_the_config_copy_matches_the_catalogue(name):
    model = catalogue.get(name)
    if name in STAND_INS:
        assert hashlib.sha256(STAND_INS[name].read_bytes()).hexdigest() == STAND_IN_SHA256
        pytest.skip("no published copy of this yaml is available offline; see STAND_INS")
    data = (CONFIGS / model.config.name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == model.config.sha256
    assert len(data) == model.config.size


@pytest.mark.parametrize("name", list(catalogue.MODELS))
def test_the_stems_are_what_a_separation_with_the_config_gives(name):
    from stemsep.checkpoint import load_config
    from stemsep.stems import stem_layout

    model = catalogue.get(name)
    assert stem_layout(load_config(_config_copy(model))).names == model.stems


@pytest.mark.parametrize("name", list(catalogue.MODELS))
def test_the_architecture_matches_the_config(name):
    model = catalogue.get(name)
    section = _raw_config(model)["model"]
    assert model.architecture == ("mel_band_roformer" if "num_bands" in section else "bs_roformer")


# the networks ------------------------------------------------------------------------------


def _reference_network(model: catalogue.Model):
    """audio-separator's class for the entry, built from the config's `model` section on the meta device."""
    import torch

    if model.architecture == "mel_band_roformer":
        from audio_separator.separator.uvr_lib_v5.roformer.mel_band_roformer import (
            MelBandRoformer as cls,
        )
    else:
        from audio_separator.separator.uvr_lib_v5.roformer.bs_roformer import (
            BSRoformer as cls,
        )
    with torch.device("meta"):
        return cls(**_raw_config(model)["model"])


@pytest.mark.parametrize("name", list(catalogue.MODELS))
def test_stemsep_builds_the_reference_network_and_it_fits_the_published_checkpoint_size(name):
    """Our network for each entry has the reference's tensor names and shapes, so the
    published checkpoint loads strictly; and its fp32 bytes account for the checkpoint's
    size. Every catalogue checkpoint is published in fp32: its size exceeds 4 bytes per
    tensor element by 0.02-0.15% (the pickle's names and headers), so the check allows 2%
    plus 1 MB and would catch an fp16 file (half the size) or a wrong config."""
    pytest.importorskip("audio_separator")
    from stemsep.checkpoint import build_model, load_config

    model = catalogue.get(name)
    ours = build_model(load_config(_config_copy(model)), device="meta").state_dict()
    reference = _reference_network(model).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    fp32_bytes = 4 * sum(v.numel() for v in reference.values())
    assert fp32_bytes <= model.checkpoint.size <= fp32_bytes * 1.02 + 1_000_000


# looking models up -------------------------------------------------------------------------


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(CatalogueError) as info:
        catalogue.get("kim")
    assert str(info.value) == f"unknown model 'kim'; the known models are {', '.join(catalogue.MODELS)}"


def test_model_paths_of_a_model_not_downloaded_says_how_to_get_it(tmp_path):
    with pytest.raises(ModelNotDownloadedError) as info:
        catalogue.model_paths("kim-vocals", tmp_path)
    assert str(info.value) == (
        f"model kim-vocals is not downloaded ({tmp_path / 'Kim_MelBandRoformer.ckpt'} is missing): "
        "download it first (stemsep models download kim-vocals)"
    )


def test_model_paths_defaults_to_the_default_model_in_the_weights_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("STEMSEP_WEIGHTS_DIR", str(tmp_path))
    ckpt, config = catalogue.get("1297").paths(tmp_path)
    ckpt.write_bytes(b"x")
    config.write_bytes(b"y")
    assert catalogue.model_paths() == (ckpt, config)
    assert catalogue.model_paths("1297", tmp_path) == (ckpt, config)
    assert not catalogue.is_downloaded("1297")  # the checkpoint is not 639331213 bytes


def test_is_downloaded_checks_presence_and_size(tmp_path):
    model = catalogue.get("dereverb")
    ckpt, config = model.paths(tmp_path)
    assert not catalogue.is_downloaded(model, tmp_path)
    config.write_bytes((CONFIGS / model.config.name).read_bytes())
    with open(ckpt, "wb") as f:  # sparse: the catalogue size, without writing 913 MB
        f.truncate(model.checkpoint.size)
    assert catalogue.is_downloaded(model, tmp_path)
    with open(ckpt, "r+b") as f:
        f.truncate(model.checkpoint.size - 1)
    assert not catalogue.is_downloaded(model, tmp_path)


# malformed catalogues ----------------------------------------------------------------------


def _write(tmp_path: Path, mutate) -> Path:
    raw = json.loads(json.dumps(RAW))
    mutate(raw)
    path = tmp_path / "models.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda r: r["models"][1]["checkpoint"].update(sha256="ABC"), "sha256 should be 64 lower-case hex digits"),
        (lambda r: r["models"][1]["config"].update(name="../evil.yaml"), "is not a plain file name"),  # not a path
        (lambda r: r["models"][1]["checkpoint"].update(size=None), "the checkpoint has no size"),
        (lambda r: r["models"][1]["checkpoint"].update(urls=[]), "urls should be a non-empty list"),
        (lambda r: r["models"][1]["checkpoint"].update(sha256_from=[{"source": "trust-me"}]), "checksum source 'trust-me'"),
        (lambda r: r["models"][1]["checkpoint"].update(sha256_from=[{"source": "author-file-name"}]),
         "no source in sha256_from is a published checksum list"),
        (lambda r: r["models"][1]["checkpoint"].update(dtype="bf16"), "the checkpoint's dtype should be one of fp32, fp16"),
        (lambda r: r["models"].append(r["models"][0]), "model '1297' is listed twice"),
        (lambda r: r.update(default="nope"), "the default model 'nope' is not listed"),
        (lambda r: r["models"][1].update(architecture="demucs"), "unknown architecture 'demucs'"),
        (lambda r: r["models"][1].pop("stems"), "malformed model catalogue: 'stems'"),
    ],
)
def test_a_malformed_catalogue_is_refused_with_one_line(tmp_path, mutate, problem):
    with pytest.raises(CatalogueError) as info:
        catalogue.load(_write(tmp_path, mutate))
    message = str(info.value)
    assert problem in message and message.startswith(str(tmp_path / "models.json")) and "\n" not in message


def test_the_packaged_catalogue_loads_as_a_file_too(tmp_path):
    models, default, sources = catalogue.load(_write(tmp_path, lambda r: None))
    assert models == catalogue.MODELS and default == catalogue.DEFAULT and sources == catalogue.SOURCES


# the listing -------------------------------------------------------------------------------


def test_cli_models_lists_every_model_with_its_download_state(tmp_path, capsys):
    model = catalogue.get("kim-vocals")
    ckpt, config = model.paths(tmp_path)
    config.write_bytes((CONFIGS / model.config.name).read_bytes())
    with open(ckpt, "wb") as f:
        f.truncate(model.checkpoint.size)
    assert cli.main(["models", "--dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ARCHITECTURE", "STEMS", "SIZE", "SDR", "(dB)", "DOWNLOADED"]
    rows = {line.split()[0]: line for line in lines[1 : 1 + len(catalogue.MODELS)]}
    assert list(rows) == list(catalogue.MODELS)
    assert rows["kim-vocals"].split()[-1] == "yes"
    assert all(row.split()[-1] == "no" for name, row in rows.items() if name != "kim-vocals")
    assert re.search(r"^1297 +BS-RoFormer +vocals, instrumental +639 MB +vocals 11\.77 \(40 tracks\) \[1\] +no$", rows["1297"])
    assert re.search(r"MelBand-RoFormer +vocals, instrumental +1\.72 GB +instrumental 16\.08", rows["duality-v2"])
    assert re.search(r" - +no$", rows["4stem"])  # no published figure
    assert "[1] median museval SDR on MUSDB18-HQ tracks, from audio-separator 0.47.1's models-scores.json" in lines
    assert lines[-1] == f"Default model: 1297. Weights folder: {tmp_path}"


def test_cli_models_download_of_an_unknown_name_lists_the_known_ones(tmp_path, capsys):
    assert cli.main(["models", "download", "kim", "--dir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == f"stemsep: error: unknown model 'kim'; the known models are {', '.join(catalogue.MODELS)}\n"
    assert list(tmp_path.iterdir()) == []


def test_the_catalogue_ships_in_the_package():
    """A normal (non-editable) install carries models.json only if pyproject.toml declares it."""
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    assert catalogue.DATA_FILE in pyproject["tool"]["setuptools"]["package-data"]["stemsep"]
