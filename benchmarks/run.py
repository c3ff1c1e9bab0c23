"""One-command benchmark: decode/preprocess speed and fidelity, model stage, and the whole job.

    python benchmarks/run.py                 # default corpus, a few minutes on 2 cores
    python benchmarks/run.py --json out.json --imagenet 64 --large 8 --e2e-images 96

It writes its own corpus (real photos from scikit-image, re-encoded as ImageNet-sized JPEGs
of 330-640 px and as 12-megapixel 4032x3024 JPEGs), measures every variant side by side in
interleaved rounds in this one process (the machine may be shared: ratios between variants
measured in the same rounds are what to read, absolute figures are noisy), and prints a table
and JSON. Sections:

- decode: one core (torch threads = 1), bytes already in memory, images/s for plain Pillow
  decode, the usual PIL -> ToTensor -> Resize -> CenterCrop -> Normalize pattern, the
  weights' reference transforms, and this job's decode stage (backends and draft factors);
- fidelity: cosine of ResNet embeddings (BN-calibrated test weights, as in tests/helpers.py)
  from the job's uint8 crops vs eager torchvision with `weights.transforms()`, and a yardstick:
  the reference's own pixels with +-1 grey level on 5% of them;
- model: the bare ModelRunner forward pass on pre-decoded uint8 batches;
- e2e: the Ray Data job (`pipeline.run`) on a corpus with one 12 MP photo in four, with its
  default CPU actor layout and with one actor on every core, against the usual Ray Data
  pattern (`read_images` + per-row PIL/ToTensor/transforms `map` + a model actor pool), each
  run between two bare forward passes; rates over the wall clock, after the model is ready,
  and in the model's busy window;
GPU figures come from `benchmarks/gpu_node.py` (no Ray needed): the model stage alone and
CPU decode processes + nvJPEG + model on one GPU node.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from helpers import cosine, make_calibrated_state_dict  # noqa: E402
from torchvision import transforms as T  # noqa: E402
from torchvision.models import get_model_builder, get_model_weights  # noqa: E402

from resnet_features.core.models import Preprocessing, resolve_model  # noqa: E402
from resnet_features.core.samples import PHOTO_NAMES, load_photo  # noqa: E402
from resnet_features.extract.decode import DecodeOptions, decode_image  # noqa: E402
from resnet_features.extract.inference import InferenceOptions, ModelRunner  # noqa: E402
from resnet_features.extract.outputs import for_task  # noqa: E402

log = logging.getLogger("benchmark")

LARGE_SIZE = (4032, 3024)


# ----------------------------------------------------------------------------- corpus

def _photo(name: str) -> np.ndarray:
    arr = load_photo(name)
    return np.stack([arr] * 3, -1) if arr.ndim == 2 else arr[..., :3]


def make_corpus(folder: str, n_imagenet: int, n_large: int, seed: int = 0) -> dict[str, list]:
    """ImageNet-sized JPEGs (330-640 px sides, quality 90) and 12 MP 4032x3024 JPEGs.

    The 12 MP files are upscaled photos with mild sensor-like noise, so that they carry
    realistic entropy (~2-4 MB each) instead of compressing like a smooth upscale.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    names = [n for n in PHOTO_NAMES if n not in ("hubble_deep_field",)]
    out: dict[str, list] = {"imagenet": [], "large": []}
    for kind, count in (("imagenet", n_imagenet), ("large", n_large)):
        for i in range(count):
            arr = _photo(names[(i * 5 + (kind == "large")) % len(names)])
            h, w = arr.shape[:2]
            aspect = 4 / 3 if kind == "large" else rng.uniform(1.0, 1.33)
            ch = int(min(h, w / aspect) * rng.uniform(0.7, 1.0))
            cw = int(ch * aspect)
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            img = Image.fromarray(np.ascontiguousarray(arr[y:y + ch, x:x + cw]))
            if rng.random() < 0.25:
                img = img.transpose(Image.Transpose.ROTATE_90)  # some portrait files
            if kind == "large":
                size = LARGE_SIZE if img.width >= img.height else LARGE_SIZE[::-1]
                big = np.asarray(img.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
                big = big + rng.normal(0, 2.5, big.shape).astype(np.int16)
                img = Image.fromarray(np.clip(big, 0, 255).astype(np.uint8))
                quality = 92
            else:
                long_side = int(rng.uniform(440, 640))
                s = long_side / max(img.size)
                img = img.resize((max(330, round(img.width * s)), max(330, round(img.height * s))),
                                 Image.Resampling.BICUBIC)
                quality = 90
            path = os.path.join(folder, f"{kind}_{i:03d}.jpg")
            img.save(path, quality=quality)
            out[kind].append(path)
    return out


def read_all(paths: list[str]) -> list[bytes]:
    return [open(p, "rb").read() for p in paths]


# ----------------------------------------------------------------------------- decode

def decode_variants(model: str, draft_factor: float) -> dict:
    """name -> callable(bytes) producing the model's input (tensor or uint8 array)."""
    entry = get_model_weights(model).DEFAULT
    ref_tf = entry.transforms()
    prep = Preprocessing.from_weights(entry)
    usual_tf = T.Compose([T.ToTensor(), T.Resize(prep.resize_size, antialias=True),
                          T.CenterCrop(prep.crop_size), T.Normalize(prep.mean, prep.std)])

    def pil_decode_only(data):
        with Image.open(io.BytesIO(data)) as im:
            im.load()

    def usual(data):
        with Image.open(io.BytesIO(data)) as im:
            return usual_tf(im.convert("RGB"))

    def reference(data):
        with Image.open(io.BytesIO(data)) as im:
            return ref_tf(im.convert("RGB"))

    def job(options):
        return lambda data: decode_image(data, prep, options).pixels

    variants = {
        "pil_decode_only": pil_decode_only,
        "usual_pil_totensor_transforms": usual,
        "reference_weights_transforms": reference,
        "job_auto": job(DecodeOptions(draft_factor=draft_factor)),
        "job_pillow": job(DecodeOptions(draft_factor=draft_factor, backend="pillow")),
    }
    for factor in (0.0, 1.0, 4.0):  # 0: no DCT scaling, full decode
        if draft_factor != factor:
            variants[f"job_auto_draft{factor:g}"] = job(DecodeOptions(draft_factor=factor))
    return variants


def bench_decode(sets: dict[str, list[bytes]], variants: dict, rounds: int) -> dict:
    """Interleaved rounds, one core: every variant on every set, order shuffled each round.

    Rates are images per second of this thread's CPU time (`time.thread_time`), which other
    processes on a shared machine disturb far less than wall-clock time; everything runs in
    this thread (torch threads = 1), so CPU time is the whole cost.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, dict[str, list[float]]] = {s: {v: [] for v in variants} for s in sets}
    try:
        for datas in sets.values():
            for fn in variants.values():
                fn(datas[0])  # warm-up
        order = [(s, v) for s in sets for v in variants]
        rnd = random.Random(0)
        for r in range(rounds):
            rnd.shuffle(order)
            for kind, name in order:
                fn, datas = variants[name], sets[kind]
                t0 = time.thread_time()
                for d in datas:
                    fn(d)
                times[kind][name].append(len(datas) / (time.thread_time() - t0))
            log.info("decode round %d/%d done", r + 1, rounds)
    finally:
        torch.set_num_threads(threads)
    out = {}
    for kind in sets:
        rates = {v: statistics.median(x) for v, x in times[kind].items()}
        usual = rates["usual_pil_totensor_transforms"]
        out[kind] = {
            "images": len(sets[kind]),
            "images_per_cpu_s": {k: round(v, 1) for k, v in rates.items()},
            "speedup_vs_usual": {k: round(v / usual, 2) for k, v in rates.items()},
            "fraction_of_pil_decode_only": {
                k: round(v / rates["pil_decode_only"], 3) for k, v in rates.items()},
        }
    return out


# ----------------------------------------------------------------------------- fidelity

def _reference_model(model: str, weights_path: str, device: str = "cpu"):
    """Eager fp32 torchvision on `device`: (N, 3, H, W) reference tensors -> embeddings."""
    net = get_model_builder(model)(weights=None)
    net.load_state_dict(torch.load(weights_path, weights_only=True))
    net = net.to(device).eval()
    pooled = {}
    net.avgpool.register_forward_hook(lambda m, i, o: pooled.__setitem__("x", o))

    def embed(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            net(x.to(device))
        return torch.flatten(pooled["x"], 1).float().cpu().numpy()
    return embed


def _sensitivity(ref_embed, ref_batches: list[torch.Tensor], ref: np.ndarray,
                 prep: Preprocessing, fraction: float = 0.05) -> dict:
    """How far these test weights move for a change far below visibility: the reference
    crops (`ref_batches`, embedded as `ref`) with +-1 grey level on `fraction` of their
    values at random, same eager model.

    A yardstick for the fidelity figures: a decode path whose cosine is near this one differs
    from the reference by about as much as invisible noise does.
    """
    rng = np.random.default_rng(0)
    mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
    std = torch.tensor(prep.std).view(1, 3, 1, 1)
    emb = []
    for x in ref_batches:
        u8 = torch.round((x * std + mean) * 255)  # the reference's own uint8 pixels
        flip = torch.from_numpy(rng.random(u8.shape) < fraction)
        sign = torch.from_numpy(rng.choice([-1.0, 1.0], size=u8.shape)).float()
        noisy = (u8 + flip * sign).clamp(0, 255)
        emb.append(ref_embed((noisy / 255 - mean) / std))
    cos = cosine(np.concatenate(emb), ref)
    return {"cosine_mean": round(float(cos.mean()), 5), "cosine_min": round(float(cos.min()), 5)}


def bench_fidelity(sets: dict[str, list[bytes]], variants: dict, model: str,
                   weights_path: str) -> dict:
    """Cosine of the job's embeddings (uint8 crops through ModelRunner) vs eager reference."""
    spec, state = resolve_model(model, weights_path)
    runner = ModelRunner(spec, state, InferenceOptions(), for_task(spec, "embed"))
    ref_embed = _reference_model(model, weights_path)
    out = {}
    for kind, datas in sets.items():
        ref_batches = [torch.stack([variants["reference_weights_transforms"](d)
                                    for d in datas[i:i + 16]])
                       for i in range(0, len(datas), 16)]
        ref = np.concatenate([ref_embed(x) for x in ref_batches])
        out[kind] = {"sensitivity_pm1_on_5pct": _sensitivity(ref_embed, ref_batches, ref,
                                                                  spec.preprocessing)}
        for name in [v for v in variants if v.startswith("job_")]:
            pix = np.stack([variants[name](d) for d in datas])
            emb = np.concatenate([runner.embed(pix[i:i + 16])
                                  for i in range(0, len(pix), 16)])
            cos = cosine(emb, ref)
            out[kind][name] = {"cosine_mean": round(float(cos.mean()), 5),
                               "cosine_min": round(float(cos.min()), 5)}
    return out


# ----------------------------------------------------------------------------- model

def bench_model(model: str, weights_path: str, batch_size: int, batches: int,
                threads: int) -> dict:
    """Bare ModelRunner.forward on pre-decoded uint8 batches (all cores), images/s."""
    spec, state = resolve_model(model, weights_path)
    runner = ModelRunner(spec, state, InferenceOptions(cpu_threads=threads), for_task(spec, "both"))
    crop = spec.preprocessing.crop_size
    x = np.random.default_rng(0).integers(0, 256, (batch_size, crop, crop, 3), dtype=np.uint8)
    runner.forward(x)  # warm-up
    rates = []
    for _ in range(batches):
        t0 = time.perf_counter()
        runner.forward(x)
        rates.append(batch_size / (time.perf_counter() - t0))
    return {"batch_size": batch_size, "threads": threads, "batches": batches,
            "images_per_s": round(statistics.median(rates), 2)}


# ----------------------------------------------------------------------------- e2e (Ray)

def _timed_runner_cls(log_path: str):
    """A ModelRunner that logs when it is ready (`log_path`.ready) and each call's (start, end,
    rows) to `log_path`: the start-up and the busy window (from the first actor's first call
    to the last call's end when there are several actors)."""

    class TimedRunner(ModelRunner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            with open(log_path + ".ready", "a") as f:  # one line per model actor
                f.write(f"{time.time()}\n")

        def __call__(self, batch):
            t0 = time.time()
            out = super().__call__(batch)
            with open(log_path, "a") as f:
                f.write(f"{t0} {time.time()} {len(batch['uri'])}\n")
            return out
    return TimedRunner


def _busy_window(log_path: str) -> tuple[float, int]:
    rows = [tuple(map(float, line.split())) for line in open(log_path)]
    return max(r[1] for r in rows) - min(r[0] for r in rows), int(sum(r[2] for r in rows))


def _warm_window(log_path: str) -> tuple[float, int]:
    """The busy window after the model's first call: the bare forward pass is timed after a
    warm-up call too (a process's first forward builds oneDNN's kernels)."""
    rows = sorted(tuple(map(float, line.split())) for line in open(log_path))
    return rows[-1][1] - rows[0][1], int(sum(r[2] for r in rows[1:]))


def _window_figures(log_path: str, n: int, started: float, ended: float) -> dict:
    """Rates over the whole run (wall), after the model is ready, in the model's busy window
    and after its first call (warm). `started`/`ended`: epoch seconds around the run."""
    wall = ended - started
    busy, _ = _busy_window(log_path)
    warm, warm_n = _warm_window(log_path)
    out = {"images": n, "wall_s": round(wall, 2), "images_per_s_wall": round(n / wall, 2),
           "model_busy_window_s": round(busy, 2), "images_per_s_busy": round(n / busy, 2),
           "images_per_s_warm": round(warm_n / warm, 2)}
    if os.path.exists(log_path + ".ready"):
        ready = min(float(line) for line in open(log_path + ".ready"))  # the first actor
        out["model_ready_after_s"] = round(ready - started, 2)
        out["images_per_s_after_ready"] = round(n / (ended - ready), 2)
    return out


def run_job(folder: str, out: str, model: str, weights_path: str, batch_size: int,
            log_path: str, extra: list[str]) -> dict:
    from resnet_features.core.config import config_from_args, get_args_parser
    from resnet_features.extract.pipeline import run

    cfg = config_from_args(get_args_parser().parse_args(
        ["--input", folder, "--output", out, "--overwrite", "--model", model, "--weights",
         weights_path, "--batch-size", str(batch_size), "--task", "both", *extra]))
    started = time.time()
    result = run(cfg, runner_cls=_timed_runner_cls(log_path))
    ended = time.time()
    if result.exit_code != 0 or result.summary["failed"]:
        raise RuntimeError(f"job failed: {result.reason}")
    return _window_figures(log_path, _busy_window(log_path)[1], started, ended)


def run_usual_ray(folder: str, model: str, weights_path: str, batch_size: int,
                  log_path: str) -> dict:
    """The pattern of Ray's batch-inference guide: read_images, per-row transforms, actors."""
    import ray

    prep = Preprocessing.from_weights(get_model_weights(model).DEFAULT)
    transform = T.Compose([T.ToTensor(), T.Resize(prep.resize_size, antialias=True),
                           T.CenterCrop(prep.crop_size), T.Normalize(prep.mean, prep.std)])

    def preprocess(row):
        row["image"] = transform(Image.fromarray(row["image"])).numpy()
        return row

    class Predictor:
        def __init__(self):
            self.model = get_model_builder(model)(weights=None)
            self.model.load_state_dict(torch.load(weights_path, weights_only=True))
            self.model.eval()

        def __call__(self, batch):
            t0 = time.time()
            with torch.inference_mode():
                out = self.model(torch.as_tensor(batch["image"]))
            with open(log_path, "a") as f:
                f.write(f"{t0} {time.time()} {len(out)}\n")
            return {"class": out.argmax(1).numpy()}

    started = time.time()
    ds = ray.data.read_images(folder, mode="RGB").map(preprocess)
    ds = ds.map_batches(Predictor, compute=ray.data.ActorPoolStrategy(size=1),
                        batch_size=batch_size, num_cpus=1)
    n = sum(len(b["class"]) for b in ds.iter_batches(batch_size=None))
    return _window_figures(log_path, n, started, time.time())


def bench_e2e(corpus: dict[str, list], workdir: str, model: str, weights_path: str,
              batch_size: int, forward_fn, object_store_mb: int, job_runs: int = 3,
              one_actor_runs: int = 2, usual_runs: int = 1) -> dict:
    """The job `job_runs` times, the job with one model actor on every core
    (`--concurrency 1`, the layout before several single-thread actors) `one_actor_runs` times
    and the usual Ray Data pattern `usual_runs` (0 or 1) times, interleaved, each between two
    bare forward passes: every run is compared with the mean of its two neighbours."""
    import ray

    folder = os.path.join(workdir, "e2e_images")
    os.makedirs(folder, exist_ok=True)
    for p in corpus["imagenet"] + corpus["large"]:
        dst = os.path.join(folder, os.path.basename(p))
        if not os.path.exists(dst):
            os.link(p, dst)
    # address="local": a private instance, never a cluster someone else started here.
    ray.init(address="local", num_cpus=os.cpu_count(),
             object_store_memory=object_store_mb * 2**20,
             include_dashboard=False, logging_level=logging.WARNING)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        # This VM's speed drifts by tens of percent within minutes, so a bare forward pass runs
        # right before and after every run; the usual pattern goes second, between two jobs.
        order = ["job"] + ["usual_ray_data"] * min(1, usual_runs)
        for i in range(max(job_runs - 1, one_actor_runs)):
            order += (["job_one_actor"] if i < one_actor_runs else []) + (
                ["job"] if i < job_runs - 1 else [])
        forwards, runs = [forward_fn()], []
        for i, name in enumerate(order):
            log_path = os.path.join(workdir, f"e2e_{i}.log")
            for stale in (log_path, log_path + ".ready"):
                if os.path.exists(stale):
                    os.remove(stale)
            log.info("e2e %d/%d: %s", i + 1, len(order), name)
            if name.startswith("job"):
                fig = run_job(folder, os.path.join(workdir, "e2e_out"), model, weights_path,
                              batch_size, log_path,
                              ["--concurrency", "1"] if name == "job_one_actor" else [])
            else:
                fig = run_usual_ray(folder, model, weights_path, batch_size, log_path)
            forwards.append(forward_fn())
            runs.append((name, fig, (forwards[-2]["images_per_s"]
                                     + forwards[-1]["images_per_s"]) / 2))
    finally:
        ray.shutdown()
    jobs = [(fig, fw) for name, fig, fw in runs if name == "job"]
    one_actor = [(fig, fw) for name, fig, fw in runs if name == "job_one_actor"]
    usual, usual_fw = next(((fig, fw) for name, fig, fw in runs if name == "usual_ray_data"),
                           (None, None))

    def med(key, against=None, of=jobs):
        return round(statistics.median(
            [fig[key] / (fw if against is None else against[key]) for fig, fw in of]), 3)
    ratios = {
        "job_wall_vs_bare_forward": med("images_per_s_wall"),
        "job_after_ready_vs_bare_forward": med("images_per_s_after_ready"),
        "job_busy_vs_bare_forward": med("images_per_s_busy"),
        "job_warm_vs_bare_forward": med("images_per_s_warm"),
        "one_actor_after_ready_vs_bare_forward": med("images_per_s_after_ready", of=one_actor)
        if one_actor else None,
        "one_actor_warm_vs_bare_forward": med("images_per_s_warm", of=one_actor)
        if one_actor else None,
    }
    if usual is not None:
        ratios.update({
            "usual_warm_vs_bare_forward": round(usual["images_per_s_warm"] / usual_fw, 3),
            "job_vs_usual_ray_data_wall": med("images_per_s_wall", usual),
            "job_vs_usual_ray_data_warm": med("images_per_s_warm", usual),
        })
    fw = [f["images_per_s"] for f in forwards]
    return {
        "forward": {"images_per_s": round(statistics.median(fw), 2), "runs": fw,
                    "batch_size": forwards[0]["batch_size"],
                    "batches": forwards[0]["batches"]},
        "job_runs": [dict(j, bare_forward_around=round(f, 2)) for j, f in jobs],
        "job_one_actor_runs": [dict(j, bare_forward_around=round(f, 2)) for j, f in one_actor],
        "usual_ray_data": (dict(usual, bare_forward_around=round(usual_fw, 2))
                           if usual is not None else None),
        "ratios": ratios,
        "corpus": {"images": len(os.listdir(folder)), "large_12mp": len(corpus["large"])},
    }


# ----------------------------------------------------------------------------- main

def _table(results: dict) -> str:
    lines = []
    for kind, d in results["decode"].items():
        lines.append(f"\nDecode + preprocess, one core, {kind} JPEGs ({d['images']} files):")
        lines.append(f"  {'variant':32s} {'img/cpu-s':>9s} {'x usual':>8s} {'/ pil':>7s}"
                     f" {'cos mean':>9s} {'cos min':>8s}")
        fid = results.get("fidelity", {}).get(kind, {})
        for v, r in d["images_per_cpu_s"].items():
            f = fid.get(v, {})
            lines.append(f"  {v:32s} {r:9.1f} {d['speedup_vs_usual'][v]:8.2f} "
                         f"{d['fraction_of_pil_decode_only'][v]:7.2f} "
                         f"{f.get('cosine_mean', ''):>9} {f.get('cosine_min', ''):>8}")
        sens = fid.get("sensitivity_pm1_on_5pct")
        if sens:
            lines.append(f"  {'(reference +-1 on 5% of values)':32s} {'':9s} {'':8s} {'':7s} "
                         f"{sens['cosine_mean']:>9} {sens['cosine_min']:>8}")
    if "model" in results:
        m = results["model"]
        lines.append(f"\nBare model forward ({results['config']['model']}, batch "
                     f"{m['batch_size']}, {m['threads']} threads): {m['images_per_s']} images/s")
    if "e2e" in results:
        e = results["e2e"]
        lines.append(f"\nEnd to end ({e['corpus']['images']} images, "
                     f"{e['corpus']['large_12mp']} of them 12 MP):")
        lines.append(f"  {'bare forward':16s} {e['forward']['images_per_s']:7.2f} images/s "
                     f"(median of {len(e['forward']['runs'])} runs around the jobs: "
                     f"{e['forward']['runs']})")
        for k, r in ([(f"job #{i + 1}", j) for i, j in enumerate(e["job_runs"])]
                     + [(f"one actor #{i + 1}", j)
                        for i, j in enumerate(e.get("job_one_actor_runs", []))]
                     + ([("usual_ray_data", e["usual_ray_data"])] if e["usual_ray_data"]
                        else [])):
            ready = (f", model ready after {r['model_ready_after_s']:5.2f} s, after ready "
                     f"{r['images_per_s_after_ready']:6.2f}" if "model_ready_after_s" in r else "")
            lines.append(f"  {k:16s} wall {r['images_per_s_wall']:6.2f}{ready}, busy window "
                         f"{r['images_per_s_busy']:6.2f}, warm {r['images_per_s_warm']:6.2f} "
                         f"images/s (bare forward around it {r['bare_forward_around']:6.2f})")
        for k, v in e["ratios"].items():
            lines.append(f"  {k:38s} {v}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=None, help="corpus and scratch folder (default: a temp "
                   "folder, removed afterwards)")
    p.add_argument("--json", default="benchmarks/results.json", help="where to write the JSON")
    p.add_argument("--imagenet", type=int, default=24, help="ImageNet-sized JPEGs")
    p.add_argument("--large", type=int, default=4, help="12 MP JPEGs")
    p.add_argument("--rounds", type=int, default=5, help="interleaved decode rounds")
    p.add_argument("--model", default="resnet50", help="model for fidelity, forward and e2e")
    p.add_argument("--batch-size", type=int, default=8, help="model batch size (CPU), for the "
                   "bare forward pass and both end-to-end runs")
    p.add_argument("--forward-batches", type=int, default=8)
    p.add_argument("--draft-factor", type=float, default=DecodeOptions().draft_factor)
    p.add_argument("--e2e-images", type=int, default=192,
                   help="images in the end-to-end corpus (one in four is 12 MP); 0 skips e2e")
    p.add_argument("--e2e-job-runs", type=int, default=3, help="job runs, each between two "
                   "bare forward passes (the usual pattern runs once)")
    p.add_argument("--e2e-one-actor-runs", type=int, default=2, help="job runs with one model "
                   "actor on every core (--concurrency 1), for comparison")
    p.add_argument("--e2e-usual-runs", type=int, default=1, choices=(0, 1),
                   help="runs of the usual Ray Data pattern (slow: 0 skips it on big corpora)")
    p.add_argument("--e2e-forward-batches", type=int, default=16,
                   help="batches per bare forward pass around the end-to-end runs")
    p.add_argument("--object-store-mb", type=int, default=1500)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="resnet_features_bench_")
        args.workdir = tmp.name
    os.makedirs(args.workdir, exist_ok=True)
    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                 "processor": platform.processor() or platform.machine(),
                                 "cuda": torch.cuda.get_device_name(0)
                                 if torch.cuda.is_available() else None},
                     "versions": {"torch": torch.__version__, "pillow": Image.__version__},
                     "config": vars(args).copy()}
    try:
        n_e2e_large = args.e2e_images // 4
        corpus = make_corpus(os.path.join(args.workdir, "corpus"),
                             max(args.imagenet, args.e2e_images - n_e2e_large),
                             max(args.large, n_e2e_large))
        sets = {"imagenet": read_all(corpus["imagenet"][:args.imagenet]),
                "large_12mp": read_all(corpus["large"][:args.large])}
        results["corpus"] = {k: {"files": len(v), "mean_bytes": int(np.mean([len(d) for d in v]))}
                             for k, v in sets.items()}
        variants = decode_variants(args.model, args.draft_factor)
        results["decode"] = bench_decode(sets, variants, args.rounds)
        log.info("calibrating test weights for %s", args.model)
        weights = make_calibrated_state_dict(args.model, os.path.join(args.workdir,
                                                                      f"{args.model}.pth"))
        results["fidelity"] = bench_fidelity(sets, variants, args.model, weights)
        results["model"] = bench_model(args.model, weights, args.batch_size,
                                       args.forward_batches, os.cpu_count() or 1)
        if args.e2e_images:
            e2e_corpus = {"imagenet": corpus["imagenet"][:args.e2e_images - n_e2e_large],
                          "large": corpus["large"][:n_e2e_large]}
            results["e2e"] = bench_e2e(
                e2e_corpus, args.workdir, args.model, weights, args.batch_size,
                lambda: bench_model(args.model, weights, args.batch_size,
                                    args.e2e_forward_batches, os.cpu_count() or 1),
                args.object_store_mb, args.e2e_job_runs, args.e2e_one_actor_runs,
                args.e2e_usual_runs)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(_table(results))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
