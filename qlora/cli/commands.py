"""A `qlora` sub-command's parser, made the same way for every command."""

from __future__ import annotations

import argparse


def command_parser(commands, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text)
    # Accepted after the sub-command too; SUPPRESS leaves the top-level --debug's value when absent.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser
