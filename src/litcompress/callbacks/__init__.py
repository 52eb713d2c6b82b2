"""Lightning callbacks: thin adapters over the framework-free engines."""

from litcompress.callbacks.pruning import ModelPruning

__all__ = ["ModelPruning"]
