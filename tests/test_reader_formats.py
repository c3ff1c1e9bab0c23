"""Listing and fetching for every input format, without Ray: bytes must equal the real files."""

from __future__ import annotations

import gzip
import io
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import fetch_listing

from resnet_features.core import vocab
from resnet_features.extract.inputs import (
    FORMATS,
    INPUT_FORMATS,
    InputError,
    InputSpec,
    ReadBytes,
    list_inputs,
    listing_blocks,
)


def _write_tar(path, members, gz=False):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if gz else data)
    return data


def test_tar_members_by_range_and_gz(tmp_path, blobs):
    names = list(blobs)
    big_gap = os.urandom(3 << 20)  # a 3 MB non-image member: forces two range requests
    _write_tar(tmp_path / "a.tar", [(f"../{names[0]}", blobs[names[0]]), ("gap.bin", big_gap)]
               + [(n, blobs[n]) for n in names[1:4]])
    _write_tar(tmp_path / "b.tar.gz", [(n, blobs[n]) for n in names[4:]], gz=True)
    listing = list_inputs(str(tmp_path), InputSpec())
    assert listing.format == "tar" and listing.skipped_non_image == 1
    out = fetch_listing(listing)
    got = {u.split("#", 1)[1]: b for u, b in zip(out["uri"], out["bytes"])}
    assert got == {f"../{names[0]}": blobs[names[0]], **{n: blobs[n] for n in names[1:]}}
    assert not any(out["error_stage"])
    assert out["bytes_read"].sum() == sum(len(b) for b in blobs.values())
    assert not (tmp_path / ".." / names[0]).exists()  # never extracted


def test_truncated_tar_member_and_missing_shard_are_error_rows(tmp_path, blobs):
    names = list(blobs)
    data = _write_tar(tmp_path / "a.tar", [(n, blobs[n]) for n in names[:2]])
    listing = list_inputs(str(tmp_path / "a.tar"), InputSpec())
    # The shard is cut inside the second member after listing; then the first one vanishes.
    (tmp_path / "a.tar").write_bytes(data[: 1024 + len(blobs[names[0]]) + 1024])
    out = fetch_listing(listing)
    assert list(out["error_stage"]) == ["", "read"]
    assert "truncated" in out["error_message"][1] and out["error_type"][1] == "_Unreadable"
    os.remove(tmp_path / "a.tar")
    out = fetch_listing(listing)
    assert list(out["error_stage"]) == ["read", "read"]
    assert set(out["error_type"]) == {"FileNotFoundError"}


def test_parquet_struct_and_binary_layouts(tmp_path, blobs):
    names = list(blobs)
    pq.write_table(pa.table({"img": [{"bytes": blobs[n], "path": n} for n in names[:3]],
                             "id": [10, 11, 12]}), tmp_path / "a.parquet", row_group_size=2)
    pq.write_table(pa.table({"img": pa.array([blobs[n] for n in names[3:]] + [b""]),
                             "id": [13, 14, 15, 16]}), tmp_path / "b.parquet", row_group_size=1)
    spec = InputSpec(image_column="img", id_column="id")
    listing = list_inputs(str(tmp_path), spec)
    assert listing.format == "parquet"
    assert listing.extra.column("id").to_pylist() == [10, 11, 12, 13, 14, 15, 16]
    # A block that starts mid-file and skips row groups still gets the right rows.
    t = listing.table.take(pa.array([6, 1, 4]))
    out = ReadBytes(input_format="parquet", image_column="img")(
        {k: t.column(k).to_numpy(zero_copy_only=False) for k in t.column_names})
    assert out["bytes"][1] == blobs[names[1]] and out["bytes"][2] == blobs[names[4]]
    assert list(out["error_stage"]) == ["read", "", ""]
    # The listing cannot know a cell's size (0 there); the fetch fills it, 0 for the empty cell.
    assert set(t.column("size_bytes").to_pylist()) == {0}
    assert list(out["size_bytes"]) == [0, len(blobs[names[1]]), len(blobs[names[4]])]
    with pytest.raises(InputError, match="--image-column"):
        list_inputs(str(tmp_path), InputSpec(image_column="nope"))


def test_manifest_text_csv_and_parquet(tmp_path, blobs, few_photos):
    names = list(blobs)
    (tmp_path / "list.txt").write_text(
        "# comment\n" + "\n".join(os.path.join(few_photos, n) for n in names[:2]) + "\n\n")
    listing = list_inputs(str(tmp_path / "list.txt"))
    assert listing.format == "manifest" and listing.table.num_rows == 2
    assert list(fetch_listing(listing)["bytes"]) == [blobs[n] for n in names[:2]]
    os.symlink(few_photos, tmp_path / "photos")
    (tmp_path / "m.csv").write_text("path,label\n" + "".join(
        f"photos/{n},{n.upper()}\n" for n in names) + "photos/missing.jpg,x\n")
    listing = list_inputs(str(tmp_path / "m.csv"), InputSpec(uri_column="path",
                                                            keep_columns=("label",)))
    out = fetch_listing(listing)
    assert list(out["bytes"][:-1]) == [blobs[n] for n in names]
    assert out["error_stage"][-1] == "read"
    assert list(out["size_bytes"]) == [len(blobs[n]) for n in names] + [0]  # from the fetch
    assert listing.extra.column("label").to_pylist()[:2] == [n.upper() for n in names[:2]]
    pq.write_table(pa.table({"uri": [os.path.join(few_photos, n) for n in names],
                             "w": np.arange(len(names))}), tmp_path / "m.parquet")
    listing = list_inputs(str(tmp_path / "m.parquet"),
                          InputSpec(format="manifest", keep_columns=("w",)))
    assert listing.table.num_rows == len(names) and listing.extra.column("w").type == pa.int64()
    with pytest.raises(InputError, match="no column"):
        list_inputs(str(tmp_path / "m.csv"), InputSpec(uri_column="uri"))


def test_glob_and_detection(tmp_path, few_photos):
    listing = list_inputs(os.path.join(few_photos, "*.jpg"))
    assert listing.format == "images"
    assert all(u.endswith(".jpg") for u in listing.table.column("uri").to_pylist())
    assert listing.table.num_rows == len([n for n in os.listdir(few_photos) if n.endswith(".jpg")])
    with pytest.raises(InputError, match="matches nothing"):
        list_inputs(str(tmp_path / "*.png"))


def test_parquet_blocks_follow_row_groups(tmp_path, blobs):
    data = list(blobs.values())
    pq.write_table(pa.table({"image": data * 3}), tmp_path / "a.parquet", row_group_size=5)
    pq.write_table(pa.table({"image": data[:2]}), tmp_path / "b.parquet")
    listing = list_inputs(str(tmp_path))
    blocks = listing_blocks(listing, 8)
    rows = [b.column("index").to_pylist() for b in blocks]
    assert [i for r in rows for i in r] == list(range(20))  # every row once, in order
    meta = pq.ParquetFile(tmp_path / "a.parquet").metadata
    starts = {0, 18} | {sum(meta.row_group(g).num_rows for g in range(k)) for k in range(4)}
    assert all(r[0] in starts for r in rows), rows  # no row group is split across blocks


def test_gz_shards_stay_whole_in_blocks(tmp_path, blobs):
    """A .tar.gz shard can only be read whole, so its members share one read task (small gz
    shards may share it); plain-tar members are cut into blocks as usual."""
    names = list(blobs)
    members = [(n, blobs[n]) for n in names]
    _write_tar(tmp_path / "a.tar", members)
    _write_tar(tmp_path / "b.tar.gz", members, gz=True)
    _write_tar(tmp_path / "c.tgz", members[:1], gz=True)
    _write_tar(tmp_path / "d.tgz", members[:1], gz=True)
    listing = list_inputs(str(tmp_path))
    sources = [[s.rsplit("/", 1)[1] for s in b.column("source").to_pylist()]
               for b in listing_blocks(listing, 2)]
    assert sources == [["a.tar"] * 2, ["a.tar"] * 2, ["a.tar"] * 2, ["b.tar.gz"] * 6,
                       ["c.tgz", "d.tgz"]]


def test_tar_listing_long_names_past_big_members(tmp_path, blobs):
    """pax (long names) and GNU long-name records sit in front of a header; read by range past
    big members, the names and offsets still come out right."""
    names = list(blobs)
    members = []
    for i, n in enumerate(names[:3]):
        members += [(f"{'d' * 150}/{i}/{n}", blobs[n]), (f"{i}.bin", os.urandom(2 << 20))]
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        path = tmp_path / f"{fmt}.tar"
        with tarfile.open(path, mode="w", format=fmt) as tf:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        listing = list_inputs(str(path))
        assert listing.notes["bytes_read"] < 200_000  # headers only, not the 6 MB of .bin
        out = fetch_listing(listing)
        got = {u.split("#", 1)[1]: b for u, b in zip(out["uri"], out["bytes"])}
        assert got == {name: data for name, data in members[::2]}


def test_registry_matches_the_command_line():
    """Every format the CLI accepts has a registry entry, and every entry can be asked for."""
    assert INPUT_FORMATS == vocab.INPUT_FORMATS
    assert all(callable(f.list) and callable(f.read) for f in FORMATS.values())
