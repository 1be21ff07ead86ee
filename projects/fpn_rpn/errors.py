"""The faults of a user's inputs or of a training run that fpn_rpn reports in one
line, and how a command-line tool turns them into that line."""
import argparse
import math
import os
import re
import sys

__all__ = [
    "DataError",
    "CheckpointError",
    "ConfigError",
    "ProcessDiedError",
    "Interrupted",
    "CLEAR_ERRORS",
    "ArgumentParser",
    "error_line",
    "examples",
    "first_line",
    "non_negative_int",
    "require",
    "positive_float",
    "positive_int",
    "run_cli",
]


class DataError(ValueError):
    """A fault in a dataset, in one line naming the file, the record and what is wrong."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, in one line naming the file and the fault."""


class ConfigError(ValueError):
    """A config value the model cannot be built with."""


class ProcessDiedError(RuntimeError):
    """A process of a run (one of several training processes, or a data-loading worker) that ended
    without a Python exception: killed, or exited."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with where the run stopped and how to continue it, for run_cli's line."""


def require(ok: bool, key: str, value, allowed: str) -> None:
    """Raise ConfigError "<key> = <value> is invalid: <allowed>" unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} = {value!r} is invalid: {allowed}")


# diverged training is FloatingPointError; other exceptions are bugs and keep their traceback
CLEAR_ERRORS = (DataError, CheckpointError, ConfigError, ProcessDiedError, FloatingPointError)


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


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none), for quoting it."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def examples(values, limit: int = 5) -> str:
    """The first ``limit`` values, comma-separated, with ", ..." when there are more."""
    values = list(values)
    more = ", ..." if len(values) > limit else ""
    return ", ".join(v if isinstance(v, str) else repr(v) for v in values[:limit]) + more


def run_cli(main, prog: str = None, args=()):
    """
    ``main(*args)`` of a command-line tool: a CLEAR_ERRORS fault ends it with one line on
    stderr, ``<prog>: error: <message>``, and exit status 1; other exceptions are bugs and
    keep their traceback. Ctrl-C ends it with ``<prog>: interrupted`` (or the message of
    :class:`Interrupted`) and exit status 130 (128 + SIGINT, as shells report it).
    """
    try:
        return main(*args)
    except KeyboardInterrupt as e:
        print(f"{prog or _prog()}: {e if isinstance(e, Interrupted) and str(e) else 'interrupted'}", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        line = error_line(e)
        if line is None:
            raise
        print(f"{prog or _prog()}: error: {line}", file=sys.stderr)
        sys.exit(1)


def _prog() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "fpn_rpn"


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but misuse ends with one line (no usage block) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _checked(kind, ok, what):
    """An argparse ``type``: ``kind(text)``, refused unless ``ok(value)``, as "<text> is not <what>"."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


positive_int = _checked(int, lambda v: v > 0, "a positive integer")
non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
unit_interval = _checked(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
