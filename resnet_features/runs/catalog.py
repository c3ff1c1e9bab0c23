"""Catalog: the one reader of an output's rows, for the user and every tool (search, probe).

The output contract is enforced here and nowhere else:

- only *finished* runs are data: published with `_SUCCESS` and a manifest (a run published
  past its error budget has no `_SUCCESS`, so its rows never count);
- only the files a run's manifest lists are read (stray or half-written files never count);
- runs are ordered by their manifest's `committed_at`, not by name;
- each input (uri) appears once, from the newest finished run that holds it: a changed image
  recomputed by a later `--incremental` run supersedes its old row.

Rows stream one record batch at a time, newest run first. Superseding is decided from the runs'
ledgers (`ledger.uri_hash` of their ok entries): while a run is read, the catalog holds the
hashes of the inputs newer runs claimed (8 bytes per input) plus one record batch; it never
holds the output. Hashes are 63-bit, so two different URIs share one with probability ~n^2/2^64
(one in 10^5 for 10^7 inputs); such a pair would lose the older row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from resnet_features.core import storage
from resnet_features.core.errors import SearchError
from resnet_features.runs.features import box_arrays, grid_arrays, region_arrays
from resnet_features.runs.layout import SUCCESS_FILE, SUMMARY_FILE
from resnet_features.runs.ledger import HASH, V1_LEDGER_FILE, uri_hash
from resnet_features.runs.protocol import RunInfo, finished_runs

__all__ = ["Catalog", "RunInfo", "load_detection_features", "load_features"]

BATCH_ROWS = 65_536
RUN_COLUMN = "run"


@dataclass(frozen=True)
class Catalog:
    """The finished runs of one output, oldest commit first, and their live rows."""

    fs: Any
    root: str
    uri: str
    runs: tuple[RunInfo, ...]

    @classmethod
    def open(cls, output_uri: str, storage_options: dict[str, Any] | None = None, *,
             run: str | None = None) -> Catalog:
        """The output's finished runs; `run` keeps that one only (SearchError if it is not a
        finished run)."""
        fs, root = storage.filesystem(output_uri, storage_options)
        runs = finished_runs(fs, root)
        if run is not None:
            runs = [r for r in runs if r.run_id == run]
            if not runs:
                raise SearchError(f"no finished run {run!r} under {output_uri}")
        return cls(fs=fs, root=root, uri=output_uri, runs=tuple(runs))

    # -- metadata ---------------------------------------------------------------------------

    def latest_summary(self) -> dict[str, Any]:
        """The summary of the newest finished run (by `committed_at`): the model, weights and
        preprocessing a query must be embedded with."""
        if not self.runs:
            raise SearchError(f"{self.uri} holds no finished run (a run=<id>/ folder with "
                              f"{SUCCESS_FILE}): is it an extraction output?")
        newest = self.runs[-1]
        for name in (SUMMARY_FILE, SUCCESS_FILE):
            summary = storage.read_json(self.fs, storage.join(newest.path, name))
            if summary is not None:
                return summary
        raise SearchError(f"the finished run {newest.run_id} of {self.uri} has no summary")

    def schema(self) -> pa.Schema:
        """Columns of the rows `iter_batches` yields (all runs' columns, unified, plus `run`)."""
        schemas = []
        for r in self.runs:
            if r.manifest["files"]:
                path = storage.join(r.path, r.manifest["files"][0])
                schemas.append(pq.read_schema(path, filesystem=self.fs).remove_metadata())
        schema = (pa.unify_schemas(schemas, promote_options="permissive") if schemas
                  else pa.schema([("uri", pa.string())]))
        if RUN_COLUMN in schema.names:
            schema = schema.remove(schema.get_field_index(RUN_COLUMN))
        return schema.append(pa.field(RUN_COLUMN, pa.string()))

    def num_rows(self) -> int:
        """Live rows (one per input), counted from the ledgers without reading any data file."""
        claimed = _empty_hashes()
        n = 0
        for k, r in enumerate(reversed(self.runs)):
            if k == 0 and len(self.runs) == 1:
                return int(r.manifest.get("rows", self._ledger_hashes(r).size))
            hashes = self._ledger_hashes(r)
            n += int((~_member(hashes, claimed)).sum())
            claimed = np.union1d(claimed, hashes)
        return n

    # -- rows -------------------------------------------------------------------------------

    def iter_batches(self, columns: list[str] | None = None,
                     batch_size: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        """Live rows, newest run first, as record batches with a `run` column: each input once,
        from the newest finished run holding it. `columns` selects columns (None: all); a
        column a run's files lack is left out of that run's batches."""
        want = None if columns is None else [c for c in columns if c != RUN_COLUMN]
        claimed = _empty_hashes()  # inputs newer runs hold
        newest_first = list(reversed(self.runs))
        for k, r in enumerate(newest_first):
            for rel in r.manifest["files"]:
                yield from self._file_batches(r, rel, want, claimed, batch_size)
            if k + 1 < len(newest_first):
                claimed = np.union1d(claimed, self._ledger_hashes(r))

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """All live rows in one table (see `iter_batches`): for outputs that fit in memory."""
        tables = [pa.Table.from_batches([b]) for b in self.iter_batches(columns)]
        if not tables:
            schema = self.schema()
            if columns is not None:
                names = [c for c in columns if c in schema.names]
                schema = pa.schema([schema.field(c) for c in names])
            return schema.empty_table()
        return pa.concat_tables(tables, promote_options="permissive")

    def embeddings(self, column: str = "embedding", batch_size: int = BATCH_ROWS
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(uris, (n, D) float32) per record batch of live rows: memory bounded by a batch."""
        names = self.schema().names
        if column not in names:
            raise SearchError(f"{self.uri} has no {column!r} column (columns: "
                              f"{', '.join(names)}); extract with --task embed/both")
        for batch in self.iter_batches(["uri", column], batch_size):
            if batch.num_rows:
                uris = batch.column("uri").to_numpy(zero_copy_only=False).astype(object)
                yield uris, embedding_matrix(batch.column(column))

    # -- internals --------------------------------------------------------------------------

    def _file_batches(self, r: RunInfo, rel: str, want: list[str] | None, claimed: np.ndarray,
                      batch_size: int) -> Iterator[pa.RecordBatch]:
        with self.fs.open(storage.join(r.path, rel), "rb") as f:
            pf = pq.ParquetFile(f)
            present = pf.schema_arrow.names
            cols = None if want is None else [c for c in dict.fromkeys(["uri", *want])
                                              if c in present]
            for batch in pf.iter_batches(batch_size=batch_size, columns=cols):
                if claimed.size:
                    keep = ~_member(uri_hash(batch.column("uri")), claimed)
                    if not keep.all():
                        batch = batch.filter(pa.array(keep))
                if want is not None and "uri" not in want:
                    batch = batch.drop_columns(["uri"])
                if RUN_COLUMN in batch.schema.names:
                    batch = batch.drop_columns([RUN_COLUMN])
                run = pa.array(np.full(batch.num_rows, r.run_id, dtype=object), pa.string())
                yield pa.RecordBatch.from_arrays(
                    [*batch.columns, run], schema=batch.schema.remove_metadata().append(
                        pa.field(RUN_COLUMN, pa.string())))

    def _ledger_hashes(self, r: RunInfo) -> np.ndarray:
        """Sorted hashes of the inputs a run holds rows for (its ledger's ok entries)."""
        files = r.manifest.get("ledger_files")
        parts = []
        if files is None:  # a run written before hash-sorted ledgers
            t = pq.read_table(storage.join(r.path, V1_LEDGER_FILE), filesystem=self.fs,
                              columns=["uri"], filters=[("status", "=", "ok")])
            parts.append(uri_hash(t.column("uri")))
        else:
            for e in files:
                t = pq.read_table(storage.join(r.path, e["path"]), filesystem=self.fs,
                                  columns=[HASH, "status"])
                t = t.filter(pc.equal(t.column("status"), "ok"))
                parts.append(t.column(HASH).to_numpy())
        return np.unique(np.concatenate(parts)) if parts else _empty_hashes()


def _empty_hashes() -> np.ndarray:
    return np.empty(0, dtype=np.int64)


def _member(hashes: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Mask of `hashes` found in a sorted, unique array."""
    if not sorted_set.size:
        return np.zeros(len(hashes), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_set, hashes), sorted_set.size - 1)
    return sorted_set[pos] == hashes


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list column as a writable, C-contiguous (n, D) float32 matrix."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not pa.types.is_fixed_size_list(column.type):
        raise SearchError(f"embedding column has type {column.type}, expected a fixed_size_list")
    dim = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)
    # A writable copy: Arrow buffers are read-only, and FAISS normalises in place.
    return np.array(values.reshape(-1, dim), dtype=np.float32, copy=True, order="C")


def load_features(output: str, run: str | None = None, *, columns: list[str] | None = None,
                  storage_options: dict[str, Any] | None = None) -> pa.Table:
    """Rows of finished runs only (those with `_SUCCESS`), with a `run` column, sorted by uri.

    With `run=None`, every input appears once: the row of the latest committed run holding it.
    `run="<id>"` reads that finished run only. Only the files each run's manifest lists are
    read, so stray or partial files never count.
    """
    cols = None if columns is None else list(dict.fromkeys(["uri", *columns]))
    table = Catalog.open(output, storage_options, run=run).read(cols)
    return table.sort_by("uri") if table.num_rows else table


def load_detection_features(output: str, run: str | None = None, *,
                            grid: tuple[str, ...] | list[str] = ("layer4",),
                            regions: bool = True, maps: bool = False,
                            storage_options: dict[str, Any] | None = None
                            ) -> dict[str, Any]:
    """`load_features` for detection outputs, ready for numpy: {"uri": (n,) array,
    "width"/"height": (n,), "grid_<layer>": [(H, W, C) float16] per row, "boxes": [(k, 4)],
    "region_features": [(k, C)], "region_maps": [(k, 7, 7, C)]} for the columns asked for
    (rows sorted by uri; images without boxes give (0, 4) and (0, C) arrays)."""

    columns = ["width", "height"]
    for layer in grid:
        columns += [f"grid_{layer}", f"grid_{layer}_h", f"grid_{layer}_w"]
    if regions:
        columns += ["boxes", "region_features"] + (["region_maps"] if maps else [])
    table = load_features(output, run, columns=columns, storage_options=storage_options)
    out: dict[str, Any] = {name: table.column(name).to_numpy(zero_copy_only=False)
                           for name in ("uri", "width", "height")}
    for layer in grid:
        out[f"grid_{layer}"] = grid_arrays(table, layer)
    if regions:
        out["boxes"] = box_arrays(table)
        out["region_features"] = region_arrays(table)
        if maps:
            out["region_maps"] = region_arrays(table, "region_maps")
    return out
