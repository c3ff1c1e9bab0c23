"""Decoding and preprocessing: image bytes to the fixed-size uint8 crop the model stage takes.

One pass per image, all in uint8 on the CPU: open with an allow-list of formats, shrink large
JPEGs in the DCT domain (`draft`), apply EXIF orientation, convert any mode to RGB, then one
antialiased resize that produces only the centre crop (`Image.resize(box=...)`). The geometry is
torchvision's (`resize` of the short side, then `center_crop`), so for images that are not
shrunk by `draft` the pixels equal those of `weights.transforms()` on the same PIL image.
Float conversion and mean/std happen on the model's device, which moves 4x fewer bytes.

Unusual but valid inputs are decoded, not rejected: transparency (RGBA, LA, PA, palette with
tRNS) is composited on white (BACKGROUND); animated GIF/WebP and multi-page TIFF give their first
frame; 16-bit greys are scaled to 8 bits by /257 (full range, no windowing). Broken input is an
error: truncated files (LOAD_TRUNCATED_IMAGES stays off), PNG chunks with a bad CRC, formats off
the allow-list, files over --max-image-bytes and images over --max-image-pixels (raised before
any pixel is decoded, so a bomb costs its file size in memory, not its pixel count).
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from resnet_features.errors import Stage, error_columns, set_error
from resnet_features.models import Preprocessing

__all__ = [
    "DecodeOptions",
    "DecodedImage",
    "Decode",
    "decode_image",
    "open_image",
    "preprocess",
    "resize_geometry",
]

log = logging.getLogger(__name__)

#: Pillow format plugins the job opens; anything else is rejected before parsing.
#: (Multi-picture JPEGs from phones open through the JPEG plugin as format "MPO".)
PIL_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "DIB", "GIF", "TIFF")

Image.init()  # register every plugin, so `formats=` can name MPO and friends

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}

ORIENTATION_TAG = 0x0112

#: Colour transparent pixels are composited onto (RGBA, LA, PA, P with transparency).
BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class DecodeOptions:
    """Limits and speed knobs of the decode stage."""

    max_image_pixels: int | None = Image.MAX_IMAGE_PIXELS  # Pillow's bomb limit; None disables
    max_image_bytes: int = 256 * 1024 * 1024  # size budget: larger files are not opened
    # JPEG DCT scaling only when the image is at least `draft_factor` x the resize target
    # (0 disables): 12 MP photos decode ~10x faster; ImageNet-sized ones stay bit-exact.
    draft_factor: float = 2.0


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # (crop, crop, 3) uint8, HWC
    width: int  # after EXIF orientation, before resizing
    height: int


def resize_geometry(width: int, height: int, resize_size: int, crop_size: int):
    """torchvision's resize-short-side then center-crop, as (resized_w, resized_h, left, top)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize_size, int(resize_size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    # torchvision's F.center_crop: int(round((size - crop) / 2.0))
    left = int(round((new_w - crop_size) / 2.0))
    top = int(round((new_h - crop_size) / 2.0))
    return new_w, new_h, left, top


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: 16/32-bit greys are scaled, alpha is composited on BACKGROUND."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        hi = float(arr.max()) if arr.size else 0.0
        if mode.startswith("I;16") or (mode == "I" and 255 < hi <= 65535):
            scaled = np.clip(arr, 0, 65535) / 257.0  # 16-bit data: full range onto 0..255
        elif mode == "I" and 0 <= float(arr.min()) and hi <= 255:
            scaled = arr  # 8-bit data stored in a 32-bit mode
        else:  # float or out-of-range data: stretch its own range
            lo = float(arr.min())
            scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.rint(scaled).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info or mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png_crcs(data: bytes) -> None:
    """Raise on a PNG chunk whose CRC does not match: Pillow verifies only some chunks, so a
    corrupted IDAT would otherwise decode to silently wrong pixels."""
    view = memoryview(data)  # CRC over slices without copying them
    pos, end = len(PNG_SIGNATURE), len(data)
    while pos + 8 <= end:
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        start, stop = pos + 4, pos + 8 + length  # CRC covers the type and the data
        if stop + 4 > end:
            raise OSError(f"PNG chunk at byte {pos} is truncated")
        (crc,) = struct.unpack(">I", data[stop:stop + 4])
        if zlib.crc32(view[start:stop]) != crc:
            chunk = data[start:start + 4].decode("latin-1")
            raise OSError(f"PNG chunk {chunk!r} at byte {pos} has a bad CRC (corrupt file)")
        if data[start:start + 4] == b"IEND":
            return
        pos = stop + 4


def open_image(data: bytes, prep: Preprocessing, options: DecodeOptions):
    """Decode bytes into an oriented PIL image; returns it with its full-resolution size.

    Large JPEGs are decoded at a reduced scale (`draft`), so the returned image may be smaller
    than the `(width, height)` returned beside it.
    """
    if len(data) > options.max_image_bytes:
        raise ValueError(
            f"file is {len(data)} bytes, over the --max-image-bytes budget of "
            f"{options.max_image_bytes}"
        )
    if not data:
        raise ValueError("file is empty (0 bytes)")
    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x the limit; here the limit is the limit.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
        except UnidentifiedImageError:
            # Pillow's message names a memory address; say what was expected instead.
            raise UnidentifiedImageError(
                f"not an image in a supported format ({', '.join(PIL_FORMATS)}), or its "
                f"header is corrupt; starts with {data[:8]!r}") from None
        if img.format == "PNG":
            check_png_crcs(data)
        img.seek(0)  # animated GIF/WebP, multi-page TIFF: the first frame
        width, height = img.size
        if img.format in ("JPEG", "MPO") and options.draft_factor > 0:
            scale = options.draft_factor * prep.resize_size / min(width, height)
            if scale < 1.0:
                img.draft(img.mode if img.mode in ("RGB", "L") else None,
                          (max(1, int(width * scale)), max(1, int(height * scale))))
        img.load()
    if img.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8):  # 90/270 degrees: swap
        width, height = height, width
    return ImageOps.exif_transpose(img), width, height


def preprocess(img: Image.Image, width: int, height: int, prep: Preprocessing) -> np.ndarray:
    """Mode conversion, resize and centre crop in one resampling pass; (crop, crop, 3) uint8.

    `width`/`height` are the full-resolution size that torchvision's geometry is computed on.
    """
    rgb = _to_rgb(img)
    new_w, new_h, left, top = resize_geometry(width, height, prep.resize_size, prep.crop_size)
    crop = prep.crop_size
    # Resizing only the box that becomes the crop gives the same pixels as resize-then-crop
    # at a fraction of the work. If draft() shrank the decode, scale the box to the decoded size.
    sx, sy = rgb.size[0] / new_w, rgb.size[1] / new_h
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    out = rgb.resize((crop, crop), _RESAMPLE[prep.interpolation], box=box)
    return np.asarray(out, dtype=np.uint8)


def decode_image(data: bytes, prep: Preprocessing, options: DecodeOptions) -> DecodedImage:
    """Decode and preprocess one encoded image; raises on bad input."""
    img, width, height = open_image(data, prep, options)
    return DecodedImage(pixels=preprocess(img, width, height, prep), width=width, height=height)


class Decode:
    """Batch stage: `bytes` -> `image` (N, crop, crop, 3) uint8, `width`, `height`."""

    def __init__(self, prep: Preprocessing, options: DecodeOptions | None = None):
        self.prep = prep
        self.options = options or DecodeOptions()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        Image.MAX_IMAGE_PIXELS = self.options.max_image_pixels
        n = len(batch["uri"])
        crop = self.prep.crop_size
        out = {k: v for k, v in batch.items() if k != "bytes"}
        if "error_stage" not in out:
            out.update(error_columns(n))
        images = np.zeros((n, crop, crop, 3), dtype=np.uint8)
        width = np.zeros(n, dtype=np.int32)
        height = np.zeros(n, dtype=np.int32)
        for i in range(n):
            if out["error_stage"][i]:
                continue
            # Hostile input can make Pillow raise almost anything (OSError, SyntaxError,
            # struct.error, IndexError, DecompressionBombError...): all of it is this image's
            # fault, and none of it may take the batch down.
            try:
                img, w, h = open_image(batch["bytes"][i], self.prep, self.options)
            except Exception as exc:  # noqa: BLE001
                set_error(out, i, Stage.DECODE, exc)
                continue
            try:
                images[i] = preprocess(img, w, h, self.prep)
            except Exception as exc:  # noqa: BLE001
                set_error(out, i, Stage.PREPROCESS, exc)
                continue
            width[i], height[i] = w, h
        out["image"] = images
        out["width"] = width
        out["height"] = height
        return out
