"""`layer1`..`layer4` (--layers): each chosen stage's output, globally average-pooled, taken
from the same forward pass as the embedding."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from resnet_features.extract.backbone import stage_channels
from resnet_features.extract.outputs.base import Forward, OutputUnit, fixed_size_list

__all__ = ["Layers"]


class Layers(OutputUnit):
    name = "layers"

    def __init__(self, dims: dict[str, int]):
        self.dims = dict(dims)
        self.nodes = frozenset(self.dims)

    @classmethod
    def from_config(cls, cfg, spec) -> Layers | None:
        if not cfg.layers:
            return None
        channels = stage_channels(spec.embedding_dim)
        return cls({name: channels[name] for name in cfg.layers})

    def fields(self) -> list[pa.Field]:
        return [pa.field(name, pa.list_(pa.float32(), dim)) for name, dim in self.dims.items()]

    def compute(self, fwd: Forward, out):
        cols = {}
        for name, dim in self.dims.items():
            col = np.zeros((fwd.n, dim), dtype=np.float32)
            if len(fwd.rows):
                pooled = torch.nn.functional.adaptive_avg_pool2d(fwd.acts[name], 1)
                col[fwd.rows] = torch.flatten(pooled, 1).float().cpu().numpy()
            cols[name] = col
        return cols

    def encode(self, rows, stem):
        return {name: fixed_size_list(rows[name]) for name in self.dims}

    def metadata(self):
        return dict(self.dims)

    def row_bytes(self) -> int:
        return 4 * sum(self.dims.values())
