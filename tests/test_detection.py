"""Grid maps and region features (--grid, boxes) against an independent eager reference:
`create_feature_extractor` on the same uncropped resize of the EXIF-oriented PIL image, and
`roi_align` on that map for boxes whose stored-frame coordinates come from PIL's own
transposes. Ray-free: Decode and ModelRunner are called directly."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.models import get_model_builder
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from resnet_features.core.models import resolve_model
from resnet_features.core.samples import load_photo
from resnet_features.extract.decode import Decode, DecodeOptions, exif_orientation
from resnet_features.extract.geometry import (
    AspectGeometry,
    BoxError,
    aspect_size,
    map_boxes,
    parse_boxes,
)
from resnet_features.extract.inference import ModelRunner
from resnet_features.extract.outputs import Embedding
from resnet_features.extract.outputs.grid import Grid
from resnet_features.extract.outputs.regions import Regions
from resnet_features.runs.features import box_arrays, grid_arrays, region_arrays

SHORT = 128
#: The transpose that undoes each EXIF orientation's (PIL's exif_transpose) method.
UNDO = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270}


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def stored_photo(oriented: Image.Image, orientation: int, boxes: list[list[int]]):
    """JPEG bytes whose EXIF `orientation` turns them into `oriented`, and `boxes` (given on
    `oriented`) in the stored frame, found by transposing a mask of each box with PIL."""
    stored = oriented if orientation == 1 else oriented.transpose(UNDO[orientation])
    stored_boxes = []
    for x1, y1, x2, y2 in boxes:
        mask = Image.new("L", oriented.size, 0)
        mask.paste(255, (x1, y1, x2, y2))
        if orientation != 1:
            mask = mask.transpose(UNDO[orientation])
        stored_boxes.append(_bbox(np.asarray(mask) > 0))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue(), stored_boxes


def test_aspect_size_rounds_each_side_to_the_stride():
    g = AspectGeometry(448)
    assert aspect_size(640, 480, g) == (608, 448)  # 597.3 -> 608, 448 -> 448
    assert aspect_size(480, 640, g) == (448, 608)
    assert aspect_size(640, 480, AspectGeometry(448, 500)) == (512, 384)  # 500 x 375
    assert aspect_size(1000, 100, AspectGeometry(128, None, 16)) == (1280, 128)
    assert aspect_size(20, 20, AspectGeometry(8)) == (32, 32)  # at least one stride


@pytest.mark.parametrize("orientation", range(1, 9))
def test_boxes_follow_exif_orientation(orientation):
    """An asymmetric box and one touching two borders land where PIL puts those pixels."""
    oriented = Image.fromarray(load_photo("astronaut")[:300, :200])  # 200 x 300
    boxes = [[12, 40, 70, 61], [150, 0, 200, 300]]
    data, stored = stored_photo(oriented, orientation, boxes)
    assert exif_orientation(data) == orientation
    got, scaled = map_boxes(json.dumps(stored), orientation, 200, 300, 100, 150, "stored")
    np.testing.assert_allclose(got, boxes)
    np.testing.assert_allclose(scaled, np.array(boxes) / 2)
    got, _ = map_boxes(boxes, orientation, 200, 300, 200, 300, "oriented")
    np.testing.assert_allclose(got, boxes)


@pytest.mark.parametrize("cell, message", [
    ([[0, 0, 201, 10]], "box 0 [0, 0, 201, 10] is outside the 200x300 image"),
    ([[1, 1, 5, 5], [10, 5, 4, 20]], "box 1 [10, 5, 4, 20] is inverted"),
    ([[1, 1, 1, 5]], "box 0 [1, 1, 1, 5] is empty"),
    ("[[1, 2, NaN, 5]]", "box 0 [1, 2, nan, 5] has a non-finite"),
    ([1, 2, 3], "not a multiple of 4"),
    (None, "no boxes for this input"),
])
def test_bad_boxes_are_named(cell, message):
    with pytest.raises(BoxError, match=message.replace("[", r"\[").replace("]", r"\]")):
        map_boxes(cell, 1, 200, 300, 100, 150, "stored")


@pytest.fixture(scope="module")
def reference_model(resnet18_weights):
    model = get_model_builder("resnet18")(weights=None)
    model.load_state_dict(torch.load(resnet18_weights, weights_only=True))
    return create_feature_extractor(model.eval(), {"layer3": "layer3", "layer4": "layer4"})


def reference_maps(model, data: bytes, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The eager reference: PIL decode + exif_transpose, torchvision's resize to the job's
    size (Pillow's antialiased bilinear on the PIL image), ImageNet normalisation."""
    with Image.open(io.BytesIO(data)) as im:
        img = ImageOps.exif_transpose(im).convert("RGB")
    x = TF.pil_to_tensor(TF.resize(img, [size[1], size[0]], antialias=True)).float() / 255
    x = TF.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with torch.no_grad():
        return model(x.unsqueeze(0))


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1])
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


@pytest.mark.parametrize("backend", ["auto", "pillow"])
def test_grid_and_regions_match_eager_reference(resnet18_weights, reference_model, backend):
    spec, state = resolve_model("resnet18", resnet18_weights)
    cases = [("chelsea", 1, (300, 220)), ("astronaut", 6, (260, 200)),
             ("coffee", 3, (320, 240)), ("rocket", 8, (180, 300)), ("camera", 1, (256, 256))]
    datas, boxes_oriented, stored_boxes = [], [], []
    for name, orientation, size in cases:
        arr = load_photo(name)
        oriented = Image.fromarray(arr).convert("RGB").resize(size)
        w, h = size
        boxes = [[0, 0, w, h], [5, 10, w // 3, h // 2 + 7], [w - 60, h - 45, w, h],
                 [0, h // 3, 37, h // 3 + 80]]
        data, stored = stored_photo(oriented, orientation, boxes)
        datas.append(data)
        boxes_oriented.append(np.array(boxes, dtype=np.float32))
        stored_boxes.append(json.dumps(stored))
    stored_boxes[-1] = "[]"  # an image with zero boxes
    boxes_oriented[-1] = np.zeros((0, 4), dtype=np.float32)
    n = len(cases)
    batch = {"uri": np.array([f"img{i}" for i in range(n)], dtype=object),
             "index": np.arange(n), "bytes": np.array(datas + [], dtype=object),
             "boxes_in": np.array(stored_boxes, dtype=object)}
    geometry = AspectGeometry(SHORT, None, 32)
    decoded = Decode(spec.preprocessing, DecodeOptions(aspect=geometry, backend=backend))(batch)
    assert not any(decoded["error_stage"]), decoded["error_message"]
    units = (Embedding(512), Grid({"layer3": 256, "layer4": 512}, geometry),
             Regions("layer4", 512, "float32", maps=True))
    out = ModelRunner(spec, state, outputs=units)(decoded)
    cols = {"uri": pa.array(out["uri"].astype(str))}
    for unit in units:
        cols.update(unit.encode(out, "part-00000"))
    table = pa.table(cols)
    grids4, grids3 = grid_arrays(table, "layer4"), grid_arrays(table, "layer3")
    boxes, feats = box_arrays(table), region_arrays(table)
    maps = region_arrays(table, "region_maps")
    grid_cos, region_cos = [], []
    for i, (name, _orientation, size) in enumerate(cases):
        w, h = size
        new = (round(w * SHORT / min(w, h) / 32) * 32, round(h * SHORT / min(w, h) / 32) * 32)
        assert grids4[i].shape == (new[1] // 32, new[0] // 32, 512), (name, grids4[i].shape)
        assert grids3[i].shape == (new[1] // 16, new[0] // 16, 256)
        ref = reference_maps(reference_model, datas[i], new)
        grid_cos += [_cos(grids4[i], ref["layer4"][0].permute(1, 2, 0).numpy()),
                     _cos(grids3[i], ref["layer3"][0].permute(1, 2, 0).numpy())]
        np.testing.assert_allclose(boxes[i], boxes_oriented[i], atol=1e-4)
        scale = torch.tensor([new[0] / w, new[1] / h] * 2)
        ref_pool = roi_align(ref["layer4"], [torch.from_numpy(boxes_oriented[i]) * scale],
                             output_size=7, spatial_scale=1 / 32, sampling_ratio=0,
                             aligned=True)
        assert feats[i].shape == (len(boxes_oriented[i]), 512)
        assert maps[i].shape == (len(boxes_oriented[i]), 7, 7, 512)
        if len(boxes_oriented[i]):
            region_cos.append(_cos(feats[i], ref_pool.mean((2, 3)).numpy()))
            np.testing.assert_allclose(maps[i].mean((1, 2)), feats[i], rtol=1e-4, atol=1e-5)
    grid_cos, region_cos = np.concatenate(grid_cos), np.concatenate(region_cos)
    assert grid_cos.mean() >= 0.999 and grid_cos.min() >= 0.99, (grid_cos.mean(), grid_cos.min())
    assert region_cos.mean() >= 0.999 and region_cos.min() >= 0.99, region_cos
    # The embedding comes from the same uncropped pass: the mean of the layer4 map.
    for i in range(n):
        np.testing.assert_allclose(out["embedding"][i], grids4[i].astype(np.float32).mean((0, 1)),
                                   rtol=2e-3, atol=2e-3)


def test_bad_box_is_an_error_row_and_the_rest_proceed(resnet18_weights):
    spec, state = resolve_model("resnet18", resnet18_weights)
    img = Image.fromarray(load_photo("chelsea")).resize((200, 150))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    cells = ["[[0, 0, 50, 50]]", "[[10, 10, 5, 40]]", "[[0, 0, 300, 20]]", "[]", None]
    n = len(cells)
    batch = {"uri": np.array([f"u{i}" for i in range(n)], dtype=object), "index": np.arange(n),
             "bytes": np.array([buf.getvalue()] * n, dtype=object),
             "boxes_in": np.array(cells, dtype=object)}
    geometry = AspectGeometry(64, None, 32)
    decoded = Decode(spec.preprocessing, DecodeOptions(aspect=geometry))(batch)
    assert list(decoded["error_stage"]) == ["", "preprocess", "preprocess", "", "preprocess"]
    assert "box 0 [10, 10, 5, 40] is inverted" in decoded["error_message"][1]
    assert "box 0 [0, 0, 300, 20] is outside the 200x150 image" in decoded["error_message"][2]
    unit = Regions("layer4", 512)
    out = ModelRunner(spec, state, outputs=(unit,))(decoded)
    ok = np.array([0, 3])
    table = pa.table(unit.encode({k: v[ok] for k, v in out.items()}, "p"))
    assert [len(b) for b in box_arrays(table)] == [1, 0]
    assert table.schema.field("region_features").type == pa.list_(pa.list_(pa.float16(), 512))


def test_large_rows_get_small_files_and_row_groups():
    """A ResNet-152 layer4 grid at 448 (~1.1 MB/row in float16) must not use the pooled
    embedding's ~16,000 rows per file, and its row groups stay around 16 MB."""
    from resnet_features.extract.writer import auto_row_group_rows, auto_rows_per_file

    grid = Grid({"layer4": 2048}, AspectGeometry(448, None, 32))
    assert grid.row_bytes() == 14 * 19 * 2048 * 2  # 448 x 597 -> 448 x 608 -> 14 x 19 cells
    assert 100 <= auto_rows_per_file((Embedding(2048), grid)) <= 130
    assert 10 <= auto_row_group_rows((Embedding(2048), grid)) <= 20
    regions = Regions("layer4", 2048, "float32")
    regions.sized_for(pa.table({"boxes_in": [json.dumps([[0, 0, 1, 1]] * 100)] * 3}))
    assert regions.row_bytes() == 100 * (16 + 4 * 2048)
    assert auto_rows_per_file((regions,)) < 200


def _listing(uris):
    from resnet_features.extract.inputs.common import Listing, listing_table

    n = len(uris)
    return Listing(table=listing_table(uris, [1] * n, uris, [-1] * n, [-1] * n, [""] * n),
                   skipped_non_image=0, seconds=0.0)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_sidecar_boxes_join_on_uri_or_relative_path(tmp_path, kind):
    from resnet_features.extract.inputs.boxes import attach_boxes

    root = str(tmp_path / "imgs")
    uris = [f"{root}/a.jpg", f"{root}/sub/b.jpg", f"{root}/c.jpg", f"{root}/shard.tar#m/d.jpg"]
    entries = [(uris[0], [[1, 2, 3, 4]]), ("sub/b.jpg", [[0, 0, 5, 5], [1, 1, 2, 2]]),
               ("shard.tar#m/d.jpg", []), ("nowhere.jpg", [[0, 0, 1, 1]])]
    path = str(tmp_path / f"boxes.{kind}")
    if kind == "jsonl":
        with open(path, "w") as f:
            f.writelines(json.dumps({"uri": u, "boxes": b}) + "\n" for u, b in entries)
    else:
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"uri": [u for u, _ in entries],
                                 "boxes": [b for _, b in entries]}), path)
    listing = attach_boxes(_listing(uris), input_uri=root, sidecar=path)
    cells = listing.table.column("boxes_in").to_pylist()
    assert [json.loads(c) if c else c for c in cells] == [
        [[1, 2, 3, 4]], [[0, 0, 5, 5], [1, 1, 2, 2]], None, []]
    # c.jpg has no entry: its row fails at decode with a message saying so
    with pytest.raises(BoxError, match="no boxes for this input"):
        map_boxes(cells[2], 1, 10, 10, 10, 10, "stored")


def test_sidecar_matching_nothing_is_an_input_error(tmp_path):
    from resnet_features.core.errors import InputError
    from resnet_features.extract.inputs.boxes import attach_boxes

    path = tmp_path / "boxes.jsonl"
    path.write_text(json.dumps({"uri": "other/x.jpg", "boxes": []}) + "\n")
    with pytest.raises(InputError, match="none of its 1 uris matches"):
        attach_boxes(_listing(["/data/a.jpg"]), input_uri="/data", sidecar=str(path))


@pytest.mark.parametrize("argv, message", [
    (["--grid", "layer4"], "need the aspect-preserving geometry"),
    (["--grid", "layer5", "--resize-short", "64"], "--grid: unknown layer"),
    (["--resize-short", "64", "--max-size", "32"], "smaller than --resize-short"),
    (["--boxes-column", "b", "--input-format", "images", "--resize-short", "64"],
     "--boxes-column applies to parquet and manifest"),
    (["--boxes-column", "b", "--boxes-file", "x.jsonl", "--resize-short", "64"], "give one"),
    (["--resize-short", "64", "--task", "both,explain"], "does not combine"),
    (["--region-maps", "--resize-short", "64", "--grid", "layer4"], "--region-maps needs boxes"),
])
def test_detection_flags_are_checked(argv, message):
    from resnet_features.core.config import ConfigError, config_from_args, get_args_parser

    with pytest.raises(ConfigError, match=message):
        config_from_args(get_args_parser().parse_args(["--input", "i", "--output", "o", *argv]))


@pytest.mark.slow
def test_image_folder_with_sidecar_end_to_end(resnet18_weights, reference_model, ray_local,
                                              tmp_path):
    """Photos of different sizes and EXIF orientations in one batch (images travel through Ray
    as arrays of different shapes), boxes from a JSON-lines sidecar in the stored frame with
    relative uris; one photo's box lies outside it (an error row), one has no boxes."""
    from resnet_features.core.config import config_from_args, get_args_parser
    from resnet_features.extract.pipeline import run
    from resnet_features.runs.catalog import load_detection_features

    folder = tmp_path / "imgs"
    folder.mkdir()
    cases = [("chelsea", 6, (300, 220)), ("coffee", 3, (200, 260)), ("rocket", 8, (180, 300)),
             ("astronaut", 1, (256, 256)), ("camera", 5, (240, 160)), ("coins", 1, (200, 100))]
    expected, lines = {}, []
    for k, (name, orientation, (w, h)) in enumerate(cases):
        oriented = Image.fromarray(load_photo(name)).convert("RGB").resize((w, h))
        boxes = [[0, 0, w // 2, h // 3], [w // 4, h // 2, w, h]] if k != 3 else []
        data, stored = stored_photo(oriented, orientation, boxes)
        rel = f"{k}_{name}.jpg"
        (folder / rel).write_bytes(data)
        if k == 5:
            stored = [[0, 0, 500, 10]]  # outside the 200x100 photo
        lines.append(json.dumps({"uri": rel, "boxes": stored}))
        expected[str(folder / rel)] = (np.array(boxes, dtype=np.float32).reshape(-1, 4),
                                       data, (w, h))
    (tmp_path / "boxes.jsonl").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    cfg = config_from_args(get_args_parser().parse_args([
        "--input", str(folder), "--output", out, "--model", "resnet18", "--weights",
        resnet18_weights, "--task", "embed", "--resize-short", "96", "--boxes-file",
        str(tmp_path / "boxes.jsonl"), "--decode-batch-size", "8", "--batch-size", "8",
        "--run-id", "r", "--max-error-rate", "0.5"]))
    result = run(cfg)
    assert result.exit_code == 0, result.reason
    assert result.summary["failed_by_stage"] == {"preprocess": 1}
    errors = pa.concat_tables([pq.read_table(p) for p in
                               (tmp_path / "out" / "run=r" / "_errors").glob("*.parquet")])
    assert "box 0 [0, 0, 500, 10] is outside the 200x100 image" in errors["message"][0].as_py()
    got = load_detection_features(out, grid=())
    assert len(got["uri"]) == 5
    cos = []
    for uri, boxes, feats, w, h in zip(got["uri"], got["boxes"], got["region_features"],
                                       got["width"], got["height"]):
        want, data, size = expected[uri]
        assert (w, h) == size
        np.testing.assert_allclose(boxes, want, atol=1e-4)
        if not len(want):
            assert feats.shape == (0, 512)
            continue
        sw, sh = size
        new = (round(sw * 96 / min(size) / 32) * 32, round(sh * 96 / min(size) / 32) * 32)
        ref = reference_maps(reference_model, data, new)["layer4"]
        scale = torch.tensor([new[0] / sw, new[1] / sh] * 2)
        pooled = roi_align(ref, [torch.from_numpy(want) * scale], 7, 1 / 32, 0, True)
        cos.append(_cos(feats, pooled.mean((2, 3)).numpy()))
    cos = np.concatenate(cos)
    assert cos.mean() >= 0.999 and cos.min() >= 0.99, cos


def test_csv_manifest_boxes_column_travels_as_json(tmp_path):
    """A CSV manifest's boxes column (JSON text) joins the listing; kept columns stay carried."""
    from resnet_features.extract.inputs import InputSpec, list_inputs
    from resnet_features.extract.inputs.boxes import attach_boxes

    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "b.jpg").write_bytes(b"y")
    (tmp_path / "m.csv").write_text('uri,boxes,label\na.jpg,"[[1, 2, 3, 4]]",cat\nb.jpg,[],dog\n')
    listing = list_inputs(str(tmp_path / "m.csv"), InputSpec(format="manifest",
                                                             keep_columns=("label", "boxes")))
    listing = attach_boxes(listing, input_uri=str(tmp_path / "m.csv"), column="boxes",
                           keep=("label",))
    assert listing.table.column("boxes_in").to_pylist() == ["[[1, 2, 3, 4]]", "[]"]
    assert listing.extra.column_names == ["label"]
    assert [parse_boxes(c).shape for c in listing.table.column("boxes_in").to_pylist()] == [
        (1, 4), (0, 4)]
