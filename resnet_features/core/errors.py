"""Per-image failures as data: the error columns every batch carries and the stages that fill them."""

from __future__ import annotations

import enum

import numpy as np

__all__ = ["Stage", "error_columns", "set_error", "ok_mask"]

MAX_MESSAGE_CHARS = 500


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
