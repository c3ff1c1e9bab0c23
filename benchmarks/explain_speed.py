#!/usr/bin/env python
"""Per-image cost of --task explain methods against the plain forward pass (prints figures).

Random weights on purpose: timing does not depend on the weights' values (said in the output).
Usage: python benchmarks/explain_speed.py --model resnet34 --images 4
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from resnet_features.core.models import resolve_model  # noqa: E402
from resnet_features.extract.inference import InferenceOptions, ModelRunner  # noqa: E402
from resnet_features.extract.outputs import for_task
from resnet_features.extract.outputs.explain import EXPLAIN_METHODS, Explainer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="resnet34")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    spec, state = resolve_model(args.model, "random")
    crop = spec.preprocessing.crop_size
    images = np.random.default_rng(0).integers(0, 256, (args.images, crop, crop, 3), np.uint8)
    runner = ModelRunner(spec, state, InferenceOptions(device=args.device),
                         for_task(spec, "both"))
    runner.forward(images[:1])  # warm-up
    t = time.perf_counter()
    runner.forward(images)
    base = (time.perf_counter() - t) / args.images
    print(f"{args.model} on {args.device}, {args.images} images, RANDOM weights (timing only)")
    print(f"forward (embed+classify): {base * 1000:8.1f} ms/image   1.0x")
    target = np.zeros(args.images, dtype=np.int64)
    for method in EXPLAIN_METHODS:
        ex = Explainer(spec, state, method, args.device)
        ex(images[:1], target[:1])  # warm-up
        t = time.perf_counter()
        ex(images, target)
        per = (time.perf_counter() - t) / args.images
        print(f"{method:24s}: {per * 1000:8.1f} ms/image {per / base:6.1f}x")


if __name__ == "__main__":
    main()
