"""The job's output against an independent reference: eager torchvision + weights.transforms()."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from helpers import cosine, reference_outputs

from resnet_features.core.config import config_from_args, get_args_parser
from resnet_features.extract.pipeline import run

pytestmark = pytest.mark.slow


def make_cfg(*argv: str):
    return config_from_args(get_args_parser().parse_args(list(argv)))


def read_rows(output: str) -> pa.Table:
    return pads.dataset(output, format="parquet").to_table().sort_by("uri")


@pytest.mark.parametrize("model", ["resnet34", "resnet50"])
def test_job_matches_eager_torchvision(model, photos, calibrated, ray_local, tmp_path):
    weights = calibrated(model)
    out = str(tmp_path / "out")
    result = run(make_cfg("--input", photos, "--output", out, "--model", model,
                          "--weights", weights, "--rows-per-file", "20", "--run-id", "r"))
    assert result.exit_code == 0, result.reason
    table = read_rows(out)
    paths = sorted(glob.glob(os.path.join(photos, "*")))
    assert len(paths) >= 30
    assert table.column("uri").to_pylist() == paths
    ref_emb, ref_ids, ref_probs = reference_outputs(model, weights, paths)

    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    cos = cosine(emb, ref_emb)
    assert cos.mean() >= 0.999, cos
    assert cos.min() >= 0.99, cos
    ids = np.stack(table.column("topk_ids").to_numpy(zero_copy_only=False))
    top1 = (ids[:, 0] == ref_ids[:, 0]).mean()
    assert top1 >= 0.97, (ids[:, 0], ref_ids[:, 0])
    scores = np.stack(table.column("topk_scores").to_numpy(zero_copy_only=False))
    assert np.all(np.diff(scores, axis=1) <= 0), "top-k scores must be descending"
    # Probabilities, not just ranks: a softmax or ordering bug moves them far more than this.
    np.testing.assert_allclose(scores[:, 0], ref_probs[:, 0], atol=0.03)

    summary = json.loads(open(os.path.join(out, "run=r", "_SUCCESS")).read())
    assert summary["inputs"] == len(paths) == summary["succeeded"] + summary["failed"]
    assert summary["failed"] == 0
    assert summary["weights"].startswith("sha256:")
    # Parts are written where the rows are, at most --rows-per-file rows each, sorted by uri
    # within a part; together they hold every input once.
    sizes = [pq.read_metadata(os.path.join(out, "run=r", f)).num_rows for f in summary["files"]]
    assert len(sizes) >= 2 and max(sizes) <= 20 and sum(sizes) == len(paths)
    for f in summary["files"]:
        uris = pq.read_table(os.path.join(out, "run=r", f), columns=["uri"])["uri"].to_pylist()
        assert uris == sorted(uris)


def test_output_types_and_readers(few_photos, resnet18_weights, ray_local, tmp_path):
    """Standard Arrow types only, readable as one dataset by pyarrow, DuckDB and Polars."""
    out = str(tmp_path / "out")
    result = run(make_cfg("--input", few_photos, "--output", out, "--model", "resnet18",
                          "--weights", resnet18_weights, "--rows-per-file", "4"))
    assert result.exit_code == 0
    schema = pads.dataset(out, format="parquet").schema
    assert schema.field("embedding").type == pa.list_(pa.float32(), 512)
    assert schema.field("topk_ids").type == pa.list_(pa.int32())
    assert schema.field("topk_labels").type == pa.list_(pa.string())
    assert schema.field("topk_scores").type == pa.list_(pa.float32())
    assert schema.field("width").type == pa.int32()
    assert schema.field("height").type == pa.int32()
    assert not isinstance(schema.field("embedding").type, pa.ExtensionType)
    meta = json.loads(schema.metadata[b"resnet_features"])
    assert meta["model"] == "resnet18" and meta["weights"].startswith("sha256:")
    assert meta["precision"] == "fp32" and meta["package_version"]

    import duckdb
    import polars as pl

    n, dim, label = duckdb.sql(
        f"select count(*), max(len(embedding)), max(topk_labels[1]) "
        f"from read_parquet('{out}/run=*/*.parquet', hive_partitioning=true)").fetchall()[0]
    assert n == 6 and dim == 512 and isinstance(label, str)
    df = pl.read_parquet(f"{out}/run=*/*.parquet")
    assert df.height == 6 and df.schema["embedding"] == pl.Array(pl.Float32, 512)


def test_second_run_gives_same_rows(few_photos, resnet18_weights, ray_local, tmp_path):
    tables = []
    for name in ("a", "b"):
        out = str(tmp_path / name)
        assert run(make_cfg("--input", few_photos, "--output", out, "--model", "resnet18",
                            "--weights", resnet18_weights, "--run-id", "r")).exit_code == 0
        tables.append(read_rows(out))
        assert sorted(os.listdir(out)) == ["run=r"]
        files = sorted(os.listdir(os.path.join(out, "run=r")))
        assert files[:5] == ["_SUCCESS", "_errors", "_ledger", "_manifest.json",
                             "_summary.json"]
        assert len(files) == 6 and files[5].startswith("part-a0-000000000-")
    assert tables[0].equals(tables[1])
