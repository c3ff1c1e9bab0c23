"""Tar shards (.tar, .tar.gz, .tgz): list members from headers read by range, fetch members as
coalesced byte ranges; a .tar.gz shard, having no random access, is read whole both times."""

from __future__ import annotations

import gzip
import io
import tarfile
import zlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from resnet_features.core import storage
from resnet_features.core.errors import InputError, Stage, set_error
from resnet_features.extract.inputs.common import (
    IMAGE_EXTENSIONS,
    LIST_THREADS,
    TAR_SUFFIXES,
    Fetcher,
    Listed,
    _Unreadable,
    check,
    extension,
    listing_table,
)

#: Tar members closer than this are fetched with one range request.
COALESCE_GAP = 1 << 20

#: Listing a plain tar shard reads its headers by range. Each request reads this much at the
#: next header: its 512 bytes plus room for a pax or GNU long-name record, and a few small
#: members' headers.
TAR_HEADER_READ = 16 << 10

#: A header at most this far past what was read last follows a small member, and while they
#: come, each request reads twice as far ahead as the one before: streaming a shard of small
#: members beats one round trip (20-50 ms on an object store) per header. Past a bigger member
#: the next request reads TAR_HEADER_READ again, so big members are skipped, never read.
TAR_SMALL_MEMBER = 1 << 20

#: The read-ahead stops doubling here: one listing thread holds at most this much of a shard.
TAR_READ_AHEAD_MAX = 8 << 20


def is_tar(path: str) -> bool:
    return path.lower().endswith(TAR_SUFFIXES)


def is_gz(path: str) -> bool:
    return path.lower().endswith((".gz", ".tgz"))


class _HeaderReader(io.RawIOBase):
    """A read-only file over an object that tarfile can walk, fetching byte ranges: tarfile
    seeks over member data and reads headers only, so a shard of big members costs one small
    request per member, and a shard of small members a few growing read-ahead requests (it is
    read once, as streaming it is faster than a request per header). `bytes_fetched` and
    `requests` say what it cost."""

    def __init__(self, fs, path: str, size: int):
        self.fs, self.path, self.size = fs, path, size
        self.pos = 0
        self.buf_start, self.buf = 0, b""
        self.ahead = TAR_HEADER_READ
        self.bytes_fetched = self.requests = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if self.pos >= end:
            return b""
        buf_end = self.buf_start + len(self.buf)
        if not (self.buf_start <= self.pos and end <= buf_end):
            # (A header that straddles the end of what was read counts as close.)
            if self.buf and self.buf_start <= self.pos <= buf_end + TAR_SMALL_MEMBER:
                self.ahead = min(TAR_READ_AHEAD_MAX, 2 * self.ahead)
            else:
                self.ahead = TAR_HEADER_READ
            stop = min(self.size, max(end, self.pos + self.ahead))
            self.buf_start = self.pos
            self.buf = _ranged(self.fs.cat_file(self.path, start=self.pos, end=stop),
                               self.path, self.pos, stop)
            self.requests += 1
            self.bytes_fetched += len(self.buf)
        chunk = self.buf[self.pos - self.buf_start:end - self.buf_start]
        self.pos += len(chunk)
        return chunk

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


def _ranged(data, path: str, start: int, end: int):
    """`data` fetched for bytes [start, end) of `path`, checked: a server that ignores range
    requests (Python's http.server, some CDNs) answers with the whole object, and slicing that
    as the range would yield other members' bytes as this one's."""
    if isinstance(data, bytes) and len(data) > end - start:
        raise OSError(f"{path}: the server ignored a byte-range request ({len(data)} bytes for "
                      f"{end - start}); tar shards are read by range, so serve them from a "
                      f"store that honours Range headers")
    return data


def _tar_members(fs, path: str, size: int) -> tuple[list[tuple[str, int, int]], int]:
    """`(name, data offset, size)` of each regular member, and the bytes read to find them.
    Plain tar: headers by range (`_HeaderReader`); .tar.gz: the whole stream, since gzip has no
    random access (offsets are then in the decompressed stream). Nothing is extracted, so names
    such as `../x.jpg` are only strings."""
    if is_gz(path):
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:gz") as tf:
            return [(m.name, m.offset_data, m.size) for m in tf if m.isfile()], size
    raw = _HeaderReader(fs, path, size)
    with tarfile.open(fileobj=raw, mode="r:") as tf:
        found = [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
    return found, raw.bytes_fetched


def list_tar(fs, files, spec) -> Listed:
    shards = [(p, size) for p, size, _ in files if is_tar(p)]
    skipped = len(files) - len(shards)

    def members(shard):
        path, size = shard
        try:
            return _tar_members(fs, path, size)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise InputError(f"cannot read tar shard {storage.full_uri(fs, path)}: "
                             f"{type(exc).__name__}: {exc}") from exc

    with ThreadPoolExecutor(LIST_THREADS) as pool:
        per_shard = list(pool.map(members, shards))
    shard_fp = {p: fp for p, _, fp in files}
    uris, sizes, sources, offsets, lengths, fingerprints = [], [], [], [], [], []
    for (path, _size), (found, _read) in zip(shards, per_shard):
        shard_uri = storage.full_uri(fs, path)
        for name, offset, size in found:
            if extension(name) not in IMAGE_EXTENSIONS:
                skipped += 1
                continue
            uris.append(f"{shard_uri}#{name}")
            sizes.append(size)
            sources.append(shard_uri)
            offsets.append(offset)
            lengths.append(size)
            fingerprints.append(f"{shard_fp[path]}#{offset}")  # changes with the shard
    return Listed(listing_table(uris, sizes, sources, offsets, lengths, fingerprints), None, skipped,
                  {"shards": len(shards), "bytes_read": sum(read for _, read in per_shard)})


def tar_units(table: pa.Table) -> np.ndarray | None:
    """A .tar.gz shard is one read unit (gzip has no random access); plain members stand alone."""
    src = table.column("source").to_numpy(zero_copy_only=False)
    changed = src[1:] != src[:-1]
    gz = np.fromiter((is_gz(s) for s in src), dtype=bool, count=len(src))
    if not gz.any():
        return None
    return np.flatnonzero(changed | ~gz[1:]) + 1


def read_tar(reader: Fetcher, fs, batch, sources, out, data) -> None:
    offsets, lengths = batch["offset"], batch["length"]
    by_shard: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(sources):
        by_shard[s].append(i)
    plain = {s: rows for s, rows in by_shard.items() if not is_gz(s)}
    gz = {s: rows for s, rows in by_shard.items() if is_gz(s)}
    # Plain shards: coalesce nearby members into runs, one range request per run.
    runs: list[tuple[str, int, int, list[int]]] = []
    for s, rows in plain.items():
        rows = sorted(rows, key=lambda i: offsets[i])
        cur = [rows[0]]
        for i in rows[1:]:
            last = cur[-1]
            if offsets[i] - (offsets[last] + lengths[last]) <= COALESCE_GAP:
                cur.append(i)
            else:
                runs.append((s, int(offsets[cur[0]]), 0, cur))
                cur = [i]
        runs.append((s, int(offsets[cur[0]]), 0, cur))
    runs = [(s, start, int(max(offsets[i] + lengths[i] for i in rows)), rows)
            for s, start, _, rows in runs]
    requests = [(fs._strip_protocol(s), start, end) for s, start, end, _ in runs]
    requests += [(fs._strip_protocol(s), None, None) for s in gz]
    results = reader.fetch(fs, [r[0] for r in requests], [r[1] for r in requests],
                           [r[2] for r in requests]) if requests else []
    for (source, start, end, rows), value in zip(runs, results):
        value = _ranged(value, source, start, end)
        for i in rows:
            if check(out, i, value):
                _member(out, data, i, value, int(offsets[i]) - start, int(lengths[i]))
    for (s, rows), value in zip(gz.items(), results[len(runs):]):
        if isinstance(value, bytes):
            try:
                value = gzip.decompress(value)
            except (OSError, EOFError, zlib.error) as exc:
                value = _Unreadable(f"cannot decompress {s}: {type(exc).__name__}: {exc}")
        for i in rows:
            if check(out, i, value):
                _member(out, data, i, value, int(offsets[i]), int(lengths[i]))


def _member(out, data, i: int, blob: bytes, start: int, length: int) -> None:
    chunk = blob[start:start + length]
    if len(chunk) != length:
        set_error(out, i, Stage.READ, _Unreadable(
            f"tar member truncated: {len(chunk)} of {length} bytes present"))
    else:
        data[i] = chunk
