"""torchvision's weights entries for the ResNet family, as a generated data file.

The driver needs from a weights entry only data: its URL (the torch hub file), its eval
preprocessing and its category names. Reading them from torchvision costs an `import
torchvision` (its `__init__` imports `torch._dynamo`: ~0.9 CPU-seconds more than torch), on the
driver's start-up path. `torchvision_weights.json` holds the same data, generated from the
installed torchvision by `python -m resnet_features.core.weights_table` and stamped with its
version: it is used only when that version is the one installed (otherwise the entries are read
from torchvision itself, as before), and tests/test_models.py checks it equals torchvision's.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import os
import sys
from typing import Any

from resnet_features.core.vocab import MODEL_NAMES

__all__ = ["TABLE_PATH", "generate", "installed_torchvision", "load"]

log = logging.getLogger(__name__)

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchvision_weights.json")


def installed_torchvision() -> str | None:
    """The installed torchvision's version, without importing it."""
    try:
        return importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def load() -> dict[str, Any] | None:
    """The table, or None when it was generated from another torchvision than the installed one
    (or is missing): then the entries come from torchvision."""
    try:
        with open(TABLE_PATH) as f:
            table = json.load(f)
    except (OSError, ValueError) as exc:
        log.info("weights entries read from torchvision (%s unreadable: %s)", TABLE_PATH, exc)
        return None
    if table.get("torchvision_version") != installed_torchvision():
        log.info("weights entries read from torchvision %s (%s is for %s; regenerate it with "
                 "`python -m resnet_features.core.weights_table` for a faster start)",
                 installed_torchvision(), os.path.basename(TABLE_PATH),
                 table.get("torchvision_version"))
        return None
    return table


def entry_data(weights: Any) -> dict[str, Any]:
    """A torchvision weights entry (a `WeightsEnum` member) as the table stores it: the one
    place an entry is read (`models.WeightsEntry.from_torchvision` builds on it too)."""
    t = weights.transforms()
    (resize,) = t.resize_size
    (crop,) = t.crop_size
    return {
        "url": weights.url,
        "preprocessing": {"resize_size": int(resize), "crop_size": int(crop),
                          "mean": [float(x) for x in t.mean], "std": [float(x) for x in t.std],
                          "interpolation": t.interpolation.value,
                          "antialias": bool(t.antialias)},
        "categories": list(weights.meta["categories"]),
    }


def generate() -> dict[str, Any]:
    """The table, read from the installed torchvision's weights enums (imports torchvision).
    Category lists are stored once and referred to by index (every entry has ImageNet's)."""
    from torchvision.models import get_model_weights

    categories: list[list[str]] = []
    models: dict[str, Any] = {}
    for model in MODEL_NAMES:
        enum = get_model_weights(model)
        entries = {}
        for weights in enum:
            data = entry_data(weights)
            if data["categories"] not in categories:
                categories.append(data["categories"])
            data["categories"] = categories.index(data["categories"])
            entries[weights.name] = data
        models[model] = {"enum": enum.__name__, "default": enum.DEFAULT.name, "entries": entries}
    return {"torchvision_version": installed_torchvision(), "models": models,
            "categories": categories}


def main() -> int:
    table = generate()
    with open(TABLE_PATH, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    print(f"wrote {TABLE_PATH} (torchvision {table['torchvision_version']}, "
          f"{sum(len(m['entries']) for m in table['models'].values())} entries)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
