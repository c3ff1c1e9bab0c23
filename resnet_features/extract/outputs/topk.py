"""`topk_ids`, `topk_labels`, `topk_scores`: the k most probable ImageNet classes (softmax)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from resnet_features.extract.outputs.base import Forward, OutputUnit, list_array

__all__ = ["TopK"]


class TopK(OutputUnit):
    name = "topk"
    nodes = frozenset({"logits"})

    def __init__(self, k: int, categories: tuple[str, ...]):
        self.k = min(k, len(categories))
        self.categories = np.asarray(categories, dtype=object)

    @classmethod
    def from_config(cls, cfg, spec) -> TopK | None:
        return cls(cfg.top_k, spec.categories) if cfg.task in ("classify", "both") else None

    def fields(self) -> list[pa.Field]:
        return [pa.field("topk_ids", pa.list_(pa.int32())),
                pa.field("topk_labels", pa.list_(pa.string())),
                pa.field("topk_scores", pa.list_(pa.float32()))]

    def compute(self, fwd: Forward, out):
        ids = np.zeros((fwd.n, self.k), dtype=np.int32)
        scores = np.zeros((fwd.n, self.k), dtype=np.float32)
        if len(fwd.rows):
            probs = torch.softmax(fwd.acts["logits"].float(), dim=1)
            top_scores, top_ids = torch.topk(probs, self.k, dim=1)
            ids[fwd.rows] = top_ids.to(torch.int32).cpu().numpy()
            scores[fwd.rows] = top_scores.cpu().numpy()
        return {"topk_ids": ids, "topk_scores": scores}

    def encode(self, rows, stem):
        ids = rows["topk_ids"].astype(np.int32)
        return {"topk_ids": list_array(ids, pa.int32()),
                "topk_labels": list_array(self.categories[ids], pa.string()),
                "topk_scores": list_array(rows["topk_scores"].astype(np.float32), pa.float32())}

    def row_bytes(self) -> int:
        return 20 * self.k
