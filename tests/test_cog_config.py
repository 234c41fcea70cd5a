"""cog.yaml and requirements-cog.txt: what Cog will accept and what the image will install.

Nothing here needs Docker or the Cog CLI: the keys are checked against Cog's own schema
(vendored below), the build steps against the rules Cog's Dockerfile generator applies and
against the catalogue (the baked models' mirrors and checksums), the pins against the
tests' own and against the requirements of what is installed without them, and the pinned
packages by resolving them with pip for the image's platform (slow, network).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
import tomllib
from importlib.metadata import requires as package_requires
from importlib.metadata import version as installed_version
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from stemsep import catalogue

REPO = Path(__file__).resolve().parents[1]

# Cog's schema for cog.yaml, pkg/config/data/config_schema_v1.0.json in replicate/cog at
# 6110c912 (v0.22.0 + 5 commits, 2026-08-21: the newest Cog source available to us; the
# PyPI cog 0.23.1 SDK the image runs ships no copy). Every object there has
# "additionalProperties": false, so a key outside these sets fails `cog build`.
COG_SCHEMA_VERSION = "replicate/cog 6110c912 (v0.22.0-5)"
TOP_LEVEL_KEYS = {"build", "image", "model", "run", "predict", "train", "concurrency", "environment", "weights"}
BUILD_KEYS = {
    "cuda",
    "cudnn",
    "gpu",
    "python_version",
    "python_packages",
    "pre_install",
    "python_requirements",
    "system_packages",
    "sdk_version",
    "run",
}
BUILD_REQUIRED = {"python_version"}
RUN_ITEM_KEYS = {"command", "mounts"}  # a build.run item is a string or {command, mounts}
CONCURRENCY_KEYS = {"max", "default_target"}
WEIGHTS_ITEM_KEYS = {"name", "target", "source"}
ENVIRONMENT_ITEM = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=.*$")  # the schema's pattern
# pkg/config/env.go (same commit): names Cog refuses in `environment` ("reserved for internal use").
ENVIRONMENT_DENIED = ["PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV", "PYTHONUNBUFFERED", "R8_*", "REPLICATE_*",
                      "LIBRARY_PATH", "CUDA_*", "NVIDIA_*", "NV_*", "PGET_*", "HF_ENDPOINT", "HF_HUB_ENABLE_HF_TRANSFER",
                      "KUBERNETES_*"]  # fmt: skip


def cog_yaml() -> dict:
    return yaml.safe_load((REPO / "cog.yaml").read_text())


def run_commands(config: dict) -> list[str]:
    return [item if isinstance(item, str) else item["command"] for item in config["build"].get("run") or []]


def environment(config: dict) -> dict[str, str]:
    return dict(item.split("=", 1) for item in config.get("environment") or [])


def requirement_lines() -> list[str]:
    """requirements-cog.txt without comments and blank lines (options such as
    --extra-index-url included), as Cog reads it."""
    lines = []
    for line in (REPO / "requirements-cog.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def pins() -> dict[str, str]:
    """{normalized name (extras dropped): exact version} of the image's packages."""
    out = {}
    for line in requirement_lines():
        if line.startswith("-"):
            continue
        name, sep, pinned = line.partition("==")
        assert sep and pinned and not re.search(r"[<>=!~,;*]", pinned), f"not pinned to one version: {line}"
        out[normalize(name.split("[")[0])] = pinned
    return out


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def coglet_pin(config: dict) -> str:
    steps = [c for c in run_commands(config) if "coglet==" in c]
    assert len(steps) == 1, steps
    return re.search(r"\bcoglet==(\S+)", steps[0]).group(1)


# the schema ----------------------------------------------------------------------------------


def test_cog_yaml_uses_only_keys_cogs_schema_allows():
    config = cog_yaml()
    assert set(config) <= TOP_LEVEL_KEYS, f"not in Cog's schema ({COG_SCHEMA_VERSION}): {set(config) - TOP_LEVEL_KEYS}"
    assert not {"run", "predict"} <= set(config), "the schema forbids both run and predict"
    build = config["build"]
    assert set(build) <= BUILD_KEYS, f"build keys not in Cog's schema: {set(build) - BUILD_KEYS}"
    assert BUILD_REQUIRED <= set(build)
    for item in build.get("run") or []:
        assert isinstance(item, str) or (isinstance(item, dict) and set(item) <= RUN_ITEM_KEYS and "command" in item), item
    assert set(config.get("concurrency") or {}) <= CONCURRENCY_KEYS
    for item in config.get("weights") or []:
        assert set(item) <= WEIGHTS_ITEM_KEYS, item
    # the types the schema gives
    assert isinstance(build["gpu"], bool)
    for key in ("cuda", "python_version", "python_requirements", "sdk_version"):
        assert isinstance(build[key], str), f"build.{key} must be a string (quote it in YAML)"
    assert all(isinstance(p, str) for p in build.get("system_packages") or [])
    assert isinstance(config["run"], str) and re.fullmatch(r"[\w./-]+\.py:\w+", config["run"])


def test_environment_entries_are_name_value_pairs_cog_accepts():
    config = cog_yaml()
    names = []
    for item in config.get("environment") or []:
        assert isinstance(item, str) and ENVIRONMENT_ITEM.match(item), item
        name = item.split("=", 1)[0]
        for denied in ENVIRONMENT_DENIED:
            assert not (name == denied or (denied.endswith("*") and name.startswith(denied[:-1]))), f"{name}: reserved by Cog"
        names.append(name)
    assert len(names) == len(set(names)), "Cog refuses a name defined twice"


def test_no_build_step_contains_a_newline():
    """Cog's Dockerfile generator refuses a build.run command with a newline in it (each
    must be one RUN line): write long steps as YAML folded scalars (`>-`)."""
    commands = run_commands(cog_yaml())
    assert commands
    for command in commands:
        assert "\n" not in command.strip(), command[:200]


# what the image holds ----------------------------------------------------------------------


def test_weights_are_baked_outside_the_folder_cog_run_mounts_over():
    """`cog run`/`cog serve` without an image name mount the project over /src: the weights
    live in /weights, and the runner is told so through the image's environment."""
    config = cog_yaml()
    weights_dir = environment(config).get("STEMSEP_WEIGHTS_DIR")
    assert weights_dir and weights_dir.startswith("/")
    assert not (weights_dir == "/src" or weights_dir.startswith("/src/"))
    commands = run_commands(config)
    assert f"mkdir -p {weights_dir}" in commands
    fetches = [c for c in commands if "sha256sum" in c]
    assert fetches and all(c.startswith(f"cd {weights_dir} && ") for c in fetches)
    assert not any("/src" in c for c in commands), "build.run runs before the source is copied to /src"


def test_the_cuda_build_of_torch_matches_build_cuda():
    """build.cuda picks the base image, the requirements pick torch's CUDA build: the same
    CUDA release on both sides, from the index that publishes it."""
    config = cog_yaml()
    cuda = config["build"]["cuda"]
    tag = "cu" + cuda.replace(".", "")
    versions = pins()
    assert versions["torch"] == f"2.13.0+{tag}"  # the release the tests run (as its CPU build)
    assert versions["torchvision"] == f"0.28.0+{tag}"
    assert f"--extra-index-url https://download.pytorch.org/whl/{tag}" in requirement_lines()
    assert installed_version("torch").split("+")[0] == versions["torch"].split("+")[0]
    assert installed_version("torchvision").split("+")[0] == versions["torchvision"].split("+")[0]


def test_sdk_and_server_are_pinned_to_the_versions_the_tests_run():
    """Cog installs the SDK from build.sdk_version and takes coglet unpinned (cog's own
    dependency, <1.0) unless COGLET_WHEEL is set on the building machine: the build step
    pins coglet in the image itself and checks both."""
    config = cog_yaml()
    sdk = config["build"]["sdk_version"]
    assert sdk == installed_version("cog")
    assert coglet_pin(config) == installed_version("coglet") == sdk
    step = next(c for c in run_commands(config) if "coglet==" in c)
    assert f"('{sdk}', '{sdk}')" in step  # the check after the install names the same pair
    assert not {"cog", "coglet"} & set(pins()), "Cog strips cog/coglet from the requirements file"


def test_cog_yaml_builds_a_gpu_image_of_this_runner():
    config = cog_yaml()
    build = config["build"]
    assert build["gpu"] is True and build["python_version"] == "3.11" and build["cuda"] == "12.6"
    assert config["run"] == "predict.py:Runner" and "predict" not in config
    assert build["python_requirements"] == "requirements-cog.txt"


# stable pins, and the packages installed without their requirements ----------------------------
# audio-separator 0.47.1 and onnx2torch-py313 1.6.0 require onnx-weekly (weekly pre-releases
# only), splifft 0.0.9 torchaudio (no build for torch 2.13): the image (a cog.yaml build step)
# and the tests (the README's test command, which .ci/run runs) install them with --no-deps,
# and list their requirements themselves, with the stable onnx in place of onnx-weekly.

NO_DEPS_LEFT_OUT = {"splifft": {"torchaudio"}}  # imported only for mel bands, by what the tests use
STABLE_IN_PLACE_OF = {"onnx-weekly": "onnx"}  # the same `onnx` module


def no_deps_pins(command: str) -> dict[str, str]:
    """{name: version} of the `pip install --no-deps` in a shell command that installs audio-separator."""
    for part in command.split("&&"):
        words = part.split()
        if "--no-deps" in words and any(w.startswith("audio-separator==") for w in words):
            return {normalize(n): v for n, _, v in (w.partition("==") for w in words if "==" in w)}
    raise AssertionError(f"no `--no-deps` install of audio-separator in: {command[:200]}")


def image_no_deps() -> dict[str, str]:
    return no_deps_pins(next(c for c in run_commands(cog_yaml()) if "audio-separator==" in c))


def ci_no_deps() -> dict[str, str]:
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    return no_deps_pins(next(line for line in ci if line.startswith("python3.11 -m venv")))


def pyproject_requirements() -> dict[str, SpecifierSet]:
    """{normalized name: specifier} of pyproject.toml's dependencies and `test` extra, with
    the extras of stemsep itself that it names."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = {}

    def add(lines: list[str]) -> None:
        for line in lines:
            requirement = Requirement(line)
            if normalize(requirement.name) == "stemsep":
                for extra in sorted(requirement.extras):
                    add(project["optional-dependencies"][extra])
            else:
                out[normalize(requirement.name)] = requirement.specifier

    add(project["dependencies"])
    add(project["optional-dependencies"]["test"])
    return out


def exact(specifier: SpecifierSet) -> str | None:
    """The version of an `==` pin, else None."""
    specs = list(specifier)
    return specs[0].version if len(specs) == 1 and specs[0].operator == "==" else None


def test_every_pin_is_one_stable_release():
    """A weekly or dev build is gone from the index within months; every pin of the image
    and of the tests is a release."""
    pinned = {
        "requirements-cog.txt": pins(),
        "cog.yaml --no-deps": image_no_deps(),
        "cog.yaml coglet and SDK": {"coglet": coglet_pin(cog_yaml()), "cog": cog_yaml()["build"]["sdk_version"]},
        ".ci/run --no-deps": ci_no_deps(),
        "pyproject.toml": {name: exact(spec) for name, spec in pyproject_requirements().items() if exact(spec)},
    }
    for where, versions in pinned.items():
        for name, version in versions.items():
            assert not Version(version).is_prerelease, f"{where}: {name}=={version} is not a release"
            assert name not in STABLE_IN_PLACE_OF, f"{where}: {name}"
    unpinned = sorted(name for name, spec in pyproject_requirements().items() if not exact(spec))
    assert unpinned == ["numpy"], "the tests' packages are pinned (numpy keeps the library's range)"


def test_the_image_and_the_tests_install_the_same_releases_without_their_requirements():
    image, tests = image_no_deps(), ci_no_deps()
    assert set(image) == {"audio-separator", "onnx2torch-py313"}  # splifft is for the tests only
    assert set(tests) == set(image) | {"splifft"}
    for name, version in tests.items():
        assert image.get(name, version) == version == installed_version(name), name


@pytest.mark.parametrize("where", ["image", "tests"])
def test_what_is_installed_without_its_requirements_finds_them_listed(where):
    """Every requirement that audio-separator, onnx2torch-py313 and splifft declare (their
    installed metadata, for Linux and CPython 3.11, with the extra the image or the tests
    ask for: onnxruntime-gpu or onnxruntime) is listed where they are installed, at a
    version it accepts; onnx-weekly as the stable onnx, and torchaudio, which splifft's
    networks import only for mel bands, left out."""
    if where == "image":
        listed = {name: SpecifierSet(f"=={version}") for name, version in pins().items()}
        no_deps, extra = image_no_deps(), "gpu"
    else:
        listed, no_deps, extra = pyproject_requirements(), ci_no_deps(), "cpu"
    missing = []
    for package in no_deps:
        for line in package_requires(package) or []:
            requirement = Requirement(line)
            if requirement.marker and not any(requirement.marker.evaluate({"extra": e}) for e in ("", extra)):
                continue
            name = normalize(requirement.name)
            if name in NO_DEPS_LEFT_OUT.get(package, ()) or name in no_deps:
                continue
            specifier = requirement.specifier
            if name in STABLE_IN_PLACE_OF:  # any release of the stable package
                name, specifier = STABLE_IN_PLACE_OF[name], SpecifierSet()
            if name not in listed:
                missing.append(f"{package} needs {line}")
            elif exact(listed[name]) and not specifier.contains(exact(listed[name]), prereleases=True):
                missing.append(f"{package} needs {line}, listed {name}{listed[name]}")
    assert not missing, "\n".join(missing)


def test_the_image_runs_the_releases_the_tests_run():
    """The image's pins, torch and torchvision as their CUDA build and onnxruntime-gpu as the
    tests' onnxruntime apart, are the versions the tests run with (and pin)."""
    tests = pyproject_requirements()
    for name, version in pins().items():
        if name == "onnxruntime-gpu":
            continue
        release = version.split("+")[0]
        assert installed_version(name).split("+")[0] == release, name
        if exact(tests.get(name, SpecifierSet())):
            assert exact(tests[name]) == release, name


# the baked models ------------------------------------------------------------------------------
# Cog needs its own copies of the list: the build steps run before the source is copied (so
# they cannot read the catalogue), and the `model` input's choices must be literals (Cog
# reads them without running Python). These tests hold every copy to predict.py's
# BAKED_MODELS and to the catalogue.


def predict_source() -> ast.Module:
    return ast.parse((REPO / "predict.py").read_text())


def baked_models() -> tuple[str, ...]:
    """predict.py's BAKED_MODELS, read without importing the runner (and Cog) here."""
    node = next(n for n in predict_source().body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "BAKED_MODELS")
    return ast.literal_eval(node.value)


def model_input() -> tuple[tuple[str, ...], str, str]:
    """The `model` input of predict.py's run(): its choices, default and description."""
    tree = predict_source()
    run = next(n for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef | ast.FunctionDef) and n.name == "run")
    names = [a.arg for a in run.args.args]
    call = run.args.defaults[names.index("model") - (len(names) - len(run.args.defaults))]
    keywords = {k.arg: k.value for k in call.keywords}
    constants = {n.targets[0].id: n.value for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)}
    description = ast.literal_eval(constants[keywords["description"].id])
    return tuple(ast.literal_eval(keywords["choices"])), ast.literal_eval(keywords["default"]), description


def weight_steps() -> list[str]:
    return [step for step in run_commands(cog_yaml()) if "sha256sum" in step]


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def baked_gb() -> list[float]:
    """The baked models' checkpoint and config sizes, in GB."""
    return [sum(f.size or 0 for f in catalogue.get(name).files) / 1e9 for name in baked_models()]


def test_the_default_model_is_baked_first_and_the_model_input_offers_exactly_the_baked_models():
    choices, default, description = model_input()
    assert baked_models()[0] == default == catalogue.DEFAULT
    assert choices == baked_models()
    schema = json.loads((REPO / ".cog" / "openapi_schema.json").read_text())["components"]["schemas"]
    assert tuple(schema["model"]["enum"]) == baked_models()
    assert schema["Input"]["properties"]["model"]["default"] == catalogue.DEFAULT
    named = re.findall(r"(?:^|, )([\w-]+) \(", description.split(": ", 1)[1])  # "The model: 1297 (...), kim-vocals (...), ..."
    assert tuple(named) == baked_models(), description


def test_build_steps_fetch_the_weights_from_the_same_mirrors_with_the_same_checksums():
    files = [wf for name in baked_models() for wf in catalogue.get(name).files]
    steps = weight_steps()
    assert len(steps) == len(files)
    for wf, step in zip(files, steps):
        assert re.findall(r"https://[^\s;]+", step) == list(wf.urls)  # every mirror, in order
        assert re.findall(r"\b[0-9a-f]{64}\b", step) == [wf.sha256]
        assert step.startswith("cd /weights && ") and step.endswith(f"test -f {wf.name}")


def test_the_documents_name_the_baked_models_and_their_size():
    """The README's "On Replicate" section lists the baked models (its text and the `model`
    input's row) and what they add to the image, model by model and in all, as the
    catalogue has them; docs/deploy.md gives the same list and total, and says that none
    of them states a licence."""
    section = readme_section("On Replicate")
    intro = next(paragraph for paragraph in section.split("\n\n") if "bakes in" in paragraph)
    assert tuple(re.findall(r"`([\w-]+)` \(", intro)) == baked_models(), intro
    row = next(line for line in section.splitlines() if line.startswith("| `model` |"))
    assert tuple(re.findall(r"`([\w-]+)`", row.split("|")[2])) == baked_models(), row
    sizes = re.search(r"add ([\d.]+) GB to the image \(([\d.\s+]+) GB\)", intro)
    assert sizes, intro
    assert [float(x) for x in sizes.group(2).split("+")] == [round(gb, 2) for gb in baked_gb()]
    total = f"{sum(baked_gb()):.1f} GB"
    assert sizes.group(1) + " GB" == total
    deploy = " ".join((REPO / "docs" / "deploy.md").read_text().split())
    assert f"about {total}" in deploy and ", ".join(baked_models()) in deploy
    assert "none of the seven baked models' authors states one for the weights" in deploy  # a licence:
    assert [catalogue.get(name).licence for name in baked_models()] == [None] * len(baked_models())


def test_only_models_that_may_be_served_publicly_are_baked_and_the_best_of_them_are():
    """The image serves the public: no baked model's stated licence forbids commercial use and
    none has a disputed provenance (a model downloaded inside the container would be served
    as well, and none is: predict.py reads the image's files only). Of the models that may
    be served, those with the highest Multisong SDR for vocals and for instrumental are baked,
    and a guitar model is."""
    for name in baked_models():
        model = catalogue.get(name)
        assert model.servable and not model.non_commercial and not model.provenance_disputed, name
    best = catalogue.best_per_stem([m for m in catalogue.MODELS.values() if m.servable])
    assert {stem: (model.name, score.sdr) for stem, (model, score) in best.items() if stem in ("vocals", "instrumental")} == {
        "vocals": ("hyperace-vocals", 11.39), "instrumental": ("hyperace-inst", 17.4)}
    assert {best["vocals"][0].name, best["instrumental"][0].name} <= set(baked_models())
    assert any("guitar" in catalogue.get(name).stems for name in baked_models())
    # the flags agree with what the catalogue says in words, and rule out the models they should
    for model in catalogue.MODELS.values():
        assert model.non_commercial == bool(re.search(r"non-commercial|\bNC\b", model.licence or "")), model.name
    assert [m.name for m in catalogue.MODELS.values() if not m.servable] == ["sw", "deux", "guitar"]
    imported = set()
    for node in ast.walk(predict_source()):
        if isinstance(node, ast.ImportFrom):
            imported |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
    assert "stemsep.catalogue" in imported and "stemsep.weights" not in imported  # nothing downloads in the container


@pytest.mark.parametrize("scenario", ["first-mirror-down", "every-mirror-wrong"])
def test_build_step_keeps_only_a_checksummed_file(tmp_path, scenario):
    """Run a weights step under /bin/sh with a stand-in `curl` for which the first mirror
    fails: the next is tried, and bytes that do not match the checksum never land under the
    real name."""
    good = b"the right bytes"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "curl").write_text(
        "#!/bin/sh\n"
        'while [ $# -gt 0 ]; do case "$1" in -o) out="$2"; shift 2;; -*) shift;; *) url="$1"; shift;; esac; done\n'
        'echo "$url" >> "$CURL_LOG"\n'
        '[ "$url" = "$FAILING_URL" ] && exit 22\n'
        'printf "%s" "$CURL_BODY" > "$out"\n'
    )
    (fake_bin / "curl").chmod(0o755)
    weights = tmp_path / "weights"
    weights.mkdir()
    step = weight_steps()[0]
    name = step.rsplit("test -f ", 1)[1]
    urls = re.findall(r"https://[^\s;]+", step)
    assert len(urls) >= 2
    step = step.replace("cd /weights ", f"cd {weights} ")
    step = re.sub(r"\b[0-9a-f]{64}\b", hashlib.sha256(good).hexdigest(), step)
    body = good if scenario == "first-mirror-down" else b"an error page"
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "CURL_LOG": str(tmp_path / "log"),
           "CURL_BODY": body.decode(), "FAILING_URL": urls[0]}
    result = subprocess.run(["/bin/sh", "-c", step], env=env, capture_output=True, text=True, timeout=30)
    tried = (tmp_path / "log").read_text().splitlines()
    assert tried == (urls[:2] if scenario == "first-mirror-down" else urls)  # in order, until one is right
    if scenario == "first-mirror-down":
        assert result.returncode == 0, result.stderr
        assert sorted(p.name for p in weights.iterdir()) == [name]
        assert (weights / name).read_bytes() == good
    else:
        assert result.returncode != 0
        assert list(weights.iterdir()) == []


# the image's packages resolve together ---------------------------------------------------------
# pip for the image's platform: CPython 3.11 on x86_64 Linux. Cog's CUDA 12.6 bases are
# Ubuntu 22.04 or 24.04, so glibc 2.35 at least: every manylinux tag up to 2_35 (pip does
# not widen a --platform to older glibc tags itself).

PLATFORM_ARGS = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp"]
for _glibc_minor in range(17, 36):
    PLATFORM_ARGS += ["--platform", f"manylinux_2_{_glibc_minor}_x86_64"]
PLATFORM_ARGS += ["--platform", "manylinux2014_x86_64", "--platform", "manylinux2010_x86_64", "--platform", "manylinux1_x86_64"]
# audio-separator needs diffq, which PyPI has only as source (the image compiles it:
# build-essential). pip cannot take a source package while resolving for another platform,
# so the resolve gets a wheel carrying nothing but the sdist's own name, version and
# requirements.
SOURCE_ONLY = ("diffq",)


def pip_env() -> dict[str, str]:
    """This machine's pip settings left out (local wheel folders, constraints, mirrors): the
    resolve sees PyPI and the indexes requirements-cog.txt names, as the image build does."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in ("PIP_CERT", "PIP_DEFAULT_TIMEOUT")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def pip(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], env=pip_env(), capture_output=True, text=True, timeout=timeout, check=False)


def metadata_stub(name: str, folder: Path, work: Path) -> None:
    """A py3-none-any wheel with the metadata of the pinned release's sdist on PyPI (only
    `name` from source: its build requirements, Cython among them, come as wheels)."""
    spec = f"{name}=={pins()[normalize(name)]}"
    downloaded = pip("download", "--no-deps", f"--no-binary={name}", "--index-url", "https://pypi.org/simple", "-d", str(work), spec, timeout=300)
    if downloaded.returncode:
        pytest.skip(f"PyPI unreachable from here, cannot resolve the image's packages: {downloaded.stderr.strip()[-300:]}")
    sdist = next(work.glob(f"{name}-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        pkg_info = next(m for m in tar.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO"))
        version = re.search(r"^Version: (\S+)", tar.extractfile(pkg_info).read().decode(), re.MULTILINE).group(1)
        requires = next(m for m in tar.getmembers() if m.name.endswith(".egg-info/requires.txt"))
        text = tar.extractfile(requires).read().decode()
    install_requires = [line.strip() for line in text.split("\n[", 1)[0].splitlines() if line.strip()]
    dist_info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in install_requires)
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{dist_info}/METADATA", metadata)
        whl.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nGenerator: stemsep-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{dist_info}/RECORD", "")


def resolve(lines: list[str], tmp_path: Path) -> dict[str, str]:
    """pip's dry-run resolve of `lines` for the image's platform: {name: version}."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in SOURCE_ONLY:
        metadata_stub(name, stubs, tmp_path)
    requirements = tmp_path / "requirements.txt"
    config = cog_yaml()
    sdk = config["build"]["sdk_version"]
    requirements.write_text("\n".join([*lines, f"cog=={sdk}", f"coglet=={coglet_pin(config)}"]) + "\n")
    report = tmp_path / "report.json"
    result = pip(
        "install", "--dry-run", "--ignore-installed", "--no-cache-dir", "--quiet", "--report", str(report),
        *PLATFORM_ARGS, "--target", str(tmp_path / "target"),
        "--index-url", "https://pypi.org/simple", "--find-links", str(stubs), "-r", str(requirements),
    )  # fmt: skip
    assert result.returncode == 0, f"the image's packages do not resolve together:\n{result.stderr[-4000:]}"
    installs = json.loads(report.read_text())["install"]
    return {normalize(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}


def check_resolved(resolved: dict[str, str], expected: dict[str, str]) -> None:
    for name, pinned in expected.items():
        assert resolved.get(name) == pinned, f"{name}: pinned {pinned}, resolved {resolved.get(name)}"
    sdk = cog_yaml()["build"]["sdk_version"]
    assert resolved["cog"] == resolved["coglet"] == sdk
    assert "onnxruntime" not in resolved, "the CPU onnxruntime would shadow onnxruntime-gpu's module"
    assert not set(STABLE_IN_PLACE_OF) & set(resolved), "pre-release packages in the image"
    assert not [n for n, v in resolved.items() if Version(v).is_prerelease], "pre-releases in the image"


@pytest.mark.slow
def test_the_image_packages_resolve_together(tmp_path):
    """requirements-cog.txt as the image installs it, torch's CUDA build included: every
    pin is what pip picks, and nothing pulls in CUDA 13 libraries beside torch's CUDA 12."""
    index = next(line.split()[1] for line in requirement_lines() if line.startswith("--extra-index-url"))
    try:
        with urllib.request.urlopen(urllib.request.Request(index.rstrip("/") + "/torch/", method="HEAD"), timeout=15):
            pass
    except (urllib.error.URLError, OSError) as exc:
        pytest.skip(
            f"{index} is unreachable from here ({exc}): torch==2.13.0+cu126 and torchvision==0.28.0+cu126 "
            "are published only there, so the image's set cannot be resolved on this machine "
            "(test_the_image_packages_resolve_with_pypis_build_of_the_same_torch covers the rest)"
        )
    resolved = resolve(requirement_lines(), tmp_path)
    check_resolved(resolved, pins())
    cuda13 = sorted(n for n in resolved if n.endswith("-cu13") or (n.startswith("nvidia-") and resolved[n].startswith("13.")))
    assert not cuda13, f"CUDA 13 libraries in a CUDA 12.6 image: {cuda13}"


@pytest.mark.slow
def test_the_image_packages_resolve_with_pypis_build_of_the_same_torch(tmp_path):
    """The same set with torch 2.13.0 and torchvision 0.28.0 as PyPI builds them (CUDA 13.0;
    the same releases with the same requirements apart from the nvidia-* libraries): the
    pins of everything else (onnxruntime-gpu, onnx, audio-separator's requirements, numpy,
    cog, coglet, ...) resolve together for the image's platform, to releases only. Runs where
    the PyTorch index is out of reach."""
    lines = [
        re.sub(r"^(torch|torchvision)==([^+\s]+)\+cu\d+$", r"\1==\2", line)
        for line in requirement_lines()
        if not line.startswith("--extra-index-url")
    ]
    expected = {name: pinned.split("+")[0] for name, pinned in pins().items()}
    check_resolved(resolve(lines, tmp_path), expected)
