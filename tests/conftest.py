import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The measured peak matmul rate (MFU) is cached here, not in the user's ~/.cache.
os.environ.setdefault("QLORA_CACHE_DIR", os.path.join(__import__("tempfile").mkdtemp(prefix="qlora-test-cache-")))

import pytest  # noqa: E402

from tests.tiny import build_tiny_model  # noqa: E402

# The modules that hold `gpu` tests. `pytest -m gpu` collects only these, so a GPU box needs
# what they import (torch, bitsandbytes, peft), not the service's (httpx, the browser helpers):
# marks are known only after a module is imported, so without this every module would be.
GPU_TEST_MODULES = ("test_gpu.py",)


def pytest_ignore_collect(collection_path, config):
    gpu_only = config.getoption("markexpr") == "gpu"
    if gpu_only and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        return collection_path.name not in GPU_TEST_MODULES
    return None


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Llama (hidden 64) with the demo tokenizer, as a real HF folder."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def trained_adapter(tiny_model_dir, tmp_path_factory):
    """The output folder of a real training job (NF4 base, float32 compute, 6 steps) on the tiny model."""
    from qlora.config import load_config
    from qlora.job.run import run_job
    from tests.tiny import write_job

    directory = tmp_path_factory.mktemp("trained")
    job = write_job(directory, tiny_model_dir, train={"max_steps": 6, "learning_rate": 1e-2})
    run_job(load_config(job), echo=lambda line: None)
    return directory / "out"


@pytest.fixture(scope="session")
def wide_vocab_dir(tmp_path_factory):
    """The tiny Llama with 2048 vocabulary rows: logits large enough for the chunked loss to chunk."""
    return build_tiny_model(tmp_path_factory.mktemp("wide-vocab"), vocab=2048)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size (e.g. "16m"): a disk that really fills. Root only:
    skipped where mounting is refused, but never under CI (CI=true), where the test must run."""
    import subprocess

    mounts = []

    def mount(size: str):
        folder = tmp_path / f"disk-{len(mounts)}"
        folder.mkdir()
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        )
        if mounted.returncode != 0:
            if os.environ.get("CI") == "true":
                pytest.fail(f"cannot mount a tmpfs under CI: {mounted.stderr.decode().strip()}")
            pytest.skip("mounting a tmpfs is not allowed here")
        mounts.append(folder)
        return folder

    yield mount
    for folder in mounts:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The shipped demo job, unchanged but for where it writes: its output folder."""
    from pathlib import Path

    from qlora.cli.main import main

    out = tmp_path_factory.mktemp("demo") / "out"
    config = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    assert main(["train", str(config), "--set", f"output.dir={out}"]) == 0
    return out


@pytest.fixture(scope="session")
def demo_rule_dpo(tmp_path_factory):
    """20 DPO steps on the demo model from a fresh adapter, on tests/tiny_rule_pairs.py's pairs (256
    to train, 64 held out in eval.jsonl): the job folder, its output in out/."""
    from pathlib import Path

    from qlora.cli.main import main
    from tests.tiny import write_job
    from tests.tiny_rule_pairs import write_rule_pairs

    folder = tmp_path_factory.mktemp("demo-rule-dpo")
    train_letters = write_rule_pairs(folder / "train.jsonl", 256, seed=0)
    write_rule_pairs(folder / "eval.jsonl", 64, seed=1, exclude=frozenset(train_letters))
    demo = Path(__file__).resolve().parent.parent / "qlora" / "demo" / "model"
    job = write_job(
        folder,
        demo,
        lora={"r": 16, "alpha": 32, "dropout": 0.0},
        data={"max_seq_len": 128},
        train={
            "objective": "dpo",
            "max_steps": 20,
            "micro_batch_size": 16,
            "learning_rate": 2e-3,
            "warmup_steps": 2,
            "eval_every": 10,
            "eval_exact_match": 64,
            "eval_max_new_tokens": 16,
        },
    )
    assert main(["train", str(job)]) == 0
    return folder


@pytest.fixture(scope="session")
def tiny256(tmp_path_factory):
    """A 2-layer Llama with hidden 256: LoRA A matrices at r=16 reach bitsandbytes' 8-bit optimizer threshold."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny256"), hidden=256, layers=2)
