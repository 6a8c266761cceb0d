"""qlora.data with the demo's real byte-level tokenizer (ChatML template, eos <|im_end|>, pad <|pad|>)."""

from __future__ import annotations

import copy
import csv
import json
from itertools import groupby

import pytest

from qlora.data import (
    batches_per_epoch,
    epoch_batches,
    prompt_and_answer,
    read_rows,
    render_supervision,
    split_eval,
    tokenize_rows,
)
from qlora.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT
from qlora.demo.tokenizer import build_tokenizer
from qlora.errors import DataError
from qlora.labels import IGNORE_INDEX

EOS = "<|im_end|>"
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
}
ALPACA = {"instruction": "Name a colour.", "input": "", "output": "Blue"}
TEXT = {"text": "The quick brown fox."}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def plain_tokenizer(tokenizer):
    """The demo tokenizer without a chat template (a base model's tokenizer)."""
    copied = copy.deepcopy(tokenizer)
    copied.chat_template = None
    return copied


def write_jsonl(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def tokenize_one(tmp_path, row, tokenizer, train_on="completions", max_seq_len=512):
    rows = read_rows([(write_jsonl(tmp_path, [row]), "auto")])
    return tokenize_rows(rows, tokenizer, max_seq_len, train_on, "truncate").examples[0]


def supervised_pieces(example, tokenizer):
    """The decoded runs of consecutive supervised tokens."""
    pairs = zip(example.input_ids, example.labels)
    return [
        tokenizer.decode([token for token, _ in run], skip_special_tokens=False)
        for supervised, run in groupby(pairs, key=lambda pair: pair[1] != IGNORE_INDEX)
        if supervised
    ]


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


# --------------------------------------------------------------------------- rendering and masking


def test_alpaca_with_chat_template_supervises_answer_and_eos_only(tmp_path, tokenizer):
    example = tokenize_one(tmp_path, {"instruction": "Add.", "input": "2 and 3", "output": "5"}, tokenizer)
    prompt = "<|im_start|>user\nAdd.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n"
    # The template's newline after <|im_end|> belongs to the assistant turn, so it is supervised too.
    assert decode(tokenizer, example.input_ids) == prompt + "5" + EOS + "\n"
    assert supervised_pieces(example, tokenizer) == ["5" + EOS + "\n"]
    assert all(label == IGNORE_INDEX for label in example.labels[: len(tokenizer(prompt)["input_ids"])])


def test_alpaca_without_chat_template_uses_alpaca_prompt(tmp_path, plain_tokenizer):
    example = tokenize_one(tmp_path, ALPACA, plain_tokenizer)
    prompt = ALPACA_PROMPT.format(instruction="Name a colour.")
    assert decode(plain_tokenizer, example.input_ids) == prompt + "Blue" + EOS
    assert supervised_pieces(example, plain_tokenizer) == ["Blue" + EOS]
    assert example.input_ids[-1] == plain_tokenizer.eos_token_id

    with_input = tokenize_one(tmp_path, {"instruction": "Add.", "input": "2 and 3", "output": "5"}, plain_tokenizer)
    expected_prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction="Add.", input="2 and 3")
    assert decode(plain_tokenizer, with_input.input_ids) == expected_prompt + "5" + EOS
    assert supervised_pieces(with_input, plain_tokenizer) == ["5" + EOS]


def test_chat_multi_turn_supervises_only_assistant_turns(tmp_path, tokenizer):
    example = tokenize_one(tmp_path, CHAT, tokenizer)
    assert decode(tokenizer, example.input_ids) == tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    assert supervised_pieces(example, tokenizer) == ["Hello!" + EOS + "\n", "4" + EOS + "\n"]
    assert example.labels.count(tokenizer.eos_token_id) == 2


def test_train_on_all_supervises_every_token(tmp_path, tokenizer):
    example = tokenize_one(tmp_path, CHAT, tokenizer, train_on="all")
    assert example.labels == example.input_ids


def test_text_rows_supervise_everything_and_end_with_eos(tmp_path, tokenizer):
    for train_on in ("completions", "all"):
        example = tokenize_one(tmp_path, TEXT, tokenizer, train_on=train_on)
        assert decode(tokenizer, example.input_ids) == TEXT["text"] + EOS
        assert example.labels == example.input_ids


def test_tokenizer_special_tokens_are_kept_and_eos_not_doubled(tmp_path, plain_tokenizer):
    from tokenizers import processors

    # Like Llama's tokenizer with add_eos_token: it writes BOS and EOS around every encoding itself.
    plain_tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A <|im_end|>", special_tokens=[("<|endoftext|>", 0), (EOS, 2)]
    )
    text = tokenize_one(tmp_path, TEXT, plain_tokenizer)
    assert decode(plain_tokenizer, text.input_ids) == "<|endoftext|>" + TEXT["text"] + EOS
    assert text.labels == text.input_ids
    alpaca = tokenize_one(tmp_path, ALPACA, plain_tokenizer)
    assert decode(plain_tokenizer, alpaca.input_ids).startswith("<|endoftext|>Below is an instruction")
    assert supervised_pieces(alpaca, plain_tokenizer) == ["Blue" + EOS]


def test_answer_without_a_terminator_is_an_error(tmp_path, tokenizer):
    no_terminator = copy.deepcopy(tokenizer)
    no_terminator.chat_template = tokenizer.chat_template.replace("<|im_end|>", "")
    rows = read_rows([(write_jsonl(tmp_path, [CHAT]), "chat")])
    with pytest.raises(
        DataError, match=r"data\.jsonl:1: assistant answer 1 is not followed by the EOS token '<\|im_end\|>'"
    ):
        tokenize_rows(rows, no_terminator, 512, "completions", "truncate")


def test_a_special_end_of_turn_token_other_than_eos_is_supervised(tmp_path, tokenizer):
    """Like Llama 3 (<|eot_id|>) or Gemma (<end_of_turn>): the turn ends with a special token that is not the EOS."""
    other_terminator = copy.deepcopy(tokenizer)
    other_terminator.chat_template = tokenizer.chat_template.replace("<|im_end|>", "<|endoftext|>")
    rows = read_rows([(write_jsonl(tmp_path, [CHAT]), "chat")])
    example = tokenize_rows(rows, other_terminator, 512, "completions", "truncate").examples[0]
    supervised = [token for token, label in zip(example.input_ids, example.labels) if label != -100]
    assert supervised.count(other_terminator.convert_tokens_to_ids("<|endoftext|>")) == 2  # both assistant turns


def test_prompt_and_answer(tmp_path, tokenizer, plain_tokenizer):
    chat, alpaca, text = read_rows(
        [
            (write_jsonl(tmp_path, [CHAT], "chat.jsonl"), "auto"),
            (write_jsonl(tmp_path, [{**ALPACA, "output": " Blue \n"}], "alpaca.jsonl"), "auto"),
            (write_jsonl(tmp_path, [TEXT], "text.jsonl"), "auto"),
        ]
    )
    prompt_ids, answer = prompt_and_answer(chat, tokenizer)
    expected = tokenizer.apply_chat_template(CHAT["messages"][:4], tokenize=False, add_generation_prompt=True)
    assert decode(tokenizer, prompt_ids) == expected
    assert expected.endswith("<|im_start|>assistant\n") and answer == "4"

    prompt_ids, answer = prompt_and_answer(alpaca, plain_tokenizer)
    assert decode(plain_tokenizer, prompt_ids) == ALPACA_PROMPT.format(instruction="Name a colour.")
    assert answer == "Blue"
    with pytest.raises(DataError, match="text.jsonl:1: text rows have no prompt"):
        prompt_and_answer(text, tokenizer)


def test_render_supervision_marks_supervised_spans(tmp_path, tokenizer):
    example = tokenize_one(tmp_path, ALPACA, tokenizer)
    shown = render_supervision(example, tokenizer)
    assert shown == "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n⟦Blue<|im_end|>\n⟧"
    assert render_supervision(example, tokenizer, max_chars=10) == "<|im_start…"


# --------------------------------------------------------------------------- length policy


def test_truncate_and_drop_counts(tmp_path, tokenizer):
    short = {"text": "hi"}
    long = {"text": "x" * 50}
    # Truncation keeps the answer's start but cuts into it; the long system prompt leaves no answer at all.
    cut_answer = {"instruction": "Say it.", "output": "y" * 40}
    no_answer_left = {"messages": [{"role": "system", "content": "z" * 60}, *CHAT["messages"][1:3]]}
    rows = read_rows(
        [
            (write_jsonl(tmp_path, [short, long], "text.jsonl"), "auto"),
            (write_jsonl(tmp_path, [cut_answer], "alpaca.jsonl"), "auto"),
            (write_jsonl(tmp_path, [no_answer_left], "chat.jsonl"), "auto"),
        ]
    )
    truncated = tokenize_rows(rows, tokenizer, 32, "completions", "truncate")
    assert truncated.stats["rows"] == 4
    assert truncated.stats["rows_over_max_seq_len"] == 3
    assert truncated.stats["truncated"] == 2
    assert truncated.stats["dropped_no_supervision_after_truncation"] == 1
    assert truncated.stats["dropped_too_long"] == 0
    assert [example.row.source.rsplit("/", 1)[-1] for example in truncated.examples] == [
        "text.jsonl",
        "text.jsonl",
        "alpaca.jsonl",
    ]
    assert [example.truncated for example in truncated.examples] == [False, True, True]
    assert all(len(example.input_ids) <= 32 for example in truncated.examples)
    assert truncated.stats["length_max"] > 60  # lengths are measured before truncation
    assert truncated.stats["total_tokens"] == 3 + 32 + 32

    dropped = tokenize_rows(rows, tokenizer, 32, "completions", "drop")
    assert dropped.stats["kept"] == 1
    assert dropped.stats["dropped_too_long"] == 3
    assert dropped.stats["truncated"] == 0

    with pytest.raises(DataError, match="no rows left to train on"):
        tokenize_rows(rows[1:], tokenizer, 8, "completions", "drop")


# --------------------------------------------------------------------------- batching


def make_examples(tmp_path, tokenizer, count=11):
    rows = [{"text": "row " + "ab" * index} for index in range(count)]
    return tokenize_rows(read_rows([(write_jsonl(tmp_path, rows), "auto")]), tokenizer, 64, "all", "truncate").examples


def test_unpacked_batches_pad_to_longest_and_shift_targets(tmp_path, tokenizer):
    examples = make_examples(tmp_path, tokenizer)
    batches = epoch_batches(examples, 4, False, 64, tokenizer.pad_token_id, seed=1, epoch=0)
    assert [len(batch.row_ids) for batch in batches] == [4, 4, 3]
    for batch in batches:
        lengths = [len(examples[index].input_ids) for index in batch.row_ids]
        assert batch.input_ids.shape == (len(lengths), max(lengths))
        for b, (index, length) in enumerate(zip(batch.row_ids, lengths)):
            example = examples[index]
            assert batch.input_ids[b, :length].tolist() == example.input_ids
            assert batch.targets[b, :length].tolist() == example.labels[1:] + [IGNORE_INDEX]
            assert batch.attention_mask[b].tolist() == [1] * length + [0] * (max(lengths) - length)
            assert batch.position_ids[b, :length].tolist() == list(range(length))
            assert (batch.targets[b, length:] == IGNORE_INDEX).all()
            assert (batch.input_ids[b, length:] == tokenizer.pad_token_id).all()
        assert batch.supervised_tokens == int((batch.targets != IGNORE_INDEX).sum())


def test_eos_stays_supervised_when_pad_equals_eos(tmp_path, tokenizer):
    pad_is_eos = copy.deepcopy(tokenizer)
    pad_is_eos.pad_token = pad_is_eos.eos_token
    assert pad_is_eos.pad_token_id == pad_is_eos.eos_token_id
    rows = read_rows([(write_jsonl(tmp_path, [ALPACA, {**ALPACA, "output": "A much longer answer"}]), "auto")])
    tokenized = tokenize_rows(rows, pad_is_eos, 128, "completions", "truncate")
    (batch,) = epoch_batches(tokenized.examples, 2, False, 128, pad_is_eos.pad_token_id, seed=0, epoch=0, shuffle=False)
    eos = pad_is_eos.eos_token_id
    short = 0
    length = len(tokenized.examples[short].input_ids)
    assert batch.input_ids[short, length:].eq(eos).all()  # padding with the EOS id ...
    assert batch.attention_mask[short].sum() == length  # ... is told apart by the attention mask only
    # The answer ends "Blue<|im_end|>\n": the token before its EOS must have the EOS as target.
    answer_eos = length - 2
    assert batch.input_ids[short, answer_eos] == eos
    assert batch.targets[short, answer_eos - 1] == eos
    assert batch.targets[short].tolist() == tokenized.examples[short].labels[1:] + [IGNORE_INDEX] * (
        batch.input_ids.shape[1] - length + 1
    )
    assert batch.targets.eq(eos).sum() == 2  # each row's answer EOS; no padding position is a target
    assert batch.supervised_tokens == tokenized.stats["supervised_tokens"]


def test_packing_keeps_rows_apart(tmp_path, tokenizer):
    examples = make_examples(tmp_path, tokenizer)
    max_seq_len = 40
    batches = epoch_batches(examples, 2, True, max_seq_len, tokenizer.pad_token_id, seed=3, epoch=0)
    seen = []
    for batch in batches:
        assert batch.attention_mask is None
        assert batch.input_ids.shape[1] <= max_seq_len
        rows = iter(batch.row_ids)
        for b in range(batch.input_ids.shape[0]):
            t = 0
            width = batch.input_ids.shape[1]
            while t < width:
                assert batch.position_ids[b, t] == 0, "every segment starts at position 0"
                end = t + 1
                while end < width and batch.position_ids[b, end] == batch.position_ids[b, end - 1] + 1:
                    end += 1
                index = next(rows, None) if batch.input_ids[b, t] != tokenizer.pad_token_id else None
                if index is None:  # the padding tail: its own segment, never a target
                    assert end == width
                    assert (batch.input_ids[b, t:] == tokenizer.pad_token_id).all()
                    assert (batch.targets[b, t:] == IGNORE_INDEX).all()
                else:
                    example = examples[index]
                    assert end - t == len(example.input_ids), "a row never spans two sequences"
                    assert batch.input_ids[b, t:end].tolist() == example.input_ids
                    # The last token of a row never predicts the first token of the next row.
                    assert batch.targets[b, t:end].tolist() == example.labels[1:] + [IGNORE_INDEX]
                    seen.append(index)
                t = end
        assert next(rows, None) is None
        assert batch.supervised_tokens == int((batch.targets != IGNORE_INDEX).sum())
    assert sorted(seen) == list(range(len(examples)))
    assert any(len(batch.row_ids) > batch.input_ids.shape[0] for batch in batches), "some sequence holds two rows"
    supervised = sum(batch.supervised_tokens for batch in batches)
    assert supervised == sum(sum(label != IGNORE_INDEX for label in ex.labels[1:]) for ex in examples)


def test_epoch_order_is_deterministic_and_complete(tmp_path, tokenizer):
    examples = make_examples(tmp_path, tokenizer, count=30)

    def order(epoch, packing=False, shuffle=True):
        batches = epoch_batches(examples, 3, packing, 64, tokenizer.pad_token_id, 7, epoch, shuffle)
        return [index for batch in batches for index in batch.row_ids]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == sorted(order(1)) == list(range(30))
    assert order(0, packing=True) == order(0)  # packing keeps the seeded order
    assert order(0, shuffle=False) == list(range(30))


@pytest.mark.parametrize("packing", [False, True])
def test_batches_per_epoch_counts_what_epoch_batches_builds(tmp_path, tokenizer, packing):
    examples = make_examples(tmp_path, tokenizer, count=30)
    for micro_batch_size in (1, 3, 4, 7):
        built = epoch_batches(examples, micro_batch_size, packing, 64, tokenizer.pad_token_id, seed=7, epoch=0)
        assert batches_per_epoch(examples, micro_batch_size, packing, 64, seed=7) == len(built)


def test_split_eval_is_deterministic(tmp_path):
    rows = read_rows([(write_jsonl(tmp_path, [{"text": f"row {index}"} for index in range(20)]), "text")])
    train, held_out = split_eval(rows, 0.2, seed=5)
    assert (train, held_out) == split_eval(rows, 0.2, seed=5)
    assert len(held_out) == 4 and len(train) == 16
    assert sorted(train + held_out, key=lambda row: row.line) == rows
    assert split_eval(rows, 0.2, seed=6)[1] != held_out
    assert len(split_eval(rows, 0.01, seed=5)[1]) == 1
    with pytest.raises(DataError, match="leaves no rows to train on"):
        split_eval(rows[:1], 0.5, seed=5)


# --------------------------------------------------------------------------- file formats


def test_every_file_format_reads_and_detects(tmp_path):
    import pyarrow
    import pyarrow.parquet

    jsonl = write_jsonl(tmp_path, [CHAT, CHAT])
    json_path = tmp_path / "data.json"
    json_path.write_text(json.dumps([ALPACA, ALPACA, ALPACA]))
    csv_path = tmp_path / "data.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows([ALPACA, {**ALPACA, "output": "Red,\nor green"}, ALPACA])
    parquet_path = tmp_path / "data.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([CHAT, CHAT]), parquet_path)
    text_parquet = tmp_path / "text.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([TEXT]), text_parquet)

    rows = read_rows(
        [
            (jsonl, "auto"),
            (str(json_path), "auto"),
            (str(csv_path), "auto"),
            (str(parquet_path), "auto"),
            (str(text_parquet), "auto"),
        ]
    )
    by_source = {}
    for row in rows:
        by_source.setdefault(row.source.rsplit("/", 1)[-1], []).append((row.format, row.line))
    assert by_source == {
        "data.jsonl": [("chat", 1), ("chat", 2)],
        "data.json": [("alpaca", 1), ("alpaca", 2), ("alpaca", 3)],
        # csv lines are file lines: the header is line 1, and the quoted newline makes row 2 end on line 4
        "data.csv": [("alpaca", 2), ("alpaca", 4), ("alpaca", 5)],
        "data.parquet": [("chat", 1), ("chat", 2)],
        "text.parquet": [("text", 1)],
    }
    assert rows[0].fields == CHAT
    assert rows[6].fields["output"] == "Red,\nor green"
    assert rows[8].fields == CHAT


def test_mixed_sources_with_explicit_formats(tmp_path):
    chat_path = write_jsonl(tmp_path, [CHAT], "a.jsonl")
    # Explicit formats win over detection: this file has a 'text' key and would be detected as text.
    alpaca_path = write_jsonl(tmp_path, [{**ALPACA, "text": "ignored"}], "b.jsonl")
    rows = read_rows([(chat_path, "chat"), (alpaca_path, "alpaca")])
    assert [row.format for row in rows] == ["chat", "alpaca"]
    with pytest.raises(DataError, match=r"a\.jsonl:1: missing field 'text'"):
        read_rows([(chat_path, "text")])


# --------------------------------------------------------------------------- bad data: one line naming file:line


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([ALPACA, {"instruction": "x"}], r"data\.jsonl:2: missing field 'output'"),
        ([ALPACA, {**ALPACA, "output": 3}], r"data\.jsonl:2: 'output' must be a string, got int"),
        ([CHAT, {"messages": []}], r"data\.jsonl:2: 'messages' is empty"),
        (
            [CHAT, {"messages": [{"role": "robot", "content": "beep"}]}],
            r"data\.jsonl:2: messages\[0\]\.role 'robot' is not one of system, user, assistant, tool",
        ),
        ([CHAT, {"messages": [{"role": "user", "content": "hi"}]}], r"data\.jsonl:2: no assistant turn"),
        (
            [CHAT, {"messages": [{"role": "user", "content": ["hi"]}]}],
            r"data\.jsonl:2: messages\[0\]\.content must be a string, got list",
        ),
        ([CHAT, ["not", "an", "object"]], r"data\.jsonl:2: a row must be an object"),
        (
            [{"prompt": "x", "completion": "y"}],
            r"data\.jsonl:1: cannot detect the data format from the keys \(completion, prompt\)",
        ),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        read_rows([(write_jsonl(tmp_path, rows), "auto")])


def test_malformed_json_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(TEXT) + '\n\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:3: not valid JSON \(Expecting value at column 10\)"):
        read_rows([(str(path), "auto")])


def test_unreadable_sources(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows"):
        read_rows([(str(empty), "auto")])
    with pytest.raises(DataError, match=r"^data file not found: .*missing\.jsonl$"):
        read_rows([(str(tmp_path / "missing.jsonl"), "auto")])
    not_a_list = tmp_path / "object.json"
    not_a_list.write_text(json.dumps({"rows": [TEXT]}))
    with pytest.raises(DataError, match=r"object\.json: a \.json data file must hold a list of rows"):
        read_rows([(str(not_a_list), "auto")])


def test_unknown_dataset_name(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        DataError, match=r"^data\.train: 'no-such/dataset-xyz' is neither a file nor a dataset in the local cache"
    ):
        read_rows([("no-such/dataset-xyz", "auto")])


def cache_dataset(cache_dir, name, rows):
    """Write `rows` where `datasets` keeps a hub dataset after an online load_dataset(name):
    <cache>/<org>___<name>/default/0.0.0/<hash>/ with the arrow shard and dataset_info.json."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    org, short = name.split("/")
    folder = cache_dir / f"{org}___{short}" / "default" / "0.0.0" / "0123abcd"
    folder.mkdir(parents=True)
    with ArrowWriter(path=str(folder / f"{short}-train.arrow")) as writer:
        for row in rows:
            writer.write(row)
        count, _ = writer.finalize()
    split = datasets.SplitInfo(name="train", num_examples=count, num_bytes=0, dataset_name=short)
    info = datasets.DatasetInfo(
        dataset_name=short,
        config_name="default",
        features=writer._features,
        splits=datasets.SplitDict({"train": split}),
    )
    info.write_to_directory(str(folder))


def test_a_dataset_name_in_the_offline_cache_reads_like_a_file(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    cache_dataset(tmp_path, "acme/tiny-alpaca", [ALPACA, {**ALPACA, "output": "b"}])
    rows = read_rows([("acme/tiny-alpaca", "auto")])
    assert [(row.where, row.format, row.fields["output"]) for row in rows] == [
        ("acme/tiny-alpaca:1", "alpaca", ALPACA["output"]),
        ("acme/tiny-alpaca:2", "alpaca", "b"),
    ]

    cache_dataset(tmp_path, "acme/broken", [ALPACA, {**ALPACA, "output": None}])
    with pytest.raises(DataError, match=r"^acme/broken:2: "):
        read_rows([("acme/broken", "auto")])


def test_template_that_is_not_prefix_stable_is_rejected(tmp_path, tokenizer):
    counting = copy.deepcopy(tokenizer)
    # Announcing the number of messages up front changes the start of every prefix rendering.
    counting.chat_template = "{{ messages | length }} messages\n" + tokenizer.chat_template
    rows = read_rows([(write_jsonl(tmp_path, [CHAT]), "auto")])
    with pytest.raises(
        DataError, match=r"data\.jsonl:1: the chat template does not render this conversation prefix by prefix"
    ):
        tokenize_rows(rows, counting, 512, "completions", "truncate")


def test_tokenized_sets_are_cached_across_runs_and_a_changed_row_misses(tiny_model_dir, tmp_path):
    from qlora.data import read_rows, tokenize_rows_cached
    from qlora.model.base import load_tokenizer
    from tests.tiny import write_chat_data

    tokenizer = load_tokenizer(str(tiny_model_dir))
    path = write_chat_data(tmp_path / "rows.jsonl", 8, seed=2)
    shape = dict(max_seq_len=64, train_on="completions", too_long="truncate", folder=tmp_path / "cache")
    rows = read_rows([(str(path), "auto")])
    first, hit = tokenize_rows_cached(rows, tokenizer, **shape)
    assert not hit and len(list((tmp_path / "cache").iterdir())) == 1
    again, hit = tokenize_rows_cached(read_rows([(str(path), "auto")]), tokenizer, **shape)
    assert hit and again.stats == first.stats
    assert [(e.input_ids, e.labels, e.row.line, e.truncated) for e in again.examples] == [
        (e.input_ids, e.labels, e.row.line, e.truncated) for e in first.examples
    ]
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace('"content": "', '"content": "changed ', 1)
    path.write_text("\n".join(lines) + "\n")
    changed, hit = tokenize_rows_cached(read_rows([(str(path), "auto")]), tokenizer, **shape)
    assert not hit and changed.examples[3].input_ids != first.examples[3].input_ids
    # The shape settings are part of the key.
    assert tokenize_rows_cached(rows, tokenizer, **{**shape, "max_seq_len": 32})[1] is False
