"""The work of a run whose listing is staged as chunks (a big s3:// prefix of images): the
driver's chunk-by-chunk selection, and the worker-side load of a chunk's rows to compute.

The listing tasks (`inputs/prefixes.py`, run as Ray tasks by `pipeline.py`) leave LISTING_SCHEMA
chunks in the run's staging area. The driver reads them one at a time, in order, to decide which
rows this attempt computes (resumed, --incremental, --retry-errors), keeping per chunk only its
path, the work index of its first row and, when some rows are left out, a bitmap of the rest.
Ray Data then loads the chunks on the workers (`load_chunk`): no listing row is held by the
driver. What stays on the driver: the committed ledger of earlier attempts and the earlier
runs' ledger (lookups), and the commit log's one byte per computed input.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from resnet_features.core import storage
from resnet_features.extract.inputs.common import no_images_error
from resnet_features.extract.inputs.prefixes import Chunk
from resnet_features.runs.ledger import UriLookup

__all__ = ["StagedListing", "StagedWork", "WorkChunk", "load_chunk", "select_staged"]

log = logging.getLogger(__name__)

#: Where a run's listing chunks are staged, under its staging folder.
LISTING_DIR = "_listing"


@dataclass
class StagedListing:
    """What the listing tasks reported: their chunks in order, and counts."""

    chunks: list[Chunk]
    skipped_non_image: int
    other_kinds: dict[str, int]
    seconds: float
    requests: int
    units: int  # pieces the plan cut the prefix into
    tasks: int
    cpu_seconds: float = 0.0  # the listing tasks' CPU time, summed
    format: str = "images"

    @property
    def num_rows(self) -> int:
        return sum(c.rows for c in self.chunks)

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.chunks)

    def check(self, uri: str) -> None:
        if not self.num_rows:
            raise no_images_error(uri, self.format, self.skipped_non_image)


@dataclass(frozen=True)
class WorkChunk:
    """The rows of one staged chunk this attempt computes."""

    path: str
    base: int  # work index of its first row to compute
    rows: int  # rows to compute
    mask: bytes | None  # np.packbits of the chunk's rows to compute; None = every row


@dataclass
class StagedWork:
    chunks: list[WorkChunk]
    storage_options: dict[str, Any] | None = None
    skipped: dict[str, Any] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return sum(c.rows for c in self.chunks)

    def uris_at(self, indices: np.ndarray) -> list[str]:
        """The URIs of some work indices (the few the pipeline lost, for the message)."""
        bases = np.array([c.base for c in self.chunks], dtype=np.int64)
        loaded: dict[int, pa.ChunkedArray] = {}  # each chunk read once
        out = []
        for i in indices:
            k = int(np.searchsorted(bases, i, side="right")) - 1
            if k not in loaded:
                loaded[k] = load_chunk(self.chunks[k], self.storage_options)["uri"]
            out.append(loaded[k][int(i - self.chunks[k].base)].as_py())
        return out


def _read(path: str, storage_options, columns: list[str] | None = None) -> pa.Table:
    fs, p = storage.filesystem(path, storage_options)
    return pq.read_table(p, filesystem=fs, columns=columns)


def load_chunk(chunk: WorkChunk, storage_options: dict[str, Any] | None) -> pa.Table:
    """A chunk's rows to compute, `index` = their work index (on a worker)."""
    table = _read(chunk.path, storage_options)
    if chunk.mask is not None:
        keep = np.unpackbits(np.frombuffer(chunk.mask, np.uint8), count=table.num_rows)
        table = table.filter(pa.array(keep.astype(bool)))
    index = np.arange(chunk.base, chunk.base + table.num_rows, dtype=np.int64)
    return table.set_column(0, "index", pa.array(index))


def select_staged(listing: StagedListing, storage_options: dict[str, Any] | None, *,
                  committed: UriLookup | None = None, incremental: UriLookup | None = None,
                  retry: UriLookup | None = None) -> tuple[StagedWork, dict[str, dict[str, int]]]:
    """The rows this attempt computes, chunk by chunk (one chunk's uri/fingerprint columns in
    memory at a time), and per filter its counts: `committed` (inputs earlier attempts of this
    run committed), `incremental` (`UriLookup.decide`), `retry` (the failed inputs)."""
    t0 = time.perf_counter()
    chunks, base = [], 0
    counts: dict[str, dict[str, int]] = {"incremental": {"skipped_unchanged": 0, "changed": 0,
                                                         "new": 0},
                                         "retry_errors": {"retried": 0}}
    filtering = bool(committed is not None and len(committed)) or (
        incremental is not None or retry is not None)
    for c in listing.chunks:
        todo = None
        if filtering:
            table = _read(c.path, storage_options, ["uri", "fingerprint"])
            todo = np.ones(table.num_rows, dtype=bool)
            if committed is not None and len(committed):
                todo &= ~committed.contains(table.column("uri"))
            if incremental is not None:
                mask, got = incremental.decide(table)
                todo &= mask
                for k, v in got.items():
                    counts["incremental"][k] += v
            if retry is not None:
                mask = retry.contains(table.column("uri"))
                todo &= mask
                counts["retry_errors"]["retried"] += int(mask.sum())
            rows = int(todo.sum())
        else:
            rows = c.rows
        if not rows:
            continue
        mask = None if todo is None or todo.all() else np.packbits(todo).tobytes()
        chunks.append(WorkChunk(path=c.path, base=base, rows=rows, mask=mask))
        base += rows
    log.info("selected %d of %d listed inputs from %d staged chunks in %.2fs", base,
             listing.num_rows, len(listing.chunks), time.perf_counter() - t0)
    return StagedWork(chunks=chunks, storage_options=storage_options), counts
