"""`embedding`: the globally pooled output of the last stage (the input of the classifier)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from resnet_features.extract.outputs.base import Forward, OutputUnit, fixed_size_list

__all__ = ["Embedding"]


class Embedding(OutputUnit):
    name = "embedding"
    nodes = frozenset({"embedding"})

    def __init__(self, dim: int):
        self.dim = dim

    @classmethod
    def from_config(cls, cfg, spec) -> Embedding | None:
        return cls(spec.embedding_dim) if cfg.task in ("embed", "both") else None

    def fields(self) -> list[pa.Field]:
        return [pa.field("embedding", pa.list_(pa.float32(), self.dim))]

    def compute(self, fwd: Forward, out):
        emb = np.zeros((fwd.n, self.dim), dtype=np.float32)
        if len(fwd.rows):
            emb[fwd.rows] = fwd.acts["embedding"].float().cpu().numpy()
        return {"embedding": emb}

    def encode(self, rows, stem):
        return {"embedding": fixed_size_list(rows["embedding"])}

    def row_bytes(self) -> int:
        return 4 * self.dim  # float32 barely compresses
