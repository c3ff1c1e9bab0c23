"""Sample photos for the demo and the tests, written from scikit-image's bundled data (no network)."""

from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image

__all__ = ["PHOTO_NAMES", "load_photo", "write_samples"]

log = logging.getLogger(__name__)

#: Real photographs shipped inside scikit-image (colour first, then greyscale).
PHOTO_NAMES: tuple[str, ...] = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
    "retina", "camera", "coins", "moon", "grass", "gravel", "brick", "clock",
)


def load_photo(name: str) -> np.ndarray:
    """One scikit-image photo as uint8 (H, W, 3) or (H, W)."""
    import skimage.data

    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = skimage.data.stereo_motorcycle()
        return left if name == "motorcycle_left" else right
    return np.asarray(getattr(skimage.data, name)())


def write_samples(folder: str, count: int = 24, seed: int = 0) -> list[str]:
    """Write `count` varied JPEG/PNG/WebP photos (crops and rescales of real photos) to `folder`."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    names = list(PHOTO_NAMES) + ["motorcycle_left", "motorcycle_right"]
    paths = []
    for i in range(count):
        name = names[i % len(names)]
        arr = load_photo(name)
        h, w = arr.shape[:2]
        if i >= len(names):  # later rounds: a random crop, so no two files are alike
            ch, cw = int(h * rng.uniform(0.5, 0.9)), int(w * rng.uniform(0.5, 0.9))
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            arr = arr[y:y + ch, x:x + cw]
        img = Image.fromarray(arr)
        # ImageNet-like sizes: the long side anywhere from 160 to 1000 pixels.
        scale = rng.uniform(160, 1000) / max(img.size)
        img = img.resize((max(16, int(img.width * scale)), max(16, int(img.height * scale))))
        ext = ("jpg", "png", "webp")[i % 3]
        path = os.path.join(folder, f"{i:03d}_{name}.{ext}")
        img.save(path, quality=90) if ext != "png" else img.save(path)
        paths.append(path)
    log.info("wrote %d sample photos to %s", len(paths), folder)
    return paths
