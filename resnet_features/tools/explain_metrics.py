"""Explanation quality on the job's (grid x grid) maps: faithfulness (deletion / insertion
curves and their AUC), localisation (relevance inside a box, pointing game) and the
model-parameter randomisation check; plain functions, no Ray, checked on toy cases in tests.

Maps are row-major (grid*grid,) arrays over the model's input crop, as `explain_map` stores
them; cells are the crop's stride-32 squares.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = ["auc", "box_area", "box_fractions", "perturbation_curve", "pointing_game", "randomised_state_dict",
           "rank_correlation", "relevance_in_box"]

Predict = Callable[[torch.Tensor], torch.Tensor]  # (B, C, H, W) -> (B, classes) probabilities
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in crop pixels
Boxes = Box | Sequence[Box]  # one box, or several (their union)


def _cell_masks(order: np.ndarray, counts: Sequence[int], grid: int, h: int, w: int
                ) -> torch.Tensor:
    """(len(counts), 1, h, w) masks: 1 on the first `counts[k]` cells of `order`."""
    masks = np.zeros((len(counts), grid * grid), np.float32)
    for k, n in enumerate(counts):
        masks[k, order[:n]] = 1.0
    m = torch.from_numpy(masks).view(-1, 1, grid, grid)
    return torch.nn.functional.interpolate(m, size=(h, w), mode="nearest")


def perturbation_curve(predict: Predict, x: torch.Tensor, heatmap: np.ndarray, target: int,
                       mode: str, baseline: torch.Tensor, steps: int | None = None
                       ) -> np.ndarray:
    """The target's probability as cells are removed ("deletion": replaced by `baseline`) or
    revealed ("insertion": from `baseline` to `x`) in order of relevance, most relevant first
    (Petsiuk et al. 2018, RISE). `x` and `baseline` are one (C, H, W) model input; `steps`
    perturbation steps (default: one per cell) -> (steps + 1,) probabilities, the unperturbed
    start first. Ties keep cell order, so a constant map perturbs row by row."""
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be deletion or insertion, got {mode!r}")
    cells = heatmap.size
    grid = int(round(np.sqrt(cells)))
    steps = cells if steps is None else steps
    order = np.argsort(-np.asarray(heatmap, np.float64), kind="stable")
    counts = [int(round(k * cells / steps)) for k in range(steps + 1)]
    m = _cell_masks(order, counts, grid, x.shape[-2], x.shape[-1]).to(x.device, x.dtype)
    if mode == "deletion":
        batch = x[None] * (1 - m) + baseline[None] * m
    else:
        batch = baseline[None] * (1 - m) + x[None] * m
    with torch.no_grad():
        probs = torch.cat([predict(chunk) for chunk in batch.split(32)])
    return probs[:, target].float().cpu().numpy()


def auc(curve: np.ndarray) -> float:
    """Area under a curve sampled evenly over the fraction of cells [0, 1] (trapezoids)."""
    curve = np.asarray(curve, np.float64)
    return float(((curve[1:] + curve[:-1]) / 2).sum() / (len(curve) - 1))


def _boxes(boxes) -> np.ndarray:
    """One box (x0, y0, x1, y1) or several -> (n, 4) float64."""
    return np.asarray(boxes, np.float64).reshape(-1, 4)


def box_fractions(boxes: Boxes, grid: int, crop: int) -> np.ndarray:
    """(grid*grid,) share of each cell's area inside the box, or inside the union of several
    boxes (x0, y0, x1, y1 in crop pixels); exact: the cells are cut along every box edge and
    each piece counts when its centre lies in a box."""
    b = _boxes(boxes)
    size = crop / grid
    cells = np.arange(grid + 1) * size
    xs = np.unique(np.clip(np.concatenate([cells, b[:, 0], b[:, 2]]), 0, crop))
    ys = np.unique(np.clip(np.concatenate([cells, b[:, 1], b[:, 3]]), 0, crop))
    cx, cy = (xs[1:] + xs[:-1]) / 2, (ys[1:] + ys[:-1]) / 2
    covered = np.zeros((len(cy), len(cx)), bool)
    for x0, y0, x1, y1 in b:
        covered |= (((cy >= y0) & (cy < y1))[:, None] & ((cx >= x0) & (cx < x1))[None, :])
    area = np.diff(ys)[:, None] * np.diff(xs)[None, :] * covered
    out = np.zeros((grid, grid))
    rows = np.minimum((cy // size).astype(int), grid - 1)
    cols = np.minimum((cx // size).astype(int), grid - 1)
    np.add.at(out, (rows[:, None], cols[None, :]), area)
    return (out / size ** 2).reshape(-1)


def box_area(boxes: Boxes, crop: int) -> float:
    """Share of the crop inside the box (or the union of several): the box share of a uniform
    map, the chance level a map's box share is read against."""
    return float(box_fractions(boxes, 1, crop)[0])


def relevance_in_box(heatmap: np.ndarray, boxes: Boxes, crop: int) -> float:
    """Share of the map's (non-negative) relevance inside the box (or the union of several),
    cells split by area; 0 for an empty map."""
    h = np.clip(np.asarray(heatmap, np.float64), 0, None)
    total = h.sum()
    if total <= 0:
        return 0.0
    grid = int(round(np.sqrt(h.size)))
    return float((h * box_fractions(boxes, grid, crop)).sum() / total)


def pointing_game(heatmap: np.ndarray, boxes: Boxes, crop: int,
                  tolerance: float = 15.0) -> bool:
    """Hit when the centre of the map's peak cell (the first, on ties) lies in the box, or in
    one of several, grown by `tolerance` pixels (Zhang et al. 2016 use 15). An empty map (no
    positive cell) has no peak and misses."""
    h = np.asarray(heatmap, np.float64)
    if not h.max() > 0:
        return False
    grid = int(round(np.sqrt(h.size)))
    py, px = divmod(int(h.argmax()), grid)
    size = crop / grid
    cx, cy = (px + 0.5) * size, (py + 0.5) * size
    return bool(any(x0 - tolerance <= cx <= x1 + tolerance and y0 - tolerance <= cy <= y1 + tolerance
                    for x0, y0, x1, y1 in _boxes(boxes)))


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps. Two constant maps rank identically (1.0); a
    constant against a varying map shares no ranking (0.0)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    const_a, const_b = np.ptp(a) == 0, np.ptp(b) == 0
    if const_a and const_b:
        return 1.0
    if const_a or const_b:
        return 0.0
    return float(spearmanr(a, b).statistic)


def randomised_state_dict(model: torch.nn.Module, stages: Sequence[str], seed: int = 0
                          ) -> dict[str, torch.Tensor]:
    """`model`'s state_dict with the named top-level children (e.g. layer4, fc) re-initialised
    by their own `reset_parameters` (Adebayo et al. 2018, cascading randomisation from the
    top); batch norm's running statistics are reset too."""
    import copy

    clone = copy.deepcopy(model)
    torch.manual_seed(seed)
    names = dict(clone.named_children())
    for stage in stages:
        if stage not in names:
            raise ValueError(f"no stage {stage!r} in the model; it has {', '.join(names)}")
        for m in names[stage].modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
    return clone.state_dict()
