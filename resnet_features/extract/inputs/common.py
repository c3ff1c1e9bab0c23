"""What every input format shares: the listing table, the spec and result records, format
detection, and the rules that turn a fetch failure into an error row (stage `read`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
import pyarrow as pa

from resnet_features.core.errors import InputError, Stage, set_error

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet", ".pq")
MANIFEST_SUFFIXES = (".txt", ".csv", ".tsv", ".lst")

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


def no_images_error(uri: str, fmt: str, skipped: int) -> InputError:
    """The usage error of an input that lists no image (whichever lister found none)."""
    return InputError(
        f"no images in {uri} (format {fmt}; image names end with "
        f"{', '.join(sorted(IMAGE_EXTENSIONS))}, any case; {skipped} other entries "
        f"ignored); pass --input-format if the format was guessed wrong")


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
    where: str | None = None  # --where text; formats parse it with core.where.parse_where


@dataclass(frozen=True)
class Listing:
    table: pa.Table  # LISTING_SCHEMA, index = row number
    skipped_non_image: int
    seconds: float
    format: str = "images"
    extra: pa.Table | None = None  # --id-column / --keep-columns, one row per listing row
    sources: int = 0  # objects listed: files, shards or manifest entries' files
    notes: dict[str, Any] = field(default_factory=dict)
    filtered: int = 0  # rows --where left out (the summary's skipped.filtered)


class Listed(NamedTuple):
    """What a format's listing function returns; `list_inputs` makes a `Listing` of it
    (`notes["filtered"]`, when present, becomes `Listing.filtered`)."""

    table: pa.Table  # LISTING_SCHEMA
    extra: pa.Table | None
    skipped: int  # entries that are not images
    notes: dict[str, Any]


#: `(path, size, fingerprint)` of each object found under the input, sorted by path.
Files = list[tuple[str, int, str]]


class Fetcher(Protocol):
    """What a format's `read` gets from the worker-side stage (`fetch.ReadBytes`): the retried
    concurrent fetch and the options. A protocol here keeps the format modules from importing
    the stage that dispatches to them."""

    image_column: str

    def fetch(self, fs, paths: list[str], starts=None, ends=None) -> list: ...


@dataclass(frozen=True)
class Format:
    """One input format: how the driver lists it and how a worker fetches a block of its rows.

    `list(fs, files, spec)` returns a `Listed`; `read(reader, fs, batch, sources, out, data)`
    fills `data[i]` with row i's bytes or records an error row in `out`; `units(table)` gives
    the row numbers where a new read unit starts (rows read together or not at all, which
    `listing_blocks` keeps in one block), None when every row stands alone. `options` names
    the column flags (InputSpec fields) the format understands; `list_inputs` refuses others.
    """

    list: Callable[[Any, Files, InputSpec], Listed]
    read: Callable[[Fetcher, Any, dict[str, np.ndarray], list[str], dict, np.ndarray], None]
    units: Callable[[pa.Table], np.ndarray | None] | None = None
    #: The listing has no image sizes: `size_bytes` is filled by `ReadBytes` from the bytes.
    sized_by_read: bool = False
    options: frozenset[str] = frozenset()


def extension(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def kind(path: str) -> str | None:
    low = path.lower()
    if extension(path) in IMAGE_EXTENSIONS:
        return "images"
    if low.endswith(TAR_SUFFIXES):
        return "tar"
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if low.endswith(MANIFEST_SUFFIXES):
        return "manifest"
    return None


def detect_format(paths: list[str], single: bool) -> str:
    """The input format implied by the names found: images win, then tar, Parquet, manifest;
    one file named manifest.json is an S3 Inventory report's manifest."""
    if single and len(paths) == 1 and paths[0].rsplit("/", 1)[-1] == "manifest.json":
        return "s3-inventory"
    kinds = {kind(p) for p in paths}
    if single and len(paths) == 1 and kind(paths[0]) == "manifest":
        return "manifest"
    for k in ("images", "tar", "parquet"):
        if k in kinds:
            return k
    if "manifest" in kinds and single:
        return "manifest"
    return "images"  # and the "no images" message says what was looked for


def listing_table(uris, sizes, sources, offsets, lengths, fingerprints) -> pa.Table:
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


def check_columns(names: list[str], wanted: list[str], what: str) -> None:
    missing = [c for c in wanted if c not in names]
    if missing:
        raise InputError(f"{what} has no column(s) {', '.join(missing)} (columns: "
                         f"{', '.join(names)}); fix --id-column/--keep-columns/--uri-column")


class _Unreadable(ValueError):
    """An input whose bytes cannot be had: a truncated member, a null cell, a broken .gz.
    (Its name is data: the `error_type` of such rows; the format modules import it.)"""


#: Errors that mean "this object is gone or unreadable", as opposed to "storage is unwell".
INPUT_FAULTS = (FileNotFoundError, IsADirectoryError, PermissionError, _Unreadable)


def check(out, i: int, value) -> bool:
    """Record an input fault as an error row; re-raise storage trouble; True if data."""
    if isinstance(value, INPUT_FAULTS):
        set_error(out, i, Stage.READ, value)
        return False
    if isinstance(value, BaseException):
        # Not the input's fault (network, throttling, credentials), and ReadBytes.fetch's
        # retries did not help: fail loudly, never record a bad image.
        raise value
    return True
