"""Build the demo: a small pre-trained chat model, and data for a task it has not learned.

    python -m qlora.demo.build [--out qlora/demo] [--steps 2000] [--seed 0]

Writes <out>/model/, a Hugging Face Llama model folder (config.json, generation_config.json,
model.safetensors in bfloat16, tokenizer files with the ChatML template, README.md), and
<out>/data/train.jsonl + eval.jsonl for the new task (see tasks.py). Pre-training runs in full
precision on the CPU; the same seed on the same thread count rebuilds the same bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch

from qlora.adapters.exact_match import exact_match
from qlora.data import Row
from qlora.demo.tasks import MAX_LETTERS, MIN_LETTERS, NEW_TASK, PRETRAIN_TASKS, Task, new_task_splits, pretrain_rows
from qlora.demo.tokenizer import build_tokenizer
from qlora.labels import IGNORE_INDEX

# bitsandbytes' CPU 4-bit kernels fail unless every linear layer's input size (hidden and MLP
# size) is a multiple of 64; the vocabulary is padded to it as well.
ALIGNMENT = 64
ARCHITECTURE = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
TRAIN_ROWS, EVAL_ROWS = 2000, 200
# Longest answer plus <|im_end|>; generation never needs more.
MAX_NEW_TOKENS = MAX_LETTERS + 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="folder for model/ and data/")
    parser.add_argument("--steps", type=int, default=2000, help="pre-training optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per pre-training step")
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="peak pre-training learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads; results are reproducible per count")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    train_rows, eval_rows = new_task_splits(args.seed, TRAIN_ROWS, EVAL_ROWS)
    held_out = [letters_of(row) for row in eval_rows]

    model = build_model(tokenizer)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    print(f"model: {parameters:,} parameters; pre-training {args.steps} steps x {args.batch_size} rows", flush=True)
    started = time.time()
    pretrain(model, tokenizer, args, exclude=set(held_out))
    minutes = (time.time() - started) / 60

    # Scores of the bf16 weights that ship, on strings that pre-training never saw.
    model = model.to(torch.bfloat16)
    # Scored by the same greedy exact match that `qlora train` reports for the demo.
    scores = {}
    for task in (*PRETRAIN_TASKS, NEW_TASK):
        rows = [Row(task.name, line, "chat", task.row(letters)) for line, letters in enumerate(held_out[:100], start=1)]
        scores[task.name] = exact_match(model, tokenizer, rows, MAX_NEW_TOKENS, batch_size=50).score
    print(
        "exact match on held-out strings: " + ", ".join(f"{name} {score:.0%}" for name, score in scores.items()),
        flush=True,
    )

    model_dir = args.out / "model"
    save_model(model, tokenizer, model_dir, model_card(args, parameters, minutes, scores))
    write_jsonl(args.out / "data" / "train.jsonl", train_rows)
    write_jsonl(args.out / "data" / "eval.jsonl", eval_rows)
    size_mb = sum(path.stat().st_size for path in model_dir.iterdir()) / 1e6
    print(
        f"wrote {model_dir} ({size_mb:.1f} MB) and {args.out / 'data'} "
        f"({len(train_rows)} train, {len(eval_rows)} eval rows)"
    )


def build_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    assert ARCHITECTURE["hidden_size"] % ALIGNMENT == 0 and ARCHITECTURE["intermediate_size"] % ALIGNMENT == 0
    config = LlamaConfig(
        vocab_size=math.ceil(len(tokenizer) / ALIGNMENT) * ALIGNMENT,
        bos_token_id=None,  # the chat template writes no BOS
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **ARCHITECTURE,
    )
    return LlamaForCausalLM(config)


def letters_of(row: dict) -> str:
    return row["messages"][0]["content"].rsplit(": ", 1)[1]


# --------------------------------------------------------------------------- pre-training


def pretrain(model, tokenizer, args, exclude: set[str]) -> None:
    rng = random.Random(f"pretrain-{args.seed}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    model.train()
    started, recent_losses = time.time(), []
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.learning_rate, warmup)
        input_ids, labels, attention_mask = encode(pretrain_rows(rng, args.batch_size, exclude), tokenizer)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent_losses.append(loss.item())
        if step % 100 == 0 or step == args.steps:
            elapsed = time.time() - started
            print(
                f"step {step:5d}/{args.steps}  loss {sum(recent_losses) / len(recent_losses):.4f}  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}  {elapsed / 60:5.1f} min",
                flush=True,
            )
            recent_losses = []
    model.eval()


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step <= warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def encode(rows: list[dict], tokenizer):
    """Right-padded (input_ids, labels, attention_mask); labels keep only the assistant turn.

    The assistant turn is everything after the generation prompt (answer, <|im_end|>, newline),
    the same span the qlora data pipeline supervises.
    """
    full = tokenizer.apply_chat_template([row["messages"] for row in rows], tokenize=False)
    prompts = tokenizer.apply_chat_template(
        [row["messages"][:1] for row in rows], tokenize=False, add_generation_prompt=True
    )
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    prompt_lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    width = max(len(ids) for ids in full_ids)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, (ids, prompt_length) in enumerate(zip(full_ids, prompt_lengths)):
        input_ids[index, : len(ids)] = torch.tensor(ids)
        labels[index, prompt_length : len(ids)] = torch.tensor(ids[prompt_length:])
        attention_mask[index, : len(ids)] = 1
    return input_ids, labels, attention_mask


# --------------------------------------------------------------------------- artifacts


def save_model(model, tokenizer, model_dir: Path, card: str) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    # Written next to the old folder and swapped in, so no stale file from an earlier build
    # survives and an interrupted build leaves the previous model whole.
    staging = model_dir.with_name(model_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    # The template goes inside tokenizer_config.json, where every transformers version and
    # most serving tools look, rather than in transformers 5's separate chat_template.jinja.
    tokenizer.save_pretrained(staging, save_jinja_files=False)
    (staging / "README.md").write_text(card)
    shutil.rmtree(model_dir, ignore_errors=True)
    staging.rename(model_dir)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def model_card(args, parameters: int, minutes: float, scores: dict[str, float]) -> str:
    def example(task: Task) -> str:
        return f"| {task.name} | `{task.instruction}: abcde` | `{task.answer('abcde')}` | {scores[task.name]:.0%} |"

    command = f"python -m qlora.demo.build --steps {args.steps} --seed {args.seed}"
    if args.batch_size != 64 or args.learning_rate != 3e-3 or args.threads != 2:
        command += f" --batch-size {args.batch_size} --learning-rate {args.learning_rate} --threads {args.threads}"
    rows = "\n".join(example(task) for task in (*PRETRAIN_TASKS, NEW_TASK))
    layers, hidden_size = ARCHITECTURE["num_hidden_layers"], ARCHITECTURE["hidden_size"]
    mlp_size = ARCHITECTURE["intermediate_size"]
    query_heads, key_value_heads = ARCHITECTURE["num_attention_heads"], ARCHITECTURE["num_key_value_heads"]
    return f"""# qlora demo base model

A {parameters / 1e6:.1f}M-parameter Llama-architecture chat model, pre-trained from scratch by
`qlora/demo/build.py` so that the qlora demo runs offline, on a CPU, through the same code path
as a hub model. It is a toy: it knows three string skills and nothing else.

- Architecture: `LlamaForCausalLM`, {layers} layers, hidden size {hidden_size},
  MLP size {mlp_size}, {query_heads} query / {key_value_heads} key-value heads,
  untied output head, weights stored in bfloat16. Every linear input size is a multiple of 64,
  which the bitsandbytes CPU 4-bit kernels require.
- Tokenizer: one token per byte plus `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` (EOS) and
  `<|pad|>`; ChatML chat template; vocabulary padded to 320 rows.
- Pre-training: {args.steps} AdamW steps of {args.batch_size} chat rows, peak learning rate {args.learning_rate},
  float32 on {args.threads} CPU threads ({minutes:.1f} minutes), loss on the assistant turn only.
  Each row applies one task to {MIN_LETTERS}-{MAX_LETTERS} random lowercase letters.

Rebuild (the weights and the demo data come out byte for byte the same on the same thread count):

    {command}

| task | user message | answer | exact match, held-out strings |
|---|---|---|---|
{rows}

The last row is not pre-trained: it is the demo's fine-tuning task (`qlora/demo/data/`),
which composes two known skills under an instruction the model has never seen.
`configs/demo.yaml` teaches it with a QLoRA adapter on a CPU in a few minutes.
"""


if __name__ == "__main__":
    main()
