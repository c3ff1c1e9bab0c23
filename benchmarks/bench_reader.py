#!/usr/bin/env python
"""Benchmark: the job's reader vs Ray Data's `read_binary_files` on many small S3 objects.

Uploads N objects of 20-100 KB to a moto S3 server on 127.0.0.1, puts a latency proxy in front
of it (default 20 ms per request, like a real object store), then reads the same prefix three
ways in one run and prints objects/s and MB/s for each:

  fsspec_cat         one concurrent `fs.cat` of all the objects from the driver (the ceiling)
  job_reader         the job's listing + `ReadBytes` stage in Ray Data, grouped as the job does
  read_binary_files  `ray.data.read_binary_files(prefix)` through pyarrow's S3 client

Targets: job_reader >= 3x read_binary_files, and >= 1/2 of fsspec_cat's bandwidth.

    python benchmarks/bench_reader.py --objects 2000 --latency-ms 20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from s3_server import ACCESS_KEY, SECRET_KEY, S3Server  # noqa: E402

BUCKET = "bench"

log = logging.getLogger("bench_reader")


@contextlib.contextmanager
def servers(latency_ms: float):
    """moto and the latency proxy, each in its own process (never sharing the client's GIL);
    yields (moto endpoint, proxy endpoint, {"moto": pid, "proxy": pid}); both stopped on exit."""
    procs = []
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        moto = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"),
                                 "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(moto)
        upstream = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("moto_server did not start")
            time.sleep(0.2)
        proxy = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "latency_proxy.py"), "--upstream", upstream,
             "--latency-ms", str(latency_ms)], stdout=subprocess.PIPE, text=True)
        procs.append(proxy)
        yield upstream, proxy.stdout.readline().strip(), {"moto": moto.pid, "proxy": proxy.pid}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), or None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proxy_stats(endpoint: str) -> dict:
    from latency_proxy import STATS_PATH

    with urllib.request.urlopen(endpoint + STATS_PATH, timeout=30) as r:
        return json.load(r)


def measured(name: str, fn, endpoint: str, prefix: str, pids: dict[str, int]) -> dict:
    """Run one reader; add what it cost around it: requests and bytes through the proxy, CPU
    seconds of the moto and proxy processes (they share this machine's cores with the reader)
    and the load average before and after (other work on a shared machine shows there)."""
    before, cpu0, load0 = proxy_stats(endpoint), {k: cpu_seconds(p) for k, p in pids.items()}, \
        os.getloadavg()[0]
    result = fn(endpoint, prefix)
    after, cpu1 = proxy_stats(endpoint), {k: cpu_seconds(p) for k, p in pids.items()}
    result["requests"] = {m: n - before["requests"].get(m, 0)
                          for m, n in after["requests"].items()
                          if n - before["requests"].get(m, 0)}
    result["bytes_through_proxy"] = after["bytes_out"] - before["bytes_out"]
    result["server_cpu_s"] = {k: round(cpu1[k] - cpu0[k], 2) for k in pids
                              if cpu0[k] is not None and cpu1[k] is not None}
    result["load_avg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    log.info("%s done: %s", name, result)
    return result


def upload(server, n: int, min_kb: int, max_kb: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    fs = server.fs()
    server.make_bucket(BUCKET)
    sizes = rng.integers(min_kb * 1024, max_kb * 1024 + 1, size=n)
    total, batch = 0, {}
    for i, size in enumerate(sizes):
        batch[f"{BUCKET}/objects/{i // 1000:03d}/img-{i:06d}.jpg"] = rng.bytes(int(size))
        total += int(size)
        if len(batch) == 200:
            fs.pipe(batch)
            batch = {}
    if batch:
        fs.pipe(batch)
    return total


def s3fs_options(endpoint: str) -> dict:
    return {"key": ACCESS_KEY, "secret": SECRET_KEY,
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}


def bench_cat(endpoint: str, prefix: str) -> dict:
    from resnet_features.core import storage

    # The job's own s3fs settings (connection pool), so the ceiling is not held back by them.
    fs, _ = storage.filesystem(f"s3://{prefix}", {**s3fs_options(endpoint),
                                                  "skip_instance_cache": True})
    paths = sorted(fs.find(prefix))  # listing not timed here: the ceiling is for fetching
    t0 = time.perf_counter()
    data = fs.cat(paths)
    seconds = time.perf_counter() - t0
    return {"objects": len(data), "bytes": sum(len(v) for v in data.values()),
            "seconds": seconds}


def bench_job_reader(endpoint: str, prefix: str) -> dict:
    import ray

    from resnet_features.extract.inputs import InputSpec, ReadBytes, list_inputs
    from resnet_features.extract.pipeline import read_group_size

    opts = s3fs_options(endpoint)
    t0 = time.perf_counter()
    listing = list_inputs(f"s3://{prefix}", InputSpec(format="images"), opts)
    table = listing.table
    group = read_group_size(table.num_rows, ray.cluster_resources().get("CPU", 1), 16)
    ds = ray.data.from_arrow([table.slice(i, group) for i in range(0, table.num_rows, group)])
    ds = ds.map_batches(ReadBytes(opts, input_format="images"), batch_size=None,
                        batch_format="numpy", num_cpus=1)
    n, nbytes = _consume(ds.map_batches(_sizes, batch_size=None, batch_format="numpy"))
    return {"objects": n, "bytes": nbytes, "seconds": time.perf_counter() - t0,
            "listing_seconds": listing.seconds, "group": group}


def bench_read_binary_files(endpoint: str, prefix: str) -> dict:
    import pyarrow.fs as pafs
    import ray

    fs = pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, region="us-east-1",
                           endpoint_override=endpoint, scheme="http")
    t0 = time.perf_counter()
    ds = ray.data.read_binary_files(prefix, filesystem=fs)
    n, nbytes = _consume(ds.map_batches(_sizes, batch_size=None, batch_format="numpy"))
    return {"objects": n, "bytes": nbytes, "seconds": time.perf_counter() - t0}


def _sizes(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each object's size, computed in the read task (fused with it), as the job's decode is:
    the bytes never travel to the driver, for either reader."""
    if "error_stage" in batch:
        assert not any(batch["error_stage"]), "read errors in the benchmark"
    return {"size": np.array([len(b) for b in batch["bytes"]], dtype=np.int64)}


def _consume(ds) -> tuple[int, int]:
    n = nbytes = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        n += len(batch["size"])
        nbytes += int(batch["size"].sum())
    return n, nbytes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objects", type=int, default=2000)
    p.add_argument("--min-kb", type=int, default=20)
    p.add_argument("--max-kb", type=int, default=100)
    p.add_argument("--latency-ms", type=float, default=20.0, help="added to every request")
    p.add_argument("--num-cpus", type=int, default=None, help="Ray CPUs (default: all)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import ray

    with servers(args.latency_ms) as (upstream, endpoint, pids):
        total = upload(S3Server(upstream), args.objects, args.min_kb, args.max_kb)
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False,
                 logging_level=logging.WARNING)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            # Warm-up: start Ray's workers and import s3fs in them before any timing.
            ray.data.range(64, override_num_blocks=8).map_batches(_warm_up).materialize()
            prefix = f"{BUCKET}/objects"
            readers = {"fsspec_cat": bench_cat, "job_reader": bench_job_reader,
                       "read_binary_files": bench_read_binary_files}
            results = {name: measured(name, fn, endpoint, prefix, pids)
                       for name, fn in readers.items()}
        finally:
            ray.shutdown()
    for name, r in results.items():
        assert r["objects"] == args.objects and r["bytes"] == total, (name, r)
        r["objects_per_s"] = r["objects"] / r["seconds"]
        r["mb_per_s"] = r["bytes"] / 1e6 / r["seconds"]
    job, rbf, cat = (results[k] for k in ("job_reader", "read_binary_files", "fsspec_cat"))
    summary = {
        "objects": args.objects, "mb": total / 1e6, "latency_ms": args.latency_ms,
        "cpus": ray_cpus(args.num_cpus),
        "job_vs_read_binary_files": job["objects_per_s"] / rbf["objects_per_s"],
        "job_vs_fsspec_cat_bandwidth": job["mb_per_s"] / cat["mb_per_s"],
        "results": results,
    }
    summary["targets_met"] = {
        ">=3x read_binary_files": summary["job_vs_read_binary_files"] >= 3,
        ">=0.5x fsspec cat bandwidth": summary["job_vs_fsspec_cat_bandwidth"] >= 0.5,
    }
    print(f"{args.objects} objects, {total / 1e6:.1f} MB, {args.latency_ms:g} ms per request")
    print(f"{'reader':<20}{'seconds':>10}{'objects/s':>12}{'MB/s':>10}{'GET':>7}{'HEAD':>7}"
          f"{'moto cpu s':>12}{'proxy cpu s':>13}{'load avg':>14}")
    for name, r in results.items():
        req, cpu = r["requests"], r["server_cpu_s"]
        load = "{:.1f} -> {:.1f}".format(*r["load_avg_1m"])
        print(f"{name:<20}{r['seconds']:>10.2f}{r['objects_per_s']:>12.1f}{r['mb_per_s']:>10.2f}"
              f"{req.get('GET', 0):>7}{req.get('HEAD', 0):>7}{cpu.get('moto', -1):>12.1f}"
              f"{cpu.get('proxy', -1):>13.1f}{load:>14}")
    print(f"job_reader / read_binary_files: {summary['job_vs_read_binary_files']:.2f}x; "
          f"job_reader / fsspec_cat bandwidth: {summary['job_vs_fsspec_cat_bandwidth']:.2f}")
    print(json.dumps(summary, indent=2, sort_keys=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
    return 0


def _warm_up(batch):
    import pyarrow.fs  # noqa: F401
    import s3fs  # noqa: F401

    return batch


def ray_cpus(num_cpus: int | None) -> int:
    return num_cpus or os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
