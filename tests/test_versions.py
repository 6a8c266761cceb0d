"""The versions we say we support are the versions we test: pyproject.toml's lower bounds are the
lowest-versions leg's pins (.ci/lowest-versions.txt, run by .ci/lowest), what bench/wheels.txt
carries to the GPU machine is what that leg ran, and docker/requirements.lock is the environment
this suite runs in."""

import importlib.metadata as metadata
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# The libraries whose behaviour the code leans on (quantizer, attention and mask interfaces, LoRA
# layers, the loop's precision, the data and config layers): a version of each is a claim.
OF_RECORD = ("torch", "transformers", "bitsandbytes", "peft", "accelerate", "datasets", "safetensors", "pydantic")
BENCH_ONLY = ("trl",)  # carried for bench/compare.py alone, not part of the lowest-versions leg


def pins(path: Path) -> dict[str, Version]:
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    found = {}
    for requirement in map(Requirement, lines):
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{path.name}: {requirement} is not an exact pin"
        name = canonicalize_name(requirement.name)
        assert name not in found, f"{path.name}: {name} pinned twice"
        found[name] = Version(specifier.version)
    return found


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_pyprojects_lower_bounds_are_the_versions_the_lowest_leg_tests():
    lowest = pins(ROOT / ".ci" / "lowest-versions.txt")
    floors = {canonicalize_name(r.name): r for r in map(Requirement, project()["dependencies"])}
    for name in OF_RECORD:
        (specifier,) = floors[name].specifier
        assert specifier.operator == ">=", f"pyproject.toml: {floors[name]} is not a lower bound"
        assert Version(specifier.version) == lowest[name], (
            f"pyproject.toml says {floors[name]}, the lowest-versions leg tests {name}=={lowest[name]}"
        )
    # Python: the leg's 3.12 and the main leg's 3.11 are in range, nothing older is claimed.
    assert project()["requires-python"] == ">=3.11"
    assert "sys.version_info[:2] == (3, 12)" in (ROOT / ".ci" / "lowest").read_text()


def test_what_the_gpu_machine_is_carried_is_what_the_lowest_leg_ran():
    lowest = pins(ROOT / ".ci" / "lowest-versions.txt")
    for name, version in pins(ROOT / "bench" / "wheels.txt").items():
        if name in BENCH_ONLY:
            continue
        assert lowest.get(name) == version, f"bench/wheels.txt pins {name}=={version}, the leg ran {lowest.get(name)}"
    # The machine's own torch and transformers (README.md, "The one-shot GPU proof").
    assert lowest["torch"] == Version("2.11.0") and lowest["transformers"] == Version("5.17.0")


def in_the_lowest_versions_venv() -> bool:
    return sys.prefix != sys.base_prefix and (Path(sys.prefix) / ".pins-stamp").exists()


@pytest.mark.skipif(in_the_lowest_versions_venv(), reason="the lowest-versions venv pins older releases on purpose")
def test_the_image_lock_is_the_environment_this_suite_runs_in():
    locked = pins(ROOT / "docker" / "requirements.lock")
    for name in OF_RECORD:
        installed = Version(metadata.version(name)).public  # 2.13.0+cpu: this machine's build of 2.13.0
        assert locked[name] == Version(installed), (
            f"docker/requirements.lock pins {name}=={locked[name]}, the tested environment has {installed}:"
            " python docker/lock.py > docker/requirements.lock"
        )
    for requirement in map(Requirement, project()["dependencies"]):
        assert canonicalize_name(requirement.name) in locked, f"docker/requirements.lock lacks {requirement.name}"


@pytest.mark.skipif(in_the_lowest_versions_venv(), reason="the lowest-versions venv pins older releases on purpose")
def test_the_lock_generator_reproduces_the_lock_for_the_dependencies_of_record():
    generated = subprocess.run(
        [sys.executable, str(ROOT / "docker" / "lock.py")], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    lines = [line for line in generated.splitlines() if line and not line.startswith("#")]
    fresh = {canonicalize_name(Requirement(line).name): Requirement(line) for line in lines}
    locked = pins(ROOT / "docker" / "requirements.lock")
    for name in OF_RECORD:
        assert str(fresh[name].specifier) == f"=={locked[name]}"


def test_the_gpu_proofs_first_record_names_each_version_the_rehearsal_did_not_run():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_env.py")], capture_output=True, text=True, timeout=120
    )
    record = json.loads(result.stdout.strip().splitlines()[-1])
    if in_the_lowest_versions_venv():
        assert record["untested_here"] == {}  # the rehearsal itself: nothing differs
    else:
        lowest = pins(ROOT / ".ci" / "lowest-versions.txt")
        here = Version(metadata.version("torch")).public
        assert ("torch" in record["untested_here"]) == (Version(here) != lowest["torch"])
