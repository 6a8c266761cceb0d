"""The auto micro-batch's dry run (qlora.training.dry_run, qlora.plan.micro_batch): the step is the
loop's chunked loss on in-range synthetic ids, it leaves no trace, and the CUDA step-down decides
by a pure rule. The step runs here on CPU exactly as on the GPU; only the peak reading
(torch.cuda.max_memory_allocated) and the out-of-memory catch are CUDA's and untested here.

Real 4-bit bitsandbytes + peft LoRA on a tiny Llama with a 2048-entry vocabulary, so a
micro-batch's full logits (~190 x 2048) dwarf one loss chunk's (6 x 2048).
"""

import json

import pytest
import torch

from qlora.adapters import attach_lora
from qlora.config import LoraSection, load_config
from qlora.errors import ConfigError, ModelError
from qlora.plan.micro_batch import (
    DRY_RUN_SLACK,
    dry_run_fits,
    dry_run_need,
    resident_extra_bytes,
    step_down_until_fits,
)
from qlora.training.dry_run import dry_run_step, synthetic_batch, token_id_limit
from qlora.training.loss import summed_cross_entropy
from tests.tiny import build_tiny_model, write_job
from tests.tiny_training import tiny_base
from tests.vocab_tensors import VocabSizedTensors

VOCAB = 2048  # the wide_vocab_dir fixture's (conftest)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(wide_vocab_dir):
    return attach_lora(tiny_base(wide_vocab_dir), LoraSection(r=8, alpha=16, dropout=0.1), seed=0)


def test_ids_stay_below_the_embedding_rows_when_the_tokenizer_is_longer(model):
    rows = model.get_input_embeddings().weight.shape[0]
    assert token_id_limit(model, rows + 500) == rows  # added tokens the embedding was never resized for
    assert token_id_limit(model, rows - 7) == rows - 7  # padded rows past the tokenizer: ids no data holds
    batch = synthetic_batch(4, 512, 64, True, torch.Generator().manual_seed(0))
    assert int(batch.input_ids.max()) == 63 and int(batch.input_ids.min()) == 0  # the whole range, nothing past it
    with pytest.raises(IndexError):  # what an id at len(tokenizer) does; on CUDA a device assert instead
        model(input_ids=torch.tensor([[rows]]), use_cache=False)
    loss = dry_run_step(model, 2, 64, rows + 500, CPU, "float32")
    assert loss > 0


def test_the_synthetic_batch_is_padding_free_or_full_rows_every_target_supervised():
    flat = synthetic_batch(3, 64, 100, True, torch.Generator().manual_seed(0))
    assert flat.input_ids.shape == flat.position_ids.shape == flat.targets.shape == (1, 192)
    assert flat.attention_mask is None
    assert flat.position_ids[0].tolist() == list(range(64)) * 3  # rows kept apart as the loop's batches are
    per_row = flat.targets.reshape(3, 64)
    assert (per_row[:, -1] == -100).all() and (per_row[:, :-1] != -100).all()
    assert flat.supervised_tokens == int((flat.targets != -100).sum()) == 3 * 63
    torch.testing.assert_close(per_row[:, :-1], flat.input_ids.reshape(3, 64)[:, 1:])  # next token, same row
    rows = synthetic_batch(3, 64, 100, False, torch.Generator().manual_seed(0))
    assert rows.input_ids.shape == (3, 64) and rows.attention_mask is None
    torch.testing.assert_close(rows.input_ids.reshape(1, -1), flat.input_ids)


def test_the_step_is_the_loops_chunked_loss_never_full_vocabulary_logits(model):
    micro, seq_len, chunk = 3, 64, 6
    batch = synthetic_batch(micro, seq_len, VOCAB, True, torch.Generator().manual_seed(0))  # the step's own draw
    dry_run_step(model, 1, 16, VOCAB, CPU, "float32", chunk_tokens=chunk)  # the loss's one-time probe, uncounted
    with VocabSizedTensors(VOCAB) as recorder:
        loss = dry_run_step(model, micro, seq_len, VOCAB, CPU, "float32", chunk_tokens=chunk)
    assert {"_log_softmax", "_log_softmax_backward_data"} <= recorder.ops  # forward and backward were seen
    assert recorder.largest == chunk * VOCAB  # one chunk's logits, not micro x seq_len of them
    assert batch.supervised_tokens * VOCAB > 30 * recorder.largest
    model.train()
    with torch.random.fork_rng():
        expected = summed_cross_entropy(model, batch, CPU, chunk)
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(torch.tensor(loss), expected.detach(), rtol=1e-6, atol=0)


def test_the_step_leaves_no_gradients_mode_or_random_state_behind(model):
    model.eval()
    before = torch.get_rng_state()
    dry_run_step(model, 2, 64, VOCAB, CPU, "float32", chunk_tokens=6, offload_activations=True)
    assert torch.equal(torch.get_rng_state(), before)  # dropout (0.1) drew from a forked generator
    assert not model.training
    assert all(parameter.grad is None for parameter in model.parameters())


def test_the_fit_rule_adds_the_allocator_slack_and_the_extra_to_the_measured_peak():
    gib = 2**30
    assert DRY_RUN_SLACK == 0.05
    assert dry_run_need(10 * gib, gib) == int(10.5 * gib) + gib
    assert dry_run_fits(10 * gib, gib, int(11.5 * gib))
    assert not dry_run_fits(10 * gib, gib, int(11.5 * gib) - 1)  # the peak alone (+extra) fits: not enough
    assert not dry_run_fits(10 * gib, 0, int(10.4 * gib))
    assert dry_run_fits(10 * gib, 0, 11 * gib, slack=0.1)


def test_the_step_down_takes_divisors_of_the_effective_batch_until_one_fits(tmp_path, tiny_model_dir):
    config = load_config(write_job(tmp_path, tiny_model_dir, train={"micro_batch_size": 6, "grad_accum_steps": 2}))
    per_sequence = 2**30
    tried, lines = [], []

    def measure_peak(micro_batch):  # stands in for the GPU's dry run: 6 runs out of memory
        tried.append(micro_batch)
        return None if micro_batch == 6 else micro_batch * per_sequence

    # 4 would fit by its peak alone (4 GiB <= 4.1 GiB) but not with 5% slack: 3 is the answer.
    step_down_until_fits(config, int(4.1 * per_sequence), 0, measure_peak, lines.append)
    assert tried == [6, 4, 3] and (config.train.micro_batch_size, config.train.grad_accum_steps) == (3, 4)
    assert "ran out of memory" in lines[0] and "confirmed" in lines[-1]
    with pytest.raises(ConfigError, match="does not fit"):
        step_down_until_fits(config, per_sequence // 2, 0, measure_peak, lines.append)


def remote_code_model(directory):
    """The tiny Llama under a model_type of its own, its classes in code beside config.json: the
    folder loads only with trust_remote_code."""
    folder = build_tiny_model(directory)
    (folder / "configuration_remote_llama.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass RemoteLlamaConfig(LlamaConfig):\n"
        '    model_type = "remote_llama"\n'
    )
    (folder / "modeling_remote_llama.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_remote_llama import RemoteLlamaConfig\n\n\n"
        "class RemoteLlamaForCausalLM(LlamaForCausalLM):\n    config_class = RemoteLlamaConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "remote_llama"
    config["auto_map"] = {
        "AutoConfig": "configuration_remote_llama.RemoteLlamaConfig",
        "AutoModelForCausalLM": "modeling_remote_llama.RemoteLlamaForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_the_extra_bytes_read_the_architecture_with_the_jobs_trust_remote_code(tmp_path, tiny_model_dir):
    folder = remote_code_model(tmp_path / "remote")
    trusted = load_config(write_job(tmp_path, folder, model={"trust_remote_code": True}))
    plain = load_config(write_job(tmp_path, tiny_model_dir))
    assert resident_extra_bytes(trusted) == resident_extra_bytes(plain) > 0  # same shapes, same optimizer state
    with pytest.raises(ModelError, match="custom code"):
        resident_extra_bytes(load_config(write_job(tmp_path, folder)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_dry_run_reads_a_peak_that_grows_with_the_micro_batch(wide_vocab_dir):
    """What only a GPU shows: the allocator's peak around the same step (ids past the embedding
    would be a device assert here, not an IndexError)."""
    from qlora.training.dry_run import cuda_dry_run_peak

    model = attach_lora(tiny_base(wide_vocab_dir, compute_dtype="bfloat16"), LoraSection(r=8, alpha=16), seed=0)
    resident = torch.cuda.memory_allocated()
    one, four = (cuda_dry_run_peak(model, micro, 256, VOCAB + 500, compute_dtype="bfloat16") for micro in (1, 4))
    assert one is not None and four is not None and resident < one < four
    assert all(parameter.grad is None for parameter in model.parameters())
