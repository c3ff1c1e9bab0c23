"""Writing: result batches to Parquet parts where the rows are, and the driver's commit log.

A part is one batch of result rows, written by whoever holds the rows (a Ray write task on a
worker node, `PartSink`): rows sorted by listing index (so by uri within the part), an explicit
Arrow schema, error rows beside them, each file under `_tmp/` and renamed into place, and last
the part's ledger fragment (`_ledger/<part>`: uri, fingerprint, status, file) which *commits*
it. A part's name is derived from the attempt and the listing indices it holds, so a retried
write of the same rows replaces its files instead of adding a copy. The sink returns one small
record per part (name, files, indices, per-row status code, counts, node, seconds); the driver
keeps only those (`CommitLog`): coverage (every input exactly once), counts, and what is
missing. Parts that overlap under different names (rows retried in another grouping) are made
disjoint by the run protocol before anything is published (`RunLayout.reconcile`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from resnet_features.core import storage
from resnet_features.core.errors import Stage
from resnet_features.extract.outputs import OutputUnit, output_schema, row_bytes
from resnet_features.runs.layout import ERRORS_DIR, LEDGER_DIR, LEDGER_SCHEMA, TMP_DIR

__all__ = ["ERROR_SCHEMA", "LEDGER_SCHEMA", "CommitLog", "PartSink", "PartWriter",
           "RECORD_STAGES", "STAGE_CODES", "auto_rows_per_file", "part_name"]

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

#: Per-row status in a part's record: 0 = ok, else 1 + the failed stage's position here.
STAGE_CODES: tuple[str, ...] = tuple(s.value for s in Stage)

#: Pipeline stages that stamp their busy time (`_t_<stage>`) and node (`_node_<stage>`) on
#: every row; the sink sums them per part, so the driver learns per-stage throughput and the
#: nodes that took part without seeing a row.
RECORD_STAGES: tuple[str, ...] = ("read", "decode", "model")


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


def part_name(indices: np.ndarray, attempt: int = 0) -> str:
    """`part-a<attempt>-<first index>-<digest of all indices>.parquet`: the same rows always
    get the same name (a retried write replaces its files), different row sets never share
    one, and names sort by the first listing index they hold."""
    idx = np.ascontiguousarray(np.sort(np.asarray(indices, dtype=np.int64)))
    digest = hashlib.blake2b(idx.tobytes(), digest_size=5).hexdigest()
    first = int(idx[0]) if len(idx) else 0
    return f"part-a{attempt}-{first:09d}-{digest}.parquet"


class PartSink:
    """Writes one batch of result rows as one committed part and returns its record (Ray-free;
    the pipeline runs it as write tasks on the workers, tests and benchmarks call it directly).

    `output_uri` is the run's staging folder; `attempt` numbers the resumed attempts of a run
    so that their parts never collide with the parts a dead attempt committed. `extra` holds
    the carried input columns (--id-column/--keep-columns), row i = listing index i. `node`
    is the Ray node id of the process that writes (set by the pipeline's write task): each
    part's file metadata names it as `writer_node`, and its record as `node_write`.
    """

    def __init__(self, output_uri: str, *, units: tuple[OutputUnit, ...],
                 file_metadata: dict[str, Any], storage_options: dict[str, Any] | None = None,
                 attempt: int = 0, extra_schema: pa.Schema | None = None):
        self.output_uri = output_uri
        self.storage_options = storage_options
        self.attempt = attempt
        self.units = tuple(units)
        self.row_group_rows = auto_row_group_rows(self.units)
        self.file_metadata = dict(file_metadata)
        meta = {"resnet_features": json.dumps(self.file_metadata, sort_keys=True)}
        self.schema = output_schema(self.units, meta, carried=extra_schema)
        self.error_schema = ERROR_SCHEMA.with_metadata(meta)
        self.transient = tuple(c for u in self.units for c in u.transient)
        self.extra: pa.Table | None = None  # set before the first call when extra_schema is
        self.node: str | None = None
        self._fs = None

    def __getstate__(self):
        return {**self.__dict__, "_fs": None, "extra": None}

    @property
    def fs(self):
        if self._fs is None:
            self._fs, self.root = storage.filesystem(self.output_uri, self.storage_options)
        return self._fs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        index = np.asarray(batch["index"], dtype=np.int64)
        order = np.argsort(index, kind="stable")
        first = np.ones(len(index), dtype=bool)
        first[1:] = index[order][1:] != index[order][:-1]  # a row repeated within the batch
        keep = order[first]
        duplicates = int(len(index) - len(keep))
        rows = {k: v[keep] for k, v in batch.items()}
        index = index[keep]
        name = part_name(index, self.attempt)
        stem = name.removesuffix(".parquet")
        stages = np.asarray(rows["error_stage"], dtype=object)
        failed = np.array([bool(s) for s in stages], dtype=bool)
        ok = ~failed
        fs = self.fs
        written = 0
        if self.transient:
            good = {k: v[ok] for k, v in rows.items()}
            for unit in self.units:
                for rel, data in unit.side_files(good, lambda _i: stem):
                    full = storage.join(self.root, rel)
                    fs.makedirs(full.rsplit("/", 1)[0], exist_ok=True)
                    with fs.open(full, "wb") as f:
                        f.write(data)
                    written += len(data)
        files = np.full(len(index), name, dtype=object)
        data_file = error_file = ""
        if ok.any():
            data_file = name
            written += self._write(self._rows_table({k: v[ok] for k, v in rows.items()}, stem),
                                   name)
        if failed.any():
            error_file = storage.join(ERRORS_DIR, name)
            files[failed] = error_file
            written += self._write(self._errors_table({k: v[failed] for k, v in rows.items()}),
                                   error_file)
        ledger = pa.Table.from_pydict(
            {"uri": rows["uri"].astype(str).tolist(),
             "fingerprint": rows["fingerprint"].astype(str).tolist(),
             "status": np.where(failed, "error", "ok").tolist(),
             "file": files.tolist()},
            schema=LEDGER_SCHEMA)
        written += self._write(ledger, storage.join(LEDGER_DIR, name))  # last: the commit
        codes = np.zeros(len(index), dtype=np.int8)
        for i in np.flatnonzero(failed):
            codes[i] = 1 + STAGE_CODES.index(stages[i]) if stages[i] in STAGE_CODES else 1
        record: dict[str, Any] = {
            "part": name, "data_file": data_file, "error_file": error_file,
            "indices": index.tobytes(), "status": codes.tobytes(),
            "rows": len(index), "duplicates": duplicates,
            "bytes_written": written,
            "bytes_read": int(np.sum(rows["bytes_read"])) if "bytes_read" in rows else 0,
            "write_seconds": time.perf_counter() - t0,
            "node_write": self.node or os.uname().nodename,
        }
        for stage in RECORD_STAGES:
            t = rows.get(f"_t_{stage}")
            record[f"t_{stage}"] = float(np.sum(t)) if t is not None else 0.0
            nodes = rows.get(f"_node_{stage}")
            record[f"node_{stage}"] = ",".join(sorted(set(nodes.tolist()))) \
                if nodes is not None else ""
        return {k: np.array([v], dtype=object if isinstance(v, (str, bytes)) else None)
                for k, v in record.items()}

    def _rows_table(self, rows: dict[str, np.ndarray], stem: str) -> pa.Table:
        cols: dict[str, pa.Array] = {"uri": pa.array(rows["uri"].astype(str), pa.string())}
        for unit in self.units:
            cols.update(unit.encode(rows, stem))
        cols["width"] = pa.array(rows["width"].astype(np.int32))
        cols["height"] = pa.array(rows["height"].astype(np.int32))
        if self.extra is not None:
            taken = self.extra.take(pa.array(rows["index"].astype(np.int64)))
            for col in taken.column_names:
                cols[col] = taken.column(col).combine_chunks()
        return self._stamped(pa.Table.from_pydict(cols, schema=self.schema))

    def _stamped(self, table: pa.Table) -> pa.Table:
        """The part's own file metadata: the run's, plus the node that wrote it."""
        if self.node is None:
            return table
        meta = json.dumps({**self.file_metadata, "writer_node": self.node}, sort_keys=True)
        return table.replace_schema_metadata({**table.schema.metadata,
                                              b"resnet_features": meta.encode()})

    def _errors_table(self, rows: dict[str, np.ndarray]) -> pa.Table:
        return self._stamped(pa.Table.from_pydict(
            {
                "uri": rows["uri"].astype(str).tolist(),
                "stage": rows["error_stage"].astype(str).tolist(),
                "error_type": rows["error_type"].astype(str).tolist(),
                "message": rows["error_message"].astype(str).tolist(),
                # The reader's size where it knows better (Parquet cells, manifest entries).
                "size_bytes": rows["size_bytes"].astype(np.int64),
            },
            schema=self.error_schema,
        ))

    def _write(self, table: pa.Table, relpath: str) -> int:
        """Whole-or-nothing (`storage.atomic_open`: a unique temp name, so concurrent retries
        of one part never share one, then a rename). Returns the bytes written."""
        final = storage.join(self.root, relpath)
        with storage.atomic_open(self.fs, final, storage.join(self.root, TMP_DIR)) as f:
            pq.write_table(table, f, compression="zstd", row_group_size=self.row_group_rows)
            return f.tell()


@dataclass
class CommitLog:
    """The driver's view of a run attempt: one record per written part, never a result row.

    Holds one status code per input (int8: -1 = not back yet), so its memory is bounded by the
    listing. An input reported by two parts is counted once (the first record); the storage
    side of such an overlap is settled by `RunLayout.reconcile` before publishing.
    """

    n_inputs: int
    status: np.ndarray = field(init=False)
    parts: list[str] = field(default_factory=list)
    data_files: list[str] = field(default_factory=list)
    error_files: list[str] = field(default_factory=list)
    duplicates_dropped: int = 0
    overlapping_parts: int = 0
    received_bytes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    busy_seconds: dict[str, float] = field(default_factory=dict)
    stage_rows: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, set[str]] = field(default_factory=dict)

    def __post_init__(self):
        self.status = np.full(self.n_inputs, -1, dtype=np.int8)
        self._names: set[str] = set()

    def add(self, records: pa.Table) -> int:
        """Take a block of part records; returns how many inputs they brought in for the
        first time."""
        self.received_bytes += records.nbytes
        new = 0
        for r in records.to_pylist():
            idx = np.frombuffer(r["indices"], dtype=np.int64)
            codes = np.frombuffer(r["status"], dtype=np.int8)
            self.duplicates_dropped += int(r["duplicates"])  # repeated within its batch
            if r["part"] in self._names:  # the same rows written again under the same name
                self.duplicates_dropped += len(idx)
                continue
            self._names.add(r["part"])
            self.parts.append(r["part"])
            fresh = self.status[idx] < 0
            if not fresh.all():
                self.overlapping_parts += 1
                self.duplicates_dropped += int((~fresh).sum())
                log.warning("part %s repeats %d rows of other parts (retried work); the run "
                            "keeps one copy", r["part"], int((~fresh).sum()))
            self.status[idx[fresh]] = codes[fresh]
            new += int(fresh.sum())
            if r["data_file"]:
                self.data_files.append(r["data_file"])
            if r["error_file"]:
                self.error_files.append(r["error_file"])
            self.bytes_read += int(r["bytes_read"])
            self.bytes_written += int(r["bytes_written"])
            for stage in (*RECORD_STAGES, "write"):
                seconds = r["write_seconds"] if stage == "write" else r[f"t_{stage}"]
                self.busy_seconds[stage] = self.busy_seconds.get(stage, 0.0) + float(seconds)
                self.stage_rows[stage] = self.stage_rows.get(stage, 0) + len(idx)
                names = r[f"node_{stage}"]
                if names:
                    self.nodes.setdefault(stage, set()).update(names.split(","))
        return new

    @property
    def done(self) -> int:
        return int((self.status >= 0).sum())

    @property
    def succeeded(self) -> int:
        return int((self.status == 0).sum())

    @property
    def failed(self) -> int:
        return int((self.status > 0).sum())

    def failed_by_stage(self) -> dict[str, int]:
        codes, counts = np.unique(self.status[self.status > 0], return_counts=True)
        return {STAGE_CODES[c - 1]: int(n) for c, n in zip(codes.tolist(), counts.tolist())}

    def missing_indices(self) -> list[int]:
        """Listing indices that never came back: a pipeline bug, never silently dropped."""
        return np.flatnonzero(self.status < 0).tolist()


class PartWriter:
    """Sink and commit log in one process (no Ray): each `add` writes its batch as a part.
    For tests, tools and the writer benchmark; the job runs the sink in Ray write tasks."""

    def __init__(self, output_uri: str, *, units: tuple[OutputUnit, ...], n_inputs: int,
                 file_metadata: dict[str, Any], storage_options: dict[str, Any] | None = None,
                 extra: pa.Table | None = None, attempt: int = 0,
                 rows_per_file: int | None = None):
        self.sink = PartSink(output_uri, units=units, file_metadata=file_metadata,
                             storage_options=storage_options, attempt=attempt,
                             extra_schema=extra.schema if extra is not None else None)
        self.sink.extra = extra
        self.rows_per_file = rows_per_file
        self.log = CommitLog(n_inputs)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Write the batch as parts of at most `rows_per_file` rows, in arrival order."""
        n = len(batch["index"])
        step = self.rows_per_file or max(n, 1)
        for start in range(0, n, step):
            self.log.add(pa.table(self.sink({k: v[start:start + step]
                                             for k, v in batch.items()})))

    def close(self) -> None:
        tmp = storage.join(self.sink.root, TMP_DIR)
        if self.sink.fs.exists(tmp):
            self.sink.fs.rm(tmp, recursive=True)
