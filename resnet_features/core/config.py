"""Configuration: the CLI, and the one frozen, validated config every stage is built from."""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from resnet_features.core.errors import ConfigError
from resnet_features.core.vocab import LAYER_NAMES, MODEL_NAMES

__all__ = [
    "ConfigError",
    "ExtractConfig",
    "get_args_parser",
    "config_from_args",
    "parse_storage_options",
]


@dataclass(frozen=True)
class ExtractConfig:
    input: str
    output: str
    model: str = "resnet50"
    weights: str = "DEFAULT"
    preprocess_from: str | None = None
    weights_sha256: str | None = None
    task: str = "both"
    top_k: int = 5
    batch_size: int | None = None  # None: 256 on GPU, 32 on CPU
    device: str = "auto"
    precision: str = "auto"
    concurrency: int | None = None  # model actors; None: one per GPU, or pipeline._cpu_layout
    num_gpus_per_worker: float = 1.0
    num_cpus_per_worker: float | None = None  # CPU model actors; None: half their threads
    decode_batch_size: int = 16
    decode_num_cpus: float = 1.0
    rows_per_file: int | None = None  # None: aim at ~128 MB files (see writer.auto_rows_per_file)
    max_error_rate: float = 0.05
    max_image_pixels: int | None = None  # None: Pillow's default limit
    max_image_bytes: int = 256 * 1024 * 1024
    draft_factor: float = 2.0
    decode_backend: str = "auto"
    cpu_threads: int | None = None  # torch threads per CPU model actor; None: _cpu_layout
    gpu_decode: bool = False
    gpu_decode_fraction: float = 1.0
    compile: bool = False
    overwrite: bool = False
    layers: tuple[str, ...] = ()  # --layers: pooled intermediate stages as extra columns
    head: str | None = None  # --head: a linear_probe.py head applied to the embeddings
    explain: bool = False  # "explain" in --task: a heatmap column per image
    explain_method: str = "gradcam"
    explain_class: int | None = None  # None: each image's top-1 class
    explain_png: bool = False  # also write heatmap overlays as PNG files under explain_png/
    run_id: str = "default"
    incremental: bool = False
    retry_errors: str | None = None
    fingerprint: str = "stat"
    storage_options: dict[str, Any] = field(default_factory=dict)
    input_format: str = "auto"
    image_column: str = "image"
    id_column: str | None = None
    uri_column: str = "uri"
    keep_columns: tuple[str, ...] = ()

    def public_dict(self) -> dict[str, Any]:
        """The config as recorded in outputs: storage options (credentials) are redacted."""
        d = asdict(self)
        d["storage_options"] = sorted(self.storage_options)  # keys only, never values
        return d


RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="extract.py",
        description="Extract ResNet top-k classifications and/or pooled embeddings from a folder "
        "of images into Parquet, with a Ray Data streaming pipeline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = p.add_argument_group("input and output")
    io.add_argument("--input", help="local path or fsspec URI (s3://bucket/prefix, gs://, az://, "
                    "https://...) of a folder/prefix (listed recursively), a glob, or one file: "
                    "images (jpg/jpeg/png/webp/bmp/gif/tif/tiff, any case), tar shards, Parquet "
                    "files or a manifest; see --input-format")
    io.add_argument("--input-format", default="auto",
                    choices=("auto", "images", "tar", "parquet", "manifest"),
                    help="auto: images if the input holds image files, else tar if it holds "
                    "*.tar/*.tar.gz/*.tgz shards (one row per image member, uri "
                    "SHARD#MEMBER), else parquet if it holds *.parquet files (one row per row, "
                    "uri FILE#ROW), else manifest for a single .txt/.csv/.tsv/.lst file; a "
                    "Parquet manifest needs --input-format manifest")
    io.add_argument("--image-column", default="image",
                    help="parquet input: column with the image bytes (binary, or a struct with "
                    "a 'bytes' field as Hugging Face datasets write)")
    io.add_argument("--id-column", default=None,
                    help="parquet input: a column copied into every output row (e.g. your key)")
    io.add_argument("--uri-column", default="uri",
                    help="CSV/TSV/Parquet manifest: the column holding image URIs or paths "
                    "(relative paths are resolved against the manifest's folder)")
    io.add_argument("--keep-columns", default=None,
                    help="comma-separated parquet/manifest columns copied into the output rows")
    io.add_argument("--output", help="output folder (local path or fsspec URI) for Parquet parts, "
                    "_errors/ and the _SUCCESS run summary")
    io.add_argument("--overwrite", action="store_true",
                    help="recompute a run that already finished; the old run=<run-id>/ is "
                    "replaced only once the new one is complete (without it, rerunning a "
                    "finished run is a no-op and an interrupted one resumes)")
    n = p.add_argument_group("runs (nightly, resumable, incremental)")
    n.add_argument("--run-id", default=None,
                   help="name of this run; rows go to OUTPUT/run=<run-id>/ (default: today's "
                   "UTC date, YYYY-MM-DD; with --retry-errors: <RUN_ID>-retry)")
    n.add_argument("--incremental", action="store_true",
                   help="skip inputs that earlier finished runs under --output already "
                   "processed with the same model, weights, preprocessing and task, keyed on "
                   "URI + content fingerprint (changed files are recomputed)")
    n.add_argument("--retry-errors", default=None, metavar="RUN_ID",
                   help="process only the inputs that failed in that finished run")
    n.add_argument("--fingerprint", default="stat", choices=("stat", "hash"),
                   help="content fingerprint for --incremental: stat = size + ETag (object "
                   "stores) or mtime (files), from the listing; hash = sha256 of the bytes "
                   "(reads every input on the driver: slow, for stores without ETags)")
    io.add_argument("--rows-per-file", type=int, default=None,
                    help="input images per output part file (default: aim at ~128 MB files, "
                    "e.g. ~16,000 rows for resnet50 embeddings + top-5, ~60,000 for resnet18)")
    io.add_argument("--storage-options", default=None,
                    help="JSON object passed to fsspec for input, output and weights URIs, e.g. "
                    "'{\"anon\": true}' or '{\"profile\": \"prod\"}'; credentials otherwise "
                    "come from the environment, AWS config/profile or instance role, and "
                    "AWS_ENDPOINT_URL points s3:// at MinIO/Ceph; values never appear in logs "
                    "or outputs")
    io.add_argument("--demo", action="store_true",
                    help="write sample photos (from scikit-image) to ./demo/images and extract "
                    "them to ./demo/output, unless --input/--output say otherwise; uses the "
                    "torch hub cache's weights when present, else --weights random (said loudly)")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="resnet50", choices=MODEL_NAMES,
                   help="torchvision model name")
    m.add_argument("--weights", default="DEFAULT",
                   help="torchvision weights name (DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2), a "
                   "path or fsspec URI of a state_dict file (loaded with weights_only=True), or "
                   "'random' (smoke tests only; recorded as such)")
    m.add_argument("--preprocess-from", default=None,
                   help="weights entry whose preprocessing and categories go with a state_dict "
                   "file (default: the model's DEFAULT entry)")
    m.add_argument("--weights-sha256", default=None,
                   help="expected sha256 of the --weights state_dict file")
    m.add_argument("--task", default="both",
                   help="what to compute: embed, classify, both, explain, or a comma-separated "
                   "combination such as both,explain; one forward pass serves embed and "
                   "classify, explain adds a backward pass (see --explain-method)")
    m.add_argument("--explain-method", default="gradcam",
                   choices=("gradcam", "integrated_gradients", "smoothgrad"),
                   help="heatmap for --task explain: Grad-CAM at layer4, or Captum's Integrated "
                   "Gradients / SmoothGrad pooled to the same grid (much slower)")
    m.add_argument("--explain-class", type=int, default=None,
                   help="class index to explain for every image (default: its top-1 class)")
    m.add_argument("--explain-png", action="store_true",
                   help="with --task explain: also write each image's heatmap over its model "
                   "input crop as OUTPUT/_explain_png/part-NNNNN/<index>.png (column explain_png)")
    m.add_argument("--top-k", type=int, default=5, help="classes per image for classify")
    m.add_argument("--layers", default=None,
                   help="comma-separated ResNet stages (layer1,layer2,layer3,layer4) whose "
                   "globally pooled outputs become extra fixed-size-list columns of that name")
    m.add_argument("--head", default=None,
                   help="head file saved by jobs/linear_probe.py: classifies each image in the "
                   "same pass (columns head_label, head_score)")
    r = p.add_argument_group("execution")
    r.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="auto: GPU when the Ray cluster has one, else CPU (said in the log)")
    r.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: bf16 autocast on GPU (fp16 where bf16 is unsupported), fp32 on CPU")
    r.add_argument("--batch-size", type=int, default=None,
                   help="images per model call (default 256 on GPU, 32 on CPU)")
    r.add_argument("--concurrency", type=int, default=None,
                   help="model actors in the pool (default: one per GPU; on CPU, up to 8 per "
                   "node with the node's cores shared among them, never more than batches)")
    r.add_argument("--num-gpus-per-worker", type=float, default=1.0,
                   help="GPUs reserved by each model actor (fractions share a GPU)")
    r.add_argument("--num-cpus-per-worker", type=float, default=None,
                   help="CPUs reserved by each CPU model actor (default: half its torch threads, "
                   "so that decode tasks are scheduled on the other half)")
    r.add_argument("--decode-batch-size", type=int, default=16,
                   help="images per read+decode task call")
    r.add_argument("--decode-num-cpus", type=float, default=1.0,
                   help="CPUs reserved by each read+decode task")
    r.add_argument("--decode-backend", default="auto", choices=("auto", "pillow"),
                   help="auto: torchvision.io (libjpeg-turbo) for plain JPEGs and torch's uint8 "
                   "antialiased resize for all images; pillow: Pillow decode and resize only "
                   "(slower; for comparison)")
    r.add_argument("--gpu-decode", action="store_true",
                   help="decode plain RGB/grey JPEGs with nvJPEG on the model's GPU "
                   "(torchvision.io.decode_jpeg(device='cuda')) instead of in CPU tasks; other "
                   "formats still decode on the CPU; needs the model on a GPU")
    r.add_argument("--gpu-decode-fraction", type=float, default=1.0,
                   help="with --gpu-decode: the share of plain JPEGs decoded on the GPU; the "
                   "rest decode in CPU tasks, so both decoders work at once (benchmarks/gpu_node.py "
                   "measures the best split for a node)")
    r.add_argument("--cpu-threads", type=int, default=None,
                   help="torch intra-op threads per CPU model actor (default: the node's CPUs "
                   "divided among its actors, so the model uses every core between decode tasks)")
    r.add_argument("--compile", action="store_true", help="torch.compile the model in each actor")
    e = p.add_argument_group("errors and limits")
    e.add_argument("--max-error-rate", type=float, default=0.05,
                   help="exit with code 3 when failed/inputs exceeds this fraction (rows, error "
                   "rows and _summary.json are written first; 1 never fails on bad images)")
    e.add_argument("--max-image-pixels", type=int, default=None,
                   help="decompression-bomb limit in pixels (default: Pillow's, ~89 MP)")
    e.add_argument("--max-image-bytes", type=int, default=256 * 1024 * 1024,
                   help="size budget per image: larger files are error rows, never opened "
                   "(also bounds a decode worker's time and memory on pathological files)")
    e.add_argument("--draft-factor", type=float, default=2.0,
                   help="decode JPEGs at reduced DCT scale when they are at least this many "
                   "times the resize target (0 disables)")
    return p


def _positive(name: str, value: float | None) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """`--storage-options` JSON as a dict (shared by every entry script); ConfigError if bad."""
    try:
        options = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--storage-options is not valid JSON: {exc}") from None
    if not isinstance(options, dict):
        raise ConfigError("--storage-options must be a JSON object")
    return options


def _parse_layers(text: str | None) -> tuple[str, ...]:
    """'layer1,layer3' -> ('layer1', 'layer3') in stage order."""
    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    bad = [n for n in names if n not in LAYER_NAMES]
    if bad:
        raise ConfigError(f"--layers: unknown layer(s) {', '.join(bad)}; choose from "
                          f"{', '.join(LAYER_NAMES)}")
    return tuple(n for n in LAYER_NAMES if n in names)


def config_from_args(args: argparse.Namespace) -> ExtractConfig:
    """Validate parsed arguments into an ExtractConfig; raises ConfigError saying what to fix."""
    if not args.input or not args.output:
        raise ConfigError("--input and --output are required (or use --demo)")
    storage_options = parse_storage_options(args.storage_options)
    for name in ("top_k", "batch_size", "concurrency", "num_gpus_per_worker",
                 "num_cpus_per_worker", "decode_batch_size", "decode_num_cpus", "rows_per_file",
                 "max_image_pixels", "max_image_bytes", "cpu_threads"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if not 0.0 <= args.max_error_rate <= 1.0:
        raise ConfigError(f"--max-error-rate must be within [0, 1], got {args.max_error_rate}")
    if args.draft_factor < 0:
        raise ConfigError("--draft-factor must be >= 0 (0 disables DCT-domain downscaling)")
    if args.preprocess_from and args.weights in ("DEFAULT", "IMAGENET1K_V1", "IMAGENET1K_V2"):
        raise ConfigError("--preprocess-from applies to a state_dict file or 'random', not to "
                          "named weights (they bring their own preprocessing)")
    if not 0.0 <= args.gpu_decode_fraction <= 1.0:
        raise ConfigError(f"--gpu-decode-fraction must be within [0, 1], got "
                          f"{args.gpu_decode_fraction}")
    if args.device == "cpu" and args.gpu_decode:
        raise ConfigError("--gpu-decode needs the model on a GPU: drop it or use --device cuda")
    if args.device == "cpu" and args.precision in ("bf16", "fp16"):
        raise ConfigError("--precision bf16/fp16 needs --device cuda (CPU runs in fp32)")
    keep = tuple(c.strip() for c in (args.keep_columns or "").split(",") if c.strip())
    reserved = {"uri", "embedding", "topk_ids", "topk_labels", "topk_scores", "width", "height"}
    clash = sorted(reserved.intersection(keep + ((args.id_column,) if args.id_column else ())))
    if clash:
        raise ConfigError(f"--keep-columns/--id-column {', '.join(clash)} would overwrite output "
                          f"columns of the same name; rename them in the input")
    if (args.id_column or args.image_column != "image") and args.input_format not in (
            "auto", "parquet"):
        raise ConfigError("--id-column and --image-column apply to --input-format parquet")

    parts = {t.strip() for t in str(args.task).split(",") if t.strip()}
    if not parts or not parts <= {"embed", "classify", "both", "explain"}:
        raise ConfigError(f"--task {args.task!r}: use embed, classify, both, explain or a "
                          "comma-separated combination such as both,explain")
    wants_embed = bool(parts & {"embed", "both"})
    wants_classify = bool(parts & {"classify", "both"})
    task = ("both" if wants_embed and wants_classify else "embed" if wants_embed
            else "classify" if wants_classify else "explain")
    explain_class = getattr(args, "explain_class", None)
    if explain_class is not None and explain_class < 0:
        raise ConfigError(f"--explain-class must be a class index >= 0, got {explain_class}")
    if getattr(args, "explain_png", False) and "explain" not in parts:
        raise ConfigError("--explain-png needs explain in --task (e.g. --task both,explain)")
    if explain_class is not None and "explain" not in parts:
        raise ConfigError("--explain-class needs explain in --task (e.g. --task both,explain)")

    layers = _parse_layers(getattr(args, "layers", None))

    run_id = args.run_id
    if run_id is None:
        run_id = (f"{args.retry_errors}-retry" if args.retry_errors
                  else time.strftime("%Y-%m-%d", time.gmtime()))
    for name, value in (("--run-id", run_id), ("--retry-errors", args.retry_errors)):
        if value is not None and not RUN_ID_RE.fullmatch(value):
            raise ConfigError(f"{name} {value!r}: use letters, digits, '.', '_', '-' and start "
                              f"with a letter or digit (it becomes a folder name run=<id>)")
    if args.retry_errors and args.retry_errors == run_id:
        raise ConfigError("--retry-errors writes a new run: give a --run-id other than the "
                          "failed run's (or leave it out for <RUN_ID>-retry)")
    if args.retry_errors and args.incremental:
        raise ConfigError("--retry-errors and --incremental do not combine: a retry already "
                          "processes only the failed inputs")
    input_uri = args.input if "://" in args.input else os.path.abspath(args.input)
    output_uri = args.output if "://" in args.output else os.path.abspath(args.output)
    return ExtractConfig(
        input=input_uri,
        output=output_uri,
        model=args.model,
        weights=args.weights,
        preprocess_from=args.preprocess_from,
        weights_sha256=args.weights_sha256,
        task=task,
        top_k=args.top_k,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        concurrency=args.concurrency,
        num_gpus_per_worker=args.num_gpus_per_worker,
        num_cpus_per_worker=args.num_cpus_per_worker,
        decode_batch_size=args.decode_batch_size,
        decode_num_cpus=args.decode_num_cpus,
        rows_per_file=args.rows_per_file,
        max_error_rate=args.max_error_rate,
        max_image_pixels=args.max_image_pixels,
        max_image_bytes=args.max_image_bytes,
        draft_factor=args.draft_factor,
        decode_backend=args.decode_backend,
        cpu_threads=args.cpu_threads,
        gpu_decode=args.gpu_decode,
        gpu_decode_fraction=args.gpu_decode_fraction,
        compile=args.compile,
        overwrite=args.overwrite,
        layers=layers,
        head=getattr(args, "head", None),
        explain="explain" in parts,
        explain_method=getattr(args, "explain_method", "gradcam"),
        explain_class=explain_class,
        explain_png=bool(getattr(args, "explain_png", False)),
        run_id=run_id,
        incremental=args.incremental,
        retry_errors=args.retry_errors,
        fingerprint=args.fingerprint,
        storage_options=storage_options,
        input_format=args.input_format,
        image_column=args.image_column,
        id_column=args.id_column,
        uri_column=args.uri_column,
        keep_columns=keep,
    )
