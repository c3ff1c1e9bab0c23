"""The entry script as users run it: a subprocess, locally and through `ray job submit`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.dataset as pads
import pytest
from raycluster import cluster_env, ray_head

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def test_missing_input_and_missing_weights_fail_at_start(tmp_path, resnet18_weights):
    res = extract("--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"),
                  "--model", "resnet18", "--weights", resnet18_weights)
    assert res.returncode == 2 and "does not exist" in res.stderr
    assert not (tmp_path / "o").exists()

    (tmp_path / "in").mkdir()
    env = cluster_env({"TORCH_HOME": str(tmp_path / "torch")})  # an empty hub cache
    res = extract("--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"),
                  "--model", "resnet34", "--weights", "DEFAULT", env=env)
    assert res.returncode == 2
    expected = str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet34-b627a593.pth")
    assert "resnet34-b627a593.pth" in res.stderr and expected in res.stderr
    assert "--weights" in res.stderr  # says how to provide it


def test_wrong_state_dict_is_refused(tmp_path, few_photos, resnet18_weights):
    res = extract("--input", few_photos, "--output", str(tmp_path / "o"), "--model", "resnet34",
                  "--weights", resnet18_weights)
    assert res.returncode == 2 and "does not fit resnet34" in res.stderr


@pytest.mark.slow
def test_ray_job_submit_runs_the_job_on_a_cluster(tmp_path, few_photos, resnet18_weights):
    out = tmp_path / "out"
    env = cluster_env()
    with ray_head(env=env) as address:
        res = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit",
             "--address", address, "--working-dir", ROOT, "--",
             "python", "jobs/extract.py", "--input", few_photos, "--output", str(out),
             "--model", "resnet18", "--weights", resnet18_weights, "--task", "embed"],
            capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "SUCCEEDED: run " in res.stdout and ": 6 images from" in res.stdout
    (run_dir,) = out.glob("run=*")
    summary = json.loads((run_dir / "_SUCCESS").read_text())
    assert summary["inputs"] == summary["succeeded"] == 6
    table = pads.dataset(str(out), format="parquet").to_table()
    assert table.num_rows == 6 and table.schema.names == ["uri", "embedding", "width", "height"]
