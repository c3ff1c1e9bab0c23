"""The one wrapper around a torchvision ResNet: a forward pass that returns the nodes output
units ask for (pooled embedding, logits, stage maps), so every output comes from one pass."""

from __future__ import annotations

import torch

from resnet_features.core.vocab import LAYER_NAMES

__all__ = ["Backbone", "NODES", "stage_channels"]

#: Nodes a unit can ask for: the pooled embedding, the logits, and each stage's feature map.
NODES: tuple[str, ...] = ("embedding", "logits", *LAYER_NAMES)


def stage_channels(embedding_dim: int) -> dict[str, int]:
    """Channels per stage: 64, 128, 256, 512 times the block expansion (1 basic, 4 bottleneck;
    the last stage always has `embedding_dim`)."""
    expansion = embedding_dim // 512
    return {name: 64 * 2**i * expansion for i, name in enumerate(LAYER_NAMES)}


class Backbone(torch.nn.Module):
    """(N, 3, H, W) normalised -> {node: tensor} for the requested nodes, in one pass.

    It runs torchvision's own submodules in `ResNet.forward`'s order (stem, layer1-4, avgpool,
    flatten, fc); stage maps are returned unpooled, (N, C, h, w). Tests compare it with
    `create_feature_extractor` on the same model.
    """

    def __init__(self, resnet: torch.nn.Module, nodes: frozenset[str] | set[str]):
        super().__init__()
        unknown = set(nodes) - set(NODES)
        if unknown:
            raise ValueError(f"unknown backbone nodes {sorted(unknown)}; known: {NODES}")
        self.resnet = resnet
        self.stages = tuple(n for n in LAYER_NAMES if n in nodes)
        self.wants_logits = "logits" in nodes

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        r = self.resnet
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        out: dict[str, torch.Tensor] = {}
        for name in LAYER_NAMES:
            x = getattr(r, name)(x)
            if name in self.stages:
                out[name] = x
        emb = torch.flatten(r.avgpool(x), 1)
        out["embedding"] = emb
        if self.wants_logits:
            out["logits"] = r.fc(emb)
        return out
