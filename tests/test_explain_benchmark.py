"""jobs/explain_benchmark.py with your own images and a boxes file, run as the CLI: the
localisation figures for the user boxes are what the maps give inside boxes whose place on the
model crop is worked out here by hand (64-px images: resized x4 to 256, centre crop 224)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT
from PIL import Image

from resnet_features.core.samples import load_photo

METHODS = ("gradcam",)  # one method: each one costs two job runs (trained, randomised)
TOP1 = 7  # the test weights' classifier is biased to this class (one randomisation job)


def _photo(name: str, w: int, h: int) -> Image.Image:
    return Image.fromarray(load_photo(name)).convert("RGB").resize((w, h))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_user_boxes_through_the_cli(tmp_path, resnet18_weights, ray_address):
    images = tmp_path / "images"
    images.mkdir()
    # whole.png, 64 x 64: the box is the whole image -> the whole crop
    _photo("astronaut", 64, 64).save(images / "whole.png")
    # left.png, 64 x 64: x < 28 -> crop x < 28 * 4 - 16 = 96, the first 3 columns of cells
    _photo("coffee", 64, 64).save(images / "left.png")
    # rotated.jpg: stored 96 x 64 with EXIF orientation 6, so the job sees it upright at
    # 64 x 96 (resize x4 to 256 x 384, crop top 80): y < 44 -> crop y < 96 (rows 0-2) and
    # y >= 60 -> crop y >= 160 (rows 5-6); two rows of the file are two objects (their union).
    # Read unrotated (96 x 64), the same boxes would land elsewhere on the crop.
    exif = Image.Exif()
    exif[0x0112] = 6
    _photo("chelsea", 64, 96).transpose(Image.Transpose.ROTATE_90).save(
        images / "rotated.jpg", exif=exif, quality=95)
    boxes = images / "boxes.csv"
    boxes.write_text("file,x0,y0,x1,y1\nwhole.png,0,0,64,64\nleft.png,0,0,28,64\n"
                     "rotated.jpg,0,0,64,44\nrotated.jpg,0,60,64,96\n")
    inside = {"user-whole.png": np.ones((7, 7), bool),
              "user-left.png": np.zeros((7, 7), bool), "user-rotated.jpg": np.zeros((7, 7), bool)}
    inside["user-left.png"][:, :3] = True
    inside["user-rotated.jpg"][[0, 1, 2, 5, 6]] = True

    state = torch.load(resnet18_weights, weights_only=True)
    state["fc.bias"][TOP1] += 100.0  # same top-1 everywhere; the maps still come from fc.weight
    weights = tmp_path / "resnet18_top1.pth"
    torch.save(state, weights)

    out = tmp_path / "out"
    # the leftovers of an earlier benchmark in the scratch output: the job would refuse them
    # (or take a finished run for a no-op); the benchmark starts each job on a clean output
    stale = out / "work" / "resnet18" / METHODS[0] / "trained" / "run=bench"
    stale.mkdir(parents=True)
    (stale / "part-00000.parquet").write_bytes(b"not from this benchmark")
    env = {**os.environ, "PYTHONPATH": ROOT, "RAY_ADDRESS": ray_address}  # the session's Ray
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "jobs", "explain_benchmark.py"), "--models",
         "resnet18", "--weights", f"resnet18={weights}", "--methods", ",".join(METHODS),
         "--images", str(images), "--boxes", str(boxes), "--builtin", "0", "--steps", "7",
         "--cost-images", "1", "--examples", "1", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    r = json.loads((out / "results.json").read_text())["results"]["resnet18"]
    table = (out / "table.md").read_text()
    assert (out / "figure.png").stat().st_size > 0
    assert {n for n, im in r["images"].items() if im["set"] == "user"} == set(inside)
    assert (r["images"]["user-rotated.jpg"]["width"],
            r["images"]["user-rotated.jpg"]["height"]) == (64, 96)
    # chance level (a uniform map's share): the box's share of the 224 x 224 crop
    area = {"user-whole.png": 1.0, "user-left.png": 96 / 224, "user-rotated.jpg": 160 / 224}
    for name, a in area.items():
        assert r["images"][name]["box_area"] == pytest.approx(a)
    chance = next(line for line in table.splitlines() if "(uniform map = box area)" in line)
    assert [c.strip() for c in chance.split("|")][7] == f"{np.mean(list(area.values())):.3f}"
    for m in METHODS:
        s = r["methods"][m]
        shares, hits = [], []
        for name, cells in inside.items():
            one = s["per_image"][name]
            assert one["class"] == TOP1
            hm = np.asarray(one["map"], np.float64).reshape(7, 7)
            assert hm.max() == 1.0  # a real map, scaled by its peak
            share = hm[cells].sum() / hm.sum()
            hit = bool(cells.flat[int(hm.argmax())])  # box edges on cell edges: 15 px adds none
            assert one["share"] == pytest.approx(share, abs=1e-6), (m, name)
            assert one["hit"] is hit, (m, name)
            shares.append(share)
            hits.append(hit)
        assert s["per_image"]["user-whole.png"]["share"] == pytest.approx(1.0)
        assert s["per_image"]["user-whole.png"]["hit"] is True
        assert s["user_scored"] == 3 and s["builtin_scored"] == 0
        assert s["user_share"] == pytest.approx(np.mean(shares))
        assert s["user_hit"] == pytest.approx(np.mean(hits))
        assert s["builtin_share"] is None
        assert s["randomisation_corr"] == pytest.approx(
            np.mean([one["randomisation_corr"] for one in s["per_image"].values()]))
        assert r["cost_cpu"][m]["ratio"] == pytest.approx(
            r["cost_cpu"][m]["ms"] / r["cost_cpu"]["forward"]["ms"])
        row = next(line for line in table.splitlines() if f"| resnet18 | {m} |" in line)
        cols = [c.strip() for c in row.split("|")]
        assert cols[5:7] == ["–", "–"]  # no built-in scenes
        assert cols[7] == f"{np.mean(shares):.3f}" and cols[8] == f"{np.mean(hits):.2f}"
