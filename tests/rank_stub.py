"""`python -m tests.rank_stub train job.yaml --nproc N`: stands in for `qlora.cli`, for tests of the
service's several-GPU plumbing without the training side. With --nproc it is the real launcher
(qlora.cli.launch), which starts N ranks of this same module; each rank writes what it
sees (RANK, WORLD_SIZE, CUDA_VISIBLE_DEVICES ...) to rank-<RANK>.json in its working directory
(the job folder), then does what $QLORA_TEST_RANK_STUB says:

    wait         until SIGTERM, then exit 75 (as `qlora train` does after its checkpoint)
    exit:N       exit N at once, rank 0 printing `error: ...` first (as the CLI does)
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

SEEN = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES", "MASTER_ADDR", "MASTER_PORT")


def main(argv: list[str]) -> int:
    if "--nproc" in argv:
        from qlora.cli.launch import launch

        return launch(int(argv[argv.index("--nproc") + 1]), argv)
    rank = os.environ["RANK"]
    stopping = []
    signal.signal(signal.SIGTERM, lambda number, frame: stopping.append(number))
    seen = {name: os.environ.get(name) for name in SEEN}
    Path(f"rank-{rank}.json").write_text(json.dumps({**seen, "argv": argv}))
    action = os.environ.get("QLORA_TEST_RANK_STUB", "wait")
    if action.startswith("exit:"):
        if rank == "0":
            print("error: data.train: files/x.jsonl:3: not valid JSON", file=sys.stderr, flush=True)
        return int(action.removeprefix("exit:"))
    while not stopping:
        time.sleep(0.05)
    print(f"rank {rank}: interrupted: stopped on request", flush=True)
    return 75


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
