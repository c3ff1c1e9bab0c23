"""Benchmark: the --incremental decision over 1,000,000 earlier ledger entries + 10,000 new objects.

Prints the decision time (ledgers read with column projection + Arrow hash lookups) and its
memory next to the time to list the 10,000 new objects (real files on local disk). Runs in well
under a minute: `python benchmarks/bench_ledger.py [--earlier 1000000] [--new 10000]`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from resnet_features import runs  # noqa: E402
from resnet_features.reader import list_images  # noqa: E402
from resnet_features.writer import LEDGER_SCHEMA  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def fingerprints(uris: pa.Array) -> pa.Array:
    """A stand-in for size + ETag: a deterministic function of the URI."""
    return pc.binary_join_element_wise("1234:etag:", uris, "")


def make_earlier_runs(root: str, n: int, n_runs: int, task_fp: str) -> list[str]:
    """n earlier entries spread over n_runs published runs (ledger + manifest + _SUCCESS)."""
    idx = pc.cast(pa.array(np.arange(n)), pa.string())
    uris = pc.binary_join_element_wise("s3://bucket/images/img", idx, ".jpg", "")
    per = -(-n // n_runs)
    for k in range(n_runs):
        sl = uris[k * per:(k + 1) * per]
        m = len(sl)
        run_dir = os.path.join(root, f"run=2026-01-{k + 1:02d}")
        os.makedirs(os.path.join(run_dir, os.path.dirname(runs.LEDGER_FILE)))
        ledger = pa.table({"uri": sl, "fingerprint": fingerprints(sl),
                           "status": pa.array(["ok"] * m),
                           "file": pa.array(["part-00000.parquet"] * m)}, schema=LEDGER_SCHEMA)
        pq.write_table(ledger.sort_by("uri"), os.path.join(run_dir, runs.LEDGER_FILE),
                       compression="zstd", row_group_size=runs.LEDGER_ROW_GROUP)
        manifest = {"run_id": f"2026-01-{k + 1:02d}", "task_fingerprint": task_fp,
                    "committed_at": f"2026-01-{k + 1:02d}T03:00:00Z", "files": [],
                    "error_files": [], "status": "succeeded"}
        for name in (runs.MANIFEST_FILE, runs.SUCCESS_FILE):
            with open(os.path.join(run_dir, name), "w") as f:
                json.dump(manifest, f)
    return uris


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--earlier", type=int, default=1_000_000)
    ap.add_argument("--new", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    task_fp = "0123456789abcdef"
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        t = time.perf_counter()
        uris = make_earlier_runs(out, args.earlier, args.runs, task_fp)
        setup_s = time.perf_counter() - t
        ledger_bytes = sum(os.path.getsize(os.path.join(out, d, runs.LEDGER_FILE))
                           for d in os.listdir(out))

        # The new objects, as real (tiny) files, to time a real listing of them.
        new_dir = os.path.join(tmp, "new")
        os.makedirs(new_dir)
        for i in range(args.new):
            with open(os.path.join(new_dir, f"new{i:07d}.jpg"), "wb") as f:
                f.write(b"x" * (i % 7 + 1))
        t = time.perf_counter()
        new_listing = list_images(new_dir).table
        listing_s = time.perf_counter() - t

        # Tonight's listing: every earlier object (1% of them changed) + the new ones.
        changed = np.zeros(len(uris), dtype=bool)
        changed[::100] = True
        fps = pc.if_else(pa.array(changed), "changed", fingerprints(uris))
        all_uris = pa.concat_arrays([uris, new_listing.column("uri").combine_chunks()])
        all_fps = pa.concat_arrays([fps, new_listing.column("fingerprint").combine_chunks()])
        listing = pa.table({"index": np.arange(len(all_uris)), "uri": all_uris,
                            "size_bytes": np.zeros(len(all_uris), dtype=np.int64),
                            "fingerprint": all_fps})
        del uris, fps, all_uris, all_fps

        pool = pa.default_memory_pool()
        rss0, arrow0 = rss_mib(), pool.bytes_allocated()
        fs, root = runs.storage.filesystem(out)
        t = time.perf_counter()
        ledger = runs.read_ledgers(fs, root, task_fp)
        read_s = time.perf_counter() - t
        t = time.perf_counter()
        todo, counts = runs.incremental_filter(listing, ledger)
        join_s = time.perf_counter() - t
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"earlier ledger entries : {ledger.num_rows:,} in {args.runs} runs "
              f"({ledger_bytes / 2**20:.1f} MiB of ledger Parquet; setup {setup_s:.1f}s)")
        print(f"tonight's listing      : {listing.num_rows:,} objects "
              f"({args.new:,} new, {counts['changed']:,} changed)")
        print(f"listing {args.new:,} new files (local disk, list_images): {listing_s:.2f}s")
        print(f"decision: read ledgers (2 columns) {read_s:.2f}s + Arrow is_in lookups "
              f"{join_s:.2f}s "
              f"= {read_s + join_s:.2f}s")
        print(f"decision memory: Arrow {(pool.bytes_allocated() - arrow0) / 2**20:.0f} MiB "
              f"held after, RSS +{rss_mib() - rss0:.0f} MiB (process peak RSS "
              f"{peak_rss:.0f} MiB, listing table {listing.nbytes / 2**20:.0f} MiB)")
        print(f"result: compute {int(todo.sum()):,}, {counts}")
        assert counts["new"] == args.new and int(todo.sum()) == args.new + counts["changed"]


if __name__ == "__main__":
    main()
