"""Runs: exactly-once output across killed drivers and actors, resume, no-op, incremental, retry."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from helpers import ROOT, cosine, make_cfg, reference_outputs
from PIL import Image

from resnet_features.core.errors import ConfigError
from resnet_features.core.samples import load_photo, write_samples
from resnet_features.extract.inference import ModelRunner
from resnet_features.extract.inputs import list_images
from resnet_features.extract.pipeline import run
from resnet_features.extract.writer import CommitLog
from resnet_features.runs.catalog import load_features
from resnet_features.runs.protocol import incremental_filter


def job_args(inp: str, out: str, weights: str, run_id: str, *extra: str) -> list[str]:
    return ["--input", inp, "--output", out, "--model", "resnet18", "--weights", weights,
            "--run-id", run_id, "--device", "cpu", *extra]


def published_uris(out: str) -> list[str]:
    """Every row a plain hive dataset reader sees (independent of load_features)."""
    dataset = pads.dataset(out, format="parquet", partitioning="hive")
    if not dataset.files:
        return []
    return dataset.to_table(columns=["uri", "run"]).column("uri").to_pylist()


def write_small(folder: str, count: int, seed: int) -> list[str]:
    """Small real photos (long side <= 200 px): fast to decode on a shared 2-core machine."""
    paths = write_samples(folder, count=count, seed=seed)
    for p in paths:
        with Image.open(p) as im:
            im.load()
            im.thumbnail((200, 200))
            im.save(p)
    return sorted(paths)


# -- no Ray ----------------------------------------------------------------------------------


def test_incremental_run_with_nothing_to_compute_starts_no_ray(resnet18_weights, tmp_path,
                                                               monkeypatch):
    """A nightly --incremental run that finds every input unchanged lists, decides and
    publishes an empty run without ever starting Ray (its start-up is most of such a run)."""
    from resnet_features.extract import pipeline
    from resnet_features.runs import protocol

    def no_ray():
        raise AssertionError("Ray started for a run with nothing to compute")

    def all_unchanged(fs, root, task_fp, listing, exclude_run):
        return (np.zeros(listing.num_rows, dtype=bool),
                {"skipped_unchanged": listing.num_rows, "changed": 0, "new": 0})

    monkeypatch.setattr(pipeline, "_init_ray", no_ray)
    monkeypatch.setattr(protocol, "incremental_decision", all_unchanged)
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    write_small(inp, 3, seed=5)
    result = run(make_cfg(*job_args(inp, out, resnet18_weights, "night2", "--incremental")))
    assert result.exit_code == 0, result.reason
    assert result.summary["listed"] == 3 and result.summary["computed"] == 0
    assert result.summary["device"] == "none"


def test_incremental_filter_matches_set_logic():
    rng = np.random.default_rng(0)
    uris = [f"s3://b/img{i:06d}.jpg" for i in range(2000)]
    fps = [f"{i}:etag:{rng.integers(1 << 30)}" for i in range(2000)]
    listing = pa.table({"index": np.arange(2000), "uri": uris, "size_bytes": np.zeros(2000),
                        "fingerprint": fps})
    old = {(u, f) for u, f in zip(uris[:1500], fps[:1500])}
    changed = set(range(100, 120))
    ledger_rows = [(u, "stale" if i in changed else f)
                   for i, (u, f) in enumerate(zip(uris[:1500], fps[:1500]))]
    ledger = pa.table({"uri": [u for u, _ in ledger_rows], "fingerprint": [f for _, f in
                                                                         ledger_rows]})
    todo, counts = incremental_filter(listing, ledger)
    expect = np.array([(u, f) not in old or i in changed
                       for i, (u, f) in enumerate(zip(uris, fps))])
    assert (todo == expect).all()
    assert counts == {"skipped_unchanged": 1480, "changed": 20, "new": 500}


# -- end to end, in process --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_incremental_add_10_change_1(resnet18_weights, ray_local, tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    write_small(inp, 30, seed=5)
    r1 = run(make_cfg(*job_args(inp, out, resnet18_weights, "night1", "--rows-per-file", "8")))
    assert r1.exit_code == 0 and r1.summary["computed"] == 30
    old = {r["uri"]: r for r in load_features(out).to_pylist()}

    again = run(make_cfg(*job_args(inp, out, resnet18_weights, "night1")))
    assert again.summary.get("noop") and "already finished" in again.reason

    new_dir = str(tmp_path / "new")
    for p in write_small(new_dir, 10, seed=6):
        shutil.move(p, os.path.join(inp, "new_" + os.path.basename(p)))
    changed = sorted(glob.glob(os.path.join(inp, "0*.jpg")))[0]
    Image.fromarray(load_photo("astronaut")).resize((180, 150)).save(changed, quality=85)

    r2 = run(make_cfg(*job_args(inp, out, resnet18_weights, "night2", "--incremental")))
    assert r2.exit_code == 0, r2.reason
    inc = r2.summary["skipped"]["incremental"]
    assert r2.summary["computed"] == 11
    assert (inc["skipped_unchanged"], inc["changed"], inc["new"]) == (29, 1, 10)

    table = load_features(out)
    paths = sorted(glob.glob(os.path.join(inp, "*")))
    assert sorted(table.column("uri").to_pylist()) == paths  # 40 unique URIs
    rows = {r["uri"]: r for r in table.to_pylist()}
    assert rows[changed]["run"] == "night2"
    ref_emb, _, _ = reference_outputs("resnet18", resnet18_weights, [changed])
    new_emb = np.asarray(rows[changed]["embedding"], dtype=np.float32)[None]
    assert cosine(new_emb, ref_emb)[0] >= 0.999
    assert cosine(new_emb, np.asarray(old[changed]["embedding"])[None])[0] < 0.99
    # A plain dataset reader sees each input once per run: 30 + 11 rows.
    seen = published_uris(out)
    assert len(seen) == 41 and len(set(seen)) == 40
    assert not os.path.exists(os.path.join(out, "_staging"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_retry_errors_processes_only_failed(resnet18_weights, ray_local, tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    write_small(inp, 4, seed=7)
    broken = os.path.join(inp, "broken.jpg")
    with open(broken, "wb") as f:
        f.write(b"not a jpeg at all")
    # 1 of 5 failing is over the default 5% budget: a run that fails its budget is published
    # without _SUCCESS (load_features skips it), so give this one a budget that admits it.
    r1 = run(make_cfg(*job_args(inp, out, resnet18_weights, "r1", "--max-error-rate", "0.5")))
    assert r1.exit_code == 0 and (r1.summary["succeeded"], r1.summary["failed"]) == (4, 1)
    Image.fromarray(load_photo("coffee")).resize((160, 120)).save(broken)
    r2 = run(make_cfg(*job_args(inp, out, resnet18_weights, "r1-fix", "--retry-errors", "r1")))
    assert r2.exit_code == 0 and r2.summary["computed"] == 1
    assert r2.summary["skipped"]["retry_errors"]["retried"] == 1
    table = load_features(out)
    assert sorted(table.column("uri").to_pylist()) == sorted(glob.glob(os.path.join(inp, "*")))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_model_actor_rows_exactly_once(resnet18_weights, ray_local, tmp_path):
    """A model actor process dies (os._exit) mid-run; Ray restarts it and retries its batch."""
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    paths = write_small(inp, 12, seed=8)
    marker = str(tmp_path / "kill-one-actor")
    open(marker, "w").close()

    class DyingRunner(ModelRunner):
        calls = 0

        def __call__(self, batch):
            DyingRunner.calls += 1
            if DyingRunner.calls == 2 and os.path.exists(marker):
                os.remove(marker)
                os._exit(1)  # the actor process dies, mid-run, once
            return super().__call__(batch)

    result = run(make_cfg(*job_args(inp, out, resnet18_weights, "r", "--batch-size", "2",
                                    "--decode-batch-size", "2", "--rows-per-file", "5")),
                 runner_cls=DyingRunner)
    assert not os.path.exists(marker), "the actor was never killed"
    assert result.exit_code == 0, result.reason
    uris = published_uris(out)
    assert sorted(uris) == paths  # every input exactly once
    assert result.summary["succeeded"] == 12


# -- end to end: SIGKILL of the driver -------------------------------------------------------


def _session_pids(sid: int) -> list[int]:
    """Processes of the session the killed driver led (Ray's raylet, GCS, workers)."""
    pids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields: state ppid pgrp session ...
            pids.append(int(stat.split("/")[2]))
    return pids


def _kill_session(proc: subprocess.Popen) -> None:
    leftovers = _session_pids(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


# A private local Ray, as a driver without RAY_ADDRESS starts one: `shutdown_ray` kills its
# autoscaler monitor before `ray.shutdown()` (which otherwise waits a second on it), and what
# Ray started must still end with it.
PRIVATE_RAY_CODE = """
import os
os.environ["RAY_ADDRESS"] = "local"
from ray._private import ray_constants
from resnet_features.extract import pipeline
pipeline._init_ray()
node = pipeline.ray._private.worker._global_node
monitors = node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR)
assert monitors, "no autoscaler monitor found: Ray's process table changed"
pipeline.shutdown_ray()
assert monitors[0].process.poll() is not None and not pipeline.ray.is_initialized()
print("shut down")
"""


@pytest.mark.slow  # starts a private Ray in a subprocess
@pytest.mark.timeout(300)
def test_shutdown_of_a_private_ray_leaves_no_process():
    proc = subprocess.Popen([sys.executable, "-c", PRIVATE_RAY_CODE], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0 and "shut down" in out, err[-3000:]
    deadline = time.monotonic() + 30  # workers exit once their raylet is gone
    while _session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {}
    for pid in _session_pids(proc.pid):
        try:
            left[pid] = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")[:200]
            os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
    assert not left, left


def _job(args: list[str], address: str) -> subprocess.Popen:
    """The job as a subprocess driver in a session of its own (killed as a whole), joining the
    test session's Ray at `address`: killing it loses the driver, as on a cluster."""
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "jobs", "extract.py"), *args],
                            env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_driver_then_rerun_exactly_once(resnet18_weights, ray_address, tmp_path,
                                                capsys):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    paths = write_small(inp, 40, seed=9)
    args = job_args(inp, out, resnet18_weights, "2026-01-01", "--rows-per-file", "4",
                    "--batch-size", "2", "--decode-batch-size", "2")
    fragments = os.path.join(out, "_staging", "run=2026-01-01", "_ledger")
    proc = _job(args, ray_address)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if glob.glob(os.path.join(fragments, "*.parquet")):
                break
            time.sleep(0.05)
        output = "" if proc.poll() is None else proc.stdout.read()
    finally:
        _kill_session(proc)
    assert output == "", output[-3000:]  # killed while running, not finished or failed
    committed = pa.concat_tables([pq.read_table(p) for p in
                                  glob.glob(os.path.join(fragments, "*.parquet"))])
    assert 0 < committed.num_rows < 40
    assert not os.path.exists(os.path.join(out, "run=2026-01-01", "_SUCCESS"))
    assert published_uris(out) == []  # nothing of the killed attempt is visible

    proc = _job(args, ray_address)
    try:
        stdout, _ = proc.communicate(timeout=400)
    finally:
        _kill_session(proc)
    assert proc.returncode == 0, stdout[-3000:]
    summary = json.load(open(os.path.join(out, "run=2026-01-01", "_SUCCESS")))
    assert summary["reused"] >= committed.num_rows
    assert summary["computed"] == 40 - summary["reused"] < 40  # fewer recomputed
    assert summary["attempt"] == 1
    uris = published_uris(out)
    assert sorted(uris) == paths  # every input exactly once, nothing duplicated
    assert not os.path.exists(os.path.join(out, "_staging"))
    assert sorted(load_features(out).column("uri").to_pylist()) == paths

    from resnet_features import cli

    capsys.readouterr()
    assert cli.main(args) == 0  # a finished run: a no-op (in this process: it needs no Ray)
    assert "NO-OP" in capsys.readouterr().out


# -- end to end: the object store goes away while parts are written --------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_s3_outage_during_write_then_rerun_exactly_once(resnet18_weights, ray_local, tmp_path,
                                                        monkeypatch):
    import threading

    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer
    from raycluster import free_port

    port = free_port()  # the server comes back on it: outside the ephemeral range
    endpoint = f"http://127.0.0.1:{port}"
    for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    servers = [ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)]
    servers[0].start()
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="nightly")
        inp = str(tmp_path / "in")
        paths = write_small(inp, 12, seed=10)
        # Parts are written by tasks on the workers, which do not see this process's
        # environment: the credentials travel as storage options (a real cluster's nodes have
        # their own: an instance role or the environment of every node).
        options = {"key": "testing", "secret": "testing",
                   "client_kwargs": {"endpoint_url": endpoint}}
        args = job_args(inp, "s3://nightly/out", resnet18_weights, "s3run", "--rows-per-file",
                        "2", "--batch-size", "2", "--decode-batch-size", "2",
                        "--storage-options", json.dumps(options))
        outage: dict = {}
        restarted = threading.Event()

        def restart_later():
            time.sleep(3)
            servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
            servers[-1].start()
            restarted.set()

        # The store goes down right after the driver learns that the first part is committed
        # (its write task wrote the ledger fragment on a worker), so the outage always falls
        # inside the write phase, however fast the machine is; it comes back 3 s later.
        original = CommitLog.add

        def add_then_cut(self, records):
            new = original(self, records)
            if not outage:
                servers[0].stop()  # the state lives in-process: a restart keeps the objects
                outage["at"] = time.time()
                threading.Thread(target=restart_later, daemon=True).start()
            return new

        monkeypatch.setattr(CommitLog, "add", add_then_cut)
        try:
            first = run(make_cfg(*args))
            outcome = first.exit_code
        except Exception as exc:  # failing loudly is allowed; silently losing rows is not
            outcome = exc
        assert "at" in outage, "the storage outage never happened"
        assert restarted.wait(timeout=60)
        monkeypatch.setattr(CommitLog, "add", original)
        assert outcome == 0 or isinstance(outcome, Exception), outcome

        second = run(make_cfg(*args))
        assert second.exit_code == 0, second.reason
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        fs.invalidate_cache()
        table = pads.dataset("nightly/out", filesystem=fs, format="parquet",
                             partitioning="hive").to_table(columns=["uri"])
        assert sorted(table.column("uri").to_pylist()) == paths  # exactly once
        assert not fs.exists("nightly/out/_staging/run=s3run")
        assert sorted(load_features("s3://nightly/out").column("uri").to_pylist()) == paths
    finally:
        servers[-1].stop()


# -- scheduling files -------------------------------------------------------------------------


def test_nightly_wrapper_and_rayjob_manifest():
    import yaml

    env = {**os.environ, "PYTHON": "echo"}
    line = subprocess.run(["bash", os.path.join(ROOT, "jobs", "nightly.sh"), "s3://in", "/out",
                           "--model", "resnet18"], env=env, capture_output=True, text=True,
                          check=True).stdout.split()
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert line[:8] == ["jobs/extract.py", "--input", "s3://in", "--output", "/out",
                        "--run-id", today, "--incremental"]
    cfg = make_cfg(*line[1:])  # the flags parse
    assert cfg.incremental and cfg.run_id == today and cfg.model == "resnet18"
    with open(os.path.join(ROOT, "jobs", "rayjob-nightly.yaml")) as f:
        job = yaml.safe_load(f)
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["entrypoint"].startswith("bash jobs/nightly.sh ")
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == "2.60.0"


def test_run_id_flags_validated():
    base = ["--input", "a", "--output", "b"]
    assert make_cfg(*base, "--retry-errors", "x").run_id == "x-retry"
    for bad in (["--run-id", "../x"], ["--run-id", "_hidden"],
                ["--retry-errors", "r", "--run-id", "r"],
                ["--retry-errors", "r", "--incremental"]):
        with pytest.raises(ConfigError):
            make_cfg(*base, *bad)


# -- the commit protocol without Ray: uncommitted files, --overwrite, an interrupted publish -----


def _fake_rows(listing: pa.Table, value: float) -> dict[str, np.ndarray]:
    n = listing.num_rows
    return {"index": listing.column("index").to_numpy(),
            "uri": np.asarray(listing.column("uri").to_pylist(), dtype=object),
            "fingerprint": np.asarray(listing.column("fingerprint").to_pylist(), dtype=object),
            "size_bytes": listing.column("size_bytes").to_numpy(),
            "embedding": np.full((n, 512), value, dtype=np.float32),
            "width": np.full(n, 10), "height": np.full(n, 10),
            "error_stage": np.full(n, "", dtype=object), "error_type": np.full(n, "", dtype=object),
            "error_message": np.full(n, "", dtype=object)}


def _stage_run(layout, spec, listing, value: float, *, fresh: bool = False):
    from resnet_features.extract.outputs import for_task
    from resnet_features.extract.writer import PartWriter
    from resnet_features.runs import protocol as runs

    identity = runs.task_identity(spec, "embed", 5)
    state = layout.start_attempt(runs.fingerprint_of(identity), fresh=fresh)
    todo = ~np.isin(listing.column("uri").to_numpy(zero_copy_only=False),
                    state.committed.column("uri").to_numpy(zero_copy_only=False))
    work = listing.filter(pa.array(todo))
    work = work.set_column(0, "index", pa.array(np.arange(work.num_rows)))
    writer = PartWriter(layout.staging_uri(), units=for_task(spec, "embed"),
                        n_inputs=work.num_rows, rows_per_file=3, file_metadata={},
                        attempt=state.attempt)
    if work.num_rows:
        writer.add(_fake_rows(work, value))
        # Repeats in another grouping (a retried task): a second committed part overlapping
        # the first, which the protocol's reconcile step removes before anything is reused.
        writer.add(_fake_rows(work.slice(0, 2), value + 1))
    writer.close()
    return state, writer, identity


def test_commit_protocol_resume_overwrite_and_interrupted_publish(tmp_path):
    from resnet_features.core import storage
    from resnet_features.core.models import resolve_model
    from resnet_features.runs import protocol as runs

    spec, _ = resolve_model("resnet18", "random")
    out = str(tmp_path / "out")
    uris = [f"/data/img{i:02d}.jpg" for i in range(7)]
    listing = pa.table({"index": np.arange(7), "uri": uris, "size_bytes": np.ones(7, np.int64),
                        "fingerprint": ["1:mtime:0"] * 7})
    fs, root = storage.filesystem(out)
    layout = runs.RunLayout(fs, root, "r")

    # Attempt 0 commits the first part only; a data file and a temp file are left uncommitted.
    state, writer, identity = _stage_run(layout, spec, listing.slice(0, 3), 1.0)
    assert writer.log.duplicates_dropped == 2 and state.attempt == 0
    staging = os.path.join(out, "_staging", "run=r")
    open(os.path.join(staging, "part-00001.parquet"), "wb").write(b"half a parquet file")
    os.makedirs(os.path.join(staging, "_tmp"), exist_ok=True)
    open(os.path.join(staging, "_tmp", "x"), "wb").write(b"partial")
    assert published_uris(out) == []

    state, writer, _ = _stage_run(layout, spec, listing, 2.0)  # the resumed attempt
    assert state.attempt == 1 and state.discarded_files == 1
    assert sorted(state.committed.column("uri").to_pylist()) == uris[:3]
    assert writer.log.succeeded == 4  # only the 4 inputs no committed part holds
    assert writer.log.duplicates_dropped == 2
    layout.stage_manifest({"run": "r"}, identity, success=True)
    layout.publish()
    assert sorted(published_uris(out)) == uris  # exactly once
    emb = {r["uri"]: r["embedding"][0] for r in load_features(out).to_pylist()}
    assert [emb[u] for u in uris] == [1.0] * 3 + [2.0] * 4
    assert sorted(os.listdir(out)) == ["run=r"]

    # --overwrite: the old run stays readable until the new one is complete and published.
    _stage_run(layout, spec, listing, 5.0, fresh=True)
    layout.stage_manifest({"run": "r"}, identity, success=True)
    assert {r["embedding"][0] for r in load_features(out).to_pylist()} == {1.0, 2.0}
    # The publish is cut short after moving one file; the rerun finishes it.
    staged = json.load(open(os.path.join(staging, "_manifest.json")))
    real_mv = fs.mv
    moved = []

    def mv_then_die(src, dst, **kw):
        if len(moved) == 2:  # 1: the old run to the trash, 2: one data file
            raise OSError("driver killed")
        moved.append(src)
        return real_mv(src, dst, **kw)

    fs.mv = mv_then_die
    with pytest.raises(OSError):
        layout.publish()
    fs.mv = real_mv
    assert layout.finished_summary() is None and layout.publish_pending()
    assert load_features(out).num_rows == 0  # no finished run visible half-replaced
    assert layout.publish()["publish_id"] == staged["publish_id"]
    table = load_features(out)
    assert sorted(table.column("uri").to_pylist()) == uris
    assert {r["embedding"][0] for r in table.to_pylist()} == {5.0}
    assert sorted(os.listdir(out)) == ["run=r"]


def test_hash_fingerprint_is_sha256_of_content(tmp_path):
    import hashlib

    from resnet_features.runs.protocol import hash_fingerprints

    paths = write_small(str(tmp_path), 3, seed=11)
    listing = list_images(str(tmp_path)).table
    assert all(f.startswith(f"{os.path.getsize(p)}:mtime:") for p, f in
               zip(paths, listing.column("fingerprint").to_pylist()))
    hashed = hash_fingerprints(listing).column("fingerprint").to_pylist()
    assert hashed == ["sha256:" + hashlib.sha256(open(p, "rb").read()).hexdigest()
                      for p in paths]
