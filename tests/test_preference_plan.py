"""Planning preference jobs (train.objective dpo / orpo): a micro-batch of P pairs is 2P sequences
in one forward, DPO adds a reference forward (its FLOPs, and a phase of its own in memory); `qlora
plan`, micro_batch_size auto (in pairs), gradient_checkpointing auto and the MFU meter take them.
The numbers are checked against real tiny models: the tensors autograd saves in a DPO step, the
live working set of its reference pass, torch's FLOP counter over a whole DPO step."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import replace

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from qlora.adapters import attach_lora
from qlora.cli.main import main
from qlora.config import LoraSection, load_config
from qlora.errors import ConfigError
from qlora.plan.activations import layer_forward_bytes_per_token
from qlora.plan.architecture import load_architecture
from qlora.plan.budget import read_budget
from qlora.plan.checkpointing_mode import choose_checkpointing, resolve_checkpointing
from qlora.plan.flops import FlopMeter, FlopModel
from qlora.plan.memory import flops_per_token, make_plan
from qlora.plan.micro_batch import step_down_until_fits
from qlora.plan.settings import PlanSettings, settings_from_job
from qlora.training.dry_run import dry_run_step, synthetic_pair_batch
from qlora.training.loss import model_inputs
from qlora.training.preference import PreferenceObjective, target_log_probs
from tests.tiny import write_job
from tests.tiny_pairs import write_pairs
from tests.tiny_training import counted_lora_llama, saved_activation_bytes, tiny_base
from tests.vocab_tensors import VocabSizedTensors

CPU = torch.device("cpu")
MODES = (True, False, "selective")
DPO = {"sequences_per_row": 2, "reference_forward": True}
ORPO = {"sequences_per_row": 2, "reference_forward": False}


def line(plan, name):
    return next(item for item in plan.lines if item.name == name)


def phase_bytes(plan, names) -> int:
    return sum(line(plan, name).bytes for name in names)


def pair_job(tmp_path, model_dir, objective="dpo", **train):
    write_pairs(tmp_path / "train.jsonl", 16, seed=1)
    write_pairs(tmp_path / "eval.jsonl", 4, seed=2)
    return write_job(tmp_path, model_dir, train={"objective": objective, "micro_batch_size": 2, **train})


# --------------------------------------------------------------------------- the arithmetic


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pairs", [1, 3])
def test_p_pairs_are_planned_as_2p_sft_rows_plus_dpos_reference(mode, pairs):
    arch = load_architecture("llama-3.1-8b")
    base = PlanSettings(seq_len=2048, gradient_checkpointing=mode)
    sft = make_plan(arch, replace(base, micro_batch=2 * pairs))
    dpo = make_plan(arch, replace(base, micro_batch=pairs, **DPO))
    orpo = make_plan(arch, replace(base, micro_batch=pairs, **ORPO))
    # ORPO: exactly the 2P-row SFT plan, line by line (only the shape in the text differs).
    assert [(item.name, item.bytes, item.counted) for item in orpo.lines] == [
        (item.name, item.bytes, item.counted) for item in sft.lines
    ]
    assert orpo.total_bytes == sft.total_bytes and orpo.flops_per_token == sft.flops_per_token
    # DPO: the same lines, and the reference's transient as a third phase.
    for item in sft.lines:
        if item.name != "allocator_slack":
            assert line(dpo, item.name).bytes == item.bytes, item.name
    reference = line(dpo, "reference_forward")
    tokens = 2 * pairs * 2048
    dequantized = max(linear.weights for linear in arch.linears) * 2
    policy_chunk = 4 * arch.vocab * 523  # the policy's last loss chunk's log-softmax, kept for its backward
    assert reference.bytes == layer_forward_bytes_per_token(arch, base) * tokens + dequantized + policy_chunk
    sft_phases = max(phase_bytes(sft, ["logits_and_loss"]), phase_bytes(sft, ["layer_backward", "dequant_workspace"]))
    assert dpo.allocated_bytes == sft.allocated_bytes + max(0, reference.bytes - sft_phases)
    assert reference.counted is (reference.bytes > sft_phases)
    # A layer recomputed with its gradients outweighs a no_grad forward of one; without
    # recomputation the reference's working set is the peak once it outgrows one loss chunk's logits.
    if mode is not False:
        assert not reference.counted
    elif pairs == 3:
        assert reference.counted and dpo.allocated_bytes > sft.allocated_bytes
    assert "no_grad" in reference.why and f"{pairs} pair" in reference.why


def test_the_job_file_turns_the_objective_into_sequences_and_a_reference(tmp_path, tiny_model_dir):
    for objective, expected in (("sft", (1, False)), ("dpo", (2, True)), ("orpo", (2, False))):
        folder = tmp_path / objective
        folder.mkdir()
        job = write_job(folder, tiny_model_dir) if objective == "sft" else pair_job(folder, tiny_model_dir, objective)
        settings = settings_from_job(load_config(job))
        assert (settings.sequences_per_row, settings.reference_forward) == expected, objective
    assert (PlanSettings().sequences_per_row, PlanSettings().reference_forward) == (1, False)  # the schema's sft


def test_dpo_costs_one_more_forward_of_the_base_than_orpo():
    arch = load_architecture("llama-3.1-8b")
    for mode in MODES:
        settings = PlanSettings(seq_len=2048, gradient_checkpointing=mode)
        dpo, orpo = flops_per_token(arch, replace(settings, **DPO)), flops_per_token(arch, replace(settings, **ORPO))
        assert orpo == flops_per_token(arch, settings)  # per token, a pair's sequences are rows like any other
        # The reference by hand: the frozen base's forward (no LoRA), the head on every token, causal attention.
        reference = 2 * arch.quantized_params + 2 * arch.vocab * arch.hidden + 2 * arch.layers * arch.q_dim * 2049
        assert dpo - orpo == pytest.approx(reference, rel=1e-12)
    checkpointed = PlanSettings(seq_len=2048, gradient_checkpointing=True)
    ratio = flops_per_token(arch, replace(checkpointed, **DPO)) / flops_per_token(arch, replace(checkpointed, **ORPO))
    assert 1.3 < ratio < 1.4  # ~2N on top of ~6N per token


# --------------------------------------------------------------------------- measured on tiny models


def saved_bytes(model, step) -> tuple[int, int]:
    """(bytes of the distinct storages autograd saves during step(), of those the ones saved while
    the reference context is entered), parameters excluded."""
    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    saved, inside, in_reference = {}, {}, [False]

    def pack(tensor):
        key = tensor.untyped_storage().data_ptr()
        if key not in parameters:
            (inside if in_reference[0] else saved)[key] = tensor.untyped_storage().nbytes()
        return tensor

    @contextlib.contextmanager
    def reference():
        with model.disable_adapter():
            in_reference[0] = True
            try:
                yield
            finally:
                in_reference[0] = False

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step(reference)
    return sum(saved.values()), sum(inside.values())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_dpo_step_saves_what_the_plan_says_and_its_reference_saves_nothing(tiny256, checkpointing):
    base = tiny_base(tiny256, gradient_checkpointing=True)
    if not checkpointing:
        base.gradient_checkpointing_disable()
    model = attach_lora(base, LoraSection(r=8, alpha=16, dropout=0.0), seed=0)
    model.train()
    pairs, seq_len, chunk = 2, 96, 16
    batch = synthetic_pair_batch(pairs, seq_len, 320, torch.Generator().manual_seed(0))
    plan = make_plan(
        load_architecture(str(tiny256)),
        PlanSettings(
            micro_batch=pairs,
            seq_len=seq_len,
            gradient_checkpointing=checkpointing,
            compute_dtype="float32",
            lora_r=8,
            lora_dropout=0.0,
            loss_chunk_tokens=chunk,
            **DPO,
        ),
    )
    # The model's forward over the pair batch's 2P sequences' tokens: the plan's activations, exactly.
    assert saved_activation_bytes(model, batch.input_ids) == line(plan, "activations").bytes
    # With the batch's own position ids (restarting at each sequence) CPU's per-row attention keeps
    # per-sequence copies of q, k and v on top (flash on CUDA does not): the forward to compare the step with.
    forward, _ = saved_bytes(model, lambda reference: model(**model_inputs(batch, CPU)))
    assert forward >= line(plan, "activations").bytes

    def step(reference):
        objective = PreferenceObjective("dpo", reference=reference)
        objective.start_window([batch])
        objective.loss_sum(model, batch, CPU, chunk)

    policy, in_reference = saved_bytes(model, step)
    assert in_reference == 0  # no_grad: the reference keeps nothing for backward
    # The loss's own: the head's input at the scored columns (4 B x hidden each, in float32) and the
    # last chunk's logits, which the loss phase's line bounds.
    loss_saves = policy - forward
    columns = 2 * pairs * (seq_len - 1)
    assert 0 < loss_saves <= line(plan, "logits_and_loss").bytes + 4 * 256 * columns


class LiveBytes(TorchDispatchMode):
    """The most bytes the tensors made inside it hold at once (storages, each counted once while
    alive; the model's parameters and buffers excluded)."""

    def __init__(self, model):
        super().__init__()
        tensors = list(model.parameters()) + list(model.buffers())
        self.skip = {tensor.untyped_storage().data_ptr() for tensor in tensors}
        self.live, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # The freed first: an output may sit at the address of a storage the op let go.
        self.live = {key: value for key, value in self.live.items() if not value[0].expired()}
        for tensor in torch.utils._pytree.tree_leaves(out):
            if torch.is_tensor(tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key not in self.live and key not in self.skip:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return out


@pytest.mark.parametrize("bits", [None, 4])
def test_the_reference_passes_working_set_is_within_the_planned_line(tiny256, bits):
    """The reference pass as the objective runs it (adapter off, no_grad), its live tensors tracked
    op by op. On CPU bitsandbytes' 4-bit matmul does not dequantize the weight, which the line
    charges for CUDA: the 4-bit plan is above what CPU shows by that much."""
    base = tiny_base(tiny256, bits=bits, gradient_checkpointing=True)
    base.gradient_checkpointing_disable()
    model = attach_lora(base, LoraSection(r=8, alpha=16, dropout=0.0), seed=0)
    model.train()
    pairs, seq_len, chunk = 2, 96, 16
    batch = synthetic_pair_batch(pairs, seq_len, 320, torch.Generator().manual_seed(0))
    target_log_probs(model, batch, CPU, chunk, False)  # the loss's one-time head probe, outside the count
    with torch.no_grad(), model.disable_adapter(), LiveBytes(model) as live:
        target_log_probs(model, batch, CPU, chunk, False)
    arch = load_architecture(str(tiny256))
    settings = PlanSettings(
        micro_batch=pairs,
        seq_len=seq_len,
        gradient_checkpointing=False,
        compute_dtype="float32",
        bits=bits,
        lora_r=8,
        lora_dropout=0.0,
        loss_chunk_tokens=chunk,
        **DPO,
    )
    planned = line(make_plan(arch, settings), "reference_forward").bytes
    working_set = layer_forward_bytes_per_token(arch, settings) * 2 * pairs * seq_len
    dequantized = max(linear.weights for linear in arch.linears) * 4 if bits else 0
    policy_chunk = 4 * 320 * chunk  # made before the reference, outside this count
    assert planned == working_set + dequantized + policy_chunk
    assert 0.99 * working_set <= live.peak <= 1.01 * working_set, (live.peak, working_set)


def test_the_flop_meter_counts_a_preference_step_as_torchs_counter_does(tiny_model_dir, tmp_path):
    """torch's FLOP counter over one whole step (policy forward + backward, DPO's reference forward)
    of real pair batches (prompts unscored) on a tiny 16-bit Llama with LoRA on every linear: the
    meter's linear FLOPs, exactly, for DPO (+ the reference) and ORPO (the head on every chosen
    position too)."""
    from torch.utils.flop_counter import FlopCounterMode

    from qlora import data
    from qlora.model.base import load_tokenizer

    # Eager attention: matmuls the counter tells apart (bmm), not a fused kernel.
    model, arch, lora_params = counted_lora_llama("eager")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = data.read_rows([(str(write_pairs(tmp_path / "p.jsonl", 3, seed=4)), "auto")], objective="dpo")
    pairs = data.tokenize_pairs(rows, tokenizer, 64, "truncate").examples
    (padded,) = data.epoch_pair_batches(pairs, 3, tokenizer.pad_token_id, seed=0, epoch=0, shuffle=False)
    # Without its padding tail: padding is never useful FLOPs (the meter's rule); the counter counts what runs.
    real = sum(padded.row_lengths)
    assert padded.input_ids.shape[1] > real
    batch = replace(
        padded,
        input_ids=padded.input_ids[:, :real],
        position_ids=padded.position_ids[:, :real],
        targets=padded.targets[:, :real],
        next_tokens=padded.next_tokens[:, :real],
        sequence_ids=padded.sequence_ids[:real],
    )

    def linear_flops(objective) -> float:
        objective.start_window([batch])
        with FlopCounterMode(display=False) as counter:
            objective.loss_sum(model, batch, CPU, "auto").backward()
        model.zero_grad(set_to_none=True)
        return sum(flops for op, flops in counter.get_flop_counts()["Global"].items() if "bmm" not in str(op))

    linear_flops(PreferenceObjective("orpo"))  # the loss's one-time head probe, outside the counts below
    flop_model = FlopModel.of(arch, lora_params)
    no_attention = FlopModel(flop_model.base_linear_weights, lora_params, flop_model.head_weights, 0)
    metered = {}
    for kind in ("dpo", "orpo"):
        objective = PreferenceObjective(kind, reference=model.disable_adapter)
        meter = FlopMeter(
            no_attention,
            1.0,
            head_on_supervised_only=True,
            reference_forward=kind == "dpo",
            head_positions=objective.head_positions,
        )
        metered[kind] = meter.of_batch(batch)
        assert linear_flops(objective) == metered[kind], kind
    orpo_head = PreferenceObjective("orpo").head_positions(batch)
    assert PreferenceObjective("dpo", reference=model.disable_adapter).head_positions(batch) == batch.supervised_tokens
    assert orpo_head > batch.supervised_tokens  # the chosen prompts too
    # The difference: the reference (the base without LoRA, the head at the answers), less ORPO's extra head.
    reference = no_attention.reference_forward(batch.row_lengths, batch.supervised_tokens)
    extra_head = 4 * no_attention.head_weights * (orpo_head - batch.supervised_tokens)
    assert metered["dpo"] - metered["orpo"] == pytest.approx(reference - extra_head, rel=1e-12)


def test_the_jobs_flop_meter_takes_the_reference(tiny_model_dir):
    from qlora.plan.mfu import job_flop_meter

    assert job_flop_meter(str(tiny_model_dir), 1000, "float32", reference_forward=True).reference_forward
    assert not job_flop_meter(str(tiny_model_dir), 1000, "float32").reference_forward


# --------------------------------------------------------------------------- the dry run


@pytest.fixture(scope="module")
def wide_model(wide_vocab_dir):
    return attach_lora(tiny_base(wide_vocab_dir), LoraSection(r=8, alpha=16, dropout=0.1), seed=0)


def test_the_dry_run_of_a_dpo_job_is_its_objectives_step_on_pairs(wide_model):
    vocab, pairs, seq_len, chunk = 2048, 3, 64, 6
    model = wide_model
    dry_run_step(model, 1, 16, vocab, CPU, "float32", chunk_tokens=chunk)  # the loss's probe, uncounted
    model.eval()
    before = torch.get_rng_state()
    objective = PreferenceObjective("dpo", reference=model.disable_adapter)
    with VocabSizedTensors(vocab) as recorder:
        loss = dry_run_step(model, pairs, seq_len, vocab, CPU, "float32", chunk_tokens=chunk, objective=objective)
    # A fresh adapter is the reference (LoRA B = 0): every pair's DPO loss is log 2, so the
    # reference ran and the micro-batch held `pairs` pairs.
    assert loss == pytest.approx(pairs * math.log(2), rel=1e-6)
    assert recorder.largest == chunk * vocab  # policy and reference both project one chunk at a time
    assert torch.equal(torch.get_rng_state(), before) and not model.training
    assert all(parameter.grad is None for parameter in model.parameters())
    assert objective.readings() == {}  # drained: nothing carried into training

    orpo = PreferenceObjective("orpo")
    measured = dry_run_step(model, pairs, seq_len, vocab, CPU, "float32", chunk_tokens=chunk, objective=orpo)
    batch = synthetic_pair_batch(pairs, seq_len, vocab, torch.Generator().manual_seed(0))
    assert batch.input_ids.shape == (1, 2 * pairs * seq_len) and batch.row_lengths == [seq_len] * 2 * pairs
    model.train()
    with torch.random.fork_rng():
        again = PreferenceObjective("orpo")
        again.start_window([batch])
        expected = again.loss_sum(model, batch, CPU, chunk)
    model.zero_grad(set_to_none=True)
    model.eval()
    assert measured == pytest.approx(float(expected.detach()), rel=1e-6)


def test_the_step_down_of_a_pair_job_names_pairs(tmp_path, tiny_model_dir):
    config = load_config(pair_job(tmp_path, tiny_model_dir, micro_batch_size=2, grad_accum_steps=2))
    lines = []
    with pytest.raises(ConfigError, match=r"one pair \(chosen \+ rejected sequences\) of 64 tokens does not fit"):
        step_down_until_fits(config, 2**20, 0, lambda micro: None, lines.append)
    assert lines == ["micro_batch_size 2: dry run ran out of memory; trying smaller"]


# --------------------------------------------------------------------------- auto and the CLI


def test_auto_micro_batch_picks_a_number_of_pairs(tmp_path, tiny_model_dir):
    from qlora.job.run import validate_job

    job = pair_job(
        tmp_path,
        tiny_model_dir,
        micro_batch_size="auto",
        grad_accum_steps=1,
        effective_batch_size=12,
        gradient_checkpointing=True,
    )
    config = load_config(job)  # accepted: auto is planned in pairs
    arch = load_architecture(config.model.name_or_path)
    need = {pairs: make_plan(arch, settings_from_job(config, micro_batch=pairs)).total_bytes for pairs in (1, 5, 6)}
    # Checkpointed, the reference's transient is under the recomputed layer's: P pairs need what 2P SFT rows do.
    sft_rows = replace(settings_from_job(config), micro_batch=10, sequences_per_row=1, reference_forward=False)
    assert need[5] == make_plan(arch, sft_rows).total_bytes
    config = load_config(job, [f"train.memory_budget={(need[5] + need[6]) // 2}"])
    lines = []
    validate_job(config, echo=lines.append)
    # 5 pairs fit but do not divide 12: 4 pairs, 3 accumulation steps.
    assert (config.train.micro_batch_size, config.train.grad_accum_steps) == (4, 3)
    assert any(text.startswith("micro_batch_size auto: 4 x grad_accum_steps 3 = 12 pairs per step") for text in lines)
    assert any(text.startswith("ok: 4 micro-batches per epoch") for text in lines)  # 16 pairs, 4 per micro-batch
    with pytest.raises(ConfigError, match=r"even one pair \(chosen \+ rejected sequences\) of data.max_seq_len 64"):
        validate_job(load_config(job, [f"train.memory_budget={need[1] - 1}"]), echo=lambda text: None)


def test_gradient_checkpointing_auto_plans_a_preference_job(tmp_path, tiny_model_dir):
    job = pair_job(tmp_path, tiny_model_dir, memory_budget="1TiB")
    config = load_config(job)
    assert config.train.gradient_checkpointing == "auto"
    lines = []
    choice = resolve_checkpointing(config, read_budget("1TiB"), echo=lines.append)
    assert choice.mode is False and config.train.gradient_checkpointing is False  # planned, no longer forced on
    arch = load_architecture(str(tiny_model_dir))
    pairs = settings_from_job(load_config(job))
    for word, mode in (("false", False), ("selective", "selective"), ("true", True)):
        assert choice.needs[word] == make_plan(arch, replace(pairs, gradient_checkpointing=mode)).total_bytes
    assert lines == [choice.line()] and "the fastest that fits" in lines[0]
    # The pair plan is what the choice weighs: a budget between the dpo needs picks by them.
    llama = load_architecture("llama-3.1-8b")
    dpo = PlanSettings(seq_len=4096, micro_batch=2, **DPO)
    need = {mode: make_plan(llama, replace(dpo, gradient_checkpointing=mode)).total_bytes for mode in MODES}
    from qlora.plan.budget import MemoryBudget
    from qlora.plan.checkpointing_mode import HEADROOM

    between = int((need[True] + need["selective"]) / 2 / (1 - HEADROOM))
    assert choose_checkpointing(llama, dpo, MemoryBudget(between, "test")).mode is True
    sft_same_rows = PlanSettings(seq_len=4096, micro_batch=2)
    assert choose_checkpointing(llama, sft_same_rows, MemoryBudget(between, "test")).mode is not True


def test_qlora_plan_estimates_a_dpo_job_and_says_what_it_assumed(tmp_path, tiny_model_dir, capsys):
    job = pair_job(tmp_path, tiny_model_dir, micro_batch_size=3, gradient_checkpointing=False)
    assert main(["plan", str(job), "--gpu-memory", "1GiB"]) == 0
    text = capsys.readouterr().out
    assert "micro_batch 3 pairs (6 sequences) x seq_len 64" in text
    assert "preference pairs: each is its chosen and rejected sequence" in text and "+ a reference forward" in text
    assert "reference_forward" in text and "FITS in 1.0 GiB" in text
    assert "per training token (both sequences of a pair, and the reference forward)" in text
    assert main(["plan", str(job), "--gpu", "4090", "--json"]) == 0
    dpo = json.loads(capsys.readouterr().out)
    assert (dpo["settings"]["sequences_per_row"], dpo["settings"]["reference_forward"]) == (2, True)
    assert dpo["total_bytes"] == sum(item["bytes"] for item in dpo["breakdown"] if item["counted"])
    assert main(["plan", str(job), "--gpu", "4090", "--json", "--set", "train.objective=orpo"]) == 0
    orpo = json.loads(capsys.readouterr().out)
    assert "reference_forward" not in {item["name"] for item in orpo["breakdown"]}
    assert dpo["flops_per_token"] > orpo["flops_per_token"] and dpo["tokens_per_s"] < orpo["tokens_per_s"]
    assert orpo["suggestions"]["largest_micro_batch"] >= 1
    assert main(["plan", str(job), "--set", "train.objective=orpo"]) == 0
    assert "no reference pass" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_dry_run_of_a_dpo_step_reads_a_peak_that_grows_with_the_pairs(wide_vocab_dir):
    """What only a GPU shows: the allocator's peak around the same preference step."""
    from qlora.training.dry_run import cuda_dry_run_peak

    model = attach_lora(tiny_base(wide_vocab_dir, compute_dtype="bfloat16"), LoraSection(r=8, alpha=16), seed=0)
    resident = torch.cuda.memory_allocated()
    one, four = (
        cuda_dry_run_peak(
            model,
            pairs,
            256,
            2048,
            compute_dtype="bfloat16",
            objective=PreferenceObjective("dpo", reference=model.disable_adapter),
        )
        for pairs in (1, 4)
    )
    assert one is not None and four is not None and resident < one < four
    assert all(parameter.grad is None for parameter in model.parameters())
