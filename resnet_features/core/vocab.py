"""Names the command line validates against, kept free of torch/torchvision imports so that
parsing and `--help` stay fast; the modules that use them import them from here."""

from __future__ import annotations

__all__ = ["EXPLAIN_METHODS", "INPUT_FORMATS", "LAYER_NAMES", "MODEL_NAMES", "NAMED_WEIGHTS"]

#: The ResNet family this job serves. Names are torchvision's registry names.
MODEL_NAMES: tuple[str, ...] = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)

#: Weights names every model's torchvision enum understands (plus `ResNet50_Weights.X` forms).
NAMED_WEIGHTS: tuple[str, ...] = ("DEFAULT", "IMAGENET1K_V1", "IMAGENET1K_V2")

#: The ResNet stages whose outputs can be requested (--layers).
LAYER_NAMES: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")

#: Heatmap methods of --task explain.
EXPLAIN_METHODS: tuple[str, ...] = ("gradcam", "integrated_gradients", "smoothgrad", "lrp")

#: --input-format values (auto detects one of the others).
INPUT_FORMATS: tuple[str, ...] = ("auto", "images", "tar", "parquet", "manifest",
                                   "s3-inventory")
