"""Benchmark: what the write path absorbs, and what the driver pays per input.

A synthetic stream of ResNet-50 result rows (`--task both`: a 2048-float embedding and top-5;
`+layers`: also layer1..layer4 pooled, 256+512+1024+2048 floats) is written by 1 and 2 writer
processes, each running the job's own `PartSink` on its share of the stream (as the job's write
tasks do on the worker nodes), in parts of `auto_rows_per_file` rows, to local disk. The parent
plays the driver: it receives only the sinks' part records and feeds them to the job's
`CommitLog`. Reported per case: rows/s and MB/s of Parquet the writers absorb (wall time of the
whole stream), bytes the driver received per input (Arrow size of the records), and the
driver's CPU seconds per 10^5 inputs (process time spent on records).

`--driver-rss` instead reports the driver's peak RSS for --rows inputs in a fresh process, and
what the results added to it (peak minus the RSS once imports, listing and the synthetic pool
are in place): `after` = listing + CommitLog fed with the records of a real write done in a
child process; `before` = the driver-side PartWriter of git revision --before-rev (every result
row through the driver), fed the same synthetic stream. Neither includes Ray's own driver.

    python benchmarks/bench_writer.py [--rows 100000] [--processes 1 2] [--json out.json]
    python benchmarks/bench_writer.py --driver-rss [--rows 100000] [--before-rev 091c379]

Rows are random floats (incompressible, like real embeddings), drawn from a 4096-row pool at
random offsets, so zstd cannot find repeats within its window.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time
import types

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from resnet_features.core.errors import error_columns  # noqa: E402
from resnet_features.core.models import resolve_model  # noqa: E402
from resnet_features.extract.backbone import stage_channels  # noqa: E402
from resnet_features.extract.outputs import for_task  # noqa: E402
from resnet_features.extract.outputs.layers import Layers  # noqa: E402
from resnet_features.extract.writer import CommitLog, PartSink, auto_rows_per_file  # noqa: E402

BATCH = 256
POOL = 4096
LAYERS = ("layer1", "layer2", "layer3", "layer4")


def units_for(case: str):
    spec = resolve_model("resnet50", "random")[0]
    units = for_task(spec, "both")
    if case == "both+layers":
        channels = stage_channels(spec.embedding_dim)
        units = (*units, Layers({n: channels[n] for n in LAYERS}))
    return units


def make_pool(units, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    pool = {"embedding": rng.standard_normal((POOL, 2048), dtype=np.float32),
            "topk_ids": rng.integers(0, 1000, (POOL, 5)).astype(np.int32),
            "topk_scores": np.sort(rng.random((POOL, 5), dtype=np.float32))[:, ::-1].copy()}
    for unit in units:
        for name, dim in getattr(unit, "dims", {}).items():
            pool[name] = rng.standard_normal((POOL, dim), dtype=np.float32)
    return pool


def batch_of(pool, start: int, n: int, rng) -> dict[str, np.ndarray]:
    idx = np.arange(start, start + n, dtype=np.int64)
    take = (rng.integers(0, POOL) + np.arange(n)) % POOL
    b = {"index": idx, "uri": np.array([f"s3://bucket/images/{i:09d}.jpg" for i in idx],
                                       dtype=object),
         "fingerprint": np.array([f"{100000 + i}:etag:{i:032x}" for i in idx], dtype=object),
         "size_bytes": np.full(n, 110_000, np.int64), "bytes_read": np.full(n, 110_000, np.int64),
         "width": np.full(n, 500, np.int32), "height": np.full(n, 375, np.int32)}
    b.update({k: v[take] for k, v in pool.items()})
    b.update(error_columns(n))
    return b


def writer_proc(args) -> tuple[list[dict], float, float]:
    """One writer process: its share [start, end) of the stream, in parts of `per_part` rows;
    returns the records and when its writing began and ended (process start-up excluded)."""
    case, out, start, end, per_part, seed = args
    units = units_for(case)
    sink = PartSink(out, units=units, file_metadata={"benchmark": case})
    pool, rng = make_pool(units, seed), np.random.default_rng(seed + 1)
    records, chunks, held = [], [], 0
    t_start = time.time()
    for s in range(start, end, BATCH):
        chunks.append(batch_of(pool, s, min(BATCH, end - s), rng))
        held += len(chunks[-1]["index"])
        if held >= per_part or s + BATCH >= end:
            part = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
            records.append(sink(part))
            chunks, held = [], 0
    return records, t_start, time.time()


def run_case(case: str, rows: int, processes: int) -> dict:
    units = units_for(case)
    per_part = auto_rows_per_file(units)
    share = -(-rows // processes)
    with tempfile.TemporaryDirectory(prefix="bench-writer-") as out:
        jobs = [(case, out, p * share, min(rows, (p + 1) * share), per_part, 17 + p)
                for p in range(processes)]
        log = CommitLog(rows)
        pa.table({"warm-up": np.array(["x"], dtype=object)})  # pyarrow's one-time set-up (~0.5 s)
        driver_cpu, spans = 0.0, []
        with mp.get_context("spawn").Pool(processes) as pool:
            for records, t_start, t_end in pool.imap_unordered(writer_proc, jobs):
                spans.append((t_start, t_end))
                c0 = time.thread_time()  # the driver's own thread, not the pool's helpers
                for r in records:
                    log.add(pa.table(r))
                driver_cpu += time.thread_time() - c0
        wall = max(e for _, e in spans) - min(s for s, _ in spans)
        assert log.done == rows and not log.missing_indices()
    return {"case": case, "processes": processes, "rows": rows, "rows_per_part": per_part,
            "parts": len(log.parts), "seconds": round(wall, 2),
            "rows_per_second": round(rows / wall), "mb_per_second":
            round(log.bytes_written / wall / 1e6, 1), "bytes_written": log.bytes_written,
            "driver_bytes_per_input": round(log.received_bytes / rows, 2),
            "driver_cpu_seconds_per_100k": round(driver_cpu * 1e5 / rows, 4)}


def driver_rss(mode: str, rows: int, rev: str) -> dict:
    """Peak RSS of a fresh driver-like process for `rows` inputs (see the module docstring)."""
    case = "both"
    units = units_for(case)
    listing = pa.table({"index": np.arange(rows, dtype=np.int64),
                        "uri": [f"s3://bucket/images/{i:09d}.jpg" for i in range(rows)],
                        "size_bytes": np.full(rows, 110_000, np.int64),
                        "fingerprint": [f"{100000 + i}:etag:{i:032x}" for i in range(rows)]})
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as out:
        if mode == "after":
            # The writes happen elsewhere (a child process here, write tasks in the job): the
            # driver holds the listing and the commit log fed with the records.
            with mp.get_context("spawn").Pool(1) as pool:
                records = pool.apply(writer_proc,
                                     ((case, out, 0, rows, auto_rows_per_file(units), 3),))[0]
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            log = CommitLog(rows)
            for r in records:
                log.add(pa.table(r))
        else:
            source = subprocess.run(["git", "show", f"{rev}:resnet_features/extract/writer.py"],
                                    capture_output=True, text=True, check=True).stdout
            legacy = types.ModuleType("legacy_writer")
            sys.modules[legacy.__name__] = legacy  # its dataclasses look their module up
            exec(compile(source, "legacy_writer.py", "exec"), legacy.__dict__)
            w = legacy.PartWriter(out, units=units, listing=listing,
                                  rows_per_file=auto_rows_per_file(units), file_metadata={})
            pool, rng = make_pool(units, 3), np.random.default_rng(4)
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            for s in range(0, rows, BATCH):
                w.add(batch_of(pool, s, min(BATCH, rows - s), rng))
            w.close()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "rows": rows, "peak_rss_mb": round(peak / 1024, 1),
            "rss_before_writing_mb": round(base / 1024, 1),
            "added_by_results_mb": round((peak - base) / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cases", nargs="+", default=["both", "both+layers"])
    ap.add_argument("--driver-rss", action="store_true")
    ap.add_argument("--rss-mode", choices=("before", "after"))
    ap.add_argument("--before-rev", default="091c379")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.rss_mode:
        print(json.dumps(driver_rss(a.rss_mode, a.rows, a.before_rev)))
        return
    results = []
    if a.driver_rss:
        for mode in ("before", "after"):
            out = subprocess.run([sys.executable, __file__, "--rss-mode", mode, "--rows",
                                  str(a.rows), "--before-rev", a.before_rev],
                                 capture_output=True, text=True, check=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    else:
        for case in a.cases:
            for p in a.processes:
                results.append(run_case(case, a.rows, p))
                print(json.dumps(results[-1]), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
