"""`boxes`, `region_features` (and `region_maps`): boxes given with the input (--boxes-column,
--boxes-file) pooled from one stage's map of the uncropped resize with RoIAlign
(torchvision.ops.roi_align, 7x7, aligned, adaptive sampling), then mean-pooled per box."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from resnet_features.extract.backbone import stage_channels
from resnet_features.extract.geometry import STRIDES
from resnet_features.extract.outputs.base import Forward, OutputUnit, ragged_list

__all__ = ["POOL", "Regions", "region_pool"]

#: RoIAlign output size (Faster R-CNN's "pool5" grid).
POOL = 7
#: Boxes per image assumed for file sizing until the listing says (bottom-up attention's 36).
DEFAULT_BOXES = 36


def region_pool(stage_map: torch.Tensor, rois: list[np.ndarray], stride: int) -> torch.Tensor:
    """RoIAlign of each image's boxes (model-input pixels, xyxy) on `stage_map` (N, C, h, w):
    (sum k, C, 7, 7) float32, boxes in image order."""
    boxes = [torch.as_tensor(r, dtype=torch.float32, device=stage_map.device) for r in rois]
    # Imported here: torchvision.ops pulls in torch._dynamo (seconds of CPU), which workers
    # that pool no regions must not pay (ARCHITECTURE.md, "Workers never import torchvision").
    from torchvision.ops import roi_align

    return roi_align(stage_map.float(), boxes, output_size=POOL, spatial_scale=1.0 / stride,
                     sampling_ratio=0, aligned=True)


class Regions(OutputUnit):
    name = "regions"

    def __init__(self, layer: str, channels: int, dtype: str = "float16", maps: bool = False):
        self.layer = layer
        self.channels = channels
        self.dtype = dtype
        self.maps = maps
        self.nodes = frozenset({layer})
        self.boxes_per_image = float(DEFAULT_BOXES)

    @classmethod
    def from_config(cls, cfg, spec) -> Regions | None:
        if not (cfg.boxes_column or cfg.boxes_file):
            return None
        channels = stage_channels(spec.embedding_dim)[cfg.region_layer]
        return cls(cfg.region_layer, channels, cfg.region_dtype, cfg.region_maps)

    @property
    def _value_type(self) -> pa.DataType:
        return pa.float16() if self.dtype == "float16" else pa.float32()

    def fields(self) -> list[pa.Field]:
        box = pa.list_(pa.float32(), 4)
        fields = [pa.field("boxes", pa.list_(box)),
                  pa.field("region_features", pa.list_(pa.list_(self._value_type,
                                                                self.channels)))]
        if self.maps:
            fields.append(pa.field("region_maps", pa.list_(pa.list_(
                self._value_type, POOL * POOL * self.channels))))
        return fields

    def compute(self, fwd: Forward, out):
        feats = np.empty(fwd.n, dtype=object)
        feats[:] = [b""] * fwd.n
        maps = feats.copy()
        if len(fwd.rows):
            rois = [np.frombuffer(out["rois"][i], dtype=np.float32).reshape(-1, 4)
                    for i in fwd.rows]
            pooled = region_pool(fwd.acts[self.layer], rois, STRIDES[self.layer])
            vectors = pooled.mean(dim=(2, 3)).cpu().numpy().astype(self.dtype)
            grids = (pooled.permute(0, 2, 3, 1).cpu().numpy().astype(self.dtype)
                     if self.maps else None)
            start = 0
            for i, r in zip(fwd.rows, rois):
                stop = start + len(r)
                feats[i] = vectors[start:stop].tobytes()
                if grids is not None:
                    maps[i] = grids[start:stop].tobytes()
                start = stop
        cols = {"region_features": feats}
        if self.maps:
            cols["region_maps"] = maps
        return cols

    def encode(self, rows, stem):
        dtype = np.dtype(self.dtype)
        cols = {"boxes": ragged_list(rows["boxes"], np.float32, pa.float32(), 4),
                "region_features": ragged_list(rows["region_features"], dtype,
                                               self._value_type, self.channels)}
        if self.maps:
            cols["region_maps"] = ragged_list(rows["region_maps"], dtype, self._value_type,
                                              POOL * POOL * self.channels)
        return cols

    def sized_for(self, listing: pa.Table) -> None:
        if "boxes_in" in listing.column_names and listing.num_rows:
            from resnet_features.extract.geometry import BoxError, parse_boxes

            counts = []
            for cell in listing.column("boxes_in").to_pylist()[:1000]:
                try:
                    boxes = parse_boxes(cell)
                except BoxError:
                    continue
                counts.append(0 if boxes is None else len(boxes))
            if counts:
                self.boxes_per_image = float(np.mean(counts))

    def metadata(self):
        return {"layer": self.layer, "stride": STRIDES[self.layer], "channels": self.channels,
                "dtype": self.dtype, "roi_align": {"output_size": POOL, "sampling_ratio": 0,
                                                   "aligned": True, "pooled": "mean"},
                "boxes": "pixel xyxy on the oriented full-size image (width x height)",
                "region_maps": "(7, 7, C) row-major per box" if self.maps else None}

    def row_bytes(self) -> int:
        per_box = 16 + np.dtype(self.dtype).itemsize * self.channels * (
            1 + (POOL * POOL if self.maps else 0))
        return int(self.boxes_per_image * per_box)
