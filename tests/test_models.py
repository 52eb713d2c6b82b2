"""The built-in classifiers: shapes, validation, and checkpoints that rebuild them."""

from __future__ import annotations

import re

import lightning as L
import numpy as np
import pytest
import torch

from litcompress.models import (CNNClassifier, DenseNetClassifier, GatedTransformerClassifier, LSTMClassifier,
                                MLPClassifier, MobileNetClassifier, ResNetClassifier, ResNeXtClassifier,
                                TransformerClassifier)


@pytest.mark.parametrize(("model", "inputs"), [
    (MLPClassifier(in_features=12, hidden=(7, 5), num_classes=4), torch.rand(3, 12)),
    (CNNClassifier(in_channels=2, image_size=9, channels=(3, 6, 4), num_classes=4), torch.rand(3, 2, 9, 9)),
    (ResNetClassifier(in_channels=2, width=6, blocks=3, num_classes=4), torch.rand(3, 2, 9, 9)),
    (ResNeXtClassifier(in_channels=2, channels=6, width=12, groups=4, blocks=2, num_classes=4), torch.rand(3, 2, 9, 9)),
    (ResNeXtClassifier(image_size=28, num_classes=4), torch.rand(3, 1, 28, 28)),
    (MobileNetClassifier(in_channels=2, width=6, blocks=3, expansion=2, num_classes=4), torch.rand(3, 2, 9, 9)),
    (MobileNetClassifier(in_channels=1, image_size=28, num_classes=4), torch.rand(3, 1, 28, 28)),
    (MobileNetClassifier(width=4, blocks=1, squeeze_excitation=True, num_classes=4), torch.rand(3, 1, 8, 8)),
    (TransformerClassifier(in_channels=2, image_size=9, d_model=8, heads=2, layers=1, feed_forward=16,
                           num_classes=4), torch.rand(3, 2, 9, 9)),
    (GatedTransformerClassifier(in_channels=2, image_size=9, d_model=8, heads=2, layers=1, feed_forward=16,
                                activation="gelu", num_classes=4), torch.rand(3, 2, 9, 9)),
    (DenseNetClassifier(in_channels=2, image_size=9, stem=6, growth=3, layers=2, blocks=3, num_classes=4),
     torch.rand(3, 2, 9, 9)),
    (DenseNetClassifier(image_size=28, blocks=3, num_classes=4), torch.rand(3, 1, 28, 28)),
    (LSTMClassifier(in_channels=2, image_size=9, hidden=8, layers=2, num_classes=4), torch.rand(3, 2, 9, 9)),
])
def test_logits_have_one_column_per_class_and_checkpoints_rebuild_the_model(model, inputs, tmp_path):
    assert model(inputs).shape == (3, 4)
    if isinstance(model, (MobileNetClassifier, DenseNetClassifier, ResNeXtClassifier)):  # stride follows image size
        stem = model.net.stem if isinstance(model, DenseNetClassifier) else model.net[0]
        assert stem.stride == ((2, 2) if inputs.shape[-1] >= 16 else (1, 1))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        max_epochs=0)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    again = type(model).load_from_checkpoint(tmp_path / "m.ckpt", map_location="cpu")
    torch.testing.assert_close(again(inputs), model(inputs))


@pytest.mark.parametrize(("build", "match"), [
    (lambda: MLPClassifier(hidden=()), "hidden=\\(\\)"),
    (lambda: MLPClassifier(hidden=(8, 0)), "positive ints"),
    (lambda: MLPClassifier(lr=0), "lr=0"),
    (lambda: MLPClassifier(weight_decay=-1), "weight_decay=-1"),
    (lambda: CNNClassifier(image_size=8, channels=(4, 4, 4, 4)), "too small for 4 unpadded"),
    (lambda: ResNetClassifier(width=0), "width=0: expected an int >= 1"),
    (lambda: ResNetClassifier(blocks=-1), "blocks=-1: expected an int >= 1"),
    (lambda: MobileNetClassifier(expansion=0), "expansion=0: expected an int >= 1"),
    (lambda: MobileNetClassifier(stem_stride=0), "stem_stride=0: expected an int >= 1"),
    (lambda: TransformerClassifier(d_model=30, heads=4), "d_model=30 must be divisible by heads=4"),
    (lambda: GatedTransformerClassifier(d_model=30, heads=4), "d_model=30 must be divisible by heads=4"),
    (lambda: GatedTransformerClassifier(activation="tanh"), "activation='tanh': expected one of"),
    (lambda: GatedTransformerClassifier(feed_forward=0), "feed_forward=0: expected an int >= 1"),
    (lambda: DenseNetClassifier(growth=0), "growth=0: expected an int >= 1"),
    (lambda: DenseNetClassifier(image_size=4, blocks=4), "image_size=4 is too small for 4 blocks"),
    (lambda: DenseNetClassifier(image_size=16, blocks=5), "after a stride-2 stem"),
    (lambda: LSTMClassifier(hidden=0), "hidden=0: expected an int >= 1"),
    (lambda: ResNeXtClassifier(width=20, groups=8), "width=20 is not a multiple of groups=8"),
    (lambda: ResNeXtClassifier(groups=0), "groups=0: expected an int >= 1"),
    # these built and failed inside the first training step (or, image_size, were accepted unused)
    (lambda: MLPClassifier(num_classes=1), "num_classes=1: expected an int >= 2"),
    (lambda: MLPClassifier(in_features=0), "in_features=0: expected an int >= 1"),
    (lambda: CNNClassifier(in_channels=0), "in_channels=0"),
    (lambda: ResNetClassifier(image_size=-5), "image_size=-5"),
    (lambda: LSTMClassifier(num_classes=2.5), "num_classes=2.5"),
    (lambda: MLPClassifier(lr="1e-3"), "lr='1e-3': expected a finite learning rate > 0"),
    # trained NaNs from the first step
    (lambda: MLPClassifier(lr=float("inf")), "lr=inf: expected a finite learning rate > 0"),
    (lambda: MLPClassifier(weight_decay=float("inf")), "weight_decay=inf: expected a finite number >= 0"),
    # numpy's float64 (a float) trained, and then no checkpoint of the fit loaded (weights_only refuses numpy's
    # numbers); its float32 and int64 were refused in words that their values met
    (lambda: MLPClassifier(lr=np.float64(0.01)), re.escape("lr=np.float64(0.01): expected a finite learning rate > 0, "
                                                           "e.g. 1e-3 (numpy.float64: pass float(...)")),
    (lambda: MLPClassifier(hidden=(np.int64(12),)), re.escape("(numpy.int64: pass int(...)")),
    (lambda: ResNetClassifier(blocks=np.int64(2)), re.escape("blocks=np.int64(2): expected an int >= 1, e.g. blocks=2 "
                                                             "(numpy.int64: pass int(...)")),
])
def test_bad_sizes_fail_at_construction(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_flags_and_choices_of_other_types_are_refused_in_words():
    """`squeeze_excitation="no"` (truthy) built the gates; a list of activations failed as unhashable."""
    with pytest.raises(TypeError, match="squeeze_excitation='no': expected True or False"):
        MobileNetClassifier(squeeze_excitation="no")
    with pytest.raises(ValueError, match=re.escape("activation=['silu']: expected one of")):
        GatedTransformerClassifier(activation=["silu"])
