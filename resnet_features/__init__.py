"""resnet-features: batch extraction of ResNet classifications and embeddings with Ray Data."""

__version__ = "0.1.0"
