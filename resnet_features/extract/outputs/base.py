"""What an output unit is: one self-contained column group of the output table.

A unit declares its Arrow fields, the backbone nodes it needs, how it computes its values from
one forward pass (in the model actor), how it encodes them (in the writer), and its entry in
the run summary and file metadata. The runner and the writer loop over units; neither knows
any unit by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["Forward", "OutputUnit", "fixed_size_list", "list_array", "ragged_list"]


@dataclass
class Forward:
    """One forward pass over a batch, as units see it (tensors are on the model's device).

    `rows` are the batch rows that have results; `acts` and `images` hold those rows only, in
    that order. Units return full-length (`n`) arrays; the other rows are never written."""

    n: int
    rows: np.ndarray
    acts: dict[str, Any]  # node name -> torch.Tensor (len(rows), ...)
    images: Any  # (len(rows), H, W, 3) uint8, numpy or a tensor on the device
    runner: Any  # the ModelRunner (device, spec, normalisation) for units that need the model


class OutputUnit:
    """Base class: override what the unit needs. Instances are built on the driver from the
    config (`from_config`) and pickled to the model actors, so they stay light; anything heavy
    (a second model, say) is built in `setup`, which runs once per actor."""

    #: The key of the unit's entry in `_summary.json` and the files' metadata.
    name: str = ""
    #: Backbone nodes the unit reads (`backbone.NODES`).
    nodes: frozenset[str] = frozenset()
    #: Columns `compute` adds that the writer consumes in `side_files` and never stores.
    transient: tuple[str, ...] = ()

    def fields(self) -> list[pa.Field]:
        """The unit's output columns, with standard Arrow types."""
        return []

    def setup(self, runner: Any) -> None:
        """Once per model actor, after the model is built."""

    def compute(self, fwd: Forward, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Columns for the batch (full length); `out` holds what earlier units computed."""
        return {}

    def encode(self, rows: dict[str, np.ndarray], stem: str) -> dict[str, pa.Array]:
        """Arrow arrays for the rows of one part (successful rows only, sorted by index);
        `stem` names the part (`part-a0-000000000-1a2b3c4d5e`)."""
        return {}

    def side_files(self, rows: dict[str, np.ndarray], stem_of: Callable[[int], str]
                   ) -> list[tuple[str, bytes]]:
        """Files to write beside the parts as a batch arrives: (path relative to the run,
        bytes). `stem_of(index)` names the part an input belongs to."""
        return []

    def metadata(self) -> dict[str, Any] | None:
        """The unit's entry in the summary and file metadata (None: no entry)."""
        return None

    def row_bytes(self) -> int:
        """Stored bytes per row, roughly: sizes the part files."""
        return 0

    def sized_for(self, listing: pa.Table) -> None:
        """On the driver, once the inputs are listed: units whose rows grow with the input
        (boxes per image) refine `row_bytes` before the files are sized."""


def fixed_size_list(values: np.ndarray, value_type: pa.DataType | None = None) -> pa.Array:
    """(n, d) array -> fixed_size_list<value_type>[d]: the standard type every reader knows."""
    value_type = value_type or pa.float32()
    dtype = value_type.to_pandas_dtype()
    values = np.ascontiguousarray(values, dtype=dtype)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), value_type),
                                             values.shape[1])


def list_array(values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """(n, k) array -> list<value_type> with k items per row."""
    n, k = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=value_type))


def ragged_list(cells: np.ndarray, dtype, value_type: pa.DataType, size: int | None = None
                ) -> pa.Array:
    """Rows of raw `dtype` bytes (any count of values each) -> list<value_type>, or, with
    `size`, list<fixed_size_list<value_type>[size]> (rows of whole items: boxes, vectors)."""
    counts = np.array([len(c) for c in cells], dtype=np.int64) // np.dtype(dtype).itemsize
    values = np.frombuffer(b"".join(cells), dtype=dtype)
    inner: pa.Array = pa.array(values, type=value_type)
    if size is not None:
        inner = pa.FixedSizeListArray.from_arrays(inner, size)
        counts //= size
    offsets = np.zeros(len(cells) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    if offsets[-1] < 2**31:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), inner)
    raise ValueError(f"{offsets[-1]} list items in one part: lower --rows-per-file")
