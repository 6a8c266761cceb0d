"""`qlora generate`, `qlora eval`, `qlora inspect`: outputs, determinism, one-line errors, exit codes."""

import json
import math

import pytest
import torch

from qlora.adapters.spectra import inspect_adapter
from qlora.cli.main import main
from qlora.errors import EXIT_CONFIG, EXIT_DATA
from tests.tiny import chat_row
from tests.tiny_adapters import plain_peft_adapter


def run(capsys, *args):
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def second_adapter(tiny_model_dir, tmp_path_factory):
    return plain_peft_adapter(tiny_model_dir, tmp_path_factory.mktemp("second") / "b", seed=5, spread=0.2)


def test_generate_is_deterministic_greedy_and_with_a_seed(trained_adapter, capsys):
    common = ["generate", "--adapter", trained_adapter, "--max-new-tokens", 12]
    greedy = [run(capsys, *common, "reverse abcd") for _ in range(2)]
    assert greedy[0][0] == 0 and greedy[0][1].strip() and greedy[0][1] == greedy[1][1]
    sampled = [run(capsys, *common, "--temperature", 1.0, "--seed", seed, "reverse abcd")[1] for seed in (3, 3, 4)]
    assert sampled[0] == sampled[1]
    assert sampled[0] != sampled[2]  # the seed is really used: another seed, another sample


def test_generate_file_switches_adapters_per_row(trained_adapter, second_adapter, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "reverse abc", "id": 1},
        {"prompt": "reverse abc", "adapter": "b"},
        {"prompt": "reverse abc", "adapter": "base", "expected": "cba"},
    ]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    adapters = ["--adapter", f"ours={trained_adapter}", "--adapter", f"b={second_adapter}", "--max-new-tokens", 8]
    code, out, _ = run(capsys, "generate", *adapters, "--file", prompts)
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [record["adapter"] for record in records] == ["ours", "b", "base"]
    assert records[0]["id"] == 1 and records[2]["expected"] == "cba" and isinstance(records[2]["match"], bool)
    # Each row equals a single-prompt run with that adapter chosen by --use.
    for record in records:
        _, single, _ = run(capsys, "generate", *adapters, "--use", record["adapter"], "reverse abc")
        assert single.rstrip("\n") == record["output"]
    assert len({record["output"] for record in records}) == 3


def test_chat_prompts_are_rendered_like_training_prompts(trained_adapter, capsys):
    from qlora import data
    from qlora.adapters.generation import prompt_ids
    from qlora.adapters.loading import saved_tokenizer

    tokenizer = saved_tokenizer(str(trained_adapter))
    row = data.Row(source="x", line=1, format="chat", fields=chat_row("reverse abc", "cba"))
    assert prompt_ids(tokenizer, "reverse abc", chat=True) == data.prompt_and_answer(row, tokenizer)[0]
    assert prompt_ids(tokenizer, "reverse abc", chat=False) != prompt_ids(tokenizer, "reverse abc", chat=True)
    code, out, _ = run(capsys, "generate", "--adapter", trained_adapter, "--chat", "--max-new-tokens", 6, "reverse abc")
    assert code == 0 and out.endswith("\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--use", "nope", "hi"], "--use nope: not one of"),
        (["--temperature", "-1", "hi"], "--temperature"),
        (["--max-new-tokens", "0", "hi"], "--max-new-tokens"),
        ([], "give a prompt or --file"),
        (["--file", "x.jsonl", "hi"], "not both"),
    ],
)
def test_generate_bad_flags_exit_2_before_loading(trained_adapter, capsys, args, message):
    code, _, err = run(capsys, "generate", "--adapter", trained_adapter, *args)
    assert code == EXIT_CONFIG and message in error_line(err)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "a"}', '{"prompt": 3}'], "prompts.jsonl:2: 'prompt' must be a string"),
        (['{"prompt": "a"}', "", '{"text": "a"}'], "prompts.jsonl:3: unknown key 'text'"),
        (['{"prompt": "a", "adapter": "zzz"}'], "prompts.jsonl:1: adapter 'zzz' is not loaded"),
        (["not json"], "prompts.jsonl:1: not valid JSON"),
    ],
)
def test_generate_bad_prompt_file_exit_3_naming_the_line(trained_adapter, tmp_path, capsys, lines, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    code, out, err = run(capsys, "generate", "--adapter", trained_adapter, "--file", prompts)
    assert code == EXIT_DATA and message in error_line(err) and out == ""


def test_generate_refuses_a_folder_that_is_not_an_adapter(tmp_path, capsys):
    code, _, err = run(capsys, "generate", "--adapter", tmp_path, "hi")
    assert code == 5 and "no adapter_config.json" in error_line(err)


def test_eval_reproduces_trainings_eval_loss(trained_adapter, capsys):
    summary = json.loads((trained_adapter / "summary.json").read_text())
    eval_file = trained_adapter.parent / "eval.jsonl"
    code, out, _ = run(
        capsys,
        "eval",
        "--adapter",
        trained_adapter,
        "--data",
        eval_file,
        "--max-new-tokens",
        8,
        "--max-seq-len",
        64,
        "--json",
    )
    assert code == 0
    report = json.loads(out)
    base, adapted = report["results"]
    assert (base["model"], adapted["model"]) == ("base", "out")
    assert report["rows"] == 8 and report["exact_match_rows"] == 8
    assert adapted["loss"] == pytest.approx(summary["eval_loss"], rel=1e-4)
    assert base["loss"] == pytest.approx(summary["eval_loss_before"], rel=1e-4)
    assert adapted["perplexity"] == pytest.approx(math.exp(adapted["loss"]))
    assert 0 <= adapted["exact_correct"] <= 8


def test_eval_on_prompt_rows_compares_base_and_adapters(trained_adapter, second_adapter, tmp_path, capsys):
    rows = tmp_path / "expected.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"prompt": f"reverse {word}", "expected": word[::-1]}) + "\n"
            for word in ("abc", "hello", "qlora")
        )
    )
    code, out, _ = run(
        capsys,
        "eval",
        "--adapter",
        trained_adapter,
        "--adapter",
        f"b={second_adapter}",
        "--data",
        rows,
        "--chat",
        "--max-new-tokens",
        8,
    )
    assert code == 0
    table = out.splitlines()
    assert "3 rows" in table[0] and "exact match on 3 rows" in table[0]
    assert [line.split()[0] for line in table[2:]] == ["base", "out", "b"]
    losses = [float(line.split()[1]) for line in table[2:]]
    assert len(set(losses)) == 3  # three different models, scored on the same rows


def test_eval_bad_rows_exit_3(trained_adapter, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "a", "expected": "b"}) + "\n" + json.dumps({"prompt": "c"}) + "\n")
    code, _, err = run(capsys, "eval", "--adapter", trained_adapter, "--data", rows)
    assert code == EXIT_DATA and "rows.jsonl:2: missing or empty 'expected'" in error_line(err)
    rows.write_text(json.dumps(chat_row("q", "a")) + "\n" + json.dumps({"messages": []}) + "\n")
    code, _, err = run(capsys, "eval", "--adapter", trained_adapter, "--data", rows)
    assert code == EXIT_DATA and "rows.jsonl:2: 'messages' is empty" in error_line(err)


def rank_two_adapter(model_dir, directory):
    """r=8 adapter whose every delta W = scale * B A is exactly 3 v1 u1^T + 2 v2 u2^T."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(model_dir)),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"]),
    )
    scale = 16 / 8
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            lora_a, lora_b = module.lora_A["default"].weight, module.lora_B["default"].weight
            u = torch.linalg.qr(torch.randn(lora_a.shape[1], 2, generator=generator))[0]  # k x 2, orthonormal
            v = torch.linalg.qr(torch.randn(lora_b.shape[0], 2, generator=generator))[0]  # d x 2, orthonormal
            lora_a.zero_()
            lora_b.zero_()
            lora_a[:2] = u.T
            lora_b[:, :2] = v * torch.tensor([3.0, 2.0]) / scale
    model.save_pretrained(str(directory))
    return directory


def test_inspect_finds_the_rank_of_a_known_product(tiny_model_dir, tmp_path, capsys):
    adapter = rank_two_adapter(tiny_model_dir, tmp_path / "rank2")
    report = inspect_adapter(adapter)
    assert len(report.layers) == 4  # q_proj and down_proj in 2 layers
    for layer in report.layers:
        assert (layer.rank, layer.effective_rank_90, layer.effective_rank_99) == (8, 2, 2)
        assert layer.singular_values[:3] == pytest.approx([3.0, 2.0, 0.0], abs=1e-5)
        assert layer.norm == pytest.approx(math.sqrt(13), rel=1e-5)
    kinds = {kind.kind: kind for kind in report.kinds}
    # q_proj 64 -> 64: 64*64 / (8*128) = 4x fewer parameters than full; down_proj 128 -> 64: 8192 / 1536.
    assert (kinds["q_proj"].d, kinds["q_proj"].k, kinds["q_proj"].parameters, kinds["q_proj"].reduction) == (
        64,
        64,
        2 * 8 * 128,
        4.0,
    )
    assert kinds["down_proj"].reduction == pytest.approx(64 * 128 / (8 * 192))

    plot = tmp_path / "spectra.png"
    code, out, _ = run(capsys, "inspect", adapter, "--plot", plot)
    assert code == 0 and "q_proj" in out and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = run(capsys, "inspect", adapter, "--json")
    record = json.loads(out)
    assert [layer["effective_rank_99"] for layer in record["layers"]] == [2, 2, 2, 2] and record["manifest"] is None


def test_inspect_a_trained_adapter_and_an_untrained_one(tiny_model_dir, trained_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    report = inspect_adapter(trained_adapter)
    assert len(report.layers) == 14 and all(0 < layer.effective_rank_99 <= 8 for layer in report.layers)
    base_parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).parameters())
    assert report.base_parameters == base_parameters and report.parameters == sum(
        kind.parameters for kind in report.kinds
    )
    # peft starts B at zero: nothing learned, effective rank 0, norm 0.
    from peft import LoraConfig, get_peft_model

    untrained = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), LoraConfig(r=4, target_modules=["q_proj"])
    )
    untrained.save_pretrained(str(tmp_path / "zero"))
    assert all((layer.effective_rank_90, layer.norm) == (0, 0.0) for layer in inspect_adapter(tmp_path / "zero").layers)


def test_generate_hints_at_chat_for_an_adapter_trained_on_chat_rows(trained_adapter, capsys):
    manifest = json.loads((trained_adapter / "qlora_manifest.json").read_text())
    assert manifest["data_formats"] == ["chat"]
    code, _, err = run(capsys, "generate", "--adapter", trained_adapter, "--max-new-tokens", 4, "reverse abc")
    assert code == 0 and "hint: adapter" in err and "chat rows; add --chat" in err
    code, _, err = run(capsys, "generate", "--adapter", trained_adapter, "--chat", "--max-new-tokens", 4, "reverse abc")
    assert code == 0 and "hint:" not in err


def test_generate_says_so_when_the_answer_is_empty(trained_adapter, tiny_model_dir, tmp_path, capsys):
    """A base whose embeddings are zero gives all-zero logits: greedy takes id 0, <|endoftext|>,
    a turn terminator, so the model ends its turn at once."""
    import shutil

    from safetensors.torch import load_file, save_file

    silent = tmp_path / "silent-base"
    shutil.copytree(tiny_model_dir, silent)
    weights = load_file(str(silent / "model.safetensors"))
    save_file(
        {name: value.zero_() if "embed" in name or "lm_head" in name else value for name, value in weights.items()},
        str(silent / "model.safetensors"),
        metadata={"format": "pt"},
    )
    common = ["generate", "--adapter", trained_adapter, "--base", silent, "--chat", "--max-new-tokens", 4]
    code, out, err = run(capsys, *common, "reverse abc")
    assert code == 0 and out.strip() == "" and "note: the answer is empty" in err
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "reverse abc"}\n{"prompt": "reverse de"}\n')
    code, out, err = run(capsys, *common, "--file", prompts)
    assert code == 0 and "note: 2 of 2 answers are empty" in err
