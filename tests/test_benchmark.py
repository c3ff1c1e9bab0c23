"""The benchmark's own pieces, tiny: its corpus has the promised sizes and its decode section
runs and reports every variant (the figures themselves come from `benchmarks/run.py`)."""

from __future__ import annotations

import os
import sys

import pytest
from helpers import ROOT
from PIL import Image

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import run as bench  # noqa: E402


def test_corpus_and_decode_section(tmp_path):
    corpus = bench.make_corpus(str(tmp_path), n_imagenet=3, n_large=1)
    for p in corpus["imagenet"]:
        with Image.open(p) as im:
            assert im.format == "JPEG" and 330 <= min(im.size) and max(im.size) <= 640
    with Image.open(corpus["large"][0]) as im:
        assert sorted(im.size) == [3024, 4032]
    sets = {"imagenet": bench.read_all(corpus["imagenet"]),
            "large_12mp": bench.read_all(corpus["large"])}
    variants = bench.decode_variants("resnet18", 2.0)
    out = bench.bench_decode(sets, variants, rounds=1)
    for kind in sets:
        assert set(out[kind]["images_per_cpu_s"]) == set(variants)
        assert out[kind]["speedup_vs_usual"]["usual_pil_totensor_transforms"] == 1.0
        assert all(v > 0 for v in out[kind]["images_per_cpu_s"].values())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_node_harness_on_cpu(tmp_path):
    """benchmarks/gpu_node.py's node run, tiny and on the CPU (where "nvJPEG" is libjpeg): every
    image comes back through decode processes + deferred decode + model, and both decode paths
    agree with eager torchvision on the reference transforms."""
    import json
    import subprocess

    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_node.py"), "--smoke",
                    "--skip-model", "--node-model", "resnet18", "--configs", "1:0.5,1:0:nomodel",
                    "--workdir", str(tmp_path), "--json", str(out)], check=True, timeout=600,
                   capture_output=True)
    node = json.loads(out.read_text())["node"]
    assert node["fidelity"]["nvjpeg_pixels_mean_abs_diff"] < 0.1
    for path in ("cpu_decode", "nvjpeg"):
        assert node["fidelity"][path]["cosine_min"] > 0.999, node["fidelity"]
    for run in node["runs"]:
        assert run["images"] == 24 and run["errors"] == 0 and run["images_per_s"] > 0


def test_e2e_window_figures_from_the_actor_log(tmp_path):
    """The end-to-end rates come from the model actor's own log: three calls of 8 images,
    ready 4.5 s into a run that lasted 8.5 s."""
    log = tmp_path / "e2e.log"
    log.write_text("10 11 8\n11 12 8\n12 13 8\n")
    (tmp_path / "e2e.log.ready").write_text("9.5\n")
    fig = bench._window_figures(str(log), 24, started=5.0, ended=13.5)
    assert fig["images_per_s_wall"] == round(24 / 8.5, 2)
    assert fig["model_ready_after_s"] == 4.5
    assert fig["images_per_s_after_ready"] == 6.0  # 24 images in the 4 s after ready
    assert fig["images_per_s_busy"] == 8.0  # 24 images from first call start to last end
    assert fig["images_per_s_warm"] == 8.0  # 16 images after the first call, in 2 s


def test_fidelity_yardstick_is_the_reference_plus_invisible_noise(tmp_path, resnet18_weights):
    """The sensitivity row rebuilds the reference's own uint8 pixels (no noise: the same
    embeddings) and then moves 5% of them by one grey level (a lower, finite cosine)."""
    import numpy as np
    import torch

    corpus = bench.make_corpus(str(tmp_path), n_imagenet=2, n_large=0)
    datas = bench.read_all(corpus["imagenet"])
    variants = bench.decode_variants("resnet18", 2.0)
    embed = bench._reference_model("resnet18", resnet18_weights)
    batches = [torch.stack([variants["reference_weights_transforms"](d) for d in datas])]
    ref = embed(batches[0])
    prep = bench.Preprocessing.from_weights(bench.get_model_weights("resnet18").DEFAULT)
    same = bench._sensitivity(embed, batches, ref, prep, fraction=0.0)
    noisy = bench._sensitivity(embed, batches, ref, prep, fraction=0.05)
    assert same["cosine_min"] > 0.99999
    assert 0.9 < noisy["cosine_min"] < same["cosine_min"]
    assert np.isfinite(noisy["cosine_mean"])


def test_writer_benchmark_accounts_for_every_row():
    """bench_writer's pieces, tiny: every row is committed once through the real sink, and the
    driver's share stays the records (bytes per input independent of the output columns)."""
    import bench_writer

    small = bench_writer.run_case("both", 600, 1)
    layers = bench_writer.run_case("both+layers", 600, 1)
    assert small["rows"] == layers["rows"] == 600 and small["parts"] >= 1
    assert layers["bytes_written"] > 2 * small["bytes_written"]
    assert 8 <= small["driver_bytes_per_input"] <= 256
    assert abs(small["driver_bytes_per_input"] - layers["driver_bytes_per_input"]) < 2
