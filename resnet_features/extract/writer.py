"""Writing: result batches to Parquet parts with an explicit Arrow schema, errors, and ledger.

Rows are assigned to parts by their listing index (`index // rows_per_file`), so the same
listing always yields the same file names and contents: a retried write replaces a file instead
of adding a duplicate. A part is written once all of its inputs have come back (as result or
error rows), sorted by index. Everything goes into the run's staging folder (see `runs.py`):
each file is written under `_tmp/` and renamed into place, and a part is *committed* by its
ledger fragment (`_ledger/<part>`: uri, fingerprint, status), written last. A resumed run reuses
exactly the committed parts. Rows that come back twice (a retried task) are dropped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from resnet_features.core import storage
from resnet_features.extract.outputs import OutputUnit, output_schema, row_bytes
from resnet_features.runs.layout import ERRORS_DIR, EXPLAIN_PNG_DIR, LEDGER_DIR, LEDGER_SCHEMA, TMP_DIR  # noqa: F401

__all__ = ["ERROR_SCHEMA", "LEDGER_SCHEMA", "PartWriter", "WriteStats", "auto_rows_per_file",
           "part_name"]

log = logging.getLogger(__name__)

ERROR_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
        ("size_bytes", pa.int64()),
    ]
)


#: Output file size `auto_rows_per_file` aims at: big enough for efficient downstream scans,
#: small enough for many parallel readers (64-256 MB is the usual advice for Parquet).
TARGET_FILE_BYTES = 128 * 1024 * 1024


def auto_rows_per_file(units: list[OutputUnit] | tuple[OutputUnit, ...]) -> int:
    """Rows per part for ~TARGET_FILE_BYTES files, from the units' stored bytes per row (float
    embeddings barely compress, so the estimate is close); at least 64 rows."""
    return max(64, TARGET_FILE_BYTES // row_bytes(units))


#: Row group size aimed at: DuckDB and Polars stream and parallelise by row group, so a part of
#: large rows (grid maps, region features) is cut into several instead of one ~128 MB group.
TARGET_ROW_GROUP_BYTES = 16 * 1024 * 1024


def auto_row_group_rows(units: list[OutputUnit] | tuple[OutputUnit, ...]) -> int:
    """Rows per row group for ~TARGET_ROW_GROUP_BYTES groups; at least 1."""
    return max(1, TARGET_ROW_GROUP_BYTES // row_bytes(units))


def part_name(part: int, attempt: int = 0) -> str:
    """`part-00000.parquet`; parts of a resumed attempt k>0 are `part-00000-rk.parquet`."""
    return f"part-{part:05d}.parquet" if attempt == 0 else f"part-{part:05d}-r{attempt}.parquet"


@dataclass
class WriteStats:
    succeeded: int = 0
    failed: int = 0
    failed_by_stage: dict[str, int] = field(default_factory=dict)
    data_files: list[str] = field(default_factory=list)
    error_files: list[str] = field(default_factory=list)


class PartWriter:
    """Collects result batches (any order) and writes each part as soon as it is complete.

    `output_uri` is the run's staging folder; `attempt` numbers the resumed attempts of a run so
    that their parts never collide with the parts a dead attempt committed.
    """

    def __init__(
        self,
        output_uri: str,
        *,
        units: tuple[OutputUnit, ...],
        listing: pa.Table,
        rows_per_file: int,
        file_metadata: dict[str, Any],
        storage_options: dict[str, Any] | None = None,
        extra: pa.Table | None = None,
        attempt: int = 0,
    ):
        self.fs, self.root = storage.filesystem(output_uri, storage_options)
        self.attempt = attempt
        self.output_uri = output_uri
        self.units = tuple(units)
        self.rows_per_file = rows_per_file
        self.row_group_rows = auto_row_group_rows(self.units)
        meta = {"resnet_features": json.dumps(file_metadata, sort_keys=True)}
        # Input columns carried through (--id-column/--keep-columns), row i = listing index i.
        self.extra = extra
        self.schema = output_schema(self.units, meta,
                                    carried=extra.schema if extra is not None else None)
        self.transient = tuple(c for u in self.units for c in u.transient)
        self.error_schema = ERROR_SCHEMA.with_metadata(meta)
        self.n_inputs = listing.num_rows
        self.n_parts = max(1, -(-self.n_inputs // rows_per_file))
        self.size_bytes = listing.column("size_bytes").to_numpy()
        self.uris = listing.column("uri").to_pylist()
        self.fingerprints = np.asarray(listing.column("fingerprint").to_pylist(), dtype=object)
        self.seen = np.zeros(self.n_inputs, dtype=bool)
        self.duplicates_dropped = 0
        self.pending: dict[int, list[dict[str, np.ndarray]]] = {}
        self.remaining = {p: self._part_len(p) for p in range(self.n_parts)}
        self.stats = WriteStats()
        for sub in (TMP_DIR, ERRORS_DIR, LEDGER_DIR):
            self.fs.makedirs(storage.join(self.root, sub), exist_ok=True)

    def _part_len(self, part: int) -> int:
        return min(self.rows_per_file, self.n_inputs - part * self.rows_per_file)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Take a result batch; write every part it completes."""
        if self.transient:
            self._write_side_files(batch)
            batch = {k: v for k, v in batch.items() if k not in self.transient}
        index = batch["index"].astype(np.int64)
        keep = ~self.seen[index]
        first = np.zeros(len(index), dtype=bool)
        first[np.unique(index, return_index=True)[1]] = True
        keep &= first
        if not keep.all():
            # At-least-once upstream (a retried task or restarted actor): keep the first copy.
            self.duplicates_dropped += int((~keep).sum())
            log.warning("dropped %d duplicate result rows (retried work)", int((~keep).sum()))
            batch = {k: v[keep] for k, v in batch.items()}
        self.seen[batch["index"].astype(np.int64)] = True
        parts = batch["index"] // self.rows_per_file
        for part in np.unique(parts):
            sel = np.flatnonzero(parts == part)
            self.pending.setdefault(int(part), []).append({k: v[sel] for k, v in batch.items()})
            self.remaining[int(part)] -= len(sel)
            if self.remaining[int(part)] == 0:
                self._write_part(int(part))
            elif self.remaining[int(part)] < 0:
                raise RuntimeError(f"part {part} received more rows than it has inputs")

    def _write_part(self, part: int) -> None:
        chunks = self.pending.pop(part)
        merged = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        order = np.argsort(merged["index"], kind="stable")
        merged = {k: v[order] for k, v in merged.items()}
        failed = np.array([bool(s) for s in merged["error_stage"]], dtype=bool)
        ok = ~failed
        name = part_name(part, self.attempt)
        files = np.full(len(failed), name, dtype=object)
        if ok.any():
            self._write(self._rows_table({k: v[ok] for k, v in merged.items()},
                                         name.removesuffix(".parquet")), name)
        if failed.any():
            files[failed] = storage.join(ERRORS_DIR, name)
            self._write(self._errors_table({k: v[failed] for k, v in merged.items()}),
                        storage.join(ERRORS_DIR, name))
            for stage in merged["error_stage"][failed]:
                self.stats.failed_by_stage[stage] = self.stats.failed_by_stage.get(stage, 0) + 1
        ledger = pa.Table.from_pydict(
            {
                "uri": merged["uri"].astype(str).tolist(),
                "fingerprint": self.fingerprints[merged["index"].astype(np.int64)].tolist(),
                "status": np.where(failed, "error", "ok").tolist(),
                "file": files.tolist(),
            },
            schema=LEDGER_SCHEMA,
        )
        self._write(ledger, storage.join(LEDGER_DIR, name))  # last: commits the part
        self.stats.succeeded += int(ok.sum())
        self.stats.failed += int(failed.sum())

    def _rows_table(self, rows: dict[str, np.ndarray], stem: str) -> pa.Table:
        cols: dict[str, pa.Array] = {"uri": pa.array(rows["uri"].astype(str), pa.string())}
        for unit in self.units:
            cols.update(unit.encode(rows, stem))
        cols["width"] = pa.array(rows["width"].astype(np.int32))
        cols["height"] = pa.array(rows["height"].astype(np.int32))
        if self.extra is not None:
            taken = self.extra.take(pa.array(rows["index"].astype(np.int64)))
            for name in taken.column_names:
                cols[name] = taken.column(name).combine_chunks()
        return pa.Table.from_pydict(cols, schema=self.schema)

    def part_stem(self, index: int) -> str:
        """The stem of the part an input (listing index) belongs to: `part-00000[-rk]`."""
        return part_name(index // self.rows_per_file, self.attempt).removesuffix(".parquet")

    def _write_side_files(self, batch: dict[str, np.ndarray]) -> None:
        """The units' files beside the parts (e.g. --explain-png overlays), written as the
        batch arrives, for the rows that succeeded; before their part's ledger commits it."""
        ok = np.flatnonzero([not s for s in batch["error_stage"]])
        rows = {k: v[ok] for k, v in batch.items()}
        for unit in self.units:
            for rel, data in unit.side_files(rows, self.part_stem):
                full = storage.join(self.root, rel)
                self.fs.makedirs(full.rsplit("/", 1)[0], exist_ok=True)
                with self.fs.open(full, "wb") as f:
                    f.write(data)

    def _errors_table(self, rows: dict[str, np.ndarray]) -> pa.Table:
        return pa.Table.from_pydict(
            {
                "uri": rows["uri"].astype(str).tolist(),
                "stage": rows["error_stage"].astype(str).tolist(),
                "error_type": rows["error_type"].astype(str).tolist(),
                "message": rows["error_message"].astype(str).tolist(),
                # The reader's size where it knows better (Parquet cells, manifest entries).
                "size_bytes": (rows["size_bytes"] if "size_bytes" in rows
                               else self.size_bytes[rows["index"]]).astype(np.int64),
            },
            schema=self.error_schema,
        )

    def _write(self, table: pa.Table, relpath: str) -> None:
        tmp = storage.join(self.root, TMP_DIR, relpath.replace("/", "__"))
        final = storage.join(self.root, relpath)
        with self.fs.open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd", row_group_size=self.row_group_rows)
        self.fs.mv(tmp, final)
        if relpath.startswith(LEDGER_DIR):
            return
        files = self.stats.error_files if relpath.startswith(ERRORS_DIR) else self.stats.data_files
        files.append(relpath)

    def missing_indices(self) -> list[int]:
        """Listing indices that never came back: a pipeline bug, never silently dropped."""
        got: set[int] = set()
        for chunks in self.pending.values():
            for c in chunks:
                got.update(int(i) for i in c["index"])
        missing = []
        for part, left in self.remaining.items():
            if left:
                start = part * self.rows_per_file
                missing += [i for i in range(start, start + self._part_len(part)) if i not in got]
        return missing

    def close(self) -> None:
        """Write incomplete parts (their rows exist; the missing ones are reported) and tidy up."""
        for part in sorted(self.pending):
            self._write_part(part)
        tmp = storage.join(self.root, TMP_DIR)
        if self.fs.exists(tmp):
            self.fs.rm(tmp, recursive=True)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
