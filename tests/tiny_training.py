"""The tiny model trained through the library's own pieces: load_base, attach_lora, the data
batches, and the loop handed what qlora.training.builders make of a train section."""

from __future__ import annotations

import itertools
import json
from typing import Optional

import torch

from qlora import data
from qlora.adapters import attach_lora
from qlora.config import LoraSection, ModelSection, QuantizationSection, TrainSection
from qlora.model.base import load_base, load_tokenizer
from qlora.training.builders import build_optimizer, build_schedule, loop_settings
from qlora.training.loop import LoopResult, train
from qlora.training.metrics import MetricsLog
from qlora.training.precision import Precision
from tests.tiny import write_chat_data

# Plain AdamW at a rate three steps visibly move, clipping out of the way: the tests' optimizer.
TEST_TRAIN = {"max_steps": 3, "optimizer": "adamw", "learning_rate": 1e-3, "max_grad_norm": 1e6}


def tiny_base(model_dir, bits=4, compute_dtype="float32", gradient_checkpointing=True, **quantization):
    """load_base exactly as a job calls it, on a local folder."""
    return load_base(
        ModelSection(name_or_path=str(model_dir)),
        QuantizationSection(bits=bits, compute_dtype=compute_dtype, **quantization),
        gradient_checkpointing=gradient_checkpointing,
    )


def build_model(model_dir, dropout=0.0, bits=4, compute_dtype="float32", seed=0, gradient_checkpointing=True):
    base = tiny_base(model_dir, bits, compute_dtype, gradient_checkpointing)
    return attach_lora(base, LoraSection(r=8, alpha=16, dropout=dropout), seed=seed)


def tokenized(model_dir, tmp_path, rows=24, seed=1):
    tokenizer = load_tokenizer(str(model_dir))
    path = write_chat_data(tmp_path / f"rows-{seed}.jsonl", rows, seed=seed)
    rows = data.read_rows([(str(path), "auto")])
    return tokenizer, data.tokenize_rows(rows, tokenizer, 64, "completions", "truncate").examples


def batches_fn(examples, pad_id, micro_batch_size, packing=False):
    return lambda epoch: data.epoch_batches(examples, micro_batch_size, packing, 64, pad_id, seed=0, epoch=epoch)


def settings(**changes) -> TrainSection:
    """The job's train section with TEST_TRAIN's values; every other default is the schema's."""
    return TrainSection(**{**TEST_TRAIN, **changes})


def train_tiny(
    model,
    epoch_batches,
    eval_batches=(),
    section: Optional[TrainSection] = None,
    metrics: Optional[MetricsLog] = None,
    precision: Optional[Precision] = None,
    **loop_arguments,
) -> LoopResult:
    """The loop as a job runs it: optimizer, schedule and settings built from the train section."""
    section = section or settings()
    optimizer = build_optimizer(model, section)
    schedule = build_schedule(optimizer, section, section.max_steps)
    settings_ = loop_settings(section, section.max_steps)
    return train(
        model,
        optimizer,
        schedule,
        settings_,
        epoch_batches,
        eval_batches,
        precision=precision,
        metrics=metrics,
        **loop_arguments,
    )


def run_logged(model, batches, eval_batches, section: TrainSection, path, **loop_arguments) -> list[dict]:
    """train_tiny's metrics.jsonl rows."""
    metrics = MetricsLog(path)
    try:
        train_tiny(model, batches, eval_batches, section, metrics, **loop_arguments)
    finally:
        metrics.close()
    return [json.loads(line) for line in path.read_text().splitlines()]


class Killed(BaseException):
    """Stands for kill -9: not an Exception, so no handler of ours turns it into a clean stop."""


def kill_before_step(step):
    """A stop_requested hook (asked before every step of a fresh run) that dies before `step`."""
    calls = itertools.count(1)

    def stop_requested():
        if next(calls) == step:
            raise Killed()
        return False

    return stop_requested


def saved_activation_bytes(model, input_ids) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward, parameters excluded."""
    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    saved = {}

    def pack(tensor):
        key = tensor.untyped_storage().data_ptr()
        if key not in parameters:
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=input_ids, use_cache=False)
    return sum(saved.values())


def counted_lora_llama(attn_implementation: str):
    """(peft model, its architecture, LoRA parameter count): a tiny float32 Llama (vocabulary 320,
    untied head) with LoRA r=8 on every linear, dropout 0, seeded: what FLOP counts are checked on."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora.plan.architecture import describe_skeleton

    config = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    arch = describe_skeleton(base, "tiny")
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    model.enable_input_require_grads()  # as the loop trains (gradient checkpointing needs it)
    lora_params = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return model, arch, lora_params
