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
    [("index", pa.int64()), ("uri", pa.string()), ("size_bytes", pa.int64())]
)


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
    uris, sizes, skipped = [], [], 0
    for path in sorted(found):
        info = found[path]
        if info.get("type", "file") != "file":
            continue
        if _extension(path) not in IMAGE_EXTENSIONS:
            skipped += 1
            continue
        uris.append(storage.full_uri(fs, path))
        sizes.append(int(info.get("size") or 0))
    if not uris:
        raise InputError(
            f"no images under {uri} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, "
            f"any case; {skipped} other files ignored)"
        )
    table = pa.table(
        {"index": np.arange(len(uris), dtype=np.int64), "uri": uris, "size_bytes": sizes},
        schema=LISTING_SCHEMA,
    )
    seconds = time.perf_counter() - start
    log.info("listed %d images under %s in %.2fs (%d non-image files ignored)",
             len(uris), uri, seconds, skipped)
    return Listing(table=table, skipped_non_image=skipped, seconds=seconds)


#: Errors that mean "this object is gone or unreadable", as opposed to "storage is unwell".
INPUT_FAULTS = (FileNotFoundError, IsADirectoryError, PermissionError)

#: Extra attempts at objects whose fetch failed for a reason that is not the input's fault.
STORAGE_RETRIES = 3


class ReadBytes:
    """Batch stage: add a `bytes` column holding each object's content, fetched concurrently."""

    def __init__(self, storage_options: dict[str, Any] | None = None, *,
                 retries: int = STORAGE_RETRIES, backoff_s: float = 0.5):
        self.storage_options = storage_options or {}
        self.retries = retries
        self.backoff_s = backoff_s
        self._fs = None

    def _fetch(self, paths: list[str]) -> list:
        """`cat_ranges` with bounded, backed-off retries of the objects that hit a storage fault
        (network, throttling, credentials); a fault that persists is raised, failing the run."""
        results = self._fs.cat_ranges(paths, None, None, on_error="return")
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
            again = self._fs.cat_ranges([paths[i] for i in todo], None, None, on_error="return")
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
            if self._fs is None:
                self._fs, _ = storage.filesystem(uris[0], self.storage_options)
            paths = [self._fs._strip_protocol(u) for u in uris]
            # cat_ranges, unlike cat, never glob-expands names such as "img[1].jpg".
            # Storage faults (not the input's) are retried in _fetch and raised if they persist:
            # they fail the run loudly and are never recorded as bad images.
            for i, value in enumerate(self._fetch(paths)):
                if isinstance(value, INPUT_FAULTS):
                    set_error(out, i, Stage.READ, value)
                else:
                    data[i] = value
        out["bytes"] = data
        return out
