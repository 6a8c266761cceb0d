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


def test_fan_in_fan_out_layers_merge_transposed(tmp_path):
    """GPT-2's Conv1D stores its weight as (in, out): peft's delta is (B A)^T there."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from qlora.demo.tokenizer import build_tokenizer

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=320, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    GPT2LMHeadModel(config).save_pretrained(str(tmp_path / "gpt2"), max_shard_size="100KB")
    build_tokenizer().save_pretrained(str(tmp_path / "gpt2"))
    adapter = plain_peft_adapter(
        tmp_path / "gpt2", tmp_path / "adapter", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
    )
    merge_adapter(adapter, tmp_path / "merged", dtype="float32", check=False, **quiet)
    assert_same_tensors(merged_tensors(tmp_path / "merged"), peft_merged(tmp_path / "gpt2", adapter, torch.float32))


def test_a_hub_id_merges_from_its_local_snapshot(sharded_base, tmp_path, monkeypatch):
    """Offline (the tests' HF_HUB_OFFLINE=1), a hub id is its snapshot in the local cache."""
    import shutil

    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-llama"
    shutil.copytree(sharded_base, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # where this test's cache is, not the user's
    adapter = plain_peft_adapter(sharded_base, tmp_path / "adapter", seed=9)
    report = merge_adapter(adapter, tmp_path / "merged", base="tiny-org/tiny-llama", dtype="bfloat16", **quiet)
    assert report.checked and report.max_diff_vs_16bit_adapter < 2e-2
    assert_same_tensors(merged_tensors(tmp_path / "merged"), peft_merged(sharded_base, adapter, torch.bfloat16))

    with pytest.raises(ModelError, match=r"^--base tiny-org/absent: no snapshot in the local cache \(offline\)"):
        merge_adapter(adapter, tmp_path / "other", base="tiny-org/absent", **quiet)
    assert not (tmp_path / "other").exists()


def test_tensor_file_writer_writes_what_safetensors_reads(tmp_path):
    from qlora.adapters.tensor_file import TensorFileWriter

    tensors = {
        "a": torch.randn(3, 5).bfloat16(),
        "steps": torch.tensor(7),
        "ids": torch.arange(6).reshape(2, 3),
        "mask": torch.tensor([True, False]),
    }
    entries = [("a", "BF16", (3, 5)), ("steps", "I64", ()), ("ids", "I64", (2, 3)), ("mask", "BOOL", (2,))]
    with TensorFileWriter(tmp_path / "t.safetensors", entries) as output:
        for name, tensor in tensors.items():
            output.write(name, tensor)
    loaded = load_file(str(tmp_path / "t.safetensors"))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[key], tensors[key]) for key in tensors)
    with pytest.raises(ValueError, match="got a F32 \\[3, 5\\], expected a BF16"):
        with TensorFileWriter(tmp_path / "u.safetensors", entries) as output:
            output.write("a", torch.randn(3, 5))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        # peft saves the head's weight with its LoRA here: refused as a replacement, or else as a second delta
        (
            {"target_modules": ["embed_tokens", "lm_head"]},
            r"ties to model\.embed_tokens\.weight|model\.embed_tokens\.weight twice",
        ),
        (
            {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
            r"replaces lm_head\.weight, which this base ties",
        ),
    ],
)
def test_a_tied_head_changed_apart_from_the_embedding_is_refused(tmp_path, options, message):
    base = build_tiny_model(tmp_path / "base", seed=4, tied=True)
    adapter = plain_peft_adapter(base, tmp_path / "adapter", **options)
    with pytest.raises(ModelError, match=message):
        merge_adapter(adapter, tmp_path / "merged", **quiet)
    assert not (tmp_path / "merged").exists()
