"""The faults of a user's inputs or of a training run that fpn_rpn reports in one
line, and how a command-line tool turns them into that line."""
import re

__all__ = ["DataError", "CheckpointError", "ConfigError", "CLEAR_ERRORS", "error_line"]


class DataError(ValueError):
    """A fault in a dataset, in one line naming the file, the record and what is wrong."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, in one line naming the file and the fault."""


class ConfigError(ValueError):
    """A config value the model cannot be built with."""


# diverged training is FloatingPointError; other exceptions are bugs and keep their traceback
CLEAR_ERRORS = (DataError, CheckpointError, ConfigError, FloatingPointError)


def error_line(error: BaseException):
    """
    The message of a CLEAR_ERRORS exception as one line, or None for other exceptions.
    DataLoader workers and spawned processes re-raise an exception with its original
    traceback as the message; the original message is taken from it.
    """
    text = str(error)
    if "Traceback (most recent call last)" in text:
        # the last "module.SomeError: message" line starts the message of the last exception
        last = list(re.finditer(r"^(?:\w+\.)*(\w+(?:Error|Exception)): ", text, re.MULTILINE))[-1:]
        if not last or last[0].group(1) not in {cls.__name__ for cls in CLEAR_ERRORS}:
            return None
        text = text[last[0].end():]
    elif not isinstance(error, CLEAR_ERRORS):
        return None
    return " ".join(text.split())
