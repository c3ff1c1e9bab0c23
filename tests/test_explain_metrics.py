"""The explanation benchmark's metrics on toy models whose right answer is known by hand: a
model that looks only at the top-left quadrant must favour the map that marks that quadrant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resnet_features.tools.explain_metrics import (
    auc,
    box_area,
    box_fractions,
    perturbation_curve,
    pointing_game,
    randomised_state_dict,
    rank_correlation,
    relevance_in_box,
)
from resnet_features.tools.explain_scenes import cell_labels, crop_box, read_boxes

CROP = 64  # 2x2 grid of 32-px cells: the cells are the quadrants
TL, TR, BL, BR = (np.eye(4)[i] for i in range(4))  # maps marking one quadrant


def quadrant_model(x: torch.Tensor) -> torch.Tensor:
    """Class 1's logit is 4 x the mean of the top-left quadrant, class 0's is 0."""
    logit = 4 * x[:, :, :32, :32].mean((1, 2, 3))
    return torch.softmax(torch.stack([torch.zeros_like(logit), logit], 1), 1)


def s(v: float) -> float:
    return float(1 / (1 + np.exp(-v)))


def test_deletion_and_insertion_by_hand():
    x, zero = torch.ones(3, CROP, CROP), torch.zeros(3, CROP, CROP)
    curves = {name: (perturbation_curve(quadrant_model, x, m, 1, "deletion", zero),
                     perturbation_curve(quadrant_model, x, m, 1, "insertion", zero))
              for name, m in {"tl": TL, "br": BR, "tr": TR}.items()}
    # TL first: deleting it drops the class to chance at once; inserting it restores it at once
    np.testing.assert_allclose(curves["tl"][0], [s(4), .5, .5, .5, .5], rtol=1e-6)
    np.testing.assert_allclose(curves["tl"][1], [.5, s(4), s(4), s(4), s(4)], rtol=1e-6)
    # BR first, then the tied cells in order (TL, TR, BL): TL goes second
    np.testing.assert_allclose(curves["br"][0], [s(4), s(4), .5, .5, .5], rtol=1e-6)
    assert auc(curves["tl"][0]) == pytest.approx(((s(4) + .5) / 2 + 1.5) / 4)
    assert auc(curves["br"][0]) == pytest.approx((s(4) + (s(4) + .5) / 2 + 1.0) / 4)
    # the map of the quadrant the model looks at is the most faithful on both curves
    assert auc(curves["tl"][0]) < min(auc(curves["br"][0]), auc(curves["tr"][0]))
    assert auc(curves["tl"][1]) > max(auc(curves["br"][1]), auc(curves["tr"][1]))
    # fewer steps: cells in pairs
    half = perturbation_curve(quadrant_model, x, TL, 1, "deletion", zero, steps=2)
    np.testing.assert_allclose(half, [s(4), .5, .5], rtol=1e-6)


def test_localisation_by_hand():
    box = (0.0, 0.0, 32.0, 32.0)  # the top-left quadrant
    assert relevance_in_box(TL, box, CROP) == 1.0
    assert relevance_in_box(BR, box, CROP) == 0.0
    assert relevance_in_box(np.ones(4), box, CROP) == pytest.approx(0.25)
    assert relevance_in_box(np.zeros(4), box, CROP) == 0.0
    # half of the top-right cell is in a box spanning x < 48
    np.testing.assert_allclose(box_fractions((0, 0, 48, 32), 2, CROP), [1, .5, 0, 0])
    assert relevance_in_box(TR, (0, 0, 48, 32), CROP) == pytest.approx(0.5)
    assert pointing_game(TL, box, CROP) and not pointing_game(BR, box, CROP)
    # the tolerance: the TR cell's centre (48, 16) is 16 px right of the box, 15 px is not enough
    assert not pointing_game(TR, box, CROP) and pointing_game(TR, box, CROP, tolerance=16)


def test_several_boxes_count_as_their_union():
    """Two overlapping boxes: the top-right cell is covered by x 32..48 (full height) and by
    y 0..16 (full width), 512 + 512 - 256 (overlap) of its 1024 px; a sum of the two boxes
    would count 1.0 there and 1.25 in the top-left cell."""
    a, b = (0, 0, 48, 32), (16, 0, 64, 16)
    np.testing.assert_allclose(box_fractions([a, b], 2, CROP), [1, .75, 0, 0])
    assert relevance_in_box(TR, [a, b], CROP) == pytest.approx(0.75)
    assert relevance_in_box(np.ones(4), [a, b], CROP) == pytest.approx(1.75 / 4)
    # a box given twice is the box once
    np.testing.assert_allclose(box_fractions([a, a], 2, CROP), box_fractions(a, 2, CROP))
    # a box with edges off the cell grid: 10..50 x 20..40 covers 22 x 12 of TL, 18 x 12 of TR,
    # 22 x 8 of BL, 18 x 8 of BR
    np.testing.assert_allclose(box_fractions((10, 20, 50, 40), 2, CROP),
                               np.array([22 * 12, 18 * 12, 22 * 8, 18 * 8]) / 1024)
    assert box_area([a, b], CROP) == pytest.approx(1.75 / 4)  # a uniform map's share
    assert box_area((10, 20, 50, 40), CROP) == pytest.approx(40 * 20 / 64 ** 2)
    tl, br = (0, 0, 32, 32), (32, 32, 64, 64)
    assert pointing_game(BR, [tl, br], CROP) and not pointing_game(BR, [tl], CROP)


def test_an_empty_map_has_no_peak():
    whole = (0, 0, CROP, CROP)
    assert not pointing_game(np.zeros(4), whole, CROP)
    assert relevance_in_box(np.zeros(4), whole, CROP) == 0.0
    assert pointing_game(TL, whole, CROP) and relevance_in_box(TL, whole, CROP) == 1.0


def test_boxes_file(tmp_path):
    path = tmp_path / "boxes.csv"
    path.write_text("file,x0,y0,x1,y1\nsub/a.jpg,1,2,30,40\nb.png,0,0,8.0,9\na.jpg,5,5,6,6\n")
    assert read_boxes(str(path)) == {"a.jpg": [(1, 2, 30, 40), (5, 5, 6, 6)],
                                     "b.png": [(0, 0, 8, 9)]}
    path.write_text("file,x0,y0,x1,y1\na.jpg,10,2,10,40\n")
    with pytest.raises(ValueError, match="line 2: the box .* is empty"):
        read_boxes(str(path))
    path.write_text("file,x,y,w,h\na.jpg,1,2,3,4\n")
    with pytest.raises(ValueError, match="missing x0, x1, y0, y1"):
        read_boxes(str(path))


def test_box_to_crop_follows_torchvision_transform():
    """A box through resize-shorter-side + centre crop, against torchvision on a marked image."""
    from PIL import Image
    from torchvision import transforms

    img = np.zeros((300, 400, 3), np.uint8)
    box = (150, 60, 250, 200)
    img[box[1]:box[3], box[0]:box[2]] = 255
    t = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    out = np.asarray(t(Image.fromarray(img)))[..., 0] > 127
    ys, xs = np.nonzero(out)
    x0, y0, x1, y1 = crop_box(box, 400, 300, 256, 224)
    assert abs(x0 - xs.min()) <= 1 and abs(x1 - (xs.max() + 1)) <= 1
    assert abs(y0 - ys.min()) <= 1 and abs(y1 - (ys.max() + 1)) <= 1
    labels = cell_labels(box, 400, 300, 256, 224).reshape(7, 7)
    centres = 32 * np.arange(7) + 16
    np.testing.assert_array_equal(labels, out[centres][:, centres])


def _saliency(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """|d logit_1 / d x| summed over channels, pooled to a 4x4 grid: a real (weight-dependent)
    explanation, written here independently of the job."""
    x = x.clone().requires_grad_(True)
    model(x)[:, 1].sum().backward()
    g = x.grad.abs().sum(1, keepdim=True)
    return torch.nn.functional.adaptive_avg_pool2d(g, 4).flatten(1).numpy()


def test_randomisation_separates_a_real_method_from_a_constant_map():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 2))
    with torch.no_grad():  # "trained": class 1 reads the top-left quadrant only
        w = torch.zeros(3, 16, 16)
        w[:, :8, :8] = torch.rand(3, 8, 8) + 0.5
        model[1].weight[1] = w.reshape(-1)
    random_model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 2))
    state = randomised_state_dict(model, ["1"], seed=1)
    assert not torch.equal(state["1.weight"], model.state_dict()["1.weight"])
    random_model.load_state_dict(state)
    x = torch.rand(6, 3, 16, 16)
    trained, randomised = _saliency(model, x), _saliency(random_model, x)
    real = np.mean([rank_correlation(a, b) for a, b in zip(trained, randomised)])
    constant = np.mean([rank_correlation(np.ones(16), np.ones(16)) for _ in range(6)])
    assert real < 0.5 < constant == 1.0
    assert rank_correlation(trained[0], trained[0]) == pytest.approx(1.0)
    assert rank_correlation(np.ones(16), trained[0]) == 0.0
    with pytest.raises(ValueError, match="no stage"):
        randomised_state_dict(model, ["layer9"])
