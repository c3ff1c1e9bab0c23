"""Scenes with a known answer for explanation checks: a real object (the cat's face of
scikit-image's "chelsea") pasted into real photos or plain colours at known boxes, where a box
lands on the model's grid, and a classifier head that detects the pasted object (test weights).

Used by jobs/explain_benchmark.py (its built-in localisation set, `--object-head`) and by the
tests; the head is what makes localisation numbers mean something without pretrained weights.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from resnet_features.core.samples import PHOTO_NAMES, load_photo

__all__ = ["OBJECT_SIZE", "SCENE_SIZE", "Scene", "cell_labels", "crop_box", "fit_object_head",
           "object_patch", "pasted", "photo_scene", "read_boxes", "write_boxes", "write_scenes"]

SCENE_SIZE, OBJECT_SIZE = 256, 80
#: Photos the backgrounds are cut from (not "chelsea": the object comes from it).
BACKGROUND_PHOTOS = tuple(n for n in PHOTO_NAMES if n != "chelsea")

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in the image's pixels (x1, y1 exclusive)


@dataclass
class Scene:
    name: str
    image: Image.Image
    box: Box | None  # None: no object


def object_patch(size: int = OBJECT_SIZE) -> Image.Image:
    """The cat's face from scikit-image's "chelsea" photo, size x size."""
    return Image.fromarray(load_photo("chelsea")[40:260, 120:340]).resize((size, size))


def pasted(x: int, y: int, background: tuple[int, int, int] | Image.Image,
           size: int = SCENE_SIZE, obj: int = OBJECT_SIZE) -> Image.Image:
    """A size x size image: a plain colour or a photo, with the object at (x, y) (x < 0: none)."""
    if isinstance(background, Image.Image):
        img = background.convert("RGB").resize((size, size))
    else:
        img = Image.new("RGB", (size, size), background)
    if x >= 0:
        img.paste(object_patch(obj), (x, y))
    return img


def _photo_background(rng: np.random.Generator, size: int) -> Image.Image:
    photo = load_photo(BACKGROUND_PHOTOS[int(rng.integers(len(BACKGROUND_PHOTOS)))])
    if photo.ndim == 2:
        photo = np.repeat(photo[..., None], 3, axis=2)
    h, w = photo.shape[:2]
    side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return Image.fromarray(photo[y:y + side, x:x + side, :3]).resize((size, size))


def photo_scene(rng: np.random.Generator, with_object: bool = True, size: int = SCENE_SIZE,
                obj: int = OBJECT_SIZE, margin: int = 16) -> tuple[Image.Image, Box | None]:
    """A photo background with the object at a random place inside the centre crop region."""
    bg = _photo_background(rng, size)
    if not with_object:
        return pasted(-1, -1, bg, size, obj), None
    lo, hi = margin, size - margin - obj
    x, y = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    return pasted(x, y, bg, size, obj), (x, y, x + obj, y + obj)


def write_scenes(folder: str, count: int, seed: int = 0) -> dict[str, Box]:
    """`count` photo scenes with the object as PNGs in `folder`; their boxes by file name (also
    written as `folder/boxes.csv`, the format of the benchmark's --boxes)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    boxes = {}
    for i in range(count):
        image, box = photo_scene(rng)
        name = f"scene-{i:03d}.png"
        image.save(os.path.join(folder, name))
        boxes[name] = box
    write_boxes(os.path.join(folder, "boxes.csv"), boxes)
    return boxes


def write_boxes(path: str, boxes: dict[str, Box]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "x0", "y0", "x1", "y1"])
        for name, b in sorted(boxes.items()):
            w.writerow([name, *b])


def read_boxes(path: str) -> dict[str, list[Box]]:
    """A boxes file: CSV with a header `file,x0,y0,x1,y1`; `file` is the image's base name,
    coordinates are pixels of the image as displayed (after its EXIF orientation; x1, y1
    exclusive). Several rows for one file are several objects (scored as their union)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"file", "x0", "y0", "x1", "y1"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{path}: a boxes file needs the columns file,x0,y0,x1,y1 "
                         f"(missing {', '.join(sorted(missing))})")
    boxes: dict[str, list[Box]] = {}
    for line, r in enumerate(rows, start=2):
        try:
            box = tuple(int(float(r[k])) for k in ("x0", "y0", "x1", "y1"))
        except (TypeError, ValueError):
            raise ValueError(f"{path} line {line}: x0,y0,x1,y1 must be numbers, got "
                             f"{[r[k] for k in ('x0', 'y0', 'x1', 'y1')]}") from None
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 and 0 <= y0 < y1):
            raise ValueError(f"{path} line {line}: the box {box} is empty or negative "
                             "(needs 0 <= x0 < x1 and 0 <= y0 < y1)")
        boxes.setdefault(os.path.basename(r["file"]), []).append(box)
    return boxes


def crop_box(box: Box, width: int, height: int, resize: int, crop: int
             ) -> tuple[float, float, float, float]:
    """A box in the image -> the same box in the model's input crop (the job's geometry,
    torchvision's eval transform: shorter side resized to `resize`, then a centred `crop`),
    clipped to the crop."""
    from resnet_features.extract.decode import resize_geometry

    new_w, new_h, left, top = resize_geometry(width, height, resize, crop)
    sx, sy = new_w / width, new_h / height
    x0, y0, x1, y1 = box
    return (float(np.clip(x0 * sx - left, 0, crop)), float(np.clip(y0 * sy - top, 0, crop)),
            float(np.clip(x1 * sx - left, 0, crop)), float(np.clip(y1 * sy - top, 0, crop)))


def cell_labels(box: Box | None, width: int, height: int, resize: int, crop: int) -> np.ndarray:
    """(grid*grid,) bool: the model's stride-32 cells whose centre lies in the object."""
    grid = crop // 32
    if box is None:
        return np.zeros(grid * grid, bool)
    x0, y0, x1, y1 = crop_box(box, width, height, resize, crop)
    centres = 32 * np.arange(grid) + 16
    inside = ((centres[:, None] >= y0) & (centres[:, None] < y1)
              & (centres[None, :] >= x0) & (centres[None, :] < x1))
    return inside.reshape(-1)


def fit_object_head(model_name: str, backbone_path: str, path: str,
                    scene: Callable[[np.random.Generator, int], tuple[Image.Image, Box | None]],
                    count: int = 128, seed: int = 0, min_accuracy: float = 1.0) -> str:
    """Save `backbone_path`'s weights with a classifier whose top-1 is driven by the object.

    1. a linear object detector v (no bias) is trained on the backbone's layer4 cells: a cell
       is positive when its centre lies inside the pasted object (`scene(rng, i)` gives the
       training images and their boxes);
    2. fc: class 1 = v (its logit is the mean over cells of v . A_ij, since avgpool and fc are
       linear), class 0 = a zero row whose bias sits between the class-1 logits of images
       without and with the object, every other class a zero row with bias -100. So an image
       is class 1 exactly when the object's cells lift the mean, and every explanation of
       class 1 should point at the object.
    Raises unless the head classifies at least `min_accuracy` of the training images right.
    Returns `path` (kept if it exists).
    """
    import torch
    from torchvision.models import get_model_builder, get_model_weights

    if os.path.exists(path):
        return path
    rng = np.random.default_rng(seed)
    model = get_model_builder(model_name)(weights=None)
    state = torch.load(backbone_path, weights_only=True)
    model.load_state_dict(state)
    model.eval()
    maps = {}
    model.layer4.register_forward_hook(lambda m, i, o: maps.__setitem__("a", o))
    transform = get_model_weights(model_name).DEFAULT.transforms()
    (resize,), (crop,) = transform.resize_size, transform.crop_size
    images, labels, has_object = [], [], []
    for i in range(count):
        image, box = scene(rng, i)
        images.append(transform(image))
        labels.append(cell_labels(box, image.width, image.height, resize, crop))
        has_object.append(box is not None)
    with torch.no_grad():
        for chunk in torch.stack(images).split(32):
            model(chunk)
            maps.setdefault("all", []).append(maps["a"])
    acts = torch.cat(maps["all"])
    dim = acts.shape[1]
    a = acts.permute(0, 2, 3, 1).reshape(-1, dim)
    pooled_a = acts.mean(dim=(2, 3))
    y = torch.from_numpy(np.concatenate(labels).astype(np.float32))
    obj = torch.tensor(has_object, dtype=torch.float32)
    v = torch.zeros(dim, requires_grad=True)
    b0 = torch.zeros((), requires_grad=True)  # class 0's bias: the image-level threshold
    opt = torch.optim.Adam([v, b0], lr=0.01)
    pos_weight = (1 - y).sum() / y.sum()  # balance the few object cells
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    for _ in range(800):
        opt.zero_grad()
        # per-cell object detector + the image-level decision it must carry (mean over cells)
        loss = bce(a @ v, y, pos_weight=pos_weight) + bce(pooled_a @ v - b0, obj) * 4
        loss.backward()
        opt.step()
    v, b0 = v.detach(), b0.detach()
    pooled = (pooled_a @ v).numpy()
    has = np.array(has_object)
    accuracy = float(((pooled > float(b0)) == has).mean())
    if accuracy < min_accuracy:
        raise RuntimeError(f"the object detector classifies {accuracy:.0%} of its {count} "
                           f"training images on {model_name}'s layer4 features (needs "
                           f"{min_accuracy:.0%}); try more images (count)")
    w = torch.zeros(model.fc.out_features, dim)
    b = torch.full((model.fc.out_features,), -100.0)
    w[1], b[1] = v, 0.0
    b[0] = b0
    state["fc.weight"], state["fc.bias"] = w, b
    torch.save(state, path)
    return path
