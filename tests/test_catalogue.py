"""The model catalogue: its data, the published config copies in tests/data/configs/, the
networks each entry builds, and the `stemsep models` listing."""

from __future__ import annotations

import hashlib
import json
import math
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
    """The model's config as a file: the one shipped in the package, else the published
    copy in tests/data/configs (or its stand-in)."""
    if model.config.shipped:
        return catalogue.shipped_config(model.config.name)
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


def test_the_late_2026_models_are_in_the_catalogue_with_their_published_files():
    models = catalogue.MODELS
    sw = models["sw"]
    assert sw.stems == ("bass", "drums", "other", "vocals", "guitar", "piano")
    assert (sw.checkpoint.name, sw.checkpoint.size, sw.checkpoint.dtype) == ("BS-Rofo-SW-Fixed.ckpt", 699_412_152, "fp32")
    assert sw.checkpoint.sha256 == "24e7d35ee9c64415673d3fd33e06a67cac2c103c5df6267ba1576459c775916e"
    assert sw.licence is None and "commercial product" in sw.provenance
    mega = models["mega"]
    assert len(mega.stems) == 53 and {"vocal", "guitar", "piano", "lead-vocal", "back-vocal"} <= set(mega.stems)
    assert (mega.checkpoint.size, mega.checkpoint.dtype) == (1_368_919_887, "fp16")
    assert mega.checkpoint.sha256.startswith("c6282089") and "v1.0.21" in mega.checkpoint.urls[0]
    assert "MIT" in mega.provenance
    expected = {  # name: (sha256 prefix, bytes, dtype, stems)
        "deux": ("10255c02", 435_006_815, "fp16", ("vocals", "instrumental")),
        "resurrection-vocals": ("9dbfe5cb", 204_510_749, "fp32", ("vocals", "instrumental")),
        "resurrection-inst": ("16311025", 204_483_033, "fp32", ("instrumental", "vocals")),
        "big-beta6x": ("e16d702f", 1_708_527_586, "fp32", ("vocals", "instrumental")),
        "hyperace-vocals": ("54cf516f", 288_724_430, "fp32", ("vocals", "instrumental")),
        "hyperace-inst": ("4d61178e", 288_725_646, "fp32", ("instrumental", "vocals")),
        "guitar": ("83472bbf", 45_142_183, "fp16", ("guitar", "other")),
    }
    for name, (prefix, size, dtype, stems) in expected.items():
        model = models[name]
        assert model.checkpoint.sha256.startswith(prefix) and model.checkpoint.size == size, name
        assert model.checkpoint.dtype == dtype and model.stems == stems, name
    assert "CC BY-NC 4.0" in models["deux"].licence and "non-commercial" in models["guitar"].licence
    hyperace = [s for s in models["hyperace-vocals"].scores if s.multisong]
    assert [(s.stem, s.sdr, s.link) for s in hyperace] == [("vocals", 11.39, "https://mvsep.com/quality_checker/entry/9475")]


def test_every_model_has_a_provenance_and_each_multisong_figure_its_source_entry():
    for model in catalogue.MODELS.values():
        assert model.provenance, model.name
        for score in model.scores:
            if score.multisong:
                assert score.entry, (model.name, score)
                assert score.link is None or score.link.startswith("https://mvsep.com/quality_checker/entry/")


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
    "splifft-registry": {
        k: (next(r["digest"] for r in v["resources"] if r["kind"] == "model_ckpt").removeprefix("sha256:"), v["model_size"])
        for k, v in json.loads((PUBLISHED / "splifft-0.0.9-registry.excerpt.json").read_text()).items()
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
    data = _config_copy(model).read_bytes()
    assert hashlib.sha256(data).hexdigest() == model.config.sha256
    assert len(data) == model.config.size


SHIPPED = [m.name for m in catalogue.MODELS.values() if m.config.shipped]


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_config_names_the_published_values_it_was_written_from(name):
    """Its header says where its values come from: each source the catalogue names for it,
    by repository commit or package version, and the author's own yaml where there is one."""
    model = catalogue.get(name)
    header = "\n".join(line for line in _config_copy(model).read_text().splitlines() if line.startswith("#"))
    entry = next(e for e in RAW["models"] if e["name"] == name)
    for written in entry["config"]["written_from"]:
        source = RAW["sources"][written["source"]]
        assert source.get("commit", "")[:7] in header or source.get("package", "").split(" (")[0] in header, written
        if written.get("entry"):
            assert written["entry"].removesuffix(".json") in header
    assert "No checksum" in header or "no published checksum" in header


def _splifft_params(entry: str):
    """splifft's BS-RoFormer parameters for one of its configs (splifft/data/config/<entry>)."""
    from importlib import resources

    pytest.importorskip("splifft")
    from splifft.config import Config as SplifftConfig
    from splifft.models.bs_roformer import BSRoformerParams

    path = resources.files("splifft").joinpath("data", "config", entry)
    return SplifftConfig.from_file(str(path)).model.to_concrete(BSRoformerParams)


@pytest.mark.parametrize("name", [n for n in SHIPPED if any(
    w["source"] == "splifft-configs" for e in RAW["models"] if e["name"] == n for w in e["config"]["written_from"])])
def test_a_shipped_config_agrees_with_spliffts_config(name):
    """The values splifft's config gives (chunk, STFT hop, size, stems, mask estimators)
    are the shipped config's; MSST's MelBand-RoFormer counts one mask-estimator layer fewer."""
    from stemsep.checkpoint import load_config

    model = catalogue.get(name)
    entry = next(w["entry"] for e in RAW["models"] if e["name"] == name for w in e["config"]["written_from"]
                 if w["source"] == "splifft-configs")
    theirs = _splifft_params(entry)
    ours = load_config(_config_copy(model))
    mel = model.architecture == "mel_band_roformer"
    assert ours.audio.chunk_size == theirs.chunk_size
    assert (ours.model.dim, ours.model.depth, ours.model.stft_hop_length) == (theirs.dim, theirs.depth, theirs.stft_hop_length)
    assert ours.model.num_stems == len(theirs.output_stem_names)
    assert ours.model.mlp_expansion_factor == theirs.mlp_expansion_factor
    assert ours.model.mask_estimator_depth + mel == theirs.mask_estimator_depth
    assert mel == (theirs.band_config.kind == "mel")


@pytest.mark.parametrize("name", list(catalogue.MODELS))
def test_the_stems_are_what_a_separation_with_the_config_gives(name):
    from stemsep.stems import stem_layout

    model = catalogue.get(name)
    assert stem_layout(_our_config(model)).names == model.stems


@pytest.mark.parametrize("name", list(catalogue.MODELS))
def test_the_architecture_matches_the_config(name):
    model = catalogue.get(name)
    section = _raw_config(model)["model"]
    assert model.architecture == ("mel_band_roformer" if "num_bands" in section else "bs_roformer")


# the networks ------------------------------------------------------------------------------


HYPERACE = {"hyperace-vocals": "bs_roformer-unwa-hyperace_v2_vocals.json", "hyperace-inst": "bs_roformer-unwa-hyperace_v2_instrum.json"}


def _reference_network(model: catalogue.Model, device: str = "meta"):
    """audio-separator's class for a BS- or MelBand-RoFormer entry, built from the config's
    `model` section as audio-separator builds it, on `device` (the CPU draws its random
    initial weights)."""
    import torch

    pytest.importorskip("audio_separator")
    if model.architecture == "mel_band_roformer":
        from audio_separator.separator.uvr_lib_v5.roformer.mel_band_roformer import (
            MelBandRoformer as cls,
        )
    else:
        from audio_separator.separator.uvr_lib_v5.roformer.bs_roformer import (
            BSRoformer as cls,
        )
    section = _raw_config(model)["model"]
    with torch.device(device):
        network = cls(**section)
        factor = section.get("mlp_expansion_factor", 4)
        if model.architecture == "mel_band_roformer" and factor != 4:
            # 0.47.1's MelBandRoformer stores mlp_expansion_factor but builds its mask
            # estimators without it: build them with it, from the same module's class.
            from audio_separator.separator.uvr_lib_v5.roformer.mel_band_roformer import MaskEstimator

            inputs, depth = tuple(network.mask_estimators[0].dim_inputs), section.get("mask_estimator_depth", 1)
            for i in range(len(network.mask_estimators)):
                network.mask_estimators[i] = MaskEstimator(section["dim"], inputs, depth, mlp_expansion_factor=factor)
    return network.eval()


def _reference_state(model: catalogue.Model) -> dict:
    """The reference network's tensors for the entry, on the meta device; for HyperACE,
    splifft's network built from splifft's own config (on the CPU: its constructor reads
    tensor values)."""
    import torch

    if model.name in HYPERACE:
        from splifft.models.bs_roformer import BSRoformer as cls

        params = _splifft_params(HYPERACE[model.name])
        with torch.no_grad():
            return cls(params).state_dict()
    return _reference_network(model).state_dict()


def _our_config(model: catalogue.Model):
    """stemsep's reading of the entry's config."""
    from stemsep.checkpoint import load_config

    return load_config(_config_copy(model))


# A checkpoint's pickle spends 315-475 bytes per tensor on top of the values (its name,
# storage record and zip entry), measured over this catalogue's published sizes: between
# 0 and this many bytes per tensor is what a right network at the right dtype leaves.
PICKLE_BYTES_PER_TENSOR = 600


@pytest.mark.parametrize("name", list(catalogue.MODELS))
def test_stemsep_builds_the_reference_network_and_it_fits_the_published_checkpoint_size(name):
    """Our network for each entry has the reference's tensor names and shapes, so the
    published checkpoint loads strictly; and its values at the published dtype (4 bytes a
    parameter in fp32, 2 in fp16) account for the published size: the rest is at most the
    pickle's few hundred bytes per tensor. A wrong dtype (half or twice the size) or a
    config off by one layer or width fails."""
    from stemsep.checkpoint import build_model

    model = catalogue.get(name)
    ours = {k: tuple(v.shape) for k, v in build_model(_our_config(model), device="meta").state_dict().items()}
    reference = {k: tuple(v.shape) for k, v in _reference_state(model).items()}
    if not any(k.endswith("rotary_embed.freqs") for k in reference):  # splifft keeps its fixed rotary tables out
        ours = {k: v for k, v in ours.items() if not k.endswith("rotary_embed.freqs")}
    assert ours == reference
    values = catalogue.DTYPES[model.checkpoint.dtype] * sum(math.prod(shape) for shape in ours.values())
    assert 0 <= model.checkpoint.size - values <= PICKLE_BYTES_PER_TENSOR * len(ours)


# Entries whose networks are not shaped like one already checked for parity (1297, Kim's
# MelBand and the 4-stem model are, in tests/test_model.py; HyperACE against splifft's, in
# tests/test_hyperace.py). The guitar model is Kim-like with one-wide mask estimators.
PARITY = ["sw", "mega", "deux", "resurrection-vocals", "big-beta6x", "guitar"]


@pytest.mark.slow
@pytest.mark.parametrize("name", PARITY)
def test_the_network_computes_what_the_reference_does_at_the_published_shapes(name, tmp_path):
    """fp32, the reference's random weights at the entry's published shapes, a tenth of a
    second of stereo noise: every stem of our network within 1e-5 of the output's peak of
    audio-separator's (SW's six stems and Mega's 53 included)."""
    import torch

    from stemsep.checkpoint import load_model

    model = catalogue.get(name)
    torch.manual_seed(0)
    reference = _reference_network(model, device="cpu")
    checkpoint = tmp_path / "model.ckpt"
    torch.save(reference.state_dict(), checkpoint)
    ours = load_model(checkpoint, _config_copy(model))
    section = _raw_config(model)["model"]
    stems = section.get("num_stems", 1)
    audio = 0.5 * torch.randn(1, 2, section["stft_hop_length"] * 10, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, actual = reference(audio), ours(audio)
    expected = expected[:, None] if stems == 1 else expected  # the reference drops a lone stem's axis
    assert actual.shape == expected.shape == (1, stems, 2, audio.shape[-1])
    error, peak = (expected - actual).abs().max().item(), expected.abs().max().item()
    print(f"{name}: max abs error {error:.2e} (output peak {peak:.2f})")
    assert error <= 1e-5 * peak


# looking models up -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["inst-fno", "large-inst-v2"])
def test_a_model_left_out_on_purpose_is_refused_by_name_with_why(name, tmp_path, capsys):
    with pytest.raises(CatalogueError) as info:
        catalogue.get(name)
    message = str(info.value)
    assert message.startswith(f"model {name!r} is left out of the catalogue: unwa's ") and "does not implement" in message
    assert cli.main(["models", "download", name, "--dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"stemsep: error: {message}\n" and list(tmp_path.iterdir()) == []


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
        (lambda r: r["left_out"].append({"name": "1297", "title": "t", "reason": "r"}), "model '1297' is both listed and left out"),
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
    models, default, sources, left_out = catalogue.load(_write(tmp_path, lambda r: None))
    assert models == catalogue.MODELS and default == catalogue.DEFAULT and sources == catalogue.SOURCES
    assert left_out == catalogue.LEFT_OUT


# the listing -------------------------------------------------------------------------------


def test_cli_models_lists_every_model_with_its_stems_figures_licence_size_and_download_state(tmp_path, capsys):
    model = catalogue.get("kim-vocals")
    ckpt, config = model.paths(tmp_path)
    config.write_bytes((CONFIGS / model.config.name).read_bytes())
    with open(ckpt, "wb") as f:
        f.truncate(model.checkpoint.size)
    assert cli.main(["models", "--dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ARCHITECTURE", "STEMS", "SIZE", "SDR", "(dB)", "LICENCE", "DOWNLOADED"]
    rows = {line.split()[0]: line for line in lines[1 : 1 + len(catalogue.MODELS)]}
    assert list(rows) == list(catalogue.MODELS)
    assert rows["kim-vocals"].split()[-1] == "yes"
    assert all(row.split()[-1] == "no" for name, row in rows.items() if name != "kim-vocals")
    notes = {int(m.group(1)): m.group(2) for m in (re.match(r"\[(\d+)\] (.*)", line) for line in lines) if m}

    def note(row: str, figure: str) -> str:
        return notes[int(re.search(re.escape(figure) + r" \[(\d+)\]", row).group(1))]

    assert re.search(r"^1297 +BS-RoFormer +vocals, instrumental +639 MB fp32 +vocals 10\.87 \[\d+\] +none stated +no$", rows["1297"])
    assert "Multisong" in note(rows["1297"], "vocals 10.87") and "BS Roformer (viperx edition)" in note(rows["1297"], "vocals 10.87")
    assert note(rows["hyperace-vocals"], "vocals 11.39").endswith(
        "entry bs_roformer-unwa-hyperace_v2_vocals, https://mvsep.com/quality_checker/entry/9475")
    assert re.search(r" 435 MB fp16 +instrumental 17\.55 \[\d+\], vocals 11\.37 \[\d+\] +CC BY-NC 4\.0 +no$", rows["deux"])
    assert re.search(r"^mega +BS-RoFormer +53 stems +1\.37 GB fp16 +- +none stated +no$", rows["mega"])
    assert re.search(r" 45 MB fp16 +- +non-commercial use only +no$", rows["guitar"])
    best = next(line for line in lines if line.startswith("Best per stem"))
    assert re.fullmatch(r"Best per stem, by SDR on MVSEP's Multisong dataset: vocals: hyperace-vocals 11\.39 \[\d+\]; "
                        r"instrumental: deux 17\.55 \[\d+\]", best)
    assert "  sw: no licence stated. Reported to derive from a commercial product's separator." in "\n".join(lines)
    assert f"  deux: {catalogue.get('deux').licence}. {catalogue.get('deux').provenance}" in lines
    assert lines[-1] == f"Default model: 1297. Weights folder: {tmp_path}"


def test_cli_models_stem_lists_only_the_models_that_give_it(tmp_path, capsys):
    assert cli.main(["models", "--stem", "guitar", "--dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["sw", "mega", "guitar"] and lines[4] == ""
    assert "53 stems incl. guitar" in lines[2]
    assert "No published Multisong figure for guitar." in lines
    assert cli.main(["models", "--stem", "vocals", "--dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert next(line for line in lines if line.startswith("Best per stem")).startswith(
        "Best per stem, by SDR on MVSEP's Multisong dataset: vocals: hyperace-vocals 11.39 [")
    assert "instrumental:" not in next(line for line in lines if line.startswith("Best per stem"))


def test_cli_models_stem_that_no_model_gives_is_one_error(tmp_path, capsys):
    assert cli.main(["models", "--stem", "kazoo", "--dir", str(tmp_path)]) == 1
    assert capsys.readouterr() == ("", "stemsep: error: no model in the catalogue gives a stem named 'kazoo'\n")


def test_best_per_stem_takes_the_highest_multisong_figure_only():
    best = catalogue.best_per_stem()
    assert {stem: (m.name, s.sdr) for stem, (m, s) in best.items()} == {
        "vocals": ("hyperace-vocals", 11.39), "instrumental": ("deux", 17.5466)}
    # audio-separator's MUSDB18 medians are higher (1297: vocals 11.77) but not comparable: left out
    assert all(s.multisong for _, s in best.values())


def test_cli_models_download_of_an_unknown_name_lists_the_known_ones(tmp_path, capsys):
    assert cli.main(["models", "download", "kim", "--dir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == f"stemsep: error: unknown model 'kim'; the known models are {', '.join(catalogue.MODELS)}\n"
    assert list(tmp_path.iterdir()) == []


def test_the_catalogue_ships_in_the_package():
    """A normal (non-editable) install carries models.json and the shipped configs only if
    pyproject.toml declares them."""
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    declared = pyproject["tool"]["setuptools"]["package-data"]["stemsep"]
    assert catalogue.DATA_FILE in declared and f"{catalogue.CONFIGS_FOLDER}/*.yaml" in declared
