"""Listing a big s3:// prefix of images in parallel, into Parquet chunks instead of memory.

`plan_prefix` (driver, a few requests) cuts the prefix into `Unit`s in key order: it lists a
level or two with Delimiter='/' and keeps each sub-prefix as a unit to list recursively, and the
objects found at those levels as units of known files. `group_units` makes contiguous groups
of them, and `list_units` (one call per group, in a Ray task: `extract/pipeline.py`) lists a
group's prefixes with several requests in flight and writes its images as LISTING_SCHEMA
chunks (`index` = row number in the chunk) into the run's staging area, returning only counts
and paths. Read in chunk order, the chunks hold the images in key order: the order a plain
`fs.find` gives, so `index` is deterministic.

The responses are parsed once, by `parse_page`, which reads the fields the listing needs out of
S3's fixed, flat ListObjectsV2 document with string searches: botocore's parser costs 0.05-0.3 s
of CPU per 1000-key page and xml.etree's C parser ~10 ms (it builds 7,000 elements), several
times the search, and the parse dominates a listing once requests are in flight together. The
request still goes through s3fs's own client (credentials, endpoint, signing, retries, error
mapping); a `before-parse` hook on a private client parses the body, hands over the page and
gives botocore an empty result to parse. The hook also does the check botocore's own
`_handle_200_error` does on every S3 response (an error document or a cut-off body sent with
status 200 becomes a 500, which botocore retries), so the private client goes without
botocore's, which parsed each page a second time.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote_plus

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from botocore import handlers as botocore_handlers
from fsspec.asyn import sync

from resnet_features.core import storage
from resnet_features.extract.inputs.common import (
    IMAGE_EXTENSIONS,
    LISTING_SCHEMA,
    extension,
    kind,
    stat_fingerprint,
)

__all__ = ["Chunk", "Unit", "group_units", "list_units", "plan_prefix", "private_fs",
           "CHUNK_ROWS"]

log = logging.getLogger(__name__)

#: Keys per ListObjectsV2 page (S3's maximum).
PAGE_KEYS = 1000

#: Most listing rows per staged chunk (~30 MB of Arrow): what a listing task buffers and what
#: the driver reads at a time when it selects the work.
CHUNK_ROWS = 1 << 18

#: Sub-prefixes the plan aims for before it stops descending (each a unit listed in parallel).
PLAN_UNITS = 256

#: Levels the plan descends at most below the input prefix.
PLAN_DEPTH = 3

#: Pages of one level the plan reads at most; a bigger level stays one unit (listed by a task).
PLAN_LEVEL_PAGES = 4

#: Objects a level may hold for the plan to expand it: a level of files is a task's to list.
PLAN_LEVEL_FILES = 100

#: Prefixes of a group listed at once (each a chain of pages), and pages each may read ahead.
IN_FLIGHT = 16
READ_AHEAD_PAGES = 4

_EMPTY = (b'<?xml version="1.0" encoding="UTF-8"?>'
          b'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"/>')

#: `(key, size, fingerprint)` of an object.
Entry = tuple[str, int, str]


@dataclass(frozen=True)
class Unit:
    """A piece of the input prefix, in key order: a `prefix` (ending in "/") to list
    recursively, or `files` the plan found on its way down."""

    prefix: str | None = None
    files: tuple[Entry, ...] = ()


@dataclass(frozen=True)
class Chunk:
    """One staged chunk of listing rows, as a listing task reports it."""

    path: str  # URI on the output's filesystem
    rows: int
    bytes: int  # sum of size_bytes


@dataclass(frozen=True)
class Page:
    files: list[Entry]
    prefixes: list[str]
    token: str | None


def _parse_once(response_dict, customized_response_dict, **_):
    """botocore `before-parse` hook: parse a successful response here, once, and hand over the
    `Page` (botocore then parses an empty result). Anything but a whole ListBucketResult under
    status 200 (S3's error document, a body cut off by the network) becomes a 500, which
    botocore's retry handler retries: the check of botocore's `_handle_200_error`, which this
    client goes without."""
    if response_dict.get("status_code", 500) >= 300:
        return
    try:
        page = parse_page(response_dict["body"])
    except ValueError:
        response_dict["status_code"] = 500
        return
    customized_response_dict["Page"] = page
    response_dict["body"] = _EMPTY


def private_fs(storage_options: dict[str, Any] | None):
    """An s3fs filesystem of its own (never fsspec's cached instance, which read tasks in the
    same process share), for ListObjectsV2 calls only: they return the parsed `Page`."""
    options = {**(storage_options or {}), "skip_instance_cache": True}
    fs, _ = storage.filesystem("s3://", options)
    s3 = sync(fs.loop, fs.set_session)
    # The client's own copy of botocore's handlers: other clients keep the 200-error check.
    s3.meta.events.unregister("before-parse.s3.*", botocore_handlers._handle_200_error)
    s3.meta.events.register("before-parse.s3.ListObjectsV2", _parse_once)
    return fs


def _fingerprint(size: int, etag: str | None, modified: str | None) -> str:
    if etag:
        return stat_fingerprint({"size": size, "ETag": etag})
    stamp = datetime.fromisoformat(modified.replace("Z", "+00:00")) if modified else None
    return stat_fingerprint({"size": size, "LastModified": stamp})


_ENTITY = re.compile(r"&(#x[0-9a-fA-F]+|#[0-9]+|amp|lt|gt|quot|apos);")
_NAMED = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'"}


def _entity(m: re.Match) -> str:
    ref = m.group(1)
    if ref[0] != "#":
        return _NAMED[ref]
    return chr(int(ref[2:], 16) if ref[1] == "x" else int(ref[1:]))


def _unescape(text: str) -> str:
    """XML character data -> text: the five named entities and character references."""
    return _ENTITY.sub(_entity, text) if "&" in text else text


def _field(block: str, tag: str) -> str | None:
    """The text of the first `<tag>...</tag>` in `block` (escaped), or None."""
    i = block.find(f"<{tag}>")
    if i < 0:
        return None
    i += len(tag) + 2
    j = block.find(f"</{tag}>", i)
    if j < 0:
        raise ValueError(f"unclosed <{tag}>")
    return block[i:j]


def parse_page(body: bytes) -> Page:
    """A ListObjectsV2 response: objects (not folder markers), common prefixes, next token.

    The document is flat (`Contents` and `CommonPrefixes` hold text elements only), so each
    field is found by its tags; the text is XML-unescaped and, under EncodingType=url,
    URL-decoded. ValueError for anything but a whole ListBucketResult (an error document, a
    body cut off)."""
    text = body.decode("utf-8").strip()
    start = text.find("<ListBucketResult")
    if start < 0 or not text.endswith("</ListBucketResult>"):
        raise ValueError("not a whole ListBucketResult")
    head, *contents = text[start:].split("<Contents>")
    # What is not in a Contents block: the page's own fields and the CommonPrefixes.
    outside = head + (contents[-1].partition("</Contents>")[2] if contents else "")
    url = "<EncodingType>url</EncodingType>" in outside

    def name(raw: str) -> str:
        raw = _unescape(raw)
        return unquote_plus(raw) if url else raw

    files = []
    for block in contents:
        block = block[:block.index("</Contents>")]
        key = name(_field(block, "Key") or "")
        if not key or key.endswith("/"):  # a folder marker (the console's "Create folder")
            continue
        size = int(_field(block, "Size") or 0)
        etag = _field(block, "ETag")
        modified = _field(block, "LastModified")
        files.append((key, size, _fingerprint(size, etag and _unescape(etag), modified)))
    prefixes = [name(_field(p, "Prefix") or "") for p in outside.split("<CommonPrefixes>")[1:]]
    outside = outside.split("<CommonPrefixes>")[0] + outside.rpartition("</CommonPrefixes>")[2]
    token = None
    if _field(outside, "IsTruncated") == "true":
        token = _unescape(_field(outside, "NextContinuationToken") or "") or None
    return Page(files, prefixes, token)


async def _page(fs, bucket: str, prefix: str, token: str | None, delimiter: bool) -> Page:
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": PAGE_KEYS,
                              **fs.req_kw}
    if delimiter:
        kwargs["Delimiter"] = "/"
    if token:
        kwargs["ContinuationToken"] = token
    out = await fs._call_s3("list_objects_v2", **kwargs)
    return out["Page"]


def split_path(fs, path: str) -> tuple[str, str]:
    """`(bucket, prefix)` of a folder path: the prefix ends in "/" (or is empty)."""
    bucket, _, key = fs._strip_protocol(path).partition("/")
    key = key.strip("/")
    return bucket, f"{key}/" if key else ""


def plan_prefix(fs, path: str, *, want: int = PLAN_UNITS, depth: int = PLAN_DEPTH,
                level_pages: int = PLAN_LEVEL_PAGES, level_files: int | None = None
                ) -> tuple[str, list[Unit]]:
    """`(bucket, units)`: the prefix under `path` cut into units in key order.

    Level by level, every prefix unit is listed with Delimiter='/' (all at once); one whose
    level fits in `level_pages` pages and holds at most `level_files` objects is replaced by
    its objects and sub-prefixes, merged in key order (all keys under "a/" sort between "a/"
    and the next entry of the level, so the concatenation is the recursive listing's order).
    It stops once there are `want` prefix units, or after `depth` levels. The driver holds at
    most `want` x `level_files` objects and parses at most `want` x `level_pages` pages a
    level. A prefix whose level is all files (a flat folder) stays one unit: one task lists
    it, page after page (see docs/inputs.md).
    """
    bucket, root = split_path(fs, path)
    units = [Unit(prefix=root)]
    level_files = PLAN_LEVEL_FILES if level_files is None else level_files

    async def level(prefix: str) -> list[tuple[str, Any]] | None:
        entries: list[tuple[str, Any]] = []
        token = None
        for _ in range(level_pages):
            page = await _page(fs, bucket, prefix, token, delimiter=True)
            entries += [(f[0], f) for f in page.files] + [(p, None) for p in page.prefixes]
            if sum(e is not None for _, e in entries) > level_files:
                return None
            token = page.token
            if token is None:
                return sorted(entries, key=lambda e: e[0])
        return None  # too big to expand here: listed whole by a task

    async def expand_all(prefixes: list[str]):
        gate = asyncio.Semaphore(64)

        async def one(p):
            async with gate:
                return await level(p)
        return await asyncio.gather(*(one(p) for p in prefixes))

    for _ in range(depth):
        open_units = [u.prefix for u in units if u.prefix is not None]
        if not open_units or len(open_units) >= want:
            break
        levels = iter(sync(fs.loop, expand_all, open_units))
        new: list[Unit] = []
        grew = False
        for u in units:
            found = next(levels) if u.prefix is not None else None
            if u.prefix is None or found is None:
                new.append(u)
                continue
            grew = grew or any(e is None for _, e in found)
            files: list[Entry] = []
            for name, entry in found:
                if entry is not None:
                    files.append(entry)
                    continue
                if files:
                    new.append(Unit(files=tuple(files)))
                    files = []
                new.append(Unit(prefix=name))
            if files:
                new.append(Unit(files=tuple(files)))
        units = new
        if not grew:
            break
    return bucket, units


def group_units(units: list[Unit], groups: int) -> list[list[Unit]]:
    """Contiguous groups of units, about the same number of prefixes each (a unit of files
    goes with the prefixes around it)."""
    prefixes = sum(u.prefix is not None for u in units)
    per = max(1, -(-prefixes // max(1, groups)))
    out: list[list[Unit]] = [[]]
    count = 0
    for u in units:
        if u.prefix is not None:
            if count == per:
                out.append([])
                count = 0
            count += 1
        out[-1].append(u)
    return [g for g in out if g]


class _ChunkWriter:
    """Image rows of a listing task, in order, into chunks of at most CHUNK_ROWS rows."""

    def __init__(self, out_fs, folder: str, group: int, proto: str, bucket: str):
        self.out_fs, self.folder, self.group = out_fs, folder, group
        self.base = f"{proto}://{bucket}/"
        self.chunks: list[Chunk] = []
        self.skipped = 0
        self.other_kinds: dict[str, int] = {}
        self._keys: list[str] = []
        self._sizes: list[int] = []
        self._fps: list[str] = []

    def add(self, entries: list[Entry]) -> None:
        for key, size, fp in entries:
            if extension(key) not in IMAGE_EXTENSIONS:
                self.skipped += 1
                k = kind(key)
                if k is not None:
                    self.other_kinds[k] = self.other_kinds.get(k, 0) + 1
                continue
            self._keys.append(key)
            self._sizes.append(size)
            self._fps.append(fp)
            if len(self._keys) >= CHUNK_ROWS:
                self.flush()

    def flush(self) -> None:
        n = len(self._keys)
        if not n:
            return
        uris = pa.array(self._keys, pa.string())
        uris = pa.compute.binary_join_element_wise(self.base, uris, "")
        sizes = np.asarray(self._sizes, dtype=np.int64)
        table = pa.table({"index": np.arange(n, dtype=np.int64), "uri": uris,
                          "size_bytes": sizes, "source": uris,
                          "offset": np.full(n, -1, np.int64),
                          "length": np.full(n, -1, np.int64),
                          "fingerprint": pa.array(self._fps, pa.string())},
                         schema=LISTING_SCHEMA)
        path = storage.join(self.folder, f"chunk-{self.group:06d}-{len(self.chunks):05d}.parquet")
        pq.write_table(table, path, filesystem=self.out_fs, compression="zstd")
        self.chunks.append(Chunk(path=storage.full_uri(self.out_fs, path), rows=n,
                                 bytes=int(sizes.sum())))
        self._keys, self._sizes, self._fps = [], [], []


def list_units(storage_options: dict[str, Any] | None, bucket: str, units: list[Unit],
               folder_uri: str, group: int) -> dict[str, Any]:
    """List one group of units into chunks under `folder_uri` (the output's filesystem);
    returns `{"chunks": [Chunk], "skipped": non-image objects, "other_kinds": {kind: n},
    "requests": LIST requests, "cpu_seconds": the call's CPU time}`. Prefixes are listed
    IN_FLIGHT at a time, each reading up to READ_AHEAD_PAGES ahead, and written strictly in
    unit order."""
    cpu0 = time.process_time()
    fs = private_fs(storage_options)
    out_fs, folder = storage.filesystem(folder_uri, storage_options)
    out_fs.makedirs(folder, exist_ok=True)
    writer = _ChunkWriter(out_fs, folder, group, storage.protocol(fs), bucket)
    requests = 0

    async def pages(prefix: str, queue: asyncio.Queue) -> None:
        nonlocal requests
        token = None
        try:
            while True:
                page = await _page(fs, bucket, prefix, token, delimiter=False)
                requests += 1
                await queue.put(page.files)
                token = page.token
                if token is None:
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put(exc)
            return
        await queue.put(None)

    async def run() -> None:
        queues: list[asyncio.Queue | None] = []
        tasks = []

        def start(i: int) -> None:
            u = units[i]
            if u.prefix is None:
                queues.append(None)
                return
            q: asyncio.Queue = asyncio.Queue(maxsize=READ_AHEAD_PAGES)
            queues.append(q)
            tasks.append(asyncio.ensure_future(pages(u.prefix, q)))

        ahead = 0
        try:
            for i, u in enumerate(units):
                while ahead < len(units) and ahead < i + IN_FLIGHT:
                    start(ahead)
                    ahead += 1
                q = queues[i]
                if q is None:
                    writer.add(list(u.files))
                    continue
                while (item := await q.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    writer.add(item)
                queues[i] = None
        finally:
            for t in tasks:
                t.cancel()

    sync(fs.loop, run)
    writer.flush()
    return {"chunks": writer.chunks, "skipped": writer.skipped,
            "other_kinds": writer.other_kinds, "requests": requests,
            "cpu_seconds": time.process_time() - cpu0}
