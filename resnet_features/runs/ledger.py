"""Ledger: per-run (uri, fingerprint) sorted by a URI hash, a compacted index, and the streaming
--incremental decision whose memory is bounded by one hash range, not by the bucket.

Every ledger file is sorted by `h`, a stable 63-bit hash of the URI (`uri_hash`), and written in
small row groups. The hash space [0, 2^63) is cut into 2^b equal ranges, b chosen so that one
range holds about `RANGE_ENTRIES` earlier entries; the decision walks the ranges in order and
reads every source sequentially, one row group at a time, so it holds one range of the ledgers
plus at most one row group per source, never the whole ledger (see README "Nightly runs").

Sources of one decision, oldest first:

    OUTPUT/_index/task=<fp>/_current.json   the compacted index: which runs (and which publish
                                            of each) it covers, its files and their hash ranges
    OUTPUT/_index/task=<fp>/g-*/i-*.parquet the latest ok (uri, fingerprint) per URI of those runs
    OUTPUT/run=<id>/_ledger/h-*.parquet     runs published after the index (`ledger_files` in
                                            the run's manifest)
    OUTPUT/run=<id>/_ledger/ledger.parquet  a run written before hash-sorted ledgers (uri-sorted,
                                            read whole once; the next compaction absorbs it)

Once a decision finds `COMPACT_AFTER_RUNS` run ledgers outside the index, it writes the ranges it
merges anyway as the index's next generation, so a decision never reads more than that many
run ledgers besides the index. An index that covers a run which has since been replaced
(`--overwrite`), deleted or excluded is ignored and rebuilt.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from resnet_features.core import storage
from resnet_features.runs.layout import LEDGER_DIR, LEDGER_SCHEMA, TMP_DIR

__all__ = ["uri_hash", "write_run_ledger", "decide_incremental", "incremental_filter",
           "UriLookup", "decision_lookup",
           "read_ledgers", "failed_uris", "load_index", "RANGE_ENTRIES", "COMPACT_AFTER_RUNS"]

log = logging.getLogger(__name__)

HASH = "h"
LEDGER_ROW_GROUP = 16_384  # ~1 MiB in memory: the most a source holds beyond its range
LEDGER_FILE_ROWS = 1 << 22  # a run ledger is split into files of at most 4M entries
INDEX_FILE_ROWS = 1 << 22  # entries per index file (~100 MiB of Parquet)
RANGE_ENTRIES = 1 << 17  # target earlier entries per decision range: ~75 MiB of Arrow at peak
COMPACT_AFTER_RUNS = 4  # run ledgers outside the index a decision reads before it compacts
MAX_RANGE_BITS = 20
INDEX_ROOT = "_index"
INDEX_POINTER = "_current.json"
V1_LEDGER_FILE = "_ledger/ledger.parquet"  # runs published before hash-sorted ledgers

INDEX_SCHEMA = pa.schema([(HASH, pa.int64()), ("uri", pa.string()), ("fingerprint", pa.string())])

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_P = np.uint64(0x100000001B3)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every output bit depends on every input bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def uri_hash(uris: pa.Array | pa.ChunkedArray, chunk: int = 8192) -> np.ndarray:
    """Stable 63-bit hash (int64 >= 0) of each string: a polynomial over its UTF-8 bytes mod
    2^64, finalised with splitmix64. Pure numpy, so every version and machine agrees; works
    `chunk` strings at a time, so its temporaries stay a few MiB whatever the input's size."""
    chunks = uris.chunks if isinstance(uris, pa.ChunkedArray) else [uris]
    out = np.empty(sum(len(c) for c in chunks), dtype=np.int64)
    done = 0
    with np.errstate(over="ignore"):
        for c in chunks:
            for s in range(0, len(c), chunk):
                a = c.slice(s, chunk).cast(pa.large_string())  # copies this slice only
                out[done:done + len(a)] = _hash_slice(a)
                done += len(a)
    return out


def _hash_slice(a: pa.Array) -> np.ndarray:
    offsets = np.frombuffer(a.buffers()[1], np.int64)[a.offset:a.offset + len(a) + 1]
    starts, lengths = offsets[:-1] - offsets[0], np.diff(offsets)
    data = a.buffers()[2]
    data = (np.frombuffer(data, np.uint8)[offsets[0]:offsets[-1]] if data is not None
            else np.zeros(0, np.uint8))
    pos = np.arange(len(data), dtype=np.int64) - np.repeat(starts, lengths)
    powers = np.cumprod(np.full(int(lengths.max(initial=0)) + 1, _P, dtype=np.uint64))
    terms = np.append((data.astype(np.uint64) + np.uint64(1)) * powers[pos], np.uint64(0))
    sums = np.add.reduceat(terms, starts) if len(a) else np.zeros(0, np.uint64)
    h = np.where(lengths > 0, sums, np.uint64(0)) + lengths.astype(np.uint64)
    return (_mix(h) >> np.uint64(1)).view(np.int64)


# -- writing ---------------------------------------------------------------------------------


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=LEDGER_ROW_GROUP)
    return sink.getvalue().to_pybytes()


def _with_hash(table: pa.Table) -> pa.Table:
    """The table with an `h` column in front, sorted by it."""
    table = table.add_column(0, HASH, pa.array(uri_hash(table.column("uri")), pa.int64()))
    return table.take(pc.sort_indices(table, [(HASH, "ascending"), ("uri", "ascending")]))


def write_run_ledger(fs, run_dir: str, ledger: pa.Table, tmp_dir: str) -> list[dict[str, Any]]:
    """A run's ledger (LEDGER_SCHEMA rows) as `_ledger/h-NNNNN.parquet` files sorted by `h`,
    each covering a contiguous hash range; returns their manifest entries (path relative to
    the run, rows, first and last hash)."""
    table = _with_hash(ledger.cast(LEDGER_SCHEMA))
    files = []
    for k, start in enumerate(range(0, max(table.num_rows, 1), LEDGER_FILE_ROWS)):
        piece = table.slice(start, LEDGER_FILE_ROWS)
        rel = storage.join(LEDGER_DIR, f"h-{k:05d}.parquet")
        storage.atomic_write(fs, storage.join(run_dir, rel), _parquet_bytes(piece), tmp_dir)
        hs = piece.column(HASH)
        files.append({"path": rel, "rows": piece.num_rows,
                      "lo": int(hs[0].as_py()) if piece.num_rows else 0,
                      "hi": int(hs[-1].as_py()) if piece.num_rows else 0})
    return files


# -- reading: sources streamed in hash order -------------------------------------------------


class _Cursor:
    """A hash-sorted source read in order, one row group at a time: `take(hi)` returns the
    rows with h < hi not returned yet; memory is what it returns plus one row group."""

    def __init__(self, pieces: Iterator[pa.Table]):
        self._pieces = pieces
        self._buf: pa.Table | None = None

    def take(self, hi: int | None) -> pa.Table | None:
        parts = []
        while True:
            if self._buf is None:
                self._buf = next(self._pieces, None)
                if self._buf is None:
                    break
            hs = self._buf.column(HASH).to_numpy()
            k = len(hs) if hi is None else int(np.searchsorted(hs, hi, side="left"))
            parts.append(self._buf.slice(0, k))
            if k < len(hs):
                self._buf = self._buf.slice(k)
                break
            self._buf = None
        parts = [p for p in parts if p.num_rows]
        return pa.concat_tables(parts) if parts else None


def _row_groups(fs, paths: Sequence[str], ok_only: bool) -> Iterator[pa.Table]:
    """Row groups of hash-sorted files, in order, projected to h, uri, fingerprint."""
    for path in paths:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            for i in range(pf.num_row_groups):
                cols = [HASH, "uri", "fingerprint"] + (["status"] if ok_only else [])
                t = pf.read_row_group(i, columns=cols)
                if ok_only:
                    t = t.filter(pc.equal(t.column("status"), "ok")).drop_columns(["status"])
                yield t


def _whole_v1(fs, path: str) -> Iterator[pa.Table]:
    """A ledger written before hash-sorted ledgers: uri-sorted, so it is read whole (its run's
    size, once) and sorted by hash here."""
    t = pq.read_table(path, filesystem=fs, columns=["uri", "fingerprint"],
                      filters=[("status", "=", "ok")])
    yield _with_hash(t)


@dataclass(frozen=True)
class _Source:
    name: str  # "index" or "run=<id>"
    entries: int  # rows before the ok filter (sizes the ranges)
    pieces: Any  # () -> Iterator[pa.Table]


def _run_source(fs, run) -> _Source:
    files = run.manifest.get("ledger_files")
    if files is None:  # written before hash-sorted ledgers
        path = storage.join(run.path, V1_LEDGER_FILE)
        with fs.open(path, "rb") as f:
            entries = pq.ParquetFile(f).metadata.num_rows
        return _Source(f"run={run.run_id}", entries, lambda: _whole_v1(fs, path))
    paths = [storage.join(run.path, e["path"]) for e in files]
    return _Source(f"run={run.run_id}", sum(int(e["rows"]) for e in files),
                   lambda: _row_groups(fs, paths, ok_only=True))


def _index_dir(root: str, task_fp: str) -> str:
    return storage.join(root, INDEX_ROOT, f"task={task_fp}")


def load_index(fs, root: str, task_fp: str) -> dict[str, Any] | None:
    """The committed index pointer of this task, or None."""
    return storage.read_json(fs, storage.join(_index_dir(root, task_fp), INDEX_POINTER))


def _latest_per_uri(newest_first: Sequence[pa.Table]) -> pa.Table:
    """Concatenation keeping, for each URI, only the rows of the newest table holding it."""
    kept: list[pa.Table] = []
    seen: pa.Array | None = None
    for t in newest_first:
        if seen is not None and len(seen) and t.num_rows:
            t = t.filter(pc.invert(pc.is_in(t.column("uri"), value_set=seen)))
        kept.append(t)
        uris = t.column("uri").combine_chunks()
        seen = uris if seen is None else pa.concat_arrays([seen, uris])
    return pa.concat_tables(kept)


def incremental_filter(listing: pa.Table, ledger: pa.Table) -> tuple[np.ndarray, dict[str, int]]:
    """Mask of listing rows to compute: those whose (uri, fingerprint) the ledger does not hold.

    Vectorised Arrow hash lookups (C++): time and memory linear in listing + ledger; the
    decision calls it once per hash range."""
    def keys(t: pa.Table) -> pa.ChunkedArray:
        return pc.binary_join_element_wise(t.column("uri"), t.column("fingerprint"), "\x00")

    done = pc.is_in(keys(listing), value_set=keys(ledger).combine_chunks())
    known = pc.is_in(listing.column("uri"), value_set=ledger.column("uri").combine_chunks())
    return _decision(done.to_numpy(zero_copy_only=False), known.to_numpy(zero_copy_only=False))


def _decision(done: np.ndarray, known: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """Rows to compute (not `done`: same uri and fingerprint) and the summary's counts."""
    counts = {"skipped_unchanged": int(done.sum()), "changed": int((known & ~done).sum()),
              "new": int((~known).sum())}
    return ~done, counts


class _IndexWriter:
    """Writes one index generation range by range into files of up to `INDEX_FILE_ROWS`
    entries (few, large objects: a night's read of the index is a few GETs per file);
    `commit` publishes it with one pointer write, then removes older generations. Files of a
    generation that never commits are never read, so they are written in place."""

    def __init__(self, fs, root: str, task_fp: str, covers: dict[str, str], seq: int):
        self.fs, self.dir = fs, _index_dir(root, task_fp)
        self.gen = f"g-{seq:06d}-{uuid.uuid4().hex[:8]}"
        self.covers, self.seq = covers, seq
        self.files: list[dict[str, Any]] = []
        self.entries = 0
        self._file = self._writer = None

    def add(self, merged: pa.Table) -> None:
        if not merged.num_rows:
            return
        merged = merged.take(pc.sort_indices(merged, [(HASH, "ascending"), ("uri", "ascending")]))
        merged = merged.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA)
        if self._writer is None or self.files[-1]["rows"] >= INDEX_FILE_ROWS:
            self._close_file()
            rel = storage.join(self.gen, f"i-{len(self.files):05d}.parquet")
            self.fs.makedirs(storage.join(self.dir, self.gen), exist_ok=True)
            self._file = self.fs.open(storage.join(self.dir, rel), "wb")
            self._writer = pq.ParquetWriter(self._file, INDEX_SCHEMA, compression="zstd")
            self.files.append({"path": rel, "rows": 0, "lo": int(merged[HASH][0].as_py())})
        self._writer.write_table(merged, row_group_size=LEDGER_ROW_GROUP)
        self.files[-1]["rows"] += merged.num_rows
        self.files[-1]["hi"] = int(merged[HASH][-1].as_py())
        self.entries += merged.num_rows

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            self._file = self._writer = None

    def commit(self) -> None:
        self._close_file()
        pointer = {"generation": self.gen, "seq": self.seq, "covers": self.covers,
                   "files": self.files, "entries": self.entries, "format": 1,
                   "created_at": storage.now_iso()}
        storage.write_json(self.fs, storage.join(self.dir, INDEX_POINTER), pointer,
                           storage.join(self.dir, TMP_DIR))
        for p in self.fs.ls(self.dir, detail=False):  # older and abandoned generations
            name = p.rstrip("/").rsplit("/", 1)[-1]
            if name != self.gen and (name.startswith("g-") or name == TMP_DIR):
                self.fs.rm(p, recursive=True)
        log.info("ledger index generation %s: %d entries from %d runs in %d files", self.gen,
                 self.entries, len(self.covers), len(self.files))


def _plan(fs, root: str, runs: Sequence[Any], task_fp: str, exclude_run: str | None
          ) -> tuple[list[_Source], dict[str, Any] | None, list[Any], dict[str, str]]:
    """Sources oldest first (the index, then runs it does not cover), the index used (or
    None), the runs outside it, and what a new generation would cover."""
    eligible = [r for r in runs if r.run_id != exclude_run
                and r.manifest.get("task_fingerprint") == task_fp]
    covers = {r.run_id: r.manifest.get("publish_id", "") for r in eligible}
    index = load_index(fs, root, task_fp)
    if index is not None and any(covers.get(k) != v for k, v in index["covers"].items()):
        log.warning("the ledger index of task %s covers runs that were since replaced, "
                    "removed or excluded; reading the run ledgers instead", task_fp)
        index = None
    outside = [r for r in eligible if index is None or r.run_id not in index["covers"]]
    sources = []
    if index is not None:
        paths = [storage.join(_index_dir(root, task_fp), e["path"]) for e in index["files"]]
        sources.append(_Source("index", int(index["entries"]),
                               lambda: _row_groups(fs, paths, ok_only=False)))
    sources += [_run_source(fs, r) for r in outside]
    return sources, index, outside, covers


def _take_rows(batches: list[pa.RecordBatch], bounds: np.ndarray, rows: np.ndarray) -> pa.Table:
    """Rows (ascending positions) of a table given as record batches: a take per batch touched.
    Arrow's take on a chunked table concatenates all its chunks first, a copy of the listing
    per range."""
    cuts = np.searchsorted(rows, bounds)
    parts = [batches[k].take(pa.array(rows[cuts[k]:cuts[k + 1]] - bounds[k]))
             for k in np.flatnonzero(cuts[1:] > cuts[:-1])]
    return (pa.Table.from_batches(parts) if parts else
            pa.table({"uri": pa.array([], pa.string()), "fingerprint": pa.array([], pa.string())}))


def _ranges(fs, root: str, runs: Sequence[Any], task_fp: str, exclude_run: str | None,
            range_entries: int, compact_after: int):
    """What a decision merges: its sources (index and run ledgers), the hash-range bits that
    keep about `range_entries` entries in memory at once, and an index writer when enough run
    ledgers lie outside the index to compact them (None otherwise)."""
    sources, index, outside, covers = _plan(fs, root, runs, task_fp, exclude_run)
    entries = sum(s.entries for s in sources)
    bits = 0
    while (entries >> bits) > range_entries and bits < MAX_RANGE_BITS:
        bits += 1
    writer = (_IndexWriter(fs, root, task_fp, covers, (index or {}).get("seq", 0) + 1)
              if len(outside) >= max(compact_after, 1) else None)
    return sources, index, outside, entries, bits, writer


def decide_incremental(fs, root: str, runs: Sequence[Any], task_fp: str, listing: pa.Table, *,
                       exclude_run: str | None = None, range_entries: int = RANGE_ENTRIES,
                       compact_after: int = COMPACT_AFTER_RUNS
                       ) -> tuple[np.ndarray, dict[str, Any]]:
    """Mask of listing rows to compute and counts for the summary, for `--incremental`.

    An input is skipped when the newest earlier finished run (same task) that computed its URI
    did so for the same fingerprint. `runs` are the finished runs, oldest first. The hash
    ranges are walked in order; each holds about `range_entries` earlier entries, so the
    decision's memory is O(entries / ranges) on top of the listing the driver already holds."""
    t0 = time.perf_counter()
    sources, index, outside, entries, bits, writer = _ranges(
        fs, root, runs, task_fp, exclude_run, range_entries, compact_after)
    n = listing.num_rows
    todo = np.ones(n, dtype=bool)
    counts = {"skipped_unchanged": 0, "changed": 0, "new": 0}
    hashes = uri_hash(listing.column("uri"))  # 17 bytes per listed input in all, with
    order = np.argsort(hashes, kind="stable")  # `todo`: the part of the decision that grows
    hashes.sort()  # with the listing (which the driver holds anyway), not with the ledger
    batches = listing.select(["uri", "fingerprint"]).to_batches()
    bounds = np.cumsum([0] + [b.num_rows for b in batches])
    cursors = [_Cursor(s.pieces()) for s in sources]
    most = 0
    for r in range(1 << bits):
        lo = r << (63 - bits)
        hi = None if r == (1 << bits) - 1 else (r + 1) << (63 - bits)
        pieces = [c.take(hi) for c in cursors]
        pieces = [p for p in pieces if p is not None]
        a = int(np.searchsorted(hashes, lo, side="left"))
        b = n if hi is None else int(np.searchsorted(hashes, hi, side="left"))
        if not pieces and writer is None:
            counts["new"] += b - a
            continue
        merged = (_latest_per_uri(pieces[::-1]) if pieces else
                  pa.table({HASH: pa.array([], pa.int64()), "uri": pa.array([], pa.string()),
                            "fingerprint": pa.array([], pa.string())}))
        most = max(most, merged.num_rows)
        if b > a:
            rows = np.sort(order[a:b])
            mask, c = incremental_filter(_take_rows(batches, bounds, rows), merged)
            todo[rows] = mask
            for k in counts:
                counts[k] += c[k]
        if writer is not None:
            writer.add(merged)
    if writer is not None:
        writer.commit()
    info = {**counts, "ledger_entries": entries,
            "index_used": index is not None, "run_ledgers_read": len(outside), "ranges": 1 << bits,
            "max_range_entries": most, "compacted": writer is not None,
            "decision_seconds": round(time.perf_counter() - t0, 3)}
    return todo, info


class UriLookup:
    """A set of URIs (with a fingerprint each) to test listing chunks against, one chunk at a
    time: their hashes sorted once, then a binary search per listed URI and an exact string
    comparison of the hits. Two URIs of the set with the same 63-bit hash would leave the
    second unfound, which only makes an input look new (computed again), never skipped."""

    def __init__(self, table: pa.Table):
        hashes = uri_hash(table.column("uri"))
        order = np.argsort(hashes, kind="stable")
        self.hashes = hashes[order]
        self.table = table.select([c for c in ("uri", "fingerprint") if c in
                                   table.column_names]).take(pa.array(order)).combine_chunks()

    def __len__(self) -> int:
        return len(self.hashes)

    def find(self, uris: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        """`(found, position)`: whether each URI is in the set, and where (valid if found)."""
        h = uri_hash(uris)
        pos = np.minimum(np.searchsorted(self.hashes, h), max(len(self.hashes) - 1, 0))
        if not len(self.hashes):
            return np.zeros(len(h), dtype=bool), pos
        hit = self.hashes[pos] == h
        rows = np.flatnonzero(hit)
        if len(rows):
            same = pc.equal(pc.take(uris, pa.array(rows)),
                            self.table.column("uri").take(pa.array(pos[rows])))
            hit[rows] = same.to_numpy(zero_copy_only=False)
        return hit, pos

    def contains(self, uris: pa.Array | pa.ChunkedArray) -> np.ndarray:
        return self.find(uris)[0]

    def decide(self, listing: pa.Table) -> tuple[np.ndarray, dict[str, int]]:
        """`incremental_filter` of a listing chunk against this set of (uri, fingerprint)."""
        known, pos = self.find(listing.column("uri"))
        done = known.copy()
        rows = np.flatnonzero(known)
        if len(rows):
            same = pc.equal(listing.column("fingerprint").take(pa.array(rows)),
                            self.table.column("fingerprint").take(pa.array(pos[rows])))
            done[rows] = same.to_numpy(zero_copy_only=False)
        return _decision(done, known)


def decision_lookup(fs, root: str, runs: Sequence[Any], task_fp: str, *,
                    exclude_run: str | None = None, range_entries: int = RANGE_ENTRIES,
                    compact_after: int = COMPACT_AFTER_RUNS) -> tuple[UriLookup, dict[str, Any]]:
    """What `decide_incremental` compares against, as a `UriLookup` for a listing that comes
    in chunks (the staged listing of a prefix): the newest (uri, fingerprint) per URI of the
    earlier finished runs, in memory (the ledger, not the listing). The sources are merged
    range by range as the decision does, and compacted into the index the same way."""
    t0 = time.perf_counter()
    sources, index, outside, entries, bits, writer = _ranges(
        fs, root, runs, task_fp, exclude_run, range_entries, compact_after)
    cursors = [_Cursor(s.pieces()) for s in sources]
    kept = []
    for r in range(1 << bits):
        hi = None if r == (1 << bits) - 1 else (r + 1) << (63 - bits)
        pieces = [p for p in (c.take(hi) for c in cursors) if p is not None]
        if not pieces:
            continue
        merged = _latest_per_uri(pieces[::-1])
        kept.append(merged.select(["uri", "fingerprint"]))
        if writer is not None:
            writer.add(merged)
    if writer is not None:
        writer.commit()
    table = (pa.concat_tables(kept) if kept else
             pa.table({"uri": pa.array([], pa.string()), "fingerprint": pa.array([], pa.string())}))
    info = {"ledger_entries": entries, "index_used": index is not None,
            "run_ledgers_read": len(outside), "ranges": 1 << bits,
            "compacted": writer is not None,
            "decision_seconds": round(time.perf_counter() - t0, 3)}
    return UriLookup(table), info


def read_ledgers(fs, root: str, runs: Sequence[Any], task_fp: str, *,
                 exclude_run: str | None = None) -> pa.Table:
    """Every (uri, fingerprint) the decision would compare against, in one table: memory is
    the whole ledger, so this is for inspection and the benchmark's baseline, not the job."""
    sources, _, _, _ = _plan(fs, root, runs, task_fp, exclude_run)
    tables = [pa.concat_tables(list(s.pieces())) for s in sources]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return pa.table({"uri": pa.array([], pa.string()),
                         "fingerprint": pa.array([], pa.string())})
    return _latest_per_uri(tables[::-1]).drop_columns([HASH])


def failed_uris(fs, run) -> pa.Array:
    """URIs that failed in a run (its ledger's error rows), for --retry-errors."""
    files = run.manifest.get("ledger_files")
    rels = [e["path"] for e in files] if files is not None else [V1_LEDGER_FILE]
    tables = [pq.read_table(storage.join(run.path, rel), filesystem=fs, columns=["uri"],
                            filters=[("status", "=", "error")]) for rel in rels]
    return pa.concat_tables(tables).column("uri").combine_chunks()
