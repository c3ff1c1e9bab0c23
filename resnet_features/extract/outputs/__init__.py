"""Optional outputs as column groups: the registry of output units, in column order.

Each unit (one module) declares its columns, what it needs from the forward pass, how it
computes and encodes its values, and its summary entry (`base.OutputUnit`). Adding an output is
one module and one entry in `UNITS`; the model runner, the writer and the summary loop over
the units built for a run (ARCHITECTURE.md, "Adding an output").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from resnet_features.core.errors import ConfigError
from resnet_features.extract.outputs.base import Forward, OutputUnit
from resnet_features.extract.outputs.embedding import Embedding
from resnet_features.extract.outputs.explain import ExplainOutput
from resnet_features.extract.outputs.explain_png import ExplainPng
from resnet_features.extract.outputs.grid import Grid
from resnet_features.extract.outputs.head import HeadOutput
from resnet_features.extract.outputs.layers import Layers
from resnet_features.extract.outputs.regions import Regions
from resnet_features.extract.outputs.topk import TopK

__all__ = ["UNITS", "Forward", "OutputUnit", "build_outputs", "for_task", "output_schema",
           "row_bytes", "units_metadata"]

#: Every output unit, in the order their columns appear in the output table.
UNITS: tuple[type, ...] = (Embedding, TopK, Layers, HeadOutput, ExplainOutput, ExplainPng, Grid,
                           Regions)

#: Columns every output row has, around the units' columns.
URI_FIELD = pa.field("uri", pa.string(), nullable=False)
SIZE_FIELDS = (pa.field("width", pa.int32()), pa.field("height", pa.int32()))


def build_outputs(cfg: Any, spec: Any) -> tuple[OutputUnit, ...]:
    """The units a run's config asks for (on the driver: a unit that needs a file, such as a
    head, loads and checks it here, before any work)."""
    units = tuple(u for u in (cls.from_config(cfg, spec) for cls in UNITS) if u is not None)
    if not any(u.fields() for u in units):
        raise ConfigError("nothing to compute: --task gives no output columns")
    return units


def for_task(spec: Any, task: str = "both", top_k: int = 5) -> tuple[OutputUnit, ...]:
    """The default units of a task (embed, classify, both): for tests, benchmarks and tools."""
    units = []
    if task in ("embed", "both"):
        units.append(Embedding(spec.embedding_dim))
    if task in ("classify", "both"):
        units.append(TopK(top_k, spec.categories))
    return tuple(units)


def output_schema(units: Sequence[OutputUnit], metadata: dict[str, str] | None = None,
                  carried: pa.Schema | None = None) -> pa.Schema:
    """The output table's schema: uri, the units' columns, width, height, then the input
    columns carried through (--id-column/--keep-columns), which must not clash."""
    fields = [URI_FIELD] + [f for u in units for f in u.fields()] + list(SIZE_FIELDS)
    names = {f.name for f in fields}
    if carried is not None:
        clash = sorted(names.intersection(carried.names))
        if clash:
            raise ConfigError(f"--keep-columns/--id-column {', '.join(clash)} would overwrite "
                              f"output columns of the same name; rename them in the input")
        fields += list(carried)
    return pa.schema(fields, metadata=metadata)


def units_metadata(units: Sequence[OutputUnit]) -> dict[str, Any]:
    """The units' entries for the summary and the files' metadata."""
    return {u.name: m for u in units if (m := u.metadata()) is not None}


def row_bytes(units: Sequence[OutputUnit]) -> int:
    """Stored bytes per output row, roughly (the uri and sizes: ~100)."""
    return 100 + sum(u.row_bytes() for u in units)
