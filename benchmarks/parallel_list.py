"""Listing an S3 prefix with many LIST requests in flight instead of one page after another.

NOT USED BY THE JOB YET: measured on a loaded 2-core machine it was slower than s3fs's `find`
(its splits cost many empty LISTs on sharded key layouts, and the client's response parsing,
not the latency, dominated); `benchmarks/bench_listing.py` measures it. See docs/inputs.md.

ListObjectsV2 returns keys in order, 1000 a page, and a page's continuation token is only known
when the page arrives: one prefix is a chain of round trips (10^6 keys = 1000 trips). Here the
key space is cut into ranges (`StartAfter`=low, stop at high): a range whose first page comes
back full is split again after its last key, on the next character where the remaining range
has room, so the number of ranges in flight grows with every round trip until the whole prefix
is covered. The ranges (low, high] partition the key space (every key falls in exactly one,
whatever its characters), so nothing is missed or listed twice; a split that finds nothing
costs one empty LIST.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fsspec.asyn import sync

log = logging.getLogger(__name__)

#: LIST requests in flight at once.
MAX_IN_FLIGHT = 64

#: A full page splits what is left of its range into at most this many ranges.
SPLIT_WAYS = 16

#: Characters at which a range is cut (every key is still covered: ranges partition the space).
_CUTS = "-./0123456789:ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~"


def _cuts(first: str, low: str, high: str | None, base: int) -> list[str]:
    """Up to SPLIT_WAYS-1 keys strictly between `low` and `high` (None = no upper bound),
    sorted. A full page spans `first`..`low`; where those two differ tells how fast keys vary,
    so the cuts go one character before that (past `base`, the prefix), at the characters right
    after low's there: a page-sized range each, with the last range taking the rest. Where there
    is no room, the next positions, then the earlier ones, are tried."""
    differ = next((i for i, (a, b) in enumerate(zip(first, low)) if a != b), len(first))
    start = max(base, differ - 1)
    for i in [*range(start, len(low) + 1), *range(start - 1, base - 1, -1)]:
        head = low[:i]
        after = low[i] if i < len(low) else ""
        below = high[i] if high is not None and high.startswith(head) and len(high) > i else None
        found = [head + c for c in _CUTS if c > after and (below is None or c < below)
                 and head + c > low and (high is None or head + c < high)]
        if found:
            return found[:SPLIT_WAYS - 1]
    return []


def parallel_find(fs, path: str) -> dict[str, dict[str, Any]]:
    """`fs.find(path, detail=True)` for an s3fs filesystem, listed by key ranges in parallel.
    Also returns the requests made, in `parallel_find.requests` of the last call (for tests)."""
    bucket, _, prefix = fs._strip_protocol(path).partition("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    found: dict[str, dict[str, Any]] = {}
    counter = {"requests": 0}

    async def run():
        gate = asyncio.Semaphore(MAX_IN_FLIGHT)

        async def list_range(low: str, high: str | None) -> None:
            kwargs = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 1000, **fs.req_kw}
            if low:
                kwargs["StartAfter"] = low
            async with gate:
                counter["requests"] += 1
                page = await fs._call_s3("list_objects_v2", **kwargs)
            contents = page.get("Contents", [])
            last = None
            for c in contents:
                key = c["Key"]
                if high is not None and key > high:
                    return
                last = key
                found[f"{bucket}/{key}"] = {"name": f"{bucket}/{key}", "size": c["Size"],
                                            "type": "file", "ETag": c.get("ETag"),
                                            "LastModified": c.get("LastModified")}
            if not page.get("IsTruncated") or last is None:
                return
            cuts = _cuts(contents[0]["Key"], last, high, len(prefix))
            bounds = [last, *cuts]
            await asyncio.gather(*(list_range(lo, hi) for lo, hi in
                                   zip(bounds, [*cuts, high])))

        await list_range("", None)

    sync(fs.loop, run)
    parallel_find.requests = counter["requests"]
    # Keys ending in "/" are folder markers that the console writes; find leaves them out too.
    return {k: v for k, v in found.items() if not k.endswith("/")}


parallel_find.requests = 0
