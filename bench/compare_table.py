"""bench/compare.py's JSON lines as the Markdown tables BENCHMARKS.md records.

python bench/compare.py | tee /tmp/compare.jsonl
python bench/compare_table.py /tmp/compare.jsonl
"""

from __future__ import annotations

import json
import sys

MIB = 1024 * 1024


def main(path: str) -> int:
    records, ratio_lines = [], []
    with open(path) as handle:
        for line in handle:
            if line.startswith("{"):
                item = json.loads(line)
                (ratio_lines if "ratios" in item else records).append(item)
    print(
        "| model | run | compute | checkpointing | steps | whole process | training | peak RSS "
        "| supervised tokens/s | final train loss (last 5) | eval loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for record in records:
        if "error" in record:
            print(f"| {record['model']} | {record['run']} | {record['error']} | | | {record['wall_s']} s | | | | | |")
            continue
        print(
            f"| {record['model']} | {record['run']} | {record['compute_dtype']} | {record['gradient_checkpointing']} "
            f"| {record['optimizer_steps']} | {record['wall_s']:.1f} s | {record['train_s']:.1f} s "
            f"| {record['process_peak_rss_bytes'] / MIB:,.0f} MiB | {record['supervised_tokens_per_s']} "
            f"| {record['final_train_loss']:.4f} ({record['train_loss_last5']:.4f}) | {record['eval_loss']:.4f} |"
        )
    print()
    print("| model | ours vs | wall speed-up | train speed-up | peak RSS, ours / theirs | eval loss, ours / theirs |")
    print("|---|---|---|---|---|---|")
    for line in ratio_lines:
        model = line["ratios"].split(":")[0].removeprefix("ours on ")
        for other, ratio in line.items():
            if other != "ratios":
                print(
                    f"| {model} | {other} | {ratio['wall_speedup']:.2f}x | {ratio['train_speedup']:.2f}x "
                    f"| {ratio['peak_memory']:.3f} | {ratio['eval_loss']:.4f} |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
