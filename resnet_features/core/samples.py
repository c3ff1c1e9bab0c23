"""Sample photos for the demo and the tests, written from scikit-image's bundled data (no network)."""

from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image

__all__ = ["OBJECTS", "PHOTO_NAMES", "load_photo", "object_patch", "pasted_scene", "write_samples"]

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


#: Real objects cut out of scikit-image photos: (photo, y0, y1, x0, x1).
OBJECTS: dict[str, tuple[str, int, int, int, int]] = {
    "cat": ("chelsea", 40, 260, 120, 340),  # the cat's face
    "face": ("astronaut", 20, 220, 150, 330),  # the astronaut's face
    "cup": ("coffee", 30, 380, 110, 480),  # the coffee cup
}


def object_patch(name: str, width: int, height: int) -> Image.Image:
    """One of OBJECTS, resized to width x height."""
    photo, y0, y1, x0, x1 = OBJECTS[name]
    return Image.fromarray(load_photo(photo)[y0:y1, x0:x1]).resize((width, height))


def pasted_scene(background: str, size: tuple[int, int],
                 placements: list[tuple[str, int, int, int, int]]) -> Image.Image:
    """A real photo resized to `size` (w, h) with objects pasted at known boxes: each
    placement is (object name, x1, y1, x2, y2) in pixels (edges, x2/y2 exclusive)."""
    arr = load_photo(background)
    img = Image.fromarray(arr).convert("RGB").resize(size)
    for name, x1, y1, x2, y2 in placements:
        img.paste(object_patch(name, x2 - x1, y2 - y1), (x1, y1))
    return img
