"""Reading inputs: list images, tar members, Parquet rows or manifest entries, then fetch bytes.

Listing happens once, on the driver, and yields one row per image with a deterministic `index`
(sorted object names; tar members in shard order; Parquet rows in file order; manifest entries
in manifest order), so output file names are deterministic for the same input. Fetching is a
batch function: one call turns a whole group of listing rows into bytes with few, concurrent
requests (fsspec `cat_ranges` of many objects or of coalesced tar-member byte ranges), which is
what keeps object stores with 20-50 ms per GET from being the bottleneck. A missing object,
unreadable member or empty bytes cell becomes an error row at stage `read`.
"""

from __future__ import annotations

import csv
import gzip
import inspect
import io
import logging
import posixpath
import tarfile
import time
import zlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from resnet_features.core import storage
from resnet_features.core.errors import InputError, Stage, error_columns, set_error

__all__ = [
    "IMAGE_EXTENSIONS",
    "INPUT_FORMATS",
    "InputError",
    "InputSpec",
    "Listing",
    "ReadBytes",
    "detect_format",
    "list_images",
    "list_inputs",
    "listing_blocks",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet", ".pq")
MANIFEST_SUFFIXES = (".txt", ".csv", ".tsv", ".lst")
INPUT_FORMATS = ("auto", "images", "tar", "parquet", "manifest")

#: Listing rows: `source` is the object to read; `offset`/`length` a byte range in it (tar
#: members), or for Parquet `offset` = row number in the file and `length` = its row group;
#: -1 when the whole object is the image.
LISTING_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("uri", pa.string()),
        ("size_bytes", pa.int64()),
        ("source", pa.string()),
        ("offset", pa.int64()),
        ("length", pa.int64()),
        ("fingerprint", pa.string()),  # size + ETag/mtime: what --incremental compares
    ]
)

#: Threads the driver uses to read tar headers / Parquet footers of many shards at once.
LIST_THREADS = 16

#: Tar members closer than this are fetched with one range request.
COALESCE_GAP = 1 << 20


def stat_fingerprint(info: dict[str, Any]) -> str:
    """Content fingerprint from listing metadata: size + ETag (object stores) or mtime (files)."""
    size = int(info.get("size") or 0)
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    if etag:
        return f"{size}:etag:{str(etag).strip(chr(34))}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return f"{size}:mtime:{mtime}"


@dataclass(frozen=True)
class InputSpec:
    """What to list and how: the format and the column options of the input flags."""

    format: str = "auto"
    image_column: str = "image"
    id_column: str | None = None
    uri_column: str = "uri"
    keep_columns: tuple[str, ...] = ()


@dataclass(frozen=True)
class Listing:
    table: pa.Table  # LISTING_SCHEMA, index = row number
    skipped_non_image: int
    seconds: float
    format: str = "images"
    extra: pa.Table | None = None  # --id-column / --keep-columns, one row per listing row
    sources: int = 0  # objects listed: files, shards or manifest entries' files
    notes: dict[str, Any] = field(default_factory=dict)


def _extension(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def _is_tar(path: str) -> bool:
    return path.lower().endswith(TAR_SUFFIXES)


def _is_gz(path: str) -> bool:
    return path.lower().endswith((".gz", ".tgz"))


def _kind(path: str) -> str | None:
    low = path.lower()
    if _extension(path) in IMAGE_EXTENSIONS:
        return "images"
    if low.endswith(TAR_SUFFIXES):
        return "tar"
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if low.endswith(MANIFEST_SUFFIXES):
        return "manifest"
    return None


#: Protocols without a listing: an input there is one object (a manifest of image URLs, a tar
#: shard, a Parquet file). fsspec would scrape the links of an HTML page as a "folder", or the
#: URLs in a manifest's own text; neither is a listing to compute a run from.
NO_LISTING = frozenset({"http", "https"})


def _expand(uri: str, storage_options: dict[str, Any] | None):
    """`(fs, [(path, size)], single)`: a folder/prefix (recursive), a glob, or one object."""
    try:
        fs, root = storage.filesystem(uri, storage_options)
        if storage.protocol(fs) in NO_LISTING:
            return (fs, *_one_url(fs, root, uri))
        if any(c in root for c in "*?["):
            found = fs.glob(root, detail=True)
            if not found:
                raise InputError(f"input glob {uri} matches nothing")
            single = False
        elif not fs.exists(root):
            raise InputError(f"input {uri} does not exist")
        elif fs.isdir(root):
            found, single = fs.find(root, detail=True), False
        else:
            found, single = {root: fs.info(root)}, True
    except InputError:
        raise
    except (OSError, ValueError, PermissionError) as exc:
        raise InputError(f"cannot list input {uri}: {type(exc).__name__}: {exc}") from exc
    files = [(p, int(found[p].get("size") or 0), stat_fingerprint(found[p])) for p in sorted(found)
             if found[p].get("type", "file") == "file"]
    return fs, files, single


def _one_url(fs, url: str, uri: str):
    """An http(s) input: one object, never a folder or a glob ("?" starts a query there)."""
    how = ("http(s) has no listing: point --input at one file, such as a manifest of image "
           "URLs (.txt/.csv/.tsv/.lst, or Parquet with --input-format manifest), a tar shard "
           "or a Parquet file")
    if url.endswith("/"):
        raise InputError(f"input {uri} is a folder; {how}")
    if not fs.exists(url):
        raise InputError(f"input {uri} does not exist")
    info = fs.info(url)
    if info.get("mimetype") == "text/html" and _kind(url.split("?", 1)[0]) is None:
        raise InputError(f"input {uri} is a web page, not a file of images; {how}")
    return [(url, int(info.get("size") or 0), stat_fingerprint(info))], True


def detect_format(paths: list[str], single: bool) -> str:
    """The input format implied by the names found: images win, then tar, Parquet, manifest."""
    kinds = {_kind(p) for p in paths}
    if single and len(paths) == 1 and _kind(paths[0]) == "manifest":
        return "manifest"
    for kind in ("images", "tar", "parquet"):
        if kind in kinds:
            return kind
    if "manifest" in kinds and single:
        return "manifest"
    return "images"  # and the "no images" message says what was looked for


def list_inputs(uri: str, spec: InputSpec | None = None,
                storage_options: dict[str, Any] | None = None) -> Listing:
    """List every image of the input as one row, whatever the format (see the module doc)."""
    spec = spec or InputSpec()
    start = time.perf_counter()
    fs, files, single = _expand(uri, storage_options)
    fmt = spec.format if spec.format != "auto" else detect_format([p for p, *_ in files], single)
    if fmt != "parquet" and spec.id_column:
        raise InputError("--id-column applies to --input-format parquet (manifests carry "
                         "extra columns with --keep-columns)")
    if fmt in ("images", "tar") and spec.keep_columns:
        raise InputError(f"--keep-columns applies to parquet and manifest inputs, not {fmt}")
    if fmt == "images":
        listing = _list_image_files(fs, files)
    elif fmt == "tar":
        listing = _list_tar(fs, files)
    elif fmt == "parquet":
        listing = _list_parquet(fs, files, spec)
    elif fmt == "manifest":
        listing = _list_manifest(fs, files, spec, storage_options)
    else:
        raise InputError(f"unknown input format {fmt!r}; use one of {', '.join(INPUT_FORMATS)}")
    table, extra, skipped, notes = listing
    if table.num_rows == 0:
        raise InputError(
            f"no images in {uri} (format {fmt}; image names end with "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}, any case; {skipped} other entries "
            f"ignored); pass --input-format if the format was guessed wrong")
    seconds = time.perf_counter() - start
    log.info("listed %d images (%s) under %s in %.2fs (%d non-image entries ignored)",
             table.num_rows, fmt, uri, seconds, skipped)
    return Listing(table=table, skipped_non_image=skipped, seconds=seconds, format=fmt,
                   extra=extra, sources=len(files), notes=notes)


def listing_blocks(listing: Listing, group: int) -> list[pa.Table]:
    """Slices of the listing, one per read task, of about `group` rows. Some rows are read
    together or not at all, and their blocks follow those units (small ones merged, big ones
    whole): a Parquet row group (a column chunk is the smallest unit Parquet can fetch) and a
    .tar.gz shard (gzip has no random access), which would otherwise be re-read once per block."""
    table = listing.table
    n = table.num_rows
    bounds = _unit_bounds(listing)
    if bounds is None:
        return [table.slice(i, group) for i in range(0, n, group)]
    starts = [0, *bounds.tolist()]
    ends = [*bounds.tolist(), n]
    blocks, begin = [], 0
    for start, end in zip(starts, ends):
        if start > begin and end - begin > group:
            blocks.append(table.slice(begin, start - begin))
            begin = start
    blocks.append(table.slice(begin, n - begin))
    return blocks


def _unit_bounds(listing: Listing) -> np.ndarray | None:
    """Row numbers where a new read unit starts, or None when every row stands alone."""
    table = listing.table
    if table.num_rows == 0 or listing.format not in ("parquet", "tar"):
        return None
    src = table.column("source").to_numpy(zero_copy_only=False)
    changed = src[1:] != src[:-1]
    if listing.format == "parquet":
        rg = table.column("length").to_numpy()
        return np.flatnonzero(changed | (rg[1:] != rg[:-1])) + 1
    gz = np.fromiter((_is_gz(s) for s in src), dtype=bool, count=len(src))
    if not gz.any():
        return None
    return np.flatnonzero(changed | ~gz[1:]) + 1


def list_images(uri: str, storage_options: dict[str, Any] | None = None) -> Listing:
    """Recursively list image files under `uri` (extensions matched case-insensitively)."""
    return list_inputs(uri, InputSpec(format="images"), storage_options)


def _table(uris, sizes, sources, offsets, lengths, fingerprints) -> pa.Table:
    return pa.table(
        {
            "index": np.arange(len(uris), dtype=np.int64),
            "uri": uris,
            "size_bytes": np.asarray(sizes, dtype=np.int64),
            "source": sources,
            "offset": np.asarray(offsets, dtype=np.int64),
            "length": np.asarray(lengths, dtype=np.int64),
            "fingerprint": fingerprints,
        },
        schema=LISTING_SCHEMA,
    )


def _list_image_files(fs, files):
    uris, sizes, fingerprints, skipped = [], [], [], 0
    for path, size, fingerprint in files:
        if _extension(path) not in IMAGE_EXTENSIONS:
            skipped += 1
            continue
        uris.append(storage.full_uri(fs, path))
        sizes.append(size)
        fingerprints.append(fingerprint)
    n = len(uris)
    return _table(uris, sizes, uris, [-1] * n, [-1] * n, fingerprints), None, skipped, {}


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
    if _is_gz(path):
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:gz") as tf:
            return [(m.name, m.offset_data, m.size) for m in tf if m.isfile()], size
    raw = _HeaderReader(fs, path, size)
    with tarfile.open(fileobj=raw, mode="r:") as tf:
        found = [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
    return found, raw.bytes_fetched


def _list_tar(fs, files):
    shards = [(p, size) for p, size, _ in files if _is_tar(p)]
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
            if _extension(name) not in IMAGE_EXTENSIONS:
                skipped += 1
                continue
            uris.append(f"{shard_uri}#{name}")
            sizes.append(size)
            sources.append(shard_uri)
            offsets.append(offset)
            lengths.append(size)
            fingerprints.append(f"{shard_fp[path]}#{offset}")  # changes with the shard
    return (_table(uris, sizes, sources, offsets, lengths, fingerprints), None, skipped,
            {"shards": len(shards), "bytes_read": sum(read for _, read in per_shard)})


def _image_field(schema: pa.Schema, column: str) -> None:
    if column not in schema.names:
        raise InputError(f"Parquet input has no column {column!r} (columns: "
                         f"{', '.join(schema.names)}); name the image-bytes column with "
                         f"--image-column")
    t = schema.field(column).type
    ok = pa.types.is_binary(t) or pa.types.is_large_binary(t) or (
        pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)
    if not ok:
        raise InputError(f"--image-column {column!r} has type {t}; it must hold image bytes "
                         f"(binary) or a struct with a 'bytes' field")


def _check_columns(names: list[str], wanted: list[str], what: str) -> None:
    missing = [c for c in wanted if c not in names]
    if missing:
        raise InputError(f"{what} has no column(s) {', '.join(missing)} (columns: "
                         f"{', '.join(names)}); fix --id-column/--keep-columns/--uri-column")


def _list_parquet(fs, files, spec: InputSpec):
    paths = [p for p, *_ in files if p.lower().endswith(PARQUET_SUFFIXES)]
    skipped_files = len(files) - len(paths)
    carry = ([spec.id_column] if spec.id_column else []) + [
        c for c in spec.keep_columns if c != spec.id_column]

    def read(path):
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            _image_field(schema, spec.image_column)
            _check_columns(schema.names, carry, f"Parquet file {path}")
            extra = pf.read(columns=carry) if carry else None
            md = pf.metadata
            groups = np.repeat(np.arange(md.num_row_groups),
                               [md.row_group(g).num_rows for g in range(md.num_row_groups)])
            return md.num_rows, extra, groups

    with ThreadPoolExecutor(LIST_THREADS) as pool:
        per_file = list(pool.map(read, paths))
    file_fp = {p: fp for p, _, fp in files}
    uris, sources, offsets, groups, extras, fingerprints = [], [], [], [], [], []
    for path, (rows, extra, row_groups) in zip(paths, per_file):
        file_uri = storage.full_uri(fs, path)
        uris += [f"{file_uri}#{i}" for i in range(rows)]
        fingerprints += [f"{file_fp[path]}#{i}" for i in range(rows)]  # changes with the file
        sources += [file_uri] * rows
        offsets += range(rows)
        groups.append(row_groups)
        if extra is not None:
            extras.append(extra)
    n = len(uris)
    table = _table(uris, [0] * n, sources, offsets,
                   np.concatenate(groups) if groups else np.zeros(0, np.int64), fingerprints)
    extra = pa.concat_tables(extras, promote_options="permissive") if extras else None
    return table, extra, 0, {"files": len(paths), "skipped_files": skipped_files}


def _list_manifest(fs, files, spec: InputSpec, storage_options):
    if len(files) != 1:
        raise InputError(f"a manifest input is one file; found {len(files)} objects")
    path = files[0][0]
    base = storage.full_uri(fs, path).rsplit("/", 1)[0]
    carry = list(spec.keep_columns)
    with fs.open(path, "rb") as f:
        data = f.read()
    low = path.lower()
    if low.endswith(PARQUET_SUFFIXES):
        t = pq.read_table(io.BytesIO(data))
        _check_columns(t.column_names, [spec.uri_column] + carry, f"manifest {path}")
        values = t.column(spec.uri_column).to_pylist()
        keep = [v is not None and bool(str(v).strip()) for v in values]
        entries = [str(v).strip() for v, k in zip(values, keep) if k]
        extra = t.select(carry).filter(pa.array(keep)) if carry else None
    elif low.endswith((".csv", ".tsv")):
        text = data.decode("utf-8-sig")
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if low.endswith(".tsv") else ",")
        names = list(reader.fieldnames or [])
        _check_columns(names, [spec.uri_column] + carry, f"manifest {path}")
        rows = [r for r in reader if (r.get(spec.uri_column) or "").strip()]
        entries = [r[spec.uri_column].strip() for r in rows]
        extra = pa.table({c: [r.get(c) for r in rows] for c in carry}) if carry else None
    else:
        if carry:
            raise InputError("--keep-columns needs a CSV or Parquet manifest (a text manifest "
                             "has one URI per line and no columns)")
        lines = [ln.strip() for ln in data.decode("utf-8-sig").splitlines()]
        entries = [ln for ln in lines if ln and not ln.startswith("#")]
        extra = None
    uris = [_resolve(e, base) for e in entries]
    n = len(uris)
    # Manifest entries are not stat'ed at listing time: their fingerprint is the URI alone
    # (--incremental skips a listed URI once computed; --fingerprint hash sees content changes).
    return (_table(uris, [0] * n, uris, [-1] * n, [-1] * n, [""] * n), extra, 0,
            {"manifest": path})


def _resolve(entry: str, base: str) -> str:
    """Manifest entries: URIs and absolute paths as given; relative paths from the manifest."""
    if "://" in entry or entry.startswith("/"):
        return entry
    proto, sep, path = base.rpartition("://")
    return f"{proto}{sep}{posixpath.normpath(posixpath.join(path, entry))}"


class _Unreadable(ValueError):
    """An input whose bytes cannot be had: a truncated member, a null cell, a broken .gz."""


#: Errors that mean "this object is gone or unreadable", as opposed to "storage is unwell".
INPUT_FAULTS = (FileNotFoundError, IsADirectoryError, PermissionError, _Unreadable)

#: Formats whose listing has no image sizes: `size_bytes` is filled by `ReadBytes` from the bytes.
SIZED_BY_READ = frozenset({"parquet", "manifest"})

#: Extra attempts at objects whose fetch failed for a reason that is not the input's fault.
STORAGE_RETRIES = 3


def _cat_kwargs(fs) -> dict[str, Any]:
    """Per-request options for `cat_ranges` on `fs`. s3fs HEADs every object before a
    whole-object GET, to split objects over 50 MB into concurrent range requests; images are far
    smaller, and that HEAD would double the requests and the latency of every fetch."""
    params = inspect.signature(fs._cat_file).parameters if hasattr(fs, "_cat_file") else {}
    return {"max_concurrency": 1} if "max_concurrency" in params else {}


class ReadBytes:
    """Batch stage: add `bytes` (each image's content) and `bytes_read`, fetched concurrently."""

    def __init__(self, storage_options: dict[str, Any] | None = None, *,
                 input_format: str = "images", image_column: str = "image",
                 retries: int = STORAGE_RETRIES, backoff_s: float = 0.5):
        self.storage_options = storage_options or {}
        self.input_format = input_format
        self.image_column = image_column
        self.retries = retries
        self.backoff_s = backoff_s
        self._fs = None

    def _filesystem(self, uri: str):
        if self._fs is None:
            self._fs, _ = storage.filesystem(uri, self.storage_options)
        return self._fs

    def _fetch(self, fs, paths: list[str], starts=None, ends=None) -> list:
        """`cat_ranges` with bounded, backed-off retries of the requests that hit a storage fault
        (network, throttling, credentials); a fault that persists is raised, failing the run.

        `cat_ranges`, unlike `cat`, never glob-expands names such as "img[1].jpg".
        """
        n = len(paths)
        starts = starts if isinstance(starts, list) else [starts] * n
        ends = ends if isinstance(ends, list) else [ends] * n
        kwargs = _cat_kwargs(fs)
        results = fs.cat_ranges(paths, starts, ends, on_error="return", **kwargs)
        for attempt in range(self.retries + 1):
            todo = [i for i, v in enumerate(results)
                    if isinstance(v, BaseException) and not isinstance(v, INPUT_FAULTS)]
            if not todo:
                return results
            if attempt == self.retries:
                exc = results[todo[0]]
                raise OSError(f"reading {len(todo)} objects failed {self.retries + 1} times, "
                              f"last with {type(exc).__name__}: {exc} (first: {paths[todo[0]]})"
                              ) from exc
            log.warning("reading %d objects failed (%s); retry %d of %d",
                        len(todo), type(results[todo[0]]).__name__, attempt + 1, self.retries)
            time.sleep(self.backoff_s * 2 ** attempt)
            again = fs.cat_ranges([paths[i] for i in todo], [starts[i] for i in todo],
                                  [ends[i] for i in todo], on_error="return", **kwargs)
            for i, value in zip(todo, again):
                results[i] = value
        return results

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        uris = [str(u) for u in batch["uri"]]
        n = len(uris)
        out = dict(batch)
        out.update(error_columns(n))
        data = np.empty(n, dtype=object)
        data[:] = [b""] * n
        if n:
            sources = [str(s) for s in batch.get("source", batch["uri"])]
            fs = self._filesystem(sources[0])
            if self.input_format == "tar":
                self._read_tar(fs, batch, sources, out, data)
            elif self.input_format == "parquet":
                self._read_parquet(fs, batch, sources, out, data)
            else:
                self._read_objects(fs, sources, out, data)
        out["bytes"] = data
        out["bytes_read"] = np.array([len(d) for d in data], dtype=np.int64)
        if self.input_format in SIZED_BY_READ or "size_bytes" not in out:
            # The listing cannot know these sizes (a Parquet cell's length, a manifest entry's
            # object is never stat'ed); the fetch does. Unreadable inputs stay 0.
            out["size_bytes"] = out["bytes_read"].copy()
        return out

    @staticmethod
    def _check(out, i: int, value) -> bool:
        """Record an input fault as an error row; re-raise storage trouble; True if data."""
        if isinstance(value, INPUT_FAULTS):
            set_error(out, i, Stage.READ, value)
            return False
        if isinstance(value, BaseException):
            # Not the input's fault (network, throttling, credentials), and _fetch's retries
            # did not help: fail loudly, never record a bad image.
            raise value
        return True

    def _read_objects(self, fs, sources, out, data) -> None:
        paths = [fs._strip_protocol(s) for s in sources]
        results = self._fetch(fs, paths)
        for i, value in enumerate(results):
            if self._check(out, i, value):
                data[i] = value

    def _read_tar(self, fs, batch, sources, out, data) -> None:
        offsets, lengths = batch["offset"], batch["length"]
        by_shard: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(sources):
            by_shard[s].append(i)
        plain = {s: rows for s, rows in by_shard.items() if not _is_gz(s)}
        gz = {s: rows for s, rows in by_shard.items() if _is_gz(s)}
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
        results = self._fetch(fs, [r[0] for r in requests], [r[1] for r in requests],
                              [r[2] for r in requests]) if requests else []
        for (source, start, end, rows), value in zip(runs, results):
            value = _ranged(value, source, start, end)
            for i in rows:
                if self._check(out, i, value):
                    self._member(out, data, i, value, int(offsets[i]) - start, int(lengths[i]))
        for (s, rows), value in zip(gz.items(), results[len(runs):]):
            if isinstance(value, bytes):
                try:
                    value = gzip.decompress(value)
                except (OSError, EOFError, zlib.error) as exc:
                    value = _Unreadable(f"cannot decompress {s}: {type(exc).__name__}: {exc}")
            for i in rows:
                if self._check(out, i, value):
                    self._member(out, data, i, value, int(offsets[i]), int(lengths[i]))

    @staticmethod
    def _member(out, data, i: int, blob: bytes, start: int, length: int) -> None:
        chunk = blob[start:start + length]
        if len(chunk) != length:
            set_error(out, i, Stage.READ, _Unreadable(
                f"tar member truncated: {len(chunk)} of {length} bytes present"))
        else:
            data[i] = chunk

    def _read_parquet(self, fs, batch, sources, out, data) -> None:
        by_file: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(sources):
            by_file[s].append(i)
        rows_in_file = batch["offset"]

        def read(source: str):
            try:
                with fs.open(fs._strip_protocol(source), "rb") as f:
                    pf = pq.ParquetFile(f)
                    return _parquet_cells(pf, self.image_column,
                                          [int(rows_in_file[i]) for i in by_file[source]])
            except INPUT_FAULTS as exc:
                return exc

        with ThreadPoolExecutor(min(16, len(by_file))) as pool:
            results = list(pool.map(read, by_file))
        for (_, rows), cells in zip(by_file.items(), results):
            for j, i in enumerate(rows):
                value = cells if isinstance(cells, BaseException) else cells[j]
                if not self._check(out, i, value):
                    continue
                if not value:
                    set_error(out, i, Stage.READ, _Unreadable(
                        f"empty or null image bytes in column {self.image_column!r}"))
                else:
                    data[i] = value


def _parquet_cells(pf: pq.ParquetFile, column: str, rows: list[int]) -> list[bytes | None]:
    """The image bytes of the given rows (file row numbers), reading only their row groups."""
    md = pf.metadata
    starts = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])
    groups = sorted({int(np.searchsorted(starts, r, side="right") - 1) for r in rows})
    table = pf.read_row_groups(groups, columns=[column])
    col = table.column(column)
    if pa.types.is_struct(col.type):
        col = pa.chunked_array([c.field("bytes") for c in col.chunks], col.type.field("bytes").type)
    # Row r of the file is row (r - starts[g]) + (rows of earlier selected groups) of `table`.
    base, local = {}, 0
    for g in groups:
        base[g] = local - int(starts[g])
        local += md.row_group(g).num_rows
    picks = [r + base[int(np.searchsorted(starts, r, side="right") - 1)] for r in rows]
    return col.take(pa.array(picks, pa.int64())).to_pylist()
