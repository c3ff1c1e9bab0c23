"""Model specs: which ResNets exist, how their weights load, and the preprocessing that goes with them.

The torchvision weights entry *is* the spec: resize/crop sizes, mean/std, interpolation and the
category names are read from it, never copied by hand (through `weights_table`, its generated
copy for the installed torchvision, so the driver need not import torchvision). Weights are
resolved once, on the driver, so a missing file fails the job at start-up instead of in every
actor.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch

from resnet_features.core import storage, weights_table
from resnet_features.core.errors import WeightsError
from resnet_features.core.resnet import resnet
from resnet_features.core.vocab import MODEL_NAMES, NAMED_WEIGHTS

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

__all__ = [
    "MODEL_NAMES",
    "ModelSpec",
    "Preprocessing",
    "WeightsEntry",
    "WeightsError",
    "build_model",
    "load_state_dict",
    "resolve_model",
]

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Preprocessing:
    """The eval transform of a torchvision weights entry, as plain data that travels to workers."""

    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # a torchvision InterpolationMode value, e.g. "bilinear"
    antialias: bool
    source: str  # the weights entry it was read from, e.g. "ResNet50_Weights.IMAGENET1K_V2"

    @classmethod
    def from_weights(cls, weights: WeightsEnum) -> Preprocessing:
        return WeightsEntry.from_torchvision(weights).preprocessing

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelSpec:
    """Everything a worker needs to rebuild the model, minus the tensors (they travel separately)."""

    name: str
    weights: str  # what the user asked for: "IMAGENET1K_V2", "random" or a state_dict URI
    weights_id: str  # what was resolved: "ResNet50_Weights.IMAGENET1K_V2", "random", "sha256:<hex>"
    preprocessing: Preprocessing
    categories: tuple[str, ...]
    embedding_dim: int
    num_classes: int


@dataclass(frozen=True)
class WeightsEntry:
    """One torchvision weights entry as the driver uses it: where its file is, its eval
    preprocessing and its category names."""

    enum: str  # "ResNet50_Weights"
    name: str  # "IMAGENET1K_V2"
    url: str
    preprocessing: Preprocessing
    categories: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.enum}.{self.name}"

    @classmethod
    def from_torchvision(cls, weights: WeightsEnum) -> WeightsEntry:
        data = weights_table.entry_data(weights)
        return cls.from_data(type(weights).__name__, weights.name, data, data["categories"])

    @classmethod
    def from_data(cls, enum: str, name: str, data: dict[str, Any],
                  categories: list[str]) -> WeightsEntry:
        """From `weights_table.entry_data`'s form (a table row, its categories resolved)."""
        prep = data["preprocessing"]
        return cls(enum=enum, name=name, url=data["url"],
                   preprocessing=Preprocessing(**{**prep, "mean": tuple(prep["mean"]),
                                                  "std": tuple(prep["std"])},
                                               source=f"{enum}.{name}"),
                   categories=tuple(categories))


def _weights_enum(model: str) -> type[WeightsEnum]:
    # torchvision (its __init__ imports torch._dynamo, ~0.9 s of CPU more than torch) only
    # where weights entries are read from it: on the driver, when weights_table does not match
    # the installed torchvision. Workers build the model from core/resnet.py.
    from torchvision.models import get_model_weights

    return get_model_weights(model)


def _model_entries(model: str) -> tuple[str, str, dict[str, WeightsEntry]]:
    """(enum name, DEFAULT's name, entries by name) of a model, from the generated table when
    it matches the installed torchvision, else from torchvision."""
    if model not in MODEL_NAMES:
        raise WeightsError(f"unknown model {model!r}; choose one of: {', '.join(MODEL_NAMES)}")
    table = weights_table.load()
    if table is None:
        enum = _weights_enum(model)
        return (enum.__name__, enum.DEFAULT.name,
                {w.name: WeightsEntry.from_torchvision(w) for w in enum})
    row = table["models"][model]
    entries = {name: WeightsEntry.from_data(row["enum"], name, data,
                                            table["categories"][data["categories"]])
               for name, data in row["entries"].items()}
    return row["enum"], row["default"], entries


def named_weights(model: str, name: str) -> WeightsEntry:
    """`DEFAULT`/`IMAGENET1K_V1`/... or a full `ResNet50_Weights.IMAGENET1K_V2` for this model."""
    enum, default, entries = _model_entries(model)
    short = name.split(".", 1)[1] if name.startswith(enum + ".") else name
    entry = entries.get(default if short == "DEFAULT" else short)
    if entry is None:
        raise WeightsError(
            f"{model} has no weights {name!r}; available: DEFAULT, " + ", ".join(entries))
    return entry


def is_named_weights(weights: str) -> bool:
    return weights in NAMED_WEIGHTS or "_Weights." in weights


def hub_checkpoint_path(weights: WeightsEntry) -> str:
    """Where torch.hub keeps (or would keep) this weights file."""
    filename = os.path.basename(urlparse(weights.url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def _load_named(weights: WeightsEntry) -> dict[str, torch.Tensor]:
    path = hub_checkpoint_path(weights)
    try:
        # What torchvision's `WeightsEnum.get_state_dict` calls: reads the hub cache, downloads
        # when missing, checks the hash in the file name; tensors only (`weights_only`, which
        # torch.hub leaves off by default), as for a state_dict file.
        return torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True,
                                                  map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused something in the file
        raise WeightsError(f"weights {weights.id}: {path} does not load with weights_only=True: "
                           f"{exc}") from exc
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; hash mismatch a RuntimeError
        raise WeightsError(
            f"weights {weights.id} are not in the torch hub cache and "
            f"could not be downloaded ({type(exc).__name__}: {exc}). Missing file: "
            f"{os.path.basename(path)}, expected at {path}. Provide it by downloading "
            f"{weights.url} on a machine with internet access and copying it there (or set "
            f"TORCH_HOME to a folder whose hub/checkpoints/ holds it), or pass "
            f"--weights /path/or/s3/uri/to/state_dict.pth"
        ) from exc


def load_state_dict(
    uri: str, storage_options: dict[str, Any] | None = None, sha256: str | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """Load a state_dict file from a path or fsspec URI with `weights_only=True`.

    Returns the tensors and the file's sha256, which identifies the weights in the output.
    """
    try:
        data = storage.read_bytes(uri, storage_options)
    except (OSError, ValueError) as exc:
        hint = ""
        if not any(c in uri for c in "/.\\"):  # a bare word: more likely a mistyped weights name
            hint = (f"; named weights are {', '.join(NAMED_WEIGHTS)} or a full name such as "
                    f"ResNet50_Weights.IMAGENET1K_V2")
        raise WeightsError(f"cannot read state_dict {uri}: {type(exc).__name__}: {exc}{hint}"
                           ) from exc
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256.lower():
        raise WeightsError(f"state_dict {uri} has sha256 {digest}, expected {sha256}")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise WeightsError(
            f"cannot load state_dict {uri} with weights_only=True: {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{uri} does not hold a state_dict (a dict of tensors)")
    return obj, digest


def build_model(spec: ModelSpec, state_dict: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    """Build the eval-mode model and load the tensors; `None` is allowed only for random weights."""
    if state_dict is None and spec.weights_id != "random":
        raise WeightsError(f"no tensors for weights {spec.weights_id}")
    if state_dict is None:
        return resnet(spec.name, num_classes=spec.num_classes).eval()
    model = _uninitialised_model(spec.name, spec.num_classes)
    _load_into(model, spec.name, state_dict)
    return model.eval()


def _uninitialised_model(name: str, num_classes: int) -> torch.nn.Module:
    """The architecture with allocated but unset parameters, for a strict load to fill.

    Random initialisation costs ~0.3 s of CPU for ResNet-50 (a CPU model actor's start-up sits
    on the job's critical path) and is overwritten at once. `strict=True` loading then sets
    every parameter and persistent buffer; a model with non-persistent buffers (which no
    state_dict carries) is built normally instead.
    """
    model = _meta_model(name, num_classes)
    if any(m._non_persistent_buffers_set for m in model.modules()):
        return resnet(name, num_classes=num_classes)
    return model.to_empty(device="cpu")


def _meta_model(name: str, num_classes: int) -> torch.nn.Module:
    """The architecture on the meta device: shapes only, no memory, no initialisation."""
    with torch.device("meta"):
        return resnet(name, num_classes=num_classes)


def _load_into(model: torch.nn.Module, name: str, state_dict: dict[str, torch.Tensor],
               assign: bool = False) -> None:
    try:
        model.load_state_dict(state_dict, strict=True, assign=assign)
    except RuntimeError as exc:
        raise WeightsError(f"state_dict does not fit {name}: {str(exc).splitlines()[0]}") from exc


def resolve_model(
    model: str,
    weights: str,
    *,
    preprocess_from: str | None = None,
    storage_options: dict[str, Any] | None = None,
    weights_sha256: str | None = None,
) -> tuple[ModelSpec, dict[str, torch.Tensor] | None]:
    """Resolve the CLI's model and weights into a spec plus the tensors (None for `random`).

    Named weights bring their own preprocessing and categories; a state_dict or `random` takes
    them from the model's DEFAULT entry unless `preprocess_from` names another entry.
    """
    if is_named_weights(weights):
        entry = named_weights(model, weights)
        state_dict = _load_named(entry)
        weights_id = entry.id
        if weights_sha256 is not None:
            raise WeightsError("--weights-sha256 applies to a state_dict file, not to named weights")
    else:
        entry = named_weights(model, preprocess_from or "DEFAULT")
        if weights == "random":
            log.warning(
                "using RANDOM weights for %s (asked for with --weights random): features and "
                "labels are meaningless; use this for smoke tests only",
                model,
            )
            state_dict, weights_id = None, "random"
        else:
            state_dict, digest = load_state_dict(weights, storage_options, weights_sha256)
            weights_id = f"sha256:{digest}"
    categories = entry.categories
    probe = _meta_model(model, len(categories))  # for the dimensions and the fit check below
    spec = ModelSpec(
        name=model,
        weights=weights,
        weights_id=weights_id,
        preprocessing=entry.preprocessing,
        categories=categories,
        embedding_dim=int(probe.fc.in_features),
        num_classes=len(categories),
    )
    if state_dict is not None:
        # fail on the driver, not in every actor (assign: the meta probe holds no memory)
        _load_into(probe, model, state_dict, assign=True)
    return spec, state_dict

