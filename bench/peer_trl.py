"""The peer baseline: TRL SFTTrainer (or DPOTrainer) + PEFT QLoRA on the comparison fixture, with our settings.

Imported only by bench/compare_runs.py inside the subprocess of one TRL run (`pip install .[bench]`).
What TRL is given: the shared hyper-parameters (steps, batch, learning rate and schedule, optimizer,
clipping, seed, max length) and a base loaded as its QLoRA docs load one (NF4 + double quant,
compute dtype = ours); everything else is SFTConfig's default: bf16 mixed precision (on a CPU
that takes `use_cpu`), gradient checkpointing, padded batches, adapters cast to bf16, completion-
only loss for prompt-completion rows.
- default: exactly that.
- best: padding_free (no compute on padding, the same rows per step) and float32 adapters (TRL's
  bf16 adapters round every optimizer update), the fastest TRL setting found for these rows.
DPO (`run_trl_dpo`, bench/compare.py --objective dpo): DPOConfig's defaults (the same bf16 autocast,
gradient checkpointing, padded batches, bf16 adapters, dropout disabled) and the shared settings
plus beta and max_length; one setting, 'default' (see run_trl_dpo).
The eval loss is NOT TRL's own eval: the adapter it writes goes through the same function as
ours (bench/compare_runs.py held_out_loss), so the eval losses are one measurement of N models.
"""

from __future__ import annotations

import json
import tempfile
import time


def prompt_completion_rows(path: str) -> list[dict]:
    """Chat rows as TRL's conversational prompt-completion rows, so its completion-only loss
    (the default for that format) masks the prompt exactly as ours does."""
    rows = []
    with open(path) as handle:
        for line in handle:
            messages = json.loads(line)["messages"]
            rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
    return rows


def counting(collator, counter: dict):
    """Wrap TRL's collator to count supervised targets and computed positions. SFT: labels are
    unshifted and a row's first label is never supervised, so each non -100 label is one predicted
    token; DPO: each position of the completion mask is one (both answers of every pair)."""

    def collate(examples):
        batch = collator(examples)
        supervised = batch["labels"] != -100 if "labels" in batch else batch["completion_mask"].bool()
        counter["supervised_tokens"] += int(supervised.sum())
        counter["tokens"] += int(batch["input_ids"].numel())
        return batch

    return collate


def run_trl(settings: dict, fixture: dict, mode: str, adapter_dir) -> dict:
    """One TRL SFT run, its adapter written to adapter_dir; mode 'default' or 'best' (see above)."""
    from datasets import Dataset
    from trl import SFTTrainer

    model, tokenizer = seeded_base(settings, fixture)
    padding_free = mode == "best"
    config = sft_config(settings, padding_free, output_dir=tempfile.mkdtemp(prefix="bench-trl-"))
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(prompt_completion_rows(fixture["train"])),
        processing_class=tokenizer,
        peft_config=lora_config(settings),
    )
    if padding_free:
        # TRL casts QLoRA adapters to bfloat16 (its QLoRA-paper default); ours are float32 (the
        # precision of an optimizer update): TRL's best run gets float32 adapters too.
        for parameter in trainer.model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    return trained_record(trainer, adapter_dir)


def run_trl_dpo(settings: dict, fixture: dict, adapter_dir) -> dict:
    """One TRL DPOTrainer run on the preference pairs, DPOConfig's defaults but the shared settings.
    Its reference is the base with the adapter disabled: DPOTrainer's own choice for a PEFT model
    and ref_model=None. TRL 1.16's DPO has no padding-free path (`padding_free=True` warns and
    pads: trl/trainer/dpo_trainer.py), so there is no 'best' setting to add."""
    from datasets import Dataset
    from trl import DPOTrainer

    model, tokenizer = seeded_base(settings, fixture)
    with open(fixture["train"]) as handle:
        rows = [json.loads(line) for line in handle]
    config = dpo_config(settings, output_dir=tempfile.mkdtemp(prefix="bench-trl-dpo-"))
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(settings),
    )
    return trained_record(trainer, adapter_dir)


def seeded_base(settings: dict, fixture: dict):
    import torch

    torch.manual_seed(settings["seed"])
    return load_quantized(settings, fixture)


def trained_record(trainer, adapter_dir) -> dict:
    """Train, write the adapter, return the run's JSON record (the fields ours has)."""
    from qlora.training.metrics import peak_memory, reset_peak_memory

    counter = {"supervised_tokens": 0, "tokens": 0}
    trainer.data_collator = counting(trainer.data_collator, counter)
    # The rule our loop follows (qlora.training.loop): the GPU peak counts from the start of
    # training, after the load; without this TRL's would count from process start (CPU runs are
    # compared by the whole process's RSS, measured from outside, either way).
    reset_peak_memory()
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    peak = peak_memory()[1]
    trainer.save_model(str(adapter_dir))
    history = [row for row in trainer.state.log_history if "loss" in row]
    losses = [row["loss"] for row in history]
    record = {
        "optimizer_steps": trainer.state.global_step,
        "gradient_checkpointing": trainer.args.gradient_checkpointing,
        "train_s": seconds,
        "supervised_tokens": counter["supervised_tokens"],
        "tokens": counter["tokens"],
        "final_train_loss": losses[-1],
        "train_loss_last5": sum(losses[-5:]) / len(losses[-5:]),
        "peak_memory_bytes": peak,
        "adapter_dtype": str(next(p.dtype for p in trainer.model.parameters() if p.requires_grad)).removeprefix(
            "torch."
        ),
    }
    if "rewards/accuracies" in history[-1]:  # DPO: the last step's preference accuracy, as ours reports it
        record["final_train_accuracy"] = history[-1]["rewards/accuracies"]
    return record


def load_quantized(settings: dict, fixture: dict):
    """(model, tokenizer): the fixture's base in NF4 + double quant, loaded the transformers way."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from qlora.model.base import disable_cpu_weight_repacking

    tokenizer = AutoTokenizer.from_pretrained(fixture["model"])
    dtype = getattr(torch, settings["compute_dtype"])
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else None
    model = AutoModelForCausalLM.from_pretrained(
        fixture["model"], quantization_config=quantization, dtype=dtype, device_map=device_map
    )
    disable_cpu_weight_repacking(model)  # the AVX512-BF16 trap (see qlora.model.base)
    return model, tokenizer


def sft_config(settings: dict, padding_free: bool, output_dir: str):
    """TRL's training arguments: the shared settings, TRL's defaults for the rest."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=output_dir,
        **shared_arguments(settings),
        # Padding-free without packing keeps the rows per step equal to ours; it needs max_length
        # None (the fixture's rows all fit in max_seq_len, checked by our run's tokenization).
        max_length=None if padding_free else settings["max_seq_len"],
        padding_free=padding_free,
    )


def dpo_config(settings: dict, output_dir: str):
    """DPOConfig: the shared settings and beta, TRL's defaults for the rest."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=output_dir,
        **shared_arguments(settings),
        beta=settings["dpo_beta"],
        max_length=settings["max_seq_len"],  # every fixture sequence fits: nothing is cut
    )


def shared_arguments(settings: dict) -> dict:
    """The training arguments every TRL run (SFT or DPO) takes from the shared settings."""
    import torch

    return dict(
        max_steps=settings["steps"],
        per_device_train_batch_size=settings["micro_batch"],
        gradient_accumulation_steps=settings["batch"] // settings["micro_batch"],
        learning_rate=settings["learning_rate"],
        lr_scheduler_type="cosine",
        warmup_steps=settings["warmup_steps"],
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=settings["seed"],
        # TRL's default is bf16 mixed precision; a compute-float32 comparison turns it off.
        bf16=settings["compute_dtype"] == "bfloat16",
        use_cpu=not torch.cuda.is_available(),  # TRL's bf16 default refuses a CPU without it
        logging_steps=1,  # every step's loss, for the record's last-5 mean
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


def lora_config(settings: dict):
    from peft import LoraConfig

    return LoraConfig(
        r=settings["lora_r"],
        lora_alpha=settings["lora_alpha"],
        lora_dropout=settings["lora_dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
