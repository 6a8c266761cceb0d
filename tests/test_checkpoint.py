"""Checkpoints are atomic and pruned only after the new one is complete."""

import json

import pytest

from qlora.cli.main import main
from qlora.training.checkpoint import COMPLETE_MARKER, complete_checkpoints, save_checkpoint
from tests.tiny import write_job


def write_file(folder):
    (folder / "state.txt").write_text("ok")


def test_keep_last_k_keeps_exactly_k_complete_ones_sorted_by_step(tmp_path):
    for step in (5, 10, 100, 20):  # 100 before 20: order is by number, not by name or time
        save_checkpoint(tmp_path, step, write_file, keep=2)
    assert [path.name for path in complete_checkpoints(tmp_path)] == ["step-00000020", "step-00000100"]


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()], ids=["disk-full", "ctrl-c"])
def test_a_writer_dying_half_way_leaves_the_previous_checkpoint_and_no_temp_folder(tmp_path, failure):
    """An error, or a BaseException no `except Exception` sees (a second Ctrl-C inside the write)."""
    save_checkpoint(tmp_path, 1, write_file, keep=1)  # keep=1: pruning before the new one is whole would show

    def dies_half_way(folder):
        (folder / "half.bin").write_bytes(b"x" * 10)
        raise failure

    with pytest.raises(type(failure)):
        save_checkpoint(tmp_path, 2, dies_half_way, keep=1)
    assert [path.name for path in complete_checkpoints(tmp_path)] == ["step-00000001"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step-00000001"]


def test_a_folder_without_the_complete_marker_is_not_a_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 3, write_file, keep=5)
    (tmp_path / "step-00000009").mkdir()  # as left by a copy that died before its marker
    assert [path.name for path in complete_checkpoints(tmp_path)] == ["step-00000003"]


def test_training_writes_checkpoints_every_save_every_steps(tiny_model_dir, tmp_path):
    job = write_job(tmp_path, tiny_model_dir, train={"max_steps": 4, "save_every": 1, "keep_checkpoints": 2})
    assert main(["train", str(job)]) == 0
    checkpoints = complete_checkpoints(tmp_path / "out" / "checkpoints")
    assert [path.name for path in checkpoints] == ["step-00000003", "step-00000004"]
    for path in checkpoints:
        assert {
            "adapter_model.safetensors",
            "adapter_config.json",
            "training_state.json",
            "training_state.safetensors",
            COMPLETE_MARKER,
        } <= {p.name for p in path.iterdir()}
        assert json.loads((path / COMPLETE_MARKER).read_text())["step"] == int(path.name[5:])
