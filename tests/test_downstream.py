"""Downstream tools on the job's own output: k-NN retrieval, FAISS, linear probe, --head, --layers.

One Ray job extracts the image set (the output the tools read); the --head/--layers extraction
runs on the job's stages without Ray (`helpers.run_stages`), where its numbers are made.

The image set is built from real photographs: each source photo is a class, and its copies
are augmented (crop, flip, JPEG re-encode, colour jitter). Features come from BN-calibrated
test weights (no pretrained download), so augmentations are kept moderate: with random conv
filters strong colour jitter moves features more than it would with ImageNet weights.
"""

from __future__ import annotations

import glob
import io
import json
import os

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from helpers import cosine, make_cfg, publish_table, run_stages
from PIL import Image, ImageEnhance, ImageOps
from torchvision.models import get_model_builder, get_model_weights

from resnet_features.core.samples import load_photo
from resnet_features.extract.outputs import units_metadata
from resnet_features.runs.catalog import load_features
from resnet_features.tools import probe, search

SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
           "immunohistochemistry", "retina", "camera", "coins", "brick", "clock")


def _augment(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    if kind == "crop":
        s = rng.uniform(0.85, 0.95)
        cw, ch = int(w * s), int(h * s)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return img.crop((x, y, x + cw, y + ch))
    if kind == "flip":
        return ImageOps.mirror(img)
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(25, 50)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "jitter":
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.9, 1.1))
        img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.9, 1.1))
        return ImageEnhance.Color(img).enhance(rng.uniform(0.9, 1.1))
    raise ValueError(kind)


COPIES = (("crop", "crop"), ("crop2", "crop"), ("flip", "flip"), ("flipcrop", "flip+crop"),
          ("jpeg", "jpeg"), ("jpeg2", "jpeg"), ("jitter", "jitter"), ("jitter2", "jitter"))


def make_augmented_set(root: str, seed: int = 1) -> str:
    """<class>/source.png and <class>/<kind>.png: 11 classes x (1 source + 8 augmented copies).

    With BN-calibrated random weights, retrieval is not perfectly robust: with seed 0 one of
    the 88 copies (an 85-95% crop of "astronaut") retrieves "camera"; seeds 1 and 2 have none.
    """
    rng = np.random.default_rng(seed)
    for name in SOURCES:
        img = Image.fromarray(load_photo(name)).convert("RGB")
        img.thumbnail((256, 256))
        os.makedirs(os.path.join(root, name))
        img.save(os.path.join(root, name, "source.png"))
        for fname, kinds in COPIES:
            out = img
            for kind in kinds.split("+"):
                out = _augment(out, kind, rng)
            out.save(os.path.join(root, name, f"{fname}.png"))
    return root


RUN = "run=t"  # every extraction here uses --run-id t: its files land in OUTPUT/run=t/


def _split_output(output: str, dest: str, keep) -> str:
    """An output holding only the rows whose uri satisfies `keep`, as one finished run with the
    source run's summary."""
    table = load_features(output).drop_columns(["run"])
    mask = [keep(u) for u in table.column("uri").to_pylist()]
    with open(os.path.join(output, RUN, "_summary.json")) as f:
        summary = json.load(f)
    return publish_table(dest, "t", [table.filter(mask)], summary)


def _is_source(uri: str) -> bool:
    return os.path.basename(uri) == "source.png"


@pytest.fixture(scope="module")
def augmented(tmp_path_factory, resnet18_weights, ray_local):
    """The image set, its extraction output (resnet18 embeddings) and sources/copies subsets."""
    root = str(tmp_path_factory.mktemp("augmented"))
    images = make_augmented_set(os.path.join(root, "images"))
    out = os.path.join(root, "out")
    from resnet_features.extract.pipeline import run

    result = run(make_cfg("--input", images, "--output", out, "--model", "resnet18",
                          "--weights", resnet18_weights, "--task", "embed",
                          "--rows-per-file", "40", run_id="t"))
    assert result.exit_code == 0, result.reason
    return {"images": images, "weights": resnet18_weights, "out": out,
            "out_sources": _split_output(out, os.path.join(root, "sources"), _is_source),
            "out_copies": _split_output(out, os.path.join(root, "copies"),
                                        lambda u: not _is_source(u))}


def _class_of(uri: str) -> str:
    return os.path.basename(os.path.dirname(uri))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_default_schema_unchanged(augmented):
    names = pads.dataset(augmented["out"], format="parquet").schema.names
    assert names == ["uri", "embedding", "width", "height"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_each_copy_finds_its_source(augmented, tmp_path):
    """CLI: copies (from their output) as queries against the sources' output."""
    out = str(tmp_path / "nn.parquet")
    assert search.main(["--index", augmented["out_sources"], "--query-output",
                        augmented["out_copies"], "--out", out, "-k", "3"]) == 0
    table = pq.read_table(out).to_pylist()
    top1 = {r["query"]: r for r in table if r["rank"] == 1}
    assert len(top1) == len(SOURCES) * len(COPIES)
    wrong = {q: r["neighbor_uri"] for q, r in top1.items()
             if _class_of(r["neighbor_uri"]) != _class_of(q)}
    assert not wrong, wrong
    assert all(_is_source(r["neighbor_uri"]) for r in top1.values())
    by_query: dict[str, list] = {}
    for r in table:
        by_query.setdefault(r["query"], []).append(r)
    for rows in by_query.values():
        assert [r["rank"] for r in rows] == [1, 2, 3]
        assert rows[0]["score"] >= rows[1]["score"] >= rows[2]["score"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_image_queries_exact_and_faiss_agree(augmented, tmp_path):
    """Query *images* (embedded from the summary's model/preprocessing) against the copies."""
    results = {}
    for method in ("exact", "faiss"):
        out = str(tmp_path / f"{method}.jsonl")
        assert search.main(["--index", augmented["out_copies"], "--query",
                            *glob.glob(os.path.join(augmented["images"], "*", "source.png")),
                            "--out", out, "-k", "5", "--method", method,
                            "--nprobe", "3"]) == 0
        rows = [json.loads(line) for line in open(out)]
        results[method] = {r["query"]: r["neighbor_uri"] for r in rows if r["rank"] == 1}
    exact, approx = results["exact"], results["faiss"]
    assert len(exact) == len(SOURCES)
    assert all(_class_of(n) == _class_of(q) for q, n in exact.items()), exact
    agree = np.mean([approx[q] == exact[q] for q in exact])
    assert agree >= 0.95, (approx, exact)

    # The query images were embedded on the driver exactly as the job embedded them.
    uris, stored = search.read_embeddings(augmented["out_sources"])
    fresh = search.embed_images(list(uris), search.read_summary(augmented["out_sources"]))
    assert cosine(fresh, stored).min() > 0.9999


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_exact_search_streaming_matches_numpy(metric):
    """Running top-k over small chunks == one full numpy sort (independent reference)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(257, 16)).astype(np.float32)
    q = rng.normal(size=(9, 16)).astype(np.float32)
    uris = np.array([f"u{i}" for i in range(len(x))], dtype=object)
    chunks = ((uris[i:i + 20], x[i:i + 20]) for i in range(0, len(x), 20))
    res = search.exact_search(q, chunks, k=7, metric=metric)
    if metric == "cosine":
        s = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
            x / np.linalg.norm(x, axis=1, keepdims=True)).T
        order = np.argsort(-s, axis=1)[:, :7]
    else:
        s = ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        order = np.argsort(s, axis=1)[:, :7]
    assert (res.uris == uris[order]).all()
    np.testing.assert_allclose(res.scores, np.take_along_axis(s, order, 1), rtol=1e-4,
                               atol=1e-3)


def test_faiss_agrees_with_exact_on_clustered_data(tmp_path):
    """IVF on 4000 clustered vectors: top-1 agrees with exact search for >= 95% of queries."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(40, 64)).astype(np.float32)
    x = (centres[rng.integers(0, 40, 4000)] + 0.3 * rng.normal(size=(4000, 64))).astype(
        np.float32)
    q = (x[rng.choice(4000, 200, replace=False)]
         + 0.05 * rng.normal(size=(200, 64))).astype(np.float32)
    import pyarrow as pa

    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 64)
    table = pa.table({"uri": [f"img{i}.jpg" for i in range(4000)], "embedding": emb})
    # several files, as the job writes them
    publish_table(str(tmp_path / "out"), "t", [table.slice(i * 1000, 1000) for i in range(4)], {})
    ds = search.open_output(str(tmp_path / "out"))
    exact = search.exact_search(q, search.iter_embeddings(ds, batch_rows=512), k=10)
    approx = search.faiss_search(q, ds, k=10)
    assert (approx.uris[:, 0] == exact.uris[:, 0]).mean() >= 0.95


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_linear_probe_then_head_and_layers_in_extract(augmented, tmp_path):
    """Classes = source photos (folder names); the probe beats chance by far, and
    `extract --head` (the job's stages, no Ray) reproduces its validation accuracy in the same
    pass as `--layers`, whose pooled stage outputs equal forward hooks on eager torchvision."""
    probe_dir = str(tmp_path / "probe")
    assert probe.main(["--input", augmented["out"], "--out", probe_dir]) == 0
    metrics = json.load(open(os.path.join(probe_dir, "metrics.json")))
    assert sorted(metrics["classes"]) == sorted(SOURCES)
    assert metrics["n_val"] == 2 * len(SOURCES)  # stratified: round(25% of 9) per class
    assert all(v["support"] == 2 for v in metrics["per_class"].values())
    assert metrics["val_accuracy"] >= 0.7, metrics  # chance: 1/11
    conf = np.array(metrics["confusion"])
    assert conf.sum() == metrics["n_val"]
    assert np.trace(conf) / conf.sum() == pytest.approx(metrics["val_accuracy"])
    # truth from the folder names, independently of the probe's own label reading
    assert metrics["val_labels"] == [_class_of(u) for u in metrics["val_uris"]]
    with Image.open(os.path.join(probe_dir, "confusion.png")) as im:
        assert im.format == "PNG" and im.width > 100

    stages = run_stages(make_cfg(
        "--input", augmented["images"], "--output", "unused", "--model", "resnet18",
        "--weights", augmented["weights"], "--task", "embed",
        "--head", os.path.join(probe_dir, "head.pt"), "--layers", "layer3,layer1"),
        str(tmp_path / "with_head"))
    table = stages.rows
    assert table.schema.names == ["uri", "embedding", "layer1", "layer3", "head_label",
                                  "head_score", "width", "height"]
    predicted = dict(zip(table.column("uri").to_pylist(), table.column("head_label").to_pylist()))
    acc = np.mean([predicted[u] == lab
                   for u, lab in zip(metrics["val_uris"], metrics["val_labels"])])
    assert acc == pytest.approx(metrics["val_accuracy"])
    summary = units_metadata(stages.units)  # the summary's entries of the units
    assert summary["head"]["classes"] == metrics["classes"]
    assert summary["layers"] == {"layer1": 64, "layer3": 256}

    # --layers against forward hooks on eager torchvision (first 12 images)
    assert table.schema.field("layer1").type.list_size == 64
    assert table.schema.field("layer3").type.list_size == 256
    model = get_model_builder("resnet18")(weights=None)
    model.load_state_dict(torch.load(augmented["weights"], weights_only=True))
    model.eval()
    grabbed = {}
    for name in ("layer1", "layer3"):
        getattr(model, name).register_forward_hook(
            lambda m, i, o, name=name: grabbed.setdefault(name, []).append(o.mean(dim=(2, 3))))
    transform = get_model_weights("resnet18").DEFAULT.transforms()
    paths = table.column("uri").to_pylist()[:12]
    with torch.no_grad():
        for p in paths:
            with Image.open(p) as im:
                model(transform(im.convert("RGB")).unsqueeze(0))
    for name in ("layer1", "layer3"):
        got = np.stack(table.column(name).to_numpy(zero_copy_only=False)[:12])
        assert cosine(got, torch.cat(grabbed[name]).numpy()).min() > 0.999, name


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_head_from_other_model_is_refused(augmented, tmp_path):
    """A head fits one embedding space: a resnet34 head on a resnet18 run is a usage error."""
    head = probe.Head(512, 2)
    probe.save_head(head, ["a", "b"], str(tmp_path / "h.pt"),
                    {"model": "resnet34", "weights": "x"})
    from resnet_features.cli import main

    assert main(["--input", augmented["images"], "--output", str(tmp_path / "o"),
                 "--model", "resnet18", "--weights", augmented["weights"],
                 "--head", str(tmp_path / "h.pt")]) == 2
    assert not os.path.exists(tmp_path / "o")  # refused before any output is prepared
