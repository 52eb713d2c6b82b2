"""Datasets that ship inside installed packages (no download).

The framework-free loaders return ``TensorDataset`` splits for plain PyTorch loops; the
Lightning DataModules wrap them and are imported lazily so that ``import litcompress.data``
does not import Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from litcompress.data.datasets import DatasetSplits, load_digits_tensors, load_mnist_tensors

if TYPE_CHECKING:
    from litcompress.data.datamodules import DigitsDataModule, MNISTDataModule

__all__ = ["DatasetSplits", "DigitsDataModule", "MNISTDataModule", "load_digits_tensors", "load_mnist_tensors"]

_LIGHTNING_EXPORTS = ("DigitsDataModule", "MNISTDataModule")


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING_EXPORTS:
        from litcompress.data import datamodules

        return getattr(datamodules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
