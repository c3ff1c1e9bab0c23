"""Test helpers: realistic test weights and the independent eager-torchvision reference."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from torchvision.models import get_model_builder, get_model_weights

from resnet_features.core.samples import PHOTO_NAMES, load_photo


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
    """Eager torchvision on PIL images with weights.transforms(): embeddings, top-k ids, probs.

    Independent of the job's code: torchvision's own transform pipeline, its own model forward
    with a hook on avgpool for the embedding.
    """
    entry = get_model_weights(model_name)[weights_entry]
    transform = entry.transforms()
    model = get_model_builder(model_name)(weights=None)
    model.load_state_dict(torch.load(state_dict_path, weights_only=True))
    model.eval()
    pooled = {}
    model.avgpool.register_forward_hook(lambda m, i, o: pooled.__setitem__("x", o))
    embs, ids, probs = [], [], []
    with torch.no_grad():
        for p in image_paths:
            with Image.open(p) as im:
                x = transform(im.convert("RGB")).unsqueeze(0)
            logits = model(x)
            pr = torch.softmax(logits, 1)
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
