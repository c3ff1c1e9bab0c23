"""The job's numbers against an independent reference (eager torchvision + weights.transforms()).

The pyramid: the numerics live in the job's stages, so they are checked Ray-free (the stages
called in this process, `helpers.run_stages`) against eager torchvision, for the deeper models;
one small Ray job (resnet18) then proves that the job writes exactly what those stages compute,
row for row, with its summary, file layout, Arrow types and a deterministic second run.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from helpers import cosine, make_cfg, reference_outputs, run_stages


def read_rows(output: str) -> pa.Table:
    return pads.dataset(output, format="parquet").to_table().sort_by("uri")


def _column(table: pa.Table, name: str) -> np.ndarray:
    return np.stack(table.column(name).to_numpy(zero_copy_only=False))


@pytest.mark.slow  # no Ray, but ResNet-34/50 on 16 photos (and their calibration): heavy
@pytest.mark.timeout(600)
@pytest.mark.parametrize("model", ["resnet34", "resnet50"])
def test_stages_match_eager_torchvision(model, photos, calibrated, tmp_path):
    """ReadBytes -> Decode -> ModelRunner -> PartWriter (no Ray) on 16 real photos: embeddings,
    top-1 classes and top-1 probabilities equal eager torchvision's on weights.transforms().
    (ResNet-18's numbers against torchvision are in the fast tier: test_robustness's valid
    unusual files, test_s3's formats.)"""
    weights = calibrated(model)
    stages = run_stages(make_cfg("--input", photos, "--output", "unused", "--model", model,
                                 "--weights", weights, "--rows-per-file", "20"),
                        str(tmp_path / "out"))
    table = stages.rows
    paths = sorted(glob.glob(os.path.join(photos, "*")))
    assert len(paths) == 16
    assert table.column("uri").to_pylist() == paths
    assert stages.errors is None and stages.stats.failed == 0
    ref_emb, ref_ids, ref_probs = reference_outputs(model, weights, paths)

    cos = cosine(_column(table, "embedding"), ref_emb)
    assert cos.mean() >= 0.999, cos
    assert cos.min() >= 0.99, cos
    ids = _column(table, "topk_ids")
    top1 = (ids[:, 0] == ref_ids[:, 0]).mean()
    assert top1 >= 0.97, (ids[:, 0], ref_ids[:, 0])
    scores = _column(table, "topk_scores")
    assert np.all(np.diff(scores, axis=1) <= 0), "top-k scores must be descending"
    # Probabilities, not just ranks: a softmax or ordering bug moves them far more than this.
    np.testing.assert_allclose(scores[:, 0], ref_probs[:, 0], atol=0.03)


@pytest.fixture(scope="module")
def job_a(few_photos, resnet18_weights, ray_local, tmp_path_factory):
    """The real Ray job, resnet18 on 6 photos, in 2 part files and 2 model batches."""
    from resnet_features.extract.pipeline import run

    out = str(tmp_path_factory.mktemp("job") / "a")
    result = run(make_cfg("--input", few_photos, "--output", out, "--model", "resnet18",
                          "--weights", resnet18_weights, "--rows-per-file", "4",
                          "--batch-size", "4", run_id="r"))
    assert result.exit_code == 0, result.reason
    return out, result


JOB_ARGS = ("--model", "resnet18", "--rows-per-file", "4", "--batch-size", "4")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_job_writes_what_the_stages_compute(job_a, few_photos, resnet18_weights, tmp_path):
    """The Ray job's rows equal the Ray-free stages' rows, row for row (so the numerics checked
    on the stages above are the job's), and its summary and file layout are the documented
    ones."""
    out, result = job_a
    job = read_rows(out)
    stages = run_stages(make_cfg("--input", few_photos, "--output", "unused", *JOB_ARGS,
                                 "--weights", resnet18_weights), str(tmp_path / "stages")).rows
    assert job.column("uri").to_pylist() == stages.column("uri").to_pylist()
    assert job.num_rows == len(os.listdir(few_photos)) == 6
    for name in ("width", "height"):
        assert job.column(name).equals(stages.column(name))
    np.testing.assert_allclose(_column(job, "embedding"), _column(stages, "embedding"),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_column(job, "topk_scores"), _column(stages, "topk_scores"),
                               atol=1e-5)
    job_ids, stage_ids = _column(job, "topk_ids"), _column(stages, "topk_ids")
    scores = _column(stages, "topk_scores")
    # ids must agree wherever a score is not tied with a neighbour's within float noise
    gaps = np.abs(np.diff(scores, axis=1)) > 1e-4
    edge = np.ones((len(scores), 1), dtype=bool)
    distinct = np.hstack([edge, gaps]) & np.hstack([gaps, edge])
    assert (job_ids[distinct] == stage_ids[distinct]).all(), (job_ids, stage_ids)

    summary = json.loads(open(os.path.join(out, "run=r", "_SUCCESS")).read())
    assert summary["inputs"] == 6 == summary["succeeded"] + summary["failed"]
    assert summary["failed"] == 0 and summary["lost"] == 0
    assert summary["weights"].startswith("sha256:")
    # Parts are written where the rows are, at most --rows-per-file rows each, sorted by uri
    # within a part; together they hold every input once.
    sizes = [pq.read_metadata(os.path.join(out, "run=r", f)).num_rows for f in summary["files"]]
    assert len(sizes) >= 2 and max(sizes) <= 4 and sum(sizes) == 6
    for f in summary["files"]:
        uris = pq.read_table(os.path.join(out, "run=r", f), columns=["uri"])["uri"].to_pylist()
        assert uris == sorted(uris)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_output_types_and_readers(job_a):
    """Standard Arrow types only, readable as one dataset by pyarrow, DuckDB and Polars."""
    out, _ = job_a
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


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_second_run_gives_same_rows(job_a, few_photos, resnet18_weights, tmp_path):
    """A second run of the same job on another output gives the same table, bit for bit, and
    the same run folder layout."""
    from resnet_features.extract.pipeline import run

    out_a, _ = job_a
    out_b = str(tmp_path / "b")
    assert run(make_cfg("--input", few_photos, "--output", out_b, *JOB_ARGS,
                        "--weights", resnet18_weights, run_id="r")).exit_code == 0
    for out in (out_a, out_b):
        assert sorted(os.listdir(out)) == ["run=r"]
        files = sorted(os.listdir(os.path.join(out, "run=r")))
        assert files[:5] == ["_SUCCESS", "_errors", "_ledger", "_manifest.json",
                             "_summary.json"]
        # Content-named parts of at most --rows-per-file rows, written by the write tasks.
        assert files[5:] and all(f.startswith("part-a0-") for f in files[5:]), files
    assert read_rows(out_a).equals(read_rows(out_b))
