"""Parquet files with an image-bytes column: one listing row per table row, fetched by reading
only the row groups of a block's rows (a column chunk is the smallest unit Parquet can fetch)."""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from resnet_features.core import storage
from resnet_features.core.errors import InputError, Stage, set_error
from resnet_features.core.where import parse_where
from resnet_features.extract.inputs.common import (
    INPUT_FAULTS,
    LIST_THREADS,
    PARQUET_SUFFIXES,
    Fetcher,
    Listed,
    _Unreadable,
    check,
    check_columns,
    listing_table,
)


def _image_field(schema: pa.Schema, column: str) -> None:
    if column not in schema.names:
        raise InputError(f"Parquet input has no column {column!r} (columns: "
                         f"{', '.join(schema.names)}); name the image-bytes column with "
                         f"--image-column")
    t = schema.field(column).type
    ok = pa.types.is_binary(t) or pa.types.is_large_binary(t) or (
        pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)
    if not ok:
        raise InputError(f"--image-column {column!r} has type {t}; it must hold image bytes "
                         f"(binary) or a struct with a 'bytes' field")


def list_parquet(fs, files, spec) -> Listed:
    paths = [p for p, *_ in files if p.lower().endswith(PARQUET_SUFFIXES)]
    skipped_files = len(files) - len(paths)
    carry = ([spec.id_column] if spec.id_column else []) + [
        c for c in spec.keep_columns if c != spec.id_column]
    where = parse_where(spec.where)

    def read(path):
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            _image_field(schema, spec.image_column)
            check_columns(schema.names, carry, f"Parquet file {path}")
            md = pf.metadata
            groups = np.repeat(np.arange(md.num_row_groups),
                               [md.row_group(g).num_rows for g in range(md.num_row_groups)])
            rows = np.arange(md.num_rows, dtype=np.int64)
            if where is not None:
                # Only the predicate's columns are read (never the image bytes); the listing
                # keeps file row numbers, which is what a fetch reads by.
                where.check_columns(schema.names, f"Parquet file {storage.full_uri(fs, path)}")
                rows = np.flatnonzero(where.mask(pf.read(columns=where.columns)))
            extra = pf.read(columns=carry).take(pa.array(rows)) if carry else None
            return rows, extra, groups[rows], md.num_rows

    with ThreadPoolExecutor(LIST_THREADS) as pool:
        per_file = list(pool.map(read, paths))
    file_fp = {p: fp for p, _, fp in files}
    uris, sources, offsets, groups, extras, fingerprints = [], [], [], [], [], []
    filtered = 0
    for path, (rows, extra, row_groups, total) in zip(paths, per_file):
        file_uri = storage.full_uri(fs, path)
        uris += [f"{file_uri}#{i}" for i in rows]
        fingerprints += [f"{file_fp[path]}#{i}" for i in rows]  # changes with the file
        sources += [file_uri] * len(rows)
        offsets.append(rows)
        groups.append(row_groups)
        filtered += total - len(rows)
        if extra is not None:
            extras.append(extra)
    n = len(uris)
    table = listing_table(uris, [0] * n, sources,
                          np.concatenate(offsets) if offsets else np.zeros(0, np.int64),
                          np.concatenate(groups) if groups else np.zeros(0, np.int64), fingerprints)
    extra = pa.concat_tables(extras, promote_options="permissive") if extras else None
    return Listed(table, extra, 0, {"files": len(paths), "skipped_files": skipped_files,
                                    "filtered": filtered})


def parquet_units(table: pa.Table) -> np.ndarray:
    """Each row group of each file is one read unit (`length` holds the row group)."""
    src = table.column("source").to_numpy(zero_copy_only=False)
    changed = src[1:] != src[:-1]
    rg = table.column("length").to_numpy()
    return np.flatnonzero(changed | (rg[1:] != rg[:-1])) + 1


def read_parquet(reader: Fetcher, fs, batch, sources, out, data) -> None:
    by_file: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(sources):
        by_file[s].append(i)
    rows_in_file = batch["offset"]

    def read(source: str):
        try:
            with fs.open(fs._strip_protocol(source), "rb") as f:
                pf = pq.ParquetFile(f)
                return _parquet_cells(pf, reader.image_column,
                                      [int(rows_in_file[i]) for i in by_file[source]])
        except INPUT_FAULTS as exc:
            return exc

    with ThreadPoolExecutor(min(16, len(by_file))) as pool:
        results = list(pool.map(read, by_file))
    for (_, rows), cells in zip(by_file.items(), results):
        for j, i in enumerate(rows):
            value = cells if isinstance(cells, BaseException) else cells[j]
            if not check(out, i, value):
                continue
            if not value:
                set_error(out, i, Stage.READ, _Unreadable(
                    f"empty or null image bytes in column {reader.image_column!r}"))
            else:
                data[i] = value


def _parquet_cells(pf: pq.ParquetFile, column: str, rows: list[int]) -> list[bytes | None]:
    """The image bytes of the given rows (file row numbers), reading only their row groups."""
    md = pf.metadata
    starts = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])
    groups = sorted({int(np.searchsorted(starts, r, side="right") - 1) for r in rows})
    table = pf.read_row_groups(groups, columns=[column])
    col = table.column(column)
    if pa.types.is_struct(col.type):
        col = pa.chunked_array([c.field("bytes") for c in col.chunks], col.type.field("bytes").type)
    # Row r of the file is row (r - starts[g]) + (rows of earlier selected groups) of `table`.
    base, local = {}, 0
    for g in groups:
        base[g] = local - int(starts[g])
        local += md.row_group(g).num_rows
    picks = [r + base[int(np.searchsorted(starts, r, side="right") - 1)] for r in rows]
    return col.take(pa.array(picks, pa.int64())).to_pylist()
