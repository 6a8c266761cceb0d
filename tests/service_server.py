"""A real `qlora serve` process on 127.0.0.1 for tests, and the small helpers the tests share."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.tiny import write_chat_data

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    def __init__(self, root: Path, *args: str, token: str | None = TOKEN, step_delay: float = 0.0):
        self.root, self.args, self.step_delay = root, args, step_delay
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        self.process = None
        self.log = root.parent / f"{root.name}-service.log"

    def start(self) -> "Server":
        environment = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1",
            "QLORA_TEST_STEP_DELAY": str(self.step_delay),
        }
        environment.pop("QLORA_SERVICE_TOKEN", None)
        if self.token is not None:
            environment["QLORA_SERVICE_TOKEN"] = self.token
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.serve_with_faults",
                    "serve",
                    "--root",
                    str(self.root),
                    "--port",
                    str(self.port),
                    *self.args,
                ],
                cwd=ROOT,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if self.token is None:
            wait_until(lambda: (self.root / "service_token").exists(), "the token file", self.process)
            self.token = (self.root / "service_token").read_text().strip()
        wait_until(self.healthy, "the service to answer", self.process)
        return self

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", headers=self.headers(), timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(), timeout=300)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=60)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=300)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def wait_until(condition, what: str, process=None, seconds: float = 300):
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process exited ({process.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def wait_for_state(
    client: httpx.Client, job_id: str, states: tuple[str, ...], server: Server | None = None, seconds: float = 300
) -> dict:
    def reached():
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["state"] in states else None

    return wait_until(reached, f"job {job_id} to be {' or '.join(states)}", server.process if server else None, seconds)


def populate_root(root: Path, model_dir: Path) -> None:
    """The tiny model and data inside the service root, where configs may name them."""
    shutil.copytree(model_dir, root / "files" / "tiny-model")
    (root / "files" / "tiny").mkdir()
    write_chat_data(root / "files" / "tiny" / "train.jsonl", 32, seed=1)
    write_chat_data(root / "files" / "tiny" / "eval.jsonl", 8, seed=2)


def tiny_job(max_steps: int, **train) -> dict:
    """The tests/tiny.py job, with paths relative to the service root."""
    return {
        "model": {"name_or_path": "files/tiny-model"},
        "quantization": {"bits": 4, "compute_dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
        "data": {"train": "files/tiny/train.jsonl", "eval": "files/tiny/eval.jsonl", "max_seq_len": 64},
        "train": {
            "max_steps": max_steps,
            "micro_batch_size": 4,
            "learning_rate": 1e-3,
            "optimizer": "adamw",
            "seed": 0,
            **train,
        },
        "output": {"dir": "ignored: the service sets it"},
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--virtual-time-budget=6000",
]


@dataclass
class Page:
    dom: str
    screenshot: Path | None

    def points(self, path_id: str) -> int:
        match = re.search(rf'<path id="{path_id}"[^>]*data-points="(\d+)"', self.dom)
        assert match, f"no #{path_id} with points in the page"
        return int(match.group(1))


def chromium() -> str:
    """Debian's chromium; missing in CI (CI=true) is a failure, elsewhere a skip."""
    import pytest

    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if found is None:
        message = "chromium is not installed (apt-get install chromium; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def browse(server: Server, job_id: str, folder: Path, screenshot: bool = False) -> Page:
    """Open the page at /#token=...&job=<id> in headless Chromium: its DOM after the scripts ran,
    and optionally a screenshot."""
    url = f"{server.url}/#token={server.token}&job={job_id}"
    browser = chromium()

    def run(*flags: str, profile: str) -> subprocess.CompletedProcess:
        command = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={folder / profile}", *flags, url]
        return subprocess.run(command, capture_output=True, text=True, timeout=180)

    dom = run("--dump-dom", profile="browser-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    image = None
    if screenshot:
        image = folder / "service-page.png"
        shot = run(f"--screenshot={image}", "--window-size=1000,1000", profile="browser-shot")
        assert shot.returncode == 0 and image.exists(), shot.stderr[-2000:]
    return Page(dom.stdout, image)
