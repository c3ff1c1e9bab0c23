"""Numpy views of the detection columns (docs/detection-features.md): grid maps as (H, W, C)
arrays and boxes / region features as (k, 4) / (k, C) arrays per row, from any Arrow table
read from the output (DuckDB, Polars and pyarrow read the same columns directly)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

__all__ = ["box_arrays", "grid_arrays", "region_arrays"]


def _combined(table: pa.Table, column: str) -> pa.Array:
    col = table.column(column)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _split(column: pa.Array, item: int) -> list[np.ndarray]:
    """list<...> rows -> one (count, item) array per row (item 0: flat rows), views of one
    buffer. `offsets` index the list's whole child array (`values` ignores slicing)."""
    offsets = column.offsets.to_numpy()
    values = column.values
    if pa.types.is_fixed_size_list(values.type):
        values = values.flatten()
    flat = values.to_numpy(zero_copy_only=False)
    if not item:
        return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    return [flat[a * item:b * item].reshape(-1, item) for a, b in zip(offsets[:-1], offsets[1:])]


def grid_arrays(table: pa.Table, layer: str = "layer4") -> list[np.ndarray]:
    """Column `grid_<layer>` as one (H, W, C) float16 array per row."""
    col = _combined(table, f"grid_{layer}")
    h = table.column(f"grid_{layer}_h").to_numpy()
    w = table.column(f"grid_{layer}_w").to_numpy()
    return [r.reshape(int(hh), int(ww), -1) for r, hh, ww in zip(_split(col, 0), h, w)]


def box_arrays(table: pa.Table) -> list[np.ndarray]:
    """Column `boxes` as one (k, 4) float32 array per row (pixel xyxy, oriented image)."""
    return _split(_combined(table, "boxes"), 4)


def region_arrays(table: pa.Table, column: str = "region_features") -> list[np.ndarray]:
    """`region_features` as one (k, C) array per row; `region_maps` as (k, 7, 7, C)."""
    col = _combined(table, column)
    size = col.type.value_type.list_size
    rows = _split(col, size)
    if column == "region_maps":
        c = size // 49
        rows = [r.reshape(-1, 7, 7, c) for r in rows]
    return rows
