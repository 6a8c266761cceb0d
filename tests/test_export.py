"""`qlora export`: the GGUF read back by readers we did not write (transformers' GGUF loader,
llama.cpp's gguf reader), the Ollama folder, and bad input refused before anything is written."""

import json

import pytest
import torch

from qlora.cli.main import main
from qlora.errors import EXIT_CONFIG, EXIT_MODEL, EXIT_OUTPUT
from tests.tiny_adapters import peft_merged, plain_peft_adapter
from tests.tiny_families import PROMPTS, build_family_model

# max |logit difference| / largest |logit|, GGUF read back vs the float32 peft merge. f16 and bf16
# round each merged weight once (bf16 keeps 8 bits of mantissa, f16 11); q8_0 keeps 8 bits per
# weight with one scale per block of 32. Measured on these tiny models: f16 ~1e-3, bf16 ~1e-2, q8_0 ~2e-2.
RELATIVE_TOLERANCE = {"f16": 5e-3, "bf16": 4e-2, "q8_0": 8e-2}


def gguf_model_and_tokenizer(path, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32, **kwargs)
    return model.eval(), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def relative_difference(first, second, tokenizer, texts=PROMPTS) -> float:
    worst = 0.0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            expected, actual = first(input_ids=ids).logits, second(input_ids=ids).logits
            worst = max(worst, ((actual - expected).abs().max() / expected.abs().max()).item())
    return worst


def gguf_fields(path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {
        name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.ggml.t")
    }
    fields["tensors"] = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    return fields


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_exported_gguf_read_back_by_transformers_gives_the_merged_logits_and_token_ids(
    trained_adapter, tiny_model_dir, tmp_path, capsys, dtype
):
    out = tmp_path / "model.gguf"
    assert main(["export", "--adapter", str(trained_adapter), "--out", str(out), "--dtype", dtype, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checked"] and report["same_token_ids"] and report["bytes"] == out.stat().st_size
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.gguf"]  # no staging or temp file left

    model, tokenizer = gguf_model_and_tokenizer(out)
    reference = peft_merged(tiny_model_dir, trained_adapter)
    from transformers import AutoTokenizer

    trained_tokenizer = AutoTokenizer.from_pretrained(str(trained_adapter))
    chat = trained_tokenizer.apply_chat_template(
        [{"role": "user", "content": "reverse abc"}], tokenize=False, add_generation_prompt=True
    )
    for text in (*PROMPTS, chat):
        assert tokenizer(text)["input_ids"] == trained_tokenizer(text)["input_ids"]
    assert tokenizer.chat_template == trained_tokenizer.chat_template
    assert relative_difference(reference, model, trained_tokenizer) < RELATIVE_TOLERANCE[dtype]

    fields = gguf_fields(out)
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.model"] == "gpt2"
    matrix_type = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[dtype]
    assert fields["tensors"]["blk.0.attn_q.weight"] == matrix_type and fields["tensors"]["output_norm.weight"] == "F32"


@pytest.mark.parametrize("family", ["llama3", "qwen2", "mistral"])
def test_each_shipped_family_exports_with_its_tokenizer_kind(tmp_path, family):
    from transformers import AutoTokenizer

    from qlora.adapters.export import export_adapter

    base = build_family_model(tmp_path / "base", family)
    adapter = plain_peft_adapter(base, tmp_path / "adapter")
    out = tmp_path / "model.gguf"
    report = export_adapter(adapter, out, dtype="f16", echo=lambda line: None)
    assert report.checked and report.same_token_ids

    fields = gguf_fields(out)
    tensors = fields["tensors"]
    expected = {
        "llama3": ("llama", "gpt2", "llama-bpe"),
        "qwen2": ("qwen2", "gpt2", "qwen2"),
        "mistral": ("llama", "llama", None),
    }[family]
    assert (
        fields["general.architecture"],
        fields["tokenizer.ggml.model"],
        fields.get("tokenizer.ggml.pre"),
    ) == expected
    assert ("rope_freqs.weight" in tensors) == (family == "llama3")  # Llama 3.1's rope scaling, as llama.cpp reads it
    assert ("blk.0.attn_q.bias" in tensors) == (family == "qwen2")
    assert ("output.weight" in tensors) == (family != "qwen2")  # Qwen2 here ties the head to the embedding

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    # transformers' GGUF reader drops llama3 rope scaling (llama.cpp applies it): compare weights under the config.
    config = {"config": peft_merged(base, adapter).config} if family == "llama3" else {}
    model, gguf_tokenizer = gguf_model_and_tokenizer(out, **config)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "héllo 123"}], tokenize=False, add_generation_prompt=True
    )
    for text in (*PROMPTS, chat):
        assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert relative_difference(peft_merged(base, adapter), model, tokenizer) < RELATIVE_TOLERANCE["f16"]


def test_ollama_folder_holds_the_gguf_and_a_modelfile_whose_template_renders_as_the_chat_template(
    trained_adapter, tmp_path, capsys
):
    from transformers import AutoTokenizer

    from qlora.adapters.ollama import chat_template_pieces, render_pieces

    out = tmp_path / "ollama"
    assert (
        main(
            [
                "export",
                "--adapter",
                str(trained_adapter),
                "--out",
                str(out),
                "--format",
                "ollama",
                "--name",
                "Tiny Demo",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"ollama create tiny-demo -f {out.resolve() / 'Modelfile'}" in printed
    assert sorted(path.name for path in out.iterdir()) == ["Modelfile", "qlora_export.json", "tiny-demo.gguf"]
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny-demo.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "PARAMETER temperature 0" in modelfile
    assert '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in modelfile
    assert json.loads((out / "qlora_export.json").read_text())["ollama_command"].startswith("ollama create tiny-demo")

    tokenizer = AutoTokenizer.from_pretrained(str(trained_adapter))
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "reverse abc"},
        {"role": "assistant", "content": "cba"},
        {"role": "user", "content": "reverse xy"},
    ]
    pieces = chat_template_pieces(tokenizer)
    assert render_pieces(pieces, conversation) == tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True
    )


@pytest.mark.parametrize(
    ("family", "opening", "default_system"),
    [("llama3", "<|begin_of_text|>", ""), ("qwen2", "", ""), ("mistral", None, None)],
)
def test_chat_template_pieces_per_family(tmp_path, family, opening, default_system):
    """Llama 3 opens with BOS; ChatML opens with nothing; the Mistral template drops system messages,
    which per-role pieces cannot express, so it gets no TEMPLATE line (Ollama reads the GGUF's)."""
    from transformers import AutoTokenizer

    from qlora.adapters.ollama import chat_template_pieces, pieces_reproduce_template

    tokenizer = AutoTokenizer.from_pretrained(str(build_family_model(tmp_path / family, family)))
    pieces = chat_template_pieces(tokenizer)
    if opening is None:
        assert pieces is None or not pieces_reproduce_template(tokenizer, pieces)
        return
    assert (pieces.opening, pieces.default_system) == (opening, default_system)
    assert pieces_reproduce_template(tokenizer, pieces)


def test_default_system_prompt_is_written_only_without_a_system_message():
    from qlora.adapters.ollama import TemplatePieces, go_template, render_pieces

    pieces = TemplatePieces(
        opening="<s>",
        default_system="[SYS]You are helpful.[/SYS]",
        wraps={"system": ("[SYS]", "[/SYS]"), "user": ("[U]", "[/U]"), "assistant": ("[A]", "[/A]")},
        generation_prompt="[A]",
    )
    assert render_pieces(pieces, [{"role": "user", "content": "hi"}]) == "<s>[SYS]You are helpful.[/SYS][U]hi[/U][A]"
    with_system = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]
    assert render_pieces(pieces, with_system) == "<s>[SYS]Be terse.[/SYS][U]hi[/U][A]"
    template = go_template(pieces)
    assert template.startswith('<s>{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}[SYS]You are')
    assert template.endswith("{{ end }}{{ end }}[A]")


def test_bad_export_requests_fail_in_one_line_before_anything_is_written(trained_adapter, tmp_path, capsys):
    from transformers import Phi3Config

    def refused(flags, code, message):
        before = sorted(tmp_path.iterdir())
        assert main(["export", "--adapter", str(trained_adapter), *flags]) == code
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert sorted(tmp_path.iterdir()) == before

    refused(
        ["--out", str(tmp_path / "m.gguf"), "--dtype", "q4_k"],
        EXIT_CONFIG,
        "--dtype: 'q4_k' is not one of f16, bf16, q8_0",
    )
    refused(["--out", str(tmp_path / "m.gguf"), "--format", "onnx"], EXIT_CONFIG, "--format: 'onnx' is not one of")
    refused(["--out", str(tmp_path / "m.bin")], EXIT_CONFIG, "should be a FILE.gguf")
    taken = tmp_path / "taken.gguf"
    taken.write_text("mine")
    refused(["--out", str(taken)], EXIT_OUTPUT, "already exists")
    assert taken.read_text() == "mine"
    refused(["--out", str(tmp_path / "missing" / "m.gguf")], EXIT_OUTPUT, "does not exist")

    phi = tmp_path / "phi3"
    Phi3Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=4).save_pretrained(str(phi))
    refused(
        ["--out", str(tmp_path / "m.gguf"), "--base", str(phi)], EXIT_CONFIG, "architecture 'phi3' is not exportable"
    )

    orphan = tmp_path / "orphan"
    orphan.mkdir()
    config = json.loads((trained_adapter / "adapter_config.json").read_text())
    (orphan / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/gone/base"}))
    (orphan / "adapter_model.safetensors").write_bytes((trained_adapter / "adapter_model.safetensors").read_bytes())
    assert main(["export", "--adapter", str(orphan), "--out", str(tmp_path / "o.gguf")]) == EXIT_MODEL
    assert "/gone/base, which is not found here; pass --base" in capsys.readouterr().err
    assert not (tmp_path / "o.gguf").exists()


def test_a_disk_too_small_is_refused_before_the_merge_and_one_that_fills_leaves_nothing(trained_adapter, tmpfs, capsys):
    # The tiny model's merge is ~244 KB (225 KiB of 16-bit weights), its GGUF ~232 KiB.
    too_small = tmpfs("350k")  # holds the merge, not the merge and its GGUF: refused from the headers
    assert main(["export", "--adapter", str(trained_adapter), "--out", str(too_small / "m.gguf")]) == EXIT_OUTPUT
    assert "has 352.0 KiB free; the export needs about" in capsys.readouterr().err
    assert list(too_small.iterdir()) == []
    # Room for the estimate (weights only), not for the tokenizer and config files beside them: the
    # disk fills while the GGUF is written.
    filling = tmpfs("472k")
    out = filling / "model.gguf"
    assert main(["export", "--adapter", str(trained_adapter), "--out", str(out), "--dtype", "bf16"]) == EXIT_OUTPUT
    err = capsys.readouterr().err
    assert "filled up during the export" in err and "nothing was written" in err
    assert list(filling.iterdir()) == []


@pytest.mark.parametrize(
    ("changes", "served", "reason", "flag"),
    [
        ({}, True, None, None),
        ({"r": 64, "lora_alpha": 128}, True, None, "--max-lora-rank 64"),
        ({"r": 24}, True, None, "--max-lora-rank 32"),
        ({"r": 1024}, False, "rank 1024: over vLLM's largest --max-lora-rank 512", None),
        ({"rank_pattern": {"q_proj": 128}}, True, None, "--max-lora-rank 128"),
        ({"use_dora": True}, False, "DoRA (use_dora)", None),
        ({"modules_to_save": ["lm_head"]}, False, "modules_to_save ['lm_head']", None),
        ({"bias": "lora_only"}, False, "bias 'lora_only'", None),
        ({"target_modules": ["q_proj", "embed_tokens"]}, False, "LoRA on embed_tokens", None),
        ({"target_modules": ["q_proj", "lm_head"]}, False, "LoRA on lm_head", None),
        ({"use_rslora": True}, True, None, None),
    ],
)
def test_vllm_verdict_follows_vllms_lora_rules(trained_adapter, changes, served, reason, flag):
    from qlora.adapters.vllm_check import vllm_verdict

    config = {**json.loads((trained_adapter / "adapter_config.json").read_text()), **changes}
    verdict = vllm_verdict(config, trained_adapter, name="tiny")
    assert verdict.served == served
    if served:
        assert verdict.command.startswith(f"vllm serve {config['base_model_name_or_path']} --enable-lora ")
        assert f"--lora-modules tiny={trained_adapter.resolve()}" in verdict.command
        assert (flag in verdict.command) if flag else "--max-lora-rank" not in verdict.command
    else:
        assert any(reason in line for line in verdict.reasons) and not verdict.command


def test_inspect_says_how_vllm_serves_the_adapter(trained_adapter, capsys):
    assert main(["inspect", str(trained_adapter)]) == 0
    printed = capsys.readouterr().out
    assert "vLLM: served by its LoRA path" in printed and "--enable-lora --lora-modules out=" in printed
    assert main(["inspect", str(trained_adapter), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["vllm"]["served"] is True
