"""Storage access through fsspec: one place that turns URIs into filesystems, for local, s3:// and the rest.

pyarrow's own S3 client ignores `AWS_ENDPOINT_URL`; s3fs honours it, so every read and write,
including the Parquet ones, goes through an fsspec filesystem object.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.core import url_to_fs

__all__ = ["atomic_open", "atomic_write", "filesystem", "full_uri", "join", "json_bytes",
           "now_iso", "protocol", "read_bytes", "read_json", "strip_protocol", "write_json"]

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


def now_iso() -> str:
    """UTC now as the timestamps in summaries, manifests and attempts: 2026-12-02T18:00:00Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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


@contextlib.contextmanager
def atomic_open(fs, path: str, tmp_dir: str) -> Iterator[Any]:
    """`with atomic_open(fs, path, tmp_dir) as f:` write whole-or-nothing: the file is written
    under a unique name in `tmp_dir`, then renamed into place when the block ends without an
    error, so a reader (or a resumed run) never sees half a file. `tmp_dir` should be on the
    same filesystem and, on local disks, the same device as `path` for the rename to be atomic."""
    tmp = join(tmp_dir, uuid.uuid4().hex)
    fs.makedirs(tmp_dir, exist_ok=True)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.makedirs(parent, exist_ok=True)  # local folders; a no-op on object stores
    with fs.open(tmp, "wb") as f:
        yield f
    fs.mv(tmp, path)


def atomic_write(fs, path: str, data: bytes, tmp_dir: str) -> None:
    """`data` written whole-or-nothing at `path` (see `atomic_open`)."""
    with atomic_open(fs, path, tmp_dir) as f:
        f.write(data)


def json_bytes(obj: Any) -> bytes:
    """The one JSON encoding of the files an output holds: indented, sorted keys, newline."""
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


def write_json(fs, path: str, obj: Any, tmp_dir: str | None = None) -> None:
    """`obj` as JSON (`json_bytes`); atomically (`atomic_write`) when a `tmp_dir` is given."""
    if tmp_dir is not None:
        atomic_write(fs, path, json_bytes(obj), tmp_dir)
        return
    with fs.open(path, "wb") as f:
        f.write(json_bytes(obj))


def read_json(fs, path: str) -> Any:
    """A JSON file's content, or None when it does not exist."""
    try:
        with fs.open(path, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
