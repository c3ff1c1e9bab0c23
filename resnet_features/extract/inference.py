"""The model stage: uint8 crops in, the output units' columns out, from one forward pass.

`ModelRunner` is built once per actor (it loads the model) and called per batch. It knows
nothing of Ray: tests and benchmarks call it directly. Normalisation happens here, on the
model's device, so the object store only ever carries uint8 pixels. What the pass produces is
the output units' business (`outputs/`): the runner asks the backbone for the nodes they need
and hands each unit the pass.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from resnet_features.core.errors import Stage, error_columns, ok_mask, set_error
from resnet_features.core.models import ModelSpec, build_model
from resnet_features.extract.backbone import Backbone
from resnet_features.extract.outputs import Forward, OutputUnit, for_task

__all__ = ["DEVICE_FAULTS", "InferenceOptions", "ModelRunner", "ModelStageError"]

log = logging.getLogger(__name__)

#: Failures of the machine, not of an image: retried, then they fail the run (never error rows).
DEVICE_FAULTS: tuple[type[BaseException], ...] = (torch.OutOfMemoryError, MemoryError)

#: Extra attempts at a forward pass that hit a DEVICE_FAULT before the run is failed.
DEVICE_RETRIES = 2


class ModelStageError(RuntimeError):
    """The model stage is broken (every image of a batch fails, even alone): not the inputs'
    fault, so the run fails loudly instead of filling the error table."""


@dataclass(frozen=True)
class InferenceOptions:
    """How the model runs (what it computes is the output units')."""

    device: str = "cpu"  # "cpu" or "cuda" (already resolved from "auto" by the driver)
    precision: str = "auto"  # auto = bf16 (or fp16) autocast on GPU, fp32 on CPU
    cpu_threads: int | None = None  # torch intra-op threads on CPU; None keeps torch's default
    compile: bool = False

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


class ModelRunner:
    """Batch stage: `image` (N, H, W, 3) uint8 -> the columns of `outputs` (default: the
    embedding and the top-5 classes)."""

    def __init__(self, spec: ModelSpec, state_dict, options: InferenceOptions | None = None,
                 outputs: tuple[OutputUnit, ...] | None = None):
        options = options or InferenceOptions()
        self.spec = spec
        self.options = options
        self.outputs = tuple(outputs) if outputs is not None else for_task(spec)
        if options.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but this worker sees no CUDA device")
        if options.device == "cpu" and options.cpu_threads:
            torch.set_num_threads(options.cpu_threads)
        self.device = torch.device(options.device)
        if self.device.type == "cuda":
            # Every batch has the same pixel size: let cuDNN time its algorithms once per shape.
            torch.backends.cudnn.benchmark = True
        nodes = frozenset().union(*(u.nodes for u in self.outputs))
        self.resnet = build_model(spec, state_dict).to(self.device).to(
            memory_format=torch.channels_last).eval()
        self.model = Backbone(self.resnet, nodes)
        if options.compile:
            self.model = torch.compile(self.model)
        prep = spec.preprocessing
        # x/255 then (x - mean)/std, folded into one multiply-add: x * scale + shift
        std = torch.tensor(prep.std, dtype=torch.float32)
        mean = torch.tensor(prep.mean, dtype=torch.float32)
        self.scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1).to(self.device)
        self.shift = (-mean / std).view(1, 3, 1, 1).to(self.device)
        self.autocast = options.autocast_dtype()
        self._staging: torch.Tensor | None = None  # reusable pinned host buffer (GPU only)
        self._staged: torch.cuda.Event | None = None  # its last copy to the device
        for unit in self.outputs:
            unit.setup(self)
        log.info("model %s (%s) on %s, precision %s, outputs %s", spec.name, spec.weights_id,
                 self.device, precision_name(options),
                 ", ".join(u.name for u in self.outputs))

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast)

    def forward(self, images) -> dict[str, torch.Tensor]:
        """(N, H, W, 3) uint8 (array, or tensor on any device) -> {node: tensor on the device}."""
        return self.forward_tensor(self.to_device(images))

    def embed(self, images) -> np.ndarray:
        """(N, H, W, 3) uint8 -> pooled embeddings (N, D) float32 on the host."""
        return self.forward(images)["embedding"].float().cpu().numpy()

    def to_device(self, images) -> torch.Tensor:
        """A uint8 batch (array or tensor) on the model's device.

        On GPU, host pixels go through one reusable pinned buffer (or straight from memory that
        is already pinned): page-locked memory lets the DMA engine copy while this process
        moves on, and reusing the buffer avoids a cudaHostAlloc of ~40 MB per batch."""
        if isinstance(images, torch.Tensor):
            x = images
        else:
            with warnings.catch_warnings():
                # Ray hands batches read-only (zero-copy from the object store); the model only
                # reads them, so torch's warning about non-writable arrays is noise in the log.
                warnings.filterwarnings("ignore", "The given NumPy array is not writable",
                                        UserWarning)
                x = torch.from_numpy(np.ascontiguousarray(images))
        if self.device.type != "cuda" or x.device.type == "cuda":
            return x.to(self.device)
        if not x.is_pinned():
            x = x.contiguous()
            if self._staged is not None:
                self._staged.synchronize()  # the previous copy out of the buffer is done
            if self._staging is None or self._staging.numel() < x.numel():
                self._staging = torch.empty(x.numel(), dtype=torch.uint8).pin_memory()
            staged = self._staging[:x.numel()].view(x.shape)
            staged.copy_(x)
            x = staged
            out = x.to(self.device, non_blocking=True)
            self._staged = torch.cuda.Event()
            self._staged.record()
            return out
        return x.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def forward_tensor(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, H, W, 3) uint8 tensor already on the model's device (e.g. from nvJPEG) ->
        the backbone's nodes, as tensors on the device."""
        # NHWC memory viewed as NCHW is exactly channels_last: no layout copy.
        x = images.permute(0, 3, 1, 2)
        x = x.float().mul_(self.scale).add_(self.shift).contiguous(
            memory_format=torch.channels_last)
        with self._autocast():
            return self.model(x)

    def _forward_retrying(self, images) -> dict[str, torch.Tensor]:
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

    def _forward_rows(self, images, rows: np.ndarray, out: dict[str, np.ndarray]
                      ) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        """The pass over `rows`; if the batch fails, image by image, marking the images that
        still fail as `infer` errors. Returns the rows that have results and their nodes."""
        try:
            return rows, self._forward_retrying(images)
        except DEVICE_FAULTS:
            raise  # the device's fault, not the images': let the run fail loudly
        except Exception as batch_exc:  # noqa: BLE001
            # One poisoned image must not take its batch into the error table: retry each
            # image alone and record only those that still fail.
            log.warning("batch of %d failed in the model (%s: %s); retrying image by image",
                        len(rows), type(batch_exc).__name__, batch_exc)
            done, parts, failures = [], [], []
            for j, i in enumerate(rows):
                try:
                    parts.append(self._forward_retrying(images[j:j + 1]))
                    done.append(i)
                except DEVICE_FAULTS:
                    raise
                except Exception as exc:  # noqa: BLE001
                    failures.append((int(i), exc))
            if len(rows) > 1 and len(failures) == len(rows):
                # A model that fails on every image is broken (bad weights, a dead device, a
                # bug); recording its whole input as "bad images" would hide that.
                raise ModelStageError(
                    f"the model failed on a batch of {len(rows)} images and on each of them "
                    f"alone ({type(failures[0][1]).__name__}: {failures[0][1]}); this is a "
                    f"fault of the model stage, not of the images") from batch_exc
            for i, exc in failures:
                set_error(out, i, Stage.INFER, exc)
            acts = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
            return np.asarray(done, dtype=np.int64), acts

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["uri"])
        out = {k: v for k, v in batch.items() if k != "image"}
        if "error_stage" not in out:
            out.update(error_columns(n))
        if batch["image"].dtype == object:  # --resize-short: images of different sizes
            return self._call_ragged(batch["image"], out)
        rows = np.flatnonzero(ok_mask(out))
        acts: dict[str, torch.Tensor] = {}
        images = batch["image"][:0]
        if len(rows):
            # All rows fine (the usual case): no fancy-indexing copy of the whole batch.
            images = batch["image"] if len(rows) == n else batch["image"][rows]
            done, acts = self._forward_rows(images, rows, out)
            if len(done) < len(rows):
                images = images[np.isin(rows, done)]
            rows = done
        fwd = Forward(n=n, rows=rows, acts=acts, images=images, runner=self)
        for unit in self.outputs:
            out.update(unit.compute(fwd, out))
        return out

    def _call_ragged(self, images: np.ndarray, out: dict[str, np.ndarray]
                     ) -> dict[str, np.ndarray]:
        """Uncropped images of different sizes: one forward pass per group of equal shapes, no
        padding (padding would change the features near the borders), so every map is the
        one the image gives alone. Units compute per group; their full-length columns merge."""
        n = len(out["uri"])
        ok = np.flatnonzero(ok_mask(out))
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in ok:
            groups.setdefault(tuple(images[i].shape), []).append(int(i))
        merged: dict[str, np.ndarray] = {}
        passes = [np.asarray(g, dtype=np.int64) for g in groups.values()] or [
            np.zeros(0, dtype=np.int64)]
        for rows in passes:
            stack = np.stack([images[i] for i in rows]) if len(rows) else np.zeros(
                (0, 1, 1, 3), dtype=np.uint8)
            acts: dict[str, torch.Tensor] = {}
            if len(rows):
                done, acts = self._forward_rows(stack, rows, out)
                if len(done) < len(rows):
                    stack = stack[np.isin(rows, done)]
                rows = done
            fwd = Forward(n=n, rows=rows, acts=acts, images=stack, runner=self)
            cols: dict[str, np.ndarray] = {}
            for unit in self.outputs:
                cols.update(unit.compute(fwd, {**out, **merged, **cols}))
            for name, col in cols.items():
                if name not in merged:
                    merged[name] = col
                else:
                    merged[name][rows] = col[rows]
        out.update(merged)
        return out
