"""The model stage: uint8 crops in, pooled embeddings and top-k classes out, one forward pass.

`ModelRunner` is built once per actor (it loads the model) and called per batch. It knows
nothing of Ray: tests and benchmarks call it directly. Normalisation happens here, on the
model's device, so the object store only ever carries uint8 pixels.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from resnet_features.core.errors import Stage, error_columns, ok_mask, set_error
from resnet_features.core.models import ModelSpec, build_model

__all__ = ["DEVICE_FAULTS", "InferenceOptions", "ModelRunner", "ModelStageError", "TASKS"]

log = logging.getLogger(__name__)

TASKS = ("embed", "classify", "both")

#: Failures of the machine, not of an image: retried, then they fail the run (never error rows).
DEVICE_FAULTS: tuple[type[BaseException], ...] = (torch.OutOfMemoryError, MemoryError)

#: Extra attempts at a forward pass that hit a DEVICE_FAULT before the run is failed.
DEVICE_RETRIES = 2


class ModelStageError(RuntimeError):
    """The model stage is broken (every image of a batch fails, even alone): not the inputs'
    fault, so the run fails loudly instead of filling the error table."""


@dataclass(frozen=True)
class InferenceOptions:
    task: str = "both"
    top_k: int = 5
    device: str = "cpu"  # "cpu" or "cuda" (already resolved from "auto" by the driver)
    precision: str = "auto"  # auto = bf16 (or fp16) autocast on GPU, fp32 on CPU
    cpu_threads: int | None = None  # torch intra-op threads on CPU; None keeps torch's default
    compile: bool = False
    layers: tuple[str, ...] = ()  # --layers: pooled outputs of these ResNet stages
    head: Any = None  # --head: a probe.LoadedHead applied to the embeddings
    explain: bool = False  # --task explain: a heatmap per image (explain.Explainer)
    explain_method: str = "gradcam"
    explain_class: int | None = None  # None: each image's top-1 class
    keep_pixels: bool = False  # pass the uint8 crops on (for --explain-png overlays)

    @property
    def wants_embedding(self) -> bool:  # task "explain" alone: neither embedding nor top-k
        return self.task in ("embed", "both")

    @property
    def wants_topk(self) -> bool:
        return self.task in ("classify", "both")

    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype this run uses, or None for plain fp32."""
        if self.precision == "fp32" or (self.precision == "auto" and self.device == "cpu"):
            return None
        if self.precision == "fp16":
            return torch.float16
        if self.precision == "bf16":
            return torch.bfloat16
        if self.device == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16


def precision_name(options: InferenceOptions) -> str:
    dtype = options.autocast_dtype()
    return "fp32" if dtype is None else {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


class _Backbone(torch.nn.Module):
    """A torchvision ResNet split at the pooled features: returns (embedding, logits)."""

    def __init__(self, resnet: torch.nn.Module):
        super().__init__()
        self.resnet = resnet

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.resnet
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        x = r.layer4(r.layer3(r.layer2(r.layer1(x))))
        emb = torch.flatten(r.avgpool(x), 1)
        return emb, r.fc(emb)


class ModelRunner:
    """Batch stage: `image` (N, H, W, 3) uint8 -> `embedding` and/or `topk_ids`/`topk_scores`."""

    def __init__(self, spec: ModelSpec, state_dict, options: InferenceOptions):
        self.spec = spec
        self.options = options
        if options.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but this worker sees no CUDA device")
        if options.device == "cpu" and options.cpu_threads:
            torch.set_num_threads(options.cpu_threads)
        self.device = torch.device(options.device)
        if self.device.type == "cuda":
            # Every batch has the same pixel size: let cuDNN time its algorithms once per shape.
            torch.backends.cudnn.benchmark = True
        if options.layers:
            from resnet_features.extract.layers import LayerBackbone, layer_dims

            model = LayerBackbone(build_model(spec, state_dict), options.layers).to(self.device)
            dims = layer_dims(spec.embedding_dim)
            self.layer_dims = {name: dims[name] for name in options.layers}
        else:
            model = _Backbone(build_model(spec, state_dict)).to(self.device)
            self.layer_dims = {}
        self.last_layers: dict[str, np.ndarray] = {}
        self.head = options.head
        if self.head is not None:
            self.head.module.to(self.device)
        self.explainer = None
        if options.explain:
            from resnet_features.extract.explain import Explainer

            self.explainer = Explainer(spec, state_dict, options.explain_method,
                                       options.device)
        self.model = model.to(memory_format=torch.channels_last).eval()
        if options.compile:
            self.model = torch.compile(self.model)
        prep = spec.preprocessing
        # x/255 then (x - mean)/std, folded into one multiply-add: x * scale + shift
        std = torch.tensor(prep.std, dtype=torch.float32)
        mean = torch.tensor(prep.mean, dtype=torch.float32)
        self.scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1).to(self.device)
        self.shift = (-mean / std).view(1, 3, 1, 1).to(self.device)
        self.autocast = options.autocast_dtype()
        self.k = min(options.top_k, spec.num_classes)
        self._staging: torch.Tensor | None = None  # reusable pinned host buffer (GPU only)
        log.info("model %s (%s) on %s, precision %s", spec.name, spec.weights_id,
                 self.device, precision_name(options))

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast)

    @torch.inference_mode()
    def forward(self, images) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N, H, W, 3) uint8 (array, or tensor on any device) -> embeddings (N, D), top-k ids
        (N, k), top-k probabilities."""
        x = self.to_device(images)
        emb, ids, scores = self.forward_tensor(x)
        return (emb.float().cpu().numpy(), ids.to(torch.int32).cpu().numpy(),
                scores.cpu().numpy())

    def to_device(self, images) -> torch.Tensor:
        """A uint8 batch (array or tensor) on the model's device.

        On GPU, host pixels go through one reusable pinned buffer (or straight from memory that
        is already pinned): page-locked memory lets the DMA engine copy while this process
        moves on, and reusing the buffer avoids a cudaHostAlloc of ~40 MB per batch."""
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(
            np.ascontiguousarray(images))
        if self.device.type != "cuda" or x.device.type == "cuda":
            return x.to(self.device)
        if not x.is_pinned():
            x = x.contiguous()
            if self._staging is None or self._staging.numel() < x.numel():
                self._staging = torch.empty(x.numel(), dtype=torch.uint8).pin_memory()
            staged = self._staging[:x.numel()].view(x.shape)
            staged.copy_(x)
            x = staged
        # The buffer is reused by the next call only after this one has copied its results
        # back to the host, which waits for the device: the copy below is complete by then.
        return x.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def forward_tensor(self, images: torch.Tensor):
        """(N, H, W, 3) uint8 tensor already on the model's device (e.g. from nvJPEG) ->
        embeddings, top-k ids and probabilities, as tensors on the device."""
        # NHWC memory viewed as NCHW is exactly channels_last: no layout copy.
        x = images.permute(0, 3, 1, 2)
        x = x.float().mul_(self.scale).add_(self.shift).contiguous(
            memory_format=torch.channels_last)
        with self._autocast():
            emb, logits, *extra = self.model(x)
        if extra:  # LayerBackbone: pooled stage outputs, kept for __call__
            self.last_layers = {k: v.float().cpu().numpy() for k, v in extra[0].items()}
        probs = torch.softmax(logits.float(), dim=1)
        scores, ids = torch.topk(probs, self.k, dim=1)
        return emb, ids, scores

    def _forward_retrying(self, images: np.ndarray):
        """`forward`, retried a bounded number of times on DEVICE_FAULTS (then re-raised)."""
        for attempt in range(DEVICE_RETRIES + 1):
            try:
                return self.forward(images)
            except DEVICE_FAULTS as exc:
                if attempt == DEVICE_RETRIES:
                    raise
                log.warning("model forward of %d images hit %s (attempt %d of %d); retrying",
                            len(images), type(exc).__name__, attempt + 1, DEVICE_RETRIES + 1)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["uri"])
        out = {k: v for k, v in batch.items() if k != "image" or self.options.keep_pixels}
        if "error_stage" not in out:
            out.update(error_columns(n))
        emb = np.zeros((n, self.spec.embedding_dim), dtype=np.float32)
        ids = np.zeros((n, self.k), dtype=np.int32)
        scores = np.zeros((n, self.k), dtype=np.float32)
        layers = {k: np.zeros((n, d), dtype=np.float32) for k, d in self.layer_dims.items()}
        rows = np.flatnonzero(ok_mask(out))
        if len(rows):
            try:
                # All rows fine (the usual case): no fancy-indexing copy of the whole batch.
                images = batch["image"] if len(rows) == n else batch["image"][rows]
                emb[rows], ids[rows], scores[rows] = self._forward_retrying(images)
                for k in layers:
                    layers[k][rows] = self.last_layers[k]
            except DEVICE_FAULTS:
                raise  # the device's fault, not the images': let the run fail loudly
            except Exception as batch_exc:  # noqa: BLE001
                # One poisoned image must not take its batch into the error table: retry
                # each image alone and record only those that still fail.
                log.warning("batch of %d failed in the model (%s: %s); retrying image by image",
                            len(rows), type(batch_exc).__name__, batch_exc)
                failures: list[tuple[int, Exception]] = []
                for i in rows:
                    try:
                        emb[i], ids[i], scores[i] = (
                            a[0] for a in self._forward_retrying(batch["image"][i:i + 1]))
                        for k in layers:
                            layers[k][i] = self.last_layers[k][0]
                    except DEVICE_FAULTS:
                        raise
                    except Exception as exc:  # noqa: BLE001
                        failures.append((int(i), exc))
                if len(rows) > 1 and len(failures) == len(rows):
                    # A model that fails on every image is broken (bad weights, a dead device,
                    # a bug); recording its whole input as "bad images" would hide that.
                    raise ModelStageError(
                        f"the model failed on a batch of {len(rows)} images and on each of them "
                        f"alone ({type(failures[0][1]).__name__}: {failures[0][1]}); this is a "
                        f"fault of the model stage, not of the images") from batch_exc
                for i, exc in failures:
                    set_error(out, i, Stage.INFER, exc)
        if self.options.wants_embedding:
            out["embedding"] = emb
        if self.options.wants_topk:
            out["topk_ids"] = ids
            out["topk_scores"] = scores
        out.update(layers)
        if self.explainer is not None:
            target = (ids[:, 0] if self.options.explain_class is None
                      else np.full(n, self.options.explain_class, dtype=np.int32))
            maps = np.zeros((n, self.explainer.grid ** 2), dtype=np.float16)
            rows = np.flatnonzero(ok_mask(out))
            if len(rows):
                maps[rows] = self.explainer(batch["image"][rows], target[rows])
            out["explain_map"], out["explain_class"] = maps, target.astype(np.int32)
        if self.head is not None:
            out["head_id"], out["head_score"] = self.head.predict(emb)
        return out
