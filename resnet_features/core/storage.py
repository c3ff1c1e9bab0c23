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

__all__ = ["filesystem", "join", "protocol", "read_bytes", "strip_protocol", "full_uri",
           "write_json"]

#: HTTP connections per s3fs client. A read task fetches a block of up to 64 objects at once;
#: botocore's default pool of 10 would let only 10 of those requests wait on the store's
#: latency at a time. A `config_kwargs.max_pool_connections` in --storage-options wins.
S3_POOL_CONNECTIONS = 64


def filesystem(uri: str, storage_options: dict[str, Any] | None = None):
    """Return `(fs, path)` for a URI; `path` has no protocol."""
    options = dict(storage_options or {})
    if fsspec.core.split_protocol(uri)[0] in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("max_pool_connections", S3_POOL_CONNECTIONS)
        options["config_kwargs"] = config
    fs, path = url_to_fs(uri, **options)
    return fs, path


def strip_protocol(uri: str) -> str:
    return fsspec.core.split_protocol(uri)[1]


def full_uri(fs, path: str) -> str:
    """The URI a user would recognise for a path on `fs` (`s3://bucket/key`, `/abs/path`)."""
    return fs.unstrip_protocol(path) if protocol(fs) != "file" else path


def protocol(fs) -> str:
    """The filesystem's main protocol name: "file", "s3", "http", ..."""
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
