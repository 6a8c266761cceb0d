"""Errors a user can fix, each with the exit code the CLI returns for it.

Every error carries one line that names the culprit (config key, file:line, path). The CLI
prints that line and exits with `exit_code`; a traceback only appears with `--debug`.
"""

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_CONFIG = 2
EXIT_DATA = 3
EXIT_OUTPUT = 4
EXIT_MODEL = 5
EXIT_TRAINING = 6
EXIT_CHECKPOINT = 7
# EX_TEMPFAIL from sysexits.h, "try again later": a scheduler that restarts failed jobs resumes it.
EXIT_INTERRUPTED = 75
# A second Ctrl-C / SIGTERM: stopped at once, no checkpoint written (128 + SIGINT, as shells report it).
EXIT_ABORTED = 130


class QloraError(Exception):
    """Base class: a one-line, user-facing message and an exit code."""

    exit_code = EXIT_INTERNAL


class ConfigError(QloraError):
    """A job config key is unknown, of the wrong type, or out of range."""

    exit_code = EXIT_CONFIG


class DataError(QloraError):
    """A data file is missing, malformed, or a row cannot be trained on."""

    exit_code = EXIT_DATA


class OutputError(QloraError):
    """The output directory would be overwritten or cannot be written."""

    exit_code = EXIT_OUTPUT


class ModelError(QloraError):
    """The base model or tokenizer cannot be found or loaded as configured."""

    exit_code = EXIT_MODEL


class TrainingError(QloraError):
    """Training itself failed, e.g. the loss became NaN or infinite."""

    exit_code = EXIT_TRAINING


class CheckpointError(QloraError):
    """A checkpoint to resume from is missing, incomplete, damaged, or belongs to another run."""

    exit_code = EXIT_CHECKPOINT


class Interrupted(QloraError):
    """Stopped on request (SIGTERM / Ctrl-C) after an optimizer step; its checkpoint is written."""

    exit_code = EXIT_INTERRUPTED
