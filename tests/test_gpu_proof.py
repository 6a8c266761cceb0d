"""bench/gpu_proof.sh, prepared before a GPU is lent: its CPU dry run names every step, fits the
8-minute budget, runs commands that exist with flags their scripts accept, and carries pins that
satisfy pyproject.toml; run for real (on made-up steps), each step has its own timeout and its
results are in $OUT the moment it ends, so a call cut short keeps them. The dry run needs no
network; resolving the pins on the index does (`--check-index`, the slow test)."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_proof.sh"
# The order of value: a cut-short run keeps the GPU tests, then the 8B plan, then the 70B.
STEPS = ("install", "pytest_gpu", "plan_proof_8b", "plan_proof_70b", "compare_8b")
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
    assert "--models llama-3.1-8b --seq-len 2048" in steps["plan_proof_8b"][1]
    assert "--models llama-3.3-70b --seq-len 2048" in steps["plan_proof_70b"][1]
    assert all(budget > 0 for budget, _ in steps.values())
    # A STEP.json each, results.jsonl, gpu_proof.log, pytest_gpu.xml: the 8 files a lent machine's call returns.
    assert f"files back: {len(STEPS) + 3} of 8" in result.stdout


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


def proof_env(tmp_path) -> dict:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "placeholder-0-py3-none-any.whl").write_bytes(b"")  # the run refuses an empty wheels/
    return dict(os.environ, WHEELS=str(wheels), OUT=str(tmp_path / "out"), PYTHON=sys.executable)


def steps_file(tmp_path, *steps: str) -> Path:
    path = tmp_path / "steps.txt"
    path.write_text("# NAME|BUDGET_S|COMMAND\n" + "\n".join(steps) + "\n")
    return path


def test_each_step_runs_in_order_under_its_own_timeout_and_writes_its_json_as_it_ends(tmp_path):
    plan = steps_file(
        tmp_path,
        """first|20|echo '{"tokens_per_s": 12.5}'""",
        "overruns|1|echo started; sleep 30",
        """after|20|echo '{"ok": true}'; exit 3""",
    )
    env = proof_env(tmp_path)
    result = subprocess.run(
        ["bash", str(SCRIPT), "--steps-file", str(plan)], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 1, result.stderr  # a step failed; every step still ran
    out = Path(env["OUT"])
    first, overruns, after = (json.loads((out / f"{name}.json").read_text()) for name in ("first", "overruns", "after"))
    assert first["rc"] == 0 and first["records"] == [{"tokens_per_s": 12.5}] and not first["timed_out"]
    # Its own 1 s budget stopped it, not the 30 s sleep, and the step after it ran.
    assert overruns["timed_out"] and overruns["rc"] == 124 and overruns["wall_s"] < 15
    assert after["rc"] == 3 and after["records"] == [{"ok": True}]
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "step" in line] == ["first", "overruns", "after"]
    assert {"from_step": "first", "tokens_per_s": 12.5} in lines
    assert "started" in (out / "gpu_proof.log").read_text()
    assert sorted(path.name for path in out.iterdir()) == [
        "after.json",
        "first.json",
        "gpu_proof.log",
        "overruns.json",
        "results.jsonl",
    ]


def test_a_run_cut_short_keeps_every_finished_step_and_the_log_so_far(tmp_path):
    """As when the lent machine's time limit kills the whole call in the middle of a step."""
    plan = steps_file(tmp_path, """first|20|echo '{"peak": 1}'""", "hangs|120|echo begun; sleep 120")
    env = proof_env(tmp_path)
    out = Path(env["OUT"])
    proof = subprocess.Popen(
        ["bash", str(SCRIPT), "--steps-file", str(plan)], env=env, start_new_session=True, stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while not ((out / "first.json").exists() and "begun" in read_or_empty(out / "gpu_proof.log")):
            assert proof.poll() is None and time.monotonic() < deadline, "the second step never started"
            time.sleep(0.2)
    finally:
        os.killpg(proof.pid, signal.SIGKILL)
        proof.wait(timeout=30)
    assert json.loads((out / "first.json").read_text())["records"] == [{"peak": 1}]
    assert json.loads((out / "results.jsonl").read_text().splitlines()[0])["step"] == "first"
    assert "begun" in (out / "gpu_proof.log").read_text()
    assert not (out / "hangs.json").exists()


def read_or_empty(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_a_bad_steps_file_is_a_one_line_error(tmp_path):
    plan = steps_file(tmp_path, "no budget here")
    result = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--steps-file", str(plan)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1 and "no budget here" in result.stderr and len(result.stderr.splitlines()) == 1
    result = subprocess.run(
        ["bash", str(SCRIPT), "--steps-file", str(tmp_path / "absent.txt")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "absent.txt" in result.stderr and len(result.stderr.splitlines()) == 1
