"""`qlora eval` on preference pairs: preference accuracy, log-prob margin and DPO rewards for the
base and each adapter, equal to what the training job's own eval wrote; one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora.cli.main import main
from qlora.errors import EXIT_CONFIG, EXIT_DATA
from tests.expectations import one_line_error
from tests.tiny import write_chat_data, write_job
from tests.tiny_pairs import message_pair, write_pairs

READINGS = ("logps/accuracy", "logps/chosen", "logps/rejected")
REWARDS = ("rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected")


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir, tmp_path_factory):
    """A 4-step DPO job on the tiny model (beta 0.5), its output folder."""
    folder = tmp_path_factory.mktemp("dpo")
    write_pairs(folder / "train.jsonl", 16, seed=1)
    write_pairs(folder / "eval.jsonl", 6, seed=2, shape="strings")
    job = write_job(
        folder,
        tiny_model_dir,
        train={"objective": "dpo", "max_steps": 4, "micro_batch_size": 4, "dpo_beta": 0.5, "learning_rate": 1e-2},
    )
    assert main(["train", str(job)]) == 0
    return folder / "out"


def evaluate(capsys, *args) -> tuple[int, str]:
    code = main(["eval", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out


def metrics_rows(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_eval_on_pairs_gives_the_numbers_the_jobs_eval_gave(dpo_run, capsys):
    """Another process, the adapter loaded from its folder, other batches (3 pairs, not 4): the same
    numbers as the loop's eval before training (the base) and after it (the adapter)."""
    code, out = evaluate(
        capsys,
        "--adapter",
        dpo_run,
        "--data",
        dpo_run.parent / "eval.jsonl",
        "--beta",
        0.5,
        "--batch-size",
        3,
        "--json",
    )
    assert code == 0
    report = json.loads(out)
    assert (report["kind"], report["pairs"], report["rows"], report["beta"]) == ("preference", 6, 6, 0.5)
    base, adapted = report["results"]
    before = next(row for row in metrics_rows(dpo_run) if row["step"] == 0)
    after = json.loads((dpo_run / "summary.json").read_text())  # the final eval's readings
    for name in READINGS:
        assert base[name] == pytest.approx(before[f"eval_{name}"], abs=1e-4), name
        assert adapted[name] == pytest.approx(after[f"eval_{name}"], abs=1e-4), name
    for name in REWARDS:
        assert adapted[name] == pytest.approx(after[f"eval_{name}"], abs=1e-4), name
        assert name not in base  # the base is the reference: its rewards are zero by definition
    assert adapted["logps/margin"] == pytest.approx(adapted["logps/chosen"] - adapted["logps/rejected"])
    assert adapted["rewards/margin"] != 0.0 and adapted["model"] == "out" and base["model"] == "base"


def test_eval_on_pairs_prints_a_table_and_detects_each_shape(dpo_run, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(message_pair("abc", implicit=True)) + "\n" + json.dumps(message_pair("hello")) + "\n")
    code, out = evaluate(capsys, "--adapter", dpo_run, "--adapter", f"again={dpo_run}", "--data", pairs)
    assert code == 0
    header, columns, base, adapted, again = out.strip().splitlines()
    assert header.startswith(f"{pairs}: 2 pairs") and "beta 0.1 x log-ratio" in header  # train.dpo_beta's default
    assert columns.split()[:3] == ["model", "pref.", "accuracy"]
    assert base.split()[0] == "base" and base.split()[3:] == ["-", "-"]
    assert adapted.split()[0] == "out" and adapted.split()[3].endswith("%")
    assert again.split()[1:] == adapted.split()[1:]  # each adapter against the same base


def test_bad_pair_files_and_flags_are_one_line_errors(dpo_run, tiny_model_dir, wide_vocab_dir, tmp_path, capsys):
    sft = write_chat_data(tmp_path / "sft.jsonl", 2)
    assert main(["eval", "--adapter", str(dpo_run), "--data", str(sft), "--format", "preference"]) == EXIT_DATA
    assert f"{sft}:1: not a preference row; --data is read as pairs" in one_line_error(capsys)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps(message_pair("abc")) + "\n" + sft.read_text())
    assert main(["eval", "--adapter", str(dpo_run), "--data", str(mixed)]) == EXIT_DATA
    assert f"{mixed}:2: not a preference row" in one_line_error(capsys)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": " "}) + "\n")
    assert main(["eval", "--adapter", str(dpo_run), "--data", str(empty)]) == EXIT_DATA
    assert f"{empty}:1: 'rejected' is empty" in one_line_error(capsys)
    pairs = dpo_run.parent / "eval.jsonl"
    assert main(["eval", "--adapter", str(dpo_run), "--data", str(pairs), "--beta", "0"]) == EXIT_CONFIG
    assert "--beta: dpo_beta: Input should be greater than 0" in one_line_error(capsys)
    assert main(["eval", "--adapter", str(dpo_run), "--data", str(sft), "--beta", "0.2"]) == EXIT_CONFIG
    assert "--beta: DPO's reward is for preference rows" in one_line_error(capsys)
    # An adapter of another base: refused in one line naming both, before peft touches it.
    code = main(["eval", "--adapter", str(dpo_run), "--data", str(pairs), "--base", str(wide_vocab_dir)])
    assert code != 0 and str(wide_vocab_dir) in one_line_error(capsys)


@pytest.mark.slow
def test_eval_on_the_demo_rule_pairs_shows_what_dpo_taught(demo_rule_dpo, capsys):
    """tests/tiny_rule_pairs.py on the demo model: the base prefers the rule's answer on about half
    the held-out pairs, the 20-step DPO adapter on >= 90%; `qlora eval` says what the job's eval said."""
    output = demo_rule_dpo / "out"
    capsys.readouterr()
    code, out = evaluate(capsys, "--adapter", output, "--data", demo_rule_dpo / "eval.jsonl", "--json")
    assert code == 0
    base, adapted = json.loads(out)["results"]
    print(f"preference accuracy: base {base['logps/accuracy']:.3f}, adapter {adapted['logps/accuracy']:.3f}")
    assert 0.3 <= base["logps/accuracy"] <= 0.7 and adapted["logps/accuracy"] >= 0.9
    assert adapted["rewards/accuracy"] >= 0.9 and adapted["rewards/margin"] > 0
    before = next(row for row in metrics_rows(output) if row["step"] == 0)
    after = json.loads((output / "summary.json").read_text())
    for name in READINGS:
        assert base[name] == pytest.approx(before[f"eval_{name}"], abs=1e-3), name
        assert adapted[name] == pytest.approx(after[f"eval_{name}"], abs=1e-3), name
    for name in REWARDS:
        assert adapted[name] == pytest.approx(after[f"eval_{name}"], abs=1e-3), name
