"""cluster.yaml: valid for Ray's own autoscaler schema, pinned like pyproject.toml, no secrets."""

from __future__ import annotations

import copy
import os
import re

import jsonschema
import pytest
import yaml
from helpers import ROOT


def _load(name: str):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(_load("cluster.yaml"))
    # What `ray up` does before it touches AWS: fill in the provider defaults, then check the
    # result against ray/autoscaler/ray-schema.json (raises on anything the launcher rejects).
    validate_config(prepare_config(copy.deepcopy(config)))
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError, match="not of type .integer."):
        validate_config(prepare_config(broken))

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # the head runs the driver, not the work
    gpu = types["gpu_worker"]["node_config"]["InstanceType"]
    assert re.match(r"^(g5|g6|g6e|p4d|p5)\.", gpu)
    assert types["gpu_worker"]["max_workers"] > types["gpu_worker"]["min_workers"] >= 0
    assert types["cpu_worker"]["node_config"]["InstanceType"].startswith(("c", "m"))


def test_cluster_yaml_pins_match_pyproject_and_hold_no_secrets():
    text = _load("cluster.yaml")
    pyproject = _load("pyproject.toml")
    ray_pin = re.search(r'"(ray\[[^\]]*\]==[^"]+)"', pyproject).group(1)
    config = yaml.safe_load(text)
    commands = " ".join(config["setup_commands"])
    assert f'"{ray_pin}"' in commands
    assert "pip install -e /home/ubuntu/resnet-features" in commands
    assert "/home/ubuntu/resnet-features" in config["file_mounts"]
    for pattern in (r"AKIA[0-9A-Z]{12,}", r"(?i)aws_secret_access_key", r"(?i)secret_key",
                    r"(?i)password", r"(?i)token\s*[:=]"):
        assert not re.search(pattern, text), pattern
