"""Nearest-neighbour search over an extraction output: exact (streamed matmuls) or FAISS.

The index is the job's own output, read through its catalog (`runs.catalog`: finished runs only,
each input once with its latest row) one record batch at a time, so outputs larger than memory
are searched with a running top-k per query. Query images are embedded with the model, weights
and preprocessing recorded in the summary of the output's newest finished run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from resnet_features.core import storage
from resnet_features.core.errors import SearchError
from resnet_features.runs.catalog import Catalog

__all__ = [
    "METRICS",
    "SearchResult",
    "embed_images",
    "exact_search",
    "faiss_search",
    "iter_embeddings",
    "main",
    "open_output",
    "read_summary",
    "read_embeddings",
]

log = logging.getLogger(__name__)

METRICS = ("cosine", "l2")

RESULT_SCHEMA = pa.schema([
    ("query", pa.string()),
    ("rank", pa.int32()),
    ("neighbor_uri", pa.string()),
    ("score", pa.float32()),  # cosine similarity (higher is closer) or squared L2 distance
    ("metric", pa.string()),
])


def open_output(uri: str, storage_options: dict[str, Any] | None = None) -> Catalog:
    """An extraction output's catalog: its finished runs, each input once (latest row)."""
    return Catalog.open(uri, storage_options)


def read_summary(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary of the output's newest finished run (by commit time)."""
    return Catalog.open(uri, storage_options).latest_summary()


def iter_embeddings(
    catalog: Catalog, column: str = "embedding", batch_rows: int = 65_536
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(uris, (n, D) float32) per record batch of live rows: memory bounded by `batch_rows`."""
    return catalog.embeddings(column, batch_rows)


def read_embeddings(uri: str, column: str = "embedding",
                    storage_options: dict[str, Any] | None = None):
    """All (uris, embeddings) of an output in one piece (for query sets and small outputs)."""
    parts = list(iter_embeddings(open_output(uri, storage_options), column))
    if not parts:
        raise SearchError(f"{uri} holds no rows in a finished run")
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


@dataclasses.dataclass
class SearchResult:
    """`scores`/`uris` are (Q, k), best first; fewer than k rows in the index leave "" / nan."""

    queries: list[str]
    uris: np.ndarray
    scores: np.ndarray
    metric: str

    def to_table(self) -> pa.Table:
        q, k = self.uris.shape
        keep = (self.uris != "").reshape(-1)
        return pa.Table.from_pydict({
            "query": np.repeat(np.asarray(self.queries, dtype=object), k)[keep].tolist(),
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), q)[keep],
            "neighbor_uri": self.uris.reshape(-1)[keep].tolist(),
            "score": self.scores.reshape(-1)[keep].astype(np.float32),
            "metric": [self.metric] * int(keep.sum()),
        }, schema=RESULT_SCHEMA)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1, eps=1e-12)


def exact_search(
    queries: np.ndarray,
    index: Iterator[tuple[np.ndarray, np.ndarray]],
    k: int = 10,
    metric: str = "cosine",
    query_names: list[str] | None = None,
    exclude_self: bool = False,
) -> SearchResult:
    """Exact k-NN: one matrix product per index chunk, merged into a running top-k.

    `exclude_self` drops neighbours whose URI equals the query's name (a query that is itself
    in the index).
    """
    if metric not in METRICS:
        raise SearchError(f"metric must be one of {METRICS}, got {metric!r}")
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    names = query_names or [str(i) for i in range(len(q))]
    if metric == "cosine":
        q = _normalise(q)
    best = torch.full((len(q), k), -torch.inf)  # internal: higher is better
    best_uris = np.full((len(q), k), "", dtype=object)
    name_arr = np.asarray(names, dtype=object)
    for uris, emb in index:
        x = torch.from_numpy(emb)
        if x.shape[1] != q.shape[1]:
            raise SearchError(f"index embeddings have {x.shape[1]} dimensions, queries "
                              f"{q.shape[1]}: use queries from the same model")
        if metric == "cosine":
            s = q @ _normalise(x).T
        else:  # -||q - x||^2, without forming the differences
            s = 2 * (q @ x.T) - (q * q).sum(1, keepdim=True) - (x * x).sum(1)[None, :]
        if exclude_self:
            same = torch.from_numpy(name_arr[:, None] == uris[None, :])
            s = s.masked_fill(same, -torch.inf)
        merged = torch.cat([best, s], dim=1)
        merged_uris = np.concatenate([best_uris, np.broadcast_to(uris, (len(q), len(uris)))],
                                     axis=1)
        best, idx = torch.topk(merged, min(k, merged.shape[1]), dim=1)
        best_uris = np.take_along_axis(merged_uris, idx.numpy(), axis=1)
        if best.shape[1] < k:  # fewer rows so far than k: pad again
            pad = k - best.shape[1]
            best = torch.cat([best, torch.full((len(q), pad), -torch.inf)], dim=1)
            best_uris = np.concatenate([best_uris, np.full((len(q), pad), "", object)], 1)
    scores = best.numpy().astype(np.float32)
    best_uris[~np.isfinite(scores)] = ""
    if metric == "l2":
        scores = -scores
    scores[best_uris == ""] = np.nan
    return SearchResult(queries=list(names), uris=best_uris, scores=scores, metric=metric)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def faiss_search(
    queries: np.ndarray,
    catalog: Catalog,
    k: int = 10,
    metric: str = "cosine",
    query_names: list[str] | None = None,
    index_factory: str | None = None,
    nprobe: int = 8,
    column: str = "embedding",
) -> SearchResult:
    """Approximate k-NN with a FAISS index built by streaming the catalog's live rows.

    Default index: IVF-Flat with ~sqrt(N) lists, trained on the first batch (up to 64k rows),
    probed `nprobe` lists per query. Use `index_factory` (e.g. "IVF4096,PQ32") to compress
    vectors when the output does not fit in memory as float32.
    """
    import faiss

    if metric not in METRICS:
        raise SearchError(f"metric must be one of {METRICS}, got {metric!r}")
    n = catalog.num_rows()
    if n == 0:
        raise SearchError("the index output holds no rows in a finished run")
    schema = catalog.schema()
    if column not in schema.names:
        raise SearchError(f"the index output has no {column!r} column")
    dim = schema.field(column).type.list_size
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    factory = index_factory or f"IVF{max(1, int(np.sqrt(n)))},Flat"
    index = faiss.index_factory(dim, factory, faiss_metric)
    all_uris: list[np.ndarray] = []
    for uris, emb in iter_embeddings(catalog, column):
        if metric == "cosine":
            faiss.normalize_L2(emb)
        if not index.is_trained:
            index.train(emb)
        index.add(emb)
        all_uris.append(uris)
    if hasattr(index, "nprobe"):
        index.nprobe = nprobe
    else:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    q = np.ascontiguousarray(queries, dtype=np.float32).copy()
    if metric == "cosine":
        faiss.normalize_L2(q)
    scores, ids = index.search(q, k)
    uris = np.concatenate(all_uris)
    out_uris = np.where(ids >= 0, uris[np.clip(ids, 0, None)], "").astype(object)
    scores = scores.astype(np.float32)
    scores[ids < 0] = np.nan
    names = query_names or [str(i) for i in range(len(q))]
    return SearchResult(queries=list(names), uris=out_uris, scores=scores, metric=metric)


def embed_images(
    uris: list[str],
    summary: dict[str, Any],
    weights: str | None = None,
    storage_options: dict[str, Any] | None = None,
    batch_size: int = 32,
) -> np.ndarray:
    """Embed query images with the run's model, weights and preprocessing (from its summary).

    The weights file must be the one the run used: a state_dict is checked against the
    recorded sha256. Images that fail to decode raise (a query must not silently vanish).
    """
    from resnet_features.core.models import Preprocessing, is_named_weights, resolve_model
    from resnet_features.extract.decode import DecodeOptions, decode_image
    from resnet_features.extract.inference import InferenceOptions, ModelRunner
    from resnet_features.extract.outputs import for_task

    cfg = summary.get("config", {})
    weights_arg = weights or summary.get("weights_arg") or cfg.get("weights")
    recorded = summary.get("weights", "")
    if weights_arg == "random" or recorded == "random":
        raise SearchError("the run used random weights: its embeddings cannot be reproduced "
                          "for query images (search with --query-output instead)")
    sha = recorded.split(":", 1)[1] if recorded.startswith("sha256:") else None
    if is_named_weights(weights_arg):
        sha = None
    spec, state_dict = resolve_model(summary["model"], weights_arg,
                                     preprocess_from=cfg.get("preprocess_from"),
                                     storage_options=storage_options, weights_sha256=sha)
    spec = dataclasses.replace(spec, preprocessing=Preprocessing(**summary["preprocessing"]))
    runner = ModelRunner(spec, state_dict, InferenceOptions(device="cpu"),
                         for_task(spec, "embed"))
    options = DecodeOptions(draft_factor=cfg.get("draft_factor", DecodeOptions().draft_factor))
    out = []
    for start in range(0, len(uris), batch_size):
        chunk = uris[start:start + batch_size]
        pixels = np.stack([
            decode_image(storage.read_bytes(u, storage_options), spec.preprocessing,
                         options).pixels for u in chunk])
        out.append(runner.embed(pixels))
    return np.concatenate(out)


def write_results(table: pa.Table, path: str,
                  storage_options: dict[str, Any] | None = None) -> None:
    """Parquet, or JSON lines when the path ends with .json/.jsonl."""
    fs, p = storage.filesystem(path, storage_options)
    parent = p.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if p.endswith((".json", ".jsonl")):
        with fs.open(p, "w") as f:
            for row in table.to_pylist():
                f.write(json.dumps(row) + "\n")
    else:
        with fs.open(p, "wb") as f:
            pq.write_table(table, f)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="search.py",
        description="k-nearest-neighbour search over the embeddings of an extraction output.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--index", required=True,
                   help="extraction output (folder or URI) whose embeddings are searched")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--query", nargs="+",
                   help="query images or folders of images (paths or fsspec URIs); embedded with "
                   "the index run's model, weights and preprocessing")
    q.add_argument("--query-output",
                   help="another extraction output whose embeddings are the queries (its URIs "
                   "name the queries)")
    p.add_argument("--out", required=True,
                   help="result file: .parquet, or .json/.jsonl for JSON lines")
    p.add_argument("-k", "--k", type=int, default=10, help="neighbours per query")
    p.add_argument("--metric", choices=METRICS, default="cosine",
                   help="cosine similarity (score: higher is closer) or squared L2 distance "
                   "(score: lower is closer)")
    p.add_argument("--method", choices=("exact", "faiss"), default="exact",
                   help="exact: streamed batched matrix products; faiss: approximate index "
                   "(needs faiss-cpu or faiss-gpu installed)")
    p.add_argument("--faiss-index", default=None,
                   help="FAISS index_factory string (default IVF<sqrt(N)>,Flat)")
    p.add_argument("--nprobe", type=int, default=8, help="FAISS IVF lists probed per query")
    p.add_argument("--exclude-self", action="store_true",
                   help="drop a neighbour whose URI equals the query's")
    p.add_argument("--weights", default=None,
                   help="weights for embedding query images, when the path recorded in the "
                   "run summary is not readable here (checked against the recorded sha256)")
    p.add_argument("--storage-options", default=None, help="JSON object passed to fsspec")
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit 2 on a UsageError (e.g. SearchError, InputError), 1 with a traceback on anything else."""
    from resnet_features.core.entry import run_main

    parser = get_args_parser()
    args = parser.parse_args(argv)
    return run_main(lambda: _main(parser, args), what="the search")


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from resnet_features.extract.inputs import list_images

    if args.k <= 0 or args.nprobe <= 0:
        parser.error("-k and --nprobe must be positive")
    from resnet_features.core.config import ConfigError, parse_storage_options

    try:
        so = parse_storage_options(args.storage_options)
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        if args.query_output:
            names, queries = read_embeddings(args.query_output, storage_options=so)
            names = names.tolist()
        else:
            names = []
            for q in args.query:
                is_dir = os.path.isdir(q) if "://" not in q else storage.filesystem(
                    q, so)[0].isdir(storage.strip_protocol(q))
                names += (list_images(q, so).table.column("uri").to_pylist() if is_dir
                          else [q if "://" in q else os.path.abspath(q)])
            queries = embed_images(names, read_summary(args.index, so), args.weights, so)
        catalog = open_output(args.index, so)
        if args.method == "faiss":
            if not faiss_available():
                parser.error("--method faiss needs the faiss-cpu (or faiss-gpu) package")
            if args.exclude_self:
                parser.error("--exclude-self is supported with --method exact only")
            result = faiss_search(queries, catalog, args.k, args.metric, names,
                                  args.faiss_index, args.nprobe)
        else:
            result = exact_search(queries, iter_embeddings(catalog), args.k, args.metric,
                                  names, args.exclude_self)
    except FileNotFoundError as exc:  # a path given on the command line; other OSErrors exit 1
        raise SearchError(f"no such file or folder: {exc.filename or exc}") from exc
    table = result.to_table()
    write_results(table, args.out, so)
    print(f"{len(names)} queries, {table.num_rows} neighbours ({args.method}, {args.metric}) "
          f"-> {args.out}")
    return 0
