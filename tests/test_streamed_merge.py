"""The streamed merge: a sharded base merged file by file gives peft's merge_and_unload, bit for bit."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora.adapters.merge import merge_adapter
from qlora.cli.main import main
from qlora.errors import EXIT_MODEL, ModelError
from tests.tiny import build_tiny_model
from tests.tiny_adapters import plain_peft_adapter

PROMPTS = ("reverse abcdef", "hello world")
quiet = {"echo": lambda line: None}


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory):
    """The tiny Llama saved as hub checkpoints are: bfloat16, in 100KB shards (>= 3 files) + index."""
    return build_tiny_model(tmp_path_factory.mktemp("sharded"), seed=5, shard_size="100KB", dtype="bfloat16")


def merged_tensors(folder):
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def peft_merged(base_dir, adapter, dtype):
    """Today's merge: the whole base loaded in `dtype`, peft's merge_and_unload."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype), str(adapter))
    return model.merge_and_unload().state_dict()


def assert_same_tensors(ours: dict, theirs: dict):
    stored = set(theirs) & set(ours)
    assert stored and set(ours) <= set(theirs)
    assert set(theirs) - stored <= {"lm_head.weight"}  # a tied head is stored once, as the embedding
    for key in stored:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), (
            f"{key}: max diff {(ours[key].float() - theirs[key].float()).abs().max()}"
        )


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float16"])
def test_streamed_merge_equals_peft_merge_and_unload_exactly(sharded_base, tmp_path, dtype):
    # rslora and per-module rank / alpha patterns: the scale must be peft's for every module.
    adapter = plain_peft_adapter(
        sharded_base,
        tmp_path / "adapter",
        seed=7,
        r=8,
        alpha=16,
        use_rslora=True,
        rank_pattern={"down_proj": 4},
        alpha_pattern={"q_proj": 3},
    )
    report = merge_adapter(adapter, tmp_path / "merged", dtype=dtype, max_shard_size="100KB", check=False, **quiet)
    assert report.shards >= 3 and not report.checked and report.max_diff_vs_16bit_adapter is None
    assert_same_tensors(merged_tensors(tmp_path / "merged"), peft_merged(sharded_base, adapter, getattr(torch, dtype)))


def test_sharded_merge_loads_in_plain_transformers_with_the_adapters_logits(sharded_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = plain_peft_adapter(sharded_base, tmp_path / "adapter", seed=3)
    report = merge_adapter(
        adapter, tmp_path / "merged", dtype="float32", max_shard_size="100KB", prompts=PROMPTS, **quiet
    )
    merged_dir = tmp_path / "merged"

    assert report.checked and report.shards >= 3  # small base: the check runs by default
    assert report.max_diff_vs_16bit_adapter < 1e-4 < report.max_diff_vs_nf4_adapter < report.max_abs_logit
    index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == report.shards
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= {path.name for path in merged_dir.iterdir()}
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["dtype"] == "float32" and config["use_cache"] is True

    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    assert merged.dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(sharded_base), dtype=torch.float32), str(adapter)
    )
    bare = AutoModelForCausalLM.from_pretrained(str(sharded_base), dtype=torch.float32)
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            ours, theirs = merged(input_ids=ids).logits, reference(input_ids=ids).logits
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
            assert (ours - bare(input_ids=ids).logits).abs().max() > 1e-2  # the adapter is really in there


def test_full_tensors_and_embedding_lora_are_merged_as_peft_does(tmp_path):
    """modules_to_save (the head, copied whole) and LoRA on the embedding ((B A)^T, rounded first)."""
    base = build_tiny_model(tmp_path / "base", seed=2, shard_size="100KB", dtype="bfloat16")
    adapter = plain_peft_adapter(
        base, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"]
    )
    merge_adapter(adapter, tmp_path / "merged", dtype="bfloat16", check=False, **quiet)
    ours, theirs = merged_tensors(tmp_path / "merged"), peft_merged(base, adapter, torch.bfloat16)
    assert_same_tensors(ours, theirs)
    assert not torch.equal(ours["lm_head.weight"], merged_tensors(base)["lm_head.weight"])  # the trained copy


def test_tied_head_lora_lands_in_the_stored_embedding(tmp_path):
    base = build_tiny_model(tmp_path / "base", seed=4, tied=True, shard_size="100KB", dtype="bfloat16")
    adapter = plain_peft_adapter(base, tmp_path / "adapter", target_modules=["embed_tokens", "o_proj"])
    merge_adapter(adapter, tmp_path / "merged", dtype="bfloat16", check=False, **quiet)
    ours = merged_tensors(tmp_path / "merged")
    assert "lm_head.weight" not in ours
    assert_same_tensors(ours, peft_merged(base, adapter, torch.bfloat16))


def test_checkpoint_without_the_model_prefix_merges(tmp_path):
    """Some checkpoints store `layers.0...` where the model's modules are `model.layers.0...`."""
    base = build_tiny_model(tmp_path / "base", seed=6)
    adapter = plain_peft_adapter(base, tmp_path / "adapter")
    reference = peft_merged(base, adapter, torch.float32)
    tensors = load_file(str(base / "model.safetensors"))
    stripped = {key.removeprefix("model."): value for key, value in tensors.items()}
    save_file(stripped, str(base / "model.safetensors"), metadata={"format": "pt"})
    merge_adapter(adapter, tmp_path / "merged", dtype="float32", check=False, **quiet)
    ours = merged_tensors(tmp_path / "merged")
    assert set(ours) == set(stripped)
    assert all(torch.equal(ours[key.removeprefix("model.")], value) for key, value in reference.items())


def test_adapter_for_a_module_the_base_lacks_fails_in_one_line_before_writing(sharded_base, tmp_path, capsys):
    deeper = build_tiny_model(tmp_path / "deeper", layers=3)
    adapter = plain_peft_adapter(deeper, tmp_path / "adapter")
    with pytest.raises(ModelError, match=r"targets model\.layers\.2\.\S+, which this base does not have") as error:
        merge_adapter(adapter, tmp_path / "merged", base=str(sharded_base), **quiet)
    assert "\n" not in str(error.value)
    capsys.readouterr()  # the fixtures' progress bars
    assert main(["merge", "--adapter", str(adapter), "--base", str(sharded_base), "--out", str(tmp_path / "m")]) == (
        EXIT_MODEL
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "which this base does not have" in err[0]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter", "deeper"]  # no output, no staging


def test_dora_is_refused_by_name(sharded_base, tmp_path):
    adapter = plain_peft_adapter(sharded_base, tmp_path / "adapter", use_dora=True)
    with pytest.raises(ModelError, match=r"use_dora=True is not plain LoRA"):
        merge_adapter(adapter, tmp_path / "merged", **quiet)
    assert not (tmp_path / "merged").exists()


def test_merge_cli_check_flag(sharded_base, tmp_path, capsys):
    adapter = plain_peft_adapter(sharded_base, tmp_path / "adapter")
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "m"), "--no-check", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checked"] is False and report["max_diff_vs_16bit_adapter"] is None
    # Under the default 5GB, the output keeps the base's shards: one read, one written, at a time.
    assert report["shards"] == len(list(sharded_base.glob("*.safetensors"))) >= 3
