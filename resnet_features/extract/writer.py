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
from resnet_features.core.models import ModelSpec
from resnet_features.runs.layout import ERRORS_DIR, EXPLAIN_PNG_DIR, LEDGER_DIR, LEDGER_SCHEMA, TMP_DIR

__all__ = ["ERROR_SCHEMA", "LEDGER_SCHEMA", "PartWriter", "WriteStats", "output_schema",
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


def output_schema(spec: ModelSpec, task: str, metadata: dict[str, str] | None = None, *,
                  layers: dict[str, int] | None = None, head: bool = False,
                  explain_grid: int | None = None, explain_png: bool = False) -> pa.Schema:
    """The documented output schema for a model and task (standard Arrow types only).

    `layers` ({name: channels}, from --layers) and `head` (--head) add optional columns; without
    them the schema is the default one.
    """
    fields = [pa.field("uri", pa.string(), nullable=False)]
    if task in ("embed", "both"):
        fields.append(pa.field("embedding", pa.list_(pa.float32(), spec.embedding_dim)))
    if task in ("classify", "both"):
        fields += [
            pa.field("topk_ids", pa.list_(pa.int32())),
            pa.field("topk_labels", pa.list_(pa.string())),
            pa.field("topk_scores", pa.list_(pa.float32())),
        ]
    for name, dim in (layers or {}).items():
        fields.append(pa.field(name, pa.list_(pa.float32(), dim)))
    if head:
        fields += [pa.field("head_label", pa.string()), pa.field("head_score", pa.float32())]
    if explain_grid:  # row-major (grid x grid) heatmap over the model's input crop
        fields += [pa.field("explain_map", pa.list_(pa.float16(), explain_grid * explain_grid)),
                   pa.field("explain_class", pa.int32()), pa.field("explain_label", pa.string())]
        if explain_png:  # relative path of the overlay PNG
            fields.append(pa.field("explain_png", pa.string()))
    fields += [pa.field("width", pa.int32()), pa.field("height", pa.int32())]
    return pa.schema(fields, metadata=metadata)


#: Output file size `auto_rows_per_file` aims at: big enough for efficient downstream scans,
#: small enough for many parallel readers (64-256 MB is the usual advice for Parquet).
TARGET_FILE_BYTES = 128 * 1024 * 1024


def auto_rows_per_file(spec: ModelSpec, task: str, top_k: int) -> int:
    """Rows per part for ~TARGET_FILE_BYTES files: float32 embeddings barely compress, so the
    embedding dominates; top-k lists and the uri add roughly 20 bytes per k plus ~100."""
    per_row = 100
    if task in ("embed", "both"):
        per_row += 4 * spec.embedding_dim
    if task in ("classify", "both"):
        per_row += 20 * top_k
    return max(1000, TARGET_FILE_BYTES // per_row)


def part_name(part: int, attempt: int = 0) -> str:
    """`part-00000.parquet`; parts of a resumed attempt k>0 are `part-00000-rk.parquet`."""
    return f"part-{part:05d}.parquet" if attempt == 0 else f"part-{part:05d}-r{attempt}.parquet"


def _fixed_size_list(values: np.ndarray) -> pa.Array:
    values = np.ascontiguousarray(values, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def _list_array(values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    n, k = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=value_type))


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
        spec: ModelSpec,
        task: str,
        listing: pa.Table,
        rows_per_file: int,
        file_metadata: dict[str, Any],
        storage_options: dict[str, Any] | None = None,
        extra: pa.Table | None = None,
        layers: dict[str, int] | None = None,
        head_classes: tuple[str, ...] | None = None,
        explain_grid: int | None = None,
        explain_png: bool = False,
        attempt: int = 0,
    ):
        self.fs, self.root = storage.filesystem(output_uri, storage_options)
        self.attempt = attempt
        self.output_uri = output_uri
        self.spec = spec
        self.task = task
        self.rows_per_file = rows_per_file
        self.categories = np.asarray(spec.categories, dtype=object)
        meta = {"resnet_features": json.dumps(file_metadata, sort_keys=True)}
        self.layers = dict(layers or {})
        self.head_classes = (np.asarray(head_classes, dtype=object)
                             if head_classes is not None else None)
        self.schema = output_schema(spec, task, meta, layers=self.layers,
                                    head=head_classes is not None, explain_grid=explain_grid,
                                    explain_png=explain_png)
        # Input columns carried through (--id-column/--keep-columns), row i = listing index i.
        self.extra = extra
        if extra is not None:
            for f in extra.schema:
                self.schema = self.schema.append(f)
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
        if "image" in batch:
            if "explain_png" in self.schema.names:
                self._write_overlays(batch)
            batch = {k: v for k, v in batch.items() if k != "image"}
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
            self._write(self._rows_table({k: v[ok] for k, v in merged.items()}), name)
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

    def _rows_table(self, rows: dict[str, np.ndarray]) -> pa.Table:
        cols: dict[str, pa.Array] = {"uri": pa.array(rows["uri"].astype(str), pa.string())}
        if "embedding" in self.schema.names:
            cols["embedding"] = _fixed_size_list(rows["embedding"])
        if "topk_ids" in self.schema.names:
            ids = rows["topk_ids"].astype(np.int32)
            cols["topk_ids"] = _list_array(ids, pa.int32())
            cols["topk_labels"] = _list_array(self.categories[ids], pa.string())
            cols["topk_scores"] = _list_array(rows["topk_scores"].astype(np.float32),
                                              pa.float32())
        for name in self.layers:
            cols[name] = _fixed_size_list(rows[name])
        if self.head_classes is not None:
            cols["head_label"] = pa.array(self.head_classes[rows["head_id"].astype(np.int64)],
                                          pa.string())
            cols["head_score"] = pa.array(rows["head_score"].astype(np.float32))
        if "explain_map" in self.schema.names:
            maps = np.ascontiguousarray(rows["explain_map"], dtype=np.float16)
            cols["explain_map"] = pa.FixedSizeListArray.from_arrays(
                pa.array(maps.reshape(-1), pa.float16()), maps.shape[1])
            cls = rows["explain_class"].astype(np.int32)
            cols["explain_class"] = pa.array(cls)
            cols["explain_label"] = pa.array(self.categories[cls], pa.string())
        if "explain_png" in self.schema.names:
            cols["explain_png"] = pa.array([self._overlay_path(int(i)) for i in rows["index"]],
                                           pa.string())
        cols["width"] = pa.array(rows["width"].astype(np.int32))
        cols["height"] = pa.array(rows["height"].astype(np.int32))
        if self.extra is not None:
            taken = self.extra.take(pa.array(rows["index"].astype(np.int64)))
            for name in taken.column_names:
                cols[name] = taken.column(name).combine_chunks()
        return pa.Table.from_pydict(cols, schema=self.schema)

    def _overlay_path(self, index: int) -> str:
        # Attempt-aware like the parts: a resumed attempt re-indexes its inputs from 0.
        part = part_name(index // self.rows_per_file, self.attempt).removesuffix(".parquet")
        return storage.join(EXPLAIN_PNG_DIR, part, f"{index:08d}.png")

    def _write_overlays(self, batch: dict[str, np.ndarray]) -> None:
        """--explain-png: one heatmap overlay per good row, written as the batch arrives (the
        pixels are dropped right after, so they never pile up in pending parts)."""
        from resnet_features.extract.explain import overlay_png

        for i in np.flatnonzero([not s for s in batch["error_stage"]]):
            full = storage.join(self.root, self._overlay_path(int(batch["index"][i])))
            self.fs.makedirs(full.rsplit("/", 1)[0], exist_ok=True)
            with self.fs.open(full, "wb") as f:
                f.write(overlay_png(batch["image"][i], batch["explain_map"][i]))

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
            pq.write_table(table, f, compression="zstd")
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
