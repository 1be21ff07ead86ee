"""How a command-line tool of fpn_rpn reports a fault: one line on stderr and an exit status
(:func:`run_cli`), tracebacks in the log file only, argparse misuse in one line, and the
argparse types the tools share. The faults themselves are :mod:`fpn_rpn.errors`'."""
import argparse
import logging
import math
import os
import re
import sys

from .errors import CLEAR_ERRORS, SYSTEM_ERRNOS, Interrupted, write_fault

__all__ = ["ArgumentParser", "error_line", "non_negative_int", "positive_float", "positive_int",
           "quiet_logging_errors", "run_cli", "tracebacks_to_log_only", "unit_interval"]


def quiet_logging_errors() -> None:
    """A log handler that cannot write (a full disk) drops the record silently instead of printing
    ``--- Logging error ---`` and a traceback for every record; the fault itself surfaces at the
    next checkpoint or file written, as one line."""
    logging.raiseExceptions = False


def _no_traceback(record: logging.LogRecord) -> bool:
    return not record.exc_info


def tracebacks_to_log_only() -> None:
    """
    The console handlers (stdout, stderr) of every logger drop records that carry a traceback,
    such as Detectron2's ``logger.exception("Exception during training:")``: the traceback stays
    in the log files (log.txt) and the terminal shows :func:`run_cli`'s one line.
    """
    consoles = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s is not None}
    loggers = [logging.getLogger()] + [
        log for log in logging.Logger.manager.loggerDict.values() if isinstance(log, logging.Logger)]
    for log in loggers:
        for handler in log.handlers:
            if (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
                    and id(getattr(handler, "stream", None)) in consoles and _no_traceback not in handler.filters):
                handler.addFilter(_no_traceback)


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
    elif isinstance(error, OSError) and error.errno in SYSTEM_ERRNOS:
        text = str(write_fault(error))
    elif not isinstance(error, CLEAR_ERRORS):
        return None
    return " ".join(text.split())


def run_cli(main, prog: str = None, args=()):
    """
    ``main(*args)`` of a command-line tool: a CLEAR_ERRORS fault ends it with one line on
    stderr, ``<prog>: error: <message>``, and exit status 1; other exceptions are bugs and
    keep their traceback. An OSError of the machine (:data:`SYSTEM_ERRNOS`: a full disk,
    permissions) is such a fault too, naming the file. Ctrl-C ends it with ``<prog>: interrupted``
    (or the message of :class:`Interrupted`) and exit status 130 (128 + SIGINT, as shells report it).
    """
    quiet_logging_errors()
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
