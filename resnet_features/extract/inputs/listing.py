"""Driver-side listing: expand the input URI, list it with its format's lister, cut blocks.

Listing happens once, on the driver, and yields one row per image with a deterministic `index`
(sorted object names; tar members in shard order; Parquet rows in file order; manifest entries
in manifest order), so output file names are deterministic for the same input.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow as pa

from resnet_features.core import storage
from resnet_features.core.errors import InputError
from resnet_features.extract.inputs.common import (
    InputSpec,
    Listing,
    detect_format,
    kind,
    no_images_error,
    stat_fingerprint,
)
from resnet_features.extract.inputs.formats import FORMATS, INPUT_FORMATS

__all__ = ["list_images", "list_inputs", "listing_blocks", "stages_listing"]

log = logging.getLogger(__name__)

#: Protocols without a listing: an input there is one object (a manifest of image URLs, a tar
#: shard, a Parquet file). fsspec would scrape the links of an HTML page as a "folder", or the
#: URLs in a manifest's own text; neither is a listing to compute a run from.
NO_LISTING = frozenset({"http", "https"})


def _expand(uri: str, storage_options: dict[str, Any] | None):
    """`(fs, [(path, size, fingerprint)], single)`: a folder/prefix (recursive), a glob, or
    one object."""
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


def check_input_exists(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """One cheap request, before Ray starts: a folder, prefix or object that is not there is a
    usage error in a second instead of after the cluster's start-up (globs and http(s) inputs
    are checked by the listing itself)."""
    try:
        fs, root = storage.filesystem(uri, storage_options)
        if storage.protocol(fs) in NO_LISTING or any(c in root for c in "*?["):
            return
        exists = fs.exists(root)
    except (OSError, ValueError, PermissionError) as exc:
        raise InputError(f"cannot list input {uri}: {type(exc).__name__}: {exc}") from exc
    if not exists:
        raise InputError(f"input {uri} does not exist")


#: Protocols whose folders `inputs/prefixes.py` lists in parallel into staged chunks.
STAGED_PROTOCOLS = frozenset({"s3"})


def stages_listing(uri: str, input_format: str,
                   storage_options: dict[str, Any] | None = None) -> bool:
    """Whether the input is listed by `inputs/prefixes.py` (in parallel, into chunks staged
    with the run) rather than here: an s3:// folder (not a glob, not one object) read as
    images (`--input-format images`, or auto, which the listing confirms). One request."""
    if input_format not in ("auto", "images"):
        return False
    try:
        fs, root = storage.filesystem(uri, storage_options)
        if storage.protocol(fs) not in STAGED_PROTOCOLS or any(c in root for c in "*?["):
            return False
        return bool(fs.isdir(root))
    except (OSError, ValueError, PermissionError) as exc:
        raise InputError(f"cannot list input {uri}: {type(exc).__name__}: {exc}") from exc


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
    if info.get("mimetype") == "text/html" and kind(url.split("?", 1)[0]) is None:
        raise InputError(f"input {uri} is a web page, not a file of images; {how}")
    return [(url, int(info.get("size") or 0), stat_fingerprint(info))], True


def list_inputs(uri: str, spec: InputSpec | None = None,
                storage_options: dict[str, Any] | None = None) -> Listing:
    """List every image of the input as one row, whatever the format (see the module doc)."""
    spec = spec or InputSpec()
    start = time.perf_counter()
    fs, files, single = _expand(uri, storage_options)
    fmt = spec.format if spec.format != "auto" else detect_format([p for p, *_ in files], single)
    if fmt not in FORMATS:
        raise InputError(f"unknown input format {fmt!r}; use one of {', '.join(INPUT_FORMATS)}")
    _check_options(spec, fmt)
    table, extra, skipped, notes = FORMATS[fmt].list(fs, files, spec)
    filtered = int(notes.pop("filtered", 0))
    if table.num_rows == 0 and filtered:
        raise InputError(f"no images in {uri} match --where {spec.where!r} ({filtered} rows "
                         f"left out)")
    if table.num_rows == 0:
        raise no_images_error(uri, fmt, skipped)
    seconds = time.perf_counter() - start
    log.info("listed %d images (%s) under %s in %.2fs (%d non-image entries ignored, %d rows "
             "left out by --where)", table.num_rows, fmt, uri, seconds, skipped, filtered)
    return Listing(table=table, skipped_non_image=skipped, seconds=seconds, format=fmt,
                   extra=extra, sources=len(files), notes=notes, filtered=filtered)


def _check_options(spec: InputSpec, fmt: str) -> None:
    """Column flags the format does not understand are a usage error, not silently ignored."""
    given = {"id_column": spec.id_column, "keep_columns": spec.keep_columns,
             "where": spec.where, "uri_column": spec.uri_column != "uri",
             "image_column": spec.image_column != "image"}
    for name, value in given.items():
        if value and name not in FORMATS[fmt].options:
            takers = [f for f, record in FORMATS.items() if name in record.options]
            raise InputError(f"--{name.replace('_', '-')} applies to --input-format "
                             f"{'/'.join(takers)}, not {fmt}")


def list_images(uri: str, storage_options: dict[str, Any] | None = None) -> Listing:
    """Recursively list image files under `uri` (extensions matched case-insensitively)."""
    return list_inputs(uri, InputSpec(format="images"), storage_options)


def listing_blocks(listing: Listing, group: int) -> list[pa.Table]:
    """Slices of the listing, one per read task, of about `group` rows. Some rows are read
    together or not at all, and their blocks follow those units (small ones merged, big ones
    whole): a Parquet row group (a column chunk is the smallest unit Parquet can fetch) and a
    .tar.gz shard (gzip has no random access), which would otherwise be re-read once per block."""
    table = listing.table
    n = table.num_rows
    fmt = FORMATS.get(listing.format)
    bounds = fmt.units(table) if n and fmt and fmt.units else None
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
