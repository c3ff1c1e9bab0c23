"""Listing a big S3 prefix: s3fs's `find` (one page after another, what the job did before)
against the job's staged listing (`pipeline._list_staged`: the plan on the driver, the parts
listed in Ray tasks into Parquet chunks), behind a per-request delay, for 10^5 and 10^6 keys.

Putting 10^6 objects into moto takes hours, so a stub on loopback answers ListObjectsV2 (Prefix,
StartAfter, ContinuationToken, MaxKeys) from generated keys, sleeping `--latency-ms` per
request. Each measurement runs in a fresh process, which reports its wall time, the LIST
requests the stub saw and its peak RSS (ru_maxrss) above the RSS before listing (for
"staged", the driver's: Ray is started first, on 2 CPUs, and not timed; the listing tasks run
in Ray's workers).

    python benchmarks/bench_listing.py --keys 100000 1000000 --latency-ms 20
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import resource
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ListStub:
    """`with ListStub(n, latency_ms) as url:` an S3 endpoint whose bucket `b` holds the keys
    `img/<shard>/<number>.jpg` (n of them, 1000 per shard folder), listing only."""

    def __init__(self, n: int, latency_ms: float):
        self.keys = sorted(f"img/{i // 1000:05d}/{i:09d}.jpg" for i in range(n))
        # Each key's <Contents> rendered once, before any measurement: a page is then one join,
        # so the stub (on the same cores as the client, unlike a real store) takes little CPU
        # from the listing it serves.
        self.frags = [
            f"<Contents><Key>{escape(k)}</Key><LastModified>2026-01-01T00:00:00.000Z"
            f"</LastModified><ETag>&quot;{hash(k) & 0xffffffff:032x}&quot;</ETag>"
            f"<Size>{1000 + len(k)}</Size><StorageClass>STANDARD</StorageClass></Contents>"
            for k in self.keys]
        self.latency = latency_ms / 1000
        self.requests = 0
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._reply(404 if urlsplit(self.path).path.count("/") > 1 else 200, b"")

            def do_GET(self):
                url = urlsplit(self.path)
                if url.path == "/__stats__":
                    return self._reply(200, json.dumps({"requests": stub.requests}).encode())
                q = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
                if "list-type" not in q:
                    return self._reply(404, b"<Error><Code>NoSuchKey</Code></Error>")
                time.sleep(stub.latency)
                with stub._lock:
                    stub.requests += 1
                self._reply(200, stub.page(q).encode())

            def _reply(self, status, body):
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True

    def page(self, q: dict) -> str:
        prefix = q.get("prefix", "")
        after = q.get("continuation-token") or q.get("start-after") or ""
        delimiter = q.get("delimiter")
        limit = int(q.get("max-keys", 1000))
        i = max(bisect.bisect_right(self.keys, after), bisect.bisect_left(self.keys, prefix))
        items, prefixes = [], []
        start = i
        if not delimiter:  # a plain page: the next `limit` keys under the prefix, by bisection
            end = min(i + limit, bisect.bisect_left(self.keys, prefix + "\U0010ffff"))
            items, i = self.keys[i:end], end
        while delimiter and i < len(self.keys) and len(items) + len(prefixes) < limit:
            k = self.keys[i]
            if not k.startswith(prefix):
                break
            if delimiter and delimiter in k[len(prefix):]:
                p = k[:k.index(delimiter, len(prefix)) + 1]
                prefixes.append(p)
                i = bisect.bisect_left(self.keys, p + "\U0010ffff")
                continue
            items.append(k)
            i += 1
        truncated = i < len(self.keys) and self.keys[i].startswith(prefix)
        last = items[-1] if items else (prefixes[-1] if prefixes else "")
        if delimiter:
            body = "".join(self.frags[bisect.bisect_left(self.keys, k)] for k in items)
        else:
            body = "".join(self.frags[start:start + len(items)])
        body += "".join(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>"
                        for p in prefixes)
        token = (f"<NextContinuationToken>{escape(last)}</NextContinuationToken>"
                 if truncated else "")
        return (f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult '
                f'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name>'
                f"<Prefix>{escape(prefix)}</Prefix><KeyCount>{len(items) + len(prefixes)}"
                f"</KeyCount><MaxKeys>{limit}</MaxKeys><IsTruncated>{str(truncated).lower()}"
                f"</IsTruncated>{token}{body}</ListBucketResult>")

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc):
        self.server.shutdown()


def _child(endpoint: str, how: str) -> None:
    """One measurement, in its own process: list s3://b/img/ and print JSON."""
    sys.path.insert(0, ROOT)
    import s3fs

    from resnet_features.extract.inputs import list_images

    opts = {"key": "k", "secret": "s", "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    fs = s3fs.S3FileSystem(**opts)
    fs.call_s3("list_objects_v2", Bucket="b", MaxKeys=1)  # connect before measuring
    extra = {}
    if how == "staged":
        staged = _staged_setup(opts)
        extra["ray_init_seconds"] = staged.init_seconds
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    if how == "find":
        n = len(fs.find("b/img/", detail=True))
    elif how == "list_images":  # the driver's listing of other formats, to its table
        n = list_images("s3://b/img/", opts).table.num_rows
    else:
        listing = staged()
        n = listing.num_rows
        extra.update(tasks=listing.tasks, chunks=len(listing.chunks), parts=listing.units,
                     task_cpu_seconds=round(listing.cpu_seconds, 1))
    seconds = time.perf_counter() - t0
    extra["driver_cpu_seconds"] = round(time.process_time() - cpu0, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if how == "staged":
        import shutil

        shutil.rmtree(staged.out, ignore_errors=True)
    print(json.dumps({"keys": n, "seconds": round(seconds, 2),
                      "peak_rss_mb_above_start": round((peak - before) / 1024, 1), **extra}))


def _staged_setup(opts: dict):
    """Ray on 2 CPUs, and a call of the job's staged listing of s3://b/img/ into a scratch
    output (what `pipeline.run` does for an s3:// prefix of images)."""
    import tempfile

    import ray

    from resnet_features.core import storage
    from resnet_features.core.config import config_from_args, get_args_parser
    from resnet_features.extract import pipeline
    from resnet_features.runs.protocol import RunLayout

    t0 = time.perf_counter()
    ray.init(num_cpus=2, address="local", logging_level="ERROR", log_to_driver=False)
    out = tempfile.mkdtemp(prefix="bench-listing-")
    cfg = config_from_args(get_args_parser().parse_args(
        ["--input", "s3://b/img/", "--output", out, "--storage-options", json.dumps(opts)]))
    ofs, root = storage.filesystem(out)
    layout = RunLayout(ofs, root, "bench")

    def staged():
        return pipeline._list_staged(cfg, layout, 0)

    staged.init_seconds = round(time.perf_counter() - t0, 2)
    staged.out = out
    return staged


def measure(n: int, latency_ms: float, how: str) -> dict:
    import urllib.request

    with ListStub(n, latency_ms) as url:
        res = subprocess.run([sys.executable, __file__, "--child", url, how], capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=3600)
        if res.returncode:
            raise RuntimeError(res.stderr[-3000:])
        out = json.loads(res.stdout.strip().splitlines()[-1])
        stats = json.loads(urllib.request.urlopen(f"{url}/__stats__").read())
    return {"how": how, "n": n, "latency_ms": latency_ms, **out,
            "list_requests": stats["requests"] - 1}  # less the connect request


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--keys", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--latency-ms", type=float, default=20)
    p.add_argument("--how", nargs="+", default=["find", "staged"])
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _child(*args.child)
    for n in args.keys:
        for how in args.how:
            print(json.dumps(measure(n, args.latency_ms, how)), flush=True)


if __name__ == "__main__":
    main()
