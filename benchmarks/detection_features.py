"""Bytes per image and images/s of the detection outputs (grid maps, region features) against
the pooled embedding, on the same corpus: Decode + ModelRunner + the units' encode + a zstd
Parquet write, in one process (no Ray), as docs/detection-features.md reports them.

    PYTHONPATH=. .venv/bin/python benchmarks/detection_features.py --images 8 [--device cuda]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from resnet_features.core.models import resolve_model
from resnet_features.core.samples import write_samples
from resnet_features.extract.backbone import stage_channels
from resnet_features.extract.decode import Decode, DecodeOptions
from resnet_features.extract.geometry import AspectGeometry
from resnet_features.extract.inference import InferenceOptions, ModelRunner
from resnet_features.extract.outputs import Embedding
from resnet_features.extract.outputs.grid import Grid
from resnet_features.extract.outputs.regions import Regions


def random_boxes(rng, k: int, w: int, h: int) -> str:
    x1, y1 = rng.uniform(0, w * 0.7, k), rng.uniform(0, h * 0.7, k)
    bw, bh = rng.uniform(0.1, 0.3, k) * w, rng.uniform(0.1, 0.3, k) * h
    return json.dumps(np.stack([x1, y1, np.minimum(x1 + bw, w), np.minimum(y1 + bh, h)],
                               1).round(1).tolist())


def measure(name, spec, state, options, units, decode_options, batch, repeats) -> dict:
    runner = ModelRunner(spec, state, options, outputs=units)
    decode = Decode(spec.preprocessing, decode_options)
    runner(decode({k: v[:1] for k, v in batch.items()}))  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = runner(decode(dict(batch)))
    if options.device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / repeats
    cols = {"uri": pa.array(out["uri"].astype(str))}
    for unit in units:
        cols.update(unit.encode(out, "part-00000"))
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf, compression="zstd")
    n = len(batch["uri"])
    return {"output": name, "images_per_s": round(n / seconds, 2),
            "bytes_per_image": int(len(buf.getvalue()) / n)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--weights", default="random", help="random, or a state_dict path")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--size", type=int, default=448, help="--resize-short of the grid/regions")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    spec, state = resolve_model(args.model, args.weights)
    folder = tempfile.mkdtemp()
    paths = write_samples(folder, count=args.images, seed=3)
    from PIL import Image

    sizes = [Image.open(q).size for q in paths]
    rng = np.random.default_rng(0)
    datas = np.array([open(q, "rb").read() for q in paths], dtype=object)
    base = {"uri": np.array(paths, dtype=object), "index": np.arange(len(paths)),
            "bytes": datas}
    options = InferenceOptions(device=args.device)
    c = stage_channels(spec.embedding_dim)
    geometry = AspectGeometry(args.size, None, 32)
    aspect = DecodeOptions(aspect=geometry)
    load_at_start = round(os.getloadavg()[0], 1)
    rows = [measure(f"pooled embedding (crop {spec.preprocessing.crop_size})", spec, state,
                    options, (Embedding(spec.embedding_dim),), DecodeOptions(), base,
                    args.repeats),
            measure(f"grid layer4 at {args.size} (float16)", spec, state, options,
                    (Grid({"layer4": c["layer4"]}, geometry),), aspect, base, args.repeats)]
    for k in (36, 100):
        batch = {**base, "boxes_in": np.array([random_boxes(rng, k, w, h) for w, h in sizes],
                                              dtype=object)}
        for dtype in ("float16", "float32"):
            rows.append(measure(f"regions {k} boxes at {args.size} ({dtype})", spec, state,
                                options, (Regions("layer4", c["layer4"], dtype),), aspect,
                                batch, args.repeats))
    report = {"model": args.model, "weights": args.weights, "images": args.images,
              "device": args.device, "torch_threads": torch.get_num_threads(),
              "cpus": os.cpu_count(), "load_average_1min_at_start": load_at_start,
              "load_average_1min_at_end": round(os.getloadavg()[0], 1),
              "note": "one process, no Ray; images/s include decode + model + encode; on a "
              "shared machine the load average says how loaded it was", "rows": rows}
    print(json.dumps(report, indent=2))
    os.makedirs("benchmarks", exist_ok=True)
    with open(f"benchmarks/results_detection_{args.device}.json", "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
