"""Worker-side fetch: `ReadBytes`, the batch stage that turns a block of listing rows into bytes.

One call turns a whole group of listing rows into bytes with few, concurrent requests (fsspec
`cat_ranges` of many objects or of coalesced tar-member byte ranges), which is what keeps object
stores with 20-50 ms per GET from being the bottleneck. A missing object, unreadable member or
empty bytes cell becomes an error row at stage `read`; storage trouble is retried, then raised.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any

import numpy as np

from resnet_features.core import storage
from resnet_features.core.errors import error_columns
from resnet_features.extract.inputs.common import INPUT_FAULTS
from resnet_features.extract.inputs.formats import FORMATS

__all__ = ["ReadBytes"]

log = logging.getLogger(__name__)

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

    def fetch(self, fs, paths: list[str], starts=None, ends=None) -> list:
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
        # Rows of a format without a fetch of its own are whole objects, as image files are.
        fmt = FORMATS.get(self.input_format, FORMATS["images"])
        if n:
            sources = [str(s) for s in batch.get("source", batch["uri"])]
            fs = self._filesystem(sources[0])
            fmt.read(self, fs, batch, sources, out, data)
        out["bytes"] = data
        out["bytes_read"] = np.array([len(d) for d in data], dtype=np.int64)
        if fmt.sized_by_read or "size_bytes" not in out:
            # The listing cannot know these sizes (a Parquet cell's length, a manifest entry's
            # object is never stat'ed); the fetch does. Unreadable inputs stay 0.
            out["size_bytes"] = out["bytes_read"].copy()
        return out
