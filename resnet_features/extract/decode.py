"""Decoding and preprocessing: image bytes to the fixed-size uint8 crop the model stage takes.

One pass per image, all in uint8 on the CPU: open with an allow-list of formats, shrink large
JPEGs in the DCT domain (`draft`), apply EXIF orientation, convert any mode to RGB, then one
antialiased resize and the centre crop. The geometry is torchvision's (`resize` of the short
side, then `center_crop`), so for images that are not shrunk by `draft` the pixels match those
of `weights.transforms()` on the same PIL image. Float conversion and mean/std happen on the
model's device, which moves 4x fewer bytes.

Backends (`DecodeOptions.backend`): "auto" (default) decodes plain RGB/grey JPEGs with
torchvision.io (libjpeg-turbo, faster than Pillow's JPEG plugin) and resizes every image with
torch's vectorised uint8 antialiased kernel (several times faster than Pillow's resize), both
through image_ops.py, which calls torchvision's kernels without importing the torchvision
package (its `__init__` costs every decode worker ~2.5 s of CPU);
"pillow" is the original all-Pillow path (`Image.resize(box=...)`). Headers, limits and every
other format always go through Pillow.

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
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from resnet_features.core.config import config_default
from resnet_features.core.errors import Stage, error_columns, set_error
from resnet_features.core.models import Preprocessing
from resnet_features.extract.geometry import AspectGeometry, aspect_size, map_boxes
from resnet_features.extract.image_ops import INTERPOLATIONS, decode_jpeg_rgb, resize

__all__ = [
    "DecodeOptions",
    "DecodedImage",
    "deferrable_jpeg",
    "Decode",
    "DECODE_BACKENDS",
    "decode_image",
    "open_image",
    "preprocess",
    "resize_geometry",
    "resize_to",
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

DECODE_BACKENDS: tuple[str, ...] = ("auto", "pillow")

#: Interpolations torch's uint8 antialiased kernel implements; others use Pillow's resize.
_TORCH_INTERPOLATION = INTERPOLATIONS


#: Colour transparent pixels are composited onto (RGBA, LA, PA, P with transparency).
BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class DecodeOptions:
    """Limits and speed knobs of the decode stage."""

    max_image_pixels: int | None = Image.MAX_IMAGE_PIXELS  # Pillow's bomb limit; None disables
    max_image_bytes: int = config_default("max_image_bytes")  # larger files are not opened
    # JPEG DCT scaling only when the image is at least `draft_factor` x the resize target
    # (0 disables): 12 MP photos decode ~10x faster; ImageNet-sized ones stay bit-exact.
    draft_factor: float = config_default("draft_factor")
    backend: str = "auto"  # DECODE_BACKENDS: "auto" = fastest per format, "pillow" = Pillow only
    # --gpu-decode: plain JPEGs skip CPU decoding and travel as bytes (column `jpeg`) to the
    # model actor, which decodes them with nvJPEG (gpu_decode.py); headers are checked here.
    defer_jpeg: bool = False
    # --gpu-decode-fraction: the share of deferrable JPEGs sent to the GPU; the rest decode here.
    # On a GPU node the CPUs and nvJPEG together decode more than either alone.
    defer_fraction: float = 1.0
    # --resize-short/--max-size: the uncropped, aspect-preserving geometry (geometry.py); the
    # `image` column then holds one (h, w, 3) array per row, sizes differing between rows.
    aspect: AspectGeometry | None = None
    boxes_frame: str = "stored"  # --boxes-frame: the frame of the `boxes_in` column


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


def deferrable_jpeg(data: bytes, options: DecodeOptions) -> tuple[int, int] | None:
    """For --gpu-decode: the (width, height) of a JPEG the GPU can decode, else None.

    Reads only the header, with the same format allow-list and size limits as `open_image`.
    nvJPEG ignores EXIF orientation (torchvision applies it on the CPU only), so a JPEG whose
    EXIF says it is rotated or mirrored decodes on the CPU instead.
    """
    if not data or len(data) > options.max_image_bytes:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data), formats=("JPEG",))
    with img:
        if img.format != "JPEG" or img.mode not in ("RGB", "L"):
            return None
        if img.getexif().get(ORIENTATION_TAG, 1) != 1:
            return None
        return img.size


def _torch_resizable(prep: Preprocessing, options: DecodeOptions) -> bool:
    return (options.backend == "auto" and prep.interpolation in _TORCH_INTERPOLATION
            and prep.resize_size >= prep.crop_size)


def open_image(data: bytes, prep: Preprocessing, options: DecodeOptions):
    """Decode bytes into an oriented image; returns it with its full-resolution size.

    The image is a PIL image, or, on the "auto" backend for plain JPEGs that need no DCT
    scaling or rotation, an RGB (3, H, W) uint8 tensor decoded by torchvision.io. Large JPEGs
    are decoded at a reduced scale (`draft`), so the returned image may be smaller than the
    `(width, height)` returned beside it.
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
        drafted = False
        if img.format in ("JPEG", "MPO") and options.draft_factor > 0:
            scale = options.draft_factor * prep.resize_size / min(width, height)
            req = (max(1, int(width * scale)), max(1, int(height * scale)))
            # libjpeg scales by 1/2, 1/4 or 1/8 only; draft() at scale 1 would change nothing
            # but the decoder (Pillow instead of torchvision.io), so skip it there.
            if scale < 1.0 and min(width // req[0], height // req[1]) >= 2:
                drafted = bool(img.draft(img.mode if img.mode in ("RGB", "L") else None, req))
        if (not drafted and img.format == "JPEG" and img.mode in ("RGB", "L")
                and img.getexif().get(ORIENTATION_TAG, 1) == 1
                and _torch_resizable(prep, options)):
            # Pillow has parsed the header (format, size, bomb limit); libjpeg-turbo via
            # torchvision decodes the pixels straight into a tensor, grey expanded to RGB.
            img.close()
            return _decode_jpeg_tensor(data), width, height
        img.load()
    if img.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8):  # 90/270 degrees: swap
        width, height = height, width
    return ImageOps.exif_transpose(img), width, height


def _readonly_tensor(buffer) -> torch.Tensor:
    """A uint8 tensor over read-only memory (bytes, Pillow's array); only ever read here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "...is not writable"
        if isinstance(buffer, bytes):
            return torch.frombuffer(buffer, dtype=torch.uint8)
        return torch.from_numpy(buffer)


def _decode_jpeg_tensor(data: bytes) -> torch.Tensor:
    return decode_jpeg_rgb(_readonly_tensor(data))


def resize_crop_tensor(chw: torch.Tensor, width: int, height: int,
                       prep: Preprocessing) -> np.ndarray:
    """torch's uint8 antialiased resize to torchvision's geometry, then the centre crop.

    `chw` may be a reduced-scale (drafted) decode of a `width` x `height` image: it is resized
    straight to the full-resolution geometry's target size. Returns (crop, crop, 3) uint8.
    """
    return np.ascontiguousarray(resize_crop_hwc(chw, width, height, prep).numpy())


def resize_crop_hwc(chw: torch.Tensor, width: int, height: int,
                    prep: Preprocessing) -> torch.Tensor:
    """`resize_crop_tensor` on any device, returning a (crop, crop, 3) uint8 view there."""
    new_w, new_h, left, top = resize_geometry(width, height, prep.resize_size, prep.crop_size)
    crop = prep.crop_size
    if chw.shape[1:] != (new_h, new_w):
        chw = resize(chw, (new_h, new_w), prep.interpolation, prep.antialias)
    return chw[:, top:top + crop, left:left + crop].permute(1, 2, 0)


def preprocess(img, width: int, height: int, prep: Preprocessing,
               options: DecodeOptions | None = None) -> np.ndarray:
    """Mode conversion, resize and centre crop in one resampling pass; (crop, crop, 3) uint8.

    `img` is what `open_image` returned (a PIL image or a (3, H, W) uint8 tensor);
    `width`/`height` are the full-resolution size that torchvision's geometry is computed on.
    """
    options = options or DecodeOptions()
    if isinstance(img, torch.Tensor):
        return resize_crop_tensor(img, width, height, prep)
    rgb = _to_rgb(img)
    if _torch_resizable(prep, options):
        # HWC array viewed as CHW is channels_last, the layout torch's uint8 kernel wants.
        chw = _readonly_tensor(np.asarray(rgb, dtype=np.uint8)).permute(2, 0, 1)
        return resize_crop_tensor(chw, width, height, prep)
    new_w, new_h, left, top = resize_geometry(width, height, prep.resize_size, prep.crop_size)
    crop = prep.crop_size
    # Resizing only the box that becomes the crop gives the same pixels as resize-then-crop
    # at a fraction of the work. If draft() shrank the decode, scale the box to the decoded size.
    sx, sy = rgb.size[0] / new_w, rgb.size[1] / new_h
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    out = rgb.resize((crop, crop), _RESAMPLE[prep.interpolation], box=box)
    return np.asarray(out, dtype=np.uint8)


def resize_to(img, new_w: int, new_h: int, prep: Preprocessing,
              options: DecodeOptions | None = None) -> np.ndarray:
    """`open_image`'s image resized to exactly new_w x new_h, no crop: (new_h, new_w, 3) uint8,
    with the same kernels as the centre-crop path (torch's uint8 antialiased resize, or
    Pillow's for interpolations torch lacks or on the "pillow" backend)."""
    options = options or DecodeOptions()
    if not isinstance(img, torch.Tensor):
        rgb = _to_rgb(img)
        if not _torch_resizable(prep, options):
            out = rgb.resize((new_w, new_h), _RESAMPLE[prep.interpolation])
            return np.asarray(out, dtype=np.uint8)
        img = _readonly_tensor(np.asarray(rgb, dtype=np.uint8)).permute(2, 0, 1)
    if img.shape[1:] != (new_h, new_w):
        img = resize(img, (new_h, new_w), prep.interpolation, prep.antialias)
    return np.ascontiguousarray(img.permute(1, 2, 0).numpy())


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) of encoded image bytes, from the header only; 1 if none."""
    with Image.open(io.BytesIO(data)) as img:
        value = img.getexif().get(ORIENTATION_TAG, 1)
    return value if value in range(1, 9) else 1


def decode_image(data: bytes, prep: Preprocessing, options: DecodeOptions) -> DecodedImage:
    """Decode and preprocess one encoded image; raises on bad input."""
    img, width, height = open_image(data, prep, options)
    return DecodedImage(pixels=preprocess(img, width, height, prep, options), width=width,
                        height=height)


class Decode:
    """Batch stage: `bytes` -> `image` (N, crop, crop, 3) uint8, `width`, `height`."""

    def __init__(self, prep: Preprocessing, options: DecodeOptions | None = None):
        self.prep = prep
        self.options = options or DecodeOptions()
        if self.options.aspect is not None:
            if self.options.defer_jpeg:
                raise ValueError("--gpu-decode does not combine with --resize-short")
            # DCT scaling and the torch kernels are chosen against the short side's target.
            n = self.options.aspect.resize_short
            self.prep = replace(prep, resize_size=n, crop_size=n)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        Image.MAX_IMAGE_PIXELS = self.options.max_image_pixels
        if self.options.aspect is not None:
            return self._call_aspect(batch)
        n = len(batch["uri"])
        crop = self.prep.crop_size
        out = {k: v for k, v in batch.items() if k != "bytes"}
        if "error_stage" not in out:
            out.update(error_columns(n))
        images = np.zeros((n, crop, crop, 3), dtype=np.uint8)
        width = np.zeros(n, dtype=np.int32)
        height = np.zeros(n, dtype=np.int32)
        if self.options.defer_jpeg:
            jpeg = np.empty(n, dtype=object)
            jpeg[:] = [b""] * n
            out["jpeg"] = jpeg
        fraction = self.options.defer_fraction
        for i in range(n):
            if out["error_stage"][i]:
                continue
            # Row i goes to the GPU when floor((i+1)f) steps: an even spread of round(n*f) rows.
            if self.options.defer_jpeg and int((i + 1) * fraction) > int(i * fraction):
                try:
                    size = deferrable_jpeg(batch["bytes"][i], self.options)
                except Exception:  # noqa: BLE001 - open_image below reports it as an error row
                    size = None
                if size is not None:
                    jpeg[i] = batch["bytes"][i]
                    width[i], height[i] = size
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
                images[i] = preprocess(img, w, h, self.prep, self.options)
            except Exception as exc:  # noqa: BLE001
                set_error(out, i, Stage.PREPROCESS, exc)
                continue
            width[i], height[i] = w, h
        out["image"] = images
        out["width"] = width
        out["height"] = height
        return out

    def _call_aspect(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The uncropped geometry: `image` is an object array of (h, w, 3) uint8 arrays (sizes
        differ between rows; the model stage groups equal shapes). With a `boxes_in` column,
        adds `boxes` (oriented full-size frame) and `rois` (model-input frame), float32 bytes
        of (k, 4) each; a bad box makes its image a `preprocess` error row."""
        n = len(batch["uri"])
        geometry = self.options.aspect
        out = {k: v for k, v in batch.items() if k not in ("bytes", "boxes_in")}
        if "error_stage" not in out:
            out.update(error_columns(n))
        placeholder = np.zeros((geometry.stride, geometry.stride, 3), dtype=np.uint8)
        images = np.empty(n, dtype=object)
        images[:] = [placeholder] * n
        width = np.zeros(n, dtype=np.int32)
        height = np.zeros(n, dtype=np.int32)
        has_boxes = "boxes_in" in batch
        boxes = np.empty(n, dtype=object)
        boxes[:] = [b""] * n
        rois = boxes.copy()
        for i in range(n):
            if out["error_stage"][i]:
                continue
            data = batch["bytes"][i]
            try:
                img, w, h = open_image(data, self.prep, self.options)
            except Exception as exc:  # noqa: BLE001 - as in __call__: the image's fault
                set_error(out, i, Stage.DECODE, exc)
                continue
            new_w, new_h = aspect_size(w, h, geometry)
            try:
                if has_boxes:
                    oriented, scaled = map_boxes(batch["boxes_in"][i], exif_orientation(data),
                                                 w, h, new_w, new_h, self.options.boxes_frame)
                    boxes[i], rois[i] = oriented.tobytes(), scaled.tobytes()
                images[i] = resize_to(img, new_w, new_h, self.prep, self.options)
            except Exception as exc:  # noqa: BLE001 - a bad box or a failing resize: this row's
                set_error(out, i, Stage.PREPROCESS, exc)
                continue
            width[i], height[i] = w, h
        out["image"] = images
        out["width"] = width
        out["height"] = height
        if has_boxes:
            out["boxes"] = boxes
            out["rois"] = rois
        return out
