"""core/resnet.py against torchvision's ResNet: same parameters, same outputs, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import get_model_builder

from resnet_features.core.models import build_model, resolve_model
from resnet_features.core.resnet import ARCHITECTURES, resnet
from resnet_features.core.vocab import MODEL_NAMES


def test_every_served_model_has_an_architecture():
    assert set(ARCHITECTURES) == set(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_parameters_and_buffers_as_torchvision(name):
    with torch.device("meta"):
        ours = resnet(name).state_dict()
        theirs = get_model_builder(name)(weights=None).state_dict()
    assert list(ours) == list(theirs)
    assert [v.shape for v in ours.values()] == [v.shape for v in theirs.values()]
    assert [v.dtype for v in ours.values()] == [v.dtype for v in theirs.values()]


def _randomised(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """torchvision's init leaves BN at identity; random BN stats and affine make it count."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in model.state_dict().items():
        if v.dtype != torch.float32:
            sd[k] = v
        elif k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            sd[k] = torch.randn(v.shape, generator=g) * (0.1 if v.ndim > 1 else 0.5)
    return sd


# One of each block type and grouping (basic, bottleneck, grouped, wide), 10 classes for speed.
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_same_outputs_as_torchvision(name):
    torch.manual_seed(1)
    theirs = get_model_builder(name)(weights=None, num_classes=10).eval()
    sd = _randomised(theirs)
    theirs.load_state_dict(sd, strict=True)
    ours = resnet(name, num_classes=10).eval()
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
        assert torch.equal(a, b)
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            assert torch.equal(getattr(ours, stage).state_dict()["0.conv1.weight"],
                               getattr(theirs, stage).state_dict()["0.conv1.weight"])


def test_build_model_gives_torchvision_outputs(resnet18_weights):
    spec, sd = resolve_model("resnet18", resnet18_weights)
    ours = build_model(spec, sd)
    theirs = get_model_builder("resnet18")(weights=None).eval()
    theirs.load_state_dict(sd)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
