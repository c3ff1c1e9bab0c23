"""A throwaway `ray start --head` cluster for tests that exercise `ray job submit` for real."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for `ray start`/`ray job submit`: this venv first, token auth on."""
    env = dict(os.environ)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env["RAY_AUTH_MODE"] = "token"  # Ray 2.60's head demands a token on its jobs API
    env.pop("RAY_ADDRESS", None)
    env.update(extra or {})
    return env


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, env: dict[str, str] | None = None):
    """Start a head node in its own process group and yield the dashboard (jobs API) address.

    The whole process group is killed afterwards: `ray stop` would also stop every other Ray
    instance on the machine, including the test session's own.
    """
    env = env or cluster_env()
    dashboard = free_port()
    cmd = [os.path.join(BIN, "ray"), "start", "--head", "--block", f"--num-cpus={num_cpus}",
           f"--port={free_port()}", f"--dashboard-port={dashboard}",
           "--dashboard-host=127.0.0.1", "--include-dashboard=true",
           f"--dashboard-agent-listen-port={free_port()}",
           f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
           f"--ray-client-server-port={free_port()}"]
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"ray start exited:\n{log.read()}")
            try:
                urllib.request.urlopen(address + "/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (401 without a token is fine: the jobs API is up)
            except OSError:
                if time.time() > deadline:
                    raise TimeoutError("the Ray dashboard did not come up in 120 s") from None
                time.sleep(1)
        yield address
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
