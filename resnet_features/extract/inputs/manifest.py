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
from resnet_features.extract.inputs.common import PARQUET_SUFFIXES, Listed, check_columns, listing_table


def list_manifest(fs, files, spec) -> Listed:
    if len(files) != 1:
        raise InputError(f"a manifest input is one file; found {len(files)} objects")
    path = files[0][0]
    base = storage.full_uri(fs, path).rsplit("/", 1)[0]
    carry = list(spec.keep_columns)
    with fs.open(path, "rb") as f:
        data = f.read()
    low = path.lower()
    if low.endswith(PARQUET_SUFFIXES):
        t = pq.read_table(io.BytesIO(data))
        check_columns(t.column_names, [spec.uri_column] + carry, f"manifest {path}")
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
        entries = [r[spec.uri_column].strip() for r in rows]
        extra = pa.table({c: [r.get(c) for r in rows] for c in carry}) if carry else None
    else:
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
                  {"manifest": path})


def _resolve(entry: str, base: str) -> str:
    """Manifest entries: URIs and absolute paths as given; relative paths from the manifest."""
    if "://" in entry or entry.startswith("/"):
        return entry
    proto, sep, path = base.rpartition("://")
    return f"{proto}{sep}{posixpath.normpath(posixpath.join(path, entry))}"
