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

from resnet_features.extract.outputs import units_metadata
from resnet_features.tools.explain_scenes import OBJECT_SIZE, SCENE_SIZE, fit_object_head, pasted

SIZE, OBJ, CROP_OFFSET = SCENE_SIZE, OBJECT_SIZE, 16  # resize is a no-op, crop starts at 16


def plain_scene(rng: np.random.Generator, i: int):
    """Training scenes of the pasted-object head: plain colours, the object in 3 of 4."""
    bg = tuple(int(c) for c in rng.integers(40, 220, 3))
    lo, hi = CROP_OFFSET, SIZE - CROP_OFFSET - OBJ
    if not i % 4:
        return pasted(-1, -1, bg), None
    x, y = int(rng.integers(lo, hi)), int(rng.integers(lo, hi))
    return pasted(x, y, bg), (x, y, x + OBJ, y + OBJ)


def make_pasted_object_weights(backbone_path: str, path: str) -> str:
    """A resnet18 whose top-1 is driven by the pasted object (explain_scenes.fit_object_head on
    the BN-calibrated test backbone, plain backgrounds): class 1 with the object, 0 without."""
    return fit_object_head("resnet18", backbone_path, path, plain_scene)


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
