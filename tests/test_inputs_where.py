"""--where row filters and S3 Inventory reports as input, without Ray: listings against rows
computed independently in Python, fetched bytes against the real files."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
from urllib.parse import quote_plus

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import fetch_listing

from resnet_features.core.config import config_from_args, get_args_parser
from resnet_features.core.errors import ConfigError
from resnet_features.core.where import parse_where
from resnet_features.extract.inputs import InputError, InputSpec, list_inputs


def test_where_masks_match_python():
    rng = np.random.default_rng(0)
    n = 200
    status = rng.choice(["success", "failed_to_download", None], n).tolist()
    size = rng.integers(0, 100, n).tolist()
    key = [f"photos/{2024 + i % 3}/{i}.{'jpg' if i % 4 else 'PNG'}" for i in range(n)]
    t = pa.table({"status": status, "size": size, "key": key})
    cases = {
        "status = 'success'": lambda s, z, k: s == "success",
        "size < 50 AND NOT status = 'success'": lambda s, z, k: z < 50 and s is not None
        and s != "success",
        "key LIKE 'photos/2026/%' OR size >= 90": lambda s, z, k: k.startswith("photos/2026/")
        or z >= 90,
        "status IS NULL": lambda s, z, k: s is None,
        "status IS NOT NULL and key not like '%.jpg'": lambda s, z, k: s is not None
        and not k.endswith(".jpg"),
        "size in (1, 2, 3) or (status <> 'success' and size > 97)": lambda s, z, k: z in (1, 2, 3)
        or (s is not None and s != "success" and z > 97),
    }
    for text, py in cases.items():
        expected = [bool(py(s, z, k)) for s, z, k in zip(status, size, key)]
        assert parse_where(text).mask(t).tolist() == expected, text


@pytest.mark.parametrize("text, where", [
    ("status = ", "character 10"), ("status == 'x'", "character 9"),
    ("status = 'x' AND", "a column name"), ("(size < 3", "')'"), ("'x' = status", "column"),
    ("size ~ 3", "cannot read '~ 3' at character 6"), ("", "empty")])
def test_bad_where_is_a_usage_error_at_parse_time(text, where):
    with pytest.raises(ConfigError, match=re.escape(where)):
        config_from_args(get_args_parser().parse_args(
            ["--input", "in", "--output", "out", "--where", text]))


def _img2dataset_parquet(path, blobs, n=25, failed=(3, 11, 20)):
    """Parquet as img2dataset writes it: one row per URL, `status`, `error_message`, and a null
    `jpg` for a failed download."""
    names = list(blobs)
    ok = [i not in failed for i in range(n)]
    pq.write_table(pa.table({
        "url": [f"https://example.com/{i}.jpg" for i in range(n)],
        "key": [f"{i:09d}" for i in range(n)],
        "status": ["success" if k else "failed_to_download" for k in ok],
        "error_message": [None if k else "HTTP 404" for k in ok],
        "width": pa.array([64 if k else None for k in ok], pa.int32()),
        "jpg": pa.array([blobs[names[i % len(names)]] if k else None for i, k in enumerate(ok)],
                        pa.binary()),
    }), path, row_group_size=10)
    return [(i, names[i % len(names)]) for i, k in enumerate(ok) if k]


def test_img2dataset_parquet_with_where(tmp_path, blobs):
    good = _img2dataset_parquet(tmp_path / "00000.parquet", blobs)
    # As it is: the 3 dead URLs (12%) are read errors.
    listing = list_inputs(str(tmp_path), InputSpec(image_column="jpg"))
    assert listing.table.num_rows == 25 and listing.filtered == 0
    assert sum(s == "read" for s in fetch_listing(listing, image_column="jpg")["error_stage"]) == 3
    # --where "status = 'success'": the failed rows are never listed; file row numbers kept.
    listing = list_inputs(str(tmp_path), InputSpec(image_column="jpg", keep_columns=("key",),
                                                   where="status = 'success'"))
    assert listing.filtered == 3 and listing.table.num_rows == 22
    assert listing.table.column("offset").to_pylist() == [i for i, _ in good]
    assert listing.extra.column("key").to_pylist() == [f"{i:09d}" for i, _ in good]
    out = fetch_listing(listing, image_column="jpg")
    assert not any(out["error_stage"])
    assert list(out["bytes"]) == [blobs[n] for _, n in good]
    with pytest.raises(InputError, match="no column.*stat"):
        list_inputs(str(tmp_path), InputSpec(image_column="jpg", where="stat = 'success'"))
    with pytest.raises(InputError, match="does not fit.*width"):
        list_inputs(str(tmp_path), InputSpec(image_column="jpg", where="width = 'wide'"))
    with pytest.raises(InputError, match="match --where"):
        list_inputs(str(tmp_path), InputSpec(image_column="jpg", where="width > 100"))


def test_where_on_manifests_and_refused_elsewhere(tmp_path, blobs, few_photos):
    names = list(blobs)
    sizes = {n: len(blobs[n]) for n in names}
    limit = sorted(sizes.values())[len(names) // 2]
    (tmp_path / "m.csv").write_text("uri,bytes,year\n" + "".join(
        f"{os.path.join(few_photos, n)},{sizes[n]},{2024 + i % 3}\n" for i, n in enumerate(names)))
    listing = list_inputs(str(tmp_path / "m.csv"), InputSpec(
        where=f"bytes < {limit} AND year >= 2025", keep_columns=("year",)))
    expected = [n for i, n in enumerate(names) if sizes[n] < limit and 2024 + i % 3 >= 2025]
    assert listing.table.column("uri").to_pylist() == [os.path.join(few_photos, n)
                                                      for n in expected]
    assert listing.filtered == len(names) - len(expected)
    assert listing.extra.column("year").to_pylist() == [  # kept as the CSV's text
        str(2024 + names.index(n) % 3) for n in expected]
    pq.write_table(pa.table({"uri": [os.path.join(few_photos, n) for n in names],
                             "bytes": [sizes[n] for n in names]}), tmp_path / "m.parquet",
                   row_group_size=2)
    listing = list_inputs(str(tmp_path / "m.parquet"), InputSpec(
        format="manifest", where=f"bytes >= {limit}"))
    assert listing.table.num_rows == sum(sizes[n] >= limit for n in names)
    assert list(fetch_listing(listing)["bytes"]) == [blobs[n] for n in names if sizes[n] >= limit]
    with pytest.raises(InputError, match="--where applies to --input-format"):
        list_inputs(few_photos, InputSpec(where="size < 3"))


# -- S3 Inventory ----------------------------------------------------------------------------

CSV_SCHEMA = ("Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, "
              "StorageClass")


def _inventory_rows(objects: dict[str, bytes], bucket: str) -> list[dict]:
    """Report rows for `objects` (key -> bytes), plus an old version and a delete marker."""
    rows = [{"bucket": bucket, "key": k, "version_id": "v2", "is_latest": True,
             "is_delete_marker": False, "size": len(b), "last_modified_date": 1767225600000 + i,
             "e_tag": f"{i:032x}", "storage_class": "STANDARD"}
            for i, (k, b) in enumerate(sorted(objects.items()))]
    first = rows[0]["key"]
    rows.append({**rows[0], "version_id": "v1", "is_latest": False, "e_tag": "f" * 32})
    rows.append({**rows[0], "key": "gone/deleted.jpg", "is_delete_marker": True, "size": None,
                 "e_tag": None})
    assert first
    return rows


def write_inventory(root, source: str, rows: list[dict], fmt: str, files: int = 2) -> str:
    """Write a report the way S3 does: `<root>/<dest>/<source>/<config>/data/*` and
    `<root>/<dest>/<source>/<config>/<YYYY-MM-DDTHH-MMZ>/manifest.json`, keys relative to the
    destination bucket `<dest>`; CSV files gzipped, headerless, keys URL-encoded."""
    dest = "inventory-dest"
    base = f"{source}/nightly"
    os.makedirs(os.path.join(root, dest, base, "data"), exist_ok=True)
    keys = []
    for f in range(files):
        part = rows[f::files]
        if fmt == "CSV":
            key = f"{base}/data/{f:04d}.csv.gz"
            lines = []
            for r in part:
                ts = np.datetime64(r["last_modified_date"], "ms").astype(str) + "Z"
                cells = [r["bucket"], quote_plus(r["key"], safe="/"), r["version_id"],
                         str(r["is_latest"]).lower(), str(r["is_delete_marker"]).lower(),
                         "" if r["size"] is None else str(r["size"]), ts, r["e_tag"] or "",
                         r["storage_class"]]
                lines.append(",".join(f'"{c}"' for c in cells))
            data = gzip.compress(("\n".join(lines) + "\n").encode())
        else:
            key = f"{base}/data/{f:04d}.parquet"
            t = pa.Table.from_pylist(part).cast(pa.schema([
                ("bucket", pa.string()), ("key", pa.string()), ("version_id", pa.string()),
                ("is_latest", pa.bool_()), ("is_delete_marker", pa.bool_()),
                ("size", pa.int64()), ("last_modified_date", pa.timestamp("ms")),
                ("e_tag", pa.string()), ("storage_class", pa.string())]))
            buf = io.BytesIO()
            pq.write_table(t, buf)
            data = buf.getvalue()
        with open(os.path.join(root, dest, key), "wb") as out:
            out.write(data)
        keys.append({"key": key, "size": len(data), "MD5checksum": "0" * 32})
    manifest = {"sourceBucket": source, "destinationBucket": f"arn:aws:s3:::{dest}",
                "version": "2016-11-30", "creationTimestamp": "1767225600000",
                "fileFormat": fmt, "files": keys,
                "fileSchema": CSV_SCHEMA if fmt == "CSV" else "message s3.inventory { ... }"}
    for stamp in ("2025-12-31T01-00Z", "2026-01-01T01-00Z"):  # the newest is used
        folder = os.path.join(root, dest, base, stamp)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "manifest.json"), "w") as out:
            json.dump(manifest if stamp.startswith("2026") else {**manifest, "files": []}, out)
    return os.path.join(root, dest, base, stamp, "manifest.json")


@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
def test_inventory_report_local_copy(tmp_path, fmt):
    objects = {"photos/2026/a b+c.jpg": b"x" * 10, "photos/2026/d.PNG": b"y" * 20,
               "photos/2025/e.jpeg": b"z" * 30, "photos/notes.txt": b"n",
               "big/f.webp": b"w" * 90}
    rows = _inventory_rows(objects, "src")
    manifest = write_inventory(str(tmp_path), "src", rows, fmt)
    live = sorted(k for k in objects if not k.endswith(".txt"))
    for where_input in (manifest, os.path.dirname(os.path.dirname(manifest))):
        listing = list_inputs(where_input, InputSpec(format="s3-inventory"))
        assert listing.format == "s3-inventory"
        assert listing.table.column("uri").to_pylist() == [f"s3://src/{k}" for k in live]
        assert listing.skipped_non_image == 1 and listing.notes["not_latest"] == 2
        by_key = {r["key"]: r for r in rows[:len(objects)]}
        assert listing.table.column("size_bytes").to_pylist() == [len(objects[k]) for k in live]
        assert listing.table.column("fingerprint").to_pylist() == [
            f"{len(objects[k])}:etag:{by_key[k]['e_tag']}" for k in live]
    assert list_inputs(manifest).format == "s3-inventory"  # detected by name
    listing = list_inputs(manifest, InputSpec(
        format="s3-inventory", where="size < 50 AND key LIKE 'photos/2026/%'",
        keep_columns=("storage_class", "last_modified_date")))
    assert listing.table.column("uri").to_pylist() == [
        "s3://src/photos/2026/a b+c.jpg", "s3://src/photos/2026/d.PNG"]
    assert listing.filtered == len(rows) - 2  # old versions and delete markers count too
    assert listing.extra.column("storage_class").to_pylist() == ["STANDARD"] * 2
    with pytest.raises(InputError, match="no column.*colour"):
        list_inputs(manifest, InputSpec(format="s3-inventory", where="colour = 'red'"))
    if fmt == "Parquet":  # a Parquet report's files work without their manifest
        data = os.path.join(os.path.dirname(os.path.dirname(manifest)), "data")
        listing = list_inputs(data, InputSpec(format="s3-inventory"))
        assert listing.table.column("uri").to_pylist() == [f"s3://src/{k}" for k in live]
    else:
        with pytest.raises(InputError, match="manifest.json"):
            list_inputs(os.path.join(os.path.dirname(os.path.dirname(manifest)), "data"),
                        InputSpec(format="s3-inventory"))


# -- On S3 (moto) and through the job --------------------------------------------------------

@pytest.fixture(scope="module")
def s3():
    from s3_server import moto_s3

    with moto_s3() as server:
        for bucket in ("src", "inventory-dest", "out"):
            server.make_bucket(bucket)
        yield server


def _s3_inventory(s3, blobs, tmp_path, fmt="CSV") -> str:
    """Images in s3://src/photos/, and a report of them written from a real listing (ETags as
    S3 gives them) into s3://inventory-dest/, as S3 Inventory would."""
    fs = s3.fs()
    for n, b in blobs.items():
        fs.pipe(f"src/photos/{n}", b)
    fs.pipe("src/photos/readme.txt", b"not an image")
    listed = fs.find("src/photos", detail=True)
    rows = [{"bucket": "src", "key": p.split("/", 1)[1], "version_id": "", "is_latest": True,
             "is_delete_marker": False, "size": int(info["size"]),
             "last_modified_date": int(info["LastModified"].timestamp() * 1000),
             "e_tag": info["ETag"].strip('"'), "storage_class": "STANDARD"}
            for p, info in sorted(listed.items())]
    manifest = write_inventory(str(tmp_path), "src", rows, fmt)
    fs.put(str(tmp_path / "inventory-dest") + "/", "inventory-dest/", recursive=True)
    return "s3://" + manifest.split(str(tmp_path) + "/", 1)[1]


@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
def test_inventory_on_s3_agrees_with_a_listing(s3, blobs, tmp_path, fmt):
    manifest = _s3_inventory(s3, blobs, tmp_path, fmt)
    opts = s3.storage_options()
    listing = list_inputs(manifest, InputSpec(format="s3-inventory"), opts)
    listed = list_inputs("s3://src/photos/", InputSpec(), opts)
    for col in ("uri", "size_bytes", "fingerprint"):  # --incremental sees the same inputs
        assert listing.table.column(col).to_pylist() == listed.table.column(col).to_pylist()
    out = fetch_listing(listing, storage_options=opts)
    assert list(out["bytes"]) == [blobs[n] for n in sorted(blobs)]


def _run(*argv):
    from resnet_features.extract.pipeline import run

    return run(config_from_args(get_args_parser().parse_args(list(argv))))


@pytest.mark.slow
def test_nightly_run_on_inventory_needs_no_recompute(s3, blobs, tmp_path, resnet18_weights,
                                                     ray_local):
    """A run on a listing, then one on the report with --incremental: nothing to compute."""
    manifest = _s3_inventory(s3, blobs, tmp_path)
    common = ["--output", "s3://out/feat", "--model", "resnet18", "--weights", resnet18_weights,
              "--incremental", "--storage-options", json.dumps(s3.storage_options())]
    first = _run("--input", "s3://src/photos/", "--run-id", "d1", *common)
    assert first.exit_code == 0 and first.summary["computed"] == len(blobs)
    second = _run("--input", manifest, "--run-id", "d2", *common)
    assert second.exit_code == 0, second.reason
    assert second.summary["input_format"] == "s3-inventory"
    assert second.summary["listed"] == len(blobs) and second.summary["computed"] == 0


@pytest.mark.slow
def test_img2dataset_parquet_job(tmp_path, blobs, resnet18_weights, ray_local):
    """12% dead URLs: over the default 5% error budget as read errors; with --where they are
    counted as skipped.filtered and the run succeeds."""
    _img2dataset_parquet(tmp_path / "in.parquet", blobs)
    common = ["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
              "--model", "resnet18", "--weights", resnet18_weights, "--image-column", "jpg"]
    plain = _run(*common, "--run-id", "plain")
    assert plain.exit_code == 3 and plain.summary["failed_by_stage"] == {"read": 3}
    filtered = _run(*common, "--run-id", "where", "--where", "status = 'success'",
                    "--keep-columns", "key")
    assert filtered.exit_code == 0, filtered.reason
    assert filtered.summary["skipped"]["filtered"] == 3
    assert filtered.summary["succeeded"] == 22 and filtered.summary["failed"] == 0
