"""Benchmark: the --incremental decision over 1,000,000 earlier ledger entries + 10,000 new objects,
and how its memory scales with the ledger (1M vs 4M earlier entries).

Earlier entries are spread over --runs published runs whose ledgers the job's own writer wrote
(hash-sorted, `ledger.write_run_ledger`). Tonight's listing is every earlier object (1% of them
changed) plus --new new ones. Each decision runs in a fresh child process that first loads the
listing (the driver holds it anyway), then resets its peak RSS (`/proc/self/clear_refs`) and
reports the decision's time, its peak RSS above the listing and the peak bytes Arrow's pool held
(sampled every 2 ms). Variants:

    old, all in memory   what the job did before: every run's (uri, fingerprint) concatenated
                         on the driver, then one Arrow is_in over all of it
    ranges               `runs.incremental_decision`: hash ranges of ~RANGE entries streamed
                         one row group per source at a time (run ledgers, no index); at the
                         job's RANGE_ENTRIES and at --other-range
    compaction pass      the same decision when it also writes the compacted index
    index only           the next night's decision: the index alone

The listing time is that of --new real (tiny) files on local disk with `inputs.list_images`.

    python benchmarks/bench_ledger.py [--earlier 1000000] [--scale 4000000] [--new 10000]
                                      [--runs 5] [--json out.json]

About two minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from resnet_features.core import storage  # noqa: E402
from resnet_features.extract.inputs import list_images  # noqa: E402
from resnet_features.runs import ledger
from resnet_features.runs import protocol as runs
from resnet_features.runs.layout import LEDGER_SCHEMA  # noqa: E402

TASK_FP = "0123456789abcdef"
MIB = 2**20


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def fingerprints(uris: pa.Array) -> pa.Array:
    """A stand-in for size + ETag: a deterministic function of the URI."""
    return pc.binary_join_element_wise("1234:etag:", uris, "")


def make_output(root: str, n: int, n_runs: int, n_new: int) -> tuple[str, str]:
    """n earlier entries over n_runs published runs, and tonight's listing (saved as Parquet)."""
    idx = pc.cast(pa.array(np.arange(n)), pa.string())
    uris = pc.binary_join_element_wise("s3://bucket/images/", idx, ".jpg", "")
    out = os.path.join(root, "out")
    fs, _ = storage.filesystem(out)
    per = -(-n // n_runs)
    for k in range(n_runs):
        sl = uris[k * per:(k + 1) * per]
        run_id = f"2026-01-{k + 1:02d}"
        run_dir = os.path.join(out, f"run={run_id}")
        table = pa.table({"uri": sl, "fingerprint": fingerprints(sl),
                          "status": pa.array(["ok"] * len(sl)),
                          "file": pa.array(["part-00000.parquet"] * len(sl))}, schema=LEDGER_SCHEMA)
        files = ledger.write_run_ledger(fs, run_dir, table, os.path.join(run_dir, "_tmp"))
        manifest = {"run_id": run_id, "task_fingerprint": TASK_FP, "publish_id": run_id,
                    "committed_at": f"{run_id}T03:00:00Z", "files": [], "error_files": [],
                    "status": "succeeded", "ledger_files": files, "ledger_entries": len(sl)}
        for name in (runs.MANIFEST_FILE, runs.SUCCESS_FILE):
            with open(os.path.join(run_dir, name), "w") as f:
                json.dump(manifest, f)
    changed = np.zeros(n, dtype=bool)
    changed[::100] = True
    fps = pc.if_else(pa.array(changed), "changed", fingerprints(uris))
    new = pc.binary_join_element_wise("s3://bucket/new/",
                                      pc.cast(pa.array(np.arange(n_new)), pa.string()), ".jpg", "")
    all_uris = pa.concat_arrays([uris, new])
    listing = pa.table({"index": np.arange(len(all_uris)), "uri": all_uris,
                        "size_bytes": np.zeros(len(all_uris), dtype=np.int64),
                        "fingerprint": pa.concat_arrays([fps, fingerprints(new)])})
    path = os.path.join(root, "listing.parquet")
    pq.write_table(listing, path)
    return out, path


def time_listing(root: str, n_new: int) -> float:
    """List n_new real (tiny) files the way the job lists a folder of images."""
    new_dir = os.path.join(root, "new")
    os.makedirs(new_dir)
    for i in range(n_new):
        with open(os.path.join(new_dir, f"new{i:07d}.jpg"), "wb") as f:
            f.write(b"x" * (i % 7 + 1))
    t = time.perf_counter()
    list_images(new_dir)
    return time.perf_counter() - t


def old_decision(out: str, listing: pa.Table) -> tuple[np.ndarray, dict]:
    """The previous approach: every matching run's two columns in one table, one is_in."""
    fs, root = storage.filesystem(out)
    tables = []
    for run in runs.finished_runs(fs, root):
        for e in run.manifest["ledger_files"]:
            tables.append(pq.read_table(os.path.join(run.path, e["path"]),
                                        columns=["uri", "fingerprint"],
                                        filters=[("status", "=", "ok")]))
    everything = pa.concat_tables(tables)
    todo, counts = ledger.incremental_filter(listing, everything)
    return todo, {**counts, "ranges": 1, "max_range_entries": everything.num_rows}


def child(variant: str, out: str, listing_path: str, range_entries: int) -> None:
    """One decision, measured in this fresh process; prints one JSON line."""
    import pyarrow.dataset  # noqa: F401  (loaded lazily by `filters=`: code, not decision data)

    listing = pq.read_table(listing_path)
    ledger.uri_hash(pa.array(["warm-up"]))
    peak = {"arrow": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["arrow"] = max(peak["arrow"], pa.total_allocated_bytes())
            time.sleep(0.002)

    gc.collect()
    pa.default_memory_pool().release_unused()
    base_arrow = peak["arrow"] = pa.total_allocated_bytes()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS: the peak from here on is the decision's
    base_rss = _status("VmRSS")
    fs, root = storage.filesystem(out)
    t = time.perf_counter()
    if variant == "old":
        todo, info = old_decision(out, listing)
    else:
        compact_after = 1 if variant == "compaction" else 10**6
        todo, info = runs.incremental_decision(fs, root, TASK_FP, listing,
                                               range_entries=range_entries,
                                               compact_after=compact_after)
    seconds = time.perf_counter() - t
    done.set()
    sampler.join()
    print(json.dumps({
        "variant": variant, "seconds": round(seconds, 2),
        "peak_rss_mib": round(_status("VmHWM") - base_rss, 1),
        "peak_arrow_mib": round((peak["arrow"] - base_arrow) / MIB, 1),
        "listing_mib": round(listing.nbytes / MIB, 1), "listed": listing.num_rows,
        "computed": int(todo.sum()), **{k: info[k] for k in
                                        ("skipped_unchanged", "changed", "new", "ranges",
                                         "max_range_entries")},
        "index_used": info.get("index_used", False),
        "run_ledgers_read": info.get("run_ledgers_read", len(runs.finished_runs(fs, root)))}))


def measure(variant: str, out: str, listing_path: str, range_entries: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", variant, out,
                           listing_path, "--range-entries", str(range_entries)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--earlier", type=int, default=1_000_000)
    ap.add_argument("--scale", type=int, default=4_000_000,
                    help="a second, larger ledger to show how memory scales (0: skip)")
    ap.add_argument("--new", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--other-range", type=int, default=1 << 20,
                    help="a second range size for the 'ranges' variant (default: 8x the job's)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", nargs=3, metavar=("VARIANT", "OUT", "LISTING"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--range-entries", type=int, default=ledger.RANGE_ENTRIES,
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, args.range_entries)
        return

    results: dict = {"earlier_runs": args.runs, "new": args.new, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        results["listing_new_seconds"] = round(time_listing(tmp, args.new), 3)
        for n in [args.earlier] + ([args.scale] if args.scale else []):
            root = os.path.join(tmp, f"n{n}")
            t = time.perf_counter()
            out, listing_path = make_output(root, n, args.runs, args.new)
            setup = time.perf_counter() - t
            plan = [("old", ledger.RANGE_ENTRIES), ("ranges", args.other_range),
                    ("ranges", ledger.RANGE_ENTRIES), ("compaction", ledger.RANGE_ENTRIES),
                    ("index", ledger.RANGE_ENTRIES)]
            for variant, range_entries in plan:
                row = measure(variant, out, listing_path, range_entries)
                row.update(earlier=n, range_entries=range_entries if variant != "old" else None,
                           setup_seconds=round(setup, 1))
                assert row["new"] == args.new and row["changed"] == -(-n // 100), row
                assert row["computed"] == args.new + row["changed"], row
                results["rows"].append(row)
                print(f"  {variant:<10} earlier={n:>9,} {row['seconds']:>6.2f}s "
                      f"rss+{row['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)

    names = {"old": "old, all in memory", "ranges": "ranges",
             "compaction": "compaction pass", "index": "index only"}
    print(f"\nlisting {args.new:,} new files (local disk, inputs.list_images): "
          f"{results['listing_new_seconds']:.2f}s")
    print(f"tonight's listing = every earlier object (1% changed) + {args.new:,} new; "
          f"earlier entries in {args.runs} runs\n")
    head = (f"{'earlier':>10} {'decision':<19} {'range':>9} {'ranges':>6} {'max held':>9} "
            f"{'ledgers':>7} {'time s':>7} {'peak RSS MiB':>12} {'peak Arrow MiB':>14} "
            f"{'listing MiB':>11}")
    print(head)
    print("-" * len(head))
    for r in results["rows"]:
        read = ("index" if r["index_used"] else "") + (
            f"{'+' if r['index_used'] else ''}{r['run_ledgers_read']}"
            if r["run_ledgers_read"] or not r["index_used"] else "")
        print(f"{r['earlier']:>10,} {names[r['variant']]:<19} "
              f"{r['range_entries'] or '-':>9} {r['ranges']:>6} {r['max_range_entries']:>9,} "
              f"{read:>7} {r['seconds']:>7.2f} {r['peak_rss_mib']:>12.0f} "
              f"{r['peak_arrow_mib']:>14.0f} {r['listing_mib']:>11.0f}")
    print()
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
