"""The two torchvision image kernels the CPU workers use, without importing torchvision.

`import torchvision.io` or `torchvision.transforms` runs `torchvision/__init__`, which imports
`torchvision.ops` and `torch._dynamo`: ~2.5 s of CPU in every decode worker, on top of torch.
What decode needs from torchvision is small:

- JPEG decoding: torchvision's compiled `image` extension (libjpeg-turbo). It is loaded here
  from the installed torchvision's folder, found with `importlib.util.find_spec` (which does
  not execute the package), and called through the operator it registers,
  `torch.ops.image.decode_jpeg`: exactly what `torchvision.io.decode_jpeg` calls on the CPU.
- The resize: `torchvision.transforms.v2.functional.resize` on a uint8 image tensor is
  `torch.nn.functional.interpolate` plus dtype rules (uint8 in and out where torch has a native
  antialiased uint8 kernel, else float32 with rounding); `resize` below is that code.

tests/test_image_ops.py compares both with torchvision's public functions, pixel for pixel,
and checks that importing this module (and decode.py) leaves torchvision unimported.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import platform
import threading

import torch
from torch.nn.functional import interpolate

__all__ = ["INTERPOLATIONS", "RGB_MODE", "decode_jpeg_rgb", "resize"]

#: `torchvision.io.ImageReadMode.RGB.value`.
RGB_MODE = 3

#: Interpolations `resize` implements (torchvision's InterpolationMode values).
INTERPOLATIONS: tuple[str, ...] = ("bilinear", "bicubic")

_lock = threading.Lock()
_loaded = False


def _image_extension_path() -> str:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("torchvision is not installed (its JPEG decoder is needed)")
    folder = list(spec.submodule_search_locations)[0]
    finder = importlib.machinery.FileFinder(
        folder, (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES))
    for name in ("image_stable", "image"):  # torchvision >= 0.29, older releases
        found = finder.find_spec(name)
        if found is not None and found.origin:
            return found.origin
    raise ImportError(f"torchvision's image extension is not in {folder}")


def _load_image_ops() -> None:
    global _loaded
    with _lock:
        if not _loaded:
            if not hasattr(torch.ops.image, "decode_jpeg"):  # torchvision.io already loaded it
                torch.ops.load_library(_image_extension_path())
            _loaded = True


def decode_jpeg_rgb(data: torch.Tensor) -> torch.Tensor:
    """`torchvision.io.decode_jpeg(data, mode=ImageReadMode.RGB)` on the CPU: (3, H, W) uint8."""
    _load_image_ops()
    return torch.ops.image.decode_jpeg(data, RGB_MODE, False)


def _native_uint8(interpolation: str, device: torch.device) -> bool:
    """Whether torch resizes uint8 directly (torchvision's `_do_native_uint8_resize_on_cpu`)."""
    if device.type != "cpu":
        return False
    if interpolation == "bilinear":
        return (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                or platform.machine() in ("aarch64", "arm64"))
    return interpolation == "bicubic"


def resize(image: torch.Tensor, size: tuple[int, int], interpolation: str,
           antialias: bool) -> torch.Tensor:
    """`torchvision.transforms.v2.functional.resize(image, list(size), interpolation,
    antialias=antialias)` for a (C, H, W) uint8 tensor and bilinear or bicubic."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"resize implements {INTERPOLATIONS}, not {interpolation!r}")
    channels, old_h, old_w = image.shape
    new_h, new_w = size
    if (new_h, new_w) == (old_h, old_w):
        return image
    x = image.reshape(1, channels, old_h, old_w)
    strides = x.stride()
    numel = image.numel()
    if x.is_contiguous(memory_format=torch.channels_last) and numel != strides[0]:
        # torchvision's restride: keeps a channels_last 1CHW input's output channels_last
        # (torch would allocate it contiguous), which avoids a repacking copy for uint8.
        x = x.as_strided((1, channels, old_h, old_w), (numel, *strides[1:]))
    cast = not _native_uint8(interpolation, image.device)
    if cast:
        x = x.to(dtype=torch.float32)
    x = interpolate(x, size=[new_h, new_w], mode=interpolation, align_corners=False,
                    antialias=antialias)
    if cast:
        if interpolation == "bicubic":
            x = x.clamp_(min=0, max=255)
        x = x.round_().to(dtype=torch.uint8)
    return x.reshape(channels, new_h, new_w)
