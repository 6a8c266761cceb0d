"""Training data: rows -> rendered text -> token ids + labels -> (packed) batches.

    rows = read_rows([(path, format)])                      # every row validated, file:line errors
    train_rows, eval_rows = split_eval(rows, fraction, seed)
    tokenized = tokenize_rows(train_rows, tokenizer, max_seq_len, train_on, too_long)
    batches = epoch_batches(tokenized.examples, micro_batch_size, packing, max_seq_len, pad_id, seed, epoch)

Modules, one job each: sources (files and datasets -> validated rows), formats (format detection,
validation, rendering to text + supervised character spans), tokenize (token ids, labels, length
policy, stats), cache (tokenized sets reused across runs), batching (epoch order, packing,
padding, shifted targets), report (what users see); preference (pair rows: validation,
rendering) and pairs (their tokens and padding-free pair batches) for DPO / ORPO.
"""

from qlora.data.batching import Batch, batches_per_epoch, epoch_batches
from qlora.data.cache import tokenize_pairs_cached, tokenize_rows_cached
from qlora.data.pairs import Pair, PairBatch, epoch_pair_batches, pair_batches_per_epoch, tokenize_pairs
from qlora.data.report import describe_data, render_supervision
from qlora.data.sources import Row, read_rows, split_eval
from qlora.data.tokenize import Example, TokenizedSet, prompt_and_answer, tokenize_rows, turn_terminators

__all__ = [
    "Batch",
    "Example",
    "Pair",
    "PairBatch",
    "Row",
    "TokenizedSet",
    "batches_per_epoch",
    "epoch_batches",
    "epoch_pair_batches",
    "pair_batches_per_epoch",
    "prompt_and_answer",
    "read_rows",
    "describe_data",
    "render_supervision",
    "split_eval",
    "tokenize_pairs",
    "tokenize_pairs_cached",
    "tokenize_rows",
    "tokenize_rows_cached",
    "turn_terminators",
]
