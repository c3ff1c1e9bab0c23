"""Model specs and weights loading, without Ray."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle

import pytest
import torch
from torchvision.models import get_model_weights

from resnet_features.core.models import (
    MODEL_NAMES,
    WeightsError,
    build_model,
    load_state_dict,
    named_weights,
    resolve_model,
)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_registry_names_resolve_through_torchvision(name):
    entry = named_weights(name, "DEFAULT")
    assert entry is get_model_weights(name).DEFAULT
    assert len(entry.meta["categories"]) == 1000


def test_unknown_model_and_weights_name_say_what_is_available():
    with pytest.raises(WeightsError, match="choose one of: resnet18"):
        named_weights("resnet9", "DEFAULT")
    with pytest.raises(WeightsError, match="available: DEFAULT, IMAGENET1K_V1"):
        named_weights("resnet34", "IMAGENET1K_V2")


def test_state_dict_spec_takes_preprocessing_and_categories_from_weights(resnet18_weights):
    spec, sd = resolve_model("resnet18", resnet18_weights)
    entry = get_model_weights("resnet18").DEFAULT
    assert spec.preprocessing.resize_size == entry.transforms().resize_size[0]
    assert spec.categories == tuple(entry.meta["categories"])
    assert spec.embedding_dim == 512
    with open(resnet18_weights, "rb") as f:
        assert spec.weights_id == "sha256:" + hashlib.sha256(f.read()).hexdigest()
    model = build_model(spec, sd)
    ref = torch.load(resnet18_weights, weights_only=True)
    assert torch.equal(model.state_dict()["fc.weight"], ref["fc.weight"])
    assert spec == pickle.loads(pickle.dumps(spec))  # the spec travels to Ray actors


def test_preprocess_from_other_entry(resnet18_weights, tmp_path):
    sd = torch.load(resnet18_weights, weights_only=True)
    path = tmp_path / "r50.pth"
    torch.save(build_model(resolve_model("resnet50", "random")[0], None).state_dict(), path)
    spec, _ = resolve_model("resnet50", str(path), preprocess_from="IMAGENET1K_V1")
    assert spec.preprocessing.resize_size == 256
    assert spec.preprocessing.source == "ResNet50_Weights.IMAGENET1K_V1"
    assert sd  # the resnet18 file is a plain dict of tensors


def test_random_weights_are_explicit_and_recorded(caplog):
    spec, sd = resolve_model("resnet18", "random")
    assert sd is None and spec.weights_id == "random"
    assert "RANDOM weights" in caplog.text
    with pytest.raises(WeightsError, match="no tensors"):  # only "random" may build without
        build_model(dataclasses.replace(spec, weights_id="sha256:00"), None)


def test_sha256_pin_and_weights_only(resnet18_weights, tmp_path):
    with pytest.raises(WeightsError, match="expected"):
        load_state_dict(resnet18_weights, sha256="0" * 64)
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(1), "payload": _Evil()}, evil)
    with pytest.raises(WeightsError, match="weights_only=True"):
        load_state_dict(str(evil))
    not_sd = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_sd)
    with pytest.raises(WeightsError, match="does not hold a state_dict"):
        load_state_dict(str(not_sd))
    with pytest.raises(WeightsError, match="cannot read"):
        load_state_dict(str(tmp_path / "missing.pth"))


class _Evil:
    """An arbitrary object: unpickling it would run code, which weights_only=True refuses."""
