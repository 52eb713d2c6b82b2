"""litcompress: model compression for PyTorch and Lightning."""

__version__ = "0.1.0"
