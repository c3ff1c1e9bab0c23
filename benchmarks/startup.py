"""Start-up profile of one small run: when each stage is reached after launch, and the CPU
seconds each kind of process spends starting (Python, Ray's worker boot, imports).

Each measured run is a fresh process (`--child`), as a user's launch is. Timestamps are
wall-clock (time.time(), one machine) relative to the moment the parent launched the child:

- driver: imports done, listing done, `ray.init` done, first result batch, end;
- each model actor: constructor entered (CPU its process spent so far = worker boot + the
  imports Ray's unpickling of the actor class triggered), model loaded (ready), first call;
- each decode worker: first decode call (CPU its process spent so far = boot + imports).

The usual Ray Data pattern (benchmarks/run.py's `run_usual_ray`: read_images + per-row
PIL/ToTensor transforms + one actor) runs the same files from its own fresh process, and
`--import-cpu` measures the CPU seconds of importing each kind of process's modules alone.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/startup.py --runs 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACE_ENV = "RESNET_FEATURES_STARTUP_TRACE"


def _record(event: str, **fields) -> None:
    """Append one event to the trace file (env var inherited by a local Ray's workers)."""
    path = os.environ.get(TRACE_ENV)
    if path:
        line = json.dumps({"event": event, "t": time.time(), "pid": os.getpid(),
                           "cpu": time.process_time(), **fields})
        with open(path, "a") as f:
            f.write(line + "\n")


# ------------------------------------------------------------------ traced stages (workers)

def _traced_classes():
    from resnet_features.extract.decode import Decode
    from resnet_features.extract.inference import ModelRunner

    class TracedRunner(ModelRunner):
        def __init__(self, *args, **kwargs):
            _record("actor_init")
            super().__init__(*args, **kwargs)
            _record("actor_ready")
            self._first = True

        def __call__(self, batch):
            if self._first:
                self._first = False
                _record("first_model_call")
            return super().__call__(batch)

    class TracedDecode(Decode):
        def __call__(self, batch):
            if not os.environ.get("RF_STARTUP_DECODE_SEEN"):  # once per process: each task
                os.environ["RF_STARTUP_DECODE_SEEN"] = "1"  # unpickles a new Decode
                _record("decode_first_call")
            return super().__call__(batch)

    return TracedRunner, TracedDecode


def child_job(args) -> None:
    """One job run from a fresh process, as `python jobs/extract.py ...` runs it (the CLI's
    entry and exit), with the driver's stages traced."""
    _record("driver_start")
    from resnet_features import cli
    from resnet_features.core.entry import exit_process

    argv = ["--input", args.input, "--output", args.output, "--overwrite", "--model", args.model,
            "--weights", args.weights, "--task", "embed", "--batch-size", str(args.batch_size),
            *args.job_args]
    from resnet_features.extract import pipeline

    _record("driver_imports_done")
    list_inputs, init_ray, run = pipeline.list_inputs, pipeline._init_ray, pipeline.run
    build_dataset = pipeline.build_dataset

    def traced_build(*a):
        # The traced stages subclass torch-importing ones: made once the plan has imported
        # torch, as the driver imports it only then (while Ray starts).
        from resnet_features.extract import decode

        traced_runner, decode.Decode = _traced_classes()
        return build_dataset(*a[:6], traced_runner)

    def listed(*a, **k):
        out = list_inputs(*a, **k)
        _record("listing_done")
        return out

    def ray_ready():
        init_ray()
        _record("ray_init_done")
        import ray

        ray.data.DataContext.get_current().enable_progress_bars = False

    def traced_run(cfg):
        result = run(cfg)
        _record("driver_end", exit_code=result.exit_code, rows=result.summary["succeeded"])
        return result

    pipeline.list_inputs, pipeline._init_ray, pipeline.run = listed, ray_ready, traced_run
    pipeline.build_dataset = traced_build
    code = cli.main(argv)
    _record("shutdown_done", exit_code=code)
    exit_process(code)


def child_usual(args) -> None:
    """The usual Ray Data pattern on the same files, from a fresh process."""
    import logging

    import ray

    from benchmarks.run import run_usual_ray

    ray.init(address="local", logging_level=logging.WARNING)
    _record("ray_init_done")
    ray.data.DataContext.get_current().enable_progress_bars = False
    log_path = args.output + ".usual.log"
    run_usual_ray(args.input, args.model, args.weights, args.batch_size, log_path)
    _record("driver_end")


# ------------------------------------------------------------------ parent

def _launch(mode: str, args, trace: str) -> tuple[float, list[dict]]:
    if os.path.exists(trace):
        os.remove(trace)
    # RAY_ADDRESS=local: a private Ray, as on a fresh VM, never a cluster another process
    # started on this machine (the job would join that one).
    env = {**os.environ, TRACE_ENV: trace, "PYTHONPATH": ROOT, "RAY_ADDRESS": "local"}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--input", args.input,
           "--output", args.output, "--weights", args.weights, "--model", args.model,
           "--batch-size", str(args.batch_size),
           *([f"--job-args={' '.join(args.job_args)}"] if mode == "job" and args.job_args else [])]
    t0 = time.time()
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{res.stderr[-4000:]}")
    events = [json.loads(line) for line in open(trace)]
    for e in events:
        e["at"] = round(e["t"] - t0, 2)
    return wall, events


def _profile(wall: float, events: list[dict]) -> dict:
    def first(name):
        return min((e["at"] for e in events if e["event"] == name), default=None)

    actors = {}
    for e in events:
        if e["event"].startswith("actor") or e["event"] == "first_model_call":
            actors.setdefault(e["pid"], {})[e["event"]] = e
    decoders = list({e["pid"]: e for e in reversed(events)
                     if e["event"] == "decode_first_call"}.values())
    driver = {e["event"]: e for e in events if e["event"].startswith("driver")}
    return {
        "wall_s": round(wall, 2),
        "driver_imports_done_s": first("driver_imports_done"),
        "listing_done_s": first("listing_done"),
        "ray_init_done_s": first("ray_init_done"),
        "actors_ready_s": sorted(a["actor_ready"]["at"] for a in actors.values()
                                 if "actor_ready" in a),
        "first_decode_s": first("decode_first_call"),
        "first_model_call_s": first("first_model_call"),
        "run_done_s": first("driver_end"),
        "ray_shutdown_done_s": first("shutdown_done"),
        "cpu_s_before_work": {
            "driver_imports": round(driver["driver_imports_done"]["cpu"]
                                    - driver["driver_start"]["cpu"], 2)
            if "driver_imports_done" in driver else None,
            "model_actor_boot_and_imports": [round(a["actor_init"]["cpu"], 2)
                                             for a in actors.values() if "actor_init" in a],
            "model_actor_build_model": [round(a["actor_ready"]["cpu"] - a["actor_init"]["cpu"], 2)
                                        for a in actors.values() if "actor_ready" in a],
            "decode_worker_boot_and_imports": [round(e["cpu"], 2) for e in decoders],
        },
    }


IMPORT_SETS = {
    # what each kind of process imports (Ray unpickles these classes there)
    # the driver: the CLI and the pipeline before Ray starts, then (on the plan and preload
    # threads, with the cyclic GC paused, as pipeline.run does) the weights entry, the stages
    # and Ray Data
    "driver_before_ray": "import resnet_features.cli, resnet_features.extract.pipeline",
    "driver": "import gc; gc.disable(); import resnet_features.cli, "
              "resnet_features.extract.pipeline as p, resnet_features.core.models as m, "
              "resnet_features.extract.outputs; m.named_weights('resnet50', 'DEFAULT'); "
              "p._preload()",
    "model_actor": "import ray.data, resnet_features.extract.pipeline, "
                   "resnet_features.extract.inference, resnet_features.extract.outputs",
    "decode_worker": "import ray.data, resnet_features.extract.pipeline, "
                     "resnet_features.extract.decode, resnet_features.extract.inputs, "
                     "resnet_features.extract.writer",
    "torch_alone": "import torch",
    "torchvision_alone": "import torchvision",
}


def import_cpu(repeats: int) -> dict:
    out = {}
    for kind, code in IMPORT_SETS.items():
        prog = f"import time\nt=time.process_time()\n{code}\nprint(time.process_time()-t)"
        runs = [float(subprocess.run([sys.executable, "-c", prog], cwd=ROOT, check=True,
                                     capture_output=True, text=True,
                                     env={**os.environ, "PYTHONPATH": ROOT}).stdout)
                for _ in range(repeats)]
        if runs:
            out[kind] = round(statistics.median(runs), 2)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", choices=("job", "usual"), help=argparse.SUPPRESS)
    p.add_argument("--input")
    p.add_argument("--output")
    p.add_argument("--weights")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--images", type=int, default=64, help="one in four is 12 MP")
    p.add_argument("--runs", type=int, default=1, help="job runs")
    p.add_argument("--usual", type=int, default=1,
                   help="runs of the usual pattern, alternating with the job runs (0: none)")
    p.add_argument("--job-args", type=str.split, default=[],
                   help="more extract flags for the job runs, one string (e.g. '--concurrency 1')")
    p.add_argument("--import-repeats", type=int, default=3)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "rf_startup"))
    p.add_argument("--json", default="benchmarks/results_startup.json")
    args = p.parse_args(argv)
    if args.child == "job":
        child_job(args)
        return 0
    if args.child == "usual":
        child_usual(args)
        return 0

    sys.path.insert(0, ROOT)
    import torch

    from benchmarks.run import make_corpus
    from resnet_features.core.resnet import resnet

    os.makedirs(args.workdir, exist_ok=True)
    args.input = os.path.join(args.workdir, f"images_{args.images}")
    if not os.path.isdir(args.input):
        make_corpus(args.input, args.images - args.images // 4, args.images // 4)
    args.weights = os.path.join(args.workdir, f"{args.model}.pth")
    if not os.path.exists(args.weights):
        torch.manual_seed(0)
        torch.save(resnet(args.model).state_dict(), args.weights)
    args.output = os.path.join(args.workdir, "out")
    load = os.getloadavg()
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "loadavg_at_start": [round(x, 2) for x in load]},
               "config": {"images": args.images, "model": args.model,
                          "batch_size": args.batch_size},
               "import_cpu_s": import_cpu(args.import_repeats), "job": [], "usual": None}
    trace = os.path.join(args.workdir, "trace.jsonl")
    # Job and usual runs alternate, so a change in the VM's speed during the sitting (a shared
    # 2-core VM drifts by 20-30 % over minutes) reaches both sides of the ratio alike.
    usual = []
    for i in range(max(args.runs, args.usual)):
        if i < args.runs:
            results["job"].append(_profile(*_launch("job", args, trace)))
            print(json.dumps(results["job"][-1]), flush=True)
        if i < args.usual:
            wall, events = _launch("usual", args, trace)
            usual.append({"wall_s": round(wall, 2), "ray_init_done_s": min(
                e["at"] for e in events if e["event"] == "ray_init_done")})
            print(json.dumps({"usual": usual[-1]}), flush=True)
    if usual:
        results["usual"] = {
            "wall_s": statistics.median(u["wall_s"] for u in usual),
            "ray_init_done_s": statistics.median(u["ray_init_done_s"] for u in usual),
            "runs": usual}
        results["job_wall_vs_usual_wall"] = round(
            statistics.median(j["wall_s"] for j in results["job"])
            / results["usual"]["wall_s"], 3)
    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps(results, indent=2))
    if args.json:
        path = os.path.join(ROOT, args.json) if not os.path.isabs(args.json) else args.json
        if os.path.exists(path):  # the file keeps every earlier run, newest first
            with open(path) as f:
                previous = json.load(f)
            earlier = previous.pop("earlier_runs", [])
            results["earlier_runs"] = [previous, *earlier]
        with open(path, "w") as f:
            f.write(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
