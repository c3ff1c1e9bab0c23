"""The write path without Ray: the sink that writes and commits a part where the rows are, the
driver's commit log (records only), and the protocol step that keeps every input once."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from resnet_features.core.errors import error_columns
from resnet_features.core.models import resolve_model
from resnet_features.extract.outputs import for_task
from resnet_features.extract.writer import CommitLog, PartSink, PartWriter, part_name
from resnet_features.runs import protocol


@pytest.fixture(scope="module")
def spec():
    return resolve_model("resnet18", "random")[0]


def result_batch(indices, fail=(), value=None):
    n = len(indices)
    idx = np.asarray(indices, dtype=np.int64)
    b = {"index": idx,
         "uri": np.array([f"/x/{i:03d}.jpg" for i in indices], dtype=object),
         "fingerprint": np.array([f"{i * 10}:mtime:0" for i in indices], dtype=object),
         "size_bytes": idx * 10,
         "width": np.full(n, 10, np.int32), "height": np.full(n, 20, np.int32),
         "embedding": np.tile((idx if value is None else np.full(n, value))
                              .astype(np.float32)[:, None], (1, 512)),
         "topk_ids": np.tile(np.arange(5, dtype=np.int32), (n, 1)),
         "topk_scores": np.tile(np.linspace(0.5, 0.1, 5, dtype=np.float32), (n, 1)),
         "_t_model": np.full(n, 0.25), "_node_model": np.full(n, "gpu-node", dtype=object)}
    b.update(error_columns(n))
    for j, i in enumerate(indices):
        if i in fail:
            b["error_stage"][j], b["error_type"][j], b["error_message"][j] = "decode", "E", "bad"
    return b


def test_a_part_is_its_rows_sorted_with_errors_beside_and_a_ledger_fragment(spec, tmp_path):
    sink = PartSink(str(tmp_path), units=for_task(spec, "both"),
                    file_metadata={"model": "resnet18"})
    sink = pickle.loads(pickle.dumps(sink))  # it travels to the write tasks
    rec = sink(result_batch([3, 1, 2, 0], fail={2}))
    name = part_name(np.array([0, 1, 2, 3]))
    assert rec["part"][0] == name == part_name(np.array([3, 2, 1, 0]))  # order-free
    t = pq.read_table(tmp_path / name)
    assert t.column("uri").to_pylist() == ["/x/000.jpg", "/x/001.jpg", "/x/003.jpg"]
    assert t.column("embedding")[2].as_py()[0] == 3.0  # rows stay with their values
    assert t.schema.field("embedding").type == pa.list_(pa.float32(), 512)
    assert t.column("topk_labels")[0].as_py()[0] == spec.categories[0]
    assert json.loads(t.schema.metadata[b"resnet_features"]) == {"model": "resnet18"}
    err = pq.read_table(tmp_path / "_errors" / name).to_pylist()
    assert err == [{"uri": "/x/002.jpg", "stage": "decode", "error_type": "E", "message": "bad",
                    "size_bytes": 20}]
    ledger = pq.read_table(tmp_path / "_ledger" / name).to_pylist()
    assert [(r["uri"], r["fingerprint"], r["status"], r["file"]) for r in ledger] == [
        ("/x/000.jpg", "0:mtime:0", "ok", name), ("/x/001.jpg", "10:mtime:0", "ok", name),
        ("/x/002.jpg", "20:mtime:0", "error", f"_errors/{name}"),
        ("/x/003.jpg", "30:mtime:0", "ok", name)]
    assert not os.listdir(tmp_path / "_tmp")  # every file renamed into place
    # The record is all the driver gets: a few hundred bytes per part, ~9 per input.
    log = CommitLog(4)
    records = pa.table(rec)
    assert log.add(records) == 4
    assert records.nbytes < 400
    assert (log.succeeded, log.failed, log.failed_by_stage()) == (3, 1, {"decode": 1})
    assert log.data_files == [name] and log.error_files == [f"_errors/{name}"]
    assert log.nodes["model"] == {"gpu-node"} and log.busy_seconds["model"] == 1.0
    assert log.missing_indices() == []


def test_each_part_names_the_node_that_wrote_it(spec, tmp_path):
    """The pipeline's write task sets the sink's node (its Ray node id): the data and error
    files of each part carry it as `writer_node` beside the run's metadata, and the record as
    `node_write`; the ledger fragment is the commit, not a data file, and does not."""
    sink = PartSink(str(tmp_path), units=for_task(spec, "embed"),
                    file_metadata={"model": "resnet18"})
    sink = pickle.loads(pickle.dumps(sink))
    sink.node = "a1" * 28
    rec = sink(result_batch([0, 1], fail={1}))
    name = rec["part"][0]
    for rel in (name, f"_errors/{name}"):
        meta = pq.read_schema(tmp_path / rel).metadata[b"resnet_features"]
        assert json.loads(meta) == {"model": "resnet18", "writer_node": "a1" * 28}, rel
    assert rec["node_write"][0] == "a1" * 28
    sink.node = "b2" * 28  # the next task ran elsewhere
    rec = sink(result_batch([2]))
    meta = pq.read_schema(tmp_path / rec["part"][0]).metadata[b"resnet_features"]
    assert json.loads(meta)["writer_node"] == "b2" * 28


def test_a_retried_write_of_the_same_rows_replaces_its_part(spec, tmp_path):
    sink = PartSink(str(tmp_path), units=for_task(spec, "embed"), file_metadata={}, attempt=2)
    log = CommitLog(6)
    first = pa.table(sink(result_batch([0, 1, 2])))
    again = pa.table(sink(result_batch([2, 1, 0, 1])))  # a row repeated inside the batch too
    assert first["part"][0].as_py() == again["part"][0].as_py()
    assert first["part"][0].as_py().startswith("part-a2-000000000-")
    log.add(first)
    log.add(again)
    assert log.done == 3 and log.parts == [first["part"][0].as_py()]
    assert log.duplicates_dropped == 4  # 3 from the same-named part, 1 within the batch
    assert sorted(os.listdir(tmp_path / "_ledger")) == [first["part"][0].as_py()]
    assert log.missing_indices() == [3, 4, 5]  # never came back: reported, not dropped


def test_carried_columns_follow_the_listing_index(spec, tmp_path):
    extra = pa.table({"label": ["a", "b", "c"]})
    w = PartWriter(str(tmp_path), units=for_task(spec, "embed"), n_inputs=3, file_metadata={},
                   extra=extra)
    w.add(result_batch([2, 0]))
    t = pq.read_table(tmp_path / w.log.data_files[0])
    assert t.column("label").to_pylist() == ["a", "c"]


def test_task_decides_columns(spec, tmp_path):
    w = PartWriter(str(tmp_path), units=for_task(spec, "classify"), n_inputs=2, file_metadata={})
    w.add(result_batch([0, 1]))
    names = pq.read_table(tmp_path / w.log.data_files[0]).schema.names
    assert names == ["uri", "topk_ids", "topk_labels", "topk_scores", "width", "height"]


def test_overlapping_parts_are_made_disjoint_before_anything_counts(spec, tmp_path):
    """A retry that grouped rows differently commits a second part repeating some inputs: the
    protocol keeps the bigger part whole and rewrites the other without the repeats, so every
    input is committed (and published) exactly once, with its error rows."""
    fs, root = protocol.storage.filesystem(str(tmp_path))
    layout = protocol.RunLayout(fs, root, "r")
    layout.start_attempt("fp", fresh=False)
    w = PartWriter(layout.staging_uri(), units=for_task(spec, "embed"), n_inputs=6,
                   file_metadata={})
    w.add(result_batch([0, 1, 2, 3], value=1.0))
    w.add(result_batch([2, 3, 4], fail={4}, value=2.0))  # repeats 2 and 3
    w.add(result_batch([3, 5], value=3.0))  # repeats 3 only
    assert w.log.overlapping_parts == 2 and w.log.missing_indices() == []
    ledger = layout.reconcile()
    assert sorted(ledger["uri"].to_pylist()) == [f"/x/{i:03d}.jpg" for i in range(6)]
    staging = tmp_path / "_staging" / "run=r"
    rows = pa.concat_tables([pq.read_table(staging / f, columns=["uri", "embedding"])
                             for f in os.listdir(staging) if f.startswith("part-")])
    values = {r["uri"]: r["embedding"][0] for r in rows.to_pylist()}
    assert values == {"/x/000.jpg": 1.0, "/x/001.jpg": 1.0, "/x/002.jpg": 1.0,
                      "/x/003.jpg": 1.0, "/x/005.jpg": 3.0}
    errors = [pq.read_table(staging / "_errors" / f).column("uri").to_pylist()
              for f in os.listdir(staging / "_errors")]
    assert errors == [["/x/004.jpg"]]
    assert layout.reconcile().num_rows == 6  # settled: nothing left to rewrite
