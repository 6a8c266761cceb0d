"""The `qlora` command: parse, call the library (job / plan / adapters / service), print.

Modules: main (the parser, train / validate, exit codes), plan, adapter (generate / eval / merge /
inspect), serve (the HTTP service's sub-command), commands (how each sub-command's parser is made).
"""

from qlora.cli.main import main

__all__ = ["main"]
