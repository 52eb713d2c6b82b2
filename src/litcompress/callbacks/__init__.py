"""Lightning callbacks: thin adapters over the framework-free engines."""

from litcompress.callbacks.pruning import ModelPruning, load_pruned_checkpoint

__all__ = ["ModelPruning", "load_pruned_checkpoint"]
