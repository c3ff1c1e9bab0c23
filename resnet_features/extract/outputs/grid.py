"""`grid_<layer>` (--grid): each chosen stage's whole feature map on the uncropped,
aspect-preserving resize (--resize-short/--max-size), float16, (H, W, C) row-major per row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from resnet_features.extract.backbone import stage_channels
from resnet_features.extract.geometry import STRIDES, AspectGeometry, aspect_size
from resnet_features.extract.outputs.base import Forward, OutputUnit, ragged_list

__all__ = ["Grid", "geometry_of"]

#: The aspect ratio sizing assumes for a typical photo (4:3) when estimating bytes per row.
TYPICAL_ASPECT = 4 / 3


def geometry_of(cfg) -> AspectGeometry | None:
    """The run's aspect-preserving geometry: --resize-short/--max-size, sides rounded to the
    stride of the deepest stage any grid or region output reads (None: the centre crop)."""
    if cfg.resize_short is None:
        return None
    stages = list(cfg.grid) + ([cfg.region_layer] if cfg.boxes_column or cfg.boxes_file
                               else [])
    stride = max((STRIDES[s] for s in stages), default=STRIDES["layer4"])
    return AspectGeometry(cfg.resize_short, cfg.max_size, stride)


class Grid(OutputUnit):
    name = "grid"

    def __init__(self, dims: dict[str, int], geometry: AspectGeometry):
        self.dims = dict(dims)
        self.geometry = geometry
        self.nodes = frozenset(self.dims)

    @classmethod
    def from_config(cls, cfg, spec) -> Grid | None:
        if not cfg.grid:
            return None
        channels = stage_channels(spec.embedding_dim)
        return cls({name: channels[name] for name in cfg.grid}, geometry_of(cfg))

    def fields(self) -> list[pa.Field]:
        fields = []
        for name in self.dims:
            fields += [pa.field(f"grid_{name}", pa.list_(pa.float16())),
                       pa.field(f"grid_{name}_h", pa.int32()),
                       pa.field(f"grid_{name}_w", pa.int32())]
        return fields

    def compute(self, fwd: Forward, out):
        cols = {}
        for name in self.dims:
            maps = np.empty(fwd.n, dtype=object)
            maps[:] = [b""] * fwd.n
            h = np.zeros(fwd.n, dtype=np.int32)
            w = np.zeros(fwd.n, dtype=np.int32)
            if len(fwd.rows):
                act = fwd.acts[name]  # (N, C, h, w); channels_last, so the permute is free
                hwc = act.permute(0, 2, 3, 1).float().cpu().numpy().astype(np.float16)
                for j, i in enumerate(fwd.rows):
                    maps[i] = hwc[j].tobytes()
                h[fwd.rows], w[fwd.rows] = act.shape[2], act.shape[3]
            cols.update({f"grid_{name}": maps, f"grid_{name}_h": h, f"grid_{name}_w": w})
        return cols

    def encode(self, rows, stem):
        cols = {}
        for name in self.dims:
            cols[f"grid_{name}"] = ragged_list(rows[f"grid_{name}"], np.float16, pa.float16())
            cols[f"grid_{name}_h"] = pa.array(rows[f"grid_{name}_h"].astype(np.int32))
            cols[f"grid_{name}_w"] = pa.array(rows[f"grid_{name}_w"].astype(np.int32))
        return cols

    def metadata(self):
        g = self.geometry
        return {"layers": dict(self.dims), "dtype": "float16", "layout": "HWC row-major",
                "resize_short": g.resize_short, "max_size": g.max_size, "round_to": g.stride,
                "strides": {name: STRIDES[name] for name in self.dims}}

    def row_bytes(self) -> int:
        """float16 maps of a 4:3 photo (post-ReLU maps compress a little, so files come out
        somewhat under the target)."""
        g = self.geometry
        w, h = aspect_size(int(1000 * TYPICAL_ASPECT), 1000, g)
        return sum(2 * (h // STRIDES[name]) * (w // STRIDES[name]) * c
                   for name, c in self.dims.items())
