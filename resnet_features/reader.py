"""Reading inputs: list a folder/prefix of images, then fetch their bytes in concurrent groups.

Listing happens once, on the driver, and is sorted so that row indices (and hence output file
names) are deterministic for the same listing. Fetching is a batch function: one call fetches a
whole group of objects with one concurrent fsspec `cat`, which is what keeps object stores with
20-50 ms per GET from being the bottleneck. A missing or unreadable object becomes an error row.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from resnet_features import storage
from resnet_features.errors import Stage, error_columns, set_error

__all__ = ["IMAGE_EXTENSIONS", "InputError", "Listing", "list_images", "ReadBytes"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)

LISTING_SCHEMA = pa.schema(
    [("index", pa.int64()), ("uri", pa.string()), ("size_bytes", pa.int64()),
     ("fingerprint", pa.string())]
)


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


class InputError(RuntimeError):
    """The input cannot be listed (missing, unreachable, or holds no images)."""


@dataclass(frozen=True)
class Listing:
    table: pa.Table  # LISTING_SCHEMA, sorted by uri, index = row number
    skipped_non_image: int
    seconds: float


def _extension(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def list_images(uri: str, storage_options: dict[str, Any] | None = None) -> Listing:
    """Recursively list image files under `uri` (extensions matched case-insensitively)."""
    start = time.perf_counter()
    try:
        fs, root = storage.filesystem(uri, storage_options)
        if not fs.exists(root):
            raise InputError(f"input {uri} does not exist")
        if not fs.isdir(root):
            raise InputError(f"input {uri} is not a folder/prefix of images")
        found = fs.find(root, detail=True)
    except InputError:
        raise
    except (OSError, ValueError, PermissionError) as exc:
        raise InputError(f"cannot list input {uri}: {type(exc).__name__}: {exc}") from exc
    uris, sizes, fingerprints, skipped = [], [], [], 0
    for path in sorted(found):
        info = found[path]
        if info.get("type", "file") != "file":
            continue
        if _extension(path) not in IMAGE_EXTENSIONS:
            skipped += 1
            continue
        uris.append(storage.full_uri(fs, path))
        sizes.append(int(info.get("size") or 0))
        fingerprints.append(stat_fingerprint(info))
    if not uris:
        raise InputError(
            f"no images under {uri} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, "
            f"any case; {skipped} other files ignored)"
        )
    table = pa.table(
        {"index": np.arange(len(uris), dtype=np.int64), "uri": uris, "size_bytes": sizes,
         "fingerprint": fingerprints},
        schema=LISTING_SCHEMA,
    )
    seconds = time.perf_counter() - start
    log.info("listed %d images under %s in %.2fs (%d non-image files ignored)",
             len(uris), uri, seconds, skipped)
    return Listing(table=table, skipped_non_image=skipped, seconds=seconds)


#: Errors that mean "this object is gone or unreadable", as opposed to "storage is unwell".
INPUT_FAULTS = (FileNotFoundError, IsADirectoryError, PermissionError)


class ReadBytes:
    """Batch stage: add a `bytes` column holding each object's content, fetched concurrently."""

    def __init__(self, storage_options: dict[str, Any] | None = None):
        self.storage_options = storage_options or {}
        self._fs = None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        uris = [str(u) for u in batch["uri"]]
        n = len(uris)
        out = dict(batch)
        out.update(error_columns(n))
        data = np.empty(n, dtype=object)
        data[:] = [b""] * n
        if n:
            if self._fs is None:
                self._fs, _ = storage.filesystem(uris[0], self.storage_options)
            paths = [self._fs._strip_protocol(u) for u in uris]
            # cat_ranges, unlike cat, never glob-expands names such as "img[1].jpg".
            results = self._fs.cat_ranges(paths, None, None, on_error="return")
            for i, value in enumerate(results):
                if isinstance(value, INPUT_FAULTS):
                    set_error(out, i, Stage.READ, value)
                elif isinstance(value, BaseException):
                    # Not the input's fault (network, throttling, credentials): let Ray retry
                    # the task and fail the run loudly if it persists, never record a bad image.
                    raise value
                else:
                    data[i] = value
        out["bytes"] = data
        return out
