"""Linear probe: train a small head on an output's embeddings, report its metrics, apply it.

Labels come from the image's folder name, a column of the output (e.g. a hive partition) or a
labels file (uri,label). The split is stratified and seeded; the head (linear or one hidden
layer) sees L2-normalised, standardised embeddings. A saved head is a plain dict of tensors
and strings (loadable with `weights_only=True`) that `extract.py --head` applies in the same
pass as the backbone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from resnet_features.core import storage
from resnet_features.core.errors import HeadError, SearchError
from resnet_features.extract.outputs.head import HEAD_FORMAT, Head, load_head, save_head
from resnet_features.runs.catalog import Catalog
from resnet_features.runs.features import region_arrays

__all__ = [
    "HEAD_FORMAT",
    "Head",
    "HeadError",
    "evaluate",
    "load_head",
    "load_labelled",
    "main",
    "save_head",
    "stratified_split",
    "train_head",
]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- labels and data


def _folder_labels(uris: np.ndarray) -> np.ndarray:
    return np.array([u.rstrip("/").rsplit("/", 2)[-2] if u.count("/") else "" for u in uris],
                    dtype=object)


def _file_labels(path: str, storage_options: dict[str, Any] | None) -> dict[str, str]:
    """A labels file: CSV/TSV with a header (uri,label), JSON lines, or Parquet."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    fs, p = storage.filesystem(path, storage_options)
    with fs.open(p, "rb") as f:
        if p.endswith(".parquet"):
            table = pq.read_table(f)
        elif p.endswith((".json", ".jsonl")):
            table = pajson.read_json(f)
        else:
            delim = "\t" if p.endswith(".tsv") else ","
            table = pacsv.read_csv(f, parse_options=pacsv.ParseOptions(delimiter=delim))
    if not {"uri", "label"} <= set(table.column_names):
        raise HeadError(f"labels file {path} needs columns 'uri' and 'label', has "
                        f"{table.column_names}")
    uris = table.column("uri").to_pylist()
    labels = pc.cast(table.column("label"), pa.string()).to_pylist()
    return {u if "://" in u else os.path.abspath(u): lab for u, lab in zip(uris, labels)}


def load_labelled(
    output: str,
    labels: str = "folder",
    storage_options: dict[str, Any] | None = None,
    column: str = "embedding",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uris, embeddings (n, D) float32, labels) from an output's live rows (its catalog: each
    input once, from the newest finished run holding it); unlabelled rows are dropped.

    `labels`: "folder" (the image's parent folder name), "column:NAME" (a column of the output,
    e.g. `run`) or the path of a labels file with columns uri,label.
    """
    catalog = Catalog.open(output, storage_options)
    name = labels.split(":", 1)[1] if labels.startswith("column:") else None
    if name is not None and name not in catalog.schema().names:
        raise HeadError(f"the output has no column {name!r}; columns: {catalog.schema().names}")
    if column in catalog.schema().names and pa.types.is_list(catalog.schema().field(
            column).type):
        return _load_regions(catalog, column, name)
    parts = list(catalog.embeddings(column))
    if not parts:
        raise SearchError(f"{output} holds no rows in a finished run")
    uris = np.concatenate([p[0] for p in parts])
    emb = np.concatenate([p[1] for p in parts])
    if labels == "folder":
        y = _folder_labels(uris)
    elif name is not None:
        t = catalog.read(["uri", name])
        lookup = dict(zip(t.column("uri").to_pylist(),
                          pc.cast(t.column(name), pa.string()).to_pylist()))
        y = np.array([lookup.get(u) or "" for u in uris], dtype=object)
    else:
        lookup = _file_labels(labels, storage_options)
        y = np.array([lookup.get(u, "") for u in uris], dtype=object)
    keep = y != ""
    if keep.sum() < len(y):
        log.warning("%d of %d rows have no label and are left out", len(y) - keep.sum(), len(y))
    return uris[keep], emb[keep], y[keep]


def _load_regions(catalog: Catalog, column: str, name: str | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows = boxes: each box's vector of a region column (`region_features`), labelled by
    the same position of a list column (`--labels column:NAME`, one label per box, e.g. an
    input column carried with --keep-columns); uris are `<uri>#box<j>`."""
    if name is None:
        raise HeadError(f"{column} holds one vector per box: label the boxes with "
                        "--labels column:NAME, a list column with one label per box")
    table = catalog.read(["uri", column, name])
    if not pa.types.is_list(table.schema.field(name).type):
        raise HeadError(f"--labels column:{name} must be a list (one label per box), "
                        f"is {table.schema.field(name).type}")
    uris, x, y = [], [], []
    for uri, feats, labs in zip(table.column("uri").to_pylist(), region_arrays(table, column),
                                table.column(name).to_pylist()):
        if labs is None or len(labs) != len(feats):
            raise HeadError(f"{uri}: {len(feats)} boxes but "
                            f"{'no' if labs is None else len(labs)} labels in {name}")
        uris += [f"{uri}#box{j}" for j in range(len(feats))]
        x.append(np.asarray(feats, dtype=np.float32))
        y += [str(v) if v is not None else "" for v in labs]
    if not uris:
        raise SearchError(f"the output's {column} holds no boxes")
    y_arr = np.array(y, dtype=object)
    keep = y_arr != ""
    return np.array(uris, dtype=object)[keep], np.concatenate(x)[keep], y_arr[keep]


def stratified_split(y: np.ndarray, val_fraction: float = 0.25, seed: int = 0):
    """Train/validation indices with each class in both (when it has at least two rows)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in sorted(set(y.tolist())):
        idx = rng.permutation(np.flatnonzero(y == cls))
        n_val = int(round(len(idx) * val_fraction))
        n_val = min(max(n_val, 1 if len(idx) >= 2 else 0), len(idx) - 1)
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


# ---------------------------------------------------------------------------- training


def train_head(
    x: np.ndarray, y_ids: np.ndarray, n_classes: int, *, hidden: int = 0, epochs: int = 300,
    lr: float = 0.01, weight_decay: float = 1e-3, seed: int = 0,
) -> Head:
    """Full-batch AdamW with cross-entropy (embeddings are small: N x D fits in memory)."""
    torch.manual_seed(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(y_ids.astype(np.int64))
    head = Head(xt.shape[1], n_classes, hidden)
    with torch.no_grad():
        z = torch.nn.functional.normalize(xt, dim=1, eps=1e-12)
        head.mean.copy_(z.mean(0))
        head.std.copy_(z.std(0, unbiased=False).clamp_min(1e-6))
    opt = torch.optim.AdamW(head.net.parameters(), lr=lr, weight_decay=weight_decay)
    head.train()
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(xt), yt)
        loss.backward()
        opt.step()
    log.info("trained head: %d rows, %d classes, final training loss %.4f",
             len(xt), n_classes, loss.item())
    return head.eval()


def evaluate(head: Head, x: np.ndarray, y_ids: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/support and the confusion matrix (rows: truth)."""
    with torch.inference_mode():
        pred = head(torch.from_numpy(np.asarray(x, dtype=np.float32))).argmax(1).numpy()
    n = len(classes)
    conf = np.zeros((n, n), dtype=np.int64)
    np.add.at(conf, (y_ids, pred), 1)
    per_class = {}
    for i, name in enumerate(classes):
        tp, predicted, actual = conf[i, i], conf[:, i].sum(), conf[i, :].sum()
        per_class[name] = {
            "precision": float(tp / predicted) if predicted else 0.0,
            "recall": float(tp / actual) if actual else 0.0,
            "support": int(actual),
        }
    return {"accuracy": float((pred == y_ids).mean()) if len(y_ids) else float("nan"),
            "n": int(len(y_ids)), "per_class": per_class, "confusion": conf.tolist(),
            "predictions": pred.tolist()}


def confusion_text(conf: list[list[int]], classes: list[str]) -> str:
    width = max(5, *(len(c) for c in classes))
    lines = ["truth \\ predicted".ljust(width) + " " + " ".join(f"{i:>4d}" for i in
                                                                range(len(classes)))]
    for i, (name, row) in enumerate(zip(classes, conf)):
        lines.append(f"{name[:width]:<{width}} " + " ".join(f"{v:>4d}" for v in row)
                     + f"   [{i}]")
    return "\n".join(lines)


def save_confusion_png(conf: list[list[int]], classes: list[str], path: str,
                       title: str = "validation confusion matrix") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(conf)
    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title(title)
    for (i, j), v in np.ndenumerate(m):
        if v:
            ax.text(j, i, str(v), ha="center", va="center",
                    color="white" if v > m.max() / 2 else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- CLI


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="linear_probe.py",
        description="Train a linear (or small MLP) head on the embeddings of an extraction "
        "output; report accuracy, per-class precision/recall and a confusion matrix; save "
        "the head for extract.py --head.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, help="extraction output with an embedding column")
    p.add_argument("--labels", default="folder",
                   help="'folder' (the image's parent folder name), 'column:NAME' (a column or "
                   "partition of the output) or a labels file (CSV/TSV/JSON lines/Parquet with "
                   "columns uri,label)")
    p.add_argument("--column", default="embedding",
                   help="features to train on: embedding, layer3, ... or region_features "
                   "(rows = boxes, labelled by --labels column:NAME, a list column with one "
                   "label per box)")
    p.add_argument("--out", required=True,
                   help="folder for head.pt, metrics.json and confusion.png")
    p.add_argument("--val-fraction", type=float, default=0.25,
                   help="stratified validation share per class")
    p.add_argument("--hidden", type=int, default=0,
                   help="hidden units of a one-layer MLP head (0: linear head)")
    p.add_argument("--epochs", type=int, default=300, help="full-batch training steps")
    p.add_argument("--lr", type=float, default=0.01, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-3, help="AdamW weight decay")
    p.add_argument("--seed", type=int, default=0, help="split and initialisation seed")
    p.add_argument("--storage-options", default=None, help="JSON object passed to fsspec")
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit 2 on a UsageError (e.g. HeadError, SearchError), 1 with a traceback on anything else."""
    from resnet_features.core.entry import run_main

    parser = get_args_parser()
    args = parser.parse_args(argv)
    return run_main(lambda: _main(parser, args), what="the probe")


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not 0 < args.val_fraction < 1:
        parser.error("--val-fraction must be within (0, 1)")
    if args.hidden < 0 or args.epochs <= 0:
        parser.error("--hidden must be >= 0 and --epochs positive")
    from resnet_features.core.config import ConfigError, parse_storage_options

    try:
        so = parse_storage_options(args.storage_options)
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        summary = Catalog.open(args.input, so).latest_summary()
        uris, x, labels = load_labelled(args.input, args.labels, so, args.column)
    except FileNotFoundError as exc:  # a path given on the command line; other OSErrors exit 1
        raise SearchError(f"no such file or folder: {exc.filename or exc}") from exc
    classes = sorted(set(labels.tolist()))
    if len(classes) < 2:
        raise SearchError(f"need at least two classes, found {classes}")
    y = np.array([classes.index(v) for v in labels], dtype=np.int64)
    train, val = stratified_split(y, args.val_fraction, args.seed)
    head = train_head(x[train], y[train], len(classes), hidden=args.hidden, epochs=args.epochs,
                      lr=args.lr, weight_decay=args.weight_decay, seed=args.seed)
    train_metrics = evaluate(head, x[train], y[train], classes)
    metrics = evaluate(head, x[val], y[val], classes)
    os.makedirs(args.out, exist_ok=True)
    meta = {"model": summary.get("model"), "weights": summary.get("weights"),
            "preprocessing": summary.get("preprocessing"), "source": args.input,
            "labels": args.labels, "val_accuracy": metrics["accuracy"]}
    save_head(head, classes, os.path.join(args.out, "head.pt"), meta)
    save_confusion_png(metrics["confusion"], classes, os.path.join(args.out, "confusion.png"))
    report = {
        "classes": classes, "n_train": len(train), "n_val": len(val),
        "train_accuracy": train_metrics["accuracy"], "val_accuracy": metrics["accuracy"],
        "chance_accuracy": float(np.bincount(y).max() / len(y)),
        "per_class": metrics["per_class"], "confusion": metrics["confusion"],
        "val_uris": uris[val].tolist(), "val_labels": labels[val].tolist(),
        "val_predictions": [classes[i] for i in metrics["predictions"]],
        "hidden": args.hidden, "model": summary.get("model"), "weights": summary.get("weights"),
    }
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(confusion_text(metrics["confusion"], classes))
    for name, m in metrics["per_class"].items():
        print(f"{name}: precision {m['precision']:.3f} recall {m['recall']:.3f} "
              f"(n={m['support']})")
    print(f"validation accuracy {metrics['accuracy']:.3f} on {len(val)} images "
          f"(train {train_metrics['accuracy']:.3f} on {len(train)}; majority-class chance "
          f"{report['chance_accuracy']:.3f}); head, metrics.json, confusion.png -> {args.out}")
    return 0
