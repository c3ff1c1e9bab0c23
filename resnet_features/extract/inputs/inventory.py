"""S3 Inventory reports as input: the report S3 writes each night lists the bucket, so a run needs
no LIST request at all. `--input` names the report's `manifest.json` (or a folder of them: the
newest is used), or its Parquet/ORC data files; one listing row per image object, with size and
ETag from the report as the fingerprint `--incremental` compares (the same one a listing gives)."""

from __future__ import annotations

import gzip
import io
import json
import logging
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote_plus

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from resnet_features.core import storage
from resnet_features.core.errors import InputError
from resnet_features.core.where import parse_where
from resnet_features.extract.inputs.common import (
    IMAGE_EXTENSIONS,
    LIST_THREADS,
    Listed,
    check_columns,
    extension,
    listing_table,
)

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
DATA_SUFFIXES = (".csv.gz", ".csv", ".parquet", ".orc")


def _snake(name: str) -> str:
    """CSV reports name their fields in the manifest as `LastModifiedDate`; Parquet and ORC
    reports' columns are `last_modified_date`. One spelling for --where and --keep-columns."""
    name = name.strip()
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def is_manifest(path: str) -> bool:
    return posixpath.basename(path) == MANIFEST_NAME


def _read_manifest(fs, path: str) -> dict:
    try:
        manifest = json.loads(fs.cat_file(path))
        files = [f["key"] for f in manifest["files"]]
        file_format = str(manifest["fileFormat"]).lower()
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{storage.full_uri(fs, path)} is no S3 Inventory manifest.json "
                         f"(needs fileFormat, fileSchema, files[].key): {exc}") from None
    if file_format not in ("csv", "parquet", "orc"):
        raise InputError(f"S3 Inventory fileFormat {manifest['fileFormat']!r} is not CSV, "
                         f"Parquet or ORC")
    schema = [_snake(c) for c in str(manifest.get("fileSchema", "")).split(",")]
    if file_format == "csv" and schema[:2] != ["bucket", "key"]:
        raise InputError(f"S3 Inventory manifest {path}: a CSV report's fileSchema starts with "
                         f"'Bucket, Key', got {manifest.get('fileSchema')!r}")
    return {"format": file_format, "schema": schema, "files": files,
            "bucket": str(manifest.get("destinationBucket", "")).rsplit(":", 1)[-1]}


def _data_root(fs, manifest_path: str, bucket: str, first_key: str) -> str:
    """Where the manifest's `files[].key` are relative to: the destination bucket on an object
    store; for a copy of the report (a local folder, another bucket) the nearest folder above
    the manifest that holds the first data file."""
    candidates = [bucket] if bucket else []
    parent = posixpath.dirname(manifest_path)
    while parent and parent not in ("/", "."):
        candidates.append(parent)
        parent = posixpath.dirname(parent)
    for root in candidates:
        if fs.exists(posixpath.join(root, first_key)):
            return root
    raise InputError(f"the S3 Inventory data file {first_key} named by {manifest_path} is "
                     f"neither in bucket {bucket!r} nor under a folder above the manifest")


def _read_data(fs, path: str, fmt: str, schema: list[str], columns: list[str], where) -> tuple:
    """The report rows of one data file (only `columns`; `where` pushed into Parquet reads) and
    how many rows it has before filtering."""
    with fs.open(path, "rb") as f:
        raw = f.read()
    if fmt == "csv":
        if path.lower().endswith(".gz"):
            raw = gzip.decompress(raw)
        types = {"bucket": pa.string(), "key": pa.string(), "version_id": pa.string(),
                 "e_tag": pa.string(), "size": pa.int64()}
        table = pacsv.read_csv(io.BytesIO(raw), read_options=pacsv.ReadOptions(
            column_names=schema), convert_options=pacsv.ConvertOptions(
                column_types={c: t for c, t in types.items() if c in schema},
                include_columns=columns))
        # A CSV report's keys are URL-encoded (form style: a space is '+', a '+' is '%2B').
        keys = [unquote_plus(k) for k in table.column("key").to_pylist()]
        table = table.set_column(table.column_names.index("key"), "key", pa.array(keys))
        total = table.num_rows
        if where is not None:
            table = table.filter(pa.array(where.mask(table)))
        return table, total
    if fmt == "orc":
        import pyarrow.orc as orc

        table = orc.ORCFile(io.BytesIO(raw)).read(columns=columns)
        total = table.num_rows
        if where is not None:
            table = table.filter(pa.array(where.mask(table)))
        return table, total
    pf = pq.ParquetFile(io.BytesIO(raw))
    total = pf.metadata.num_rows
    if where is None:
        return pf.read(columns=columns), total
    # Pushed down: row groups whose statistics exclude the predicate are not decoded.
    return pq.read_table(io.BytesIO(raw), columns=columns,
                         filters=where.expression(pf.schema_arrow)), total


def list_inventory(fs, files, spec) -> Listed:
    manifests = [p for p, *_ in files if is_manifest(p)]
    notes: dict = {}
    if manifests:
        path = max(manifests)  # report folders are named YYYY-MM-DDTHH-MMZ: the newest sorts last
        if len(manifests) > 1:
            log.info("s3-inventory: %d manifest.json found, using the newest: %s",
                     len(manifests), path)
        m = _read_manifest(fs, path)
        if not m["files"]:
            raise InputError(f"S3 Inventory manifest {path} lists no data files")
        root = _data_root(fs, path, m["bucket"], m["files"][0])
        data = [posixpath.join(root, k) for k in m["files"]]
        fmt, schema = m["format"], m["schema"]
        notes["manifest"] = storage.full_uri(fs, path)
    else:
        data = [p for p, *_ in files if p.lower().endswith(DATA_SUFFIXES)]
        if any(p.lower().endswith((".csv", ".csv.gz")) for p in data):
            raise InputError("a CSV S3 Inventory report has no header: point --input at its "
                             "manifest.json, which names the columns")
        if not data:
            raise InputError("no S3 Inventory manifest.json, Parquet or ORC report files in the "
                             "input")
        fmt = "orc" if data[0].lower().endswith(".orc") else "parquet"
        schema = []
    where = parse_where(spec.where)
    carry = list(spec.keep_columns)
    wanted = ["bucket", "key", "size", "e_tag", "last_modified_date", "is_latest",
              "is_delete_marker"]

    def columns_of(path: str) -> list[str]:
        if fmt == "csv":
            names = schema
        elif fmt == "orc":
            import pyarrow.orc as orc

            with fs.open(path, "rb") as f:
                names = orc.ORCFile(f).schema.names
        else:
            with fs.open(path, "rb") as f:
                names = pq.ParquetFile(f).schema_arrow.names
        check_columns(names, ["bucket", "key", "size"] + carry,
                      f"S3 Inventory report {storage.full_uri(fs, path)}")
        if where is not None:
            where.check_columns(names, f"S3 Inventory report {storage.full_uri(fs, path)}")
        return [c for c in dict.fromkeys(wanted + carry + (where.columns if where else []))
                if c in names]

    columns = columns_of(data[0])

    with ThreadPoolExecutor(LIST_THREADS) as pool:
        parts = list(pool.map(lambda p: _read_data(fs, p, fmt, schema, columns, where), data))
    total = sum(n for _, n in parts)
    table = pa.concat_tables([t for t, _ in parts], promote_options="permissive")
    kept = table.num_rows
    # A report of all versions also lists old versions and delete markers: only the latest
    # version of each live object is an input.
    if "is_latest" in table.column_names:
        table = table.filter(pc.fill_null(table.column("is_latest"), True))
    if "is_delete_marker" in table.column_names:
        table = table.filter(pc.invert(pc.fill_null(table.column("is_delete_marker"), False)))
    notes["not_latest"] = kept - table.num_rows
    table = table.sort_by([("bucket", "ascending"), ("key", "ascending")])
    keys = table.column("key").to_pylist()
    image = np.fromiter((extension(k) in IMAGE_EXTENSIONS for k in keys), bool, len(keys))
    skipped = int((~image).sum())
    table = table.filter(pa.array(image))
    uris = [f"s3://{b}/{k}" for b, k in zip(table.column("bucket").to_pylist(),
                                            table.column("key").to_pylist())]
    sizes = pc.fill_null(table.column("size"), 0).to_numpy()
    fingerprints = _fingerprints(table)
    n = len(uris)
    extra = table.select(carry) if carry else None
    notes.update({"files": len(data), "filtered": total - kept, "rows": total})
    return Listed(listing_table(uris, sizes, uris, [-1] * n, [-1] * n, fingerprints), extra,
                  skipped, notes)


def _fingerprints(table: pa.Table) -> list[str]:
    """`size:etag:E` as `common.stat_fingerprint` gives for the same object listed from S3, so
    a run on the report and a run on a listing of the bucket agree about what is unchanged;
    `size:mtime:T` when the report has no ETag field."""
    sizes = pc.fill_null(table.column("size"), 0).to_pylist()
    if "e_tag" in table.column_names:
        tags = table.column("e_tag").to_pylist()
        return [f"{s}:etag:{str(t).strip(chr(34))}" if t else f"{s}:etag:" for s, t in
                zip(sizes, tags)]
    if "last_modified_date" in table.column_names:
        col = table.column("last_modified_date")
        if pa.types.is_timestamp(col.type):
            col = pc.divide(pc.cast(pc.cast(col, pa.timestamp("ms")), pa.int64()), 1000.0)
        return [f"{s}:mtime:{t}" for s, t in zip(sizes, col.to_pylist())]
    return [f"{s}:" for s in sizes]
