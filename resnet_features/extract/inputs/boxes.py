"""Boxes as input, on the driver at listing time: a column of Parquet/manifest inputs
(--boxes-column) or a sidecar file keyed by uri (--boxes-file), joined onto the listing as
`boxes_in` (JSON text per row, null where an input has none), which travels with each listing
row to the decode tasks (geometry.py checks and maps the boxes there)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from resnet_features.core import storage
from resnet_features.core.errors import InputError
from resnet_features.extract.inputs.common import Listing

__all__ = ["BOXES_COLUMN", "attach_boxes", "read_sidecar"]

log = logging.getLogger(__name__)

#: The listing column boxes travel in.
BOXES_COLUMN = "boxes_in"


def _as_json(cells: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A boxes column of any shape (list of 4-lists, flat list, JSON text) as JSON text."""
    if pa.types.is_string(cells.type) or pa.types.is_large_string(cells.type):
        return pc.cast(cells, pa.string()) if isinstance(cells, pa.Array) else pa.array(
            cells.to_pylist(), pa.string())
    # NaN/inf stay as such (Python's json writes and reads them), so the check names them.
    return pa.array([None if c is None else json.dumps(c) for c in cells.to_pylist()],
                    pa.string())


def read_sidecar(path: str, storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """A --boxes-file: Parquet, or JSON lines ({"uri": ..., "boxes": [[x1, y1, x2, y2], ...]})
    -> {uri: boxes as JSON text}."""
    fs, root = storage.filesystem(path, storage_options)
    if not fs.exists(root):
        raise InputError(f"--boxes-file {path} does not exist")
    with fs.open(root, "rb") as f:
        data = f.read()
    if data[:4] == b"PAR1":
        table = pq.read_table(pa.BufferReader(data))
        if not {"uri", "boxes"} <= set(table.column_names):
            raise InputError(f"--boxes-file {path} needs columns uri and boxes, has "
                             f"{', '.join(table.column_names)}")
        uris = table.column("uri").to_pylist()
        boxes = _as_json(table.column("boxes")).to_pylist()
    else:
        uris, boxes = [], []
        for n, line in enumerate(data.decode().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                uris.append(entry["uri"])
                boxes.append(json.dumps(entry["boxes"]))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise InputError(f"--boxes-file {path} line {n}: expected a JSON object with "
                                 f"keys uri and boxes ({type(exc).__name__}: {exc})") from None
    return dict(zip(uris, boxes))


def attach_boxes(listing: Listing, *, input_uri: str, column: str | None = None,
                 sidecar: str | None = None, keep: tuple[str, ...] = (),
                 storage_options: dict[str, Any] | None = None) -> Listing:
    """The listing with `boxes_in`: from `column` of the carried input columns (dropped from
    them unless also in `keep`), or from the `sidecar` file, matched on the uri as the output
    writes it or on its path relative to `input_uri`."""
    table = listing.table
    if column is not None:
        if listing.extra is None or column not in listing.extra.column_names:
            raise InputError(f"--boxes-column {column}: the input has no such column")
        cells = _as_json(listing.extra.column(column))
        extra = listing.extra if column in keep else listing.extra.drop_columns([column])
        extra = extra if extra.num_columns else None
        return replace(listing, table=table.append_column(BOXES_COLUMN, cells), extra=extra)
    lookup = read_sidecar(sidecar, storage_options)
    prefix = input_uri.rstrip("/") + "/"
    uris = table.column("uri").to_pylist()
    cells, used = [], set()
    for uri in uris:
        key = uri if uri in lookup else uri[len(prefix):] if uri.startswith(prefix) else uri
        value = lookup.get(key)
        if value is not None:
            used.add(key)
        cells.append(value)
    if not used:
        raise InputError(f"--boxes-file {sidecar}: none of its {len(lookup)} uris matches an "
                         f"input (e.g. {next(iter(lookup), '-')!r} vs the input "
                         f"{uris[0]!r}); write uris as the output does or relative to --input")
    missing = int(np.sum([c is None for c in cells]))
    if missing:
        log.warning("--boxes-file: %d of %d inputs have no entry (they become error rows)",
                    missing, len(uris))
    if len(lookup) > len(used):
        log.warning("--boxes-file: %d entries match no input", len(lookup) - len(used))
    return replace(listing, table=table.append_column(BOXES_COLUMN, pa.array(cells, pa.string())))
