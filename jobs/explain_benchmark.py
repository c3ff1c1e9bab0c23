#!/usr/bin/env python
"""Which explanation to trust: every --explain-method on the same images, per model, scored for
faithfulness (deletion / insertion AUC), localisation (box share, pointing game), the
model-parameter randomisation check and cost. Maps come from the real job (Ray), metrics from
resnet_features.tools.explain_metrics. Writes a Markdown table, JSON and a PNG figure.

    python jobs/explain_benchmark.py --models resnet34,resnet50 --weights resnet34=DEFAULT \\
        --weights resnet50=DEFAULT --images my_photos/ --boxes my_boxes.csv --out bench/

docs/explanations.md describes each measure.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from resnet_features import load_features  # noqa: E402
from resnet_features.core.config import config_from_args, get_args_parser  # noqa: E402
from resnet_features.core.models import build_model, resolve_model  # noqa: E402
from resnet_features.core.vocab import EXPLAIN_METHODS  # noqa: E402
from resnet_features.extract.decode import DecodedImage, DecodeOptions, decode_image  # noqa: E402
from resnet_features.extract.inference import InferenceOptions, ModelRunner  # noqa: E402
from resnet_features.extract.outputs import for_task  # noqa: E402
from resnet_features.extract.outputs.explain import Explainer  # noqa: E402
from resnet_features.extract.outputs.explain_png import overlay_png  # noqa: E402
from resnet_features.extract.pipeline import run  # noqa: E402
from resnet_features.tools import explain_metrics as em  # noqa: E402
from resnet_features.tools.explain_scenes import (  # noqa: E402
    crop_box,
    fit_object_head,
    photo_scene,
    read_boxes,
    write_scenes,
)

log = logging.getLogger("explain_benchmark")
OBJECT_CLASS = 1  # the class of --object-head


def get_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet34,resnet50")
    p.add_argument("--weights", action="append", default=[], metavar="MODEL=WEIGHTS",
                   help="per model: a torchvision weights name (DEFAULT, IMAGENET1K_V1) or a "
                   "state_dict path (default DEFAULT)")
    p.add_argument("--methods", default=",".join(EXPLAIN_METHODS))
    p.add_argument("--images", help="a folder of your own images, scored with --boxes")
    p.add_argument("--boxes", help="CSV file,x0,y0,x1,y1 for --images: pixels of the image as "
                   "displayed (EXIF orientation applied), x1/y1 exclusive; several rows for one "
                   "file = several objects")
    p.add_argument("--builtin", type=int, default=8,
                   help="built-in scenes: a real object pasted into real photos at known boxes")
    p.add_argument("--object-head", action="store_true",
                   help="test weights: replace each model's classifier by a detector of the "
                   "built-in object (fitted on other scenes) and explain its class")
    p.add_argument("--steps", type=int, default=None,
                   help="deletion/insertion steps (default: one per grid cell)")
    p.add_argument("--randomise", default="layer4,fc",
                   help="top stages re-initialised for the randomisation check")
    p.add_argument("--sanity-threshold", type=float, default=0.5,
                   help="a method fails the randomisation check when its maps' mean rank "
                   "correlation with the randomised model's is above this")
    p.add_argument("--cost-images", type=int, default=4)
    p.add_argument("--examples", type=int, default=2, help="example images in the figure")
    p.add_argument("--out", required=True, help="folder for table.md, results.json, figure.png")
    p.add_argument("--work", help="scratch folder (default OUT/work)")
    p.add_argument("--figure", help="also copy the figure here (e.g. docs/explain_benchmark.png)")
    return p.parse_args()


def job_maps(inputs: str, output: str, model: str, weights: str, method: str,
             explain_class: int | None) -> dict[str, tuple[np.ndarray, int]]:
    """Run the job (--task classify,explain) and read its maps back: file name -> (map, class).

    `output` is scratch: it is emptied first, since the job would take a finished run of the
    same id for a no-op and hand back the maps of an earlier benchmark."""
    shutil.rmtree(output, ignore_errors=True)
    args = ["--input", inputs, "--output", output, "--model", model, "--weights", weights,
            "--task", "classify,explain", "--explain-method", method, "--run-id", "bench"]
    if explain_class is not None:
        args += ["--explain-class", str(explain_class)]
    result = run(config_from_args(get_args_parser().parse_args(args)))
    if result.exit_code != 0:
        raise RuntimeError(f"the job failed for {model}/{method}: {result.reason}")
    table = load_features(output, run="bench", columns=["uri", "explain_map", "explain_class"])
    maps = {os.path.basename(r["uri"]): (np.asarray(r["explain_map"], np.float32),
                                         int(r["explain_class"]))
            for r in table.to_pylist()}
    missing = sorted(set(os.listdir(inputs)) - set(maps))
    if missing:  # error rows (an image the job could not read) are not in the table
        raise RuntimeError(f"the job gave no map for {len(missing)} image(s) for {model}/{method}"
                           f" ({', '.join(missing[:10])}); its error rows say why: "
                           f"{output}/run=bench/_errors/; fix or remove those images")
    return maps


def decode_inputs(folder: str, names, spec) -> dict[str, DecodedImage]:
    """Each input as the job's decode stage sees it: the model crop (uint8) and the image's
    size after its EXIF orientation, the frame boxes are given in."""
    options = DecodeOptions()
    out = {}
    for n in names:
        with open(os.path.join(folder, n), "rb") as f:
            data = f.read()
        try:
            out[n] = decode_image(data, spec.preprocessing, options)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise SystemExit(f"{n.removeprefix('user-')}: the job cannot read it ({e}); fix or "
                             "remove it") from None
    return out


def cost(spec, state, methods: list[str], crops: np.ndarray, device: str) -> dict[str, dict]:
    """ms per image of each method and its ratio to the plain forward pass (in process), both
    as the job runs them (the forward pass under the job's autocast on GPU)."""
    def timed(fn) -> float:
        # CUDA runs asynchronously: without a sync the clock stops before the kernels do
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        fn(crops[:1])  # warm-up
        sync()
        t = time.perf_counter()
        fn(crops)
        sync()
        return (time.perf_counter() - t) / len(crops)

    runner = ModelRunner(spec, state, InferenceOptions(device=device), for_task(spec, "both"))
    base = timed(runner.forward)
    out = {"forward": {"ms": 1000 * base, "ratio": 1.0}}
    for m in methods:
        ex = Explainer(spec, state, m, device)
        per = timed(lambda c, ex=ex: ex(c, np.zeros(len(c))))
        out[m] = {"ms": 1000 * per, "ratio": per / base}
    return out


def bench_model(model: str, weights: str, methods: list[str], args, work: str,
                user_boxes: dict) -> dict:
    spec, state = resolve_model(model, weights)
    if args.object_head:
        path = os.path.join(work, f"{model}_object_head.pth")
        if state is None:
            raise SystemExit("--object-head needs weights to put the head on")
        backbone = os.path.join(work, f"{model}_backbone.pth")
        torch.save(state, backbone)
        if os.path.exists(path):  # fit_object_head keeps an existing file: an earlier backbone's
            os.remove(path)
        weights = fit_object_head(model, backbone, path,
                                  lambda rng, i: photo_scene(rng, bool(i % 4)),
                                  seed=1000, min_accuracy=0.5)
        spec, state = resolve_model(model, weights)
    net = build_model(spec, state).eval()
    crop_size, resize = spec.preprocessing.crop_size, spec.preprocessing.resize_size

    inputs = os.path.join(work, model, "inputs")
    shutil.rmtree(inputs, ignore_errors=True)
    boxes = {name: ("builtin", [b]) for name, b in write_scenes(inputs, args.builtin).items()}
    os.remove(os.path.join(inputs, "boxes.csv"))
    for name, bs in user_boxes.items():
        shutil.copy(os.path.join(args.images, name), os.path.join(inputs, f"user-{name}"))
        boxes[f"user-{name}"] = ("user", bs)

    rand_path = os.path.join(work, f"{model}_randomised.pth")
    torch.save(em.randomised_state_dict(net, args.randomise.split(",")), rand_path)
    explain_class = OBJECT_CLASS if args.object_head else None

    decoded = decode_inputs(inputs, sorted(boxes), spec)
    crops = {n: d.pixels for n, d in decoded.items()}
    mean = torch.tensor(spec.preprocessing.mean).view(3, 1, 1)
    std = torch.tensor(spec.preprocessing.std).view(3, 1, 1)
    xs = {n: (torch.from_numpy(c).permute(2, 0, 1).float() / 255 - mean) / std
          for n, c in crops.items()}
    # the boxes on the model crop; one that misses the crop (the object was cut off by the
    # centre crop) cannot be localised by any map, so it is left out of the localisation means
    images = {}
    for n, (kind, bs) in boxes.items():
        d = decoded[n]
        cbs = [crop_box(b, d.width, d.height, resize, crop_size) for b in bs]
        cbs = [b for b in cbs if b[2] > b[0] and b[3] > b[1]]
        images[n] = {"set": kind, "width": d.width, "height": d.height, "boxes": bs,
                     "crop_boxes": cbs,
                     # the box share of a uniform map: the chance level of the box share
                     "box_area": em.box_area(cbs, crop_size) if cbs else None}
        if not cbs:
            log.warning("%s: its box(es) lie outside the %d-px centre crop; left out of the "
                        "localisation scores", n, crop_size)

    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(net(x), 1)

    result = {"weights": weights, "images": images, "methods": {}}
    examples = sorted(boxes)[:args.examples]
    for method in methods:
        t0 = time.perf_counter()
        maps = job_maps(inputs, os.path.join(work, model, method, "trained"), model, weights,
                        method, explain_class)
        # the randomised model explains the same class per image (one job per class)
        rand_maps = {}
        for cls in sorted({c for _, c in maps.values()}):
            folder = os.path.join(work, model, method, f"rand-in-{cls}")
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            for n, (_, c) in maps.items():
                if c == cls:
                    shutil.copy(os.path.join(inputs, n), folder)
            rand_maps.update(job_maps(folder, os.path.join(work, model, method, f"rand-{cls}"),
                                      model, rand_path, method, cls))
        job_s = time.perf_counter() - t0
        per_image = {}
        for n in sorted(maps):
            hm, cls = maps[n]
            x = xs[n]
            dele = em.perturbation_curve(predict, x, hm, cls, "deletion", torch.zeros_like(x),
                                         args.steps)
            ins = em.perturbation_curve(predict, x, hm, cls, "insertion", _blur(x), args.steps)
            cbs = images[n]["crop_boxes"]
            per_image[n] = {
                "class": cls, "map": hm.tolist(),
                "deletion_curve": dele.tolist(), "insertion_curve": ins.tolist(),
                "deletion_auc": em.auc(dele), "insertion_auc": em.auc(ins),
                "share": em.relevance_in_box(hm, cbs, crop_size) if cbs else None,
                "hit": em.pointing_game(hm, cbs, crop_size) if cbs else None,
                "randomisation_corr": em.rank_correlation(hm, rand_maps[n][0]),
            }
        rows = per_image.values()
        dele = np.mean([r["deletion_curve"] for r in rows], 0)
        ins = np.mean([r["insertion_curve"] for r in rows], 0)
        corr = float(np.mean([r["randomisation_corr"] for r in rows]))
        loc = {}
        for kind in ("builtin", "user"):
            scored = [r for n, r in per_image.items()
                      if images[n]["set"] == kind and r["share"] is not None]
            loc[f"{kind}_share"] = float(np.mean([r["share"] for r in scored])) if scored else None
            loc[f"{kind}_hit"] = float(np.mean([r["hit"] for r in scored])) if scored else None
            loc[f"{kind}_scored"] = len(scored)
        result["methods"][method] = {
            "deletion_auc": em.auc(dele), "insertion_auc": em.auc(ins),
            "deletion_curve": dele.tolist(), "insertion_curve": ins.tolist(), **loc,
            "randomisation_corr": corr, "randomisation_pass": corr <= args.sanity_threshold,
            "job_seconds": job_s, "examples": examples, "per_image": per_image,
        }
        log.info("%s %s done in %.0f s", model, method, job_s)
    cost_crops = np.stack([np.asarray(crops[n]) for n in sorted(crops)[:args.cost_images]])
    result["cost_cpu"] = cost(spec, state, methods, cost_crops, "cpu")
    result["cost_gpu"] = (cost(spec, state, methods, cost_crops, "cuda")
                          if torch.cuda.is_available() else None)
    result["gpu_name"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    result["example_crops"] = {n: np.asarray(crops[n]) for n in examples}
    return result


def _blur(x: torch.Tensor) -> torch.Tensor:
    """The insertion start: the image blurred beyond recognition (Petsiuk et al. 2018)."""
    from torchvision.transforms.functional import gaussian_blur

    return gaussian_blur(x, [51, 51], [16.0, 16.0])


def table(results: dict, methods: list[str]) -> str:
    head = ("| model | method | deletion AUC ↓ | insertion AUC ↑ | box share (built-in) ↑ "
            "| pointing (built-in) ↑ | box share (yours) ↑ | pointing (yours) ↑ "
            "| randomisation ρ ↓ | ms/img CPU | × forward | ms/img GPU |")
    lines = [head, "|" + "---|" * 12]

    def f(v, fmt="{:.3f}"):
        return "–" if v is None else fmt.format(v)

    for model, r in results.items():
        for m in methods:
            s = r["methods"][m]
            gpu = r["cost_gpu"][m]["ms"] if r["cost_gpu"] else None
            verdict = "pass" if s["randomisation_pass"] else "FAIL"
            lines.append(
                f"| {model} | {m} | {f(s['deletion_auc'])} | {f(s['insertion_auc'])} "
                f"| {f(s['builtin_share'])} | {f(s['builtin_hit'], '{:.2f}')} "
                f"| {f(s['user_share'])} | {f(s['user_hit'], '{:.2f}')} "
                f"| {s['randomisation_corr']:.2f} ({verdict}) "
                f"| {r['cost_cpu'][m]['ms']:.0f} | {r['cost_cpu'][m]['ratio']:.1f} "
                f"| {f(gpu, '{:.1f}') if gpu is not None else 'not measured'} |")
        chance = {}
        for kind in ("builtin", "user"):
            areas = [im["box_area"] for im in r["images"].values()
                     if im["set"] == kind and im["box_area"] is not None]
            chance[kind] = float(np.mean(areas)) if areas else None
        lines.append(f"| {model} | (uniform map = box area) | | | {f(chance['builtin'])} | "
                     f"| {f(chance['user'])} | | | | | |")
        lines.append(f"| {model} | (forward pass) | | | | | | | "
                     f"| {r['cost_cpu']['forward']['ms']:.0f} | 1.0 | |")
    return "\n".join(lines)


def figure(results: dict, methods: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_ex = max(len(r["example_crops"]) for r in results.values())
    cols = 2 + len(methods)
    rows = len(results) * max(n_ex, 1)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 1.9 * rows), squeeze=False)
    for i, (model, r) in enumerate(results.items()):
        for j, name in enumerate(sorted(r["example_crops"])):
            row = axes[i * n_ex + j]
            if j == 0:
                for ax, kind in zip(row[:2], ("deletion", "insertion")):
                    for m in methods:
                        c = r["methods"][m][f"{kind}_curve"]
                        ax.plot(np.linspace(0, 1, len(c)), c, label=m)
                    ax.set_title(f"{model}: {kind}", fontsize=7)
                    ax.set_xlabel("share of cells", fontsize=6)
                    ax.tick_params(labelsize=5)
                row[0].set_ylabel("p(class)", fontsize=6)
                row[0].legend(fontsize=5)
            else:
                row[0].axis("off")
                row[1].axis("off")
            for ax, m in zip(row[2:], methods):
                hm = np.asarray(r["methods"][m]["per_image"][name]["map"], np.float32)
                png = overlay_png(r["example_crops"][name], hm)
                ax.imshow(Image.open(io.BytesIO(png)))
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_title(m, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = get_args()
    models = args.models.split(",")
    methods = args.methods.split(",")
    unknown = set(methods) - set(EXPLAIN_METHODS)
    if unknown:
        raise SystemExit(f"unknown --methods {sorted(unknown)}; choose from {EXPLAIN_METHODS}")
    weights = dict(w.split("=", 1) for w in args.weights)
    user_boxes = {}
    if args.images or args.boxes:
        if not (args.images and args.boxes):
            raise SystemExit("--images and --boxes go together")
        try:
            user_boxes = read_boxes(args.boxes)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        missing = sorted(n for n in user_boxes if not os.path.isfile(os.path.join(args.images, n)))
        if missing:
            raise SystemExit(f"{args.boxes} names {len(missing)} file(s) not in {args.images}: "
                             f"{', '.join(missing[:10])}")
        if not user_boxes:
            raise SystemExit(f"{args.boxes} lists no boxes")
        unboxed = len(set(os.listdir(args.images)) - set(user_boxes) - {os.path.basename(args.boxes)})
        if unboxed:
            log.info("%d file(s) in %s have no box and are left out", unboxed, args.images)
    work = args.work or os.path.join(args.out, "work")
    os.makedirs(work, exist_ok=True)
    results = {m: bench_model(m, weights.get(m, "DEFAULT"), methods, args, work, user_boxes)
               for m in models}
    md = table(results, methods)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(md + "\n")
    fig_path = os.path.join(args.out, "figure.png")
    figure(results, methods, fig_path)
    if args.figure:
        shutil.copy(fig_path, args.figure)
    for r in results.values():
        r.pop("example_crops")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
