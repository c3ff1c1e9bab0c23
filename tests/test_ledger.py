"""Ledger: hash-sorted run ledgers, the streaming --incremental decision, compaction, old runs.

Real Parquet files in tmp_path, no Ray. Every decision is checked against a plain-Python
reference computed from the same rows: skip an input iff the newest earlier finished run that
computed its URI (status ok) did so with the same fingerprint.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from resnet_features.core import storage
from resnet_features.runs import ledger
from resnet_features.runs import protocol as runs
from resnet_features.runs.layout import LEDGER_SCHEMA

TASK = "0123456789abcdef"


def py_hash(uri: str) -> int:
    """An independent, pure-Python statement of `ledger.uri_hash`."""
    mask, p = (1 << 64) - 1, 0x100000001B3
    data = uri.encode()
    h = sum((b + 1) * pow(p, i + 1, 1 << 64) for i, b in enumerate(data)) & mask
    x = (h + len(data)) & mask
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & mask
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & mask
    x ^= x >> 31
    return x >> 1


def test_uri_hash_is_stable_and_chunk_independent():
    uris = ["", "a", "s3://b/img000001.jpg", "/data/été/名前.png", "", "x" * 300, "a"]
    arr = pa.array(uris)
    expect = [py_hash(u) for u in uris]
    assert ledger.uri_hash(arr).tolist() == expect
    assert ledger.uri_hash(arr, chunk=2).tolist() == expect  # chunks end on empty strings
    assert ledger.uri_hash(arr.slice(2, 3)).tolist() == expect[2:5]  # a sliced array
    chunked = pa.chunked_array([arr.slice(0, 3), arr.slice(3)])
    assert ledger.uri_hash(chunked).tolist() == expect
    assert ledger.uri_hash(pa.array([], pa.string())).tolist() == []
    # Pinned: ledgers written by earlier versions are searched with today's hash.
    assert expect[2] == 5153198932529296168
    assert all(0 <= h < 1 << 63 for h in expect)


# -- fake published runs ----------------------------------------------------------------------


def publish(out: str, run_id: str, rows: list[tuple[str, str, str]], day: int, *,
            old_format: bool = False, task: str = TASK, publish_id: str | None = None) -> None:
    """A finished run whose ledger holds (uri, fingerprint, status) rows, written by the job's
    own ledger writer (or as the single uri-sorted file runs had before hash-sorted ledgers)."""
    fs, root = storage.filesystem(out)
    run_dir = storage.join(root, f"run={run_id}")
    fs.makedirs(storage.join(run_dir, "_ledger"), exist_ok=True)
    table = pa.table({"uri": [r[0] for r in rows], "fingerprint": [r[1] for r in rows],
                      "status": [r[2] for r in rows],
                      "file": ["part-00000.parquet"] * len(rows)}, schema=LEDGER_SCHEMA)
    manifest = {"run_id": run_id, "task_fingerprint": task, "files": [], "error_files": [],
                "publish_id": publish_id or f"pub-{run_id}", "status": "succeeded",
                "committed_at": f"2026-01-{day:02d}T03:00:00Z"}
    if old_format:
        with fs.open(storage.join(run_dir, "_ledger", "ledger.parquet"), "wb") as f:
            pq.write_table(table.sort_by("uri"), f)
        manifest["ledger"] = "_ledger/ledger.parquet"
    else:
        manifest["ledger_files"] = ledger.write_run_ledger(fs, run_dir, table,
                                                           storage.join(run_dir, "_tmp"))
    for name in ("_manifest.json", "_SUCCESS"):
        with fs.open(storage.join(run_dir, name), "w") as f:
            json.dump(manifest, f)


def history(n_uris: int, n_runs: int, seed: int):
    """Rows of n_runs runs over a pool of URIs: each run computes a random subset, some with a
    new fingerprint (changed files), some reverting to an older one, some failing."""
    rng = np.random.default_rng(seed)
    uris = [f"s3://bucket/p{i % 7}/img{i:06d}.jpg" for i in range(n_uris)]
    fp = {u: "v0" for u in uris}
    per_run = []
    for k in range(n_runs):
        rows = []
        for i in rng.choice(n_uris, size=n_uris // 2, replace=False):
            u = uris[i]
            roll = rng.random()
            if roll < 0.2:
                fp[u] = f"v{k + 1}"  # the file changed before this run
            elif roll < 0.25:
                fp[u] = "v0"  # ... or was restored to an old version
            rows.append((u, fp[u], "error" if roll > 0.95 else "ok"))
        per_run.append(rows)
    listing_fp = {u: (f"tonight{i}" if i % 13 == 0 else fp[u]) for i, u in enumerate(uris)}
    listing_fp.update({f"s3://bucket/new/img{i:04d}.jpg": "n" for i in range(n_uris // 10)})
    return per_run, listing_fp


def reference(per_run: list[list[tuple[str, str, str]]], listing_fp: dict[str, str],
              included: list[int]) -> tuple[list[bool], dict[str, int]]:
    newest: dict[str, str] = {}
    for k in included:  # oldest first: later runs overwrite
        for u, f, status in per_run[k]:
            if status == "ok":
                newest[u] = f
    todo, counts = [], {"skipped_unchanged": 0, "changed": 0, "new": 0}
    for u, f in listing_fp.items():
        skip = newest.get(u) == f
        todo.append(not skip)
        key = "skipped_unchanged" if skip else ("changed" if u in newest else "new")
        counts[key] += 1
    return todo, counts


def listing_of(listing_fp: dict[str, str]) -> pa.Table:
    """The listing as the job holds it, in uneven chunks (a decision range gathers its rows
    from several)."""
    n = len(listing_fp)
    t = pa.table({"index": np.arange(n), "uri": list(listing_fp),
                  "size_bytes": np.zeros(n, np.int64), "fingerprint": list(listing_fp.values())})
    cuts = [0, n // 7, n // 2, n // 2, n]
    return pa.concat_tables([t.slice(a, b - a) for a, b in zip(cuts, cuts[1:])])


def decide(out: str, listing_fp: dict[str, str], **kw):
    fs, root = storage.filesystem(out)
    return runs.incremental_decision(fs, root, TASK, listing_of(listing_fp), **kw)


@pytest.fixture
def small_row_groups(monkeypatch):
    """Row groups and ledger and index files far smaller than a range: cursors cross every
    kind of boundary."""
    monkeypatch.setattr(ledger, "LEDGER_ROW_GROUP", 7)
    monkeypatch.setattr(ledger, "LEDGER_FILE_ROWS", 50)
    monkeypatch.setattr(ledger, "INDEX_FILE_ROWS", 90)


# -- tests ------------------------------------------------------------------------------------


def test_run_ledger_round_trip(tmp_path, small_row_groups):
    rows = [(f"/d/img{i:03d}.jpg", f"{i}:mtime:1", "error" if i % 9 == 0 else "ok")
            for i in range(120)]
    publish(str(tmp_path), "r1", rows, 1)
    manifest = json.load(open(tmp_path / "run=r1" / "_manifest.json"))
    files = manifest["ledger_files"]
    assert [f["path"] for f in files] == [f"_ledger/h-{k:05d}.parquet" for k in range(3)]
    assert [f["rows"] for f in files] == [50, 50, 20]
    back = pa.concat_tables([pq.read_table(tmp_path / "run=r1" / f["path"]) for f in files])
    hs = back.column("h").to_pylist()
    assert hs == sorted(hs) and hs == [py_hash(u) for u in back.column("uri").to_pylist()]
    assert [(f["lo"], f["hi"]) for f in files] == [(hs[0], hs[49]), (hs[50], hs[99]),
                                                   (hs[100], hs[119])]
    assert pq.ParquetFile(tmp_path / "run=r1" / files[0]["path"]).metadata.num_row_groups == 8
    assert sorted(zip(back["uri"].to_pylist(), back["fingerprint"].to_pylist(),
                      back["status"].to_pylist())) == sorted(rows)
    fs, root = storage.filesystem(str(tmp_path))
    todo, counts = runs.retry_filter(fs, root, "r1", listing_of({u: f for u, f, _ in rows}))
    assert [r[0] for r, t in zip(rows, todo) if t] == [r[0] for r in rows if r[2] == "error"]


def test_decision_over_runs_matches_python_reference(tmp_path, small_row_groups):
    per_run, listing_fp = history(600, 5, seed=1)
    out = str(tmp_path / "out")
    for k, rows in enumerate(per_run):
        publish(out, f"n{k}", rows, k + 1)
    publish(out, "other-model", [(u, "v0", "ok") for u in listing_fp], 9, task="f" * 16)
    todo, info = decide(out, listing_fp, range_entries=100, compact_after=99)
    expect, counts = reference(per_run, listing_fp, [0, 1, 2, 3, 4])
    assert todo.tolist() == expect
    assert {k: info[k] for k in counts} == counts
    assert counts["changed"] > 0 and counts["skipped_unchanged"] > 0 and counts["new"] > 60
    # 1,500 earlier entries in 16 ranges of <= 100: only one range is ever held.
    assert info["ledger_entries"] == 1500 and info["ranges"] == 16
    assert info["max_range_entries"] <= 150 and not info["compacted"]
    # The run being redone is not an earlier run.
    todo, info = decide(out, listing_fp, exclude_run="n4", range_entries=100, compact_after=99)
    assert todo.tolist() == reference(per_run, listing_fp, [0, 1, 2, 3])[0]


def test_decision_memory_is_one_range(tmp_path):
    """4x the earlier entries: 4x the ranges, about the same entries held at once."""
    held = []
    for n in (1000, 4000):
        out = str(tmp_path / f"o{n}")
        publish(out, "a", [(f"/d/{i}.jpg", "f", "ok") for i in range(n)], 1)
        _, info = decide(out, {f"/d/{i}.jpg": "f" for i in range(0, n, 3)}, range_entries=64)
        assert info["skipped_unchanged"] == len(range(0, n, 3))
        held.append((info["ranges"], info["max_range_entries"]))
    (r1, m1), (r4, m4) = held
    assert r4 == 4 * r1 and m1 <= 2 * 64 and m4 <= 2 * 64


def test_compaction_keeps_decisions_and_bounds_ledgers_read(tmp_path, small_row_groups):
    per_run, listing_fp = history(500, 6, seed=2)
    out = str(tmp_path / "out")
    for k in range(3):
        publish(out, f"n{k}", per_run[k], k + 1)
    expect = reference(per_run, listing_fp, [0, 1, 2])
    todo, info = decide(out, listing_fp, range_entries=64, compact_after=3)
    assert (todo.tolist(), {k: info[k] for k in expect[1]}) == expect
    assert info["compacted"] and info["run_ledgers_read"] == 3
    index_dir = tmp_path / "out" / "_index" / f"task={TASK}"
    pointer = json.load(open(index_dir / "_current.json"))
    assert sorted(pointer["covers"]) == ["n0", "n1", "n2"]
    assert len(pointer["files"]) > 2 and pointer["files"][0]["path"].startswith("g-000001-")
    assert all(a["hi"] < b["lo"] for a, b in zip(pointer["files"], pointer["files"][1:]))
    gen = pointer["generation"]
    # The index holds one entry per URI: the newest ok one.
    newest = {}
    for k in range(3):
        newest.update({u: f for u, f, s in per_run[k] if s == "ok"})
    idx = pa.concat_tables([pq.read_table(index_dir / f["path"]) for f in pointer["files"]])
    assert sorted(zip(idx["uri"].to_pylist(), idx["fingerprint"].to_pylist())) == \
        sorted(newest.items())

    # Next night: the index alone, then the index and one newer run; same answers.
    todo, info = decide(out, listing_fp, range_entries=64, compact_after=3)
    assert todo.tolist() == expect[0]
    assert info["index_used"] and info["run_ledgers_read"] == 0 and not info["compacted"]
    publish(out, "n3", per_run[3], 4)
    todo, info = decide(out, listing_fp, range_entries=64, compact_after=3)
    assert todo.tolist() == reference(per_run, listing_fp, [0, 1, 2, 3])[0]
    assert info["index_used"] and info["run_ledgers_read"] == 1
    for k in (4, 5):
        publish(out, f"n{k}", per_run[k], k + 1)
    todo, info = decide(out, listing_fp, range_entries=64, compact_after=3)
    assert todo.tolist() == reference(per_run, listing_fp, list(range(6)))[0]
    assert info["compacted"] and info["run_ledgers_read"] == 3
    assert sorted(os.listdir(index_dir)) == sorted(
        ["_current.json", json.load(open(index_dir / "_current.json"))["generation"]])
    assert gen not in os.listdir(index_dir)  # the older generation is gone

    # An index covering the run being redone is ignored (that run is no earlier run) ...
    todo, info = decide(out, listing_fp, exclude_run="n5", range_entries=64, compact_after=99)
    assert todo.tolist() == reference(per_run, listing_fp, [0, 1, 2, 3, 4])[0]
    assert not info["index_used"] and info["run_ledgers_read"] == 5
    # ... as is one covering a run replaced since (--overwrite publishes a new publish_id).
    per_run[1] = [(u, "rewritten", "ok") for u, _, _ in per_run[1]]
    publish(out, "n1", per_run[1], 2, publish_id="second-publish")
    todo, info = decide(out, listing_fp, range_entries=64, compact_after=99)
    assert todo.tolist() == reference(per_run, listing_fp, list(range(6)))[0]
    assert not info["index_used"] and info["run_ledgers_read"] == 6


def test_old_format_runs_still_decide_and_retry(tmp_path, small_row_groups):
    per_run, listing_fp = history(300, 3, seed=3)
    out = str(tmp_path / "out")
    publish(out, "old0", per_run[0], 1, old_format=True)
    publish(out, "old1", per_run[1], 2, old_format=True)
    publish(out, "new2", per_run[2], 3)
    expect = reference(per_run, listing_fp, [0, 1, 2])
    todo, info = decide(out, listing_fp, range_entries=50, compact_after=99)
    assert (todo.tolist(), {k: info[k] for k in expect[1]}) == expect
    todo, info = decide(out, listing_fp, range_entries=50, compact_after=2)  # absorbed
    assert todo.tolist() == expect[0] and info["compacted"]
    todo, info = decide(out, listing_fp, range_entries=50)
    assert todo.tolist() == expect[0] and info["run_ledgers_read"] == 0
    fs, root = storage.filesystem(out)
    failed = {u for u, _, s in per_run[0] if s == "error"}
    todo, counts = runs.retry_filter(fs, root, "old0", listing_of(listing_fp))
    assert {u for u, t in zip(listing_fp, todo) if t} == failed and failed
    everything = runs.read_ledgers(fs, root, TASK)
    newest = {}
    for rows in per_run:
        newest.update({u: f for u, f, s in rows if s == "ok"})
    assert sorted(zip(everything["uri"].to_pylist(), everything["fingerprint"].to_pylist())) \
        == sorted(newest.items())


def test_decision_and_compaction_on_s3(monkeypatch, small_row_groups):
    """The same on an object store (moto): no folders, the index written through s3fs."""
    from s3_server import moto_s3

    per_run, listing_fp = history(200, 3, seed=4)
    with moto_s3() as s3:
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)
        s3.make_bucket("feats")
        out = "s3://feats/out"
        publish(out, "a", per_run[0], 1, old_format=True)
        publish(out, "b", per_run[1], 2)
        expect = reference(per_run, listing_fp, [0, 1])[0]
        todo, info = decide(out, listing_fp, range_entries=40, compact_after=2)
        assert todo.tolist() == expect and info["compacted"] and info["ranges"] == 8
        publish(out, "c", per_run[2], 3)
        todo, info = decide(out, listing_fp, range_entries=40)
        assert todo.tolist() == reference(per_run, listing_fp, [0, 1, 2])[0]
        assert info["index_used"] and info["run_ledgers_read"] == 1
        fs = s3.fs()
        assert fs.ls("feats/out/_index/task=" + TASK) == [
            f"feats/out/_index/task={TASK}/_current.json",
            f"feats/out/_index/task={TASK}/" + ledger.load_index(fs, "feats/out", TASK)["generation"]]


def test_lookup_for_staged_listings_matches_python_reference(tmp_path, small_row_groups):
    """`incremental_lookup` (what a staged listing's chunks are decided against) gives the
    reference's decision chunk by chunk, compacts as the decision does, and reads the index
    it wrote."""
    per_run, listing_fp = history(400, 5, seed=3)
    out = str(tmp_path / "out")
    for k, rows in enumerate(per_run):
        publish(out, f"n{k}", rows, k + 1)
    fs, root = storage.filesystem(out)
    expect, counts = reference(per_run, listing_fp, [0, 1, 2, 3, 4])
    for round_ in range(2):
        lookup, info = runs.incremental_lookup(fs, root, TASK)
        listing = listing_of(listing_fp)
        got, total = [], {k: 0 for k in counts}
        for start in range(0, listing.num_rows, 97):
            todo, c = lookup.decide(listing.slice(start, 97))
            got += todo.tolist()
            total = {k: total[k] + c[k] for k in total}
        assert (got, total) == (expect, counts)
        assert info["compacted"] == (round_ == 0) and info["index_used"] == (round_ == 1)
