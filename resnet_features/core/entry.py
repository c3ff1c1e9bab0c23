"""What every entry script does around its work: logging, and exit codes from the error hierarchy.

`UsageError` (and its subclasses) -> exit 2 with its message and no traceback: the user must fix
something. Any other exception -> exit 1 with its traceback in the log: a fault of the job, the
storage or the machines. argparse's own errors exit 2 before any of this runs.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from resnet_features.core.errors import UsageError
from resnet_features.core.logs import setup_logging

__all__ = ["EXIT_FAILED", "EXIT_USAGE", "NOT_RESUMABLE", "exit_process", "run_main"]

EXIT_FAILED = 1
EXIT_USAGE = 2

#: Faults of the code itself: rerunning the same command fails the same way.
NOT_RESUMABLE = (AssertionError, AttributeError, ImportError, NameError, NotImplementedError,
                 TypeError)

log = logging.getLogger("resnet_features")


def run_main(fn: Callable[[], int], *, what: str = "the command",
             resume_hint: str | None = None) -> int:
    """Run `fn` (an entry script's body, returning its exit code) and map its exceptions.

    `resume_hint` ends the last stderr line of a failure that a rerun can get past (storage
    down, a dead cluster); failures in NOT_RESUMABLE never get it.
    """
    setup_logging()
    try:
        return fn()
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - the one place every other failure is reported
        log.exception("%s failed", what)
        first_line = (str(exc).splitlines() or [""])[0]
        line = f"error: {what} failed ({type(exc).__name__}: {first_line})"
        if isinstance(exc, NOT_RESUMABLE):
            line += "; this is a bug, not something a rerun fixes: please report the traceback above"
        elif resume_hint:
            line += f"; {resume_hint}"
        print(line, file=sys.stderr)
        return EXIT_FAILED


def exit_process(code: int) -> NoReturn:
    """End the process now with `code`, after flushing the logs and standard streams.

    For an entry script whose work is done and durable (output committed, Ray shut down):
    Python's own teardown of torch, Ray and Arrow then takes 1-1.5 s on 2 cores (module
    finalisers, unloading libraries) and has nothing left to do. No atexit handler runs, so
    the caller must have released what needs releasing.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
