"""The shipped demo: a real pre-trained HF model folder, and `configs/demo.yaml` teaching it a task
it does not know. Runs the demo job as a newcomer would (same config, same code path)."""

import json
from pathlib import Path

import yaml
from transformers import AutoConfig, AutoTokenizer

from qlora.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "qlora" / "demo" / "model"


def test_demo_model_is_a_small_real_hf_folder_with_a_chat_template():
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        path.name for path in DEMO_MODEL.iterdir()
    }
    assert sum(path.stat().st_size for path in DEMO_MODEL.iterdir()) <= 10 * 1024 * 1024
    config = AutoConfig.from_pretrained(DEMO_MODEL)
    # bitsandbytes' CPU 4-bit path needs every linear input size to be a multiple of 64.
    assert config.hidden_size % 64 == 0 and config.intermediate_size % 64 == 0
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "hi" in rendered and tokenizer.eos_token_id != tokenizer.pad_token_id


def test_demo_job_learns_the_new_task_on_held_out_rows(demo_run):
    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert demo.model.name_or_path == str(DEMO_MODEL) and demo.quantization.bits == 4
    summary = json.loads((demo_run / "summary.json").read_text())
    assert summary["eval_loss"] <= 0.7 * summary["eval_loss_before"]  # the bar: down >= 30%
    assert summary["exact_match_before"] <= 0.05 and summary["exact_match_after"] >= 0.8
    assert summary["adapter_bytes"] < 1024 * 1024
    assert yaml.safe_load((demo_run / "config.yaml").read_text())["train"]["max_steps"] == demo.train.max_steps
