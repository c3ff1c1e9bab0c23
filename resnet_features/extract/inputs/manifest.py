"""Manifests: one file (txt/lst, CSV/TSV or Parquet) of image URIs, one listing row per entry.
Entries are never stat'ed while listing; each is fetched whole, as an image file is."""

from __future__ import annotations

import csv
import io
import posixpath

import pyarrow as pa
import pyarrow.parquet as pq

from resnet_features.core import storage
from resnet_features.core.errors import InputError
from resnet_features.core.where import parse_where
from resnet_features.extract.inputs.common import PARQUET_SUFFIXES, Listed, check_columns, listing_table


def list_manifest(fs, files, spec) -> Listed:
    if len(files) != 1:
        raise InputError(f"a manifest input is one file; found {len(files)} objects")
    path = files[0][0]
    base = storage.full_uri(fs, path).rsplit("/", 1)[0]
    carry = list(spec.keep_columns)
    where = parse_where(spec.where)
    filtered = 0
    with fs.open(path, "rb") as f:
        data = f.read()
    low = path.lower()
    if low.endswith(PARQUET_SUFFIXES):
        pf = pq.ParquetFile(io.BytesIO(data))
        check_columns(pf.schema_arrow.names, [spec.uri_column] + carry, f"manifest {path}")
        if where is None:
            t = pf.read()
        else:
            where.check_columns(pf.schema_arrow.names, f"manifest {path}")
            # Pushed down: row groups whose statistics exclude the predicate are not decoded.
            t = pq.read_table(io.BytesIO(data), filters=where.expression(pf.schema_arrow))
            filtered = pf.metadata.num_rows - t.num_rows
        values = t.column(spec.uri_column).to_pylist()
        keep = [v is not None and bool(str(v).strip()) for v in values]
        entries = [str(v).strip() for v, k in zip(values, keep) if k]
        extra = t.select(carry).filter(pa.array(keep)) if carry else None
    elif low.endswith((".csv", ".tsv")):
        text = data.decode("utf-8-sig")
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if low.endswith(".tsv") else ",")
        names = list(reader.fieldnames or [])
        check_columns(names, [spec.uri_column] + carry, f"manifest {path}")
        rows = [r for r in reader if (r.get(spec.uri_column) or "").strip()]
        if where is not None:
            where.check_columns(names, f"manifest {path}")
            mask = where.mask(pa.table({c: _typed([r.get(c) for r in rows])
                                        for c in where.columns}))
            filtered = int((~mask).sum())
            rows = [r for r, k in zip(rows, mask) if k]
        entries = [r[spec.uri_column].strip() for r in rows]
        extra = pa.table({c: [r.get(c) for r in rows] for c in carry}) if carry else None
    else:
        if where is not None:
            raise InputError("--where needs a CSV or Parquet manifest (a text manifest has one "
                             "URI per line and no columns)")
        if carry:
            raise InputError("--keep-columns needs a CSV or Parquet manifest (a text manifest "
                             "has one URI per line and no columns)")
        lines = [ln.strip() for ln in data.decode("utf-8-sig").splitlines()]
        entries = [ln for ln in lines if ln and not ln.startswith("#")]
        extra = None
    uris = [_resolve(e, base) for e in entries]
    n = len(uris)
    # Manifest entries are not stat'ed at listing time: their fingerprint is the URI alone
    # (--incremental skips a listed URI once computed; --fingerprint hash sees content changes).
    return Listed(listing_table(uris, [0] * n, uris, [-1] * n, [-1] * n, [""] * n), extra, 0,
                  {"manifest": path, "filtered": filtered})


def _typed(values: list) -> pa.Array:
    """A CSV column's text as numbers (or timestamps) when every non-empty cell is one, so that
    `--where "size < 50000000"` compares numbers; empty cells are nulls."""
    cells = pa.array([v if v not in (None, "") else None for v in values], pa.string())
    for t in (pa.int64(), pa.float64(), pa.timestamp("ms")):
        try:
            return cells.cast(t)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
    return cells


def _resolve(entry: str, base: str) -> str:
    """Manifest entries: URIs and absolute paths as given; relative paths from the manifest."""
    if "://" in entry or entry.startswith("/"):
        return entry
    proto, sep, path = base.rpartition("://")
    return f"{proto}{sep}{posixpath.normpath(posixpath.join(path, entry))}"
