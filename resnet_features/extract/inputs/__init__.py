"""Reading inputs: list images, tar members, Parquet rows or manifest entries (on the driver),
then fetch their bytes in batches (on the workers). One module per format holds both halves;
`formats.FORMATS` is the registry that `list_inputs` and `ReadBytes` dispatch through."""

from resnet_features.core.errors import InputError  # what listing raises, for its callers
from resnet_features.extract.inputs.common import (
    IMAGE_EXTENSIONS,
    InputSpec,
    Listing,
    detect_format,
)
from resnet_features.extract.inputs.fetch import ReadBytes
from resnet_features.extract.inputs.formats import FORMATS, INPUT_FORMATS
from resnet_features.extract.inputs.listing import (
    check_input_exists,
    list_images,
    list_inputs,
    listing_blocks,
    stages_listing,
)

__all__ = [
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "INPUT_FORMATS",
    "InputError",
    "InputSpec",
    "Listing",
    "ReadBytes",
    "check_input_exists",
    "detect_format",
    "list_images",
    "list_inputs",
    "listing_blocks",
    "stages_listing",
]
