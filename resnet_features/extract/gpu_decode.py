"""Batched JPEG decode + resize + crop with torchvision.io, on the model's device (nvJPEG on GPU).

For GPU nodes where CPU decode cannot keep up: `torchvision.io.decode_jpeg(device="cuda")`
decodes a whole batch with nvJPEG, and the resize/crop run on the GPU, so only compressed bytes
cross PCIe. The same code runs on the CPU (libjpeg-turbo), which is how it is tested without a
GPU. Only baseline/progressive RGB or grey JPEGs: callers send anything else to `decode.py`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from resnet_features.core.errors import Stage, error_columns, set_error
from resnet_features.core.models import Preprocessing
from resnet_features.extract.decode import _readonly_tensor, resize_crop_hwc

__all__ = ["decode_resize_batch", "with_gpu_decode"]

log = logging.getLogger(__name__)


def decode_resize_batch(datas: list[bytes], prep: Preprocessing,
                        device: str | torch.device = "cuda") -> torch.Tensor:
    """JPEG bytes -> (N, crop, crop, 3) uint8 on `device`, torchvision's resize + centre crop.

    Only for JPEGs without an EXIF rotation (`decode.deferrable_jpeg` checks): nvJPEG ignores
    EXIF orientation, so this never applies it, on any device. Raises RuntimeError for a batch
    with any undecodable file (nvJPEG reports per batch); callers retry those images one by one.
    """
    crop = prep.crop_size
    out = torch.empty((len(datas), crop, crop, 3), dtype=torch.uint8, device=device)
    if not datas:
        return out
    # Imported here: torchvision's __init__ costs ~2.5 s of CPU, and this module is loaded by
    # every model actor (with_gpu_decode), used only by --gpu-decode ones.
    from torchvision.io import ImageReadMode, decode_jpeg

    decoded = decode_jpeg([_readonly_tensor(d) for d in datas], mode=ImageReadMode.RGB,
                          device=device)
    for i, chw in enumerate(decoded):
        h, w = chw.shape[1:]
        out[i] = resize_crop_hwc(chw, w, h, prep)
    return out


def with_gpu_decode(runner_cls: type) -> type:
    """A subclass of a ModelRunner class that first decodes the batch's deferred `jpeg` bytes
    on the model's device (nvJPEG on GPU) into the `image` column, then runs the model."""

    class GpuDecodeRunner(runner_cls):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            jpeg = batch.get("jpeg")
            batch = {k: v for k, v in batch.items() if k != "jpeg"}
            if jpeg is None:
                return super().__call__(batch)
            if "error_stage" not in batch:
                batch.update(error_columns(len(batch["uri"])))
            rows = [i for i, d in enumerate(jpeg) if len(d) and not batch["error_stage"][i]]
            if rows:
                batch = {k: (v.copy() if k.startswith("error_") else v)
                         for k, v in batch.items()}
                host = batch["image"]
                if len(rows) == len(jpeg):  # all deferred: no host pixels worth copying
                    images = torch.empty(host.shape, dtype=torch.uint8, device=self.device)
                else:
                    images = self.to_device(host)
                prep = self.spec.preprocessing
                try:
                    images[rows] = decode_resize_batch([jpeg[i] for i in rows], prep,
                                                       self.device)
                except RuntimeError:
                    log.warning("batched JPEG decode of %d images failed; retrying one by one",
                                len(rows))
                    for i in rows:
                        try:
                            images[i] = decode_resize_batch([jpeg[i]], prep, self.device)[0]
                        except RuntimeError as exc:
                            set_error(batch, i, Stage.DECODE, exc)
                batch["image"] = images
            return super().__call__(batch)

    GpuDecodeRunner.__name__ = GpuDecodeRunner.__qualname__ = f"GpuDecode{runner_cls.__name__}"
    return GpuDecodeRunner
