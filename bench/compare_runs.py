"""One run of bench/compare.py, in the process compare.py started for it, and the held-out eval.

Our runs go through the job runner (the CLI's code path) on a job file that writes only the
settings every run shares (the hyper-parameters) and a run's own change: everything else, compute
dtype, gradient checkpointing, train_on, padding-free, the loss chunking, is the project's
default, so `ours` is what a user gets. The TRL runs are in bench/peer_trl.py. Every run writes
its adapter; the eval loss of every adapter is measured afterwards by one function
(`held_out_loss`) in a process of its own, so no run's wall time or peak RSS includes it.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

# Our runs: the job file's sections that differ from the project's defaults.
OURS_RUNS = {
    "ours": {},
    "ours-float32": {"quantization": {"compute_dtype": "float32"}},
    "ours-packing": {"data": {"packing": True}},
    "ours-selective": {"train": {"gradient_checkpointing": "selective"}},
    "ours-full-checkpointing": {"train": {"gradient_checkpointing": True}},
    "ours-padded": {"data": {"padding_free": False}},
}
TRL_RUNS = ("trl-default", "trl-best")


def compute_dtype_of(run: str, settings: dict) -> str:
    """The compute dtype a run trains (and is evaluated) in."""
    return OURS_RUNS.get(run, {}).get("quantization", {}).get("compute_dtype", settings["compute_dtype"])


def run_one(run: str, settings: dict, fixture: dict, adapter_dir: Path) -> dict:
    """Train one run in this process, write its adapter to adapter_dir, return its JSON record."""
    import torch

    from qlora.plan.peak_flops import peak_matmul_flops

    started = time.perf_counter()
    if run in OURS_RUNS:
        record = run_ours(settings, fixture, OURS_RUNS[run], adapter_dir)
    else:
        from bench.peer_trl import run_trl, run_trl_dpo

        if settings["objective"] == "dpo":
            record = run_trl_dpo(settings, fixture, adapter_dir=adapter_dir)
        else:
            record = run_trl(settings, fixture, mode=run.removeprefix("trl-"), adapter_dir=adapter_dir)
    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if on_cuda else "cpu")
    record["peak_matmul_flops_per_s"] = {
        dtype: peak_matmul_flops(device, dtype)["flops_per_s"] for dtype in ("float32", "bfloat16")
    }
    record.update(
        device=torch.cuda.get_device_name()
        if on_cuda
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        compute_dtype=compute_dtype_of(run, settings),
        supervised_tokens_per_s=round(record["supervised_tokens"] / record["train_s"], 1),
        peak_memory_kind="gpu_allocated" if on_cuda else "process_rss",
        in_process_s=round(time.perf_counter() - started, 2),
    )
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in record.items()}


def run_ours(settings: dict, fixture: dict, changes: dict, adapter_dir: Path) -> dict:
    """The qlora job runner (the CLI's code path) on a job file with the shared settings."""
    import yaml

    from qlora.config import load_config
    from qlora.job.run import run_job
    from qlora.training.metrics import peak_memory

    folder = Path(tempfile.mkdtemp(prefix="bench-ours-"))
    (folder / "job.yaml").write_text(yaml.safe_dump(ours_job(settings, fixture, changes, adapter_dir)))
    result = run_job(load_config(folder / "job.yaml"), echo=lambda line: print(line, file=sys.stderr))
    loop = result.loop
    saved = yaml.safe_load((adapter_dir / "config.yaml").read_text())  # the job as it ran: auto resolved
    steps = [json.loads(line) for line in (adapter_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in steps if "loss" in row]
    accuracy = [row["rewards/accuracy"] for row in steps if "rewards/accuracy" in row]
    record = {
        "optimizer_steps": loop.steps,
        "train_s": loop.seconds,
        "supervised_tokens": loop.supervised_tokens,
        "tokens": loop.tokens,
        "final_train_loss": loop.final_loss,
        "train_loss_last5": sum(losses[-5:]) / len(losses[-5:]),
        "adapter_dtype": "float32",
        "gradient_checkpointing": saved["train"]["gradient_checkpointing"],
        "peak_memory_bytes": peak_memory()[1],
        "useful_flops": loop.useful_flops,
        "mfu": round(loop.mfu, 5),
        "peak_flops_per_s": loop.peak_flops_per_s,
    }
    if accuracy:  # DPO: the last step's preference accuracy (TRL's rewards/accuracies)
        record["final_train_accuracy"] = accuracy[-1]
    return record


def ours_job(settings: dict, fixture: dict, changes: dict, output_dir: Path) -> dict:
    """The job file's content: the shared settings in qlora's schema, plus the run's `changes`.
    A packing run takes one epoch (the same rows as the others, in fewer, fuller steps)."""
    job = {
        "model": {"name_or_path": fixture["model"]},
        "quantization": {"compute_dtype": settings["compute_dtype"]},
        "lora": {
            "r": settings["lora_r"],
            "alpha": settings["lora_alpha"],
            "dropout": settings["lora_dropout"],
            "target_modules": "all-linear",
        },
        # No eval data in the job: the loop would time its eval; held_out_loss measures every
        # run's adapter afterwards, in another process.
        "data": {"train": fixture["train"], "format": "chat", "max_seq_len": settings["max_seq_len"]},
        "train": {
            "max_steps": settings["steps"],
            "micro_batch_size": settings["micro_batch"],
            "grad_accum_steps": settings["batch"] // settings["micro_batch"],
            "learning_rate": settings["learning_rate"],
            "lr_schedule": "cosine",
            "warmup_steps": settings["warmup_steps"],
            "optimizer": "adamw",  # TRL's default optimizer (ours: paged_adamw_8bit, a GPU optimizer)
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "seed": settings["seed"],
        },
        "output": {"dir": str(output_dir)},
    }
    if settings["objective"] == "dpo":
        # The rows are TRL's conversational pairs; beta is written because it is TRL's too.
        job["data"]["format"] = "preference"
        job["train"].update(objective="dpo", dpo_beta=settings["dpo_beta"])
    for section, values in changes.items():
        job[section] = {**job[section], **values}
    if job["data"].get("packing"):
        job["train"] = {**job["train"], "max_steps": None, "epochs": 1}
    return job


def held_out_loss(model, tokenizer, settings: dict, fixture: dict) -> float:
    """Mean loss per supervised token on the held-out rows, by the function our loop uses, on
    qlora's tokenization of them (padded micro-batches)."""
    import torch

    from qlora import data
    from qlora.training.loop import evaluate

    rows = data.read_rows([(fixture["eval"], "chat")], key="data.eval")
    examples = data.tokenize_rows(rows, tokenizer, settings["max_seq_len"], "completions", "drop").examples
    batches = data.epoch_batches(
        examples,
        settings["micro_batch"],
        packing=False,
        max_seq_len=settings["max_seq_len"],
        pad_id=tokenizer.pad_token_id,
        seed=settings["seed"],
        epoch=0,
        shuffle=False,
    )
    return evaluate(model, batches, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def held_out_preference(model, tokenizer, settings: dict, fixture: dict) -> dict:
    """DPO on the held-out pairs, by our loop's evaluate and DPO objective on qlora's tokenization
    of them: the mean DPO loss per pair against the base with the adapter disabled (TRL's
    reference too), the preference accuracy (the share of pairs whose chosen answer gains more
    log-probability over the reference than the rejected one: TRL's rewards/accuracies) and the
    mean reward margin."""
    import torch

    from qlora import data
    from qlora.data.pairs import epoch_pair_batches, tokenize_pairs
    from qlora.training.loop import evaluate
    from qlora.training.preference import PreferenceObjective

    rows = data.read_rows([(fixture["eval"], "preference")], key="data.eval", objective="dpo")
    pairs = tokenize_pairs(rows, tokenizer, settings["max_seq_len"], "drop").examples
    batches = epoch_pair_batches(
        pairs, settings["micro_batch"], tokenizer.pad_token_id, seed=settings["seed"], epoch=0, shuffle=False
    )
    objective = PreferenceObjective("dpo", beta=settings["dpo_beta"], reference=model.disable_adapter)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loss = evaluate(model, batches, device, objective=objective)
    readings = objective.readings()  # means over every held-out pair
    return {
        "eval_loss": loss,
        "eval_accuracy": readings["rewards/accuracy"],
        "eval_margin": readings["rewards/margin"],
        "eval_pairs": len(pairs),
    }


def evaluate_adapters(settings: dict, fixture: dict, compute_dtype: str, adapter_dirs: list) -> dict:
    """{adapter dir: {eval_loss[, eval_accuracy, ...]}}: each adapter as written, on one freshly
    loaded base (loaded once, adapters switched by name), so what is measured is the artifact users get."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from qlora.config import ModelSection, QuantizationSection
    from qlora.model.base import load_base

    tokenizer = AutoTokenizer.from_pretrained(fixture["model"])
    quantization = QuantizationSection(compute_dtype=compute_dtype)
    base = load_base(ModelSection(name_or_path=fixture["model"]), quantization, gradient_checkpointing=False)
    model, losses = None, {}
    for index, adapter_dir in enumerate(adapter_dirs):
        name = f"run{index}"
        if model is None:
            model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=name)
        else:
            model.load_adapter(str(adapter_dir), adapter_name=name)
        model.set_adapter(name)
        if settings["objective"] == "dpo":
            losses[str(adapter_dir)] = held_out_preference(model, tokenizer, settings, fixture)
        else:
            losses[str(adapter_dir)] = {"eval_loss": held_out_loss(model, tokenizer, settings, fixture)}
    return losses
