"""Aspect-preserving geometry and boxes: the uncropped resize of --resize-short/--max-size, and
boxes checked and mapped from the stored image, through EXIF orientation, onto that resize.

Coordinates are continuous pixel edges, x1,y1,x2,y2 with 0 <= x1 < x2 <= width (a box
covering the whole image is 0,0,W,H), the convention of torchvision.ops and detectron2.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["AspectGeometry", "BoxError", "STRIDES", "aspect_size", "map_boxes", "parse_boxes",
           "stored_to_oriented"]

#: Output stride of each ResNet stage: a side that is a multiple of it maps to side/stride cells.
STRIDES: dict[str, int] = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}


class BoxError(ValueError):
    """A box that cannot be pooled (outside the image, inverted, empty, not finite): the
    image becomes an error row of stage `preprocess` naming the box."""


@dataclass(frozen=True)
class AspectGeometry:
    """--resize-short N, --max-size M, sides rounded to `stride` (the deepest stage asked for)."""

    resize_short: int
    max_size: int | None = None
    stride: int = 32


def aspect_size(width: int, height: int, geometry: AspectGeometry) -> tuple[int, int]:
    """(new_w, new_h): the short side scaled to N (the long side capped at M), then each side
    rounded to the nearest multiple of the stride (at least one stride). Rounding moves the
    aspect ratio by at most stride/2 pixels per side; boxes use each side's own scale."""
    short, long = min(width, height), max(width, height)
    scale = geometry.resize_short / short
    if geometry.max_size is not None and long * scale > geometry.max_size:
        scale = geometry.max_size / long
    s = geometry.stride
    return (max(s, int(round(width * scale / s)) * s), max(s, int(round(height * scale / s)) * s))


def parse_boxes(value) -> np.ndarray | None:
    """A boxes cell -> (k, 4) float64, or None for a missing cell. Accepts a list of 4-lists,
    a flat list of 4k numbers, an array of either, or JSON text of either."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as exc:
            raise BoxError(f"boxes cell is not JSON: {exc}") from None
    if isinstance(value, np.ndarray) and value.dtype == object:
        value = [np.asarray(v, dtype=np.float64) for v in value]
    try:
        flat = np.concatenate([np.ravel(np.asarray(v, dtype=np.float64)) for v in value]
                              ) if len(value) else np.zeros(0)
    except (TypeError, ValueError) as exc:
        raise BoxError(f"boxes cell is not a list of numbers: {exc}") from None
    if flat.size % 4:
        raise BoxError(f"boxes cell holds {flat.size} numbers, not a multiple of 4 "
                       "(x1, y1, x2, y2 per box)")
    return flat.reshape(-1, 4)


def check_boxes(boxes: np.ndarray, width: int, height: int, frame: str) -> None:
    """Raise BoxError naming the first box that is not finite, inverted, empty or outside the
    `width` x `height` image (in the frame the boxes are given in)."""
    for j, (x1, y1, x2, y2) in enumerate(boxes):
        what = None
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            what = "has a non-finite coordinate"
        elif x2 < x1 or y2 < y1:
            what = "is inverted (x2 < x1 or y2 < y1)"
        elif x2 == x1 or y2 == y1:
            what = "is empty (zero width or height)"
        elif x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            what = f"is outside the {width}x{height} image ({frame} frame)"
        if what:
            coords = ", ".join(f"{v:g}" for v in (x1, y1, x2, y2))
            raise BoxError(f"box {j} [{coords}] {what}")


def stored_to_oriented(boxes: np.ndarray, orientation: int, width: int, height: int
                       ) -> np.ndarray:
    """Boxes on the stored `width` x `height` image -> on the image after EXIF `orientation`
    is applied (PIL's `ImageOps.exif_transpose`: 2 mirror, 3 rotate 180, 4 flip, 5 transpose,
    6 rotate 90 clockwise, 7 transverse, 8 rotate 90 counter-clockwise)."""
    x1, y1, x2, y2 = boxes.T
    W, H = width, height
    if orientation == 2:
        nx1, ny1, nx2, ny2 = W - x2, y1, W - x1, y2
    elif orientation == 3:
        nx1, ny1, nx2, ny2 = W - x2, H - y2, W - x1, H - y1
    elif orientation == 4:
        nx1, ny1, nx2, ny2 = x1, H - y2, x2, H - y1
    elif orientation == 5:
        nx1, ny1, nx2, ny2 = y1, x1, y2, x2
    elif orientation == 6:
        nx1, ny1, nx2, ny2 = H - y2, x1, H - y1, x2
    elif orientation == 7:
        nx1, ny1, nx2, ny2 = H - y2, W - x2, H - y1, W - x1
    elif orientation == 8:
        nx1, ny1, nx2, ny2 = y1, W - x2, y2, W - x1
    else:
        return boxes.copy()
    return np.stack([nx1, ny1, nx2, ny2], axis=1)


def map_boxes(raw, orientation: int, width: int, height: int, new_w: int, new_h: int,
              frame: str) -> tuple[np.ndarray, np.ndarray]:
    """A boxes cell -> (boxes on the oriented full-size image, boxes on the resized model
    input), both (k, 4) float32. `width`/`height` are the oriented size; BoxError if bad."""
    boxes = parse_boxes(raw)
    if boxes is None:
        raise BoxError("no boxes for this input (a null cell, or no entry in --boxes-file)")
    swapped = orientation in (5, 6, 7, 8)
    if frame == "stored":
        sw, sh = (height, width) if swapped else (width, height)
        check_boxes(boxes, sw, sh, frame)
        boxes = stored_to_oriented(boxes, orientation, sw, sh)
    else:
        check_boxes(boxes, width, height, frame)
    scale = np.array([new_w / width, new_h / height] * 2)
    return boxes.astype(np.float32), (boxes * scale).astype(np.float32)
