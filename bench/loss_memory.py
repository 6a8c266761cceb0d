"""Peak host memory of one loss forward+backward, chunked vs all at once (issue 7; BENCHMARKS.md).

    python bench/loss_memory.py auto      # train.loss_chunk_tokens: auto
    python bench/loss_memory.py off       # all supervised logits at once
    python bench/loss_memory.py 512

Each setting in its own process (ru_maxrss is a process's lifetime peak): a tiny real Llama (2
layers, hidden 256) with a 32,000-entry vocabulary, NF4 + LoRA (all-linear, r 16) as the job
loads it, one padding-free micro-batch of 4 rows x 2,048 tokens, every token supervised
(train_on: all). Prints one JSON line: the resident memory before the loss, the peak during
it, and the largest logits-shaped tensor ([..., vocab]) any op allocated (forward and
backward, counted with a TorchDispatchMode). Memory, not time: the machine is shared.
"""

import json
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from qlora.adapters import attach_lora  # noqa: E402
from qlora.config import LoraSection, ModelSection, QuantizationSection  # noqa: E402
from qlora.data import Batch  # noqa: E402
from qlora.model.base import load_base  # noqa: E402
from qlora.training.loss import summed_cross_entropy  # noqa: E402
from tests.tiny import build_tiny_model  # noqa: E402
from tests.vocab_tensors import VocabSizedTensors  # noqa: E402

VOCAB, ROWS, ROW_TOKENS = 32000, 4, 2048


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def main(setting: str) -> None:
    chunk_tokens = setting if setting in ("auto", "off") else int(setting)
    with tempfile.TemporaryDirectory() as folder:
        build_tiny_model(Path(folder), hidden=256, vocab=VOCAB)
        quantization = QuantizationSection(compute_dtype="float32")
        base = load_base(ModelSection(name_or_path=folder), quantization, gradient_checkpointing=True)
    model = attach_lora(base, LoraSection(r=16, alpha=32, dropout=0.0), seed=0).train()
    tokens = ROWS * ROW_TOKENS
    ids = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(0))
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    targets[:, ROW_TOKENS - 1 :: ROW_TOKENS] = -100  # each row's last token predicts nothing
    batch = Batch(
        input_ids=ids,
        position_ids=torch.arange(ROW_TOKENS).repeat(ROWS)[None],
        targets=targets,
        attention_mask=None,
        row_ids=list(range(ROWS)),
        supervised_tokens=int((targets != -100).sum()),
        row_lengths=[ROW_TOKENS] * ROWS,
    )
    warm_up = Batch(
        input_ids=ids[:, :64],
        position_ids=batch.position_ids[:, :64],
        targets=targets[:, :64],
        attention_mask=None,
        row_ids=[0],
        supervised_tokens=64,
        row_lengths=[64],
    )
    summed_cross_entropy(model, warm_up, torch.device("cpu"), chunk_tokens).backward()  # the one-time probe, small
    model.zero_grad(set_to_none=True)
    before = resident_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with VocabSizedTensors(VOCAB) as recorder:
        loss = summed_cross_entropy(model, batch, torch.device("cpu"), chunk_tokens)
        loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "loss_chunk_tokens": setting,
                "vocab": VOCAB,
                "supervised_tokens": batch.supervised_tokens,
                "loss": round(loss.item() / batch.supervised_tokens, 6),
                "rss_before_mb": round(before / 1e6),
                "peak_rss_mb": round(peak / 1e6),
                "loss_peak_over_before_mb": round((peak - before) / 1e6)
                if peak > peak_before
                else None,  # None: no new peak
                "largest_vocab_tensor_mb": round(recorder.largest_bytes / 1e6, 1),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "auto")
