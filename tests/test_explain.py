"""Grad-CAM (--task explain): the heatmap points at a pasted object, and matches a hand-written
Grad-CAM (forward/backward hooks on eager torchvision) on the output of the job's stages (run
without Ray: `helpers.run_stages`; the units travel through pickle as they do to Ray workers)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from helpers import make_cfg, run_stages
from PIL import Image
from torchvision.models import get_model_builder, get_model_weights

from resnet_features.core.samples import load_photo
from resnet_features.extract.outputs import units_metadata

SIZE, OBJ, CROP_OFFSET = 256, 80, 16  # 256x256 inputs: resize is a no-op, crop starts at 16


def _object() -> Image.Image:
    """The cat's face from scikit-image's "chelsea" photo."""
    return Image.fromarray(load_photo("chelsea")[40:260, 120:340]).resize((OBJ, OBJ))


def pasted(x: int, y: int, background: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), background)
    if x >= 0:
        img.paste(_object(), (x, y))
    return img


def make_pasted_object_weights(backbone_path: str, path: str) -> str:
    """A resnet18 whose top-1 is driven by the pasted object, built in three steps:

    1. the backbone is the BN-calibrated test resnet18 (real-photo statistics, random filters);
    2. a linear object detector v (no bias) is trained on its layer4 cells: a 7x7 cell is
       positive when its centre lies inside the pasted object, negative otherwise (random
       plain backgrounds and positions, 64 images);
    3. fc: class 1 = v (its logit is the mean over cells of v . A_ij, since avgpool and fc are
       linear), class 0 = a zero row whose bias sits between the class-1 logits of plain and
       pasted training images, every other class a zero row with bias -100. So an image is
       class 1 exactly when the object's cells lift the mean, and Grad-CAM for class 1
       (ReLU(sum_k v_k/49 A_k)) is the detector's own map: its peak should be on the object.
    """
    if os.path.exists(path):
        return path
    rng = np.random.default_rng(0)
    model = get_model_builder("resnet18")(weights=None)
    state = torch.load(backbone_path, weights_only=True)
    model.load_state_dict(state)
    model.eval()
    maps = {}
    model.layer4.register_forward_hook(lambda m, i, o: maps.__setitem__("a", o))
    transform = get_model_weights("resnet18").DEFAULT.transforms()
    images, cell_labels, has_object = [], [], []
    centres = CROP_OFFSET + 32 * np.arange(7) + 16  # cell centres in input pixels
    for i in range(128):
        bg = tuple(int(c) for c in rng.integers(40, 220, 3))
        lo, hi = CROP_OFFSET, SIZE - CROP_OFFSET - OBJ
        x, y = (int(rng.integers(lo, hi)), int(rng.integers(lo, hi))) if i % 4 else (-1, -1)
        images.append(transform(pasted(x, y, bg)))
        inside = ((centres[:, None] >= y) & (centres[:, None] < y + OBJ)
                  & (centres[None, :] >= x) & (centres[None, :] < x + OBJ)) if x >= 0 else (
            np.zeros((7, 7), bool))
        cell_labels.append(inside.reshape(-1))
        has_object.append(x >= 0)
    with torch.no_grad():
        model(torch.stack(images))
    a = maps["a"].permute(0, 2, 3, 1).reshape(-1, 512)  # (128*49, 512) cells
    pooled_a = maps["a"].mean(dim=(2, 3))
    y = torch.from_numpy(np.concatenate(cell_labels).astype(np.float32))
    obj = torch.tensor(has_object, dtype=torch.float32)
    v = torch.zeros(512, requires_grad=True)
    b0 = torch.zeros((), requires_grad=True)  # class 0's bias: the image-level threshold
    opt = torch.optim.Adam([v, b0], lr=0.01)
    pos_weight = (1 - y).sum() / y.sum()  # balance the few object cells
    for _ in range(800):
        opt.zero_grad()
        # per-cell object detector + the image-level decision it must carry (mean over cells)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            a @ v, y, pos_weight=pos_weight) + torch.nn.functional.binary_cross_entropy_with_logits(
            pooled_a @ v - b0, obj) * 4
        loss.backward()
        opt.step()
    v, b0 = v.detach(), b0.detach()
    pooled = (pooled_a @ v).numpy()
    has = np.array(has_object)
    assert pooled[has].min() > b0 > pooled[~has].max(), "the detector must separate its data"
    w = torch.zeros(1000, 512)
    b = torch.full((1000,), -100.0)
    w[1], b[1] = v, 0.0
    b[0] = b0
    state["fc.weight"], state["fc.bias"] = w, b
    torch.save(state, path)
    return path


def hand_gradcam(model: torch.nn.Module, x: torch.Tensor, target: int) -> np.ndarray:
    """Grad-CAM from its definition: ReLU(sum_k mean_ij(dy/dA_k) * A_k) at layer4, max-scaled."""
    saved = {}
    h1 = model.layer4.register_forward_hook(lambda m, i, o: saved.__setitem__("a", o))
    h2 = model.layer4.register_full_backward_hook(
        lambda m, gi, go: saved.__setitem__("g", go[0]))
    try:
        model.zero_grad()
        model(x)[0, target].backward()
    finally:
        h1.remove()
        h2.remove()
    alpha = saved["g"].mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((alpha * saved["a"]).sum(1))[0].detach()
    return (cam / cam.max().clamp_min(1e-12)).numpy()


@pytest.mark.slow  # no Ray, but it first trains the object detector (~60 s on 2 cores)
@pytest.mark.timeout(300)
def test_gradcam_finds_pasted_object_and_matches_hand_written(resnet18_weights, weights_dir,
                                                              tmp_path):
    """--task classify,explain --explain-png through ReadBytes/Decode/ModelRunner/PartWriter:
    the map's peak lies on the pasted object, the map equals a hand-written Grad-CAM, and the
    PNG overlay is reddest at the peak."""
    weights = make_pasted_object_weights(resnet18_weights,
                                         os.path.join(weights_dir, "resnet18_pasted.pth"))
    folder = tmp_path / "images"
    folder.mkdir()
    # object boxes in input pixels, one per quadrant-ish place, plain backgrounds
    places = {"tl": (24, 30), "tr": (150, 28), "bl": (30, 150), "br": (140, 146),
              "mid": (90, 80)}
    backgrounds = [(200, 200, 200), (170, 150, 110), (150, 120, 70), (90, 150, 90),
                   (128, 128, 128)]
    for (name, (x, y)), bg in zip(places.items(), backgrounds):
        pasted(x, y, bg).save(folder / f"{name}.png")
    pasted(-1, -1, (128, 128, 128)).save(folder / "plain.png")  # no object: class 0
    out = str(tmp_path / "out")
    stages = run_stages(make_cfg(
        "--input", str(folder), "--output", "unused", "--model", "resnet18", "--weights", weights,
        "--task", "classify,explain", "--top-k", "2", "--explain-png"), out)
    assert stages.errors is None
    table = stages.rows
    assert table.num_rows == 6
    assert table.schema.field("explain_map").type.list_size == 49
    assert str(table.schema.field("explain_map").type.value_type) == "halffloat"
    assert units_metadata(stages.units)["explain"]["method"] == "gradcam"

    model = get_model_builder("resnet18")(weights=None)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    transform = get_model_weights("resnet18").DEFAULT.transforms()
    for row in table.to_pylist():
        name = os.path.splitext(os.path.basename(row["uri"]))[0]
        if name == "plain":
            assert row["topk_ids"][0] == 0, "without the object the model must say class 0"
            continue
        x0, y0 = places[name]
        assert row["topk_ids"][0] == 1, "the object must drive the top-1 class"
        assert row["explain_class"] == 1
        cam = np.asarray(row["explain_map"], dtype=np.float32).reshape(7, 7)
        # peak cell centre, in input pixels (cells are 32 px of the 224 crop at offset 16)
        py, px = np.unravel_index(cam.argmax(), cam.shape)
        cx, cy = CROP_OFFSET + 32 * px + 16, CROP_OFFSET + 32 * py + 16
        margin = 16  # half a cell: the grid is coarse
        assert x0 - margin <= cx <= x0 + OBJ + margin, (name, cam.round(2))
        assert y0 - margin <= cy <= y0 + OBJ + margin, (name, cam.round(2))

        with Image.open(row["uri"]) as im:
            ref = hand_gradcam(model, transform(im.convert("RGB")).unsqueeze(0), 1)
        np.testing.assert_allclose(cam, ref, atol=0.02)

        # --explain-png: the overlay is the 224 crop, reddest where the map peaks
        # explain_png is relative to the run's folder
        with Image.open(os.path.join(out, row["explain_png"])) as im:
            overlay = np.asarray(im.convert("RGB"), dtype=np.float32)
        assert overlay.shape == (224, 224, 3)
        redness = overlay[..., 0] - overlay[..., 1:].mean(-1)
        assert redness[32 * py + 16, 32 * px + 16] > np.median(redness) + 30
