"""Test helpers: the config builder, realistic test weights, the independent eager-torchvision
reference, and the job's stages run in this process without Ray (`run_stages`)."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch
from PIL import Image
from torchvision.models import get_model_builder, get_model_weights

from resnet_features.core.samples import PHOTO_NAMES, load_photo

#: The repository root (tests/..).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_cfg(*argv: str, run_id: str | None = None):
    """An ExtractConfig from command-line words, through the real parser (`run_id`: appends
    `--run-id`)."""
    from resnet_features.core.config import config_from_args, get_args_parser

    words = [*argv, *(("--run-id", run_id) if run_id is not None else ())]
    return config_from_args(get_args_parser().parse_args(words))


def photo_batch(transform, n: int = 16) -> torch.Tensor:
    imgs = [Image.fromarray(load_photo(PHOTO_NAMES[i % len(PHOTO_NAMES)])).convert("RGB")
            for i in range(n)]
    return torch.stack([transform(im) for im in imgs])


def make_calibrated_state_dict(model_name: str, path: str, seed: int = 0) -> str:
    """Save a state_dict whose BatchNorm statistics come from real photos.

    Freshly initialised ResNets give degenerate features and near-tied logits; running real
    photos through the model in train mode gives BatchNorm realistic running statistics, so
    features spread out. A random classifier on those features still gives one class to almost
    every image, with small margins, so the classifier is then centred on the photos' features
    and given one prototype class per calibration photo: crops and rescales of those photos
    get a distinct, confident top-1, as with pretrained weights on their own classes.
    """
    if os.path.exists(path):
        return path
    torch.manual_seed(seed)
    model = get_model_builder(model_name)(weights=None)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    transform = get_model_weights(model_name).DEFAULT.transforms()
    x = photo_batch(transform, 16)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(x)
        model.eval()
        pooled = {}
        hook = model.avgpool.register_forward_hook(lambda m, i, o: pooled.__setitem__("x", o))
        model(x)
        hook.remove()
        feats = torch.flatten(pooled["x"], 1).double()
        mean = feats.mean(0)
        centred = feats - mean
        # Classes along the photos' strongest directions of variation (top principal
        # components, both signs, whitened), weak random directions for every other class:
        # decisions rest on the features' largest differences, as a trained head's do.
        _, sv, vt = torch.linalg.svd(centred, full_matrices=False)
        pcs = vt[:4] / (sv[:4, None] / centred.shape[0] ** 0.5)
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(model.fc.out_features, feats.shape[1], generator=g, dtype=torch.float64)
        w = 0.005 * w / w.norm(dim=1, keepdim=True) * pcs[0].norm()
        for j, pc in enumerate(pcs):
            w[(2 * j * 97 + 11) % model.fc.out_features] = 4.0 * pc
            w[((2 * j + 1) * 97 + 11) % model.fc.out_features] = -4.0 * pc
        model.fc.weight.copy_(w.float())
        model.fc.bias.copy_((-w @ mean).float())
    torch.save(model.state_dict(), path)
    return path


def reference_outputs(model_name: str, state_dict_path: str, image_paths: list[str],
                      weights_entry: str = "DEFAULT", top_k: int = 5):
    """Eager torchvision on image files with weights.transforms(): embeddings, top-k ids, probs.

    Independent of the job's code: Pillow's decode, torchvision's own transform pipeline, its
    own model forward with a hook on avgpool for the embedding.
    """
    images = []
    for p in image_paths:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    return reference_from_images(model_name, state_dict_path, images, weights_entry, top_k)


def reference_from_images(model_name: str, state_dict_path: str, images: list[Image.Image],
                          weights_entry: str = "DEFAULT", top_k: int = 5):
    """Eager torchvision (weights.transforms() + the model) on given pictures: embeddings
    (N, D), top-k ids (N, k) and their probabilities (N, k)."""
    transform = get_model_weights(model_name)[weights_entry].transforms()
    model = get_model_builder(model_name)(weights=None)
    model.load_state_dict(torch.load(state_dict_path, weights_only=True))
    model.eval()
    pooled = {}
    model.avgpool.register_forward_hook(lambda m, i, o: pooled.__setitem__("x", o))
    embs, ids, probs = [], [], []
    with torch.no_grad():
        for im in images:
            pr = torch.softmax(model(transform(im.convert("RGB")).unsqueeze(0)), 1)
            s, i = torch.topk(pr, top_k, 1)
            embs.append(torch.flatten(pooled["x"], 1)[0].numpy())
            ids.append(i[0].numpy())
            probs.append(s[0].numpy())
    return np.stack(embs), np.stack(ids), np.stack(probs)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def publish_table(output: str, run_id: str, pieces: list, summary: dict) -> str:
    """Publish Arrow tables (one part file each) as a finished run of `output` through the real
    commit protocol (staged parts, their ledger fragments, manifest, `_SUCCESS`): how a test
    gives the catalog an output whose rows it chose."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from resnet_features.core import storage
    from resnet_features.runs import protocol
    from resnet_features.runs.layout import LEDGER_DIR, LEDGER_SCHEMA

    fs, root = storage.filesystem(output)
    layout = protocol.RunLayout(fs, root, run_id)
    identity = {"task": "test", "run": run_id}
    layout.start_attempt(protocol.fingerprint_of(identity), fresh=True)
    fs.makedirs(storage.join(layout.staging, LEDGER_DIR), exist_ok=True)
    for k, table in enumerate(pieces):
        name = f"part-{k:05d}.parquet"
        pq.write_table(table, storage.join(layout.staging, name), filesystem=fs)
        n = table.num_rows
        ledger = pa.table({"uri": table.column("uri"), "fingerprint": [""] * n,
                           "status": ["ok"] * n, "file": [name] * n}, schema=LEDGER_SCHEMA)
        pq.write_table(ledger, storage.join(layout.staging, LEDGER_DIR, name), filesystem=fs)
    layout.stage_manifest(dict(summary), identity, success=True)
    layout.publish()
    return output


@dataclass
class StageRun:
    """What `run_stages` produced: the listing, the output units, the writer's counts, and the
    rows and error rows it wrote (both sorted by uri)."""

    listing: Any
    units: tuple
    stats: Any
    rows: pa.Table
    errors: pa.Table
    output: str


def run_stages(cfg, output: str, *, runner_cls=None, after_listing=None) -> StageRun:
    """The job's stages in this process, without Ray, composed as extract/pipeline.py composes
    them: list_inputs -> listing_blocks -> ReadBytes -> Decode -> ModelRunner -> PartWriter
    (the write tasks' PartSink + the driver's CommitLog, in one process),
    into `output` (a local folder: part files, `_errors/`, side files).

    The numerics of the job live in these stages; Ray only moves batches between them (one Ray
    job per concern proves that, e.g. test_reference's job-equals-stages test). The units,
    model spec go through pickle as they would to Ray workers. `runner_cls`: a ModelRunner
    subclass (as `pipeline.run(runner_cls=...)`); `after_listing()`: called between listing and
    reading (e.g. to delete a listed file).
    """
    from resnet_features.core.models import resolve_model
    from resnet_features.extract.decode import Decode, DecodeOptions
    from resnet_features.extract.inference import InferenceOptions, ModelRunner
    from resnet_features.extract.inputs import InputSpec, ReadBytes, list_inputs, listing_blocks
    from resnet_features.extract.outputs import build_outputs
    from resnet_features.extract.writer import PartWriter, auto_rows_per_file

    spec, state = resolve_model(cfg.model, cfg.weights, preprocess_from=cfg.preprocess_from,
                                storage_options=cfg.storage_options,
                                weights_sha256=cfg.weights_sha256)
    units = build_outputs(cfg, spec)
    listing = list_inputs(cfg.input, InputSpec(
        format=cfg.input_format, image_column=cfg.image_column, id_column=cfg.id_column,
        uri_column=cfg.uri_column, keep_columns=cfg.keep_columns), cfg.storage_options)
    if after_listing is not None:
        after_listing()
    shipped_spec, shipped_units = pickle.loads(pickle.dumps((spec, units)))
    read = ReadBytes(cfg.storage_options, input_format=listing.format,
                     image_column=cfg.image_column)
    decode = Decode(shipped_spec.preprocessing, DecodeOptions(
        max_image_pixels=cfg.max_image_pixels or DecodeOptions().max_image_pixels,
        max_image_bytes=cfg.max_image_bytes, draft_factor=cfg.draft_factor,
        backend=cfg.decode_backend))
    runner = (runner_cls or ModelRunner)(shipped_spec, state,
                                         InferenceOptions(precision=cfg.precision),
                                         shipped_units)
    writer = PartWriter(output, units=units, n_inputs=listing.table.num_rows,
                        rows_per_file=cfg.rows_per_file or auto_rows_per_file(units),
                        file_metadata={"model": spec.name}, extra=listing.extra)
    batch_size = cfg.batch_size or 32
    for block in listing_blocks(listing, 8):
        batch = read({k: block.column(k).to_numpy(zero_copy_only=False)
                      for k in block.column_names})
        for start in range(0, len(batch["uri"]), cfg.decode_batch_size):
            decoded = decode({k: v[start:start + cfg.decode_batch_size]
                              for k, v in batch.items()})
            for b in range(0, len(decoded["uri"]), batch_size):
                writer.add(runner({k: v[b:b + batch_size] for k, v in decoded.items()}))
    assert not writer.log.missing_indices(), writer.log.missing_indices()
    writer.close()
    rows = pads.dataset(output, format="parquet", exclude_invalid_files=True,
                        ignore_prefixes=["_", "."]).to_table()
    errors_dir = os.path.join(output, "_errors")
    errors = (pads.dataset(errors_dir, format="parquet").to_table()
              if os.path.isdir(errors_dir) and os.listdir(errors_dir) else None)
    return StageRun(listing=listing, units=units, stats=writer.log,
                    rows=rows.sort_by("uri"),
                    errors=errors.sort_by("uri") if errors is not None else None,
                    output=output)


def fetch_listing(listing, **kw) -> dict:
    """A whole listing through the job's fetch stage (`ReadBytes`), as one batch."""
    from resnet_features.extract.inputs import ReadBytes

    t = listing.table
    batch = {k: t.column(k).to_numpy(zero_copy_only=False) for k in t.column_names}
    return ReadBytes(input_format=listing.format, **kw)(batch)
