"""cog.yaml and requirements-cog.txt: what Cog will accept and what the image will install.

Nothing here needs Docker or the Cog CLI: the keys are checked against Cog's own schema
(vendored below), the build steps against the rules Cog's Dockerfile generator applies, and
the pinned packages by resolving them with pip for the image's platform (slow, network).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from importlib.metadata import version as installed_version
from pathlib import Path

import pytest
import yaml

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


def test_gpu_only_packages_are_pinned():
    versions = pins()
    assert re.fullmatch(r"\d+\.\d+\.\d+", versions["onnxruntime-gpu"])
    assert re.fullmatch(r"\d+\.\d+\.\d+\.dev\d{8}", versions["onnx-weekly"])
    assert versions["onnx-weekly"] == installed_version("onnx-weekly")


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
    """A py3-none-any wheel with the metadata of `name`'s newest sdist on PyPI."""
    downloaded = pip("download", "--no-deps", "--no-binary=:all:", "--index-url", "https://pypi.org/simple", "-d", str(work), name, timeout=300)
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
    import json

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
    pins of everything else (onnxruntime-gpu, onnx-weekly, audio-separator, numpy, cog,
    coglet, ...) resolve together for the image's platform. Runs where the PyTorch index is
    out of reach."""
    lines = [
        re.sub(r"^(torch|torchvision)==([^+\s]+)\+cu\d+$", r"\1==\2", line)
        for line in requirement_lines()
        if not line.startswith("--extra-index-url")
    ]
    expected = {name: pinned.split("+")[0] for name, pinned in pins().items()}
    check_resolved(resolve(lines, tmp_path), expected)
