"""image_ops.py against torchvision's public functions, and the worker modules' imports."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from resnet_features.core.samples import PHOTO_NAMES, load_photo
from resnet_features.extract.image_ops import decode_jpeg_rgb, resize


def _jpeg(arr: np.ndarray, **kw) -> torch.Tensor:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", **kw)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


@pytest.mark.parametrize("kind", ["rgb", "grey", "progressive", "photo"])
def test_decode_jpeg_equals_torchvision(kind):
    rng = np.random.default_rng(0)
    if kind == "photo":
        data = _jpeg(load_photo(PHOTO_NAMES[0]), quality=90)
    elif kind == "grey":
        data = _jpeg(rng.integers(0, 256, (37, 53), dtype=np.uint8))
    else:
        data = _jpeg(rng.integers(0, 256, (61, 45, 3), dtype=np.uint8),
                     progressive=kind == "progressive")
    ours = decode_jpeg_rgb(data)
    assert ours.shape[0] == 3 and ours.dtype == torch.uint8
    assert torch.equal(ours, decode_jpeg(data, mode=ImageReadMode.RGB))


def test_decode_jpeg_rejects_garbage():
    with pytest.raises(RuntimeError):
        decode_jpeg_rgb(torch.frombuffer(bytearray(b"\xff\xd8not a jpeg"), dtype=torch.uint8))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("size", [(232, 310), (40, 29), (512, 700)])
def test_resize_equals_torchvision(interpolation, antialias, layout, size):
    photo = torch.from_numpy(load_photo(PHOTO_NAMES[1]))  # HWC
    chw = photo.permute(2, 0, 1)  # a channels_last view, as decode.py passes Pillow's arrays
    if layout == "contiguous":
        chw = chw.contiguous()
    ours = resize(chw, size, interpolation, antialias)
    theirs = TF.resize(chw, list(size), interpolation=TF.InterpolationMode(interpolation),
                       antialias=antialias)
    assert ours.shape == theirs.shape == (3, *size)
    assert torch.equal(ours, theirs)


def test_resize_same_size_is_identity():
    x = torch.zeros(3, 5, 7, dtype=torch.uint8)
    assert resize(x, (5, 7), "bilinear", True) is x


# What a Ray worker imports to run a decode task or host a model actor: the modules whose
# classes and functions Ray unpickles there (Decode, ReadBytes, _ModelActor, ModelRunner,
# every output unit); then an actor's model built from a state_dict (through a meta-device
# skeleton) and run, and a JPEG decoded.
WORKER_CODE = """
import io, numpy as np
from PIL import Image
from resnet_features.extract import pipeline, decode, inference, outputs
from resnet_features.extract.inputs import ReadBytes
from resnet_features.core.models import ModelSpec, Preprocessing
from resnet_features.core.resnet import resnet
prep = Preprocessing(256, 224, (0.5,) * 3, (0.5,) * 3, "bilinear", True, "test")
spec = ModelSpec(name="resnet18", weights="w.pth", weights_id="sha256:0", preprocessing=prep,
                 categories=tuple(map(str, range(1000))), embedding_dim=512, num_classes=1000)
runner = inference.ModelRunner(spec, resnet("resnet18").state_dict(), inference.InferenceOptions())
runner.forward(np.zeros((2, 64, 64, 3), np.uint8))
buf = io.BytesIO(); Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(buf, "JPEG")
img = decode.decode_image(buf.getvalue(), prep, decode.DecodeOptions())
assert img.pixels.shape == (224, 224, 3)
"""


def test_workers_import_neither_torchvision_nor_dynamo():
    res = subprocess.run([sys.executable, "-X", "importtime", "-c", WORKER_CODE],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    heavy = re.findall(r"\|\s+(torchvision|torch\._dynamo|torch\._inductor)(\.\S*)?\s*$",
                       res.stderr, flags=re.M)
    assert not heavy, sorted({m[0] + m[1] for m in heavy})
    assert re.search(r"\|\s+torch\s*$", res.stderr, flags=re.M)  # the check can see imports


# The driver's start-up: importing the pipeline (before `ray.init`, which starts Ray's processes
# on the other core) must not import torch; the plan then resolves the weights from a state_dict
# and builds the output units, which imports torch but not torchvision (its weights entries come
# from core/weights_table.py when it matches the installed torchvision).
DRIVER_CODE = """
import sys
from resnet_features.extract import pipeline
assert "torch" not in sys.modules, "importing the pipeline imported torch"
import torch
from resnet_features.core.resnet import resnet
from resnet_features.core.models import resolve_model, named_weights
from resnet_features.extract.outputs import build_outputs
from resnet_features.core.config import config_from_args, get_args_parser
torch.save(resnet("resnet18").state_dict(), sys.argv[1])
spec, sd = resolve_model("resnet18", sys.argv[1])
named_weights("resnet50", "ResNet50_Weights.IMAGENET1K_V1")
args = get_args_parser().parse_args(["--input", "i", "--output", "o", "--task", "both", "--layers", "layer3"])
build_outputs(config_from_args(args), spec)
assert spec.preprocessing.source == "ResNet18_Weights.IMAGENET1K_V1" and len(spec.categories) == 1000
"""


def test_driver_imports_torch_after_pipeline_and_never_torchvision(tmp_path):
    res = subprocess.run([sys.executable, "-X", "importtime", "-c", DRIVER_CODE,
                          str(tmp_path / "w.pth")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    heavy = re.findall(r"\|\s+(torchvision|torch\._dynamo)(\.\S*)?\s*$", res.stderr, flags=re.M)
    assert not heavy, sorted({m[0] + m[1] for m in heavy})
    assert re.search(r"\|\s+torch\s*$", res.stderr, flags=re.M)  # the check can see imports
