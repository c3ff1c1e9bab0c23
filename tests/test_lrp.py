"""--explain-method lrp: zennit's LRP as the job uses it, checked against LRP's definition
(conservation, a hand-computed two-layer case) and the canonizer against eager torchvision."""

from __future__ import annotations

import numpy as np
import torch
from helpers import photo_batch
from torchvision.models import get_model_builder, get_model_weights

from resnet_features.core.models import resolve_model
from resnet_features.extract.outputs.explain import Explainer, lrp_relevance


def test_relevance_is_conserved_on_a_bias_free_network():
    """Without biases every LRP rule of EpsilonPlusFlat (flat, z+, epsilon, max-pool winners,
    average pooling) passes the whole relevance on: the pixels' relevance sums to the logit."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1, bias=False), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1, bias=False), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(16, 5, bias=False)).eval()
    x = torch.randn(4, 3, 16, 16)
    target = torch.tensor([0, 1, 2, 3])
    logits = net(x).gather(1, target[:, None])[:, 0].detach()
    assert (logits.abs() > 1e-3).all()
    rel = lrp_relevance(net, x, target, canonize=False)
    assert rel.shape == x.shape
    np.testing.assert_allclose(rel.sum((1, 2, 3)).numpy(), logits.numpy(), rtol=1e-4, atol=1e-6)


def test_two_layer_network_by_hand():
    """Input 1x4, conv (kernel 2) -> ReLU -> conv (kernel 3) -> 2 logits, no biases.

    Flat rule (first layer): each hidden unit's relevance splits evenly over its 2 pixels.
    z+ rule (second layer): hidden unit k gets R * a_k v+_k / sum_k a_k v+_k (negative weights
    give nothing)."""
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 1, (1, 2), bias=False), torch.nn.ReLU(),
        torch.nn.Conv2d(1, 2, (1, 3), bias=False), torch.nn.Flatten()).eval()
    w = torch.tensor([1.0, 0.5])
    v = torch.tensor([[3.0, -1.0, 1.0], [0.5, 0.5, 0.5]])
    with torch.no_grad():
        net[0].weight.copy_(w.view(1, 1, 1, 2))
        net[2].weight.copy_(v.view(2, 1, 1, 3))
    x = torch.tensor([1.0, 2.0, 0.5, 4.0]).view(1, 1, 1, 4)
    a = np.array([1 + 1.0, 2 + 0.25, 0.5 + 2.0])  # relu(w . window): 2, 2.25, 2.5
    z = 3 * a[0] - a[1] + a[2]  # logit 0 = 6.25
    vp = np.array([3.0, 0.0, 1.0])
    r_hidden = z * a * vp / (a * vp).sum()  # [4.6875, 0, 1.5625]
    r_input = np.array([r_hidden[0] / 2, (r_hidden[0] + r_hidden[1]) / 2,
                        (r_hidden[1] + r_hidden[2]) / 2, r_hidden[2] / 2])
    rel = lrp_relevance(net, x, torch.tensor([0]), canonize=False)
    np.testing.assert_allclose(rel.view(-1).numpy(), r_input, rtol=1e-5)


def _resnet(weights_path: str) -> torch.nn.Module:
    model = get_model_builder("resnet18")(weights=None)
    model.load_state_dict(torch.load(weights_path, weights_only=True))
    return model.eval()


def test_canonized_resnet_keeps_logits_and_is_restored(resnet18_weights):
    """The canonizer (batch norm merged into convolutions, residual sums as modules) must not
    change the function; after LRP the job's model is its old self again."""
    from zennit.torchvision import ResNetCanonizer

    x = photo_batch(get_model_weights("resnet18").DEFAULT.transforms(), 4)
    reference = _resnet(resnet18_weights)  # an independent eager copy
    with torch.no_grad():
        expected = reference(x)
    model = _resnet(resnet18_weights)
    canonizer = ResNetCanonizer()
    handles = canonizer.apply(model)
    try:
        bn = model.layer1[0].bn1
        assert torch.allclose(bn.weight, torch.ones_like(bn.weight)), "batch norm is merged"
        with torch.no_grad():
            canon = model(x)
    finally:
        for h in handles:
            h.remove()
    # float32 rounding of the merged weights only: within 1e-3 of the logits' scale
    scale = float(expected.abs().max())
    torch.testing.assert_close(canon, expected, rtol=0, atol=1e-3 * scale)
    assert (canon.argmax(1) == expected.argmax(1)).all()

    # the job's path: the Explainer on the runner's own model leaves it unchanged
    spec, _ = resolve_model("resnet18", resnet18_weights)
    explainer = Explainer(spec, None, "lrp", model=model)
    crops = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), np.uint8)
    maps = explainer(crops, np.array([3, 5]))
    assert maps.shape == (2, 49) and maps.dtype == np.float16
    assert float(maps.max()) == 1.0 and float(maps.min()) >= 0.0
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
