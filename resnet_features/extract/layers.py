"""Multi-layer features: globally pooled outputs of chosen ResNet stages, in the same forward pass.

Built with torchvision's feature extraction utility (`create_feature_extractor`), which traces
the model and returns the requested nodes alongside the pooled embedding and the logits.
"""

from __future__ import annotations

import torch
from torchvision.models.feature_extraction import create_feature_extractor

from resnet_features.core.vocab import LAYER_NAMES

__all__ = ["LAYER_NAMES", "LayerBackbone", "layer_dims"]


def layer_dims(embedding_dim: int) -> dict[str, int]:
    """Channels per stage: 64, 128, 256, 512 times the block expansion (1 basic, 4 bottleneck)."""
    expansion = embedding_dim // 512
    return {name: 64 * 2**i * expansion for i, name in enumerate(LAYER_NAMES)}


class LayerBackbone(torch.nn.Module):
    """(embedding, logits, {layer: pooled (N, C)}) from one forward pass of a torchvision ResNet."""

    def __init__(self, resnet: torch.nn.Module, layers: tuple[str, ...]):
        super().__init__()
        self.layers = tuple(layers)
        nodes = {name: name for name in self.layers}
        nodes.update({"flatten": "embedding", "fc": "logits"})
        self.body = create_feature_extractor(resnet, return_nodes=nodes)

    def forward(self, x: torch.Tensor):
        out = self.body(x)
        pooled = {name: torch.flatten(torch.nn.functional.adaptive_avg_pool2d(out[name], 1), 1)
                  for name in self.layers}
        return out["embedding"], out["logits"], pooled
