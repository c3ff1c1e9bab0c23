"""`explain_map`, `explain_class`, `explain_label` (--task explain): a small heatmap per image
(Grad-CAM, Integrated Gradients, SmoothGrad or LRP) for its top-1 class or --explain-class.

Grad-CAM is taken at the last convolutional stage (`layer4`) with Captum's `LayerGradCam`;
Integrated Gradients and SmoothGrad (Captum's `IntegratedGradients` and `NoiseTunnel` over
`Saliency`) give pixel attributions, summed over channels as absolute values and average-pooled
to the same grid. LRP (zennit's EpsilonPlusFlat composite on the ResNet canonized by
`ResNetCanonizer`: batch norm merged into the convolutions, residual additions as explicit sums)
propagates the explained logit back to the pixels; the signed pixel relevance is summed per grid
cell and its magnitude kept (z+ gives a ResNet's pixels one sign per image). Each map is scaled
to [0, 1] by its maximum and stored as float16. docs/explanations.md compares the methods.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from resnet_features.core.models import ModelSpec, build_model
from resnet_features.core.vocab import EXPLAIN_METHODS
from resnet_features.extract.outputs.base import Forward, OutputUnit, fixed_size_list

__all__ = ["EXPLAIN_METHODS", "ExplainOutput", "Explainer", "lrp_relevance"]

#: The stage Grad-CAM is taken at; its stride (32) sets the grid of every method.
EXPLAIN_LAYER = "layer4"


def lrp_relevance(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor,
                  canonize: bool = True) -> torch.Tensor:
    """Input relevance (N, 3, H, W) of LRP for class `target`, seeded with the target logit.

    zennit's EpsilonPlusFlat: the flat rule on the first layer, z+ on the other convolutions,
    epsilon on the classifier; max-pooling passes relevance to its winners and the canonizer's
    sums split it in proportion to the two branches. On a network without biases the relevance
    sums to the logit (conservation); biases (including merged batch norm) absorb a share.
    The canonizer changes the model's parameters only inside the context and restores them.
    """
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer

    composite = EpsilonPlusFlat(canonizers=[ResNetCanonizer()] if canonize else [])
    with composite.context(model) as modified:
        x = x.detach().requires_grad_(True)
        out = modified(x)
        idx = target.view(-1, 1).to(out.device)
        seed = torch.zeros_like(out).scatter_(1, idx, out.gather(1, idx).detach())
        (relevance,) = torch.autograd.grad(out, x, grad_outputs=seed)
    return relevance



class Explainer:
    """Normalised float input (N, 3, H, W) and target classes -> (N, grid*grid) float16 maps."""

    def __init__(self, spec: ModelSpec, state_dict, method: str = "gradcam",
                 device: str = "cpu", ig_steps: int = 32, smoothgrad_samples: int = 16,
                 smoothgrad_stdev: float = 0.15, model: torch.nn.Module | None = None):
        if method not in EXPLAIN_METHODS:
            raise ValueError(f"unknown explain method {method!r}; choose from {EXPLAIN_METHODS}")
        self.method = method
        self.device = torch.device(device)
        # `model`: the runner's own ResNet (no second copy of the weights in the actor).
        self.model = (model if model is not None
                      else build_model(spec, state_dict).to(self.device).eval())
        self.grid = spec.preprocessing.crop_size // 32  # ResNet's layer4 stride
        self.mean, self.std = spec.preprocessing.mean, spec.preprocessing.std
        self.ig_steps = ig_steps
        self.sg_samples = smoothgrad_samples
        self.sg_stdev = smoothgrad_stdev

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from captum import attr

        if self.method == "gradcam":
            cam = attr.LayerGradCam(self.model, self.model.layer4)
            maps = cam.attribute(x, target=target, relu_attributions=True)
            return maps[:, 0]
        if self.method == "lrp":
            # signed relevance pooled per cell, then its magnitude: the z+ layers of
            # EpsilonPlusFlat give a ResNet's pixels one sign per image (its total's), so the
            # magnitude is the map and a class with negative total relevance still gets one
            r = lrp_relevance(self.model, x, target).sum(1, keepdim=True)
            return torch.nn.functional.adaptive_avg_pool2d(r, self.grid)[:, 0].abs()
        if self.method == "integrated_gradients":
            a = attr.IntegratedGradients(self.model).attribute(
                x, baselines=torch.zeros_like(x), target=target, n_steps=self.ig_steps,
                internal_batch_size=len(x) * min(self.ig_steps, 8))
        else:
            a = attr.NoiseTunnel(attr.Saliency(self.model)).attribute(
                x, nt_type="smoothgrad", nt_samples=self.sg_samples,
                nt_samples_batch_size=min(self.sg_samples, 8), stdevs=self.sg_stdev,
                target=target, abs=True)
        return torch.nn.functional.adaptive_avg_pool2d(a.abs().sum(1, keepdim=True),
                                                       self.grid)[:, 0]

    def normalise(self, images: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> normalised (N, 3, H, W) float32, as the model stage does."""
        prep_mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        prep_std = torch.tensor(self.std).view(1, 3, 1, 1)
        x = (images if isinstance(images, torch.Tensor)
             else torch.from_numpy(np.ascontiguousarray(images))).to(self.device)
        x = x.permute(0, 3, 1, 2).float() / 255.0
        return (x - prep_mean.to(self.device)) / prep_std.to(self.device)

    def __call__(self, images: np.ndarray, target: np.ndarray) -> np.ndarray:
        """uint8 crops (N, H, W, 3) and classes (N,) -> maps (N, grid*grid) float16 in [0, 1]."""
        with torch.inference_mode(False), torch.enable_grad():
            x = self.normalise(images).requires_grad_(True)
            t = torch.as_tensor(np.asarray(target, dtype=np.int64), device=self.device)
            maps = self._attribute(x, t).detach().float()
        peak = maps.flatten(1).amax(1).clamp_min(1e-12)
        maps = (maps / peak[:, None, None]).clamp_(0, 1)
        return maps.flatten(1).cpu().numpy().astype(np.float16)


class ExplainOutput(OutputUnit):
    name = "explain"
    nodes = frozenset({"logits"})  # the top-1 class is the default target

    def __init__(self, method: str, explain_class: int | None, grid: int,
                 categories: tuple[str, ...]):
        self.method = method
        self.explain_class = explain_class
        self.grid = grid
        self.categories = np.asarray(categories, dtype=object)
        self.explainer: Explainer | None = None

    @classmethod
    def from_config(cls, cfg, spec) -> ExplainOutput | None:
        if not cfg.explain:
            return None
        if cfg.explain_class is not None and cfg.explain_class >= spec.num_classes:
            from resnet_features.core.errors import ConfigError

            raise ConfigError(f"--explain-class {cfg.explain_class} is out of range: {spec.name} "
                              f"has {spec.num_classes} classes (0..{spec.num_classes - 1})")
        return cls(cfg.explain_method, cfg.explain_class, spec.preprocessing.crop_size // 32,
                   spec.categories)

    def fields(self) -> list[pa.Field]:
        # row-major (grid x grid) heatmap over the model's input crop
        return [pa.field("explain_map", pa.list_(pa.float16(), self.grid * self.grid)),
                pa.field("explain_class", pa.int32()), pa.field("explain_label", pa.string())]

    def setup(self, runner) -> None:
        self.explainer = Explainer(runner.spec, None, self.method, str(runner.device),
                                   model=runner.resnet)

    def compute(self, fwd: Forward, out):
        if self.explain_class is None:
            target = np.zeros(fwd.n, dtype=np.int32)
            if len(fwd.rows):
                target[fwd.rows] = fwd.acts["logits"].argmax(1).to(torch.int32).cpu().numpy()
        else:
            target = np.full(fwd.n, self.explain_class, dtype=np.int32)
        maps = np.zeros((fwd.n, self.grid ** 2), dtype=np.float16)
        if len(fwd.rows):
            maps[fwd.rows] = self.explainer(fwd.images, target[fwd.rows])
        return {"explain_map": maps, "explain_class": target}

    def encode(self, rows, stem):
        cls = rows["explain_class"].astype(np.int32)
        return {"explain_map": fixed_size_list(rows["explain_map"], pa.float16()),
                "explain_class": pa.array(cls),
                "explain_label": pa.array(self.categories[cls], pa.string())}

    def metadata(self):
        return {"method": self.method, "class": self.explain_class, "grid": self.grid,
                "layer": EXPLAIN_LAYER}

    def row_bytes(self) -> int:
        return 2 * self.grid * self.grid + 24
