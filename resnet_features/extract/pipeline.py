"""The one module that talks to Ray Data: composes reader, decoder, model and writer into a job.

Flow: listing (driver) -> blocks of URIs -> read+decode CPU tasks (fused) -> model actor pool
(GPU or CPU) -> write tasks (`PartSink`: each encodes, writes and commits its part on the node
that holds the rows) -> one small record per part back to the driver's `CommitLog` ->
`_SUCCESS`. No result row reaches the driver. Ray's API moves between versions
(`compute=`/`concurrency=`), so every Ray call stays here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import queue
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.util.annotations import RayDeprecationWarning

from resnet_features import __version__
from resnet_features.core import storage, weights_table
from resnet_features.core.config import ExtractConfig
from resnet_features.core.errors import ConfigError, DeviceError, OutputExistsError
from resnet_features.extract.inputs import (
    InputSpec,
    Listing,
    ReadBytes,
    check_input_exists,
    list_inputs,
    listing_blocks,
    prefixes,
    stages_listing,
)
from resnet_features.extract.inputs.boxes import attach_boxes
from resnet_features.extract.staged import (
    LISTING_DIR,
    StagedListing,
    StagedWork,
    WorkChunk,
    load_chunk,
    select_staged,
)
from resnet_features.runs import protocol as runs
from resnet_features.runs.ledger import UriLookup

# The stages that import torch (models, decode, inference, outputs, writer) are imported where
# they are used, not here: the driver imports this module before it starts Ray, and `import
# torch` (~1 CPU-second, one core) then ran before `ray.init`, whose processes could have
# started on the other core meanwhile. Now the plan thread imports them while Ray starts
# (tests/test_image_ops.py checks that importing this module leaves torch unimported).
if TYPE_CHECKING:
    from resnet_features.core.models import ModelSpec
    from resnet_features.extract.inference import InferenceOptions
    from resnet_features.extract.writer import CommitLog, PartSink

__all__ = ["JobResult", "OutputExistsError", "run"]

log = logging.getLogger(__name__)

#: Bounded retries for decode tasks and model actors (restarts and task retries).
TASK_RETRIES = 3

#: Most images per listing block: one read task fetches a block's objects concurrently.
MAX_READ_GROUP = 64

#: CPUs a task loading one staged listing chunk reserves. Different from the read tasks' own,
#: so Ray Data does not fuse the load into them (one task would then read a whole chunk).
LOAD_CHUNK_CPUS = 0.25

#: Listing tasks per cluster CPU (a staged prefix listing: `_list_staged`).
LIST_TASKS_PER_CPU = 4

#: Ray Data (2.60) hands every pool actor its DataContext and its function (which holds the
#: weights' ObjectRef) by ObjectRef, and our model actors restart after a lost node
#: (max_restarts): Ray's core worker then logs an ERROR once per driver, whatever the actor
#: gets. It cannot be avoided short of max_restarts=0 (no recovery from a lost node).
RESTART_NOTE = ("the model actors restart after a lost node and Ray Data passes them their "
                "setup through the object store, so Ray logs an error that an actor 'has "
                "constructor arguments in the object store and max_restarts > 0': harmless "
                "here, as this driver holds those objects until the run ends, so a restarted "
                "actor still finds them")


def read_group_size(n_inputs: int, cluster_cpus: float, decode_batch_size: int) -> int:
    """Images per read task: big enough to batch object-store GETs, small enough that every
    CPU gets several tasks (so small inputs still spread out)."""
    spread = -(-n_inputs // max(1, int(4 * cluster_cpus)))
    return max(1, min(MAX_READ_GROUP, max(decode_batch_size, spread)))


@dataclass(frozen=True)
class JobResult:
    summary: dict[str, Any]
    exit_code: int  # 0 ok, 3 failed fraction over --max-error-rate, 4 rows lost (a bug)
    reason: str


class _ModelActor:
    """Ray actor shell around the Ray-free ModelRunner; gets the weights from the object store."""

    def __init__(self, runner_cls, spec: ModelSpec, state_ref: list, options: InferenceOptions,
                 outputs: tuple):
        state_dict = weights_from_store(ray.get(state_ref[0])) if state_ref else None
        self.runner = runner_cls(spec, state_dict, options, outputs)

    def __call__(self, batch):
        return _stamp(self.runner, batch, "model")


def weights_to_store(state_dict: dict) -> dict:
    """The weights as numpy arrays where numpy has their dtype (a bfloat16 tensor stays one):
    Ray stores arrays as raw buffers and hands actors zero-copy views, where tensors are
    pickled (ResNet-50: `ray.put` 0.13 -> 0.05 s on the driver, on the start-up path; `ray.get`
    0.06 -> 0.002 s in each actor)."""
    out = {}
    for key, value in state_dict.items():
        try:
            out[key] = value.detach().cpu().numpy()
        except (TypeError, RuntimeError):  # a dtype numpy lacks
            out[key] = value
    return out


def weights_from_store(stored: dict) -> dict:
    """`weights_to_store`'s inverse: tensors over the (read-only) arrays; the model's strict
    load copies them into its parameters."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "...array is not writable"
        return {key: torch.from_numpy(value) if isinstance(value, np.ndarray) else value
                for key, value in stored.items()}


def _stamp(fn, batch, stage: str):
    """Run one stage on a batch and stamp every row with its share of the stage's busy time
    and the node it ran on (`_t_<stage>`, `_node_<stage>`): the write task sums them per part,
    so the driver learns per-stage throughput and the nodes that took part."""
    t0 = time.perf_counter()
    out = fn(batch)
    n = len(out["index"])
    out[f"_t_{stage}"] = np.full(n, (time.perf_counter() - t0) / max(n, 1), dtype=np.float64)
    out[f"_node_{stage}"] = np.full(n, ray.get_runtime_context().get_node_id(), dtype=object)
    return out


class _Timed:
    """A stateless stage (read, decode) with `_stamp`."""

    def __init__(self, fn, stage: str):
        self.fn, self.stage = fn, stage

    def __call__(self, batch):
        return _stamp(self.fn, batch, self.stage)


class _WriteTask:
    """Ray shell around the Ray-free PartSink: the node id (for the record and each part's
    file metadata), and the carried input columns (one object-store copy of them, fetched by
    each write task)."""

    def __init__(self, sink: PartSink, extra_ref: list):
        self.sink, self.extra_ref = sink, extra_ref

    def __call__(self, batch):
        self.sink.node = ray.get_runtime_context().get_node_id()
        if self.extra_ref and self.sink.extra is None:
            self.sink.extra = ray.get(self.extra_ref[0])
        return self.sink(batch)


class _Background:
    """A call on a worker thread; `result()` joins it and re-raises its exception."""

    def __init__(self, fn: Callable[[], Any], name: str, daemon: bool = False):
        self._out: list[Any] = []
        self._err: list[BaseException] = []

        def target() -> None:
            try:
                self._out.append(fn())
            except BaseException as exc:  # noqa: BLE001 - re-raised by result()
                self._err.append(exc)

        self._thread = threading.Thread(target=target, name=name, daemon=daemon)
        self._thread.start()

    def result(self) -> Any:
        self._thread.join()
        if self._err:
            raise self._err[0]
        return self._out[0]


def _preload() -> None:
    """Import Ray Data, its streaming executor and the job's stages, on a thread while
    `ray.init` runs.

    Each is imported on first use otherwise: `ray.data` when the dataset is built, the stages
    (decode: Pillow; the writer) when it is composed and the executor when it starts, all
    after `ray.init` and before the first task is submitted, so their ~1.5 CPU-seconds sat on
    the start-up path; `ray.init` mostly waits on its processes.
    """
    import ray.data

    ray.data.DataContext.get_current()  # its first call imports the issue detectors (pydantic)
    try:  # Ray Data's own module (imported by Dataset.iter_batches on the first run)
        import ray.data._internal.execution.streaming_executor  # noqa: F401
    except ImportError:  # moved in another Ray version: imported on first use, as before
        log.debug("Ray Data's streaming executor module was not found to preload")
    from resnet_features.extract import decode, gpu_decode, inference, writer  # noqa: F401


@contextlib.contextmanager
def _gc_paused():
    """The cyclic GC off while Ray starts: the driver's threads import torch, Ray Data and
    pandas meanwhile, whose ~10^6 new objects would trigger hundreds of collections (~20 % of
    the import CPU). It resumes before the plan is awaited, which may go on listing for
    minutes."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


#: Whether this process started (or joined) Ray itself, so `shutdown_ray` should end it.
_ray_started_here = False


def _init_ray() -> None:
    global _ray_started_here
    if ray.is_initialized():
        return
    _ray_started_here = True
    # RAY_ADDRESS (set by `ray job submit`) or a live cluster started with `ray start` on this
    # machine: join it. Otherwise start a private local instance; never join a dead cluster
    # whose address file a killed `ray start` left behind (ray.init would wait on it forever).
    address = os.environ.get("RAY_ADDRESS") or ("auto" if _local_cluster_alive() else "local")
    # A private instance lives as long as this run: no dashboard, which would be about ten more
    # processes to start (ray.init 10.2 -> 4.7 s on 2 cores). A cluster started with
    # `ray start --head` has its own dashboard.
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True,
             **({"include_dashboard": False} if address == "local" else {}))


def shutdown_ray() -> None:
    """Disconnect from Ray, and end a private local instance, if this module started it (a
    caller that had initialised Ray itself keeps it)."""
    global _ray_started_here
    if _ray_started_here and ray.is_initialized():
        _stop_autoscaler_monitor()
        ray.shutdown()
    _ray_started_here = False


def _stop_autoscaler_monitor() -> None:
    """Kill the private instance's autoscaler monitor before `ray.shutdown()` stops the rest.

    `ray.shutdown()` stops the node's processes one by one, the GCS before the monitor, and
    gives each a second after SIGTERM; the monitor's SIGTERM handler reports its own death to
    the GCS that is already gone and never exits in that second, so every local run ended
    with a 1.0 s wait (1.4 -> 0.3 s shutdown on 2 cores). A local node's monitor has nothing
    to scale and no state to save. Only a head node this process started has one here (a
    joined cluster's node object is not a head).
    """
    node = getattr(ray._private.worker, "_global_node", None)
    if node is None or not node.is_head():
        return
    from ray._private import ray_constants

    for info in getattr(node, "all_processes", {}).get(ray_constants.PROCESS_TYPE_MONITOR, []):
        try:
            info.process.kill()
            info.process.wait(timeout=5)
        except Exception:  # noqa: BLE001 - ray.shutdown() below still stops it
            log.debug("could not stop the autoscaler monitor", exc_info=True)


def _local_cluster_alive() -> bool:
    """Whether the cluster in Ray's address file (/tmp/ray/ray_current_cluster) answers."""
    from ray._private.utils import read_ray_address

    address = read_ray_address()
    if not address or ":" not in address:
        return False
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def _resolve_device(cfg: ExtractConfig) -> str:
    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.device == "cuda" and gpus < cfg.num_gpus_per_worker:
        raise DeviceError(
            f"--device cuda asked for, but the Ray cluster has {gpus:g} GPUs (each model actor "
            f"needs {cfg.num_gpus_per_worker:g}); use --device cpu or add GPU workers")
    if cfg.device == "auto":
        device = "cuda" if gpus >= cfg.num_gpus_per_worker else "cpu"
        log.info("--device auto: the cluster has %g GPUs, so the model runs on %s",
                 gpus, device.upper())
        return device
    return cfg.device


def build_dataset(
    cfg: ExtractConfig,
    listing: Listing | StagedWork,
    spec: ModelSpec,
    state_ref: list,
    options: InferenceOptions,
    outputs: tuple,
    runner_cls: Callable | None = None,
) -> ray.data.Dataset:
    """The streaming Dataset of result batches; nothing runs until it is iterated.
    `runner_cls`: the model stage (default `inference.ModelRunner`)."""
    from resnet_features.extract.decode import Decode, DecodeOptions
    from resnet_features.extract.gpu_decode import with_gpu_decode
    from resnet_features.extract.inference import ModelRunner
    from resnet_features.extract.outputs.grid import geometry_of

    runner_cls = runner_cls or ModelRunner
    n_rows = _num_rows(listing)
    group = read_group_size(n_rows, ray.cluster_resources().get("CPU", 1),
                            cfg.decode_batch_size)
    if isinstance(listing, StagedWork):  # chunks staged by the listing tasks, loaded there
        input_format = "images"
        ds = _staged_dataset(listing, group)
    else:  # listing columns only: carried input columns stay on the driver
        input_format = listing.format
        # from_blocks, not from_arrow: the blocks are cut already (listing_blocks), and their
        # metadata is computed here; from_arrow runs a Ray task per block for it, and on a
        # fresh cluster the driver waited 0.4-1 s for a worker to import Ray Data to run them.
        ds = ray.data.from_blocks(listing_blocks(listing, group))
    decode_options = DecodeOptions(
        max_image_pixels=cfg.max_image_pixels or DecodeOptions().max_image_pixels,
        max_image_bytes=cfg.max_image_bytes,
        draft_factor=cfg.draft_factor,
        backend=cfg.decode_backend,
        defer_jpeg=cfg.gpu_decode and options.device == "cuda",
        defer_fraction=cfg.gpu_decode_fraction,
        aspect=geometry_of(cfg),
        boxes_frame=cfg.boxes_frame,
    )
    if decode_options.defer_jpeg:
        runner_cls = with_gpu_decode(runner_cls)
    elif cfg.gpu_decode:
        log.warning("--gpu-decode ignored: the model runs on %s, so JPEGs decode on the CPU",
                    options.device.upper())
    # Read and decode fuse into one CPU task per block: bytes never enter the object store.
    # Retries are bounded on purpose: Ray Data's default for actors is to retry forever, which
    # turns a persistent failure (bad credentials, a broken GPU) into a hang instead of an error.
    with warnings.catch_warnings():
        # Ray 2.60 deprecates retry options as **ray_remote_args but names no replacement yet.
        warnings.simplefilter("ignore", RayDeprecationWarning)
        read = ReadBytes(cfg.storage_options, input_format=input_format,
                         image_column=cfg.image_column)
        ds = ds.map_batches(_Timed(read, "read"), batch_size=None,
                            batch_format="numpy", num_cpus=cfg.decode_num_cpus,
                            max_retries=TASK_RETRIES)
        ds = ds.map_batches(_Timed(Decode(spec.preprocessing, decode_options), "decode"),
                            batch_size=cfg.decode_batch_size, batch_format="numpy",
                            num_cpus=cfg.decode_num_cpus, max_retries=TASK_RETRIES)
        return _map_model(ds, cfg, spec, state_ref, options, outputs, runner_cls, n_rows)


class _LoadChunks:
    """Rows of staged listing chunks (one item per chunk) to compute, for the read tasks."""

    def __init__(self, storage_options):
        self.storage_options = storage_options

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.concat_tables([load_chunk(WorkChunk(**item), self.storage_options)
                                 for item in batch.to_pylist()])


def _staged_dataset(work: StagedWork, group: int) -> ray.data.Dataset:
    """Blocks of about `group` rows from the staged chunks: a task loads a chunk and cuts it
    (the driver holds only the chunks' paths, first work index and bitmaps)."""
    items = [dataclasses.asdict(c) for c in work.chunks]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RayDeprecationWarning)
        ds = ds.map_batches(_LoadChunks(work.storage_options), batch_size=1,
                            batch_format="pyarrow", num_cpus=LOAD_CHUNK_CPUS,
                            max_retries=TASK_RETRIES)
    return ds.repartition(target_num_rows_per_block=group)


@ray.remote(max_retries=TASK_RETRIES)
def _list_units_task(storage_options, bucket, units, folder_uri, group):
    return prefixes.list_units(storage_options, bucket, units, folder_uri, group)


def _list_staged(cfg: ExtractConfig, layout: runs.RunLayout, attempt: int
                 ) -> StagedListing:
    """List an s3:// prefix of images in Ray tasks into chunks under the run's staging
    (`inputs/prefixes.py`): the driver plans the parts and keeps their counts and paths."""
    t0 = time.perf_counter()
    folder = storage.join(layout.staging, LISTING_DIR)
    _remove(layout.fs, folder)  # chunks of an earlier attempt
    cpus = int(ray.cluster_resources().get("CPU", 1))
    fs = prefixes.private_fs(cfg.storage_options)
    bucket, units = prefixes.plan_prefix(fs, cfg.input, want=LIST_TASKS_PER_CPU * cpus)
    groups = prefixes.group_units(units, LIST_TASKS_PER_CPU * cpus)
    folder_uri = storage.full_uri(layout.fs, storage.join(folder, f"attempt-{attempt}"))
    results = ray.get([_list_units_task.remote(cfg.storage_options, bucket, g, folder_uri, i)
                       for i, g in enumerate(groups)])
    kinds: dict[str, int] = {}
    for r in results:
        for k, v in r["other_kinds"].items():
            kinds[k] = kinds.get(k, 0) + v
    listing = StagedListing(chunks=[c for r in results for c in r["chunks"]],
                            skipped_non_image=sum(r["skipped"] for r in results),
                            other_kinds=kinds, seconds=time.perf_counter() - t0,
                            requests=sum(r["requests"] for r in results), units=len(units),
                            tasks=len(groups),
                            cpu_seconds=sum(r["cpu_seconds"] for r in results))
    log.info("listed %d images under %s in %.2fs: %d parts in %d tasks, %d LIST requests, "
             "%d chunks staged (%d non-image entries ignored)", listing.num_rows, cfg.input,
             listing.seconds, len(units), len(groups), listing.requests, len(listing.chunks),
             listing.skipped_non_image)
    return listing


def _node_cpus() -> float:
    """CPUs of the largest alive node (CPU model actors size their torch thread pool on it)."""
    cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return max(cpus, default=1) or 1


#: CPU model actors per node by default: each runs torch on a few threads (see _cpu_layout).
CPU_ACTORS_PER_NODE = 8

#: Fewest inputs per CPU model actor by default. Starting one costs ~2.8 CPU-seconds on 2
#: cores (worker boot, torch, the weights): about what one thread spends on 30 ResNet-50
#: images, and more than a second actor wins back (10-24% of the compute) on fewer than ~128.
#: So a small run (the demo, a nightly increment, a test) gets one actor on all the cores.
CPU_IMAGES_PER_ACTOR = 128


def _cpu_layout(cfg: ExtractConfig, n_inputs: int, batch_size: int, node_cpus: float,
                cluster_cpus: float) -> tuple[int, int, float]:
    """CPU model actors: (pool size, torch threads each, CPUs each reserves).

    Several actors with few threads each rather than one actor on every core: an intra-op
    parallel forward pass waits at every op for its slowest thread, so whenever a decode task
    or one of Ray's own processes (which run at a higher priority than Ray's workers) takes a
    core from one thread, all of them wait. Single-thread actors lose only the preempted one's
    time. On 2 cores, two 1-thread actors beat one 2-thread actor in the job (10-24% in
    back-to-back pairs, ~5% in the median of noisier runs), while the bare forward pass is the
    same either way (BENCHMARKS.md). At most CPU_ACTORS_PER_NODE actors per node bound the
    memory (a model copy each), and never more actors than batches or than one per
    CPU_IMAGES_PER_ACTOR inputs (a small run starts fewer processes). Together the actors
    reserve at most half the CPUs, so Ray still schedules decode tasks on the rest; torch runs
    on all of them, as decode is a small share of the work.
    """
    threads = cfg.cpu_threads or max(1, int(node_cpus // CPU_ACTORS_PER_NODE))
    batches = max(1, -(-n_inputs // batch_size))
    size = cfg.concurrency or max(1, min(int(cluster_cpus // threads), batches,
                                         -(-n_inputs // CPU_IMAGES_PER_ACTOR)))
    if not cfg.cpu_threads:  # fewer actors than the node has room for: more threads each
        threads = max(threads, int(node_cpus // size))
    return size, threads, cfg.num_cpus_per_worker or min(threads / 2, cluster_cpus / 2 / size)


def _map_model(ds, cfg, spec, state_ref, options, outputs, runner_cls, n_inputs: int
               ) -> ray.data.Dataset:
    gpu = options.device == "cuda"
    batch_size = cfg.batch_size or (256 if gpu else 32)
    if gpu:
        size = cfg.concurrency or max(1, int(ray.cluster_resources().get("GPU", 1)
                                               // cfg.num_gpus_per_worker))
        resources: dict[str, Any] = {"num_gpus": cfg.num_gpus_per_worker, "num_cpus": 1}
    else:
        size, threads, reserve = _cpu_layout(cfg, n_inputs, batch_size, _node_cpus(),
                                             ray.cluster_resources().get("CPU", 1))
        resources = {"num_cpus": reserve}
        # Ray would otherwise pin each actor's torch to OMP_NUM_THREADS = its reservation.
        options = replace(options, cpu_threads=threads)
        log.info("CPU model actors: %d, reserving %g CPUs each, %d torch threads each",
                 size, reserve, threads)
    if cfg.model_resources:
        resources["resources"] = dict(cfg.model_resources)
    return ds.map_batches(
        _ModelActor,
        fn_constructor_kwargs={"runner_cls": runner_cls, "spec": spec, "state_ref": state_ref,
                               "options": options, "outputs": outputs},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=4),
        max_restarts=TASK_RETRIES,
        max_task_retries=TASK_RETRIES,
        **resources,
    )


def _torchvision_version() -> str | None:
    """The installed torchvision's version (its distribution's; the driver does not import
    torchvision, see core/weights_table.py)."""
    torchvision = sys.modules.get("torchvision")
    return torchvision.__version__ if torchvision else weights_table.installed_torchvision()
def _write_stage(ds, cfg: ExtractConfig, sink: PartSink, extra_ref: list, rows_per_file: int):
    """Write tasks after the model: each takes up to `rows_per_file` result rows, writes and
    commits them as one part on its node, and returns one record. Tasks, not actors: a write
    holds no state, so Ray may retry it anywhere (its part name is its rows', so a retry
    replaces the same files), and Ray schedules it where its input blocks are."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RayDeprecationWarning)
        return ds.map_batches(_WriteTask(sink, extra_ref), batch_size=rows_per_file,
                              batch_format="numpy", num_cpus=cfg.decode_num_cpus,
                              max_retries=TASK_RETRIES)


#: Ray's errors that a lost node causes (an actor, a worker or an object on it gone).
NODE_LOSS_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.NodeDiedError,
                    ray.exceptions.ObjectLostError, ray.exceptions.WorkerCrashedError)

#: Most seconds the driver waits, after such an error, for the GCS to mark a killed node dead
#: (its health checks: a few seconds apart, five misses) before it names the cause.
NODE_DEATH_SETTLE = 60.0


class ModelNodeLost(RuntimeError):
    """No alive node can host a model actor any more (exit 1; committed parts stay staged)."""


class _ModelNodeWatchdog:
    """Bounds the wait for model actors that cannot come back: once no alive node has the
    resources one model actor reserves (the lost node held the only GPU, or the only
    `--model-resources` node) for `--node-loss-timeout` seconds, it sets `reason`, naming the
    lost node(s); the driver's loop (`_drain`) then stops the pipeline and fails, instead of
    waiting for a node that may never return."""

    def __init__(self, cfg: ExtractConfig, device: str, poll: float = 2.0,
                 own_node: str | None = None):
        self.need = dict(cfg.model_resources)
        if device == "cuda":
            self.need["GPU"] = cfg.num_gpus_per_worker
        self.timeout, self.poll = cfg.node_loss_timeout, poll
        self.own_node = own_node  # the driver's node: a node table without it is no answer
        self.reason: str | None = None
        self.hosts: dict[str, str] = {}  # node id -> address: every node seen fit for a model
        self.table = ""  # the last node table that had no host, for the log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="node-watchdog")

    def _hostable(self) -> bool | None:
        """Whether an alive node has the resources of one model actor; None when Ray's node
        table is no answer (it does not show the driver's own node alive)."""
        nodes = ray.nodes()
        if self.own_node and not any(n.get("Alive") and n.get("NodeID") == self.own_node
                                     for n in nodes):
            return None
        alive = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in nodes
                 if n.get("Alive") and all(n["Resources"].get(k, 0) >= v
                                           for k, v in self.need.items())}
        self.hosts.update(alive)
        if not alive:
            self.table = "; ".join(
                f"{n.get('NodeID')} {'alive' if n.get('Alive') else 'dead'} "
                f"{ {k: n.get('Resources', {}).get(k, 0) for k in self.need} }" for n in nodes)
        return bool(alive)

    def _message(self, when: str) -> str:
        lost = ", ".join(f"{node} ({addr})" for node, addr in sorted(self.hosts.items()))
        return (f"no alive Ray node can host a model actor (each needs {self.need}) {when}: "
                f"the model node that ran them was lost "
                f"({'node ' + lost if lost else 'no such node was seen during this run'}). "
                f"Committed parts stay staged; rerun the same command once the cluster has "
                f"such a node again (--node-loss-timeout sets how long the job waits for one)")

    def lost_reason(self, error: BaseException, settle: float = NODE_DEATH_SETTLE
                    ) -> str | None:
        """After the pipeline failed with `error`: the lost-node reason if no node can host a
        model actor, else None. Ray's actors can fail (their node's raylet is unreachable)
        before the GCS marks the node dead (its health checks take ~15-30 s), so after an
        error a lost node causes, this waits up to `settle` s for that verdict."""
        if self.reason is not None:
            return self.reason
        if not self.need:
            return None
        chain, e = [], error
        while e is not None and len(chain) < 10:
            chain.append(e)
            e = e.__cause__ or e.__context__
        if not any(isinstance(e, NODE_LOSS_ERRORS) for e in chain):
            settle = 0.0
        t0 = time.monotonic()
        while True:
            try:
                if self._hostable() is False:
                    return self._message(f"{time.monotonic() - t0:.0f} s after the pipeline "
                                         f"failed")
            except Exception:  # Ray itself is gone: the caller re-raises the original error
                return None
            if time.monotonic() - t0 >= settle:
                return None
            time.sleep(self.poll)

    def _watch(self) -> None:
        lost_since = None
        while not self._stop.wait(self.poll):
            try:
                hostable = self._hostable()
            except Exception as exc:  # noqa: BLE001 - the GCS did not answer: ask again
                log.warning("the node watchdog could not list Ray's nodes (%s: %s)",
                            type(exc).__name__, exc)
                continue
            if hostable is None:
                log.warning("Ray's node table does not show this driver's node: ignored")
                continue
            if hostable:
                lost_since = None
                continue
            if lost_since is None:
                lost_since = time.monotonic()
                log.warning("no alive Ray node can host a model actor (each needs %s); the job "
                            "fails in %g s unless one comes back. Ray's nodes: %s", self.need,
                            self.timeout, self.table)
            if time.monotonic() - lost_since >= self.timeout:
                self.reason = self._message(f"for {self.timeout:g} s (--node-loss-timeout)")
                log.error(self.reason)
                return

    def __enter__(self):
        if self.need:  # CPU model actors fit on any node: nothing to watch
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        return False


#: Seconds the driver waits at a time for the pipeline's next records before it looks at the
#: watchdog again; and how long it gives the reading thread to stop once the run has failed.
DRAIN_POLL = 1.0
DRAIN_STOP_WAIT = 10.0


def _drain(batches: Callable[[], Any], watchdog: _ModelNodeWatchdog,
           take: Callable[[Any], None], shutdown: Callable[[], None] = lambda: None) -> None:
    """Feed every item of `batches()` to `take`, on this thread, in order; fail with
    ModelNodeLost within DRAIN_POLL s of the watchdog's verdict.

    Ray Data's iterator cannot be waited on with a timeout: between batches the thread that
    iterates it sits in a `queue.Queue.get()` without one (`iter_threaded`), and neither
    `_thread.interrupt_main` nor a KeyboardInterrupt wakes it (they raise only once that
    thread runs Python code again, i.e. once a batch comes). When the only model node is
    lost, no batch ever comes, so a driver that iterates Ray's iterator itself can wait
    forever. So a daemon thread iterates it and this thread waits on a queue of its own,
    with a timeout.
    On any way out other than the end of the data, `shutdown` stops Ray's executor (so the
    reading thread's wait ends) and the reading thread closes the iterator; committed parts
    are durable as they are, so nothing else needs writing for a rerun to resume.
    """
    items: queue.Queue = queue.Queue(maxsize=4)
    stop = threading.Event()
    end = object()

    def offer(item: Any) -> None:
        while not stop.is_set():
            try:
                items.put(item, timeout=DRAIN_POLL)
                return
            except queue.Full:
                continue

    def pump() -> None:
        it = None
        try:
            it = iter(batches())
            for item in it:
                offer(item)
                if stop.is_set():
                    return
            offer(end)
        except BaseException as exc:  # noqa: BLE001 - handed to the driver's thread
            offer(exc)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    reader = threading.Thread(target=pump, daemon=True, name="drain-batches")
    reader.start()
    finished = False
    try:
        while True:
            if watchdog.reason is not None:
                raise ModelNodeLost(watchdog.reason)
            try:
                item = items.get(timeout=DRAIN_POLL)
            except queue.Empty:
                continue
            if item is end:
                finished = True
                return
            if isinstance(item, BaseException):
                raise item
            take(item)
    finally:
        stop.set()
        if not finished:
            shutdown()
            reader.join(DRAIN_STOP_WAIT)
            if reader.is_alive():
                log.warning("the thread reading Ray's pipeline did not stop within %g s; "
                            "leaving it to the process exit", DRAIN_STOP_WAIT)


def _shutdown_executor(ds: ray.data.Dataset) -> None:
    """Stop the streaming executor behind `ds.iter_batches` now (its tasks, actors and
    scheduling thread), so that a reader waiting on it returns. Ray Data has no public handle
    for it: the Dataset keeps it once the first batch is out (`_current_executor`, what Ray
    Data's own cleanup uses), and before that it is the thread Ray names after the dataset."""
    name = f"StreamingExecutor-{ds.get_dataset_id()}"
    executors = {id(e): e for e in [getattr(ds, "_current_executor", None),
                                    *(t for t in threading.enumerate() if t.name == name)]
                 if callable(getattr(e, "shutdown", None))}
    for executor in executors.values():
        try:
            executor.shutdown(force=True)
        except Exception as exc:  # noqa: BLE001 - already failing: the first error is the one
            log.warning("stopping Ray Data's executor failed (%s: %s)", type(exc).__name__,
                        exc)


class _Progress:
    """The driver's periodic line: done/total, images/s over the last interval and overall,
    and an ETA at the recent rate."""

    def __init__(self, total: int, t0: float, every: float = 10.0):
        self.total, self.t0, self.every = total, t0, every
        self.last_t, self.last_done = t0, 0

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last_t < self.every and done < self.total:
            return
        recent = (done - self.last_done) / max(now - self.last_t, 1e-9)
        overall = done / max(now - self.t0, 1e-9)
        rate = recent or overall
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        log.info("%d/%d images done (%.1f%%): %.1f images/s in the last %.0f s, %.1f overall, "
                 "ETA %s", done, self.total, 100 * done / max(self.total, 1), recent,
                 now - self.last_t, overall, _duration(eta))
        self.last_t, self.last_done = now, done


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


def _stage_summary(commits: CommitLog, wall: float) -> dict[str, Any]:
    """Per stage: rows, busy seconds summed over its workers, rows per busy second (one
    worker's speed) and rows per wall second of the attempt (the stage's share of the run)."""
    out = {}
    for stage in ("read", "decode", "model", "write"):
        busy = commits.busy_seconds.get(stage, 0.0)
        rows = commits.stage_rows.get(stage, 0)
        out[stage] = {"rows": rows, "busy_seconds": round(busy, 3),
                      "rows_per_busy_second": round(rows / busy, 1) if busy > 0 else None,
                      "rows_per_wall_second": round(rows / wall, 1) if wall > 0 else None}
    out["write"]["bytes_written"] = commits.bytes_written
    return out


def _noop(cfg: ExtractConfig, finished: dict[str, Any]) -> JobResult:
    reason = (f"run {cfg.run_id} already finished at {finished.get('finished_at')} with "
              f"{finished.get('succeeded')} rows under {cfg.output}/run={cfg.run_id}/; nothing to "
              f"do (pass --overwrite to recompute it, or another --run-id)")
    log.info(reason)
    return JobResult(summary={**finished, "noop": True, "reason": reason}, exit_code=0,
                     reason=reason)


INCREMENTAL_REASON = ("same uri + content fingerprint as the newest earlier finished run with "
                      "this model/weights/preprocessing/task that computed it")
RETRY_REASON = "only inputs that failed in that run"


def _select_staged(cfg: ExtractConfig, layout: runs.RunLayout, listing: StagedListing,
                   state: runs.RunState, task_fp: str) -> tuple[StagedWork, dict[str, Any]]:
    """`_select_work` for a staged listing: the same filters, chunk by chunk; the lookups
    (committed inputs, earlier runs' ledger, failed inputs) are what the driver holds."""
    skipped: dict[str, Any] = {}
    committed = None
    if state.committed.num_rows:
        committed = UriLookup(state.committed)
        skipped["resumed_from_earlier_attempt"] = int(state.committed.num_rows)
    incremental = info = retry = None
    if cfg.incremental:
        incremental, info = runs.incremental_lookup(layout.fs, layout.root, task_fp,
                                                    exclude_run=cfg.run_id)
    if cfg.retry_errors:
        retry = runs.failed_lookup(layout.fs, layout.root, cfg.retry_errors)
    work, counts = select_staged(listing, cfg.storage_options, committed=committed,
                                 incremental=incremental, retry=retry)
    if cfg.incremental:
        skipped["incremental"] = {**counts["incremental"], **info,
                                  "reason": INCREMENTAL_REASON}
    if retry is not None:
        retried = counts["retry_errors"]["retried"]
        skipped["retry_errors"] = {"failed_in_run": len(retry), "retried": retried,
                                   "failed_but_gone": len(retry) - retried,
                                   "run": cfg.retry_errors, "reason": RETRY_REASON}
    skipped["not_computed"] = int(listing.num_rows - work.num_rows)
    return work, skipped


def _forget_attempt(layout: runs.RunLayout, state: runs.RunState) -> None:
    """Remove the staging a first attempt made before its listing failed (a usage error),
    so a bad input leaves nothing behind, as when the listing comes before the attempt."""
    if state.attempt or state.committed.num_rows:
        return
    fs = layout.fs
    _remove(fs, layout.staging)
    parent = layout.staging.rsplit("/", 1)[0]
    if fs.exists(parent) and not fs.ls(parent, detail=False):
        _remove(fs, parent)


def _remove(fs, path: str) -> None:
    """Remove a folder if it is there: on an object store a folder whose objects were never
    written (a listing that staged no chunk) does not exist."""
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _select_work(cfg: ExtractConfig, layout: runs.RunLayout, listing: pa.Table,
                 state: runs.RunState, task_fp: str
                 ) -> tuple[pa.Table, dict[str, Any], np.ndarray]:
    """The listing rows this attempt computes, re-indexed 0..n-1, why the others are not, and
    the mask that selected them (carried input columns are filtered with it)."""
    skipped: dict[str, Any] = {}
    todo = np.ones(listing.num_rows, dtype=bool)
    if state.committed.num_rows:
        done = pc.is_in(listing.column("uri"), value_set=state.committed.column("uri"))
        todo &= ~done.to_numpy(zero_copy_only=False)
        skipped["resumed_from_earlier_attempt"] = int(state.committed.num_rows)
    if cfg.incremental:
        mask, counts = runs.incremental_decision(layout.fs, layout.root, task_fp, listing,
                                                 exclude_run=cfg.run_id)
        todo &= mask
        skipped["incremental"] = {**counts, "reason": INCREMENTAL_REASON}
    if cfg.retry_errors:
        mask, counts = runs.retry_filter(layout.fs, layout.root, cfg.retry_errors, listing)
        todo &= mask
        skipped["retry_errors"] = {**counts, "run": cfg.retry_errors, "reason": RETRY_REASON}
    work = listing.filter(pa.array(todo))
    work = work.set_column(0, "index", pa.array(np.arange(work.num_rows, dtype=np.int64)))
    skipped["not_computed"] = int(listing.num_rows - work.num_rows)
    return work, skipped, todo


@dataclass(frozen=True)
class _Plan:
    """What the driver prepares before any Ray work: the model, the outputs, the listing and
    the inputs this attempt computes."""

    spec: ModelSpec
    state_dict: Any
    identity: dict[str, Any]
    task_fp: str
    units: tuple
    state: runs.RunState
    work: Listing | StagedWork  # the listing rows to compute (staged: chunks + bitmaps)
    skipped: dict[str, Any]
    extra: pa.Table | None
    listed: dict[str, Any]  # the summary's listing figures


def _num_rows(work: Listing | StagedWork) -> int:
    return work.num_rows if isinstance(work, StagedWork) else work.table.num_rows


def _list(cfg: ExtractConfig) -> Listing:
    listing = list_inputs(cfg.input, InputSpec(
        format=cfg.input_format, image_column=cfg.image_column, id_column=cfg.id_column,
        uri_column=cfg.uri_column, keep_columns=cfg.keep_columns + tuple(
            c for c in (cfg.boxes_column,) if c and c not in cfg.keep_columns),
        where=cfg.where),
        cfg.storage_options)
    if cfg.boxes_column or cfg.boxes_file:
        listing = attach_boxes(listing, input_uri=cfg.input, column=cfg.boxes_column,
                               sidecar=cfg.boxes_file, keep=cfg.keep_columns,
                               storage_options=cfg.storage_options)
    return listing


def _plan(cfg: ExtractConfig, layout: runs.RunLayout, finished: dict[str, Any] | None,
          staged: bool = False) -> _Plan | JobResult:
    """Everything before the model's work: the weights load while a thread lists the inputs.
    No Ray call (it runs while Ray starts), except a `staged` listing's tasks (an s3:// prefix
    of images, listed by Ray tasks: Ray is up then). Raises on bad weights, outputs or
    listing; a run whose publish was cut short is published here (the JobResult)."""
    from resnet_features.core.models import resolve_model  # torch, torchvision: see the top
    from resnet_features.extract.outputs import build_outputs

    if layout.publish_pending() and not cfg.overwrite:
        log.info("run %s was complete but not fully published: publishing it now", cfg.run_id)
        manifest = layout.publish()
        summary = layout.published_summary() or {"status": manifest["status"]}
        return JobResult(summary=summary, exit_code=0 if manifest["status"] == "succeeded" else 3,
                         reason=summary.get("reason", "published"))
    if (layout.fs.exists(layout.final) and finished is None
            and layout.published_manifest() is None and not cfg.overwrite):
        raise OutputExistsError(f"{cfg.output}/run={cfg.run_id}/ exists but is no run this job "
                                f"published; pass --overwrite or choose another --run-id")
    # A daemon thread: bad weights or outputs fail at once, without waiting for a long listing.
    listing_job = (None if staged else
                   _Background(lambda: _list(cfg), name="list-inputs", daemon=True))
    spec, state_dict = resolve_model(cfg.model, cfg.weights, preprocess_from=cfg.preprocess_from,
                                     storage_options=cfg.storage_options,
                                     weights_sha256=cfg.weights_sha256)
    identity = runs.task_identity(spec, cfg.task, cfg.top_k)
    if cfg.resize_short is not None:
        # The uncropped geometry changes every column (the embedding too): such rows never
        # stand in for centre-crop rows, or for rows of another geometry, box source or layer.
        identity["detection"] = {k: getattr(cfg, k) for k in (
            "resize_short", "max_size", "grid", "boxes_column", "boxes_file", "boxes_frame",
            "region_layer", "region_dtype", "region_maps")}
    task_fp = runs.fingerprint_of(identity)
    units = build_outputs(cfg, spec)  # a bad --head or --explain-class fails here
    state: runs.RunState | None = None
    staged_listing: StagedListing | None = None
    if staged:  # listed in Ray tasks into the attempt's staging, never whole here
        state = layout.start_attempt(task_fp, fresh=cfg.overwrite)
        staged_listing = _list_staged(cfg, layout, state.attempt)
        if not staged_listing.num_rows:
            if cfg.input_format == "auto" and staged_listing.other_kinds:
                # shards, tables or manifests: listed by their format below
                _remove(layout.fs, storage.join(layout.staging, LISTING_DIR))
                staged_listing = None
            else:
                _forget_attempt(layout, state)
                staged_listing.check(cfg.input)
    if staged_listing is not None:
        work, skipped = _select_staged(cfg, layout, staged_listing, state, task_fp)
        extra = None
        listed = {"listed": staged_listing.num_rows, "listing_seconds": staged_listing.seconds,
                  "bytes_listed": staged_listing.bytes,
                  "skipped_non_image": staged_listing.skipped_non_image,
                  "input_format": staged_listing.format,
                  "input_objects": staged_listing.num_rows + staged_listing.skipped_non_image,
                  "listing": {"staged": True, "parts": staged_listing.units,
                              "tasks": staged_listing.tasks,
                              "list_requests": staged_listing.requests,
                              "chunks": len(staged_listing.chunks),
                              "task_cpu_seconds": round(staged_listing.cpu_seconds, 2)}}
    else:
        listing = listing_job.result() if listing_job is not None else _list(cfg)
        for unit in units:
            unit.sized_for(listing.table)
        table = listing.table
        if cfg.fingerprint == "hash":
            if listing.format in ("tar", "parquet"):
                raise ConfigError("--fingerprint hash reads whole objects by URI: it works for "
                                  "images and manifests, not for tar members or Parquet rows "
                                  "(their stat fingerprint already covers the shard's size "
                                  "and ETag/mtime)")
            table = runs.hash_fingerprints(table, cfg.storage_options)
        if state is None:
            state = layout.start_attempt(task_fp, fresh=cfg.overwrite)
        work_table, skipped, todo = _select_work(cfg, layout, table, state, task_fp)
        if cfg.where:
            skipped["filtered"] = listing.filtered  # rows --where left out: never listed
        extra = listing.extra.filter(pa.array(todo)) if listing.extra is not None else None
        work = replace(listing, table=work_table, extra=extra)
        listed = {"listed": table.num_rows, "listing_seconds": listing.seconds,
                  "bytes_listed": int(pc.sum(table.column("size_bytes")).as_py() or 0),
                  "skipped_non_image": listing.skipped_non_image,
                  "input_format": listing.format, "input_objects": listing.sources,
                  "listing": {"staged": False}}
    log.info("run %s attempt %d: %d of %d listed inputs to compute (%s)", cfg.run_id,
             state.attempt, _num_rows(work), listed["listed"], skipped)
    return _Plan(spec=spec, state_dict=state_dict, identity=identity, task_fp=task_fp,
                 units=units, state=state, work=work, skipped=skipped, extra=extra,
                 listed=listed)


def run(cfg: ExtractConfig, *, runner_cls: Callable | None = None) -> JobResult:
    """Run (or resume, or finish publishing) one run of the job. Raises on bad
    input/weights/output before any work; a finished run is a no-op unless --overwrite.
    `runner_cls`: the model stage (default `inference.ModelRunner`)."""
    started_at, t0 = storage.now_iso(), time.perf_counter()
    fs, root = storage.filesystem(cfg.output, cfg.storage_options)
    layout = runs.RunLayout(fs, root, cfg.run_id)
    finished = layout.finished_summary()
    if finished is not None and not cfg.overwrite:
        return _noop(cfg, finished)
    check_input_exists(cfg.input, cfg.storage_options)  # before Ray: a typo fails in a second
    if cfg.device == "cuda":  # a cluster without GPUs fails here, before any weights or output
        _init_ray()
        _resolve_device(cfg)
    # Column flags (--where, --id-column, ...) belong to table-like formats: with any of them
    # the driver's listing runs, which applies them or refuses them for images.
    column_flags = (cfg.where or cfg.id_column or cfg.keep_columns or cfg.image_column != "image"
                    or cfg.uri_column != "uri")
    staged = (not (cfg.boxes_column or cfg.boxes_file or column_flags)
              and cfg.fingerprint != "hash"
              and stages_listing(cfg.input, cfg.input_format, cfg.storage_options))
    if staged:
        _init_ray()  # the listing itself runs in Ray tasks
    if ray.is_initialized() or cfg.incremental or cfg.retry_errors:
        plan = _plan(cfg, layout, finished, staged)
    else:
        # Overlap start-up: Ray's processes start (on 2 cores, ray.init takes 5-15 s) while a
        # thread loads the weights, lists the inputs and starts the attempt (ray.init stays on
        # the main thread, where it sets its signal handlers). Not for --incremental/
        # --retry-errors runs, which may find nothing to compute and then need no Ray at all.
        planning = _Background(lambda: _plan(cfg, layout, finished), name="plan")
        try:
            with _gc_paused():
                preloading = _Background(_preload, name="preload", daemon=True)
                _init_ray()
                preloading.result()
        finally:
            plan = planning.result()
    if isinstance(plan, JobResult):
        return plan
    # Imported by the plan already (its weights and output units): see the top of the module.
    import torch

    from resnet_features.extract.inference import InferenceOptions, precision_name
    from resnet_features.extract.outputs import units_metadata
    from resnet_features.extract.writer import CommitLog, PartSink, auto_rows_per_file

    spec, state_dict, task_fp, units = plan.spec, plan.state_dict, plan.task_fp, plan.units
    identity = plan.identity
    state, work, skipped = plan.state, plan.work, plan.skipped
    n_work = _num_rows(work)
    extra, listed = plan.extra, plan.listed
    options, device, missing = None, "none", []
    commits = CommitLog(0)
    rows_per_file = cfg.rows_per_file or auto_rows_per_file(units)
    extras = units_metadata(units)
    work_seconds = 0.0
    if n_work:
        _init_ray()
        device = _resolve_device(cfg)
        options = InferenceOptions(device=device, precision=cfg.precision, compile=cfg.compile)
        file_metadata = {
            "package_version": __version__,
            "model": spec.name,
            "weights": spec.weights_id,
            "preprocessing": spec.preprocessing.to_dict(),
            "task": cfg.task,
            "precision": precision_name(options),
            "device": device,
            "run_id": cfg.run_id,
            "task_fingerprint": task_fp,
            **extras,
        }
        sink = PartSink(layout.staging_uri(), units=units, file_metadata=file_metadata,
                        storage_options=cfg.storage_options, attempt=state.attempt,
                        extra_schema=extra.schema if extra is not None else None)
        commits = CommitLog(n_work)
        state_ref = [ray.put(weights_to_store(state_dict))] if state_dict is not None else []
        log.info(RESTART_NOTE)
        extra_ref = [ray.put(extra)] if extra is not None else []
        ds = build_dataset(cfg, work, spec, state_ref, options, units, runner_cls)
        ds = _write_stage(ds, cfg, sink, extra_ref, rows_per_file)
        work_t0 = time.perf_counter()
        progress = _Progress(n_work, work_t0)
        watchdog = _ModelNodeWatchdog(cfg, device,
                                      own_node=ray.get_runtime_context().get_node_id())

        def take(records: pa.Table) -> None:
            commits.add(records)
            progress.update(commits.done)

        try:
            with watchdog:
                # On an error (storage down while writing, a lost node), the pipeline stops
                # and frees its actors now; committed parts stay staged and a rerun resumes.
                _drain(lambda: ds.iter_batches(batch_size=None, batch_format="pyarrow"),
                       watchdog, take, shutdown=lambda: _shutdown_executor(ds))
        except ModelNodeLost:
            raise
        except Exception as exc:
            # Ray may give up on the model actors before the watchdog does (their task retries
            # run out on a dead node): name the cause when it is a lost model node.
            reason = watchdog.lost_reason(exc)
            if reason is None:
                raise
            raise ModelNodeLost(f"{reason} ({type(exc).__name__}: {exc})") from exc
        work_seconds = time.perf_counter() - work_t0
        lost = commits.missing_indices()
        missing = (work.uris_at(lost[:10]) if isinstance(work, StagedWork) else
                   [work.table.column("uri")[i].as_py() for i in lost[:10]])
        missing_count = len(lost)
        for scratch in (runs.TMP_DIR, LISTING_DIR):
            _remove(fs, storage.join(layout.staging, scratch))
        skipped["duplicate_rows_dropped"] = commits.duplicates_dropped
    else:
        missing_count = 0
    # The committed fragments of every attempt, made disjoint (`RunLayout.reconcile`): the
    # counts are the ledger's, so they are what gets published.
    ledger = layout.reconcile()
    succeeded = int(pc.sum(pc.equal(ledger["status"], "ok")).as_py() or 0)
    failed = ledger.num_rows - succeeded
    total = succeeded + failed
    elapsed = time.perf_counter() - t0
    summary = {
        "run_id": cfg.run_id,
        "attempt": state.attempt,
        "inputs": total,
        "listed": listed["listed"],
        "computed": n_work,
        "reused": state.committed.num_rows,
        "skipped": skipped,
        "succeeded": succeeded,
        "failed": failed,
        "failed_by_stage": commits.failed_by_stage(),
        "lost": missing_count,
        "model": spec.name,
        "weights": spec.weights_id,
        "weights_arg": cfg.weights,
        "task": cfg.task,
        "task_fingerprint": task_fp,
        "top_k": cfg.top_k,
        "embedding_dim": spec.embedding_dim,
        "preprocessing": spec.preprocessing.to_dict(),
        "device": device,
        "precision": precision_name(options) if options else "none",
        "input": cfg.input,
        "output": cfg.output,
        "started_at": started_at,
        "finished_at": storage.now_iso(),
        "elapsed_seconds": round(elapsed, 3),
        "images_per_second": round(n_work / elapsed, 3) if elapsed > 0 else None,
        "listing_seconds": round(listed["listing_seconds"], 3),
        "bytes_listed": listed["bytes_listed"],
        "skipped_non_image": listed["skipped_non_image"],
        "input_format": listed["input_format"],
        "input_objects": listed["input_objects"],
        "listing": listed["listing"],
        "bytes_read": commits.bytes_read,
        "rows_per_file": rows_per_file,
        "files_this_attempt": sorted(commits.data_files),
        "stages": _stage_summary(commits, work_seconds),
        "nodes": {stage: sorted(ids) for stage, ids in sorted(commits.nodes.items())},
        "driver": {"bytes_received": commits.received_bytes,
                   "bytes_received_per_input": round(commits.received_bytes / n_work, 1)
                   if n_work else 0.0,
                   "parts": len(commits.parts),
                   "node": ray.get_runtime_context().get_node_id()
                   if ray.is_initialized() else None},
        "versions": {"resnet_features": __version__, "torch": torch.__version__,
                     "torchvision": _torchvision_version(), "ray": ray.__version__,
                     "python": sys.version.split()[0]},
        "config": cfg.public_dict(),
        **extras,
    }
    exit_code, reason = 0, "ok"
    if missing_count:
        exit_code = 4
        reason = (f"{missing_count} inputs never came back from the pipeline (first: "
                  f"{missing[0]}); this is a bug, please report it. The run stays staged; "
                  f"rerunning the same command recomputes only the missing inputs")
    elif total and failed / total > cfg.max_error_rate:
        exit_code = 3
        reason = (f"{failed} of {total} images failed ({failed / total:.1%}), over "
                  f"--max-error-rate {cfg.max_error_rate:g}; see "
                  f"{cfg.output}/run={cfg.run_id}/_errors/ (published without _SUCCESS; "
                  f"--retry-errors {cfg.run_id} retries them)")
    summary["status"] = "succeeded" if exit_code == 0 else "failed"
    summary["reason"] = reason
    if exit_code == 4:
        storage.write_json(fs, storage.join(layout.staging, runs.SUMMARY_FILE), summary)
    else:
        layout.stage_manifest(summary, identity, success=exit_code == 0)
        layout.publish()
    return JobResult(summary=summary, exit_code=exit_code, reason=reason)
