"""bench/compare.py benchmarks where users are (issue 17): its default models have realistic
shapes (>= 32k vocabulary, >= 24 layers, >= 100M parameters, tied and untied heads), its default
runs are ours and TRL's two settings on both, and its flags parse. No timings here: those are in
BENCHMARKS.md. The shapes are checked on the meta device (no weights), the tokenizer for real.
"""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import compare  # noqa: E402
from bench.compare_runs import ours_job  # noqa: E402
from bench.fixture import VARIANTS, chat_rows, variant_config  # noqa: E402
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
