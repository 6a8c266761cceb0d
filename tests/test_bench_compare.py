"""bench/compare.py benchmarks where users are (issue 17): its default models have realistic
shapes (>= 32k vocabulary, >= 24 layers, >= 100M parameters, tied and untied heads), its default
runs are ours and TRL's two settings on both, and its flags parse; with --objective dpo, its pairs,
both sides' jobs, and one real step of each on the tiny model scored by the one held-out
function (so the bench cannot rot). No timings here: those are in
BENCHMARKS.md. The shapes are checked on the meta device (no weights), the tokenizer for real.
"""

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import compare  # noqa: E402
from bench.compare_runs import evaluate_adapters, ours_job, run_one  # noqa: E402
from bench.fixture import VARIANTS, build_pairs, chat_rows, preference_rows, variant_config  # noqa: E402
from qlora.demo.tokenizer import build_tokenizer  # noqa: E402
from qlora.plan.architecture import meta_skeleton  # noqa: E402


@pytest.mark.parametrize("variant, tied", [("tied", True), ("untied", False)])
def test_the_default_models_have_realistic_shapes(variant, tied):
    config, tokenizer = variant_config(variant, max_seq_len=256)
    assert config.vocab_size >= 32000 and len(tokenizer) == config.vocab_size
    assert config.num_hidden_layers >= 24 and config.tie_word_embeddings is tied
    model = meta_skeleton(config)
    parameters = sum(parameter.numel() for parameter in model.parameters())  # a tied head counted once
    assert parameters >= 100e6
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
    for size in (config.hidden_size, config.intermediate_size):  # bitsandbytes' CPU 4-bit kernels need it
        assert size % 64 == 0


def test_the_32k_tokenizer_tokenizes_as_the_byte_tokenizer():
    """So a 32k-vocabulary run and the byte-vocabulary row train on the same token ids."""
    _, tokenizer = variant_config("tied")
    byte_tokenizer = build_tokenizer()
    messages = chat_rows(3, seed=4)[2]["messages"]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids == byte_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert max(ids) < len(byte_tokenizer) and tokenizer.eos_token_id == byte_tokenizer.eos_token_id


def test_every_row_fits_max_seq_len_whole():
    byte_tokenizer = build_tokenizer()
    for row in chat_rows(200, seed=1, max_seq_len=128):
        ids = byte_tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
        assert len(ids) < 128


def test_the_default_runs_are_ours_and_both_trl_settings_on_both_heads_then_the_labelled_extras():
    plan = compare.parse_args([]).plan
    for model in ("tied", "untied"):
        for run in ("ours", "trl-default", "trl-best"):
            assert (run, model) in plan
    assert {("ours-float32", "tied"), ("ours", "byte"), ("ours-packing", "tied")} <= set(plan)
    assert set(VARIANTS) == set(compare.MODELS)


def test_bare_runs_take_every_model_and_arch_takes_bare_runs_only(capsys):
    args = compare.parse_args(["--runs", "ours", "trl-best@untied", "--models", "tied", "byte"])
    assert args.plan == [("ours", "tied"), ("ours", "byte"), ("trl-best", "untied")]
    assert compare.parse_args(["--arch", "llama-3.1-8b"]).plan == [
        ("ours", "llama-3.1-8b"),
        ("trl-default", "llama-3.1-8b"),
        ("trl-best", "llama-3.1-8b"),
    ]
    for bad in (["--runs", "ours@huge"], ["--runs", "theirs"], ["--arch", "llama-3.1-8b", "--runs", "ours@tied"]):
        with pytest.raises(SystemExit):
            compare.parse_args(bad)
        assert bad[-1].split("@")[-1] in capsys.readouterr().err


def test_our_job_file_leaves_the_project_defaults_alone():
    """What `ours` measures is what a user gets: the job writes no default it could get wrong."""
    settings = compare.settings_of(compare.parse_args([]))
    fixture = {"model": "m", "train": "t.jsonl"}
    job = ours_job(settings, fixture, {}, Path("out"))
    assert settings["compute_dtype"] == "bfloat16"
    for key in ("gradient_checkpointing", "loss_chunk_tokens"):
        assert key not in job["train"]
    for key in ("train_on", "padding_free", "packing", "too_long"):
        assert key not in job["data"]
    packed = ours_job(settings, fixture, {"data": {"packing": True}}, Path("out"))
    assert packed["data"]["packing"] is True and packed["train"]["epochs"] == 1 and packed["train"]["max_steps"] is None


# --objective dpo: the same machinery against TRL's DPOTrainer (BENCHMARKS.md "DPO: ours vs TRL").


def dpo_args(*flags):
    return compare.parse_args(["--objective", "dpo", *flags])


def test_the_dpo_default_runs_are_ours_and_trl_default_on_both_heads_with_short_rows(capsys):
    args = dpo_args()
    assert args.plan == [("ours", "tied"), ("trl-default", "tied"), ("ours", "untied"), ("trl-default", "untied")]
    for name, value in compare.DPO_DEFAULTS.items():
        assert getattr(args, name) == value
    assert dpo_args("--steps", "3").steps == 3  # a flag given beats the dpo default
    assert compare.parse_args([]).steps == 12  # sft's defaults are untouched
    settings = compare.settings_of(args)
    assert settings["objective"] == "dpo" and settings["dpo_beta"] == 0.1 and settings["compute_dtype"] == "bfloat16"
    for bad in ("trl-best", "ours-packing"):  # TRL 1.16's DPO has no padding-free; dpo pairs are not packed
        with pytest.raises(SystemExit):
            dpo_args("--runs", bad)
        assert bad in capsys.readouterr().err


def test_every_preference_pair_fits_whole_and_differs_in_the_answer_alone(tmp_path):
    from qlora import data
    from qlora.data.pairs import tokenize_pairs

    args = dpo_args()
    rows = preference_rows(64, seed=1, max_words=args.max_words, max_seq_len=args.max_seq_len)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    read = data.read_rows([(str(path), "preference")], objective="dpo")  # every row validated
    tokenized = tokenize_pairs(read, build_tokenizer(), args.max_seq_len, "drop")
    assert len(tokenized.examples) == 64  # none dropped: TRL's max_length cuts nothing either
    for row, pair in zip(rows, tokenized.examples):
        assert row["chosen"][0]["content"] == row["rejected"][0]["content"].upper() != row["rejected"][0]["content"]
        assert len(pair.chosen.input_ids) == len(pair.rejected.input_ids)  # a pair's two sides cost the same


def dpo_fixture(folder, model_dir):
    paths = build_pairs(folder, train_rows=4, eval_rows=3, max_seq_len=128, max_words=4)
    return {"model": str(model_dir), **paths}


def test_our_dpo_job_is_a_valid_dpo_job_that_leaves_the_defaults_alone(tmp_path, tiny_model_dir):
    import yaml

    from qlora.config import load_config

    settings = compare.settings_of(dpo_args())
    job = ours_job(settings, dpo_fixture(tmp_path, tiny_model_dir), {}, tmp_path / "out")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    config = load_config(tmp_path / "job.yaml")  # the schema's checks, dpo's limits included
    assert (config.train.objective, config.data.format, config.train.dpo_beta) == ("dpo", "preference", 0.1)
    for key in ("gradient_checkpointing", "loss_chunk_tokens", "dpo_loss", "dpo_label_smoothing"):
        assert key not in job["train"]
    assert job["lora"]["dropout"] == 0.0


def test_trls_dpo_config_takes_the_shared_settings_and_its_defaults_for_the_rest(tmp_path):
    pytest.importorskip("trl")
    from bench.peer_trl import dpo_config

    settings = compare.settings_of(dpo_args("--dpo-beta", "0.2"))
    config = dpo_config(settings, str(tmp_path))
    assert (config.beta, config.max_length, config.learning_rate) == (0.2, 128, settings["learning_rate"])
    assert (config.max_steps, config.per_device_train_batch_size, config.gradient_accumulation_steps) == (8, 2, 2)
    assert config.bf16 and config.optim == "adamw_torch" and config.seed == 0
    assert config.loss_type == ["sigmoid"] and config.gradient_checkpointing and config.disable_dropout
    assert not config.padding_free and not config.precompute_ref_log_probs


def test_both_sides_train_and_one_function_scores_every_adapter(tmp_path, tiny_model_dir):
    """One DPO step of ours and of TRL on the tiny model, then the held-out metric: an untrained
    adapter is its own reference (DPO loss ln 2, no pair preferred); trained ones move off it."""
    pytest.importorskip("trl")
    from qlora.adapters import attach_lora
    from qlora.adapters.lora import save_adapter
    from qlora.config import LoraSection
    from tests.tiny_training import tiny_base

    settings = compare.settings_of(dpo_args("--steps", "1", "--batch", "2", "--micro-batch", "1"))
    fixture = dpo_fixture(tmp_path, tiny_model_dir)
    untrained = tmp_path / "untrained"
    save_adapter(attach_lora(tiny_base(tiny_model_dir), LoraSection(r=8, alpha=16), seed=0), untrained)
    dirs = {"untrained": untrained}
    for run in ("ours", "trl-default"):
        dirs[run] = tmp_path / run
        record = run_one(run, settings, fixture, dirs[run])
        assert record["optimizer_steps"] == 1 and record["supervised_tokens"] > 0
        assert 0.0 <= record["final_train_accuracy"] <= 1.0
    scores = evaluate_adapters(settings, fixture, "bfloat16", [str(path) for path in dirs.values()])
    scored = {name: scores[str(path)] for name, path in dirs.items()}
    assert scored["untrained"]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert scored["untrained"]["eval_accuracy"] == 0.0 and scored["untrained"]["eval_margin"] == 0.0
    for run in ("ours", "trl-default"):
        assert scored[run]["eval_pairs"] == 3 and scored[run]["eval_loss"] != pytest.approx(math.log(2), abs=1e-6)
