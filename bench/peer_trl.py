"""The peer baseline: TRL SFTTrainer + PEFT QLoRA on the comparison fixture, with our settings.

Imported only by bench/compare_runs.py inside the subprocess of one TRL run (`pip install .[bench]`).
What TRL is given: the shared hyper-parameters (steps, batch, learning rate and schedule, optimizer,
clipping, seed, max length) and a base loaded as its QLoRA docs load one (NF4 + double quant,
compute dtype = ours); everything else is SFTConfig's default: bf16 mixed precision (on a CPU
that takes `use_cpu`), gradient checkpointing, padded batches, adapters cast to bf16, completion-
only loss for prompt-completion rows.
- default: exactly that.
- best: padding_free (no compute on padding, the same rows per step) and float32 adapters (TRL's
  bf16 adapters round every optimizer update), the fastest TRL setting found for these rows.
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
    """Wrap TRL's collator to count supervised targets (labels are unshifted; a row's first
    label is never supervised, so each non -100 label is one predicted token)."""

    def collate(examples):
        batch = collator(examples)
        counter["supervised_tokens"] += int((batch["labels"] != -100).sum())
        counter["tokens"] += int(batch["input_ids"].numel())
        return batch

    return collate


def run_trl(settings: dict, fixture: dict, mode: str, adapter_dir) -> dict:
    """One TRL run, its adapter written to adapter_dir; mode 'default' or 'best' (see above)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTTrainer

    from qlora.training.metrics import peak_memory, reset_peak_memory

    torch.manual_seed(settings["seed"])
    model, tokenizer = load_quantized(settings, fixture)
    lora = LoraConfig(
        r=settings["lora_r"],
        lora_alpha=settings["lora_alpha"],
        lora_dropout=settings["lora_dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    padding_free = mode == "best"
    config = sft_config(settings, padding_free, output_dir=tempfile.mkdtemp(prefix="bench-trl-"))
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(prompt_completion_rows(fixture["train"])),
        processing_class=tokenizer,
        peft_config=lora,
    )
    if padding_free:
        # TRL casts QLoRA adapters to bfloat16 (its QLoRA-paper default); ours are float32 (the
        # precision of an optimizer update): TRL's best run gets float32 adapters too.
        for parameter in trainer.model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
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
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {
        "optimizer_steps": trainer.state.global_step,
        "gradient_checkpointing": config.gradient_checkpointing,
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
    import torch
    from trl import SFTConfig

    on_cuda = torch.cuda.is_available()
    return SFTConfig(
        output_dir=output_dir,
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
        use_cpu=not on_cuda,  # TRL's bf16 default refuses a CPU without it
        # Padding-free without packing keeps the rows per step equal to ours; it needs max_length
        # None (the fixture's rows all fit in max_seq_len, checked by our run's tokenization).
        max_length=None if padding_free else settings["max_seq_len"],
        padding_free=padding_free,
        logging_steps=1,  # every step's loss, for the record's last-5 mean
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
