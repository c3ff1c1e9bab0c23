"""`explain_png` (--explain-png): each image's heatmap drawn over its model input crop, written
as a PNG beside the parts; the column holds the file's path relative to the run.

The overlay is drawn in the model actor, where the pixels are, and written as the batch
arrives, so pixels never travel to the writer and PNGs never wait in memory for their part."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from resnet_features.extract.outputs.base import Forward, OutputUnit
from resnet_features.runs.layout import EXPLAIN_PNG_DIR

__all__ = ["ExplainPng", "overlay_png"]


def overlay_png(pixels: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5) -> bytes:
    """PNG bytes: the model's input crop with the (grid x grid) map upsampled and blended in red
    (cold areas keep the photo, hot areas turn red)."""
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


def png_path(stem: str, index: int) -> str:
    """Where an input's overlay goes, relative to the run (attempt-aware like the parts: a
    resumed attempt re-indexes its inputs from 0)."""
    return f"{EXPLAIN_PNG_DIR}/{stem}/{index:08d}.png"


class ExplainPng(OutputUnit):
    name = "explain_png"
    transient = ("explain_png_bytes",)

    @classmethod
    def from_config(cls, cfg, spec) -> ExplainPng | None:
        return cls() if cfg.explain_png else None

    def fields(self) -> list[pa.Field]:
        return [pa.field("explain_png", pa.string())]

    def compute(self, fwd: Forward, out):
        png = np.full(fwd.n, b"", dtype=object)
        images = fwd.images
        if not isinstance(images, np.ndarray):  # a tensor on the device (GPU decode)
            images = images.cpu().numpy()
        for j, i in enumerate(fwd.rows):
            png[i] = overlay_png(images[j], out["explain_map"][i])
        return {"explain_png_bytes": png}

    def side_files(self, rows, stem_of):
        return [(png_path(stem_of(int(i)), int(i)), data)
                for i, data in zip(rows["index"], rows["explain_png_bytes"])]

    def encode(self, rows, stem):
        return {"explain_png": pa.array([png_path(stem, int(i)) for i in rows["index"]],
                                        pa.string())}

    def row_bytes(self) -> int:
        return 48
