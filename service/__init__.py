"""fxserve: intermediate features and embeddings of torchvision models over HTTP."""

__version__ = "0.1.0"
