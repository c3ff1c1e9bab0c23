"""http(s):// input through fsspec's HTTP filesystem, against Python's http.server on 127.0.0.1.

HTTP has no listing, so the natural input is a manifest of image URLs; a folder URL is refused
with a message saying so, and a tar shard on a server that ignores Range headers is refused
instead of being sliced wrongly.
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest

from resnet_features.core.config import config_from_args, get_args_parser
from resnet_features.extract.inputs import InputError, ReadBytes, list_inputs
from resnet_features.extract.pipeline import run


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory, few_photos):
    """A folder served on 127.0.0.1: photos/, a manifest of absolute and relative URLs with
    one missing entry, and a tar shard; yields (base URL, names, bytes by name)."""
    root = tmp_path_factory.mktemp("site")
    names = sorted(os.listdir(few_photos))
    shutil.copytree(few_photos, root / "photos")
    blobs = {n: (root / "photos" / n).read_bytes() for n in names}
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(_Quiet, directory=str(root)))
    base = f"http://127.0.0.1:{server.server_address[1]}"
    entries = [f"{base}/photos/{n}" if i % 2 else f"photos/{n}" for i, n in enumerate(names)]
    (root / "list.txt").write_text("\n".join(entries + [f"{base}/photos/missing.jpg"]) + "\n")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for n in names:
            info = tarfile.TarInfo(n)
            info.size = len(blobs[n])
            tf.addfile(info, io.BytesIO(blobs[n]))
    (root / "shard.tar").write_bytes(buf.getvalue())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield base, names, blobs
    finally:
        server.shutdown()
        server.server_close()


def test_manifest_of_http_urls(site):
    base, names, blobs = site
    listing = list_inputs(f"{base}/list.txt")
    assert listing.format == "manifest"
    uris = listing.table.column("uri").to_pylist()
    assert uris == [f"{base}/photos/{n}" for n in names] + [f"{base}/photos/missing.jpg"]
    t = listing.table
    out = ReadBytes(input_format="manifest")(
        {k: t.column(k).to_numpy(zero_copy_only=False) for k in t.column_names})
    assert list(out["bytes"][:-1]) == [blobs[n] for n in names]
    assert list(out["error_stage"]) == [""] * len(names) + ["read"]
    assert out["error_type"][-1] == "FileNotFoundError"
    assert list(out["size_bytes"]) == [len(blobs[n]) for n in names] + [0]


def test_http_folder_is_refused_with_how_to(site):
    base, _, _ = site
    with pytest.raises(InputError, match="no listing.*manifest"):
        list_inputs(f"{base}/photos/")
    # Without the slash http.server redirects to its HTML index: a web page, not images.
    with pytest.raises(InputError, match="web page.*manifest"):
        list_inputs(f"{base}/photos")
    with pytest.raises(InputError, match="does not exist"):
        list_inputs(f"{base}/nothing.txt")


def test_tar_on_a_server_without_ranges_is_refused(site):
    """http.server ignores Range headers; slicing its whole-file answers as ranges would give
    wrong bytes, so the listing stops and says why."""
    base, _, _ = site
    with pytest.raises(InputError, match="ignored a byte-range request"):
        list_inputs(f"{base}/shard.tar")


@pytest.mark.slow
def test_job_on_http_manifest(site, tmp_path, resnet18_weights, ray_local):
    """The whole job, Ray workers included, on the http manifest: every image's row, and the
    missing URL as a read error row."""
    base, names, _ = site
    out = tmp_path / "out"
    cfg = config_from_args(get_args_parser().parse_args(
        ["--input", f"{base}/list.txt", "--output", str(out), "--model", "resnet18",
         "--weights", resnet18_weights, "--task", "embed", "--run-id", "t",
         "--max-error-rate", "0.5"]))
    result = run(cfg)
    assert result.exit_code == 0, result.reason
    summary = json.loads((out / "run=t" / "_SUCCESS").read_text())
    assert (summary["inputs"], summary["succeeded"], summary["failed"]) == (len(names) + 1,
                                                                           len(names), 1)
    summary_files = summary["files"]
    assert len(summary_files) == 1 and summary["error_files"] == [f"_errors/{summary_files[0]}"]
    rows = pq.read_table(out / "run=t" / summary_files[0])
    assert sorted(rows.column("uri").to_pylist()) == sorted(f"{base}/photos/{n}" for n in names)
    errors = pq.read_table(out / "run=t" / summary["error_files"][0]).to_pylist()
    assert [(e["uri"], e["stage"]) for e in errors] == [(f"{base}/photos/missing.jpg", "read")]
