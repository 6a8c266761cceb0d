"""What the auto micro-batch's dry run holds: the old full-logits step vs dry_run_step (issue 21;
BENCHMARKS.md).

    python bench/dry_run_memory.py

A tiny real Llama (2 layers, hidden 64) with Llama 3's 128,256-entry vocabulary, NF4 + LoRA r 8 as
the job loads it, one forward+backward at 2 x 2,048 tokens, every target supervised. Prints one
JSON line per step: the largest logits-shaped tensor ([..., vocab]) any op allocated (forward
and backward, tests/vocab_tensors.py) and the bytes autograd saved for backward (parameters
excluded). Memory, not time: the machine is shared. The GPU's own peak reading is not here.
"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from qlora.adapters import attach_lora  # noqa: E402
from qlora.config import LoraSection  # noqa: E402
from qlora.training.dry_run import dry_run_step  # noqa: E402
from tests.tiny import build_tiny_model  # noqa: E402
from tests.tiny_training import tiny_base  # noqa: E402
from tests.vocab_tensors import VocabSizedTensors  # noqa: E402

VOCAB, MICRO_BATCH, SEQ_LEN = 128256, 2, 2048
CPU = torch.device("cpu")


def saved_for_backward(model, store: dict):
    """A hook recording each distinct storage autograd saves, parameters excluded."""
    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}

    def pack(tensor):
        key = tensor.untyped_storage().data_ptr()
        if key not in parameters:
            store[key] = tensor.untyped_storage().nbytes()
        return tensor

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)


def full_logits_step(model) -> None:
    """The dry run before issue 21: every position's logits, a float32 copy, one cross-entropy."""
    model.train()
    input_ids = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ_LEN))
    logits = model(input_ids=input_ids, use_cache=False).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), input_ids.flatten(), reduction="sum")
    del logits
    loss.backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        build_tiny_model(Path(folder), vocab=VOCAB)
        model = attach_lora(tiny_base(Path(folder)), LoraSection(r=8, alpha=16, dropout=0.0), seed=0)
        dry_run_step(model, 1, 16, VOCAB, CPU, "float32")  # the chunked loss's one-time probe, uncounted
        steps = {
            "full_logits": lambda: full_logits_step(model),
            "dry_run_step": lambda: dry_run_step(model, MICRO_BATCH, SEQ_LEN, VOCAB, CPU, "float32"),
        }
        tokens = MICRO_BATCH * SEQ_LEN
        for name, step in steps.items():
            store = {}
            with VocabSizedTensors(VOCAB) as recorder, saved_for_backward(model, store):
                step()
            print(
                json.dumps(
                    {
                        "step": name,
                        "tokens": tokens,
                        "largest_vocab_tensor_bytes": recorder.largest_bytes,
                        "saved_for_backward_bytes": sum(store.values()),
                    }
                )
            )


if __name__ == "__main__":
    main()
