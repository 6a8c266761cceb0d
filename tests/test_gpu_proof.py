"""bench/gpu_proof.sh, prepared before a GPU is lent: its CPU dry run names every step, fits the
8-minute budget, runs commands that exist with flags their scripts accept, and carries pins that
satisfy pyproject.toml. The dry run needs no network; resolving the pins on the index does
(`--check-index`, the slow test)."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_proof.sh"
STEPS = ("install", "pytest_gpu", "plan_proof", "compare_8b")
BUDGET_S = 8 * 60
LACKING = ("bitsandbytes", "pydantic", "datasets", "trl")  # what the lent machine does not have


def dry_run(*flags) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", *flags], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def planned_steps(stdout: str) -> dict:
    found = re.findall(r"^step (\w+): budget (\d+)s: (.+)$", stdout, flags=re.MULTILINE)
    return {name: (int(budget), command) for name, budget, command in found}


def pins() -> dict:
    lines = (ROOT / "bench" / "wheels.txt").read_text().splitlines()
    wanted = [Requirement(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return {requirement.name.lower().replace("_", "-"): requirement for requirement in wanted}


def test_the_dry_run_names_every_step_within_eight_minutes():
    result = dry_run()
    assert result.returncode == 0, result.stderr
    steps = planned_steps(result.stdout)
    assert tuple(steps) == STEPS
    assert sum(budget for budget, _ in steps.values()) <= BUDGET_S
    assert f"total budget: {sum(budget for budget, _ in steps.values())}s of {BUDGET_S}s" in result.stdout
    assert f"pins: {len(pins())} in bench/wheels.txt" in result.stdout
    assert "pytest -q -m gpu" in steps["pytest_gpu"][1]
    assert "llama-3.1-8b llama-3.3-70b --seq-len 2048" in steps["plan_proof"][1]


def test_each_step_runs_a_file_that_exists_with_flags_it_accepts():
    steps = planned_steps(dry_run().stdout)
    for name, (_, command) in steps.items():
        for word in shlex.split(command.replace("&&", " ")):
            if word.endswith((".py", ".sh")) and not word.startswith("-"):
                assert (ROOT / word).is_file(), f"{name}: {word} does not exist"
    from bench.compare import parse_args

    words = shlex.split(steps["compare_8b"][1])
    args = parse_args(words[words.index("bench/compare.py") + 1 :])
    assert args.arch == "llama-3.1-8b" and (ROOT / "configs" / "arch" / args.arch / "config.json").is_file()


def test_the_pins_are_exact_and_satisfy_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    wanted = pins()
    assert all(str(requirement.specifier).startswith("==") for requirement in wanted.values())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needs = project["dependencies"] + project["optional-dependencies"]["bench"]
    for need in map(Requirement, needs):
        name = need.name.lower()
        if name in LACKING:
            assert name in wanted, f"{name}: the GPU machine lacks it; pin it in bench/wheels.txt"
        if name in wanted:
            version = str(wanted[name].specifier).removeprefix("==")
            assert need.specifier.contains(version), f"{name}=={version} does not satisfy pyproject's {need}"


def test_bad_arguments_and_a_missing_out_are_one_line_errors(tmp_path):
    for args, culprit in ((["--bogus"], "--bogus"), (["--check-index"], "--check-index")):
        result = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and culprit in result.stderr and len(result.stderr.splitlines()) == 1
    env = {"PATH": "/usr/bin:/bin", "WHEELS": str(tmp_path)}
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2 and "OUT is not set" in result.stderr


@pytest.mark.slow  # the package index: CI reaches PyPI, these machines may not
def test_the_pins_resolve_for_the_gpu_machine_on_the_index():
    result = dry_run("--check-index")
    assert result.returncode == 0, result.stderr
    installed = re.search(r"^index: Would install (.+)$", result.stdout, flags=re.MULTILINE)
    assert installed, result.stdout
    assert len(installed.group(1).split()) == len(pins())


def test_the_plan_proof_step_runs_end_to_end_on_the_cpu(tmp_path):
    """The proof's second step, on the demo model: it must run here, or the one GPU run loses it
    (it once imported a function that had moved). Tokens/s leaves the first (warm-up) step out."""
    import json
    import os
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "bench/plan_proof.py", "--models", "qlora/demo/model", "--seq-len", "64", "--steps", "3"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert "error" not in record, record
    assert record["steps"] == 3 and record["planned_total_bytes"] > 0 and record["measured_peak_rss_bytes"] > 0
    assert record["tokens_per_s"] > 0 and record["tokens_per_s_with_first_step"] > 0


# The proof's pytest step on a box without the service's packages: httpx, fastapi, uvicorn and our
# browser / service helpers made uninstallable, as they are there.
NOT_INSTALLED = """
import importlib.abc, sys
MISSING = ("httpx", "fastapi", "uvicorn", "starlette", "tests.browser", "tests.service_server", "qlora.service")
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == missing or name.startswith(missing + ".") for missing in MISSING):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NotInstalled())
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""


def collect_without_the_service(*args) -> subprocess.CompletedProcess:
    import os
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-c", NOT_INSTALLED, "--collect-only", "-q", "-p", "no:cacheprovider", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


@pytest.mark.parametrize("paths", [["tests/test_gpu.py"], []], ids=["the-proofs-command", "all-tests"])
def test_the_gpu_tests_collect_without_httpx_or_the_service(paths):
    result = collect_without_the_service("-m", "gpu", *paths)
    assert result.returncode == 0, result.stdout + result.stderr
    collected = [line for line in result.stdout.splitlines() if "::" in line]
    assert collected and all(line.startswith("tests/test_gpu.py::") for line in collected)


def test_the_missing_packages_are_really_missing_to_a_service_test():
    result = collect_without_the_service("tests/test_service_units.py")
    assert result.returncode != 0 and "No module named" in result.stdout
