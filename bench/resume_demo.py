"""SIGTERM the demo job mid-run, rerun it, and compare with an uninterrupted run.

    python bench/resume_demo.py [--at-step 60] [--work /tmp/qlora-resume]

Prints one JSON line: the exit code after SIGTERM (75 documented), seconds from the signal to
the process exit (finish the step + write the checkpoint + shut down), the step it resumed
from, and whether the per-step metrics and the final adapter file are identical to the
uninterrupted run's.
"""

import argparse
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("step", "loss", "lr", "grad_norm", "supervised_tokens", "eval_loss")


def train(output: Path, **popen):
    command = [
        sys.executable,
        "-m",
        "qlora.cli",
        "train",
        str(ROOT / "configs" / "demo.yaml"),
        "--set",
        f"output.dir={output}",
    ]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def logged_steps(output: Path) -> list[dict]:
    path = output / "metrics.jsonl"
    if not path.exists():
        return []
    return [
        {key: row.get(key) for key in COMPARED}
        for row in map(json.loads, (line for line in path.read_text().splitlines() if line.endswith("}")))
    ]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--at-step", type=int, default=60, help="send SIGTERM once this step is logged")
    parser.add_argument("--work", default="/tmp/qlora-resume", help="scratch folder (replaced)")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    reference, interrupted = work / "reference", work / "interrupted"

    assert train(reference).wait() == 0, "the uninterrupted run failed"

    process = train(interrupted)
    while not logged_steps(interrupted) or logged_steps(interrupted)[-1]["step"] < args.at_step:
        if process.poll() is not None:
            sys.exit(f"the run ended before step {args.at_step}: {process.communicate()[1][-500:]}")
        time.sleep(0.02)
    signalled = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate()
    seconds_to_exit = time.perf_counter() - signalled

    rerun = train(interrupted)
    stdout, _ = rerun.communicate()
    resumed = [line for line in stdout.splitlines() if line.startswith("resuming from")]
    print(
        json.dumps(
            {
                "bench": "resume_demo",
                "sigterm_exit_code": process.returncode,
                "seconds_from_sigterm_to_exit": round(seconds_to_exit, 2),
                "stop_message": stderr.strip().splitlines()[-1],
                "rerun_exit_code": rerun.returncode,
                "resumed": resumed[0] if resumed else None,
                "metrics_identical": logged_steps(interrupted) == logged_steps(reference),
                "adapter_identical": sha256(interrupted / "adapter_model.safetensors")
                == sha256(reference / "adapter_model.safetensors"),
            }
        )
    )


if __name__ == "__main__":
    main()
