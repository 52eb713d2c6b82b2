"""`litcompress.ModelPruning` behaves like Lightning's callback wherever Lightning's is not defective.

Each test runs against both classes, so a divergence shows up as a failure of one of them.
"""

from __future__ import annotations

import inspect
import re
from logging import INFO

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks import ModelPruning as LightningModelPruning
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from litcompress import ModelPruning
from tests.conftest import ThreeLayerModel, make_trainer, skip_lightnings_callback_before

BOTH = pytest.mark.parametrize("cls", [LightningModelPruning, ModelPruning], ids=["lightning", "litcompress"])


class EveryOtherEntry(torch_prune.BasePruningMethod):
    """A custom unstructured method: prunes every other entry."""

    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        mask = default_mask.clone()
        mask.view(-1)[::2] = 0
        return mask

    @classmethod
    def apply(cls, module, name, amount):
        return super().apply(module, name, amount=amount)


def test_constructor_signature_matches_lightning():
    """Lightning's parameters, in order, with the same defaults; ours add keyword-only ones after them."""
    ours = list(inspect.signature(ModelPruning.__init__).parameters.values())
    theirs = list(inspect.signature(LightningModelPruning.__init__).parameters.values())
    assert [(p.name, p.default, p.kind) for p in ours[: len(theirs)]] == [(p.name, p.default, p.kind) for p in theirs]
    assert all(p.kind is p.KEYWORD_ONLY for p in ours[len(theirs):])


def test_override_points_exist():
    for name in ("filter_parameters_to_prune", "apply_pruning", "apply_lottery_ticket_hypothesis",
                 "make_pruning_permanent", "sanitize_parameters_to_prune", "_is_pruning_method"):
        assert callable(getattr(ModelPruning, name)), name
    assert isinstance(inspect.getattr_static(ModelPruning, "sanitize_parameters_to_prune"), staticmethod)


@BOTH
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(pruning_fn="l1_unstructured", parameter_names=["chocolate"]), r"chocolate isn't in \('weight', 'bias'\)"),
        (dict(pruning_fn={}), r"expected to be a str in \["),
        (dict(pruning_fn="l2_unstructured"), r"isn't available in PyTorch's built-in functions"),
        (dict(pruning_fn="random_structured"), "should be provided"),
        (dict(pruning_fn="l1_unstructured", verbose=3), r"must be any of \(0, 1, 2\)"),
        (dict(pruning_fn="ln_structured", pruning_dim=0), "requesting `ln_structured` pruning, the `pruning_norm`"),
        (dict(pruning_fn="ln_structured", pruning_dim=0, pruning_norm=1), "is supported with `use_global_unstructured=True`"),
        # (litcompress asked for pruning_dim and pruning_norm first, and then refused them)
        (dict(pruning_fn=torch_prune.LnStructured), "is supported with `use_global_unstructured=True`"),
        (dict(pruning_fn="l1_unstructured", amount="half"), "`amount` should be provided"),
    ],
)
def test_misconfiguration_messages(cls, kwargs, message):
    with pytest.raises(MisconfigurationException, match=message):
        cls(**kwargs)


@BOTH
@pytest.mark.parametrize("use_global_unstructured", [False, True])
@pytest.mark.parametrize("pruning_fn", ["l1_unstructured", "random_unstructured", "ln_structured", "random_structured"])
@pytest.mark.parametrize("use_lottery_ticket_hypothesis", [False, True])
def test_pruning_matrix_trains_and_prunes(tmp_path, cls, use_global_unstructured, pruning_fn, use_lottery_ticket_hypothesis):
    seed_everything(1)
    model = ThreeLayerModel()
    kwargs = dict(pruning_fn=pruning_fn, amount=0.3, use_global_unstructured=use_global_unstructured,
                  use_lottery_ticket_hypothesis=use_lottery_ticket_hypothesis, verbose=1,
                  parameters_to_prune=[(model.layer.mlp_1, "weight"), (model.layer.mlp_2, "weight")])
    if pruning_fn.endswith("_structured"):
        kwargs["pruning_dim"] = 0
        if pruning_fn == "ln_structured":
            kwargs["pruning_norm"] = 1
        if use_global_unstructured:
            with pytest.raises(MisconfigurationException, match="is supported with `use_global_unstructured=True`"):
                cls(**kwargs)
            return
    trainer = make_trainer(tmp_path, callbacks=cls(**kwargs), max_epochs=3)
    trainer.fit(model)
    # made permanent at the end of training, zeros kept
    assert not hasattr(model.layer.mlp_2, "weight_orig")
    zeros = int((model.layer.mlp_2.weight == 0).sum())
    assert zeros > 0
    if pruning_fn.endswith("_structured"):
        assert zeros % 32 == 0  # whole rows


@BOTH
def test_global_pruning_amount_is_relative_to_remaining(tmp_path, cls):
    """Each round prunes `amount` of the weights that remain: 1 - 0.5**3 after three rounds."""
    model = ThreeLayerModel()
    targets = [(model.layer.mlp_1, "weight"), (model.layer.mlp_2, "weight")]
    callback = cls("l1_unstructured", parameters_to_prune=targets, amount=0.5, use_lottery_ticket_hypothesis=False)
    make_trainer(tmp_path, callbacks=callback, max_epochs=3).fit(model)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in targets)
    remaining = 2048
    for _ in range(3):
        remaining -= round(0.5 * remaining)
    assert zeros == 2048 - remaining


@BOTH
def test_int_amount_prunes_that_many_each_round(tmp_path, cls):
    model = ThreeLayerModel()
    targets = [(model.layer.mlp_3, "weight")]
    callback = cls("l1_unstructured", parameters_to_prune=targets, amount=5, use_global_unstructured=False,
                   use_lottery_ticket_hypothesis=False)
    make_trainer(tmp_path, callbacks=callback, max_epochs=3).fit(model)
    assert int((model.layer.mlp_3.weight == 0).sum()) == 15


@BOTH
@pytest.mark.parametrize("resample_parameters", [False, True])
def test_lottery_ticket_callable_resets_on_odd_epochs(tmp_path, cls, resample_parameters):
    skip_lightnings_callback_before(cls, "2.6", "its lottery-ticket reset wrote into the computed weight")
    model = ThreeLayerModel()

    class Counting(cls):
        calls = 0

        def apply_lottery_ticket_hypothesis(self):
            super().apply_lottery_ticket_hypothesis()
            self.calls += 1
            for layer in self._original_layers.values():
                for i, name in layer["names"]:
                    module, current_name = self._parameters_to_prune[i]
                    assert name == current_name
                    actual = getattr(module, name + "_orig", getattr(module, name)).data.cpu()
                    same = torch.allclose(actual, getattr(layer["data"], name).data.cpu())
                    assert same != self._resample_parameters

    callback = Counting("l1_unstructured", use_lottery_ticket_hypothesis=lambda e: bool(e % 2),
                        resample_parameters=resample_parameters)
    make_trainer(tmp_path, callbacks=callback, max_epochs=5).fit(model)
    assert callback.calls == 2


PERCENT = r"\(\d+(?:\.\d+)?%\)"


@BOTH
@pytest.mark.parametrize("make_pruning_permanent", [False, True])
def test_verbose_log_lines(tmp_path, caplog, cls, make_pruning_permanent):
    skip_lightnings_callback_before(cls, "2.6", "its log lines counted every parameter of a layer")
    model = ThreeLayerModel()
    kwargs = dict(parameters_to_prune=[(model.layer.mlp_1, "weight"), (model.layer.mlp_3, "weight")], verbose=2,
                  make_pruning_permanent=make_pruning_permanent)
    p1 = cls("l1_unstructured", amount=0.5, apply_pruning=lambda e: not e % 2, **kwargs)
    p2 = cls("random_unstructured", amount=0.25, apply_pruning=lambda e: e % 2, **kwargs)
    with caplog.at_level(INFO):
        make_trainer(tmp_path, callbacks=[p1, p2], max_epochs=3).fit(model)
    lines = [m.strip() for m in caplog.messages if m.startswith("Applied")]
    l1_32 = r"`Linear\(in_features=32, out_features=32, bias=True\).weight`"
    l1_2 = r"`Linear\(in_features=32, out_features=2, bias=True\).weight`"
    expected = [
        rf"Applied `L1Unstructured`. Pruned: 0\/1088 {PERCENT} -> 544\/1088 {PERCENT}$",
        rf"Applied `L1Unstructured` to {l1_32} with amount=0.5. Pruned: 0 \(0.00%\) -> \d+ {PERCENT}$",
        rf"Applied `L1Unstructured` to {l1_2} with amount=0.5. Pruned: 0 \(0.00%\) -> \d+ {PERCENT}$",
        rf"Applied `RandomUnstructured`. Pruned: 544\/1088 {PERCENT} -> 680\/1088 {PERCENT}$",
        rf"Applied `RandomUnstructured` to {l1_32} with amount=0.25. Pruned: \d+ {PERCENT} -> \d+ {PERCENT}$",
        rf"Applied `RandomUnstructured` to {l1_2} with amount=0.25. Pruned: \d+ {PERCENT} -> \d+ {PERCENT}$",
        rf"Applied `L1Unstructured`. Pruned: 680\/1088 {PERCENT} -> 884\/1088 {PERCENT}$",
        rf"Applied `L1Unstructured` to {l1_32} with amount=0.5. Pruned: \d+ {PERCENT} -> \d+ {PERCENT}$",
        rf"Applied `L1Unstructured` to {l1_2} with amount=0.5. Pruned: \d+ {PERCENT} -> \d+ {PERCENT}$",
    ]
    assert len(lines) == len(expected)
    for line, pattern in zip(lines, expected):
        assert re.match(pattern, line), (line, pattern)
    assert hasattr(model.layer.mlp_1, "weight_orig") != make_pruning_permanent


class PaddedEmbeddingModel(ThreeLayerModel):
    """Tokens through an embedding whose padding row is zero and stays zero (it gets no gradient), then the layers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 32, padding_idx=0)

    def forward(self, x):
        return self.layer(self.embed((x.abs() * 10).long().clamp(max=9)).mean(1))


@BOTH
def test_log_lines_count_masked_entries_not_weights_that_are_zero(tmp_path, caplog, cls):
    """'Pruned:' counts entries the masks prune: the padding row's 32 zeros are no pruning before the first round
    (litcompress said 'Pruned: 32/2432 (1.32%)' there, Lightning '0/2432')."""
    skip_lightnings_callback_before(cls, "2.6", "its log lines counted every parameter of a layer")
    model = PaddedEmbeddingModel()
    callback = cls("l1_unstructured", amount=0.25, parameter_names=["weight"], verbose=2)
    with caplog.at_level(INFO):
        make_trainer(tmp_path, callbacks=callback, max_epochs=1).fit(model)
    lines = [m for m in caplog.messages if m.startswith("Applied")]
    assert lines[0] == "Applied `L1Unstructured`. Pruned: 0/2432 (0.00%) -> 608/2432 (25.00%)"
    embedding = [line for line in lines if "`Embedding(10, 32, padding_idx=0).weight`" in line]
    assert len(embedding) == 1 and " with amount=0.25. Pruned: 0 (0.00%) -> " in embedding[0]


@BOTH
def test_local_mode_logs_the_function_name(tmp_path, caplog, cls):
    skip_lightnings_callback_before(cls, "2.6", "its log lines counted every parameter of a layer")
    model = ThreeLayerModel()
    callback = cls("l1_unstructured", parameters_to_prune=[(model.layer.mlp_3, "weight")], amount=0.5,
                   use_global_unstructured=False, verbose=1)
    with caplog.at_level(INFO):
        make_trainer(tmp_path, callbacks=callback, max_epochs=1).fit(model)
    assert [m for m in caplog.messages if m.startswith("Applied")] == [
        "Applied `l1_unstructured`. Pruned: 0/64 (0.00%) -> 32/64 (50.00%)"
    ]


@BOTH
@pytest.mark.parametrize("prune_on_train_epoch_end", [False, True])
def test_saved_checkpoints_are_permanent_and_training_keeps_masks(tmp_path, cls, prune_on_train_epoch_end):
    seen = []

    class Checking(cls):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            had_masks = hasattr(pl_module.layer.mlp_3, "weight_orig")
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
            assert "layer.mlp_3.weight_orig" not in checkpoint["state_dict"]
            assert "layer.mlp_3.weight" in checkpoint["state_dict"]
            if had_masks:
                assert hasattr(pl_module.layer.mlp_3, "weight_orig")
            seen.append(had_masks)

    model = ThreeLayerModel()
    callback = Checking("random_unstructured", parameters_to_prune=[(model.layer.mlp_3, "weight")],
                        prune_on_train_epoch_end=prune_on_train_epoch_end)
    checkpoint = ModelCheckpoint(monitor="test", save_top_k=2, save_last=True, save_on_train_epoch_end=False)
    trainer = make_trainer(tmp_path, callbacks=[callback, checkpoint], enable_checkpointing=True, max_epochs=3)
    trainer.fit(model)
    assert any(seen)
    assert not hasattr(model.layer.mlp_3, "weight_orig")
    for path in (checkpoint.kth_best_model_path, checkpoint.last_model_path):
        loaded = ThreeLayerModel.load_from_checkpoint(path)
        assert not hasattr(loaded.layer.mlp_3, "weight_orig")


@BOTH
def test_sanitize_keeps_only_parameters(cls):
    skip_lightnings_callback_before(cls, "2.5.2", "it kept attributes that are no nn.Parameter")
    model = ThreeLayerModel()
    model.layer.mlp_1.some_flag = True
    model.layer.mlp_1.some_tensor = torch.randn(3)
    found = cls.sanitize_parameters_to_prune(
        model, parameters_to_prune=(), parameter_names=["weight", "bias", "some_flag", "some_tensor", "training"]
    )
    assert {name for _, name in found} == {"weight", "bias"}
    assert len(found) == 3 + 2  # three weights, two biases
    with pytest.raises(MisconfigurationException, match="don't exist in the model"):
        cls.sanitize_parameters_to_prune(model, [(torch.nn.Linear(1, 1), "weight")])


@BOTH
def test_custom_method_in_global_mode(tmp_path, cls):
    model = ThreeLayerModel()
    callback = cls(EveryOtherEntry, parameters_to_prune=[(model.layer.mlp_2, "weight")], amount=0.5,
                   use_lottery_ticket_hypothesis=False)
    make_trainer(tmp_path, callbacks=callback, max_epochs=1).fit(model)
    assert torch.all(model.layer.mlp_2.weight.view(-1)[::2] == 0)
    assert torch.all(model.layer.mlp_2.weight.view(-1)[1::2] != 0)


@pytest.mark.parametrize("norm", [0, -1, float("-inf"), "fro"])
def test_ln_structured_ranks_by_every_norm_torch_takes_as_lightning_does(tmp_path, norm):
    """torch's ln_structured takes any p-norm (0 counts the non-zeros, -inf the smallest magnitude) and 'fro'; both
    callbacks prune with it, to the same masks."""
    masks = []
    for cls in (LightningModelPruning, ModelPruning):
        seed_everything(3)
        model = ThreeLayerModel()
        callback = cls("ln_structured", amount=0.25, pruning_dim=0, pruning_norm=norm, use_global_unstructured=False,
                       make_pruning_permanent=False, use_lottery_ticket_hypothesis=False,
                       parameters_to_prune=[(model.layer.mlp_2, "weight")])
        make_trainer(tmp_path, callbacks=callback, max_epochs=2).fit(model)
        masks.append(model.layer.mlp_2.weight_mask.clone())
    assert torch.equal(masks[0], masks[1])
    assert int((masks[1].sum(dim=1) == 0).sum()) == 8 + 6  # whole rows: 25% of 32, then 25% of the 24 left


@pytest.mark.parametrize("differ_in", ["targets", "amounts"])
def test_two_callbacks_in_one_trainer_run_as_lightnings(tmp_path, differ_in):
    """Lightning's callback keeps no state, so a Trainer may hold several (one per layer group, or per schedule).
    Ours keep theirs under keys that tell them apart, so the same list runs, with Lightning's result."""
    zeros = []
    for cls in (LightningModelPruning, ModelPruning):
        seed_everything(0)
        model = ThreeLayerModel()
        common = dict(use_lottery_ticket_hypothesis=False, use_global_unstructured=False)
        if differ_in == "targets":
            callbacks = [cls("l1_unstructured", amount=0.5, parameters_to_prune=[(model.layer.mlp_1, "weight")],
                             apply_pruning=lambda epoch: epoch % 2 == 0, **common),
                         cls("l1_unstructured", amount=0.5, parameters_to_prune=[(model.layer.mlp_3, "weight")],
                             apply_pruning=lambda epoch: epoch % 2 == 1, **common)]
        else:
            callbacks = [cls("l1_unstructured", amount=lambda epoch: 0.5 if epoch == 0 else 0.0, **common),
                         cls("l1_unstructured", amount=lambda epoch: 0.25 if epoch == 1 else 0.0, **common)]
        make_trainer(tmp_path, callbacks=callbacks, max_epochs=3).fit(model)
        zeros.append([int((layer.weight == 0).sum()) for layer in model.layer])
    assert zeros[0] == zeros[1]
    if differ_in == "targets":  # mlp_1 pruned at epochs 0 and 2, mlp_3 at epoch 1
        assert zeros[1] == [1024 - 256, 0, 32]
    else:  # every layer: 50%, then 25% of the rest
        assert zeros[1] == [512 + 128, 512 + 128, 32 + 8]


def _with_own_pruning_fn(cls):
    class FirstEntries(cls):
        """Overrides `_create_pruning_fn`, as Lightning's callback lets a subclass do: its function prunes."""

        calls = 0

        def _create_pruning_fn(self, pruning_fn, **kwargs):
            if self._use_global_unstructured:
                return EveryOtherEntry

            def first_entries(module, name, amount):
                type(self).calls += 1
                mask = torch.ones_like(getattr(module, name))
                mask.view(-1)[: int(amount * mask.numel())] = 0
                return torch_prune.custom_from_mask(module, name, mask)

            return first_entries

    return FirstEntries


@BOTH
@pytest.mark.parametrize("use_global_unstructured", [False, True])
def test_a_subclass_creating_its_own_pruning_fn_prunes_with_it(tmp_path, cls, use_global_unstructured):
    """litcompress pruned with the method named, never calling the subclass's function."""
    model = ThreeLayerModel()
    callback = _with_own_pruning_fn(cls)("l1_unstructured", amount=0.5, use_lottery_ticket_hypothesis=False,
                                         parameters_to_prune=[(model.layer.mlp_2, "weight")],
                                         use_global_unstructured=use_global_unstructured)
    make_trainer(tmp_path, callbacks=callback, max_epochs=1).fit(model)
    weight = model.layer.mlp_2.weight.view(-1)
    if use_global_unstructured:
        assert torch.all(weight[::2] == 0) and torch.all(weight[1::2] != 0)
    else:
        assert type(callback).calls == 1
        assert torch.all(weight[: weight.numel() // 2] == 0) and torch.all(weight[weight.numel() // 2:] != 0)
