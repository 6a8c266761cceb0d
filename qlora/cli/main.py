"""`qlora` command line: parse, call the library, print. Errors are one line and an exit code."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback

from qlora.cli.adapter import ADAPTER_COMMANDS, add_adapter_commands, run_adapter_command
from qlora.cli.commands import command_parser
from qlora.cli.plan import add_plan_command, run_plan
from qlora.cli.serve import add_serve_command, run_serve
from qlora.errors import EXIT_ABORTED, EXIT_INTERNAL, Interrupted, QloraError
from qlora.training.distributed import World, prints, world_from_env


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora", description="Fine-tune a 4-bit base model with LoRA adapters.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    commands = parser.add_subparsers(dest="command", required=True)

    def job_command(name: str, help_text: str) -> argparse.ArgumentParser:
        command = command_parser(commands, name, help_text)
        command.add_argument("config", help="job YAML file")
        command.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help=(
                "override a config key, e.g. --set train.max_steps=20 "
                "(repeatable; wins over the QLORA_SET environment variable)"
            ),
        )
        return command

    train = job_command("train", "run a fine-tuning job")
    train.add_argument(
        "--overwrite", action="store_true", help="replace an existing output.dir (start over instead of resuming)"
    )
    train.add_argument(
        "--resume-from",
        metavar="CHECKPOINT",
        help="resume from this checkpoint folder instead of the newest one in output.dir",
    )
    train.add_argument(
        "--resume-anyway",
        action="store_true",
        help="resume even though the job's config, data or number of processes changed since the checkpoint",
    )
    train.add_argument(
        "--nproc",
        type=positive_int,
        metavar="N",
        help="train on N local processes (GPUs): runs torch.distributed.run with the same arguments",
    )
    validate = job_command("validate", "check the config and every data row without loading the model")
    validate.add_argument("--json", action="store_true", help="print the report as one JSON object")
    add_adapter_commands(commands)
    add_plan_command(commands)
    add_serve_command(commands)
    return parser


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of processes (got {text!r})")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if not args.debug:
        quiet_libraries()
    if getattr(args, "nproc", None):
        from qlora.cli.launch import launch

        return launch(args.nproc, argv)
    try:
        world = world_from_env()
    except QloraError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    die_with_launcher()
    try:
        return run(args, world)
    except QloraError as error:
        if args.debug:
            traceback.print_exc()
        if prints(world, error):
            print(f"{'interrupted' if isinstance(error, Interrupted) else 'error'}: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        if world.is_main:
            print("aborted: stopped at once, no checkpoint written for the current step", file=sys.stderr)
        return EXIT_ABORTED
    except Exception as error:  # noqa: BLE001 - the last line of defence prints one line, not a wall
        if args.debug:
            raise
        print(
            f"error: unexpected {error.__class__.__name__}: {error} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def run(args: argparse.Namespace, world: World = World()) -> int:
    if args.command in ADAPTER_COMMANDS:
        return run_adapter_command(args)
    from qlora.config import OVERRIDES_ENV, load_config, overrides_from_env

    if args.command == "plan":
        return run_plan(args)
    if args.command == "serve":
        return run_serve(args)

    # QLORA_SET first, then --set: the command line wins over the environment.
    env_overrides = overrides_from_env()
    if env_overrides and world.is_main:
        print(f"{OVERRIDES_ENV}: {' '.join(env_overrides)}", file=sys.stderr)
    config = load_config(args.config, args.overrides, env_overrides=env_overrides)
    if args.command == "validate":
        from qlora.job.run import validate_job

        report = validate_job(config, echo=(lambda line: None) if args.json else print)
        if args.json:
            print(json.dumps(report))
        return 0
    from qlora.job.run import run_job

    with GracefulStop(several=world.several, speaks=world.is_main) as stop:
        run_job(
            config,
            overwrite=args.overwrite,
            resume_from=args.resume_from,
            resume_anyway=args.resume_anyway,
            stop_requested=stop.requested,
        )
    return 0


class GracefulStop:
    """SIGTERM / SIGINT ask the job to stop after the current optimizer step and checkpoint
    (a container's preemption notice); a second one stops at once (KeyboardInterrupt).

    Under torchrun (`several`) one stop reaches a rank several times (from the launcher, from an
    init forwarding to the process group, from the agent once a peer exited): the later ones
    are ignored, up to the exit, so every rank finishes the agreed checkpoint and exits 75.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, several: bool = False, speaks: bool = True):
        self.several, self.speaks = several, speaks
        self.signal_name = None
        self.previous = {}

    def requested(self) -> bool:
        return self.signal_name is not None

    def handle(self, number, frame) -> None:
        if self.signal_name is not None:
            if self.several:
                return
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(number).name
        if not self.speaks:
            return
        print(
            f"\n{self.signal_name}: stopping after the current step and writing a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> "GracefulStop":
        for number in self.SIGNALS:
            self.previous[number] = signal.signal(number, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, signal.SIG_IGN if self.several else handler)


def die_with_launcher() -> None:
    """A rank started by `qlora train --nproc` gets SIGTERM (stop after the step, checkpoint)
    if the launcher dies, even by SIGKILL, instead of training on unattended."""
    from qlora.cli.launch import LAUNCHER_ENV

    launcher = os.environ.get(LAUNCHER_ENV)
    if launcher and launcher.isdigit() and int(launcher) == os.getppid():
        from qlora.service.process import die_with_parent

        die_with_parent(int(launcher))()


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
