"""The registry of input formats: a new format is one module and one entry here."""

from __future__ import annotations

from resnet_features.extract.inputs import images, inventory, manifest, parquet, tar
from resnet_features.extract.inputs.common import Format

__all__ = ["FORMATS", "INPUT_FORMATS"]

#: Format name (--input-format) -> how to list it and fetch it. Listing and `ReadBytes` look
#: formats up here only; detection by name (`detect_format`) lives in `common`.
FORMATS: dict[str, Format] = {
    "images": Format(list=images.list_image_files, read=images.read_objects),
    "tar": Format(list=tar.list_tar, read=tar.read_tar, units=tar.tar_units),
    "parquet": Format(list=parquet.list_parquet, read=parquet.read_parquet,
                      units=parquet.parquet_units, sized_by_read=True,
                      options=frozenset({"image_column", "id_column", "keep_columns", "where"})),
    # A manifest entry is a whole object, fetched as an image file is.
    "manifest": Format(list=manifest.list_manifest, read=images.read_objects, sized_by_read=True,
                       options=frozenset({"uri_column", "keep_columns", "where"})),
    # So is an object an inventory report lists; the report gives its size.
    "s3-inventory": Format(list=inventory.list_inventory, read=images.read_objects,
                           options=frozenset({"keep_columns", "where"})),
}

INPUT_FORMATS: tuple[str, ...] = ("auto", *FORMATS)
