"""Storage access through fsspec: one place that turns URIs into filesystems, for local, s3:// and the rest.

pyarrow's own S3 client ignores `AWS_ENDPOINT_URL`; s3fs honours it, so every read and write,
including the Parquet ones, goes through an fsspec filesystem object.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import fsspec
from fsspec.core import url_to_fs

__all__ = ["filesystem", "join", "read_bytes", "strip_protocol", "full_uri", "write_json"]


def filesystem(uri: str, storage_options: dict[str, Any] | None = None):
    """Return `(fs, path)` for a URI; `path` has no protocol."""
    fs, path = url_to_fs(uri, **(storage_options or {}))
    return fs, path


def strip_protocol(uri: str) -> str:
    return fsspec.core.split_protocol(uri)[1]


def full_uri(fs, path: str) -> str:
    """The URI a user would recognise for a path on `fs` (`s3://bucket/key`, `/abs/path`)."""
    return fs.unstrip_protocol(path) if _protocol(fs) != "file" else path


def _protocol(fs) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = filesystem(uri, storage_options)
    return fs.cat_file(path)


def write_json(fs, path: str, obj: Any) -> None:
    with fs.open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
