"""Throwaway Ray clusters for tests that exercise `ray job submit` for real: a head alone
(`ray_head`) or a head and worker nodes (`ray_cluster`), each `ray start` in its own process
group with its own object store and resources, all on this machine."""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

BIN = os.path.dirname(sys.executable)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job_submit(address: str, env: dict[str, str], argv: list[str], *,
               runtime_env: dict | None = None, timeout: float = 420,
               agent_wait: float = 120) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <repo> -- <argv>`, as the README says, waiting for it.
    A fresh head's dashboard answers before its job agent is up ("No available agent"):
    nothing was submitted then, so it is tried again for up to `agent_wait` seconds."""
    cmd = [os.path.join(BIN, "ray"), "job", "submit", f"--address={address}",
           "--working-dir", ROOT]
    if runtime_env:
        cmd += ["--runtime-env-json", json.dumps(runtime_env)]
    deadline = time.monotonic() + agent_wait
    while True:
        job = subprocess.run([*cmd, "--", *argv], env=env, capture_output=True, text=True,
                             timeout=timeout, cwd=ROOT)
        if "No available agent" not in job.stdout + job.stderr or time.monotonic() > deadline:
            return job
        time.sleep(3)


#: Ports handed to `ray start`, in a random order per process: below the kernel's ephemeral
#: range (32768-60999 on Linux) and above Ray's worker ports (10002-19999).
_PORTS = iter(random.Random(os.getpid()).sample(range(20000, 32768), 12768))


def free_port() -> int:
    """A free TCP port that no outgoing connection can take before `ray start` binds it,
    seconds later: a port from the ephemeral range (what binding to port 0 gives) could be,
    and a node whose agent cannot bind its port dies soon after it joined."""
    for port in _PORTS:
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port left between 20000 and 32767")


def cluster_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for `ray start`/`ray job submit`: this venv first, token auth on."""
    env = dict(os.environ)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env["RAY_AUTH_MODE"] = "token"  # Ray 2.60's head demands a token on its jobs API
    env.pop("RAY_ADDRESS", None)
    # A stopped test node goes at once: Ray 2.60 drains a node on SIGTERM for up to 30 s
    # (for Serve replicas behind a proxy; nothing here needs it).
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    # A killed node is found dead in ~3 s instead of Ray's ~15 s (5 failed health checks 3 s
    # apart). A check fails on no answer within health_check_timeout_ms (10 s, unchanged), so
    # a node that is alive but slow on a loaded machine is not declared dead any sooner.
    env["RAY_health_check_period_ms"] = "1000"
    env["RAY_health_check_failure_threshold"] = "3"
    env.update(extra or {})
    return env


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, env: dict[str, str] | None = None):
    """A head node alone, with CPUs for the work; yields the dashboard (jobs API) address.
    `env` gets the cluster's token (RAY_AUTH_TOKEN) for the `ray job submit` calls.

    Its own temp dir: a job's driver finds its cluster through the temp dir's
    `ray_current_cluster` file, which every later `ray start` on this machine (another test's
    cluster) would otherwise overwrite. Short, as socket paths are limited."""
    temp_dir = tempfile.mkdtemp(prefix="rf-", dir="/tmp")
    try:
        with ray_cluster(env, head_cpus=num_cpus, temp_dir=temp_dir) as cluster:
            yield cluster.address
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


#: The smallest object store Ray accepts (75 MiB is its floor): three nodes on a small machine.
SMALL_OBJECT_STORE = 80 * 1024 * 1024

#: What `ray start` prints once its node is registered with the GCS.
RUNTIME_STARTED = "Ray runtime started."


@dataclass
class Node:
    """One `ray start` process and everything it started (its process group)."""

    name: str
    proc: subprocess.Popen
    log: object
    alive: bool = True
    node_id: str | None = None  # Ray's id for it (worker nodes: Cluster.resolve_node_ids)
    port: int | None = None  # its node manager port

    def descendants(self) -> list:
        """Every process the node started. Its raylet and agents share the node's process
        group, but Ray puts each worker (and a job's driver) in a process group of its own."""
        import psutil

        with contextlib.suppress(psutil.NoSuchProcess):
            return psutil.Process(self.proc.pid).children(recursive=True)
        return []

    def kill(self) -> None:
        """Lose the node at once: SIGKILL its process group (raylet, object store, agents) and
        every worker it started."""
        procs = self.descendants()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        _kill_all(procs)
        self.proc.wait(timeout=60)
        self.alive = False

    def stop(self) -> None:
        procs = self.descendants()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        _kill_all(procs)  # workers and drivers in their own process groups
        self.log.close()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def peek(self) -> str:
        """The output so far, while the node still writes to it: read through a new open
        file (own offset), as seeking the shared one would make the node overwrite its log."""
        with open(f"/proc/self/fd/{self.log.fileno()}") as f:
            return f.read()


@dataclass
class Cluster:
    address: str  # the jobs API (dashboard)
    gcs: str  # host:port worker nodes join
    env: dict[str, str]
    nodes: dict[str, Node] = field(default_factory=dict)

    def add_worker(self, name: str, *, num_cpus: float = 1,
                   resources: dict[str, float] | None = None, timeout: float = 120) -> Node:
        """Start a worker node that joins the head; wait until the cluster counts it."""
        port = free_port()
        cmd = [os.path.join(BIN, "ray"), "start", f"--address={self.gcs}", "--block",
               f"--num-cpus={num_cpus}", "--num-gpus=0",
               f"--object-store-memory={SMALL_OBJECT_STORE}",
               f"--resources={json.dumps(resources or {})}",
               f"--node-manager-port={port}", f"--object-manager-port={free_port()}",
               f"--metrics-export-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", "--node-ip-address=127.0.0.1",
               "--disable-usage-stats"]
        node = _spawn(name, cmd, self.env)
        node.port = port
        self.nodes[name] = node
        deadline = time.time() + timeout
        # `ray start` prints this only once the GCS has the node registered (ray's
        # Node.__init__ waits for it): no client needs to connect and ask.
        while RUNTIME_STARTED not in node.peek():
            if node.proc.poll() is not None:
                raise RuntimeError(f"ray start ({name}) exited:\n{node.output()}")
            if time.time() > deadline:
                raise TimeoutError(f"worker node {name} did not join in {timeout:.0f} s")
            time.sleep(0.2)
        return node

    def _table(self) -> list[tuple[str, bool, int]]:
        """(node id, alive, node manager port) of every node the GCS knows, dead ones too."""
        out = subprocess.run(
            [sys.executable, "-c",
             "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
             "print(';'.join(f\"{n['NodeID']},{int(n['Alive'])},{n['NodeManagerPort']}\" "
             "for n in ray.nodes()))", self.gcs],
            capture_output=True, text=True, env=self.env, timeout=120)
        if out.returncode != 0 or not out.stdout.strip():
            return []
        rows = [r.split(",") for r in out.stdout.strip().splitlines()[-1].split(";") if r]
        return [(i, a == "1", int(p)) for i, a, p in rows]

    def resolve_node_ids(self) -> None:
        """Set each worker node's Ray id (`Node.node_id`), matched by its node manager port:
        one client call, so ask once the workers are up."""
        by_port = {p: i for i, _, p in self._table()}
        for node in self.nodes.values():
            if node.port in by_port:
                node.node_id = by_port[node.port]

    def alive_node_ids(self) -> set[str]:
        """Ray ids of the alive nodes, as the GCS sees them."""
        return {i for i, alive, _ in self._table() if alive}


def _kill_all(procs: list) -> None:
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=30)


def _spawn(name: str, cmd: list[str], env: dict[str, str]) -> Node:
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    return Node(name, proc, log)


@contextlib.contextmanager
def ray_cluster(env: dict[str, str] | None = None, head_cpus: float = 0,
                temp_dir: str | None = None):
    """A head node (no CPUs by default: it runs the driver, not the work, like cluster.yaml's)
    that worker nodes join with `Cluster.add_worker`. Every node is stopped at the end, also
    when the test fails, by its process group (never `ray stop`, which stops every Ray on the
    machine)."""
    env = env or cluster_env()
    env.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))  # every node and client shares it
    dashboard, gcs_port = free_port(), free_port()
    cmd = [os.path.join(BIN, "ray"), "start", "--head", "--block", f"--num-cpus={head_cpus}",
           "--num-gpus=0", f"--port={gcs_port}", f"--dashboard-port={dashboard}",
           "--dashboard-host=127.0.0.1", "--include-dashboard=true",
           f"--object-store-memory={SMALL_OBJECT_STORE}",
           f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}",
           f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
           f"--ray-client-server-port={free_port()}", "--node-ip-address=127.0.0.1",
           "--disable-usage-stats", *([f"--temp-dir={temp_dir}"] if temp_dir else [])]
    head = _spawn("head", cmd, env)
    cluster = Cluster(address=f"http://127.0.0.1:{dashboard}", gcs=f"127.0.0.1:{gcs_port}",
                      env=env, nodes={"head": head})
    try:
        deadline = time.time() + 120
        while True:
            if head.proc.poll() is not None:
                raise RuntimeError(f"ray start --head exited:\n{head.output()}")
            try:
                urllib.request.urlopen(cluster.address + "/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if time.time() > deadline:
                    raise TimeoutError("the Ray dashboard did not come up in 120 s") from None
                time.sleep(1)
        yield cluster
    finally:
        for node in reversed(list(cluster.nodes.values())):
            node.stop()
