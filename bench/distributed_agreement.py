"""How closely the multi-process runs of tests/test_distributed.py agree with one process.

    python -m pytest tests/test_distributed.py -k "one_process or fsdp_ranks or two_nodes or accelerate" \
        --basetemp=/tmp/dist-evidence -p no:cacheprovider
    python bench/distributed_agreement.py /tmp/dist-evidence

One JSON line per comparison: the largest relative difference of the per-step train and eval
losses, and the largest absolute difference of any adapter weight.
"""

import json
import sys
from pathlib import Path

from safetensors.torch import load_file


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "out" / "metrics.jsonl").read_text().splitlines()]


def compare(first: Path, second: Path, label: str) -> dict:
    rows = list(zip(metrics(first), metrics(second)))
    weights = [load_file(str(run / "out" / "adapter_model.safetensors")) for run in (first, second)]

    def largest(key: str) -> float:
        return max(abs(one[key] - two[key]) / abs(one[key]) for one, two in rows if key in one)

    return {
        "compare": label,
        "steps": len(rows) - 1,
        "max_rel_loss_diff": largest("loss"),
        "max_rel_eval_loss_diff": largest("eval_loss"),
        "max_abs_adapter_diff": max((weights[0][name] - weights[1][name]).abs().max().item() for name in weights[0]),
    }


def main(base: Path) -> None:
    one, ddp, fsdp = (next(base.glob(f"{name}0")) for name in ("one-process", "ddp-reference", "fsdp-reference"))
    print(json.dumps(compare(one, ddp, "ddp: 2 ranks x micro 2 vs 1 process x micro 2 x accum 2")))
    print(json.dumps(compare(one, fsdp, "fsdp: 2 ranks x micro 1 x accum 2 vs 1 process x micro 2 x accum 2")))
    for pattern, label in (
        ("test_two_nodes*", "2 torchrun nodes vs 1 node"),
        ("test_accelerate*", "accelerate vs --nproc"),
    ):
        for run in base.glob(pattern):
            if (run / "out").is_dir() and not run.is_symlink():  # pytest's *current links repeat a run
                print(json.dumps(compare(ddp, run, label)))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
