"""Decode stage, without Ray: torchvision's geometry, exact pixels, modes, orientation, errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import ResNet50_Weights
from torchvision.transforms import functional as F

from resnet_features.core.models import Preprocessing
from resnet_features.core.samples import load_photo
from resnet_features.extract.decode import Decode, DecodeOptions, decode_image, resize_geometry

WEIGHTS = ResNet50_Weights.IMAGENET1K_V2
PREP = Preprocessing.from_weights(WEIGHTS)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def reference_uint8(img: Image.Image) -> np.ndarray:
    """torchvision's own resize + center_crop on the PIL image, as HWC uint8."""
    t = WEIGHTS.transforms()
    out = F.center_crop(F.resize(img, t.resize_size, interpolation=t.interpolation), t.crop_size)
    return np.asarray(out)


def test_preprocessing_comes_from_weights():
    t = WEIGHTS.transforms()
    assert PREP.resize_size == t.resize_size[0] == 232
    assert PREP.crop_size == 224
    assert PREP.mean == tuple(t.mean) and PREP.std == tuple(t.std)
    assert PREP.source == "ResNet50_Weights.IMAGENET1K_V2"


@pytest.mark.parametrize("size", [(224, 224), (1, 1), (5000, 8), (8, 5000), (451, 300),
                                  (300, 451), (233, 1000), (4032, 3024)])
def test_geometry_matches_torchvision(size):
    w, h = size
    new_w, new_h, left, top = resize_geometry(w, h, 232, 224)
    rw, rh = F.resize(Image.new("RGB", (w, h)), [232]).size
    assert (new_w, new_h) == (rw, rh)
    assert left == int(round((rw - 224) / 2.0)) and top == int(round((rh - 224) / 2.0))


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "camera"])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_pixels_match_reference_transforms(name, fmt):
    data = encode(Image.fromarray(load_photo(name)), fmt)
    ours = decode_image(data, PREP, DecodeOptions()).pixels
    ref = reference_uint8(Image.open(io.BytesIO(data)).convert("RGB"))
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
    assert diff.max() <= 2 and diff.mean() < 0.05


def test_large_jpeg_draft_stays_faithful():
    big = Image.fromarray(load_photo("retina")).resize((2400, 2400))
    data = encode(big, "JPEG", quality=90)
    fast = decode_image(data, PREP, DecodeOptions()).pixels.astype(np.float32).ravel()
    ref = reference_uint8(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float32).ravel()
    fast_c, ref_c = fast - fast.mean(), ref - ref.mean()
    assert float(fast_c @ ref_c / np.linalg.norm(fast_c) / np.linalg.norm(ref_c)) > 0.99


def test_exif_orientation_applied():
    arr = load_photo("chelsea")  # 451 wide, 300 high
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(img, "JPEG", exif=exif.tobytes(), quality=95)
    dec = decode_image(data, PREP, DecodeOptions())
    assert (dec.width, dec.height) == (300, 451)
    upright = Image.open(io.BytesIO(data)).transpose(Image.Transpose.ROTATE_270)
    diff = np.abs(dec.pixels.astype(int) - reference_uint8(upright).astype(int))
    assert diff.mean() < 0.5


def _in_mode(rgb: Image.Image, mode: str) -> tuple[Image.Image, str]:
    """The photo in a Pillow mode, with a format that stores that mode."""
    if mode == "I;16":
        return Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257), "PNG"
    if mode == "P+transparency":
        img = rgb.convert("P")
        img.info["transparency"] = 0
        return img, "PNG"
    return rgb.convert(mode), {"CMYK": "JPEG", "F": "TIFF", "I": "TIFF", "YCbCr": "JPEG"}.get(mode, "PNG")


@pytest.mark.parametrize("mode", ["L", "LA", "P", "P+transparency", "RGBA", "CMYK", "YCbCr",
                                  "I;16", "I", "1", "F"])
def test_any_mode_becomes_rgb(mode):
    img, fmt = _in_mode(Image.fromarray(load_photo("coffee")), mode)
    dec = decode_image(encode(img, fmt), PREP, DecodeOptions())
    assert dec.pixels.shape == (224, 224, 3) and dec.pixels.dtype == np.uint8
    assert dec.pixels.std() > 5  # a real picture, not a blank


def test_sixteen_bit_grey_keeps_contrast():
    grey = np.asarray(Image.fromarray(load_photo("camera")))
    img16 = Image.fromarray(grey.astype(np.uint16) * 257)
    dec16 = decode_image(encode(img16, "PNG"), PREP, DecodeOptions()).pixels
    dec8 = decode_image(encode(Image.fromarray(grey), "PNG"), PREP, DecodeOptions()).pixels
    assert np.abs(dec16.astype(int) - dec8.astype(int)).max() <= 1


def test_transparency_composited_on_white():
    img = Image.new("RGBA", (300, 300), (10, 20, 30, 0))
    dec = decode_image(encode(img, "PNG"), PREP, DecodeOptions())
    assert (dec.pixels == 255).all()


def test_batch_stage_turns_bad_bytes_into_error_rows():
    good = encode(Image.fromarray(load_photo("rocket")), "JPEG")
    batch = {
        "index": np.arange(3),
        "uri": np.array(["a.jpg", "b.jpg", "c.jpg"], dtype=object),
        "bytes": np.array([good, b"not an image", good[: len(good) // 3]], dtype=object),
    }
    out = Decode(PREP)(batch)
    assert list(out["error_stage"]) == ["", "decode", "decode"]
    assert out["error_type"][1] == "UnidentifiedImageError"
    assert "truncated" in out["error_message"][2]
    assert out["image"].shape == (3, 224, 224, 3) and out["image"][0].std() > 5
    assert out["width"][0] == 640 and "bytes" not in out


def test_normalisation_matches_torchvision_float_path():
    """uint8 HWC -> normalised NCHW the way the model stage does it, vs torchvision's."""
    from resnet_features.extract.inference import InferenceOptions, ModelRunner  # noqa: F401

    img = Image.fromarray(load_photo("astronaut"))
    pix = decode_image(encode(img, "PNG"), PREP, DecodeOptions()).pixels
    std = torch.tensor(PREP.std).view(1, 3, 1, 1)
    mean = torch.tensor(PREP.mean).view(1, 3, 1, 1)
    ours = torch.from_numpy(pix.copy()).permute(2, 0, 1)[None].float() * (1 / (255 * std)) - (
        mean / std)
    ref = F.normalize(F.convert_image_dtype(torch.from_numpy(pix.copy()).permute(2, 0, 1),
                                            torch.float), PREP.mean, PREP.std)[None]
    assert torch.allclose(ours, ref, atol=1e-5)
