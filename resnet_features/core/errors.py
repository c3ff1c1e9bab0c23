"""Errors, both kinds: per-image failures as data (error columns and the `Stage` that fills them),
and the one exception hierarchy the entry scripts map to exit codes.

`UsageError` and its subclasses are the user's to fix (arguments, inputs, weights, heads, an
existing output): exit 2 with the message and no traceback. Anything else is a fault of the job
or the machines: exit 1 with its traceback in the log.
"""

from __future__ import annotations

import enum

import numpy as np

__all__ = [
    "ConfigError",
    "DeviceError",
    "HeadError",
    "InputError",
    "OutputExistsError",
    "SearchError",
    "Stage",
    "UsageError",
    "WeightsError",
    "error_columns",
    "ok_mask",
    "set_error",
]

MAX_MESSAGE_CHARS = 500


class UsageError(Exception):
    """Something the user must fix before the run can work; the message says what and how.
    The only exception the entry scripts turn into exit code 2."""


class ConfigError(UsageError):
    """A bad command line; the message names the flag and how to fix it."""


class InputError(UsageError):
    """The input cannot be listed or holds nothing to process (missing, empty, wrong format)."""


class WeightsError(UsageError):
    """The requested weights cannot be found, loaded or verified."""


class HeadError(UsageError):
    """A --head file that is missing, malformed or trained for other embeddings."""


class OutputExistsError(UsageError):
    """The output holds something the run protocol cannot take over."""


class DeviceError(UsageError):
    """The cluster lacks the device asked for (e.g. --device cuda without GPUs)."""


class SearchError(UsageError):
    """A search or probe over an output that cannot work (no finished run, wrong columns)."""


class Stage(str, enum.Enum):
    """Where an image failed; recorded in the `stage` column of the error rows."""

    LIST = "list"
    READ = "read"
    DECODE = "decode"
    PREPROCESS = "preprocess"
    INFER = "infer"
    WRITE = "write"


def error_columns(n: int) -> dict[str, np.ndarray]:
    """Empty error columns for a batch of `n` rows ("" = no error)."""
    return {
        "error_stage": np.full(n, "", dtype=object),
        "error_type": np.full(n, "", dtype=object),
        "error_message": np.full(n, "", dtype=object),
    }


def set_error(batch: dict[str, np.ndarray], i: int, stage: Stage, exc: BaseException) -> None:
    """Mark row `i` failed, keeping the first failure if a row fails twice."""
    if batch["error_stage"][i]:
        return
    batch["error_stage"][i] = stage.value
    batch["error_type"][i] = type(exc).__name__
    batch["error_message"][i] = (str(exc) or repr(exc))[:MAX_MESSAGE_CHARS]


def ok_mask(batch: dict[str, np.ndarray]) -> np.ndarray:
    return np.array([not s for s in batch["error_stage"]], dtype=bool)
