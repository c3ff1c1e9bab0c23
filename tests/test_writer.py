"""The part writer, without Ray: deterministic parts, explicit schema, error rows, counts."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from resnet_features.core.errors import error_columns
from resnet_features.core.models import resolve_model
from resnet_features.extract.outputs import for_task
from resnet_features.extract.writer import PartWriter


@pytest.fixture(scope="module")
def spec():
    return resolve_model("resnet18", "random")[0]


def listing(n):
    return pa.table({"index": np.arange(n, dtype=np.int64),
                     "uri": [f"/x/{i:03d}.jpg" for i in range(n)],
                     "size_bytes": np.arange(n, dtype=np.int64) * 10,
                     "fingerprint": [f"{i * 10}:mtime:0" for i in range(n)]})


def result_batch(indices, fail=()):
    n = len(indices)
    b = {"index": np.asarray(indices, dtype=np.int64),
         "uri": np.array([f"/x/{i:03d}.jpg" for i in indices], dtype=object),
         "size_bytes": np.asarray(indices, dtype=np.int64) * 10,
         "width": np.full(n, 10, np.int32), "height": np.full(n, 20, np.int32),
         "embedding": np.tile(np.asarray(indices, np.float32)[:, None], (1, 512)),
         "topk_ids": np.tile(np.arange(5, dtype=np.int32), (n, 1)),
         "topk_scores": np.tile(np.linspace(0.5, 0.1, 5, dtype=np.float32), (n, 1))}
    b.update(error_columns(n))
    for j, i in enumerate(indices):
        if i in fail:
            b["error_stage"][j], b["error_type"][j], b["error_message"][j] = "decode", "E", "bad"
    return b


def test_parts_by_index_whatever_the_arrival_order(spec, tmp_path):
    w = PartWriter(str(tmp_path), units=for_task(spec, "both"), listing=listing(10), rows_per_file=4,
                   file_metadata={"model": "resnet18"})
    w.add(result_batch([9, 1, 5]))
    assert w.stats.data_files == []  # no part complete yet
    w.add(result_batch([0, 2, 3], fail={2}))
    assert w.stats.data_files == ["part-00000.parquet"]
    w.add(result_batch([8, 4, 6, 7]))
    assert w.missing_indices() == []
    w.close()
    assert sorted(w.stats.data_files) == [f"part-0000{i}.parquet" for i in range(3)]
    t0 = pq.read_table(tmp_path / "part-00000.parquet")
    assert t0.column("uri").to_pylist() == ["/x/000.jpg", "/x/001.jpg", "/x/003.jpg"]
    assert t0.schema.field("embedding").type == pa.list_(pa.float32(), 512)
    assert t0.column("topk_labels")[0].as_py()[0] == spec.categories[0]
    assert json.loads(t0.schema.metadata[b"resnet_features"]) == {"model": "resnet18"}
    err = pq.read_table(tmp_path / "_errors" / "part-00000.parquet").to_pylist()
    assert err == [{"uri": "/x/002.jpg", "stage": "decode", "error_type": "E", "message": "bad",
                    "size_bytes": 20}]
    assert (w.stats.succeeded, w.stats.failed) == (9, 1)
    assert not (tmp_path / "_staging").exists()


def test_error_rows_carry_the_size_the_reader_found(spec, tmp_path):
    """Parquet cells and manifest entries are listed with size 0; the reader's size wins."""
    w = PartWriter(str(tmp_path), units=for_task(spec, "embed"), listing=listing(2), rows_per_file=2,
                   file_metadata={})
    batch = result_batch([0, 1], fail={1})
    batch["size_bytes"] = np.array([0, 12345], dtype=np.int64)
    w.add(batch)
    w.close()
    err = pq.read_table(tmp_path / "_errors" / "part-00000.parquet")
    assert err.column("size_bytes").to_pylist() == [12345]


def test_missing_rows_are_reported_not_dropped(spec, tmp_path):
    w = PartWriter(str(tmp_path), units=for_task(spec, "embed"), listing=listing(5), rows_per_file=4,
                   file_metadata={})
    w.add(result_batch([0, 1, 3, 4]))
    assert w.missing_indices() == [2]


def test_task_decides_columns(spec, tmp_path):
    w = PartWriter(str(tmp_path), units=for_task(spec, "classify"), listing=listing(2),
                   rows_per_file=4, file_metadata={})
    w.add(result_batch([0, 1]))
    names = pq.read_table(tmp_path / "part-00000.parquet").schema.names
    assert names == ["uri", "topk_ids", "topk_labels", "topk_scores", "width", "height"]
