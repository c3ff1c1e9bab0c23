"""GPU benchmark without Ray: the model stage alone, and decode + model on one GPU node.

Ray is not needed (GPU machines used for benchmarking may not have it): the node run drives the
job's own stages the way the Ray pipeline does. CPU decode processes run `decode.Decode` on
batches (reading the files, as the fused read+decode task does) and hand uint8 crops over in
shared memory (Ray's object store is shared memory too); with --gpu-decode-fraction F they pass
that share of the JPEGs on as bytes, and the model process runs
`gpu_decode.with_gpu_decode(ModelRunner)`: nvJPEG decode of the deferred JPEGs, then the model,
then embeddings back to host memory, one batch at a time, exactly as the model actor does.

    python benchmarks/gpu_node.py --json gpu.json                # on a CUDA machine, ~4 min
    python benchmarks/gpu_node.py --smoke                        # CPU, tiny: checks the harness

Sections (each prints a table; everything lands in the JSON):
- model: ResNet-50 and ResNet-34 alone, batch 256: eager fp32 NCHW torchvision (the baseline)
  vs the job's ModelRunner (uint8 in, normalised on device, channels_last, bf16 autocast), eager
  and torch.compile'd, from device memory and from host memory (pinned copy + results back to
  the host); plus the cosine of the bf16 embeddings against the fp32 baseline.
- node: JPEGs to embeddings with W CPU decode processes and a GPU share F, swept; GPU
  utilisation sampled through NVML during each timed window.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from multiprocessing import shared_memory

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE, os.path.join(os.path.dirname(HERE), "tests")]

from helpers import cosine, make_calibrated_state_dict  # noqa: E402
from run import _reference_model, make_corpus  # noqa: E402
from torchvision.models import get_model_builder  # noqa: E402

from resnet_features.core.models import resolve_model  # noqa: E402
from resnet_features.extract.decode import Decode, DecodeOptions  # noqa: E402
from resnet_features.extract.gpu_decode import with_gpu_decode  # noqa: E402
from resnet_features.extract.inference import InferenceOptions, ModelRunner  # noqa: E402
from resnet_features.extract.outputs import for_task  # noqa: E402

log = logging.getLogger("gpu_node")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rate(fn, inputs: list, batch: int, iters: int, reps: int, device: str) -> float:
    """Images/s: median of `reps` timings of `iters` calls, rotating over distinct inputs."""
    for x in inputs[:2]:
        fn(x)
    _sync(device)
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(iters):
            fn(inputs[i % len(inputs)])
        _sync(device)
        rates.append(iters * batch / (time.perf_counter() - t0))
    return statistics.median(rates)


# ----------------------------------------------------------------------------- model stage

def bench_model(names: list[str], batch: int, iters: int, reps: int, device: str,
                workdir: str, photos: np.ndarray) -> dict:
    out: dict = {}
    gen = torch.Generator().manual_seed(0)
    for name in names:
        weights = make_calibrated_state_dict(name, os.path.join(workdir, f"{name}.pt"))
        spec, state = resolve_model(name, weights)
        # Distinct batches of real photo crops (rotated so no run measures a cached input).
        host = []
        for _ in range(4):
            idx = torch.randint(0, len(photos), (batch,), generator=gen).numpy()
            host.append(np.ascontiguousarray(photos[idx]))
        dev8 = [torch.from_numpy(h).to(device) for h in host]
        prep = spec.preprocessing
        mean = torch.tensor(prep.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(prep.std, device=device).view(1, 3, 1, 1)
        nchw = [((x.permute(0, 3, 1, 2).float() / 255.0 - mean) / std).contiguous() for x in dev8]

        plain = get_model_builder(name)(weights=None)
        plain.load_state_dict(state)
        plain = plain.to(device).eval()
        pooled: dict = {}
        plain.avgpool.register_forward_hook(
            lambda m, i, o, pooled=pooled: pooled.__setitem__("x", o))

        def eager_fp32(x, plain=plain):
            with torch.inference_mode():
                plain(x)

        res: dict = {}
        t = time.perf_counter()
        # The baseline as torch ships: cuDNN autotuning off, TF32 convolutions allowed (torch's
        # default); "strict" also turns TF32 off. The job's runner turns autotuning on.
        cudnn = torch.backends.cudnn
        saved = cudnn.benchmark, cudnn.allow_tf32
        cudnn.benchmark = False
        res["eager_fp32_nchw"] = _rate(eager_fp32, nchw, batch, iters, reps, device)
        cudnn.allow_tf32 = False
        res["eager_fp32_nchw_strict"] = _rate(eager_fp32, nchw, batch, iters, reps, device)
        cudnn.benchmark, cudnn.allow_tf32 = saved
        with torch.inference_mode():
            plain(nchw[0])
        ref_emb = torch.flatten(pooled["x"], 1).float().cpu().numpy()
        log.info("%s eager fp32: %.0f img/s (%.1fs)", name, res["eager_fp32_nchw"],
                 time.perf_counter() - t)
        del plain
        fidelity = {}
        for compiled in (False, True):
            tag = "compiled" if compiled else "eager"
            t = time.perf_counter()
            runner = ModelRunner(spec, state, InferenceOptions(
                device=device, precision="auto", compile=compiled), for_task(spec, "both"))
            try:
                res[f"runner_{tag}_device"] = _rate(runner.forward_tensor, dev8, batch, iters,
                                                    reps, device)
            except Exception as exc:  # noqa: BLE001 - a compiler failure is a result too
                log.exception("%s runner %s failed", name, tag)
                fidelity[tag] = f"failed: {type(exc).__name__}: {exc}"[:300]
                continue
            res[f"runner_{tag}_host"] = _rate(runner.forward, host, batch, iters, reps, device)
            emb = runner.embed(host[0])
            fidelity[tag] = round(float(cosine(emb, ref_emb).min()), 5)
            log.info("%s runner %s: device %.0f, host %.0f img/s (%.1fs incl. compile)", name,
                     tag, res[f"runner_{tag}_device"], res[f"runner_{tag}_host"],
                     time.perf_counter() - t)
            del runner
        base = res["eager_fp32_nchw"]
        out[name] = {
            "batch": batch,
            "precision": "bf16" if device == "cuda" else "fp32",
            "images_per_s": {k: round(v) for k, v in res.items()},
            "speedup_vs_eager_fp32": {k: round(v / base, 2) for k, v in res.items()},
            "cosine_min_vs_eager_fp32": fidelity,
        }
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- node

def _decode_worker(paths, prep, options_kw, slots_name, slot_shape, task_q, free_q, ready_q):
    """A CPU decode process: read files, run the job's Decode stage, hand pixels over."""
    torch.set_num_threads(1)
    shm = shared_memory.SharedMemory(name=slots_name)
    slots = np.ndarray(slot_shape, dtype=np.uint8, buffer=shm.buf)
    decode = Decode(prep, DecodeOptions(**options_kw))
    try:
        while True:
            task = task_q.get()
            if task is None:
                break
            seq, idx = task
            datas = []
            for i in idx:
                with open(paths[i], "rb") as f:
                    datas.append(f.read())
            column = np.empty(len(datas), dtype=object)
            column[:] = datas
            out = decode({"uri": np.array([paths[i] for i in idx]), "bytes": column})
            slot = free_q.get()
            slots[slot][: len(idx)] = out.pop("image")
            ready_q.put((seq, slot, out))
    finally:
        del slots
        shm.close()


class _UtilSampler(threading.Thread):
    """GPU utilisation (NVML, percent of time a kernel ran) sampled every 100 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[int] = []
        self.stop = threading.Event()

    def run(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception as exc:  # noqa: BLE001 - no NVML: say so in the results
            self.error = f"{type(exc).__name__}: {exc}"
            return
        while not self.stop.wait(0.1):
            self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

    def result(self):
        if not self.samples:
            return getattr(self, "error", "no samples")
        return round(statistics.mean(self.samples), 1)


def run_node(paths: list[str], runner, workers: int, fraction: float, batch: int,
             n_batches: int, warmup: int, with_model: bool, device: str) -> dict:
    """Decode + model over n_batches batches; throughput over the batches after `warmup`."""
    prep = runner.spec.preprocessing
    crop = prep.crop_size
    n_slots = max(2, 2 * workers)
    slot_shape = (n_slots, batch, crop, crop, 3)
    shm = shared_memory.SharedMemory(create=True, size=int(np.prod(slot_shape)))
    slots = np.ndarray(slot_shape, dtype=np.uint8, buffer=shm.buf)
    registered = False
    if device == "cuda":
        # Page-locking the hand-over memory lets the copy to the GPU run as DMA straight from
        # it (Ray's object store is plain shared memory; the job copies via a pinned buffer).
        try:
            registered = int(torch.cuda.cudart().cudaHostRegister(
                slots.ctypes.data, slots.nbytes, 0)) == 0
        except Exception as exc:  # noqa: BLE001 - fall back to the runner's pinned buffer
            log.warning("cudaHostRegister failed (%s); pageable hand-over", exc)
    ctx = mp.get_context("spawn")
    task_q, free_q, ready_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
    for s in range(n_slots):
        free_q.put(s)
    order = np.arange(n_batches * batch) % len(paths)
    for seq in range(n_batches):
        task_q.put((seq, order[seq * batch:(seq + 1) * batch].tolist()))
    options_kw = {"defer_jpeg": fraction > 0, "defer_fraction": fraction}
    procs = [ctx.Process(target=_decode_worker, args=(paths, prep, options_kw, shm.name,
                                                     slot_shape, task_q, free_q, ready_q))
             for _ in range(workers)]
    for p in procs:
        p.start()
        task_q.put(None)
    sampler = _UtilSampler() if device == "cuda" else None
    stamps, errors = [], 0
    try:
        for k in range(n_batches):
            seq, slot, meta = ready_q.get(timeout=600)
            if k == warmup and sampler is not None:
                sampler.start()
            meta["image"] = slots[slot]
            if with_model:
                res = runner(meta)
                errors += int(np.count_nonzero(res["error_stage"] != ""))
            else:
                errors += int(np.count_nonzero(meta["error_stage"] != ""))
            free_q.put(slot)
            stamps.append(time.perf_counter())
    finally:
        if sampler is not None:
            sampler.stop.set()
        for p in procs:
            p.join(timeout=60)
        if registered:
            torch.cuda.cudart().cudaHostUnregister(slots.ctypes.data)
        del slots
        shm.close()
        shm.unlink()
    timed = n_batches - 1 - warmup
    rate = timed * batch / (stamps[-1] - stamps[warmup])
    return {"workers": workers, "gpu_fraction": fraction, "model": with_model,
            "images": n_batches * batch, "timed_images": timed * batch,
            "images_per_s": round(rate), "errors": errors,
            "gpu_utilization_percent": sampler.result() if sampler else None,
            "pinned_handover": registered}


def bench_node(paths: list[str], workdir: str, batch: int, n_batches: int, device: str,
               configs: list[tuple[int, float, bool]], compile_model: bool,
               model: str = "resnet50") -> dict:
    weights = make_calibrated_state_dict(model, os.path.join(workdir, f"{model}.pt"))
    spec, state = resolve_model(model, weights)
    def build(compiled: bool):
        runner = with_gpu_decode(ModelRunner)(spec, state, InferenceOptions(
            device=device, compile=compiled), for_task(spec, "embed"))
        # Warm the (compiled) model at the batch shape before anything is timed.
        runner.forward_tensor(torch.zeros((batch, 224, 224, 3), dtype=torch.uint8,
                                          device=device))
        return runner
    try:
        runner = build(compile_model)
    except Exception:  # noqa: BLE001
        log.exception("compiled model failed; the node runs eager")
        compile_model = False
        runner = build(False)
    _sync(device)
    fidelity = node_fidelity(paths[:batch], runner, weights, device)
    log.info("node fidelity: %s", fidelity)
    runs = []
    for workers, fraction, with_model in configs:
        t = time.perf_counter()
        r = run_node(paths, runner, workers, fraction, batch, n_batches,
                     warmup=max(2, n_batches // 8), with_model=with_model, device=device)
        log.info("node workers=%d gpu_fraction=%.2f model=%s: %d img/s, GPU util %s (%.1fs)",
                 workers, fraction, with_model, r["images_per_s"],
                 r["gpu_utilization_percent"], time.perf_counter() - t)
        runs.append(r)
    return {"model": model, "batch": batch, "compiled": compile_model,
            "cpu_count": os.cpu_count(), "fidelity": fidelity, "runs": runs}


def node_fidelity(paths: list[str], runner, weights: str, device: str) -> dict:
    """The node's two decode paths (CPU `Decode`, nvJPEG) through the node's model, against
    eager fp32 torchvision on `weights.transforms()` of the PIL images (the reference)."""
    from PIL import Image
    from torchvision.models import get_model_weights

    from resnet_features.extract.gpu_decode import decode_resize_batch

    tf = get_model_weights(runner.spec.name).DEFAULT.transforms()
    ref_embed = _reference_model(runner.spec.name, weights, device)
    datas = [open(p, "rb").read() for p in paths]
    ref, ref_pixels = [], []
    crop = tf.crop_size[0]
    for i in range(0, len(datas), 64):
        imgs = [Image.open(io.BytesIO(d)).convert("RGB") for d in datas[i:i + 64]]
        ref_pixels += [_ref_uint8(im, tf) for im in imgs]
        ref.append(ref_embed(torch.stack([tf(im) for im in imgs])))
    ref = np.concatenate(ref)
    gpu_pixels = decode_resize_batch(datas, runner.spec.preprocessing, device).cpu().numpy()
    mad = np.abs(gpu_pixels.astype(np.int16) - np.stack(ref_pixels).astype(np.int16))
    out: dict = {"images": len(paths), "crop": crop,
                 "nvjpeg_pixels_mean_abs_diff": round(float(mad.mean()), 3)}
    column = np.empty(len(datas), dtype=object)
    column[:] = datas
    for name, fraction in (("cpu_decode", 0.0), ("nvjpeg", 1.0)):
        batch = Decode(runner.spec.preprocessing, DecodeOptions(
            defer_jpeg=fraction > 0, defer_fraction=fraction))(
            {"uri": np.array(paths), "bytes": column})
        emb = runner(batch)["embedding"]
        cos = cosine(emb, ref)
        out[name] = {"cosine_mean": round(float(cos.mean()), 5),
                     "cosine_min": round(float(cos.min()), 5)}
    return out


def _ref_uint8(img, tf) -> np.ndarray:
    """The reference's pixels before float conversion: PIL resize + centre crop."""
    from torchvision.transforms import functional as F

    return np.asarray(F.center_crop(F.resize(img, tf.resize_size, interpolation=tf.interpolation,
                                             antialias=True), tf.crop_size))


# ----------------------------------------------------------------------------- main

def _photo_crops(workdir: str, n: int) -> np.ndarray:
    from torchvision.models import ResNet50_Weights

    from resnet_features.core.models import Preprocessing
    from resnet_features.extract.decode import decode_image

    corpus = make_corpus(os.path.join(workdir, "crops"), n, 0, seed=1)
    prep = Preprocessing.from_weights(ResNet50_Weights.DEFAULT)
    return np.stack([decode_image(open(p, "rb").read(), prep, DecodeOptions()).pixels
                     for p in corpus["imagenet"]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="/tmp/resnet_features_gpu_bench")
    p.add_argument("--json", default=None)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--files", type=int, default=512, help="distinct ImageNet-sized JPEGs")
    p.add_argument("--node-batches", type=int, default=120)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workers", type=int, default=None,
                   help="CPU decode processes (default: CPUs - 2)")
    p.add_argument("--configs", default=None,
                   help="node runs as WORKERS:GPU_FRACTION[:nomodel],... (default: a sweep)")
    p.add_argument("--node-model", default="resnet50")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--skip-node", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: harness check")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        args.batch, args.files, args.node_batches, args.iters, args.reps = 4, 8, 6, 2, 1
    workers = args.workers or max(1, (os.cpu_count() or 2) - 2)
    os.makedirs(args.workdir, exist_ok=True)
    results: dict = {
        "machine": {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                    "cpu_count": os.cpu_count(), "torch": torch.__version__},
    }

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    t0 = time.perf_counter()
    corpus = make_corpus(os.path.join(args.workdir, "node"), args.files, 0)["imagenet"]
    results["corpus"] = {"files": len(corpus), "mean_bytes": round(statistics.mean(
        os.path.getsize(c) for c in corpus)), "seconds_to_make": round(time.perf_counter() - t0)}
    log.info("corpus: %s", results["corpus"])
    if not args.skip_model:
        photos = _photo_crops(args.workdir, 32 if not args.smoke else 4)
        results["model"] = bench_model(["resnet50", "resnet34"], args.batch, args.iters,
                                       args.reps, device, args.workdir, photos)
        save()
        print(json.dumps(results["model"], indent=1), flush=True)
    if not args.skip_node:
        configs = [
            (workers, 0.0, False),  # CPU decode capacity alone (no model)
            (workers, 0.0, True),  # CPU decode + model
            (workers, 0.25, True),
            (workers, 0.4, True),
            (workers, 0.55, True),
            (1, 1.0, True),  # nvJPEG only (one process checks headers)
        ]
        if args.configs:
            configs = [(int(c.split(":")[0]), float(c.split(":")[1]), not c.endswith("nomodel"))
                       for c in args.configs.split(",")]
        elif args.smoke:
            configs = [(1, 0.0, False), (1, 0.5, True), (1, 1.0, True)]
        results["node"] = bench_node(corpus, args.workdir, args.batch, args.node_batches,
                                     device, configs, compile_model=device == "cuda",
                                     model=args.node_model)
        save()
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
