"""The faults of a user's inputs, of a training run and of the machine that fpn_rpn reports
in one line: their exception classes, the rule a check raises by (:func:`require`, with
:func:`is_int` and :func:`is_number`), and OSErrors of the machine turned into such lines.
A command-line tool prints them with :func:`fpn_rpn.cli.run_cli`."""
import contextlib
import errno
import math
import numbers
import os
import shutil
import tempfile

__all__ = [
    "DataError",
    "CheckpointError",
    "ConfigError",
    "ProcessDiedError",
    "PeerFailedError",
    "OSFaultError",
    "Interrupted",
    "CLEAR_ERRORS",
    "SYSTEM_ERRNOS",
    "examples",
    "first_line",
    "is_int",
    "is_number",
    "os_faults",
    "prepare_output_dir",
    "require",
    "write_fault",
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


class PeerFailedError(RuntimeError):
    """Another process of a multi-process run failed (its own line is in its output), so this one stops."""


class OSFaultError(RuntimeError):
    """A fault of the machine a run needs, in one line naming the path or port: no space left on the
    device, a folder that is a file or cannot be written, a port in use."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with where the run stopped and how to continue it, for run_cli's line."""


def is_int(value) -> bool:
    """An integer, not a bool (yacs and JSON give both)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite real number, not a bool: NaN and infinities are no size, threshold or weight."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def require(ok: bool, key: str, value, allowed: str) -> None:
    """Raise ConfigError "<key> = <value> is invalid: <allowed>" unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} = {value!r} is invalid: {allowed}")


# diverged training is FloatingPointError; other exceptions are bugs and keep their traceback
CLEAR_ERRORS = (DataError, CheckpointError, ConfigError, ProcessDiedError, PeerFailedError, OSFaultError,
                FloatingPointError)

# OSErrors that are faults of the machine (a full disk, permissions, a read-only or size-limited
# file system), not bugs: one line naming the file
SYSTEM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def _free_mb(path: str) -> str:
    """Free space of the file system holding ``path`` (or its nearest existing folder), in MB."""
    folder = os.path.abspath(path or ".")
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return f"{shutil.disk_usage(folder).free / 2 ** 20:.0f} MB free"
    except OSError:
        return "free space unknown"


def write_fault(error: OSError, path: str = None, then: str = "") -> "OSFaultError":
    """
    The OSFaultError line of an OSError of the machine at ``path`` (default: the error's file name):
    ``no space left on device writing <path> (<N> MB free)`` for a full disk or quota, otherwise
    ``<path>: <strerror>``; ``then`` is appended (what is left, such as the last checkpoint).
    """
    path = path or error.filename or "?"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device" if error.errno == errno.ENOSPC else "disk quota exceeded"
        line = f"{what} writing {path} ({_free_mb(path)})"
    elif error.errno == errno.EFBIG:
        line = f"file too large writing {path} (the file system's or the process's file size limit, ulimit -f)"
    else:
        line = f"{path}: {error.strerror or first_line(error)}"
    return OSFaultError(line + then)


@contextlib.contextmanager
def os_faults(output_dir: str = None):
    """Turn an OSError of :data:`SYSTEM_ERRNOS` into an :class:`OSFaultError` (a file written without
    a name in the error, such as metrics.json, is named as a file in ``output_dir``)."""
    try:
        yield
    except OSError as e:
        if e.errno not in SYSTEM_ERRNOS:
            raise
        raise write_fault(e, e.filename or (output_dir and f"a file in {output_dir}")) from e


def prepare_output_dir(path: str, option: str = "OUTPUT_DIR") -> str:
    """
    Create the output folder ``path`` of a tool (its option or key is ``option``) and check that a
    file can be written there. The rule of every tool: raise :class:`OSFaultError` naming the option,
    the folder and the reason when it is empty, is a file, is under a file, cannot be created or
    cannot be written (permissions, a read-only file system, no space left).
    """
    if not path:
        raise OSFaultError(f"{option} is empty: give the folder the results go to")
    where = f"{option} {path}"
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OSFaultError(f"{where}: is a file, not a folder")
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OSFaultError(f"{where}: is under {existing}, which is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OSFaultError(f"{where}: cannot be created ({e.strerror or first_line(e)})") from e
    try:  # permissions (os.access would not see a read-only file system or ACLs)
        with tempfile.TemporaryFile(dir=path, prefix=".fpn_rpn_write_test"):
            pass
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSFaultError(f"{where}: no space left on device ({_free_mb(path)})") from e
        raise OSFaultError(f"{where}: cannot be written ({e.strerror or first_line(e)})") from e
    return path


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none), for quoting it."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def examples(values, limit: int = 5) -> str:
    """The first ``limit`` values, comma-separated, with ", ..." when there are more."""
    values = list(values)
    more = ", ..." if len(values) > limit else ""
    return ", ".join(v if isinstance(v, str) else repr(v) for v in values[:limit]) + more


