"""The adapter commands of `qlora`: generate, eval, merge, export, inspect. Parse, check, call, print.

Every flag and prompt file is checked before a model is loaded; problems are QloraErrors that
the CLI prints as one line with their exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qlora.cli.commands import command_parser

ADAPTER_COMMANDS = ("generate", "eval", "merge", "export", "inspect")


def add_adapter_commands(commands) -> None:
    add_generate_parser(commands)
    add_eval_parser(commands)
    add_merge_parser(commands)
    add_export_parser(commands)
    add_inspect_parser(commands)


def add_loading_flags(parser: argparse.ArgumentParser) -> None:
    """Shared by generate and eval: both load the base and its adapters the same way."""
    parser.add_argument(
        "--adapter",
        action="append",
        required=True,
        metavar="[NAME=]DIR",
        help="adapter folder (repeatable; the name defaults to the folder's name)",
    )
    parser.add_argument("--base", help="base model folder or hub id (default: the one the adapter records)")
    parser.add_argument(
        "--bits",
        type=int,
        choices=(4, 8, 16),
        help="load the base in 4/8/16 bits (default: as trained, else 4 = NF4)",
    )
    parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest answer in tokens (default 128)")


def add_generate_parser(commands) -> None:
    generate = command_parser(commands, "generate", "generate text with the base + adapter(s)")
    generate.add_argument("prompt", nargs="?", help="the prompt (or --file)")
    add_loading_flags(generate)
    generate.add_argument(
        "--use", metavar="NAME", help="which loaded adapter answers ('base' = none; default: the first)"
    )
    generate.add_argument(
        "--file", help='prompt file: rows {"prompt", "adapter"?, "expected"?, "id"?}; writes JSON lines'
    )
    generate.add_argument("--output", help="with --file: write the JSON lines here instead of stdout")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); >0 samples")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold when sampling")
    generate.add_argument("--seed", type=int, default=0, help="seed set before every prompt (default 0)")


def add_eval_parser(commands) -> None:
    from typing import get_args

    from qlora.config.schema import DataFormat

    evaluate = command_parser(
        commands,
        "eval",
        "eval loss and exact match (preference pairs: preference accuracy and DPO rewards): "
        "base alone vs base + adapter(s) on the same rows",
    )
    add_loading_flags(evaluate)
    evaluate.add_argument(
        "--data",
        required=True,
        help='training-format rows (chat/alpaca/text), {"prompt", "expected"} rows, or preference pairs '
        "(prompt, chosen, rejected)",
    )
    evaluate.add_argument(
        "--format",
        default="auto",
        choices=get_args(DataFormat),
        help="row format of --data, as data.format (default auto: detected from the first row's keys)",
    )
    evaluate.add_argument(
        "--beta",
        type=float,
        help="pairs only: DPO's beta for the adapters' implicit rewards (default: train.dpo_beta's default)",
    )
    evaluate.add_argument(
        "--max-seq-len", type=int, default=2048, help="rows are truncated to this many tokens (default 2048)"
    )
    evaluate.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    evaluate.add_argument("--json", action="store_true", help="print the report as one JSON object")


def add_merge_parser(commands) -> None:
    merge = command_parser(
        commands, "merge", "merge an adapter into a 16-bit copy of its base (plain transformers model)"
    )
    merge.add_argument("--adapter", required=True, help="adapter folder")
    merge.add_argument("--out", required=True, help="new folder for the merged model")
    merge.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16 or float32")
    merge.add_argument("--base", help="base model folder or hub id (default: the one the adapter records)")
    merge.add_argument(
        "--through-nf4",
        action="store_true",
        help="round-trip the base through NF4 first, as the adapter saw it in training",
    )
    merge.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    merge.add_argument("--prompt", action="append", help="prompt to measure the logit difference on (repeatable)")
    merge.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compare logits with the unmerged base + adapter, on the CPU, one model at a time "
        "(default: on for small bases only: it loads the model three times)",
    )
    merge.add_argument("--json", action="store_true", help="print the report as one JSON object")


def add_export_parser(commands) -> None:
    export = command_parser(
        commands, "export", "merge an adapter and write one GGUF file (llama.cpp) or a GGUF + Modelfile folder (Ollama)"
    )
    export.add_argument("--adapter", required=True, help="adapter folder")
    export.add_argument("--out", required=True, help="new FILE.gguf (--format gguf) or new folder (--format ollama)")
    export.add_argument("--format", default="gguf", help="gguf (default) or ollama")
    export.add_argument("--dtype", default="f16", help="f16 (default), bf16 or q8_0")
    export.add_argument("--base", help="base model folder or hub id (default: the one the adapter records)")
    export.add_argument("--name", help="model name in the GGUF and the Ollama command (default: the adapter folder's)")
    check = export.add_mutually_exclusive_group()
    check.add_argument(
        "--check",
        action="store_true",
        default=None,
        help="read the GGUF back with transformers and compare logits (default: on up to 2 GiB of 16-bit weights)",
    )
    check.add_argument("--no-check", dest="check", action="store_false", help="skip the read-back comparison")
    export.add_argument("--prompt", action="append", help="prompt to compare logits on (repeatable)")
    export.add_argument("--json", action="store_true", help="print the report as one JSON object")


def add_inspect_parser(commands) -> None:
    inspect = command_parser(
        commands, "inspect", "what an adapter learned: parameter budget and delta-W spectra per layer"
    )
    inspect.add_argument("adapter", help="adapter folder")
    inspect.add_argument("--plot", metavar="FILE.png", help="draw the singular value spectra (needs matplotlib)")
    inspect.add_argument("--json", action="store_true", help="print the full report as JSON")
    inspect.add_argument("--top", type=int, default=4, help="singular values shown per layer (default 4)")


def run_adapter_command(args: argparse.Namespace) -> int:
    return {
        "generate": run_generate,
        "eval": run_eval,
        "merge": run_merge,
        "export": run_export,
        "inspect": run_inspect,
    }[args.command](args)


def run_generate(args: argparse.Namespace) -> int:
    from qlora.adapters.generation import Prompt, Sampling, generate, prompt_ids, read_prompts, text_streamer
    from qlora.adapters.loading import load_with_adapters, parse_adapter_arguments, select_adapter
    from qlora.errors import ConfigError, OutputError

    adapters = parse_adapter_arguments(args.adapter)
    names = {name for name, _ in adapters} | {"base"}
    if (args.prompt is None) == (args.file is None):
        raise ConfigError(
            "generate: give a prompt or --file, not both"
            if args.prompt is not None
            else "generate: give a prompt or --file PROMPTS.jsonl"
        )
    if args.output and not args.file:
        raise ConfigError("--output: only with --file")
    if args.output and Path(args.output).exists():
        raise OutputError(f"--output: {args.output} already exists; choose a new file")
    if args.use is not None and args.use not in names:
        raise ConfigError(f"--use {args.use}: not one of {', '.join(sorted(names))}")
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    sampling.check()
    prompts = read_prompts(args.file, names) if args.file else [Prompt(args.prompt, "argument")]
    default = args.use or adapters[0][0]

    model, tokenizer = load_with_adapters(adapters, base=args.base, bits=args.bits)
    print(f"adapters: {', '.join(name for name, _ in adapters)}; answering with {default}", file=sys.stderr)
    if not args.chat:
        hint = chat_hint(adapters)
        if hint:
            print(hint, file=sys.stderr)
    if not args.file:
        select_adapter(model, None if default == "base" else default)
        answer = generate(
            model, tokenizer, prompt_ids(tokenizer, args.prompt, args.chat), sampling, streamer=text_streamer(tokenizer)
        )
        if not answer.strip():
            print("note: the answer is empty (the model ended its turn at once)", file=sys.stderr)
        return 0
    from qlora.training.metrics import progress_bar

    output = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    bar = progress_bar(len(prompts), "generating")
    empty = 0
    try:
        for prompt in prompts:
            name = prompt.adapter or default
            select_adapter(model, None if name == "base" else name)
            answer = generate(model, tokenizer, prompt_ids(tokenizer, prompt.text, args.chat, prompt.where), sampling)
            record = {"id": prompt.id, "prompt": prompt.text, "adapter": name, "output": answer}
            if prompt.expected is not None:
                record.update(expected=prompt.expected, match=answer.strip() == prompt.expected.strip())
            output.write(json.dumps(record, ensure_ascii=False) + "\n")
            output.flush()
            empty += not answer.strip()
            bar.update(1)
    finally:
        bar.close()
        if output is not sys.stdout:
            output.close()
    if empty:
        print(f"note: {empty} of {len(prompts)} answers are empty (the model ended its turn at once)", file=sys.stderr)
    return 0


def chat_hint(adapters) -> str:
    """A hint when an adapter trained on chat / alpaca rows is prompted as plain text: it learnt
    answers after the chat template's turn markers, and without them it rambles on."""
    from qlora.adapters import read_manifest

    for name, directory in adapters:
        formats = (read_manifest(directory) or {}).get("data_formats") or []
        if formats and "text" not in formats:
            return (
                f"hint: adapter {name} was trained on {' and '.join(formats)} rows; add --chat to prompt it "
                "through the chat template it was trained with"
            )
    return ""


def run_eval(args: argparse.Namespace) -> int:
    from qlora.adapters.evaluation import describe_eval, evaluate_adapters
    from qlora.adapters.loading import parse_adapter_arguments
    from qlora.errors import ConfigError

    for flag, value in (
        ("--max-seq-len", args.max_seq_len),
        ("--batch-size", args.batch_size),
        ("--max-new-tokens", args.max_new_tokens),
    ):
        if value <= 0:
            raise ConfigError(f"{flag}: must be positive, got {value}")
    report = evaluate_adapters(
        parse_adapter_arguments(args.adapter),
        args.data,
        base=args.base,
        bits=args.bits,
        chat=args.chat,
        max_seq_len=args.max_seq_len,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        data_format=args.format,
        beta=args.beta,
        echo=(lambda line: None) if args.json else (lambda line: print(line, file=sys.stderr)),
    )
    print(json.dumps(report) if args.json else describe_eval(report))
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from qlora.adapters.merge import DEFAULT_PROMPTS, describe_merge, merge_adapter

    report = merge_adapter(
        Path(args.adapter),
        Path(args.out),
        dtype=args.dtype,
        base=args.base,
        through_nf4=args.through_nf4,
        max_shard_size=args.max_shard_size,
        prompts=tuple(args.prompt) if args.prompt else DEFAULT_PROMPTS,
        check=args.check,
        echo=lambda line: print(line, file=sys.stderr),
    )
    print(json.dumps(asdict(report)) if args.json else describe_merge(report))
    return 0


def run_export(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from qlora.adapters.export import describe_export, export_adapter
    from qlora.adapters.merge import DEFAULT_PROMPTS

    report = export_adapter(
        Path(args.adapter),
        Path(args.out),
        format=args.format,
        dtype=args.dtype,
        base=args.base,
        name=args.name,
        check=args.check,
        prompts=tuple(args.prompt) if args.prompt else DEFAULT_PROMPTS,
        echo=lambda line: print(line, file=sys.stderr),
    )
    print(json.dumps(asdict(report)) if args.json else describe_export(report))
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from qlora.adapters.spectra import describe_report, inspect_adapter, plot_spectra, report_json, require_matplotlib
    from qlora.adapters.vllm_check import describe_verdict, read_verdict

    if args.plot:
        require_matplotlib()
    report = inspect_adapter(Path(args.adapter))
    verdict = read_verdict(Path(args.adapter))
    if args.plot:
        print(f"spectra plot: {plot_spectra(report, Path(args.plot))}", file=sys.stderr)
    if args.json:
        print(json.dumps({**json.loads(report_json(report, Path(args.adapter))), "vllm": asdict(verdict)}, indent=2))
    else:
        print(describe_report(report, top=args.top) + "\n" + describe_verdict(verdict))
    return 0
