"""`qlora` command line: parse, call the library, print. Errors are one line and an exit code."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from qlora.adapter_cli import ADAPTER_COMMANDS, add_adapter_commands, run_adapter_command
from qlora.errors import EXIT_INTERNAL, QloraError

EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora", description="Fine-tune a 4-bit base model with LoRA adapters.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    commands = parser.add_subparsers(dest="command", required=True)

    def job_command(name: str, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("config", help="job YAML file")
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="override a config key, e.g. --set train.max_steps=20 (repeatable)")
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return command

    train = job_command("train", "run a fine-tuning job")
    train.add_argument("--overwrite", action="store_true", help="replace an existing output.dir")
    validate = job_command("validate", "check the config and every data row without loading the model")
    validate.add_argument("--json", action="store_true", help="print the report as one JSON object")
    add_adapter_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        quiet_libraries()
    try:
        return run(args)
    except QloraError as error:
        if args.debug:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - the last line of defence prints one line, not a wall
        if args.debug:
            raise
        print(f"error: unexpected {error.__class__.__name__}: {error} (rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


def run(args: argparse.Namespace) -> int:
    if args.command in ADAPTER_COMMANDS:
        return run_adapter_command(args)
    from qlora.config import load_config

    config = load_config(args.config, args.overrides)
    if args.command == "validate":
        from qlora.job import validate_job

        report = validate_job(config, echo=(lambda line: None) if args.json else print)
        if args.json:
            print(json.dumps(report))
        return 0
    from qlora.job import run_job

    run_job(config, overwrite=args.overwrite)
    return 0


def quiet_libraries() -> None:
    """Library chatter (load bars, deprecation notes, optional-kernel notices) hides our own output."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    for name in ("bitsandbytes", "transformers", "peft", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
