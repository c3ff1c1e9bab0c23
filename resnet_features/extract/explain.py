"""Explanations: a small heatmap per image (Grad-CAM, Integrated Gradients or SmoothGrad).

Grad-CAM is taken at the last convolutional stage (`layer4`) with Captum's `LayerGradCam`;
Integrated Gradients and SmoothGrad (Captum's `IntegratedGradients` and `NoiseTunnel` over
`Saliency`) give pixel attributions, summed over channels as absolute values and average-pooled
to the same grid. Each map is scaled to [0, 1] by its maximum and stored as float16.
"""

from __future__ import annotations

import numpy as np
import torch

from resnet_features.core.models import ModelSpec, build_model
from resnet_features.core.vocab import EXPLAIN_METHODS

__all__ = ["EXPLAIN_METHODS", "Explainer", "overlay_png"]



class Explainer:
    """Normalised float input (N, 3, H, W) and target classes -> (N, grid*grid) float16 maps."""

    def __init__(self, spec: ModelSpec, state_dict, method: str = "gradcam",
                 device: str = "cpu", ig_steps: int = 32, smoothgrad_samples: int = 16,
                 smoothgrad_stdev: float = 0.15):
        if method not in EXPLAIN_METHODS:
            raise ValueError(f"unknown explain method {method!r}; choose from {EXPLAIN_METHODS}")
        self.method = method
        self.device = torch.device(device)
        self.model = build_model(spec, state_dict).to(self.device).eval()
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
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        return ((x - prep_mean) / prep_std).to(self.device)

    def __call__(self, images: np.ndarray, target: np.ndarray) -> np.ndarray:
        """uint8 crops (N, H, W, 3) and classes (N,) -> maps (N, grid*grid) float16 in [0, 1]."""
        with torch.inference_mode(False), torch.enable_grad():
            x = self.normalise(images).requires_grad_(True)
            t = torch.as_tensor(np.asarray(target, dtype=np.int64), device=self.device)
            maps = self._attribute(x, t).detach().float()
        peak = maps.flatten(1).amax(1).clamp_min(1e-12)
        maps = (maps / peak[:, None, None]).clamp_(0, 1)
        return maps.flatten(1).cpu().numpy().astype(np.float16)


def overlay_png(pixels: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5) -> bytes:
    """PNG bytes: the model's input crop with the (grid x grid) map upsampled and blended in red
    (cold areas keep the photo, hot areas turn red)."""
    import io

    from PIL import Image

    grid = int(round(np.sqrt(heatmap.size)))
    h, w = pixels.shape[:2]
    hm = Image.fromarray(np.asarray(heatmap, np.float32).reshape(grid, grid), mode="F")
    m = np.clip(np.asarray(hm.resize((w, h), Image.Resampling.BILINEAR)), 0, 1)[..., None]
    red = np.array([255.0, 0.0, 0.0])
    out = pixels.astype(np.float32) * (1 - alpha * m) + red * (alpha * m)
    buf = io.BytesIO()
    Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()
