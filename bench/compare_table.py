"""bench/compare.py's JSON lines as the Markdown tables BENCHMARKS.md records.

python bench/compare.py | tee /tmp/compare.jsonl
python bench/compare_table.py /tmp/compare.jsonl
(--objective dpo lines add the held-out preference accuracy and reward margin)
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
    dpo = any("eval_accuracy" in record for record in records)  # bench/compare.py --objective dpo
    extra = " eval accuracy | eval margin |" if dpo else ""
    print(
        "| model | run | compute | checkpointing | steps | whole process | training | peak RSS "
        f"| supervised tokens/s | final train loss (last 5) | eval loss |{extra}"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if dpo else ""))
    for record in records:
        if "error" in record:
            print(f"| {record['model']} | {record['run']} | {record['error']} | | | {record['wall_s']} s | | | | | |")
            continue
        accuracy = f" {record['eval_accuracy']:.3f} | {record['eval_margin']:.4f} |" if dpo else ""
        print(
            f"| {record['model']} | {record['run']} | {record['compute_dtype']} | {record['gradient_checkpointing']} "
            f"| {record['optimizer_steps']} | {record['wall_s']:.1f} s | {record['train_s']:.1f} s "
            f"| {record['process_peak_rss_bytes'] / MIB:,.0f} MiB | {record['supervised_tokens_per_s']} "
            f"| {record['final_train_loss']:.4f} ({record['train_loss_last5']:.4f}) "
            f"| {record['eval_loss']:.4f} |{accuracy}"
        )
    print()
    extra = " eval accuracy, ours - theirs |" if dpo else ""
    print(
        "| model | ours vs | wall speed-up | train speed-up | peak RSS, ours / theirs | eval loss, ours / theirs |"
        + extra
    )
    print("|---|---|---|---|---|---|" + ("---|" if dpo else ""))
    for line in ratio_lines:
        run, model = line["ratios"].split(":")[0].split(" on ", 1)
        label = model if run == "ours" else f"{model}, {run}"  # one of our variants against the peer
        for other, ratio in line.items():
            if other != "ratios":
                print(
                    f"| {label} | {other} | {ratio['wall_speedup']:.2f}x | {ratio['train_speedup']:.2f}x "
                    f"| {ratio['peak_memory']:.3f} | {ratio['eval_loss']:.4f} |"
                    + (f" {ratio['eval_accuracy_difference']:+.3f} |" if dpo else "")
                )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
