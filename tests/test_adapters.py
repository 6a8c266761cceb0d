"""Adapter loading: switching on one base, interop with plain peft both ways, the compatibility record."""

import hashlib
import json
import warnings

import pytest
import torch

import qlora
from qlora.adapters import MANIFEST_NAME, load_with_adapters, save_adapter, select_adapter
from qlora.cli.main import main
from qlora.errors import EXIT_MODEL, ModelError
from tests.tiny import build_tiny_model
from tests.tiny_adapters import plain_4bit_base, plain_peft_adapter
from tests.tiny_training import batches_fn, build_model, settings, tokenized, train_tiny

INPUT_IDS = torch.tensor([[5, 17, 42, 99, 100, 7, 64, 3]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return plain_peft_adapter(tiny_model_dir, root / "a", seed=1), plain_peft_adapter(
        tiny_model_dir, root / "b", seed=2
    )


def test_switching_adapters_on_one_base_equals_fresh_single_loads(tiny_model_dir, two_adapters):
    first, second = two_adapters
    model, _ = qlora.load(str(tiny_model_dir), bits=4, compute_dtype="float32")
    model = qlora.with_adapter(model, first, name="a")
    model = qlora.with_adapter(model, second, name="b")
    switched = {}
    for name in ("b", None, "a", "b"):  # out of order, and b twice: switching leaves nothing behind
        qlora.select_adapter(model, name)
        switched[name] = logits(model)

    for name, directory in (("a", first), ("b", second), (None, None)):
        fresh, _ = qlora.load(str(tiny_model_dir), bits=4, compute_dtype="float32")
        if directory is not None:
            fresh = qlora.with_adapter(fresh, directory)
        assert torch.equal(switched[name], logits(fresh)), f"adapter {name} differs from a fresh load"
    assert (switched["a"] - switched["b"]).abs().max() > 1e-2
    assert (switched["a"] - switched[None]).abs().max() > 1e-2


def test_adapter_from_plain_peft_loads_with_the_base_it_names(tiny_model_dir, two_adapters):
    first, _ = two_adapters
    assert not (first / MANIFEST_NAME).exists()
    model, _ = load_with_adapters([("a", first)], bits=16, compute_dtype="float32")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32), str(first)
    )
    torch.testing.assert_close(logits(model), logits(plain), rtol=1e-5, atol=1e-5)


def test_our_trained_adapter_loads_in_plain_peft_without_key_warnings_and_gives_our_logits(
    tiny_model_dir, trained_adapter, tmp_path
):
    """Trained a few steps (so B is not zero): plain peft on a plain transformers 4-bit load gives
    the logits of the model that trained it and of our reload; so does a whole job's output folder."""
    from peft import PeftModel

    tokenizer, examples = tokenized(tiny_model_dir, tmp_path)
    model = build_model(tiny_model_dir)
    train_tiny(model, batches_fn(examples, tokenizer.pad_token_id, 4), (), settings(learning_rate=1e-2))
    saved = tmp_path / "adapter"
    save_adapter(model, saved)
    input_ids = torch.tensor([examples[0].input_ids])
    with torch.no_grad():
        in_process = model.eval()(input_ids=input_ids).logits

    def through_plain_peft(folder):
        """(plain peft's logits, our reload's, plain peft's with the adapter off)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plain = PeftModel.from_pretrained(plain_4bit_base(tiny_model_dir), str(folder)).eval()
        assert [str(w.message) for w in caught if "key" in str(w.message).lower()] == [], folder
        reloaded, _ = load_with_adapters([("trained", folder)], compute_dtype="float32")
        with torch.no_grad():
            theirs, ours = plain(input_ids=input_ids).logits, reloaded(input_ids=input_ids).logits
            with plain.disable_adapter():
                return theirs, ours, plain(input_ids=input_ids).logits

    theirs, reloaded, base_only = through_plain_peft(saved)
    torch.testing.assert_close(theirs, in_process, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs, reloaded, rtol=1e-5, atol=1e-5)
    assert (base_only - in_process).abs().max() > 1e-3  # the adapter really changes the output
    theirs, reloaded, base_only = through_plain_peft(trained_adapter)
    torch.testing.assert_close(theirs, reloaded, rtol=1e-5, atol=1e-5)
    assert (base_only - theirs).abs().max() > 1e-3


def test_training_writes_the_compatibility_record(tiny_model_dir, trained_adapter):
    adapter_config = json.loads((trained_adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir)
    assert adapter_config["revision"] is None
    manifest = json.loads((trained_adapter / MANIFEST_NAME).read_text())
    assert manifest["base"]["name_or_path"] == str(tiny_model_dir)
    assert manifest["base"]["shape"]["hidden_size"] == 64 and manifest["base"]["shape"]["model_type"] == "llama"
    assert manifest["base"]["fingerprint"].startswith("sha256:")
    assert manifest["quantization"] == {
        "bits": 4,
        "quant_type": "nf4",
        "double_quant": True,
        "compute_dtype": "float32",
    }
    assert manifest["files"]["adapter_model.safetensors"]["sha256"] == sha256(
        trained_adapter / "adapter_model.safetensors"
    )
    job_dir = trained_adapter.parent
    assert {(record["path"], record["sha256"]) for record in manifest["data"]} == {
        (str(job_dir / name), sha256(job_dir / name)) for name in ("train.jsonl", "eval.jsonl")
    }
    import peft
    import transformers

    assert (
        manifest["versions"]["peft"] == peft.__version__
        and manifest["versions"]["transformers"] == transformers.__version__
    )


@pytest.mark.parametrize(
    ("change", "named"), [(dict(hidden=128), "hidden_size=64"), (dict(layers=3), "num_hidden_layers=2")]
)
def test_a_different_base_is_refused_naming_what_differs(trained_adapter, two_adapters, tmp_path, change, named):
    other = build_tiny_model(tmp_path / "other", **change)
    model, _ = qlora.load(str(other), bits=4, compute_dtype="float32")
    with pytest.raises(ModelError, match=named):
        qlora.with_adapter(model, trained_adapter)
    if "hidden" in change:  # no manifest: the adapter's own weight shapes catch it
        with pytest.raises(
            ModelError, match=r"expects model\.layers\.0\.\S+ with (input|output) size \d+, but this base.s has \d+"
        ):
            qlora.with_adapter(model, two_adapters[0])


def test_cli_refuses_a_mismatched_base_with_exit_code_5(trained_adapter, tmp_path, capsys):
    other = build_tiny_model(tmp_path / "other", hidden=128)
    assert main(["generate", "--adapter", str(trained_adapter), "--base", str(other), "hello"]) == EXIT_MODEL
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        next(line for line in err.splitlines() if "hidden_size=64" in line)
    ]


def test_another_quantization_is_one_warning_line(trained_adapter, capsys):
    assert (
        main(["generate", "--adapter", str(trained_adapter), "--bits", "16", "--max-new-tokens", "2", "reverse abc"])
        == 0
    )
    warnings_printed = [line for line in capsys.readouterr().err.splitlines() if "warning" in line.lower()]
    assert len(warnings_printed) == 1
    assert "trained on a 4-bit nf4 base, now loaded as 16-bit" in warnings_printed[0]


def test_a_manifest_with_an_impossible_quantization_is_one_line_naming_it(trained_adapter, tmp_path, capsys):
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(trained_adapter, copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["quantization"]["bits"] = 3
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert main(["generate", "--adapter", str(copy), "--max-new-tokens", "2", "reverse abc"]) == EXIT_MODEL
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {copy / MANIFEST_NAME}: recorded quantization.bits: Input should be 4 or 8 (got 3)"]


def test_a_disabled_adapter_gives_exactly_the_base(tiny_model_dir, trained_adapter):
    model, _ = load_with_adapters([("trained", trained_adapter)])
    with_adapter = logits(model)
    select_adapter(model, None)
    base, _ = qlora.load(str(tiny_model_dir), bits=4, compute_dtype="float32")
    assert torch.equal(logits(model), logits(base))
    assert (with_adapter - logits(base)).abs().max() > 1e-2  # training moved the adapter away from zero
