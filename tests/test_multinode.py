"""A real multi-node Ray cluster on this machine: a head (the driver, no CPUs) and worker nodes,
each its own `ray start` process group with its own object store and resources; the job goes
in through Ray's Jobs API, as `ray job submit` sends it.

The node with the custom resource `model_node` stands for the GPU node: the model actor lands
there (`--model-resources`), read/decode/write tasks run on any node with CPUs. The test shows
that parts are written on worker nodes, never the driver's (the summary's nodes, and each
part's own file metadata), that the output equals the job's stages run in one process, row
for row, and what happens when a node is lost mid-run: the CPU node (Ray reschedules its
tasks); then the only model node (the job fails soon after --node-loss-timeout, naming the
lost node, and a rerun on a new model node resumes from the committed parts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from helpers import make_cfg, run_stages
from raycluster import ray_cluster
from test_runs import job_args, write_small

from resnet_features.core.config import config_from_args, get_args_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: How long the job waits for a node that can host a model actor once none is left (short:
#: only the model node's loss in phase 3 leaves none, and a killed node stays dead).
NODE_LOSS_TIMEOUT = 4

#: One model actor on the model node, half of its CPU: read/decode/write tasks (a quarter
#: each) still fit beside it once the CPU node is gone.
CLUSTER_FLAGS = ["--task", "both", "--rows-per-file", "3", "--batch-size", "2",
                 "--decode-batch-size", "2", "--concurrency", "1",
                 "--model-resources", '{"model_node": 1}', "--num-cpus-per-worker", "0.5",
                 "--decode-num-cpus", "0.25", "--node-loss-timeout", str(NODE_LOSS_TIMEOUT),
                 "--max-error-rate", "0"]


def submit(cluster, args: list[str]) -> subprocess.Popen:
    """The job through Ray's Jobs API (tests/jobs_api.py: `ray job submit`'s endpoint, without
    its ~5 s of log-tail ticks); the process ends with the job's driver's exit code."""
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "jobs_api.py"), cluster.address, "--",
         sys.executable, os.path.join(ROOT, "jobs", "extract.py"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cluster.env, cwd=ROOT)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def rows(out: str):
    return pads.dataset(out, format="parquet", partitioning="hive").to_table().sort_by("uri")


def cluster_state(cluster) -> str:
    """What the cluster looks like now: for a failure message."""
    alive = cluster.alive_node_ids()
    lines = [f"alive node ids: {sorted(alive)}"]
    for node in cluster.nodes.values():
        lines.append(f"{node.name}: id {node.node_id}, `ray start` "
                     f"{'running' if node.proc.poll() is None else 'exited'}, "
                     f"{'alive' if node.node_id in alive else 'not alive'} in the GCS")
        if node.proc.poll() is not None and node.alive:
            lines.append(node.output()[-2000:])
    return "\n".join(lines)


def wait_for_commit(staging: str, job: subprocess.Popen, cluster, timeout: float = 420) -> None:
    """Until the first part of a run is committed: images are in flight from then on. Fails
    with the job's log and the cluster's state if the job ends first, or if no part comes
    within `timeout` s."""
    ledger = os.path.join(staging, "_ledger")
    deadline = time.time() + timeout
    while not (os.path.isdir(ledger) and os.listdir(ledger)):
        if job.poll() is not None:
            raise AssertionError(f"the job ended (exit {job.returncode}) before it committed "
                                 f"a part:\n{job.communicate()[0][-6000:]}\n"
                                 f"{cluster_state(cluster)}")
        if time.time() > deadline:
            job.kill()  # the Jobs API client; the cluster's teardown ends the job
            raise TimeoutError(f"no part was committed in {timeout:.0f} s; the job's log:\n"
                               f"{job.communicate()[0][-6000:]}\n{cluster_state(cluster)}")
        time.sleep(0.2)


def part_writers(run_dir: str) -> dict[str, str | None]:
    """Each published data and error part -> the writer node in its own file metadata."""
    found = {}
    for sub in ("", "_errors"):
        folder = os.path.join(run_dir, sub)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if name.startswith("part-") and name.endswith(".parquet"):
                meta = pq.read_schema(os.path.join(folder, name)).metadata[b"resnet_features"]
                found[os.path.join(sub, name)] = json.loads(meta).get("writer_node")
    return found


def check_exactly_once(out: str, run_id: str, paths: list[str]) -> dict:
    summary = json.load(open(os.path.join(out, f"run={run_id}", "_SUCCESS")))
    table = rows(out).filter(pads.field("run") == run_id)
    assert table.column("uri").to_pylist() == paths  # each input exactly once
    assert not os.path.exists(os.path.join(out, "_staging"))
    assert summary["inputs"] == summary["succeeded"] + summary["failed"] == len(paths)
    assert summary["failed"] == 0 and summary["lost"] == 0
    return summary


@pytest.mark.slow
@pytest.mark.timeout(1500)  # four ray start nodes and five jobs on 2 cores
def test_multinode_cluster_writes_on_workers_and_survives_lost_nodes(resnet18_weights, tmp_path):
    t_start = time.time()
    inp = str(tmp_path / "in")
    paths = write_small(inp, 24, seed=21)
    # What the job's stages compute in one process (test_reference proves a single-node job
    # writes exactly that): the rows the cluster's run must equal.
    expected = run_stages(make_cfg(*job_args(inp, str(tmp_path / "single"), resnet18_weights,
                                             "r", *CLUSTER_FLAGS)), str(tmp_path / "single")).rows

    print(f"the cluster starts {time.time() - t_start:.0f} s into the test")
    out = str(tmp_path / "out")
    staging = os.path.join(out, "_staging")
    with ray_cluster() as cluster:
        model = cluster.add_worker("model", num_cpus=1, resources={"model_node": 1})
        cpu = cluster.add_worker("cpu", num_cpus=1)
        cluster.resolve_node_ids()

        print(f"phase 1 starts {time.time() - t_start:.0f} s into the test")
        # 1. The whole run: parts written on worker nodes, the rows the stages compute.
        code, log = finish(submit(cluster, job_args(inp, out, resnet18_weights, "r",
                                                    *CLUSTER_FLAGS)))
        assert code == 0, log[-6000:] + "\n" + cluster_state(cluster)
        summary = check_exactly_once(out, "r", paths)
        driver = summary["driver"]["node"]
        assert driver and driver not in summary["nodes"]["write"]  # no part on the driver
        # Each part names its writer in its own metadata: only worker nodes, as the summary.
        writers = part_writers(os.path.join(out, "run=r"))
        assert set(writers) == set(summary["files"]) | set(summary["error_files"]) != set()
        assert set(writers.values()) <= {model.node_id, cpu.node_id}, (writers, driver)
        assert set(writers.values()) == set(summary["nodes"]["write"])
        assert driver not in summary["nodes"]["model"] and len(summary["nodes"]["model"]) == 1
        assert len(set(summary["nodes"]["write"]) | set(summary["nodes"]["decode"])) == 2
        assert summary["driver"]["bytes_received_per_input"] <= 256
        assert all(summary["stages"][s]["rows"] == len(paths)
                   for s in ("read", "decode", "model", "write"))
        got = rows(out)
        assert got.column("uri").to_pylist() == expected.column("uri").to_pylist()
        assert got.column("topk_ids").to_pylist() == expected.column("topk_ids").to_pylist()
        np.testing.assert_allclose(
            np.stack(got.column("embedding").to_numpy(zero_copy_only=False)),
            np.stack(expected.column("embedding").to_numpy(zero_copy_only=False)),
            rtol=1e-4, atol=1e-5)

        print(f"phase 2 starts {time.time() - t_start:.0f} s into the test")
        # 2. The CPU node is lost while images are in flight: its raylet, object store and
        # workers die at once. Ray reschedules its tasks on the model node, or the job fails
        # and the rerun resumes from the committed parts; either way every input once.
        job = submit(cluster, job_args(inp, out, resnet18_weights, "cpu-lost", *CLUSTER_FLAGS))
        wait_for_commit(os.path.join(staging, "run=cpu-lost"), job, cluster)
        cpu.kill()
        code, log = finish(job)
        print(f"CPU node lost mid-run: job exit {code}")
        if code != 0:
            code, log = finish(submit(cluster, job_args(inp, out, resnet18_weights, "cpu-lost",
                                                        *CLUSTER_FLAGS)))
        assert code == 0, log[-4000:]
        check_exactly_once(out, "cpu-lost", paths)

        print(f"phase 3 starts {time.time() - t_start:.0f} s into the test")
        # 3. The only model node is lost mid-run: no model actor can come back, so the job
        # fails soon after --node-loss-timeout, naming the lost node, with its committed parts
        # kept; a rerun on a new model node resumes from them.
        job = submit(cluster, job_args(inp, out, resnet18_weights, "model-lost", *CLUSTER_FLAGS))
        wait_for_commit(os.path.join(staging, "run=model-lost"), job, cluster)
        model.kill()
        t0 = time.time()
        code, log = finish(job, timeout=300)
        elapsed = time.time() - t0
        print(f"model node lost: the job exited {code} {elapsed:.0f} s after the kill")
        print("\n".join(line for line in log.splitlines() if "model actor" in line))
        assert code == 1 and "no alive Ray node can host a model actor" in log, (
            log[-6000:] + "\n" + cluster_state(cluster))
        assert f"node {model.node_id}" in log, log[-4000:]  # names the lost node
        # The bound: Ray's few seconds to mark the node dead, --node-loss-timeout, a poll of
        # the watchdog and of the driver's loop, the pipeline's shutdown and the exit; the
        # margin is for a loaded machine (18-19 s in all on a quiet one).
        assert elapsed < NODE_LOSS_TIMEOUT + 90, log[-4000:]
        assert os.path.isdir(os.path.join(staging, "run=model-lost"))  # committed parts kept
        print(f"phase 4 starts {time.time() - t_start:.0f} s into the test")
        cluster.add_worker("model2", num_cpus=1, resources={"model_node": 1})
        code, log = finish(submit(cluster, job_args(inp, out, resnet18_weights, "model-lost",
                                                    *CLUSTER_FLAGS)))
        assert code == 0, log[-4000:] + "\n" + cluster_state(cluster)
        summary = check_exactly_once(out, "model-lost", paths)
        assert summary["attempt"] == 1 and summary["reused"] > 0


def _lost_node_setup(monkeypatch):
    """A fake cluster of one model node, and a watchdog on it (no Ray)."""
    from resnet_features.extract import pipeline

    nodes = [{"NodeID": "f00dcafe" * 7, "NodeManagerAddress": "10.0.0.7", "Alive": True,
              "Resources": {"CPU": 1.0, "model_node": 1.0}}]
    monkeypatch.setattr(pipeline.ray, "nodes", lambda: nodes)
    cfg = config_from_args(get_args_parser().parse_args(
        ["--input", "x", "--output", "y", "--model-resources", '{"model_node": 1}',
         "--node-loss-timeout", "0.5"]))
    return nodes, pipeline._ModelNodeWatchdog(cfg, "cpu", poll=0.05)


def test_the_wait_for_a_lost_model_node_is_bounded(monkeypatch):
    """No cluster: once no alive node has the model actor's resources, the watchdog gives its
    verdict after --node-loss-timeout, naming the lost node (the multi-node test loses a real
    node)."""
    from resnet_features.extract import pipeline

    nodes, watchdog = _lost_node_setup(monkeypatch)
    t0 = time.monotonic()
    with watchdog:
        time.sleep(0.5)
        assert watchdog.reason is None  # the node is there: no alarm
        nodes[0]["Alive"] = False  # the model node is lost
        while watchdog.reason is None and time.monotonic() - t0 < 10:
            time.sleep(0.01)
    assert "no alive Ray node can host a model actor" in watchdog.reason
    assert f"node {'f00dcafe' * 7} (10.0.0.7)" in watchdog.reason
    assert time.monotonic() - t0 < 5
    # A node table that does not show the driver's own node alive is no answer.
    watchdog.own_node = "driver"
    assert watchdog._hostable() is None
    nodes.append({"NodeID": "driver", "Alive": True, "Resources": {"CPU": 0.0}})
    assert watchdog._hostable() is False
    # CPU model actors without --model-resources fit on any node: nothing to watch.
    plain = config_from_args(get_args_parser().parse_args(["--input", "x", "--output", "y"]))
    assert pipeline._ModelNodeWatchdog(plain, "cpu").need == {}
    assert pipeline._ModelNodeWatchdog(plain, "cuda").need == {"GPU": 1.0}


def test_a_ray_error_waits_for_the_node_verdict_before_naming_the_cause(monkeypatch):
    """Ray's actors can fail (raylet unreachable) before the GCS marks their node dead: after
    such an error the driver waits for that verdict and then names the lost node; after any
    other error, with the node alive, it does not wait."""
    import threading

    import ray.exceptions

    nodes, watchdog = _lost_node_setup(monkeypatch)
    t0 = time.monotonic()
    assert watchdog.lost_reason(OSError("storage down"), settle=30) is None
    assert time.monotonic() - t0 < 1
    threading.Timer(0.5, lambda: nodes[0].update(Alive=False)).start()
    try:
        raise RuntimeError("Ray Data gave up") from ray.exceptions.ActorUnavailableError("x",
                                                                                       None)
    except RuntimeError as exc:
        reason = watchdog.lost_reason(exc, settle=30)
    assert f"node {'f00dcafe' * 7} (10.0.0.7)" in reason and time.monotonic() - t0 < 5


def test_the_driver_fails_in_bounded_time_while_ray_blocks(monkeypatch):
    """The driver's loop ends within a poll of the watchdog's verdict even while the iterator
    blocks in a `queue.Queue.get()` without a timeout, as Ray Data's does between batches when
    the model node is gone (what `_thread.interrupt_main` could not end); then it stops the
    pipeline, and the iterator is closed."""
    import queue

    from resnet_features.extract import pipeline

    nodes, watchdog = _lost_node_setup(monkeypatch)
    ray_queue: queue.Queue = queue.Queue()  # a batch that never comes
    closed, stopped, taken = [], [], []

    def batches():
        try:
            yield "part-1"
            nodes[0]["Alive"] = False  # the model node is lost
            ray_queue.get()
            yield "part-2"
        finally:
            closed.append(True)

    def shutdown():  # what stopping Ray's executor does to its waiting reader
        stopped.append(True)
        ray_queue.put(None)

    t0 = time.monotonic()
    with pytest.raises(pipeline.ModelNodeLost, match="no alive Ray node can host"):
        with watchdog:
            pipeline._drain(batches, watchdog, taken.append, shutdown)
    assert time.monotonic() - t0 < 0.5 + 2 * pipeline.DRAIN_POLL + 2
    assert taken == ["part-1"] and stopped == [True] and closed == [True]


def test_the_driver_loop_hands_over_batches_and_errors(monkeypatch):
    from resnet_features.extract import pipeline

    _, watchdog = _lost_node_setup(monkeypatch)
    taken: list = []
    with watchdog:
        pipeline._drain(lambda: iter(range(50)), watchdog, taken.append)
    assert taken == list(range(50))  # every batch, in order

    stopped = []

    def failing():
        yield 1
        raise OSError("storage down")

    with pytest.raises(OSError, match="storage down"):
        pipeline._drain(failing, watchdog, taken.append, lambda: stopped.append(True))
    assert stopped == [True]
