"""End to end on local Ray: a Parquet input with a boxes column and per-box labels (real
objects pasted at known boxes into real photos) -> grid and region columns that DuckDB,
Polars and load_detection_features read, and a linear probe on the region features (rows =
boxes) that tells the objects apart well above chance."""

from __future__ import annotations

import glob
import io
import json
import os

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from resnet_features.core.config import config_from_args, get_args_parser
from resnet_features.core.models import resolve_model
from resnet_features.core.samples import pasted_scene
from resnet_features.extract.pipeline import run
from resnet_features.runs import protocol
from resnet_features.runs.catalog import load_detection_features
from resnet_features.tools import probe

pytestmark = pytest.mark.slow

BACKGROUNDS = ("rocket", "camera", "coins", "brick", "grass", "gravel", "moon", "clock")


def make_input(folder: str, n: int = 24, seed: int = 0) -> str:
    """n scenes (200 x 150) with two or three pasted objects each, at random known boxes (one
    touching the right border per scene); Parquet with columns image, boxes, box_labels."""
    rng = np.random.default_rng(seed)
    rows = {"image": [], "boxes": [], "box_labels": []}
    for i in range(n):
        placements, boxes, labels = [], [], []
        slots = [(0, 0), (70, 0), (0, 75), (70, 75)]
        for k in rng.permutation(4)[:2 + i % 2]:
            sx, sy = slots[k]
            size = int(rng.integers(48, 66))
            x1 = sx + int(rng.integers(0, 70 - size + 60)) if k % 2 else sx
            x1 = min(x1, 200 - size)
            y1 = sy + int(rng.integers(0, max(1, 75 - size)))
            name = ("cat", "cup")[int(rng.integers(0, 2))]
            box = (x1, y1, x1 + size, min(y1 + size, 150))
            placements.append((name, *box))
            boxes.append([float(v) for v in box])
            labels.append(name)
        img = pasted_scene(BACKGROUNDS[i % len(BACKGROUNDS)], (200, 150), placements)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=92)
        rows["image"].append(buf.getvalue())
        rows["boxes"].append(boxes)
        rows["box_labels"].append(labels)
    rows["image"][-1] = b"not an image"  # a decode error row among them
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "scenes.parquet")
    pq.write_table(pa.table(rows), path)
    return path


def test_regions_and_grid_end_to_end(resnet18_weights, ray_local, tmp_path):
    make_input(str(tmp_path / "in"))
    out = str(tmp_path / "out")
    argv = ["--input", str(tmp_path / "in"), "--output", out, "--model", "resnet18",
            "--weights", resnet18_weights, "--task", "embed", "--grid", "layer3,layer4",
            "--resize-short", "128", "--boxes-column", "boxes", "--keep-columns", "box_labels",
            "--max-error-rate", "0.1"]
    cfg = config_from_args(get_args_parser().parse_args([*argv, "--run-id", "r"]))
    result = run(cfg)
    assert result.exit_code == 0, result.reason
    s = result.summary
    assert (s["succeeded"], s["failed"]) == (23, 1)
    assert s["grid"]["layers"] == {"layer3": 256, "layer4": 512}
    assert s["regions"]["layer"] == "layer4"
    parts = glob.glob(os.path.join(out, "run=r", "*.parquet"))
    db = duckdb.sql(f"select uri, len(boxes) as k, len(region_features) as r, grid_layer4_h, "
                    f"grid_layer4_w, len(grid_layer4) as g from read_parquet({parts!r}) "
                    "order by uri").fetchall()
    assert len(db) == 23
    assert all(k == r and k in (2, 3) for _, k, r, *_ in db)
    assert all(g == h * w * 512 for *_, h, w, g in db)
    assert {(h, w) for *_, h, w, _ in db} == {(4, 5)}  # 200x150 -> 171x128 -> 160x128
    frame = pl.read_parquet(parts)
    assert frame.height == 23
    assert frame["region_features"].list.len().to_list() == [len(b) for b in frame["boxes"]]
    assert frame.schema["grid_layer4"] == pl.List(pl.Float16) or "16" in str(
        frame.schema["grid_layer4"])
    features = load_detection_features(out, grid=("layer4",))
    assert features["grid_layer4"][0].shape == (4, 5, 512)
    assert features["region_features"][0].dtype == np.float16
    assert all(b.shape[0] == f.shape[0] for b, f in zip(features["boxes"],
                                                        features["region_features"]))
    first = json.loads(json.dumps(features["boxes"][0].tolist()))
    assert all(0 <= x1 < x2 <= 200 and 0 <= y1 < y2 <= 150 for x1, y1, x2, y2 in first)

    uris, x, labels = probe.load_labelled(out, "column:box_labels", column="region_features")
    assert len(uris) == x.shape[0] == sum(k for _, k, *_ in db) and x.shape[1] == 512
    y = np.array([sorted(set(labels)).index(v) for v in labels])
    train, val = probe.stratified_split(y, 0.3, seed=0)
    head = probe.train_head(x[train], y[train], 2, epochs=200)
    acc = probe.evaluate(head, x[val], y[val], sorted(set(labels)))["accuracy"]
    chance = np.bincount(y[val]).max() / len(val)
    assert acc >= max(0.8, chance + 0.2), (acc, chance)

    # --incremental: the same detection flags reuse the rows; another geometry does not.
    same = config_from_args(get_args_parser().parse_args([*argv, "--run-id", "r2",
                                                          "--incremental"]))
    assert same.resize_short == 128
    fp = result.summary["task_fingerprint"]
    plain = protocol.fingerprint_of(protocol.task_identity(
        resolve_model("resnet18", resnet18_weights)[0], "embed", 5))
    assert fp != plain
    again = run(same)
    assert again.summary["computed"] == 1  # only the decode error row is retried
