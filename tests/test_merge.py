"""Merging into a 16-bit base: same logits as base + adapter, a folder plain transformers loads."""

import json

import pytest
import torch

from qlora.adapters import load_with_adapters
from qlora.adapters.merge import MERGE_RECORD, merge_adapter
from qlora.cli.main import main
from qlora.errors import EXIT_CONFIG, EXIT_OUTPUT, OutputError
from tests.tiny_adapters import plain_peft_adapter

PROMPTS = ("reverse abcdef", "hello world")
# bf16 keeps 8 bits of mantissa: merged weights are rounded once, so logits move by a few 1e-3.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


def prompt_logits(model, tokenizer):
    with torch.no_grad():
        return [model(input_ids=torch.tensor([tokenizer(prompt)["input_ids"]])).logits.float() for prompt in PROMPTS]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merged_folder_loads_in_plain_transformers_with_the_adapters_logits(tiny_model_dir, tmp_path, dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = plain_peft_adapter(tiny_model_dir, tmp_path / "adapter", seed=3)
    report = merge_adapter(
        adapter, tmp_path / "merged", dtype=dtype, max_shard_size="100KB", prompts=PROMPTS, echo=lambda line: None
    )

    merged_dir = tmp_path / "merged"
    assert report.shards > 1 and (merged_dir / "model.safetensors.index.json").is_file()
    index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == report.shards
    assert report.max_diff_vs_16bit_adapter < TOLERANCE[dtype]
    assert report.max_diff_vs_nf4_adapter > report.max_diff_vs_16bit_adapter  # NF4's own rounding

    dtype_ = getattr(torch, dtype)
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    assert merged.dtype == dtype_
    assert not any("lora" in name for name, _ in merged.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=dtype_), str(adapter)
    )
    base_only = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=dtype_)
    for ours, theirs, bare in zip(
        prompt_logits(merged, tokenizer), prompt_logits(reference, tokenizer), prompt_logits(base_only, tokenizer)
    ):
        torch.testing.assert_close(ours, theirs, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
        assert (ours - bare).abs().max() > 10 * TOLERANCE[dtype]  # the adapter is really in there


def test_through_nf4_matches_what_training_saw(trained_adapter, tmp_path):
    plain = merge_adapter(trained_adapter, tmp_path / "plain", dtype="float32", prompts=PROMPTS, echo=lambda line: None)
    through = merge_adapter(
        trained_adapter,
        tmp_path / "through",
        dtype="float32",
        through_nf4=True,
        prompts=PROMPTS,
        echo=lambda line: None,
    )
    # Trained on NF4 with float32 compute: the round-tripped merge reproduces training's model.
    assert through.max_diff_vs_nf4_adapter < 1e-4
    assert plain.max_diff_vs_16bit_adapter < 1e-4
    # ...and each choice pays the NF4 error against the other reference.
    assert plain.max_diff_vs_nf4_adapter > 100 * through.max_diff_vs_nf4_adapter
    assert through.max_diff_vs_16bit_adapter > 100 * plain.max_diff_vs_16bit_adapter
    record = json.loads((tmp_path / "through" / MERGE_RECORD).read_text())
    assert record["through_nf4"] is True and record["max_diff_vs_nf4_adapter"] == through.max_diff_vs_nf4_adapter


def test_unmerge_restores_the_base_weights(trained_adapter):
    model, _ = load_with_adapters([("trained", trained_adapter)], bits=16, compute_dtype="float32")
    weights = {name: parameter.detach().clone() for name, parameter in model.named_parameters() if "base_layer" in name}
    model.merge_adapter()
    moved = max(
        (parameter - weights[name]).abs().max().item()
        for name, parameter in model.named_parameters()
        if name in weights
    )
    assert moved > 1e-3
    model.unmerge_adapter()
    for name, parameter in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(parameter, weights[name], rtol=0, atol=1e-6)


def test_merge_never_overwrites(trained_adapter, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists"):
        merge_adapter(trained_adapter, taken, echo=lambda line: None)
    assert main(["merge", "--adapter", str(trained_adapter), "--out", str(taken)]) == EXIT_OUTPUT
    assert (taken / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--dtype", "int8"], "--dtype: 'int8' is not one of"), (["--max-shard-size", "big"], "--max-shard-size: 'big'")],
)
def test_merge_bad_flags_exit_2(trained_adapter, tmp_path, capsys, flags, message):
    assert main(["merge", "--adapter", str(trained_adapter), "--out", str(tmp_path / "m"), *flags]) == EXIT_CONFIG
    assert message in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_merge_command_reports_both_divergences(trained_adapter, tmp_path, capsys):
    assert (
        main(
            [
                "merge",
                "--adapter",
                str(trained_adapter),
                "--out",
                str(tmp_path / "m"),
                "--through-nf4",
                "--dtype",
                "float32",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["through_nf4"] and report["shards"] == 1
    assert report["max_diff_vs_nf4_adapter"] < 1e-4 < report["max_diff_vs_16bit_adapter"] < report["max_abs_logit"]
