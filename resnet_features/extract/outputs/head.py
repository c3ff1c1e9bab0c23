"""`head_label`, `head_score` (--head): a head trained by `jobs/linear_probe.py`, applied to the
embeddings in the same pass. The head file format lives here because the job reads it; the
probe (a tool) writes it with `save_head`."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from resnet_features.core import storage
from resnet_features.core.errors import HeadError
from resnet_features.extract.outputs.base import Forward, OutputUnit

__all__ = ["HEAD_FORMAT", "Head", "HeadOutput", "LoadedHead", "load_head", "save_head"]

HEAD_FORMAT = "resnet_features.head/1"


class Head(torch.nn.Module):
    """L2-normalise, standardise with the training statistics, then linear (or 1-hidden MLP)."""

    def __init__(self, dim: int, n_classes: int, hidden: int = 0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.hidden = hidden
        if hidden:
            self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(),
                                           torch.nn.Linear(hidden, n_classes))
        else:
            self.net = torch.nn.Sequential(torch.nn.Linear(dim, n_classes))

    def features(self, emb: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.normalize(emb.float(), dim=1, eps=1e-12)
        return (x - self.mean) / self.std

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.net(self.features(emb))


@dataclass
class LoadedHead:
    """A head ready to apply, with the class names and what it was trained on."""

    module: Head
    classes: tuple[str, ...]
    meta: dict[str, Any]

    @torch.inference_mode()
    def predict(self, emb: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings (n, D) -> class ids (n,) int32 and softmax scores (n,) float32."""
        x = torch.as_tensor(emb).float().to(self.module.mean.device)
        probs = torch.softmax(self.module(x), dim=1)
        score, ids = probs.max(dim=1)
        return ids.to(torch.int32).cpu().numpy(), score.float().cpu().numpy()


def save_head(head: Head, classes: list[str], path: str, meta: dict[str, Any]) -> None:
    """A plain dict of tensors, strings and numbers: loadable with `weights_only=True`."""
    obj = {"format": HEAD_FORMAT, "classes": list(classes), "hidden": int(head.hidden),
           "embedding_dim": int(head.mean.shape[0]),
           "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
           "meta": json.dumps(meta, sort_keys=True, default=str)}
    fs, p = storage.filesystem(path)
    with fs.open(p, "wb") as f:
        torch.save(obj, f)


def load_head(path: str, storage_options: dict[str, Any] | None = None) -> LoadedHead:
    try:
        obj = torch.load(io.BytesIO(storage.read_bytes(path, storage_options)),
                         map_location="cpu", weights_only=True)
    except (OSError, ValueError) as exc:
        raise HeadError(f"cannot read head {path}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise HeadError(f"cannot load head {path} with weights_only=True: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("format") != HEAD_FORMAT:
        raise HeadError(f"{path} is not a head saved by linear_probe.py ({HEAD_FORMAT})")
    head = Head(obj["embedding_dim"], len(obj["classes"]), obj["hidden"])
    head.load_state_dict(obj["state_dict"])
    return LoadedHead(module=head.eval(), classes=tuple(obj["classes"]),
                      meta=json.loads(obj["meta"]))


class HeadOutput(OutputUnit):
    name = "head"
    nodes = frozenset({"embedding"})

    def __init__(self, head: LoadedHead, path: str):
        self.head = head
        self.path = path
        self.classes = np.asarray(head.classes, dtype=object)

    @classmethod
    def from_config(cls, cfg, spec) -> HeadOutput | None:
        """Loads the head on the driver and checks it fits this run's embedding space, so a
        wrong head fails before any work."""
        if not cfg.head:
            return None
        head = load_head(cfg.head, cfg.storage_options)
        model, weights = head.meta.get("model"), head.meta.get("weights")
        dim = head.module.mean.shape[0]
        if dim != spec.embedding_dim or model != spec.name:
            raise HeadError(f"--head {cfg.head} was trained on {model} embeddings ({dim}-d); "
                            f"this run uses {spec.name} ({spec.embedding_dim}-d)")
        if weights != spec.weights_id:
            raise HeadError(f"--head {cfg.head} was trained on embeddings from weights "
                            f"{weights}, this run uses {spec.weights_id}: pass the same --weights")
        return cls(head, cfg.head)

    def fields(self) -> list[pa.Field]:
        return [pa.field("head_label", pa.string()), pa.field("head_score", pa.float32())]

    def setup(self, runner) -> None:
        self.head.module.to(runner.device)

    def compute(self, fwd: Forward, out):
        ids = np.zeros(fwd.n, dtype=np.int32)
        scores = np.zeros(fwd.n, dtype=np.float32)
        if len(fwd.rows):
            ids[fwd.rows], scores[fwd.rows] = self.head.predict(fwd.acts["embedding"])
        return {"head_id": ids, "head_score": scores}

    def encode(self, rows, stem):
        return {"head_label": pa.array(self.classes[rows["head_id"].astype(np.int64)], pa.string()),
                "head_score": pa.array(rows["head_score"].astype(np.float32))}

    def metadata(self):
        return {"path": self.path, "classes": list(self.head.classes)}

    def row_bytes(self) -> int:
        return 16
