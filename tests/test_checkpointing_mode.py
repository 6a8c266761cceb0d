"""train.gradient_checkpointing auto: the fastest mode the planner fits in the budget, chosen before
the model loads, printed, shown by `qlora plan`, and kept by a resumed run. Every need below is the
planner's own number (make_plan), never a constant written here."""

import json
from dataclasses import replace

import pytest
import yaml

from qlora.cli.main import main
from qlora.config import load_config, validate
from qlora.job.run import run_job
from qlora.plan.architecture import load_architecture
from qlora.plan.budget import MemoryBudget, read_budget
from qlora.plan.checkpointing_mode import HEADROOM, choose_checkpointing, resolve_checkpointing, tightest
from qlora.plan.memory import make_plan
from qlora.plan.settings import PlanSettings, settings_from_job
from tests.tiny import write_job
from tests.tiny_training import Killed, kill_before_step

MODES = (False, "selective", True)


def needs(arch, settings) -> dict:
    return {mode: make_plan(arch, replace(settings, gradient_checkpointing=mode)).total_bytes for mode in MODES}


def budget_for(usable: float) -> int:
    """The budget whose usable share (less auto's headroom) is `usable` bytes."""
    return int(usable / (1 - HEADROOM))


def job(**train) -> dict:
    raw = {"model": {"name_or_path": "llama-3.1-8b"}, "data": {"train": "t.jsonl"}, "output": {"dir": "out"}}
    return {**raw, "train": train}


@pytest.fixture(scope="module")
def llama8():
    return load_architecture("llama-3.1-8b")


def test_auto_is_the_default_and_explicit_modes_stay_as_written():
    assert validate(job()).train.gradient_checkpointing == "auto"
    for written, mode in ((True, True), (False, False), ("selective", "selective"), ("off", False)):
        config = validate(job(gradient_checkpointing=written, memory_budget="1GiB"))
        assert resolve_checkpointing(config, read_budget("1GiB"), echo=pytest.fail) is None
        assert config.train.gradient_checkpointing == mode
        assert settings_from_job(config).gradient_checkpointing == mode


def test_auto_takes_the_fastest_mode_that_fits(llama8):
    settings = PlanSettings(seq_len=2048)
    need = needs(llama8, settings)
    assert need[True] < need["selective"] < need[False]  # fastest is largest
    for usable, expected in (
        (need[False] + 1, False),
        ((need["selective"] + need[False]) / 2, "selective"),
        ((need[True] + need["selective"]) / 2, True),
    ):
        choice = choose_checkpointing(llama8, settings, MemoryBudget(budget_for(usable), "test"))
        assert choice.mode is expected or choice.mode == expected
        assert list(choice.needs) == ["false", "selective", "true"]  # fastest first, by the plan's FLOPs
        assert choice.needs["false"] == need[False]
    # Through the job: train.memory_budget, the line printed, and the config holding the pick.
    lines = []
    config = validate(job(memory_budget=budget_for((need["selective"] + need[False]) / 2)))
    chosen = resolve_checkpointing(config, read_budget(config.train.memory_budget), echo=lines.append)
    assert config.train.gradient_checkpointing == "selective" == chosen.mode
    assert len(lines) == 1 and lines[0].startswith("gradient_checkpointing auto: selective (false needs ")
    assert "the fastest that fits" in lines[0] and "train.memory_budget" in lines[0]


def test_a_tiny_budget_takes_the_smallest_and_says_nothing_fits(llama8):
    choice = choose_checkpointing(llama8, PlanSettings(seq_len=2048), MemoryBudget(2**30, "test"))
    assert choice.mode is True and "nothing fits" in choice.reason
    unknown = choose_checkpointing(llama8, PlanSettings(seq_len=2048), None)
    assert unknown.mode is True and "no memory budget" in unknown.reason


def test_an_8bit_base_never_takes_selective(llama8):
    settings = PlanSettings(seq_len=2048, bits=8)
    need = needs(llama8, settings)  # the arithmetic can price selective; auto must not pick it
    for usable in ((need["selective"] + need[False]) / 2, (need[True] + need["selective"]) / 2, need[False] + 1):
        choice = choose_checkpointing(llama8, settings, MemoryBudget(budget_for(usable), "test"))
        assert choice.mode != "selective" and "selective" not in choice.needs
    config = validate({**job(memory_budget="1TiB"), "quantization": {"bits": 8}})
    resolve_checkpointing(config, read_budget("1TiB"), echo=lambda line: None)
    assert config.train.gradient_checkpointing is False


def test_the_budget_on_cpu_is_the_available_ram_shared_by_the_host_s_ranks(monkeypatch):
    import qlora.plan.budget as budget

    assert read_budget("24GiB") == MemoryBudget(24 * 2**30, "train.memory_budget 24GiB")
    monkeypatch.setattr(budget, "available_ram", lambda: 12 * 2**30)
    assert read_budget(None) == MemoryBudget(12 * 2**30, "available RAM")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert read_budget(None).bytes == 4 * 2**30
    monkeypatch.undo()
    assert read_budget(None).bytes > 0  # this machine's MemAvailable (or psutil's)
    ranks = [MemoryBudget(8, "a"), MemoryBudget(5, "b"), MemoryBudget(9, "c")]
    assert tightest(ranks).bytes == 5 and "smallest of 3 ranks" in tightest(ranks).source
    assert tightest([MemoryBudget(8, "a"), None]) is None


def test_qlora_plan_shows_the_choice(llama8, capsys):
    need = needs(llama8, PlanSettings(seq_len=2048))
    memory = budget_for((need["selective"] + need[False]) / 2)
    assert main(["plan", "llama-3.1-8b", "--gpu-memory", str(memory)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert "checkpointing selective" in text[1] and text[2].startswith("  gradient_checkpointing auto: selective (")
    assert main(["plan", "llama-3.1-8b", "--gpu-memory", str(memory), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    auto = record["gradient_checkpointing_auto"]
    assert auto["mode"] == "selective" == record["settings"]["gradient_checkpointing"]
    assert auto["needs_bytes"]["false"] == need[False] and auto["budget"]["bytes"] == memory
    assert record["total_bytes"] == need["selective"]
    # A job that names its mode is planned as written, with no auto line.
    assert (
        main(
            [
                "plan",
                "llama-3.1-8b",
                "--gpu-memory",
                str(memory),
                "--json",
                "--set",
                "train.gradient_checkpointing=true",
            ]
        )
        == 0
    )
    explicit = json.loads(capsys.readouterr().out)
    assert explicit["gradient_checkpointing_auto"] is None and explicit["total_bytes"] == need[True]


def test_a_resumed_run_keeps_the_mode_auto_chose_for_its_checkpoint(tiny_model_dir, tmp_path):
    path = write_job(tmp_path, tiny_model_dir, train={"max_steps": 4, "save_every": 2})
    config = load_config(path)
    need = needs(load_architecture(str(tiny_model_dir)), settings_from_job(config))
    selective_budget = budget_for((need["selective"] + need[False]) / 2)
    interrupted = load_config(path, [f"train.memory_budget={selective_budget}"])
    with pytest.raises(Killed):  # as kill -9 before step 4: the run ends with step-2's checkpoint
        run_job(interrupted, echo=lambda line: None, stop_requested=kill_before_step(4))
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["train"]["gradient_checkpointing"] == "selective"

    # On a machine where auto would now pick no checkpointing, the resumed run keeps selective.
    roomy = load_config(path, ["train.memory_budget=1TiB"])
    assert (
        choose_checkpointing(load_architecture(str(tiny_model_dir)), settings_from_job(roomy), read_budget("1TiB")).mode
        is False
    )
    lines = []
    result = run_job(roomy, echo=lines.append)
    assert result is not None and roomy.train.gradient_checkpointing == "selective"
    assert any(line.startswith("gradient_checkpointing auto: selective (the checkpoint's") for line in lines)
    assert not any("warning: resuming with changes" in line for line in lines)
    assert (
        yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["train"]["gradient_checkpointing"] == "selective"
    )
