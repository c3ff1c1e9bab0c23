"""resnet-features: batch extraction of ResNet classifications and embeddings with Ray Data."""

__version__ = "0.1.0"

__all__ = ["load_features"]


def __getattr__(name: str):
    # `from resnet_features import load_features` without importing torch/Ray up front.
    if name == "load_features":
        from resnet_features.runs.catalog import load_features

        return load_features
    raise AttributeError(name)
