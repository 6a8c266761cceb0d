"""The chunked loss (qlora.training.loss): the whole path's loss and LoRA gradients, vocabulary-sized
tensors of one chunk at most, the same training run, and the whole path for heads whose logits
the model post-processes (a softcap).

Real 4-bit bitsandbytes + peft LoRA on tiny models with a 2048-entry vocabulary, so a
micro-batch's logits (~150 x 2048) dwarf a chunk's (a few x 2048).
"""

import json

import pytest
import torch

from qlora import data
from qlora.adapters import attach_lora
from qlora.config import LoraSection
from qlora.model.base import load_tokenizer
from qlora.training.loss import summed_cross_entropy
from tests.tiny import write_chat_data, write_job
from tests.tiny_training import tiny_base
from tests.vocab_tensors import VocabSizedTensors

VOCAB = 2048  # the wide_vocab_dir fixture's (conftest)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(wide_vocab_dir):
    """NF4 base + LoRA whose B is not zero, so every A and B gets a gradient."""
    base = tiny_base(wide_vocab_dir)
    model = attach_lora(base, LoraSection(r=8, alpha=16, dropout=0.0), seed=0).train()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def first_batch(model_dir, tmp_path, train_on, padding_free, rows=6):
    tokenizer = load_tokenizer(str(model_dir))
    path = write_chat_data(tmp_path / "rows.jsonl", rows, seed=4)
    examples = data.tokenize_rows(data.read_rows([(str(path), "auto")]), tokenizer, 64, train_on, "truncate").examples
    return data.epoch_batches(
        examples, rows, False, 64, tokenizer.pad_token_id, seed=0, epoch=0, padding_free=padding_free
    )[0]


def random_batch(rows, length, vocab):
    """Unpadded rows of random ids, every next token supervised."""
    ids = torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(0))
    targets = torch.cat([ids[:, 1:], torch.full((rows, 1), -100)], dim=1)
    return data.Batch(
        input_ids=ids,
        position_ids=torch.arange(length).expand(rows, length),
        targets=targets,
        attention_mask=None,
        row_ids=list(range(rows)),
        supervised_tokens=rows * (length - 1),
        row_lengths=[length] * rows,
    )


def loss_and_grads(model, batch, chunk_tokens):
    model.zero_grad(set_to_none=True)
    loss = summed_cross_entropy(model, batch, CPU, chunk_tokens)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("train_on", ["completions", "all"])
@pytest.mark.parametrize("padding_free", [True, False])
def test_chunked_loss_and_every_lora_gradient_equal_the_whole_path(
    model, wide_vocab_dir, tmp_path, train_on, padding_free
):
    batch = first_batch(wide_vocab_dir, tmp_path, train_on, padding_free)
    supervised = batch.supervised_tokens
    dividing = next(size for size in range(5, supervised + 1) if supervised % size == 0)
    not_dividing = next(size for size in range(5, supervised) if supervised % size)
    whole_loss, whole_grads = loss_and_grads(model, batch, "off")
    assert all(grad.abs().max() > 0 for grad in whole_grads.values())  # every A and B is tested
    for size in (dividing, not_dividing):  # auto: one chunk here, the path every other test trains on
        loss, grads = loss_and_grads(model, batch, size)
        torch.testing.assert_close(loss, whole_loss, rtol=1e-6, atol=0, msg=f"chunk {size}")
        for name, grad in whole_grads.items():
            torch.testing.assert_close(
                grads[name], grad, rtol=1e-5, atol=1e-6 * grad.abs().max().item(), msg=f"chunk {size}: {name}"
            )


@pytest.mark.parametrize("padding_free", [True, False])
def test_no_tensor_beyond_one_chunk_of_logits_while_the_whole_path_holds_them_all(
    model, wide_vocab_dir, tmp_path, padding_free
):
    batch = first_batch(wide_vocab_dir, tmp_path, "all", padding_free)
    chunk = 6
    summed_cross_entropy(model, batch, CPU, chunk)  # the one-time probe, outside the count
    largest = {}
    for setting in (chunk, "off"):
        with VocabSizedTensors(VOCAB) as recorder:
            summed_cross_entropy(model, batch, CPU, setting).backward()
        largest[setting] = recorder.largest
        assert {"_log_softmax", "_log_softmax_backward_data"} <= recorder.ops  # forward and backward were both seen
    assert largest[chunk] == chunk * VOCAB
    assert largest["off"] >= batch.supervised_tokens * VOCAB > 10 * largest[chunk]


def test_eval_takes_the_chunked_path_without_checkpointing_and_gives_the_whole_loss(model, wide_vocab_dir, tmp_path):
    batch = first_batch(wide_vocab_dir, tmp_path, "all", padding_free=True)
    with torch.no_grad():
        whole = summed_cross_entropy(model, batch, CPU, "off")
        with VocabSizedTensors(VOCAB) as recorder:
            chunked = summed_cross_entropy(model, batch, CPU, 6)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=0)
    assert recorder.largest == 6 * VOCAB


def test_training_with_small_chunks_gives_the_same_losses(wide_vocab_dir, tmp_path):
    from qlora.config import load_config
    from qlora.job.run import run_job

    losses = {}
    for setting in (3, "off"):
        directory = tmp_path / str(setting)
        directory.mkdir()
        job = write_job(
            directory,
            wide_vocab_dir,
            data={"train_on": "all", "max_seq_len": 64},
            train={"max_steps": 3, "loss_chunk_tokens": setting, "learning_rate": 1e-2},
        )
        run_job(load_config(job), echo=lambda line: None)
        rows = [json.loads(line) for line in (directory / "out" / "metrics.jsonl").read_text().splitlines()]
        losses[setting] = [(row.get("loss"), row.get("eval_loss")) for row in rows]
    assert len(losses[3]) == 4 and losses[3][1][0] != losses[3][3][0]  # step 0 eval + 3 steps; the loss moved
    for chunked, whole in zip(losses[3], losses["off"]):
        for ours, theirs in zip(chunked, whole):  # (loss, eval_loss); None where a row has no such value
            assert (ours is None) == (theirs is None) and (ours is None or ours == pytest.approx(theirs, rel=1e-5))


def build_tiny_gemma2(directory, softcap):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        final_logit_softcapping=softcap,
        attn_logit_softcapping=None,
        sliding_window=32,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(str(directory), safe_serialization=True)
    return directory


@pytest.mark.parametrize("softcap", [1.0, None])
def test_a_softcapped_head_takes_the_whole_path_and_says_so(tmp_path, capfd, softcap):
    """Gemma 2 squashes its logits after the head: the probe sees it and the loss is the model's
    own; the same model without the softcap is chunked."""
    directory = build_tiny_gemma2(tmp_path / "gemma2", softcap)
    base = tiny_base(directory)
    model = attach_lora(base, LoraSection(r=8, alpha=16, dropout=0.0), seed=0).train()
    batch = random_batch(rows=2, length=40, vocab=1024)
    capfd.readouterr()
    with VocabSizedTensors(1024) as recorder:
        chunked_setting = summed_cross_entropy(model, batch, CPU, 4)
        chunked_setting.backward()
    with VocabSizedTensors(1024) as again:
        summed_cross_entropy(model, batch, CPU, 4)  # decided once: no second probe, no second note
    whole = summed_cross_entropy(model, batch, CPU, "off")
    note = capfd.readouterr().err
    if softcap:
        assert note.count("Gemma2ForCausalLM's logits are not its output head's alone") == 1
        assert recorder.largest >= batch.supervised_tokens * 1024
        assert torch.equal(chunked_setting.detach(), whole)
    else:
        assert note == ""
        assert recorder.largest <= batch.supervised_tokens * 1024 / 4 and again.largest == 4 * 1024
        torch.testing.assert_close(chunked_setting.detach(), whole, rtol=1e-6, atol=0)


@pytest.mark.parametrize("value", [0, -5, "lots", 2.5, True])
def test_a_bad_chunk_size_is_a_one_line_error_naming_the_key(tiny_model_dir, tmp_path, value):
    from qlora.config import load_config
    from qlora.errors import ConfigError

    job = write_job(tmp_path, tiny_model_dir, train={"loss_chunk_tokens": value})
    with pytest.raises(
        ConfigError,
        match=r"^[^\n]*train\.loss_chunk_tokens: a positive number of supervised positions, auto or off \(got",
    ) as error:
        load_config(job)
    assert "\n" not in str(error.value)
    assert (
        load_config(write_job(tmp_path, tiny_model_dir, train={"loss_chunk_tokens": 512})).train.loss_chunk_tokens
        == 512
    )
    # A bare `off` in YAML is the boolean false: it means off, not a bad value.
    assert (
        load_config(write_job(tmp_path, tiny_model_dir, train={"loss_chunk_tokens": False})).train.loss_chunk_tokens
        == "off"
    )


def test_plan_counts_one_chunk_of_logits_by_the_loops_rule():
    from qlora.plan.architecture import load_architecture
    from qlora.plan.loss_chunks import loss_chunk_tokens
    from qlora.plan.memory import make_plan
    from qlora.plan.settings import PlanSettings

    llama3 = load_architecture("llama-3.1-8b")
    assert loss_chunk_tokens(llama3.vocab) == 523 == 256 * 2**20 // (4 * 128256)
    logits = {
        setting: next(
            line
            for line in make_plan(llama3, PlanSettings(seq_len=2048, loss_chunk_tokens=setting)).lines
            if line.name == "logits_and_loss"
        ).bytes
        for setting in ("auto", "off", 100)
    }
    assert logits["off"] == 12 * llama3.vocab * 2048  # 3 float32 copies of every position's logits
    assert logits["auto"] == 12 * llama3.vocab * 523 and logits[100] == 12 * llama3.vocab * 100
    gemma2 = load_architecture("gemma-2-9b")  # softcapped: the loop takes the all-at-once path
    auto = next(line for line in make_plan(gemma2, PlanSettings(seq_len=2048)).lines if line.name == "logits_and_loss")
    assert (
        auto.bytes
        == next(
            line
            for line in make_plan(gemma2, PlanSettings(seq_len=2048, loss_chunk_tokens="off")).lines
            if line.name == "logits_and_loss"
        ).bytes
    )


def test_under_the_loops_bf16_autocast_the_head_is_chunked_in_bf16_with_the_same_loss(wide_vocab_dir, capfd):
    """The loop runs forward and loss under its precision's autocast: the chunks run the head in
    the dtype the forward's own head would have, so the probe accepts and the loss is the whole path's."""
    from qlora.training.precision import Precision

    # A float32 head: only the autocast makes its logits bf16 (a bf16 head would be bf16 anyway).
    base = tiny_base(wide_vocab_dir)
    model = attach_lora(base, LoraSection(r=8, alpha=16, dropout=0.0), seed=0).train()
    bf16 = Precision("cpu", torch.bfloat16, torch.amp.GradScaler("cpu", enabled=False))
    losses, head_dtypes, note = bf16_losses(model, bf16, capfd)
    assert note == ""
    assert set(head_dtypes) == {torch.bfloat16}
    assert losses[5][1] == 5 * VOCAB < losses["off"][1]
    torch.testing.assert_close(losses[5][0], losses["off"][0], rtol=1e-5, atol=0)


def bf16_losses(model, precision, capfd):
    batch = random_batch(rows=1, length=60, vocab=VOCAB)
    capfd.readouterr()
    with torch.no_grad(), precision.autocast():
        summed_cross_entropy(model, batch, CPU, 5)  # the one-time probe, outside the count
    losses, head_dtypes = {}, []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: head_dtypes.append(out.dtype)
    )
    for setting in (5, "off"):
        with VocabSizedTensors(VOCAB) as recorder:
            with precision.autocast():
                loss = summed_cross_entropy(model, batch, CPU, setting)
            precision.scaler.scale(loss).backward()
        losses[setting] = (loss.detach(), recorder.largest)
    handle.remove()
    return losses, head_dtypes, capfd.readouterr().err
