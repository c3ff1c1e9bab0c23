"""The parallel prefix listing (`inputs/prefixes.py`) against a moto S3 server, without Ray:
whatever the plan cuts and however the groups fall, the staged chunks hold exactly the images
a plain `fs.find` lists, each once, in its order."""

from __future__ import annotations

import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from resnet_features.extract.inputs import prefixes
from resnet_features.extract.inputs.common import IMAGE_EXTENSIONS, LISTING_SCHEMA, extension
from tests.helpers import ROOT
from tests.s3_server import moto_s3

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from latency_proxy import LatencyProxy  # noqa: E402

BUCKET = "listing"

KEYS = [
    "top.jpg", "top.txt", "a.png", "a-b.jpg",  # files beside the folders, sorting around them
    "a/1.jpg", "a/2.JPEG", "a/notes.md", "a/b/3.jpg", "a/b/c/4.webp", "a/b/c/d/5.png",
    "a/b.jpg", "a/b0.jpg", "a/marker/", "a/marker/6.jpg",  # a folder marker object
    "a b/7.jpg", "a+b/8.jpg", "é/9.jpg", "x&y/<10>.jpg",  # names that need escaping
    *[f"flat/{i:04d}.jpg" for i in range(23)],  # a level of files: several pages
    *[f"shards/{s:02d}/{i:03d}.{'jpg' if i % 4 else 'json'}" for s in range(9)
      for i in range(8)],
    "shards/x.tar", "shards/y.parquet",
]


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as server:
        server.make_bucket(BUCKET)
        fs = server.fs()
        fs.pipe({f"{BUCKET}/root/{key}": b"x" * (i % 5) for i, key in enumerate(KEYS)})
        fs.pipe({f"{BUCKET}/rootless.jpg": b"not under the prefix",
                 f"{BUCKET}/root2/z.jpg": b"not under the prefix either"})
        yield server


def _expected(fs, path: str) -> pa.Table:
    """What the job listed before: fs.find, sorted, image names only."""
    found = fs.find(path, detail=True)
    rows = [(p, info) for p, info in sorted(found.items())
            if info["type"] == "file" and extension(p) in IMAGE_EXTENSIONS]
    return pa.table({"uri": [f"s3://{p}" for p, _ in rows],
                     "size_bytes": pa.array([info["size"] for _, info in rows], pa.int64()),
                     "fingerprint": [f"{info['size']}:etag:{info['ETag'].strip(chr(34))}"
                                     for _, info in rows]})


@pytest.mark.parametrize("want,level_files,groups,chunk_rows", [
    (1, 10, 1, 1 << 18),  # no descent: one unit, one task
    (4, 10, 3, 20),  # a level or two; the flat folder stays whole
    (1000, 100, 7, 3),  # every level, files held by the plan, many small chunks
])
def test_partitioned_listing_equals_find(s3, tmp_path, monkeypatch, want, level_files, groups,
                                         chunk_rows):
    monkeypatch.setattr(prefixes, "CHUNK_ROWS", chunk_rows)
    monkeypatch.setattr(prefixes, "PAGE_KEYS", 5)  # many pages from few keys
    opts = s3.storage_options()
    fs = prefixes.private_fs(opts)
    bucket, units = prefixes.plan_prefix(fs, f"s3://{BUCKET}/root", want=want,
                                         level_files=level_files)
    assert bucket == BUCKET
    if want > 1:
        assert sum(u.prefix is not None for u in units) > 1
    parts = prefixes.group_units(units, groups)
    assert [u for g in parts for u in g] == units
    results = [prefixes.list_units(opts, bucket, g, str(tmp_path / "chunks"), i)
               for i, g in enumerate(parts)]
    chunks = [c for r in results for c in r["chunks"]]
    assert all(c.rows <= chunk_rows for c in chunks)
    tables = [pq.read_table(c.path) for c in chunks]
    assert all(t.schema.equals(LISTING_SCHEMA) for t in tables)
    assert all(t["index"].to_pylist() == list(range(t.num_rows)) for t in tables)
    got = pa.concat_tables(tables)
    expected = _expected(s3.fs(), f"{BUCKET}/root")
    assert got.num_rows == expected.num_rows == 15 + 23 + 9 * 6
    assert got.select(["uri", "size_bytes", "fingerprint"]).equals(expected)
    assert got["source"].equals(got["uri"])
    assert sum(c.bytes for c in chunks) == sum(expected["size_bytes"].to_pylist())
    non_images = sum(1 for k in KEYS if not k.endswith("/")
                     and extension(k) not in IMAGE_EXTENSIONS)
    assert sum(r["skipped"] for r in results) == non_images
    kinds = {}
    for r in results:
        for k, n in r["other_kinds"].items():
            kinds[k] = kinds.get(k, 0) + n
    assert kinds == {"tar": 1, "parquet": 1, "manifest": 1}


def test_select_staged_matches_the_whole_table_selection(tmp_path):
    """Chunk by chunk with lookups = the old selection on one table (resume, --incremental,
    --retry-errors together), and the loaded chunks carry the work indices 0..n-1."""
    import numpy as np

    from resnet_features.extract.staged import StagedListing, load_chunk, select_staged
    from resnet_features.runs.ledger import UriLookup, incremental_filter

    rng = np.random.default_rng(0)
    n = 500
    uris = [f"s3://b/k/{i:04d}.jpg" for i in range(n)]
    fps = [f"{i}:etag:{rng.integers(3)}" for i in range(n)]
    table = pa.table({"index": np.arange(n), "uri": uris, "size_bytes": np.arange(n),
                      "source": uris, "offset": np.full(n, -1), "length": np.full(n, -1),
                      "fingerprint": fps}, schema=LISTING_SCHEMA)
    chunks = []
    for k, start in enumerate(range(0, n, 128)):
        piece = table.slice(start, 128)
        piece = piece.set_column(0, "index", pa.array(np.arange(piece.num_rows)))
        path = str(tmp_path / f"c{k}.parquet")
        pq.write_table(piece, path)
        chunks.append(prefixes.Chunk(path=path, rows=piece.num_rows, bytes=0))
    listing = StagedListing(chunks=chunks, skipped_non_image=0, other_kinds={}, seconds=0,
                            requests=0, units=1, tasks=1)
    pick = rng.random(n)
    committed = table.filter(pa.array(pick < 0.2)).select(["uri"])
    ledger = pa.table({"uri": uris[::2], "fingerprint": [f"{i * 2}:etag:0" for i in
                                                         range(len(uris[::2]))]})
    failed = table.filter(pa.array(pick > 0.4)).select(["uri"])
    work, counts = select_staged(listing, None, committed=UriLookup(committed),
                                 incremental=UriLookup(ledger), retry=UriLookup(failed))
    inc_mask, inc_counts = incremental_filter(table, ledger)
    expect = (~np.isin(uris, committed["uri"].to_pylist()) & inc_mask
              & np.isin(uris, failed["uri"].to_pylist()))
    assert counts["incremental"] == inc_counts
    assert counts["retry_errors"]["retried"] == failed.num_rows
    loaded = pa.concat_tables([load_chunk(c, None) for c in work.chunks])
    assert loaded["uri"].to_pylist() == [u for u, keep in zip(uris, expect) if keep]
    assert loaded["index"].to_pylist() == list(range(int(expect.sum())))
    assert work.num_rows == expect.sum()
    lost = np.array([0, work.num_rows - 1])
    assert work.uris_at(lost) == [loaded["uri"][0].as_py(), loaded["uri"][-1].as_py()]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_job_lists_an_s3_prefix_in_tasks(s3, few_photos, resnet18_weights, ray_local,
                                         monkeypatch):
    """The Ray job on an s3:// prefix of images goes through the staged listing (a task and
    a chunk for each of x/ and y/): the rows are the photos' (eager torchvision's
    embeddings), a bad image is an error row, and a second run with --incremental after a new
    upload computes the new image and the failed one only."""
    import json
    import os

    import numpy as np

    from resnet_features.extract.pipeline import run
    from tests.helpers import cosine, make_cfg, reference_outputs

    monkeypatch.setattr(prefixes, "PLAN_LEVEL_FILES", 0)  # the plan expands no level of files
    fs = s3.fs()
    names = sorted(os.listdir(few_photos))
    where = {n: f"{BUCKET}/job/{['x', 'y/z', 'y'][i % 3]}/{n}" for i, n in enumerate(names)}
    fs.pipe({path: open(os.path.join(few_photos, n), "rb").read() for n, path in where.items()})
    fs.pipe({f"{BUCKET}/job/y/bad.jpg": b"not a jpeg", f"{BUCKET}/job/x/readme.txt": b"hi"})
    out = f"s3://{BUCKET}/job-out"

    def job(run_id: str, *flags: str):
        result = run(make_cfg(
            "--input", f"s3://{BUCKET}/job/", "--output", out, "--model", "resnet18",
            "--weights", resnet18_weights, "--device", "cpu", "--max-error-rate", "0.5",
            "--storage-options", json.dumps(s3.storage_options()), *flags, run_id=run_id))
        assert result.exit_code == 0, result.reason
        return result.summary

    first = job("t")
    assert first["listing"]["staged"]
    assert first["listing"]["tasks"] == first["listing"]["chunks"] == 2
    assert (first["listed"], first["computed"], first["succeeded"], first["failed"]) == (
        7, 7, 6, 1)
    assert first["skipped_non_image"] == 1 and first["input_format"] == "images"
    rows = pq.read_table(f"{BUCKET}/job-out/run=t", filesystem=fs,
                         columns=["uri", "embedding"])
    emb = dict(zip(rows["uri"].to_pylist(),
                   np.stack(rows["embedding"].to_numpy(zero_copy_only=False))))
    expected = reference_outputs("resnet18", resnet18_weights,
                                 [os.path.join(few_photos, n) for n in names])[0]
    got = np.stack([emb[f"s3://{where[n]}"] for n in names])
    cos = cosine(got, expected)  # the job's decode vs PIL + torchvision's transforms
    assert cos.min() >= 0.999, cos

    fs.pipe(f"{BUCKET}/job/x/new.jpg", open(os.path.join(few_photos, names[0]), "rb").read())
    second = job("t2", "--incremental")
    assert second["listing"]["staged"]
    assert (second["listed"], second["computed"]) == (8, 2)
    assert second["skipped"]["incremental"]["skipped_unchanged"] == 6
    assert second["skipped"]["incremental"]["new"] == 2
    assert not fs.exists(f"{BUCKET}/job-out/_staging")  # listing chunks went with the staging


def test_column_flags_on_an_s3_image_prefix_are_refused(s3, resnet18_weights, monkeypatch):
    """--where (and the other column flags) on an s3:// prefix of images: the usage error the
    driver's listing gives for images, never silently ignored by the staged listing."""
    import json

    from resnet_features.core.errors import InputError
    from resnet_features.extract import pipeline
    from tests.helpers import make_cfg

    monkeypatch.setattr(pipeline, "_init_ray", lambda: None)  # refused before any Ray work
    monkeypatch.setattr(pipeline, "_list_staged", lambda *a: pytest.fail("staged listing ran"))
    cfg = make_cfg("--input", f"s3://{BUCKET}/root/", "--output", f"s3://{BUCKET}/flags-out",
                   "--model", "resnet18", "--weights", resnet18_weights,
                   "--input-format", "images", "--where", "size < 10",
                   "--storage-options", json.dumps(s3.storage_options()))
    with pytest.raises(InputError, match="--where applies to"):
        pipeline.run(cfg)


def test_a_spoilt_200_list_response_is_retried(s3, tmp_path, monkeypatch):
    """The listing client parses each page once, in its own hook, in place of botocore's check
    for S3's "200 with an error body": an error document or a cut-off body sent with status
    200 is retried, as botocore retries it, and the listing is still exactly `fs.find`'s.
    Other clients keep botocore's check."""
    import botocore.handlers
    from fsspec.asyn import sync

    monkeypatch.setattr(prefixes, "PAGE_KEYS", 7)
    served: list[str] = []

    def spoil(method: str, path: str, body: bytes) -> bytes:
        """The first list responses, spoilt as S3 and networks do under status 200: an error
        document (S3's "200 with an error" case), then a body cut off halfway."""
        if "list-type=2" not in path or len(served) == 2:
            return body
        served.append(["error", "cut"][len(served)])
        if served[-1] == "error":
            return (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError'
                    b'</Code><Message>We encountered an internal error.</Message></Error>')
        return body[:len(body) // 2]

    with LatencyProxy(s3.endpoint, latency_ms=0, rewrite=spoil) as url:
        opts = {**s3.storage_options(),
                "client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"}}
        fs = prefixes.private_fs(opts)
        bucket, units = prefixes.plan_prefix(fs, f"s3://{BUCKET}/root", want=1)
        result = prefixes.list_units(opts, bucket, units, str(tmp_path / "chunks"), 0)
    assert served == ["error", "cut"]  # both spoilt pages reached the client
    got = pa.concat_tables([pq.read_table(c.path) for c in result["chunks"]])
    expected = _expected(s3.fs(), f"{BUCKET}/root")
    assert got.select(["uri", "size_bytes", "fingerprint"]).equals(expected)

    def checks_200(fs) -> bool:
        events = sync(fs.loop, fs.set_session).meta.events._emitter  # noqa: SLF001
        return botocore.handlers._handle_200_error in events._handlers.prefix_search(
            "before-parse.s3.ListObjectsV2")

    assert not checks_200(prefixes.private_fs(s3.storage_options()))
    assert checks_200(s3.fs())


def _etree_page(body: bytes) -> prefixes.Page:
    """The reference: the same fields through xml.etree (a real XML parser)."""
    import xml.etree.ElementTree as ET
    from urllib.parse import unquote_plus

    ns = "{http://s3.amazonaws.com/doc/2006-03-01/}"
    root = ET.fromstring(body)
    assert root.tag == ns + "ListBucketResult"
    url = root.findtext(ns + "EncodingType") == "url"

    def name(t):
        return unquote_plus(t) if url else t

    files = []
    for c in root.iter(ns + "Contents"):
        key = name(c.findtext(ns + "Key"))
        if not key.endswith("/"):
            size = int(c.findtext(ns + "Size"))
            files.append((key, size, prefixes._fingerprint(size, c.findtext(ns + "ETag"),
                                                            c.findtext(ns + "LastModified"))))
    token = (root.findtext(ns + "NextContinuationToken")
             if root.findtext(ns + "IsTruncated") == "true" else None)
    return prefixes.Page(files, [name(p.findtext(ns + "Prefix"))
                                 for p in root.iter(ns + "CommonPrefixes")], token)


def _list_body(keys, common=(), *, url=False, token=None, pretty=False, etag=True,
               prefixes_first=False) -> bytes:
    from urllib.parse import quote_plus
    from xml.sax.saxutils import escape

    nl = "\n  " if pretty else ""

    def enc(k):
        return escape(quote_plus(k, safe="/") if url else k, {'"': "&quot;"})

    contents = "".join(
        f"<Contents>{nl}<Key>{enc(k)}</Key>{nl}<LastModified>2026-01-0{1 + i % 9}T00:00:00.000Z"
        f"</LastModified>{nl}" + (f"<ETag>&quot;{i:032x}&quot;</ETag>{nl}" if etag else "")
        + f"<Size>{100 + i}</Size>{nl}<StorageClass>STANDARD</StorageClass>{nl}</Contents>{nl}"
        for i, k in enumerate(keys))
    common_xml = "".join(f"<CommonPrefixes>{nl}<Prefix>{enc(p)}</Prefix>{nl}</CommonPrefixes>"
                         for p in common)
    head = (f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="http://s3.'
            f'amazonaws.com/doc/2006-03-01/">{nl}<Name>b</Name>{nl}<Prefix>{enc("p/")}</Prefix>'
            f"{nl}<KeyCount>{len(keys)}</KeyCount>{nl}<MaxKeys>1000</MaxKeys>{nl}"
            + ("<EncodingType>url</EncodingType>" if url else "")
            + f"<IsTruncated>{'true' if token else 'false'}</IsTruncated>{nl}"
            + (f"<NextContinuationToken>{escape(token)}</NextContinuationToken>{nl}"
               if token else ""))
    body = head + (common_xml + contents if prefixes_first else contents + common_xml)
    return (body + "</ListBucketResult>\n").encode()


ODD_KEYS = ["a.jpg", "a b/c&d.jpg", "x<y>/'q'\"z\".png", "é/ü 2+3.webp", "tab\there.jpg",
            "folder/", "p%41th/100%.jpg", "amp&amp;/lit.jpg", "ctl\x01/x.jpg", "emoji😀.jpg"]


@pytest.mark.parametrize("layout", [
    {}, {"url": True}, {"pretty": True}, {"etag": False}, {"token": "1/abc+&=="},
    {"prefixes_first": True, "pretty": True}, {"url": True, "token": "t"}])
def test_page_parser_agrees_with_xml_etree(layout):
    """`parse_page` finds each field by its tags: on S3 documents with escaped, URL-encoded,
    non-ASCII and control-character keys, pretty-printed or not, without ETags, with common
    prefixes before or after the objects, it gives what a real XML parser gives."""
    # A control character cannot be in XML 1.0 at all: S3 lists such keys URL-encoded.
    keys = ODD_KEYS if layout.get("url") else [k for k in ODD_KEYS if "\x01" not in k]
    body = _list_body(keys, ["sub/", "s&b <2>/", "ü/"], **layout)
    got = prefixes.parse_page(body)
    assert got == _etree_page(body)
    assert len(got.files) == len(keys) - 1 and len(got.prefixes) == 3  # less the folder marker
    assert got.token == layout.get("token")
    if layout.get("etag", True):
        assert got.files[0][2].startswith("100:etag:")
    # Character references, as some servers write them.
    ref = body.replace(b"<Key>a.jpg</Key>", b"<Key>&#97;&#x2e;jpg</Key>")
    assert ref != body and prefixes.parse_page(ref) == got == _etree_page(ref)


def test_the_listing_hook_turns_a_spoilt_200_into_a_retryable_500():
    ok = _list_body(["a.jpg"])
    for body, status in [(ok, 200), (ok[:len(ok) // 2], 500), (ok[:-5], 500), (b"", 500),
                         (b"<Error><Code>SlowDown</Code></Error>", 500),
                         (b"<html><body>proxy login</body></html>", 500)]:
        response, custom = {"status_code": 200, "body": body}, {}
        prefixes._parse_once(response, custom)
        assert response["status_code"] == status
        if status == 200:
            assert custom["Page"].files == [("a.jpg", 100, f"100:etag:{0:032x}")]
            assert response["body"] == prefixes._EMPTY
        else:
            assert response["body"] == body and not custom  # botocore parses the error
    response = {"status_code": 404, "body": b"<Error><Code>NoSuchBucket</Code></Error>"}
    prefixes._parse_once(response, {})
    assert response["status_code"] == 404  # other errors are botocore's to map
