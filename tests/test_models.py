"""Model specs and weights loading, without Ray."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import pickle

import numpy as np
import pytest
import torch
from torchvision.models import get_model_weights

from resnet_features.core import models, weights_table
from resnet_features.core.models import (
    MODEL_NAMES,
    Preprocessing,
    WeightsEntry,
    WeightsError,
    build_model,
    load_state_dict,
    named_weights,
    resolve_model,
)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_registry_names_resolve_through_torchvision(name):
    entry = named_weights(name, "DEFAULT")
    assert entry == WeightsEntry.from_torchvision(get_model_weights(name).DEFAULT)
    assert len(entry.categories) == 1000
    for weights in get_model_weights(name):  # every entry, by short and by full name
        assert named_weights(name, weights.name) == WeightsEntry.from_torchvision(weights)
        assert named_weights(name, str(weights)) == WeightsEntry.from_torchvision(weights)


def test_weights_table_is_torchvisions():
    """The generated table is what the installed torchvision says (else regenerate it with
    `python -m resnet_features.core.weights_table`), and it is the one in use."""
    with open(weights_table.TABLE_PATH) as f:
        stored = json.load(f)
    assert stored == weights_table.generate()
    assert weights_table.load() == stored


def test_weights_table_of_another_torchvision_is_not_used(monkeypatch):
    """A table generated from another torchvision than the installed one is ignored: the
    entries are read from torchvision itself."""
    class ReadTorchvision(Exception):
        pass

    def weights_enum(model):
        raise ReadTorchvision(model)

    weights_table.load.cache_clear()
    monkeypatch.setattr(weights_table, "installed_torchvision", lambda: "0.0.1")
    monkeypatch.setattr(models, "_weights_enum", weights_enum)
    try:
        with pytest.raises(ReadTorchvision):
            named_weights("resnet18", "DEFAULT")
    finally:
        weights_table.load.cache_clear()


def test_unknown_model_and_weights_name_say_what_is_available():
    with pytest.raises(WeightsError, match="choose one of: resnet18"):
        named_weights("resnet9", "DEFAULT")
    with pytest.raises(WeightsError, match="available: DEFAULT, IMAGENET1K_V1"):
        named_weights("resnet34", "IMAGENET1K_V2")


def test_state_dict_spec_takes_preprocessing_and_categories_from_weights(resnet18_weights):
    spec, sd = resolve_model("resnet18", resnet18_weights)
    entry = get_model_weights("resnet18").DEFAULT
    assert spec.preprocessing == Preprocessing.from_weights(entry)
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


def test_named_weights_load_from_the_torch_hub_cache(monkeypatch, tmp_path, resnet18_weights):
    """Named weights are torch hub's file for the entry's URL (what torchvision's
    `get_state_dict` loads); the output names the entry, not a file hash."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = get_model_weights("resnet18").IMAGENET1K_V1.url
    cached = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(open(resnet18_weights, "rb").read())
    spec, sd = resolve_model("resnet18", "DEFAULT")
    assert spec.weights_id == "ResNet18_Weights.IMAGENET1K_V1"
    ref = torch.load(resnet18_weights, weights_only=True)
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)


def test_weights_cross_the_object_store_as_arrays_and_come_back_equal(resnet18_weights):
    """The driver stores the weights as numpy arrays (raw buffers, zero-copy in the actors);
    what an actor rebuilds is the same tensors, dtypes included (bfloat16 has no numpy form and
    stays a tensor), and the model it loads equals the one built from the file."""
    import ray.cloudpickle

    from resnet_features.extract.pipeline import weights_from_store, weights_to_store

    sd = torch.load(resnet18_weights, weights_only=True)
    sd["extra.bf16"] = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    stored = weights_to_store(sd)
    assert isinstance(stored["fc.weight"], np.ndarray)
    assert isinstance(stored["extra.bf16"], torch.Tensor)
    back = weights_from_store(ray.cloudpickle.loads(ray.cloudpickle.dumps(stored)))
    assert back.keys() == sd.keys()
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    del back["extra.bf16"], sd["extra.bf16"]
    spec, _ = resolve_model("resnet18", resnet18_weights)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(build_model(spec, back)(x), build_model(spec, sd)(x))


def test_named_weights_file_with_more_than_tensors_is_refused(monkeypatch, tmp_path):
    """The hub file loads with weights_only=True, as a state_dict file does: an object that is
    not tensors is a WeightsError naming the file, not an unpickled payload."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = get_model_weights("resnet18").IMAGENET1K_V1.url
    cached = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.save({"fc.weight": torch.zeros(1), "note": argparse.Namespace(run="anything")}, cached)
    with pytest.raises(WeightsError, match="weights_only=True"):
        resolve_model("resnet18", "DEFAULT")
