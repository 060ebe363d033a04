"""How the command line reports a failure: one ``error:`` line, the traceback in a log file.

A user who points a build at a missing folder, a read-only output or a full disk should read
what to do, not a few hundred lines of stack. The full log of a command (Prefect's records
included, tracebacks and all) goes to ``OUT/_logs/<command>-<time>.log``; ``--debug`` shows
tracebacks on the terminal as well.
"""

from __future__ import annotations

import errno
import logging
import sys
import tempfile
import traceback
from datetime import datetime
from pathlib import Path

from pedsynth.redact import redact

LOG_DIR = "_logs"

_log_file: Path | None = None

# Exceptions a user can fix from the message alone (a path, a setting, a missing package).
_USER_ERRORS = (
    "ConfigError",
    "PreflightError",
    "EngineError",
    "ClipLoadError",
    "DeviceError",
    "DataError",
    "FailureBudgetExceeded",
)
_OS_HINTS = {
    errno.ENOSPC: "no space left on the device; free some space or choose another --out",
    errno.EDQUOT: "disk quota exceeded; free some space or choose another --out",
    errno.EROFS: "the file system is read-only; choose another --out",
    errno.EACCES: "permission denied; check the owner and mode of the path",
    errno.EPERM: "operation not permitted; check the owner and mode of the path",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "the path is a folder, not a file",
}


class PreflightError(RuntimeError):
    """Something the command can tell is wrong before it starts (a path, the disk)."""


class FailureBudgetExceeded(RuntimeError):
    """A model stage failed more of its requests than ``max_failure_rate`` allows."""


EXIT_USER_ERROR = 2
EXIT_FAILURE_BUDGET = 3


class _LogFile(logging.FileHandler):
    """The log file, which stops with one warning when it cannot be written (a full disk):
    logging's default would print a traceback for every record, and under Prefect's
    ``log_prints`` each of those prints is logged again."""

    broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.broken:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if self.broken:
            return
        self.broken = True
        reason = sys.exc_info()[1]
        sys.__stderr__.write(
            f"warning: the log file {self.baseFilename} cannot be written ({reason}); "
            "logging to the terminal only\n"
        )


def start_log_file(out: str | Path, command: str, *, debug: bool = False) -> Path:
    """Send every log record of this process, tracebacks included, to a new log file.

    Call it after Prefect has configured logging: Prefect leaves the root logger alone when
    it already has handlers, and the terminal would then show none of its lines.
    """
    global _log_file
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    folder = Path(out) / LOG_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir())
    path = folder / f"{command}-{stamp}.log"
    handler = _LogFile(path, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger().addHandler(handler)
    _log_file = path
    return path


def quiet_prefect_tracebacks(*, debug: bool = False) -> None:
    """Keep Prefect's terminal lines but not their tracebacks (they go to the log file)."""
    if debug:
        return
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ != "PrefectConsoleHandler":
            continue
        full_format = handler.format

        def short_format(record: logging.LogRecord, _format=full_format) -> str:
            saved = record.exc_info, record.exc_text, record.stack_info
            record.exc_info = record.exc_text = record.stack_info = None
            try:
                return _format(record).split("\nTraceback (most recent call last)", 1)[0]
            finally:
                record.exc_info, record.exc_text, record.stack_info = saved

        handler.format = short_format  # type: ignore[method-assign]


def is_user_error(exc: BaseException) -> bool:
    """Errors the message alone lets a user fix; anything else is a defect worth a traceback."""
    return type(exc).__name__ in _USER_ERRORS or isinstance(exc, OSError | ValueError)


def describe(exc: BaseException) -> str:
    """What went wrong and, where it can, what to do (the lines after ``error:``)."""
    if isinstance(exc, OSError) and exc.errno in _OS_HINTS:
        hint = _OS_HINTS[exc.errno]
        return f"{exc.filename}: {hint}" if exc.filename else hint
    message = str(exc).strip() or type(exc).__name__
    return message if is_user_error(exc) else f"{type(exc).__name__}: {message}"


def report(exc: BaseException) -> int:
    """Print the error line (and where the traceback went); return the exit code."""
    log = _log_file
    if not is_user_error(exc) or log is not None:
        if log is None:
            log = Path(tempfile.gettempdir()) / f"pedsynth-{datetime.now():%Y%m%dT%H%M%S}.log"
        try:
            with open(log, "a", encoding="utf-8") as fh:
                fh.write(redact("".join(traceback.format_exception(exc))))
        except OSError:
            log = None
    print(f"error: {redact(describe(exc))}", file=sys.stderr)
    if log is not None and not is_user_error(exc):
        print(f"  (traceback in {log}; rerun with --debug to see it here)", file=sys.stderr)
    if type(exc).__name__ == FailureBudgetExceeded.__name__:
        return EXIT_FAILURE_BUDGET
    return EXIT_USER_ERROR if is_user_error(exc) else 1
