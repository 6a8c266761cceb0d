"""An instrument for the chunked loss (tests/test_loss.py, bench/loss_memory.py): the largest
logits-shaped tensor ([..., vocab]) any op allocates, forward and backward."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class VocabSizedTensors(TorchDispatchMode):
    """The largest logits-shaped tensor ([..., vocab]) any op allocates, forward and backward
    (views and in-place results share an earlier allocation: not counted; the head's [vocab,
    hidden] weight and its autocast copies are not logits). `largest` in elements,
    `largest_bytes` in bytes."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.largest, self.largest_bytes, self.ops = vocab, 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if all(result.alias_info is None for result in func._schema.returns):
            for tensor in torch.utils._pytree.tree_leaves(out):
                if torch.is_tensor(tensor) and tensor.dim() and tensor.shape[-1] == self.vocab:
                    self.largest = max(self.largest, tensor.numel())
                    self.largest_bytes = max(self.largest_bytes, tensor.numel() * tensor.element_size())
                    self.ops.add(func.overloadpacket.__name__)
        return out
