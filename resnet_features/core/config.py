"""Configuration: the one frozen, validated config every stage is built from, and the CLI
generated from it (each field carries its flag's default, help, group and parsing).

Parsing imports neither torch nor Ray, so `--help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from resnet_features.core.errors import ConfigError
from resnet_features.core.vocab import (
    EXPLAIN_METHODS,
    INPUT_FORMATS,
    LAYER_NAMES,
    MODEL_NAMES,
    NAMED_WEIGHTS,
)
from resnet_features.core.where import parse_where

__all__ = [
    "ConfigError",
    "ExtractConfig",
    "config_default",
    "config_from_args",
    "flag_of",
    "get_args_parser",
    "parse_layers",
    "parse_storage_options",
]

DETECT = "detection features (grid maps, region features; docs/detection-features.md)"

IO, RUNS, MODEL, EXEC, LIMITS = ("input and output", "runs (nightly, resumable, incremental)",
                                 "model", "execution", "errors and limits")
GROUPS = (IO, RUNS, MODEL, DETECT, EXEC, LIMITS)  # --help shows them in this order
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
TASKS = ("embed", "classify", "both", "explain")
#: Columns every output has; carried input columns must not shadow them.
RESERVED_COLUMNS = frozenset({"uri", "embedding", "topk_ids", "topk_labels", "topk_scores",
                              "width", "height", "boxes", "region_features", "region_maps"})


def opt(default: Any = dataclasses.MISSING, *, help: str, group: str,
        choices: tuple[str, ...] | None = None, metavar: str | None = None,
        parse: Callable[[str | None], Any] | None = None, positive: bool = False,
        fraction: bool = False, cli_default: Any = dataclasses.MISSING,
        default_factory: Callable[[], Any] | None = None) -> Any:
    """A config field that is also a command-line flag (`--field-name`).

    `parse` turns the flag's text (None when absent) into the stored value, for flags whose
    text differs from it (lists, JSON); `positive`/`fraction` are checked by config_from_args;
    `cli_default` is the parser's default when the stored default is computed from other flags.
    """
    metadata = {"help": help, "group": group, "choices": choices, "metavar": metavar,
                "parse": parse, "positive": positive, "fraction": fraction,
                "cli_default": cli_default}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def derived(default: Any, *, source: str) -> Any:
    """A config field without a flag of its own: config_from_args computes it from `source`."""
    return field(default=default, metadata={"source": source})


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """`--storage-options` JSON as a dict (shared by every entry script); ConfigError if bad."""
    try:
        options = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--storage-options is not valid JSON: {exc}") from None
    if not isinstance(options, dict):
        raise ConfigError("--storage-options must be a JSON object")
    return options


def parse_resources(text: str | None) -> dict[str, float]:
    """`--model-resources` JSON: resource name -> amount; ConfigError if bad."""
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--model-resources is not valid JSON: {exc}") from None
    if not isinstance(value, dict) or not all(
            isinstance(v, (int, float)) and v > 0 for v in value.values()):
        raise ConfigError("--model-resources must be a JSON object of positive numbers, e.g. "
                          "'{\"gpu_node\": 1}'")
    return {str(k): float(v) for k, v in value.items()}


def parse_layers(text: str | None) -> tuple[str, ...]:
    """'layer1,layer3' -> ('layer1', 'layer3') in stage order; ConfigError on bad names."""
    names = _comma_list(text)
    bad = [n for n in names if n not in LAYER_NAMES]
    if bad:
        raise ConfigError(f"--layers: unknown layer(s) {', '.join(bad)}; choose from "
                          f"{', '.join(LAYER_NAMES)}")
    return tuple(n for n in LAYER_NAMES if n in names)


def parse_grid(text: str | None) -> tuple[str, ...]:
    """`--grid layer3,layer4` -> ('layer3', 'layer4'); ConfigError on bad names."""
    try:
        return parse_layers(text)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("--layers", "--grid")) from None


def _comma_list(text: str | None) -> tuple[str, ...]:
    return tuple(c.strip() for c in (text or "").split(",") if c.strip())


def _task_parts(text: str) -> set[str]:
    parts = set(_comma_list(text))
    if not parts or not parts <= set(TASKS):
        raise ConfigError(f"--task {text!r}: use embed, classify, both, explain or a "
                          "comma-separated combination such as both,explain")
    return parts


def _parse_task(text: str) -> str:
    """`--task` as the stored task (embed/classify/both/explain); explain is its own field."""
    parts = _task_parts(text)
    embed, classify = bool(parts & {"embed", "both"}), bool(parts & {"classify", "both"})
    return ("both" if embed and classify else "embed" if embed
            else "classify" if classify else "explain")


def _where(text: str | None) -> str | None:
    """`--where` checked for syntax now (a ConfigError names the position), kept as text."""
    parse_where(text)
    return text


def _uri(text: str) -> str:
    return text if "://" in text else os.path.abspath(text)


@dataclass(frozen=True)
class ExtractConfig:
    input: str = opt(
        help="local path or fsspec URI (s3://bucket/prefix, gs://, az://, https://...) of a "
        "folder/prefix (listed recursively), a glob, or one file: images "
        "(jpg/jpeg/png/webp/bmp/gif/tif/tiff, any case), tar shards, Parquet files or a "
        "manifest; see --input-format", group=IO, parse=_uri)
    output: str = opt(
        help="output folder (local path or fsspec URI) for Parquet parts, _errors/ and the "
        "_SUCCESS run summary", group=IO, parse=_uri)
    model: str = opt("resnet50", help="torchvision model name", group=MODEL, choices=MODEL_NAMES)
    weights: str = opt(
        "DEFAULT", help=f"torchvision weights name ({', '.join(NAMED_WEIGHTS)}), a path or "
        "fsspec URI of a state_dict file (loaded with weights_only=True), or 'random' (smoke "
        "tests only; recorded as such)", group=MODEL)
    preprocess_from: str | None = opt(
        None, help="weights entry whose preprocessing and categories go with a state_dict file "
        "(default: the model's DEFAULT entry)", group=MODEL)
    weights_sha256: str | None = opt(
        None, help="expected sha256 of the --weights state_dict file", group=MODEL)
    task: str = opt(
        "both", help="what to compute: embed, classify, both, explain, or a comma-separated "
        "combination such as both,explain; one forward pass serves embed and classify, explain "
        "adds a backward pass (see --explain-method)", group=MODEL, parse=_parse_task)
    top_k: int = opt(5, help="classes per image for classify", group=MODEL, positive=True)
    batch_size: int | None = opt(
        None, help="images per model call (default 256 on GPU, 32 on CPU)", group=EXEC,
        positive=True)
    device: str = opt("auto", help="auto: GPU when the Ray cluster has one, else CPU (said in "
                      "the log)", group=EXEC, choices=("auto", "cuda", "cpu"))
    precision: str = opt(
        "auto", help="auto: bf16 autocast on GPU (fp16 where bf16 is unsupported), fp32 on CPU",
        group=EXEC, choices=("auto", "fp32", "bf16", "fp16"))
    concurrency: int | None = opt(
        None, help="model actors in the pool (default: one per GPU; on CPU, up to 8 per node "
        "with the node's cores shared among them, never more than batches)", group=EXEC,
        positive=True)
    num_gpus_per_worker: float = opt(
        1.0, help="GPUs reserved by each model actor (fractions share a GPU)", group=EXEC,
        positive=True)
    num_cpus_per_worker: float | None = opt(
        None, help="CPUs reserved by each CPU model actor (default: half its torch threads, so "
        "that decode tasks are scheduled on the other half)", group=EXEC, positive=True)
    model_resources: dict[str, Any] = opt(
        help="JSON object of extra Ray resources each model actor reserves, e.g. "
        "'{\"gpu_node\": 1}' to keep model actors on nodes that advertise that custom "
        "resource (read, decode and write tasks still run anywhere)", group=EXEC,
        parse=parse_resources, default_factory=dict)
    node_loss_timeout: float = opt(
        120.0, help="seconds the job waits, once no alive node can host a model actor (a lost "
        "GPU node), before it fails with exit 1 (committed parts stay staged; rerunning "
        "resumes)", group=EXEC, positive=True)
    decode_batch_size: int = opt(16, help="images per read+decode task call", group=EXEC,
                                 positive=True)
    decode_num_cpus: float = opt(1.0, help="CPUs reserved by each read+decode task", group=EXEC,
                                 positive=True)
    rows_per_file: int | None = opt(
        None, help="input images per output part file (default: aim at ~128 MB files, e.g. "
        "~16,000 rows for resnet50 embeddings + top-5, ~60,000 for resnet18)", group=IO,
        positive=True)
    max_error_rate: float = opt(
        0.05, help="exit with code 3 when failed/inputs exceeds this fraction (rows, error rows "
        "and _summary.json are written first; 1 never fails on bad images)", group=LIMITS,
        fraction=True)
    max_image_pixels: int | None = opt(
        None, help="decompression-bomb limit in pixels (default: Pillow's, ~89 MP)",
        group=LIMITS, positive=True)
    max_image_bytes: int = opt(
        256 * 1024 * 1024, help="size budget per image: larger files are error rows, never "
        "opened (also bounds a decode worker's time and memory on pathological files)",
        group=LIMITS, positive=True)
    draft_factor: float = opt(
        2.0, help="decode JPEGs at reduced DCT scale when they are at least this many times the "
        "resize target (0 disables)", group=LIMITS)
    decode_backend: str = opt(
        "auto", help="auto: torchvision.io (libjpeg-turbo) for plain JPEGs and torch's uint8 "
        "antialiased resize for all images; pillow: Pillow decode and resize only (slower; for "
        "comparison)", group=EXEC, choices=("auto", "pillow"))
    cpu_threads: int | None = opt(
        None, help="torch intra-op threads per CPU model actor (default: the node's CPUs divided "
        "among its actors, so the model uses every core between decode tasks)", group=EXEC,
        positive=True)
    gpu_decode: bool = opt(
        False, help="decode plain RGB/grey JPEGs with nvJPEG on the model's GPU "
        "(torchvision.io.decode_jpeg(device='cuda')) instead of in CPU tasks; other formats "
        "still decode on the CPU; needs the model on a GPU", group=EXEC)
    gpu_decode_fraction: float = opt(
        1.0, help="with --gpu-decode: the share of plain JPEGs decoded on the GPU; the rest "
        "decode in CPU tasks, so both decoders work at once (benchmarks/gpu_node.py measures "
        "the best split for a node)", group=EXEC, fraction=True)
    compile: bool = opt(False, help="torch.compile the model in each actor", group=EXEC)
    overwrite: bool = opt(
        False, help="recompute a run that already finished; the old run=<run-id>/ is replaced "
        "only once the new one is complete (without it, rerunning a finished run is a no-op "
        "and an interrupted one resumes)", group=IO)
    layers: tuple[str, ...] = opt(
        (), help=f"comma-separated ResNet stages ({','.join(LAYER_NAMES)}) whose globally "
        "pooled outputs become extra fixed-size-list columns of that name", group=MODEL,
        parse=parse_layers)
    head: str | None = opt(
        None, help="head file saved by jobs/linear_probe.py: classifies each image in the same "
        "pass (columns head_label, head_score)", group=MODEL)
    explain: bool = derived(False, source="task")  # "explain" in --task: a heatmap per image
    explain_method: str = opt(
        "gradcam", help="heatmap for --task explain: Grad-CAM at layer4, Captum's Integrated "
        "Gradients / SmoothGrad, or zennit's LRP (EpsilonPlusFlat, canonized ResNet), pooled to "
        "the same grid (docs/explanations.md)", group=MODEL,
        choices=EXPLAIN_METHODS)
    explain_class: int | None = opt(
        None, help="class index to explain for every image (default: its top-1 class)",
        group=MODEL)
    explain_png: bool = opt(
        False, help="with --task explain: also write each image's heatmap over its model input "
        "crop as OUTPUT/run=<run-id>/_explain_png/<part>/<index>.png (column explain_png: the "
        "path relative to the run folder)", group=MODEL)
    run_id: str = opt(
        "default", help="name of this run; rows go to OUTPUT/run=<run-id>/ (default: today's "
        "UTC date, YYYY-MM-DD; with --retry-errors: <RUN_ID>-retry)", group=RUNS,
        cli_default=None)
    incremental: bool = opt(
        False, help="skip inputs that earlier finished runs under --output already processed "
        "with the same model, weights, preprocessing and task, keyed on URI + content "
        "fingerprint (changed files are recomputed)", group=RUNS)
    retry_errors: str | None = opt(
        None, help="process only the inputs that failed in that finished run", group=RUNS,
        metavar="RUN_ID")
    fingerprint: str = opt(
        "stat", help="content fingerprint for --incremental: stat = size + ETag (object stores) "
        "or mtime (files), from the listing; hash = sha256 of the bytes (reads every input on "
        "the driver: slow, for stores without ETags)", group=RUNS, choices=("stat", "hash"))
    storage_options: dict[str, Any] = opt(
        help="JSON object passed to fsspec for input, output and weights URIs, e.g. "
        "'{\"anon\": true}' or '{\"profile\": \"prod\"}'; credentials otherwise come from the "
        "environment, AWS config/profile or instance role, and AWS_ENDPOINT_URL points s3:// "
        "at MinIO/Ceph; values never appear in logs or outputs", group=IO,
        parse=parse_storage_options, default_factory=dict)
    input_format: str = opt(
        "auto", help="auto: images if the input holds image files, else tar if it holds "
        "*.tar/*.tar.gz/*.tgz shards (one row per image member, uri SHARD#MEMBER), else "
        "parquet if it holds *.parquet files (one row per row, uri FILE#ROW), else manifest for "
        "a single .txt/.csv/.tsv/.lst file; a Parquet manifest needs --input-format manifest; "
        "s3-inventory: an S3 Inventory report (its manifest.json, or its CSV/Parquet/ORC files), "
        "one row per image object it lists, with size and ETag from the report",
        group=IO, choices=INPUT_FORMATS)
    image_column: str = opt(
        "image", help="parquet input: column with the image bytes (binary, or a struct with a "
        "'bytes' field as Hugging Face datasets write)", group=IO)
    id_column: str | None = opt(
        None, help="parquet input: a column copied into every output row (e.g. your key)",
        group=IO)
    uri_column: str = opt(
        "uri", help="CSV/TSV/Parquet manifest: the column holding image URIs or paths (relative "
        "paths are resolved against the manifest's folder)", group=IO)
    keep_columns: tuple[str, ...] = opt(
        (), help="comma-separated parquet/manifest/s3-inventory columns copied into the output "
        "rows", group=IO, parse=_comma_list)
    where: str | None = opt(
        None, help="parquet/manifest/s3-inventory input: keep only the rows for which this "
        "predicate on their columns holds, e.g. \"status = 'success'\", 'size < 50000000', "
        "\"key LIKE 'photos/2026/%%'\" (=, !=, <, <=, >, >=, LIKE, IN (...), IS [NOT] NULL, "
        "AND, OR, NOT, parentheses); rows left out are counted in the summary as "
        "skipped.filtered, never as errors", group=IO, parse=_where, metavar="EXPR")

    grid: tuple[str, ...] = opt(
        (), help=f"comma-separated stages ({','.join(LAYER_NAMES)}) whose whole feature map is "
        "stored per image, float16, (H, W, C) row-major in a list column grid_<layer> with "
        "grid_<layer>_h/_w; needs --resize-short", group=DETECT, parse=parse_grid)
    resize_short: int | None = opt(
        None, help="aspect-preserving geometry for --grid and boxes: resize the short side to N "
        "(no centre crop), sides rounded to the deepest stage's stride (layer4: 32); embedding "
        "and top-k then come from the same uncropped pass", group=DETECT, positive=True,
        metavar="N")
    max_size: int | None = opt(
        None, help="with --resize-short: cap the long side at M (the scale shrinks to fit)",
        group=DETECT, positive=True, metavar="M")
    boxes_column: str | None = opt(
        None, help="parquet/manifest input: column of boxes per image, pixel x1,y1,x2,y2 (a list "
        "of 4-lists, a flat list, or JSON text of either) in --boxes-frame coordinates; adds the "
        "columns boxes and region_features", group=DETECT)
    boxes_file: str | None = opt(
        None, help="sidecar file of boxes keyed by uri (Parquet or JSON lines with columns uri, "
        "boxes; uri as the output writes it, or relative to --input): boxes for image folders "
        "and tar shards", group=DETECT, parse=lambda t: _uri(t) if t else None)
    boxes_frame: str = opt(
        "stored", help="coordinates of the input boxes: stored = the image as stored in the "
        "file, before EXIF orientation (annotation tools, raw pixels); oriented = after it (what "
        "the output's width/height and boxes columns use)", group=DETECT,
        choices=("stored", "oriented"))
    region_layer: str = opt(
        "layer4", help="stage whose map RoIAlign pools the boxes from", group=DETECT,
        choices=LAYER_NAMES)
    region_dtype: str = opt(
        "float16", help="storage type of region_features (and region_maps)", group=DETECT,
        choices=("float16", "float32"))
    region_maps: bool = opt(
        False, help="also store each box's 7x7 RoIAlign map, (7, 7, C) row-major per box, in "
        "region_maps (49x the bytes of region_features)", group=DETECT)

    def public_dict(self) -> dict[str, Any]:
        """The config as recorded in outputs: storage options (credentials) are redacted."""
        d = asdict(self)
        d["storage_options"] = sorted(self.storage_options)  # keys only, never values
        return d


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a config field (`top_k` -> `--top-k`)."""
    return "--" + f.name.replace("_", "-")


def config_default(name: str) -> Any:
    """The stored default of a config field, for code outside the CLI that shares it."""
    f = ExtractConfig.__dataclass_fields__[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _flag_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(ExtractConfig) if "help" in f.metadata]


def _value_type(annotation: Any) -> Any:
    """`int | None` -> int: what argparse converts a flag's text to."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def _parser_default(f: dataclasses.Field) -> Any:
    """What the parser holds when the flag is absent: the stored default, or for a parsed flag
    whose default is no text (a tuple, a dict) None, which its parse function maps to it."""
    if f.metadata["cli_default"] is not dataclasses.MISSING:
        return f.metadata["cli_default"]
    if f.default is dataclasses.MISSING or (f.metadata["parse"] is not None
                                            and not isinstance(f.default, str)):
        return None
    return f.default


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="extract.py",
        description="Extract ResNet top-k classifications and/or pooled embeddings from a folder "
        "of images into Parquet, with a Ray Data streaming pipeline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    hints = typing.get_type_hints(ExtractConfig)
    for f in _flag_fields():
        meta, kind = f.metadata, _value_type(hints[f.name])
        kwargs: dict[str, Any] = {"help": meta["help"], "default": _parser_default(f)}
        if kind is bool:
            kwargs["action"] = "store_true"
        else:
            if meta["parse"] is None and kind in (int, float):
                kwargs["type"] = kind
            if meta["choices"] is not None:
                kwargs["choices"] = meta["choices"]
            if meta["metavar"] is not None:
                kwargs["metavar"] = meta["metavar"]
        groups[meta["group"]].add_argument(flag_of(f), **kwargs)
    # Not configuration: the entry script's own switch (see cli._apply_demo).
    groups[IO].add_argument(
        "--demo", action="store_true",
        help="write sample photos (from scikit-image) to ./demo/images and extract them to "
        "./demo/output, unless --input/--output say otherwise; uses the torch hub cache's "
        "weights when present, else --weights random (said loudly)")
    return p


def config_from_args(args: argparse.Namespace) -> ExtractConfig:
    """Validate parsed arguments into an ExtractConfig; raises ConfigError saying what to fix."""
    if not args.input or not args.output:
        raise ConfigError("--input and --output are required (or use --demo)")
    values: dict[str, Any] = {}
    for f in _flag_fields():
        meta, flag = f.metadata, flag_of(f)
        raw = getattr(args, f.name, _parser_default(f))
        value = meta["parse"](raw) if meta["parse"] is not None else raw
        if meta["positive"] and value is not None and value <= 0:
            raise ConfigError(f"{flag} must be positive, got {value}")
        if meta["fraction"] and not 0.0 <= value <= 1.0:
            raise ConfigError(f"{flag} must be within [0, 1], got {value}")
        values[f.name] = value
    values["explain"] = "explain" in _task_parts(args.task)
    _check(values)
    return ExtractConfig(**values)


def _check(v: dict[str, Any]) -> None:
    """The rules between flags; fills in the run id when --run-id is absent."""
    if v["draft_factor"] < 0:
        raise ConfigError("--draft-factor must be >= 0 (0 disables DCT-domain downscaling)")
    if v["preprocess_from"] and v["weights"] in NAMED_WEIGHTS:
        raise ConfigError("--preprocess-from applies to a state_dict file or 'random', not to "
                          "named weights (they bring their own preprocessing)")
    if v["device"] == "cpu" and v["gpu_decode"]:
        raise ConfigError("--gpu-decode needs the model on a GPU: drop it or use --device cuda")
    if v["device"] == "cpu" and v["precision"] in ("bf16", "fp16"):
        raise ConfigError("--precision bf16/fp16 needs --device cuda (CPU runs in fp32)")
    id_column = (v["id_column"],) if v["id_column"] else ()
    clash = sorted(RESERVED_COLUMNS.intersection(v["keep_columns"] + id_column))
    if clash:
        raise ConfigError(f"--keep-columns/--id-column {', '.join(clash)} would overwrite output "
                          f"columns of the same name; rename them in the input")
    if (v["id_column"] or v["image_column"] != "image") and v["input_format"] not in (
            "auto", "parquet"):
        raise ConfigError("--id-column and --image-column apply to --input-format parquet")
    if v["explain_class"] is not None and v["explain_class"] < 0:
        raise ConfigError(f"--explain-class must be a class index >= 0, got {v['explain_class']}")
    if v["explain_png"] and not v["explain"]:
        raise ConfigError("--explain-png needs explain in --task (e.g. --task both,explain)")
    if v["explain_class"] is not None and not v["explain"]:
        raise ConfigError("--explain-class needs explain in --task (e.g. --task both,explain)")
    _check_detection(v)
    retry = v["retry_errors"]
    if v["run_id"] is None:
        v["run_id"] = f"{retry}-retry" if retry else time.strftime("%Y-%m-%d", time.gmtime())
    for name, value in (("--run-id", v["run_id"]), ("--retry-errors", retry)):
        if value is not None and not RUN_ID_RE.fullmatch(value):
            raise ConfigError(f"{name} {value!r}: use letters, digits, '.', '_', '-' and start "
                              f"with a letter or digit (it becomes a folder name run=<id>)")
    if retry and retry == v["run_id"]:
        raise ConfigError("--retry-errors writes a new run: give a --run-id other than the "
                          "failed run's (or leave it out for <RUN_ID>-retry)")
    if retry and v["incremental"]:
        raise ConfigError("--retry-errors and --incremental do not combine: a retry already "
                          "processes only the failed inputs")


def _check_detection(v: dict[str, Any]) -> None:
    """The rules of the detection-feature flags (docs/detection-features.md)."""
    boxes = v["boxes_column"] or v["boxes_file"]
    if v["boxes_column"] and v["boxes_file"]:
        raise ConfigError("--boxes-column and --boxes-file are two sources of the same boxes: "
                          "give one")
    if v["boxes_column"] and v["input_format"] in ("images", "tar"):
        raise ConfigError("--boxes-column applies to parquet and manifest inputs; image "
                          "folders and tar shards take --boxes-file")
    if (v["grid"] or boxes) and v["resize_short"] is None:
        raise ConfigError("--grid and boxes need the aspect-preserving geometry: add "
                          "--resize-short N (e.g. 448, or 600 with --max-size 1000)")
    if v["max_size"] is not None and v["resize_short"] is None:
        raise ConfigError("--max-size caps --resize-short's long side: add --resize-short N")
    if v["max_size"] is not None and v["max_size"] < v["resize_short"]:
        raise ConfigError(f"--max-size {v['max_size']} is smaller than --resize-short "
                          f"{v['resize_short']}")
    if v["resize_short"] is not None and v["explain"]:
        raise ConfigError("--task explain works on the centre crop; it does not combine with "
                          "--resize-short (run it as a separate job)")
    if v["resize_short"] is not None and v["gpu_decode"]:
        raise ConfigError("--gpu-decode does not combine with --resize-short (nvJPEG decodes "
                          "into the centre-crop batch)")
    if v["region_maps"] and not boxes:
        raise ConfigError("--region-maps needs boxes: --boxes-column or --boxes-file")
