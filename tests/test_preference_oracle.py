"""TRL 1.16 as the oracle: our DPO (sigmoid, conservative smoothing, IPO) and ORPO losses and the
LoRA gradients on one batch equal DPOTrainer's / ORPOTrainer's on the same tiny model, adapter
weights and rows, TRL's own loss code called on our batch's token ids.

The base is float32 and unquantized here: TRL casts a quantized model's adapter to bfloat16 (the
QLoRA paper's choice), which would make the comparison one of bfloat16 rounding; the 4-bit base
changes the logits, not the preference arithmetic compared. DPO's TRL side gets the plain base
and a peft_config (a PeftModel handed to DPOTrainer makes its reference a copy of that adapter,
not the base), then our adapter's weights."""

from __future__ import annotations

import pytest
import torch

from qlora import data
from qlora.adapters import attach_lora
from qlora.config import LoraSection
from qlora.data.pairs import epoch_pair_batches, tokenize_pairs
from qlora.labels import IGNORE_INDEX
from qlora.model.base import load_tokenizer
from qlora.training.preference import PreferenceObjective
from tests.tiny import build_tiny_model
from tests.tiny_pairs import write_pairs
from tests.tiny_training import tiny_base

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

TOLERANCE = 1e-5
PAIRS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("oracle")
    model_dir = build_tiny_model(folder / "model")
    tokenizer = load_tokenizer(str(model_dir))
    rows = data.read_rows([(str(write_pairs(folder / "pairs.jsonl", PAIRS, seed=3)), "auto")], objective="dpo")
    pairs = tokenize_pairs(rows, tokenizer, 64, "truncate").examples
    batch = epoch_pair_batches(pairs, PAIRS, tokenizer.pad_token_id, seed=0, epoch=0, shuffle=False)[0]
    return model_dir, tokenizer, rows, pairs, batch


LORA = LoraSection(r=8, alpha=16, dropout=0.0)


def plain_base(model_dir):
    return tiny_base(model_dir, bits=None, gradient_checkpointing=False)


def fresh_model(model_dir):
    """The base with an adapter whose B matrices are not zero: policy != reference."""
    model = attach_lora(plain_base(model_dir), LORA, seed=0)
    generator = torch.Generator().manual_seed(7)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.train()
    return model


def lora_grads(model) -> dict:
    grads = {
        name: parameter.grad.detach().clone()
        for name, parameter in model.named_parameters()
        if parameter.grad is not None
    }
    model.zero_grad(set_to_none=True)
    return grads


def ours(model, batch, kind, chunk_tokens=5, **settings):
    objective = PreferenceObjective(kind, reference=model.disable_adapter, **settings)
    units = objective.start_window([batch])
    loss = objective.loss_sum(model, batch, torch.device("cpu"), chunk_tokens) / units
    loss.backward()
    return loss.item(), lora_grads(model), objective.readings()


def split_ids(example) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of one side: the answer starts at its first supervised label."""
    start = next(index for index, label in enumerate(example.labels) if label != IGNORE_INDEX)
    return example.input_ids[:start], example.input_ids[start:]


def trl_rows(pairs) -> list[dict]:
    rows = []
    for pair in pairs:
        prompt, chosen = split_ids(pair.chosen)
        rejected_prompt, rejected = split_ids(pair.rejected)
        assert prompt == rejected_prompt  # a byte tokenizer: both sides share the prompt's ids
        rows.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return rows


def assert_same(our_loss, our_grads, their_loss, their_grads):
    assert our_loss == pytest.approx(their_loss, abs=TOLERANCE)
    assert our_grads.keys() == their_grads.keys() and our_grads
    for name in our_grads:
        assert torch.allclose(our_grads[name], their_grads[name], atol=TOLERANCE, rtol=0), name
    assert max(grad.abs().max() for grad in our_grads.values()) > 1e-3  # the comparison is not of zeros


def trl_dpo(ours_model, model_dir, tokenizer, pairs, tmp_path, loss_type, beta, swap=False):
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    text_rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}]  # required; its tokenization is not used
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=beta,
        loss_type=[loss_type],
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=PAIRS,
    )
    peft_config = LoraConfig(
        task_type="CAUSAL_LM", r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=0.0, target_modules="all-linear"
    )
    trainer = DPOTrainer(
        model=plain_base(model_dir),
        args=args,
        train_dataset=datasets.Dataset.from_list(text_rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    model = trainer.model
    adapter = {name: parameter for name, parameter in ours_model.named_parameters() if parameter.requires_grad}
    theirs = {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert adapter.keys() == theirs.keys()
    with torch.no_grad():
        for name, parameter in theirs.items():
            parameter.copy_(adapter[name])
    examples = trl_rows(pairs)
    if swap:
        examples = [{**row, "chosen_ids": row["rejected_ids"], "rejected_ids": row["chosen_ids"]} for row in examples]
    inputs = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(examples)
    model.train()
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    return loss.item(), lora_grads(model), trainer


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_and_gradients_equal_trl(setup, tmp_path, loss_type):
    model_dir, tokenizer, rows, pairs, batch = setup
    model = fresh_model(model_dir)
    our_loss, our_grads, readings = ours(model, batch, "dpo", beta=0.2, dpo_loss=loss_type)
    their_loss, their_grads, trainer = trl_dpo(model, model_dir, tokenizer, pairs, tmp_path, loss_type, beta=0.2)
    assert_same(our_loss, our_grads, their_loss, their_grads)
    theirs = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    assert readings["rewards/chosen"] == pytest.approx(theirs["rewards/chosen"], abs=TOLERANCE)
    assert readings["rewards/rejected"] == pytest.approx(theirs["rewards/rejected"], abs=TOLERANCE)
    assert readings["rewards/margin"] == pytest.approx(theirs["rewards/margins"], abs=TOLERANCE)
    assert readings["rewards/accuracy"] == pytest.approx(theirs["rewards/accuracies"], abs=TOLERANCE)


def test_conservative_dpo_is_trls_sigmoid_on_each_label_weighted(setup, tmp_path):
    """TRL 1.16's sigmoid loss has no label smoothing; conservative DPO (smoothing e) is by definition
    (1 - e) x the loss of the pairs as labelled + e x the loss of the pairs flipped: both from TRL."""
    model_dir, tokenizer, rows, pairs, batch = setup
    smoothing = 0.2
    model = fresh_model(model_dir)
    our_loss, our_grads, _ = ours(model, batch, "dpo", beta=0.2, label_smoothing=smoothing)
    as_labelled = trl_dpo(model, model_dir, tokenizer, pairs, tmp_path, "sigmoid", beta=0.2)
    flipped = trl_dpo(model, model_dir, tokenizer, pairs, tmp_path, "sigmoid", beta=0.2, swap=True)
    their_loss = (1 - smoothing) * as_labelled[0] + smoothing * flipped[0]
    their_grads = {name: (1 - smoothing) * as_labelled[1][name] + smoothing * flipped[1][name] for name in our_grads}
    assert_same(our_loss, our_grads, their_loss, their_grads)


def test_orpo_loss_and_gradients_equal_trl(setup, tmp_path):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    model_dir, tokenizer, rows, pairs, batch = setup
    model = fresh_model(model_dir)
    our_loss, our_grads, readings = ours(model, batch, "orpo", orpo_lambda=0.3)

    args = ORPOConfig(
        output_dir=str(tmp_path / "trl"), beta=0.3, report_to="none", use_cpu=True, bf16=False, max_length=64
    )
    text_rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    trainer = ORPOTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(text_rows), processing_class=tokenizer
    )
    trl_batch = {}
    for side in ("chosen", "rejected"):
        sequences = [getattr(pair, side) for pair in pairs]
        width = max(len(example.input_ids) for example in sequences)

        def padded(values, fill):
            return torch.tensor([value + [fill] * (width - len(value)) for value in values])

        trl_batch[f"{side}_input_ids"] = padded([example.input_ids for example in sequences], tokenizer.pad_token_id)
        trl_batch[f"{side}_attention_mask"] = padded([[1] * len(example.input_ids) for example in sequences], 0)
        trl_batch[f"{side}_labels"] = padded([example.labels for example in sequences], IGNORE_INDEX)
    model.train()
    loss, metrics = trainer.get_batch_loss_metrics(model, trl_batch)
    loss.backward()
    assert_same(our_loss, our_grads, loss.item(), lora_grads(model))
    for ours_name, their_name in [
        ("rewards/chosen", "rewards/chosen"),
        ("rewards/margin", "rewards/margins"),
        ("rewards/accuracy", "rewards/accuracies"),
        ("nll_loss", "nll_loss"),
        ("log_odds_ratio", "log_odds_ratio"),
        ("log_odds_chosen", "log_odds_chosen"),
    ]:
        assert readings[ours_name] == pytest.approx(metrics[their_name], abs=TOLERANCE), ours_name


def test_the_chunked_head_and_the_whole_logits_agree(setup):
    model_dir, _, _, _, batch = setup
    for kind in ("dpo", "orpo"):
        model = fresh_model(model_dir)
        chunked = ours(model, batch, kind, chunk_tokens=3)
        whole = ours(model, batch, kind, chunk_tokens="off")
        assert_same(chunked[0], chunked[1], whole[0], whole[1])
