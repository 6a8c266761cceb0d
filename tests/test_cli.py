"""`qlora train` / `qlora validate` end to end: files written, exit codes, one-line errors."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from qlora.cli.main import main
from qlora.errors import EXIT_CONFIG, EXIT_DATA, EXIT_MODEL, EXIT_OUTPUT
from tests.expectations import EXPECTED_FILES, one_line_error
from tests.tiny import write_job


def run_cli(*args):
    return main([str(arg) for arg in args])


def digest(directory):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.iterdir())}


def test_train_writes_exactly_the_artifacts_and_a_summary(tiny_model_dir, tmp_path):
    job = write_job(tmp_path, tiny_model_dir, train={"eval_every": 2, "eval_exact_match": 4, "eval_max_new_tokens": 8})
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    completed = subprocess.run(
        [sys.executable, "-m", "qlora.cli", "train", str(job)], capture_output=True, text=True, env=env, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    output = tmp_path / "out"
    assert {path.name for path in output.iterdir()} == EXPECTED_FILES
    for expected in (
        "trainable parameters:",
        "supervised tokens/s",
        "peak memory",
        "final eval loss",
        "exact match",
        str(output / "adapter_model.safetensors"),
    ):
        assert expected in completed.stdout
    assert "⟦" in completed.stdout  # the rendered example with supervised spans
    # No terminal here (a pipe, as docker logs / a pod log / the service's job log): plain lines, no \r bar.
    progress = [line for line in completed.stderr.splitlines() if line.startswith("training: ")]
    assert "\r" not in completed.stderr
    assert [line.split(",")[0] for line in progress] == [f"training: {step}/4" for step in (1, 2, 3, 4)]
    assert all("loss " in line and "eval " in line and "tok_s " in line and "nan" not in line for line in progress)
    assert "eta " in progress[0] and "elapsed " in progress[-1]

    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "eval_loss" in rows[0]
    steps = [row for row in rows if row["step"] > 0]
    assert [row["step"] for row in steps] == [1, 2, 3, 4]
    for row in steps:
        assert {"step", "loss", "lr", "supervised_tokens", "tokens_per_s"} <= row.keys()
    assert [row["step"] for row in steps if "eval_loss" in row] == [2, 4]
    svg = (output / "loss.svg").read_text()
    assert svg.count("<polyline") == 2  # train and eval curves
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["adapter_bytes"] == (output / "adapter_model.safetensors").stat().st_size
    adapter_config = json.loads((output / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 8
    # Published files follow the umask (0644 here), not the 0600/0700 of temp files.
    umask = os.umask(0)
    os.umask(umask)
    assert {path.name: path.stat().st_mode & 0o777 for path in output.iterdir()} == {
        name: 0o666 & ~umask for name in EXPECTED_FILES
    }


def test_a_finished_output_dir_is_never_overwritten_silently(tiny_model_dir, tmp_path, capsys):
    job = write_job(tmp_path, tiny_model_dir, train={"max_steps": 1})
    assert run_cli("train", job) == 0
    before = digest(tmp_path / "out")
    capsys.readouterr()
    assert run_cli("train", job) == EXIT_OUTPUT
    message = one_line_error(capsys)
    assert "already holds a finished run" in message and "--overwrite" in message
    assert digest(tmp_path / "out") == before
    assert run_cli("train", job, "--overwrite", "--set", "train.max_steps=2") == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 2


def test_overwrite_never_deletes_a_folder_qlora_did_not_write(tiny_model_dir, tmp_path, capsys):
    foreign = tmp_path / "my-notes"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    job = write_job(tmp_path, tiny_model_dir, train={"max_steps": 1}, output={"dir": str(foreign)})
    assert run_cli("train", job, "--overwrite") == EXIT_OUTPUT
    assert "holds files qlora did not write" in one_line_error(capsys)
    assert [path.name for path in foreign.iterdir()] == ["thesis.tex"]


def test_bad_config_fails_before_anything_is_written(tiny_model_dir, tmp_path, capsys):
    job = write_job(tmp_path, tiny_model_dir)
    assert run_cli("train", job, "--set", "train.optimiser=adamw") == EXIT_CONFIG
    assert "train.optimiser: unknown key (did you mean 'train.optimizer'?)" in one_line_error(capsys)
    assert run_cli("train", job, "--set", "quantization.quant_type=int3") == EXIT_CONFIG
    assert "quantization.quant_type" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_bad_data_row_names_file_and_line(tiny_model_dir, tmp_path, capsys):
    job = write_job(tmp_path, tiny_model_dir)
    with open(tmp_path / "train.jsonl", "a") as handle:
        handle.write('{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}\n')
    lines = (tmp_path / "train.jsonl").read_text().count("\n")
    assert run_cli("train", job) == EXIT_DATA
    message = one_line_error(capsys)
    assert f"train.jsonl:{lines}:" in message and "robot" in message
    assert not (tmp_path / "out").exists()


def test_missing_base_model_is_named(tmp_path, capsys):
    job = write_job(tmp_path, tmp_path / "no-such-model")
    assert run_cli("train", job) == EXIT_MODEL
    assert "no-such-model" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_validate_reports_rows_and_lengths_without_writing(tiny_model_dir, tmp_path, capsys):
    job = write_job(tmp_path, tiny_model_dir, data={"max_seq_len": 44, "too_long": "drop"})
    assert run_cli("validate", job, "--json") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["train"]["rows"] == 32
    assert report["train"]["rows_over_max_seq_len"] == report["train"]["dropped_too_long"] > 0
    assert report["train"]["kept"] == 32 - report["train"]["dropped_too_long"]
    assert report["optimizer_steps"] == 4
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("packing", [False, True])
def test_epochs_and_packing_set_the_number_of_steps(tiny_model_dir, tmp_path, capsys, packing):
    job = write_job(
        tmp_path,
        tiny_model_dir,
        train={"max_steps": None, "epochs": 1, "micro_batch_size": 4, "grad_accum_steps": 2},
        data={"packing": packing, "max_seq_len": 128},
    )
    assert run_cli("validate", job, "--json") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["optimizer_steps"] == -(-report["micro_batches_per_epoch"] // 2)
    assert (report["micro_batches_per_epoch"] < 8) == packing  # 32 rows / 4 = 8 unpacked
