"""The entry script as users run it: a subprocess, locally and through `ray job submit`."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pyarrow as pa
import pytest
from helpers import ROOT, make_cfg
from raycluster import cluster_env

from resnet_features import cli
from resnet_features.core.config import (
    ExtractConfig,
    config_default,
    flag_of,
)
from resnet_features.core.errors import DeviceError, InputError

EXTRACT = os.path.join(ROOT, "jobs", "extract.py")


def extract(*args: str, env: dict | None = None, timeout: int = 600):
    # RAY_ADDRESS=local: the job starts its own Ray rather than joining whatever cluster runs here.
    env = env or cluster_env()
    env.setdefault("RAY_ADDRESS", "local")
    return subprocess.run([sys.executable, EXTRACT, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_help_documents_every_flag():
    out = extract("--help").stdout
    for flag in ("--input", "--output", "--model", "--weights", "--preprocess-from", "--task",
                 "--top-k", "--batch-size", "--concurrency", "--num-gpus-per-worker", "--device",
                 "--max-error-rate", "--storage-options", "--demo"):
        assert flag in out, flag
    flags = set(re.findall(r"(--[a-z0-9-]+)", out))
    for f in dataclasses.fields(ExtractConfig):
        # A derived field (explain) has no flag of its own: the flag it comes from is documented.
        flag = flag_of(f) if "source" not in f.metadata else "--" + f.metadata["source"]
        assert flag in flags, f.name


def test_parser_defaults_are_the_config_defaults():
    """One source: the parser's defaults, through the same parsing, give the dataclass's."""
    cfg = make_cfg("--input", "i", "--output", "o", "--run-id", "default")
    for f in dataclasses.fields(ExtractConfig):
        if f.name not in ("input", "output"):
            assert getattr(cfg, f.name) == config_default(f.name), f.name
    from resnet_features.extract.decode import DecodeOptions

    assert DecodeOptions().max_image_bytes == config_default("max_image_bytes")
    assert DecodeOptions().draft_factor == config_default("draft_factor")


def test_flags_parse_into_the_stored_values():
    cfg = make_cfg("--input", "i", "--output", "s3://b/o", "--task", "classify,explain",
                   "--layers", "layer3,layer1", "--keep-columns", "a, b", "--storage-options",
                   '{"anon": true}', "--retry-errors", "r1", "--input-format", "parquet")
    assert (cfg.task, cfg.explain, cfg.layers) == ("classify", True, ("layer1", "layer3"))
    assert cfg.keep_columns == ("a", "b") and cfg.storage_options == {"anon": True}
    assert cfg.input == os.path.abspath("i") and cfg.output == "s3://b/o"
    assert cfg.run_id == "r1-retry"


def test_help_and_bad_arguments_import_no_torch_or_ray():
    """`--help` and argument errors answer without importing torch, torchvision or Ray."""
    heavy = re.compile(r"\|\s*(torch|torchvision|ray)(\.|$)", re.M)
    for args, code in ((["--help"], 0), (["--input", "i", "--output", "o", "--top-k", "0"], 2),
                       (["--model", "nope"], 2), (["--input", "i", "--output", "o",
                                                    "--layers", "layer9"], 2)):
        res = subprocess.run([sys.executable, "-X", "importtime", EXTRACT, *args],
                             capture_output=True, text=True, timeout=60, cwd=ROOT,
                             env={**os.environ, "RAY_ADDRESS": "local"})
        assert res.returncode == code, (args, res.stderr[-2000:])
        imported = heavy.findall(res.stderr)
        assert not imported, (args, sorted({m[0] for m in imported}))


@pytest.fixture
def fake_run(monkeypatch):
    """cli.main with extract.pipeline.run replaced: the CLI's exit-code mapping, no Ray."""
    from resnet_features.extract import pipeline

    def use(exc: BaseException):
        def run(cfg):
            raise exc

        monkeypatch.setattr(pipeline, "run", run)
        return cli.main(["--input", "i", "--output", "o", "--run-id", "t"])

    return use


def logged_traceback(caplog) -> str:
    """The log's traceback (stderr in a real run; pytest captures the log in-process)."""
    return "\n".join(caplog.handler.format(r) for r in caplog.records if r.exc_info)


def test_unexpected_error_in_run_exits_1_with_traceback(fake_run, capsys, caplog):
    assert fake_run(pa.ArrowInvalid("Parquet magic bytes not found")) == 1
    assert "Traceback (most recent call last)" in logged_traceback(caplog)
    assert "pyarrow.lib.ArrowInvalid: Parquet magic bytes" in logged_traceback(caplog)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: the run failed (ArrowInvalid: Parquet magic bytes")
    assert "rerun the same command to resume" in last


def test_a_bug_exits_1_without_the_resume_hint(fake_run, capsys, caplog):
    assert fake_run(TypeError("unsupported operand")) == 1
    assert "Traceback" in logged_traceback(caplog)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "TypeError" in last and "resume" not in last


@pytest.mark.parametrize("exc", [
    DeviceError("--device cuda asked for, but the Ray cluster has 0 GPUs"),
    InputError("input /x does not exist"),
])
def test_usage_error_in_run_exits_2_without_traceback(fake_run, capsys, caplog, exc):
    assert fake_run(exc) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not logged_traceback(caplog)
    assert err.strip().splitlines()[-1] == f"error: {exc}"


def test_config_error_exits_2_with_usage_in_process(capsys):
    assert cli.main(["--input", "i", "--output", "o", "--task", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: extract.py") and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: --task 'nope'")


@pytest.mark.parametrize("args, message", [
    ((), "--input and --output are required"),
    (("--input", "x", "--output", "y", "--top-k", "0"), "--top-k must be positive"),
    (("--input", "x", "--output", "y", "--storage-options", "{bad"), "not valid JSON"),
    (("--input", "x", "--output", "y", "--max-error-rate", "2"), "--max-error-rate"),
])
def test_bad_arguments_exit_2_with_a_reason(args, message):
    res = extract(*args)
    assert res.returncode == 2
    assert message in res.stderr


@pytest.mark.slow  # a CLI subprocess that starts Ray before the weights fail
def test_missing_input_and_missing_weights_fail_at_start(tmp_path, resnet18_weights,
                                                          ray_address):
    res = extract("--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"),
                  "--model", "resnet18", "--weights", resnet18_weights)
    assert res.returncode == 2 and "does not exist" in res.stderr
    assert not (tmp_path / "o").exists()

    (tmp_path / "in").mkdir()
    # an empty hub cache; the job joins the session's Ray (it starts Ray while it loads weights)
    env = cluster_env({"TORCH_HOME": str(tmp_path / "torch"), "RAY_ADDRESS": ray_address})
    res = extract("--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"),
                  "--model", "resnet34", "--weights", "DEFAULT", env=env)
    assert res.returncode == 2
    expected = str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet34-b627a593.pth")
    assert "resnet34-b627a593.pth" in res.stderr and expected in res.stderr
    assert "--weights" in res.stderr  # says how to provide it


@pytest.mark.slow  # a CLI subprocess that joins the session's Ray before the weights fail
def test_wrong_state_dict_is_refused(tmp_path, few_photos, resnet18_weights, ray_address):
    res = extract("--input", few_photos, "--output", str(tmp_path / "o"), "--model", "resnet34",
                  "--weights", resnet18_weights, env=cluster_env({"RAY_ADDRESS": ray_address}))
    assert res.returncode == 2 and "does not fit resnet34" in res.stderr


def test_device_cuda_without_gpus_fails_before_any_work(monkeypatch, tmp_path):
    """--device cuda on a cluster without GPUs: a DeviceError before weights, listing or output."""
    from resnet_features.core import models
    from resnet_features.extract import pipeline

    monkeypatch.setattr(pipeline, "_init_ray", lambda: None)
    monkeypatch.setattr(pipeline.ray, "cluster_resources", lambda: {"CPU": 2.0})

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the device check")

    monkeypatch.setattr(models, "resolve_model", no_work)  # the plan imports it from there
    monkeypatch.setattr(pipeline, "list_inputs", no_work)
    (tmp_path / "in").mkdir()  # exists (checked first, one request), never listed
    cfg = make_cfg("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                   "--device", "cuda")
    with pytest.raises(DeviceError, match="0 GPUs"):
        pipeline.run(cfg)
    assert not (tmp_path / "out").exists()
