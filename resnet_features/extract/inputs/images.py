"""Image files in a folder, prefix or glob: one listing row per file, fetched whole."""

from __future__ import annotations

from resnet_features.core import storage
from resnet_features.extract.inputs.common import (
    IMAGE_EXTENSIONS,
    Fetcher,
    Listed,
    check,
    extension,
    listing_table,
)


def list_image_files(fs, files, spec) -> Listed:
    uris, sizes, fingerprints, skipped = [], [], [], 0
    for path, size, fingerprint in files:
        if extension(path) not in IMAGE_EXTENSIONS:
            skipped += 1
            continue
        uris.append(storage.full_uri(fs, path))
        sizes.append(size)
        fingerprints.append(fingerprint)
    n = len(uris)
    return Listed(listing_table(uris, sizes, uris, [-1] * n, [-1] * n, fingerprints), None, skipped, {})


def read_objects(reader: Fetcher, fs, batch, sources, out, data) -> None:
    """Each row's `source` is the whole image: one GET per object, all in one `cat_ranges`."""
    paths = [fs._strip_protocol(s) for s in sources]
    results = reader.fetch(fs, paths)
    for i, value in enumerate(results):
        if check(out, i, value):
            data[i] = value
