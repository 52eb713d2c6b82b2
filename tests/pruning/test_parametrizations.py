"""Weights computed by `torch.nn.utils.parametrize` (weight_norm, spectral_norm): folded for pruning, never lost.

torch's pruning cannot mask them; before, the engine and `compress` failed deep inside torch with a TypeError, and
`ModelPruning`'s defaults (like Lightning's) skipped every weight-normed layer without a word.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm
from torch.utils.data import DataLoader, TensorDataset

from litcompress import CompressionConfig, ModelPruning, PruneConfig, compress
from litcompress.pruning import (GradualPruner, apply_mask_, fold_parametrizations_, make_permanent_, prune_,
                                 prune_to_sparsity_)
from litcompress.pruning.engine import deepcopy_model
from litcompress.pruning.parametrizations import unfold_state_dict
from litcompress.pruning.schedules import ConstantSparsity
from litcompress.quantization import PTQConfig, quantize
from tests.conftest import TimesBuffer
from tests.quantization.quant_helpers import quantized_layers


def conv_net(seed: int = 0, hooks: bool = False) -> nn.Sequential:
    """A weight-normed 1-d conv net, as in audio models (WaveNet, HiFi-GAN); with `hooks`, by the older
    ``torch.nn.utils.weight_norm``, which vocoder code still uses."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        norm = torch.nn.utils.weight_norm if hooks else weight_norm
        return nn.Sequential(norm(nn.Conv1d(4, 16, 5, padding=2)), nn.ReLU(),
                             norm(nn.Conv1d(16, 16, 5, padding=2)), nn.ReLU(),
                             nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 3)).eval()


def test_folding_a_copy_keeps_the_original_and_its_outputs():
    model, x = conv_net(), torch.randn(8, 4, 30)
    with torch.no_grad():
        expected = model(x)
    copy = deepcopy_model(model)
    folded = fold_parametrizations_(copy)
    assert folded == ["0.weight (_WeightNorm)", "2.weight (_WeightNorm)"]
    assert not any(parametrize.is_parametrized(m) for m in copy.modules())
    assert all(isinstance(copy[i].weight, nn.Parameter) and copy[i].weight.requires_grad for i in (0, 2))
    with torch.no_grad():
        torch.testing.assert_close(copy(x), expected)
        # torch deletes the property from the class a deep copy shares with its original: the original still works
        assert parametrize.is_parametrized(model[0]) and torch.equal(model(x), expected)
    assert fold_parametrizations_(copy) == []


NORMS = {"weight_norm": weight_norm, "spectral_norm": spectral_norm,
         "weight_norm hook": torch.nn.utils.weight_norm, "spectral_norm hook": torch.nn.utils.spectral_norm}


@pytest.mark.parametrize("norm", sorted(NORMS))
@pytest.mark.parametrize("frozen", [True, False])
def test_a_folded_weight_keeps_its_originals_frozen_or_trainable_state(norm, frozen):
    """torch made a parametrization's frozen originals a buffer (which torch's pruning refuses: compress failed on
    a frozen weight-normed model) and the older norms' a parameter that requires grad (fine-tuning trained it)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = nn.Sequential(NORMS[norm](nn.Linear(6, 8)), nn.ReLU(), nn.Linear(8, 2)).eval()
    model.requires_grad_(not frozen)
    x = torch.randn(5, 6)
    with torch.no_grad():
        expected = model(x)
    fold_parametrizations_(model)
    assert isinstance(model[0].weight, nn.Parameter) and model[0].weight.requires_grad is not frozen
    assert dict(model.named_buffers()) == {}
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_compress_prunes_a_frozen_weight_normed_model(tmp_path):
    model, x = conv_net(), torch.randn(32, 4, 30)
    model.requires_grad_(False)  # a feature extractor frozen for serving
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5), shrink=False, latency_repeats=2, export=False)
    result = compress(model, config, eval_fn=lambda m: 1.0, example_inputs=x[:8], output_dir=tmp_path)
    pruned = result.stage_models["pruned"]
    weights = [m.weight for m in pruned.modules() if isinstance(m, (nn.Conv1d, nn.Linear))]
    assert sum(int((w == 0).sum()) for w in weights) == round(0.5 * sum(w.numel() for w in weights))
    assert not any(w.requires_grad for w in pruned.parameters())  # still frozen


def test_folding_spectral_norm_in_training_mode_runs_no_power_iteration():
    torch.manual_seed(0)
    model = nn.Sequential(spectral_norm(nn.Linear(8, 8)), nn.Linear(8, 2)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = deepcopy_model(model)
    eval_weight = copy.eval()[0].weight.detach().clone()
    copy.train()
    fold_parametrizations_(copy)
    assert copy.training and copy[0].training  # modes given back
    assert torch.equal(copy[0].weight, eval_weight)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("call", [
    lambda targets: prune_(targets, "l1_unstructured", 0.5),
    lambda targets: prune_to_sparsity_(targets, "l1_unstructured", 0.5),
])
def test_a_refused_parametrized_weight_is_left_unread_by_the_refusal(call):
    """The refusal came after the weight's shape was read, which ran a training spectral norm's power iteration."""
    torch.manual_seed(0)
    model = nn.Sequential(spectral_norm(nn.Linear(8, 8))).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="fold_parametrizations_"):
        call([(model[0], "weight")])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _TiedLanguageModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(tokens))


def test_folding_a_parametrization_on_one_holder_of_a_tied_weight_leaves_the_other_holder_as_it_was():
    """torch's fold wrote the masked value into the shared matrix: the embedding then computed with it too (the
    pipeline's input row scored another model in its test than in its metric)."""
    torch.manual_seed(0)
    model = _TiedLanguageModel()
    parametrize.register_parametrization(model.out, "weight", TimesBuffer((torch.rand(10, 4) > 0.5).float()))
    tokens = torch.arange(10).reshape(2, 5)
    folded = deepcopy_model(model)
    fold_parametrizations_(folded)
    assert not parametrize.is_parametrized(folded.out)
    with torch.no_grad():
        torch.testing.assert_close(folded(tokens), model(tokens), rtol=0, atol=0)
        assert torch.equal(folded.emb.weight, model.out.parametrizations.weight.original)
        assert torch.equal(folded.out.weight, model.out.weight)
    config = CompressionConfig(prune=None, shrink=False, quantize=None, export=False, latency_repeats=2)
    score = lambda m: float(m(tokens).sum())  # noqa: E731
    result = compress(model, config, eval_fn=score, test_fn=score, example_inputs=tokens)
    (row,) = result.report.stages
    assert row.metric == row.test_metric == score(model)


@pytest.mark.parametrize("call", [
    lambda m: prune_([(m[0], "weight")], "l1_unstructured", 0.5),
    lambda m: prune_([(m[0], "weight")], "ln_structured", 0.5, scope="local", n=2, dim=0),
    lambda m: apply_mask_(m[0], "weight", torch.ones_like(m[0].weight)),
    lambda m: GradualPruner([(m[0], "weight")], ConstantSparsity(0.5)),
])
@pytest.mark.parametrize("hooks", [False, True])
def test_the_engine_refuses_a_parametrized_weight_naming_the_fix(call, hooks):
    model = conv_net(hooks=hooks)
    described = "WeightNorm" if hooks else "_WeightNorm"
    with pytest.raises(ValueError, match=rf"Conv1d.weight \({described}\).*fold_parametrizations_"):
        call(model)
    assert parametrize.is_parametrized(model[0], "weight") or hooks  # left as it was
    assert "weight_g" in dict(model[0].named_parameters()) or not hooks


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), dim=st.sampled_from([0, 1]), zero_slices=st.integers(0, 3),
       density=st.floats(0.0, 1.0))
def test_pruned_weights_unfold_into_the_weight_normed_architecture(seed, dim, zero_slices, density):
    """Any pruning pattern (entries, whole channels) of a folded weight-normed layer loads back into the model as
    given, and computes the same outputs: weight norm's inverse of a zero channel would be 0 / 0."""
    torch.manual_seed(seed)
    reference = nn.Sequential(weight_norm(nn.Linear(6, 5), dim=dim), nn.ReLU(), nn.Linear(5, 2))
    pruned = deepcopy_model(reference)
    folded = fold_parametrizations_(pruned)
    mask = (torch.rand(5, 6) < density).float()
    mask.select(dim, 0)[:] = 1  # at least one kept slice
    for index in range(1, zero_slices + 1):
        mask.select(dim, index)[:] = 0
    apply_mask_(pruned[0], "weight", mask)
    make_permanent_(pruned)
    state, kept = unfold_state_dict(reference, pruned.state_dict(), folded)
    assert kept == []
    fresh = nn.Sequential(weight_norm(nn.Linear(6, 5), dim=dim), nn.ReLU(), nn.Linear(5, 2))
    fresh.load_state_dict(state)  # strict: the layout of the model as given
    assert torch.equal(fresh[0].weight == 0, pruned[0].weight == 0)
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), pruned(x))


def test_a_parametrization_that_cannot_give_the_weight_back_keeps_the_plain_state():
    torch.manual_seed(0)
    reference = nn.Sequential(spectral_norm(nn.Linear(6, 5)), nn.Linear(5, 2)).eval()
    pruned = deepcopy_model(reference)
    folded = fold_parametrizations_(pruned)
    state, kept = unfold_state_dict(reference, pruned.state_dict(), folded)
    assert kept == []  # unpruned, W / sigma(W) has sigma 1 along the stored singular vectors: it comes back
    prune_([(pruned[0], "weight")], "l1_unstructured", 0.5)
    make_permanent_(pruned)
    state, kept = unfold_state_dict(reference, pruned.state_dict(), folded)
    assert kept == folded  # pruned, its sigma is no longer 1: v / sigma(v) of the value is not the value
    assert set(state) == set(pruned.state_dict()) and torch.equal(state["0.weight"], pruned[0].weight)


class _WeightNormed(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), weight_norm(nn.Linear(32, 32)), nn.ReLU(),
                                 nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(module: pl.LightningModule, callback: ModelPruning) -> pl.Trainer:
    torch.manual_seed(0)
    x = torch.randn(128, 16)
    trainer = pl.Trainer(max_epochs=1, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=32))
    return trainer


def test_model_pruning_names_the_weight_normed_layers_its_defaults_leave_out():
    module = _WeightNormed()
    with pytest.warns(UserWarning, match=r"leaves out 1 parametrized tensor\(s\).*net\.2\.weight.*"
                                         r"fold_parametrizations_"):
        _fit(module, ModelPruning("l1_unstructured", amount=0.5, parameter_names=["weight"]))
    assert (module.net[0].weight == 0).any() and not (module.net[2].weight == 0).any()
    folded = _WeightNormed()
    fold_parametrizations_(folded)  # the fix the warning names: now every layer is pruned
    _fit(folded, ModelPruning("l1_unstructured", amount=0.5, parameter_names=["weight"]))
    total = sum(m.weight.numel() for m in folded.net if isinstance(m, nn.Linear))
    zeros = sum(int((m.weight == 0).sum()) for m in folded.net if isinstance(m, nn.Linear))
    assert (folded.net[2].weight == 0).any() and zeros == round(0.5 * total)


def test_model_pruning_refuses_an_explicit_parametrized_weight_before_training():
    module = _WeightNormed()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    callback = ModelPruning("l1_unstructured", amount=0.5, parameters_to_prune=[(module.net[2], "weight")])
    with pytest.raises(MisconfigurationException, match=r"parameters_to_prune.*_WeightNorm.*fold_parametrizations_"):
        _fit(module, callback)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # no training step ran


@pytest.mark.parametrize("hooks", [False, True])
def test_compress_prunes_and_shrinks_weight_normed_convs_and_its_state_loads_into_them(tmp_path, hooks):
    model, x = conv_net(hooks=hooks), torch.randn(32, 4, 30)
    with torch.no_grad():
        expected = model(x)
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured"), latency_repeats=2,
                               export=False)
    result = compress(model, config, eval_fn=lambda m: 1.0, example_inputs=x[:8], output_dir=tmp_path)
    assert any("folded 2 parametrized weight(s)" in m for m in result.report.messages)
    assert result.shrink is not None and result.shrink.channels_removed > 0  # before: "it is parametrized"
    assert torch.equal(model(x), expected)  # the model given is unchanged, its norms too
    assert parametrize.is_parametrized(model[0]) or "weight_g" in dict(model[0].named_parameters())
    fresh = conv_net(seed=1, hooks=hooks)
    fresh.load_state_dict(torch.load(tmp_path / "pruned_state_dict.pt"))  # the architecture as given
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), result.stage_models["pruned"](x))
        torch.testing.assert_close(result.model(x), fresh(x))  # shrunk: the same function


def test_dynamic_int8_quantizes_a_weight_normed_linear():
    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(32, 64)), nn.ReLU(), nn.Linear(64, 4)).eval()
    x = torch.randn(16, 32)
    result = quantize(model, PTQConfig(approach="dynamic", backends=("torch_ao",), latency_repeats=3),
                      eval_fn=lambda m: 1.0, example_inputs=x)
    assert quantized_layers(result.model, "torch_ao", ["0", "2"]) == {"0": True, "2": True}  # before: "0" fp32
    assert any("folded 1 parametrized weight(s)" in m for m in result.messages)
    assert parametrize.is_parametrized(model[0])


# TorchScript modules (torch.jit.script / trace) fix their attributes when compiled: torch's pruning cannot replace a
# parameter by `<name>_orig` and a mask there. Before, the engine failed with "'OrderedDictWrapper' object has no
# attribute 'get'", `compress` said the model had no Linear layer, and `ModelPruning` failed in torch at setup.


def _scripted_mlp() -> torch.jit.ScriptModule:
    torch.manual_seed(0)
    return torch.jit.script(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval())


@pytest.mark.parametrize("call", ["prune_model_", "prune_", "GradualPruner"])
def test_the_engine_refuses_a_torchscript_module_naming_the_fix(call):
    from litcompress import prune_model_
    from litcompress.report import sparsity_report

    model = _scripted_mlp()
    with pytest.raises(ValueError, match=r"cannot prune Linear\.weight of a TorchScript module.*before torch\.jit"):
        if call == "prune_model_":
            prune_model_(model, amount=0.5)
        elif call == "prune_":
            prune_([(getattr(model, "0"), "weight")], "l1_unstructured", 0.5)  # model[0] is no ScriptModule
        else:
            GradualPruner([(getattr(model, "0"), "weight")], ConstantSparsity(0.5))
    assert sparsity_report(model).sparsity == 0.0  # reading it is fine


class _ScriptedEncoder(pl.LightningModule):
    """A frozen, scripted feature extractor under a trainable head."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.jit.script(nn.Sequential(nn.Linear(16, 32), nn.ReLU()))
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        return self.head(self.encoder(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.1)


def test_model_pruning_leaves_a_torchscript_module_out_of_its_defaults_and_says_so():
    module = _ScriptedEncoder()
    with pytest.warns(UserWarning, match=r"leaves out the tensors of 1 TorchScript module\(s\).*encoder\.0.*"
                                         r"before torch\.jit\.script"):
        _fit(module, ModelPruning("l1_unstructured", amount=0.5, parameter_names=["weight"]))
    assert int((module.head.weight == 0).sum()) == 32 and not (getattr(module.encoder, "0").weight == 0).any()


def test_model_pruning_refuses_an_explicit_torchscript_weight_before_training():
    module = _ScriptedEncoder()
    scripted_linear = getattr(module.encoder, "0")  # `encoder[0]` is the Python Linear it was compiled from
    callback = ModelPruning("l1_unstructured", amount=0.5, parameters_to_prune=[(scripted_linear, "weight")])
    before = module.head.weight.detach().clone()
    with pytest.raises(MisconfigurationException, match=r"parameters_to_prune.*TorchScript module"):
        _fit(module, callback)
    assert torch.equal(module.head.weight, before)  # no training step ran


def test_compress_refuses_a_torchscript_model_to_prune_and_says_torch_ao_cannot_quantize_it():
    """Its 'quantized' stage was the fp32 model: torch.ao's eager quantization swaps nn.Linear modules, which a
    scripted model has none of (its outputs and size were the input's)."""
    model, x = _scripted_mlp(), torch.randn(8, 16)

    def metric(candidate):
        return -float((candidate(x) - model(x)).abs().mean())

    with pytest.raises(TypeError, match=r"TorchScript module cannot be pruned.*prune=None, shrink=False"):
        compress(model, CompressionConfig(prune=PruneConfig(sparsity=0.5)), eval_fn=metric, example_inputs=x)
    with pytest.warns(UserWarning, match="No quantized candidate was tried"):
        result = compress(model, CompressionConfig(prune=None, shrink=False, export=False, latency_repeats=2,
                                                   quantize=PTQConfig(backends=("torch_ao",), latency_repeats=2)),
                          eval_fn=metric, example_inputs=x)
    assert [s.stage for s in result.report.stages] == ["input"]
    assert any("backend 'torch_ao' skipped: it quantizes eager modules" in m for m in result.report.messages)


class AliasedTemporalBlock(nn.Module):
    """The TCN reference code's block (locuslab/TCN): weight-normed convs registered twice, as ``conv1`` and inside
    ``net``, so the state dict holds each under both names."""

    def __init__(self, hooks: bool) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            norm = torch.nn.utils.weight_norm if hooks else weight_norm
            self.conv1, self.conv2 = norm(nn.Conv1d(3, 8, 3, padding=2)), norm(nn.Conv1d(8, 8, 3, padding=2))
        self.net = nn.Sequential(self.conv1, nn.ReLU(), self.conv2, nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x).mean(-1))


@pytest.mark.parametrize("hooks", [False, True])
def test_pruned_weights_unfold_into_a_model_that_registers_its_weight_normed_layers_twice(hooks):
    torch.manual_seed(0)
    reference = AliasedTemporalBlock(hooks).eval()
    pruned = deepcopy_model(reference)
    folded = fold_parametrizations_(pruned)
    assert [entry.split(" ")[0] for entry in folded] == ["conv1.weight", "conv2.weight"]
    prune_([(pruned.conv1, "weight")], "ln_structured", 0.5, scope="local", n=2, dim=0)
    make_permanent_(pruned)
    assert {"conv1.weight", "net.0.weight"} <= set(pruned.state_dict())   # one tensor, two keys
    state, kept = unfold_state_dict(reference, pruned.state_dict(), folded)   # failed: unexpected 'net.0.weight'
    assert kept == []
    fresh = AliasedTemporalBlock(hooks)
    fresh.load_state_dict(state)   # strict
    x = torch.randn(4, 3, 12)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), pruned(x))
    assert int((fresh.conv1.weight.flatten(1).abs().sum(1) == 0).sum()) == 4


def test_prune_targets_selects_on_a_folded_copy_as_compress_does_and_names_the_models_layers():
    from litcompress.pipeline import prune_targets

    model = AliasedTemporalBlock(hooks=True)
    targets = prune_targets(model, PruneConfig(sparsity=0.5, method="ln_structured"))   # refused as parametrized
    assert [(module, name) for module, name in targets] == [(model.conv1, "weight"), (model.conv2, "weight")]
    assert "weight_g" in dict(model.conv1.named_parameters())   # the model itself is not folded


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_weight_normed_model_unfolds_within_its_own_rounding(dtype):
    """The round trip through g and v was held to float32's tolerance (rtol 1e-5): every half-precision layer was
    said not to give its weight back, and the pipeline saved plain weights the user's weight-normed model refuses."""
    import torch.nn.utils.parametrizations as parametrizations
    from litcompress.pruning import permanent_state_dict, prune_model_

    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).to(dtype)
    parametrizations.weight_norm(reference[0])
    parametrizations.weight_norm(reference[2])
    work = deepcopy_model(reference)
    folded = fold_parametrizations_(work)
    prune_model_(work, "l1_unstructured", 0.5)
    state, failed = unfold_state_dict(reference, permanent_state_dict(work), folded)
    assert failed == []
    fresh = deepcopy_model(reference)
    fresh.load_state_dict(state)  # strict: the g/v keys of the weight-normed model
    for index in (0, 2):
        assert torch.equal(fresh[index].weight == 0, work[index].weight == 0)


class RecurrentHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("norm", [weight_norm, spectral_norm])
def test_a_parametrized_recurrent_layer_run_with_grad_on_is_copied_and_compressed(norm):
    """The LSTM keeps its computed weights (with their graph) in `_flat_weights`: deepcopy_model refused the model
    after one forward with grad on, and compress with it ("Only Tensors created explicitly by the user...")."""
    torch.manual_seed(0)
    model, x = RecurrentHead(), torch.randn(2, 5, 3)
    norm(model.rnn, "weight_hh_l0")
    model(x)  # trained or evaluated once, grad on
    copied = deepcopy_model(model)
    torch.testing.assert_close(copied(x), model(x))
    result = compress(model.eval(), CompressionConfig(prune=PruneConfig(sparsity=0.5), shrink=False, export=False,
                                                      latency_repeats=2), eval_fn=lambda m: 0.0, example_inputs=x)
    assert result.report.stages[-1].stage == "pruned"


class ScaledBlock(nn.Module):
    """A weight of its own (parametrized on the block) beside child modules."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))
        self.bn, self.drop = nn.BatchNorm1d(4), nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.bn(x @ self.weight))


def test_folding_leaves_every_module_in_its_own_mode():
    """The fold ran the parametrized module in eval mode and then called its train(True): a batch norm frozen in
    eval mode inside it came back training, its statistics then moving in the fine-tuning."""
    model = ScaledBlock()
    weight_norm(model)
    model.train()
    model.bn.eval()
    fold_parametrizations_(model)
    assert (model.training, model.bn.training, model.drop.training) == (True, False, True)


class _Doubled(nn.Module):
    """An invertible parametrization: the weight is twice its original."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * 2

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight / 2


def test_a_pruned_tied_weight_with_a_parametrization_on_one_holder_is_saved_in_the_layout_that_keeps_it(tmp_path):
    """The pruned state was written through the shared original, then the other holder's key overwrote it at the
    load: the file loaded into the user's model without a word and computed another model."""
    torch.manual_seed(0)
    model = _TiedLanguageModel()
    parametrize.register_parametrization(model.out, "weight", _Doubled())
    tokens = torch.arange(10).reshape(2, 5)
    score = lambda m: float(m(tokens).abs().sum())  # noqa: E731
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, method="l1_unstructured", schedule="oneshot",
                                                 layer_types=(nn.Linear, nn.Embedding)),
                               shrink=False, quantize=None, export=False, latency_repeats=2)
    result = compress(model, config, eval_fn=score, example_inputs=tokens, output_dir=tmp_path)
    state = torch.load(tmp_path / "pruned_state_dict.pt", weights_only=True)
    assert sorted(state) == ["emb.weight", "out.weight"]  # the folded layout, as the note says
    assert any("out.weight (_Doubled) shares its original with another layer's weight, which the fold unties: load "
               "it after litcompress.pruning.fold_parametrizations_(model)" in m for m in result.report.messages)
    fresh = _TiedLanguageModel()
    parametrize.register_parametrization(fresh.out, "weight", _Doubled())
    fold_parametrizations_(fresh)
    fresh.load_state_dict(state)
    assert score(fresh) == result.report.stages[-1].metric


@pytest.mark.parametrize("norm", ["orthogonal", "spectral_norm"])
def test_an_untied_one_tensor_parametrization_folds_in_place_so_an_optimizer_built_before_goes_on_training(norm):
    """Folding into a new tensor (as for a tied weight) left an optimizer built before the fold training a tensor
    the model no longer used; and a clone made under inference mode made the weight unloadable outside it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    getattr(torch.nn.utils.parametrizations, norm)(model[0])
    original = model[0].parametrizations.weight.original
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fold_parametrizations_(model)
    assert model[0].weight is original
    before = model[0].weight.detach().clone()
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    assert not torch.equal(model[0].weight, before)

    tied = _TiedLanguageModel()
    parametrize.register_parametrization(tied.out, "weight", TimesBuffer((torch.rand(10, 4) > 0.5).float()))
    with torch.inference_mode():
        fold_parametrizations_(tied)
    tied.load_state_dict({key: torch.zeros_like(value) for key, value in tied.state_dict().items()})
    assert not tied.out.weight.is_inference() and not tied.out.weight.any()


def test_a_parametrized_buffer_another_module_shares_is_left_to_that_module_by_the_fold():
    """Only parameters counted as tied: the fold wrote the masked table into the buffer the other module shares."""
    torch.manual_seed(0)
    table = torch.randn(4)
    model = nn.Sequential(TimesBuffer(table), TimesBuffer(table))  # (scaling by one shared table)
    parametrize.register_parametrization(model[0], "mask", TimesBuffer(torch.tensor([1.0, 0.0, 1.0, 0.0])))
    x, shared = torch.randn(1, 4), table.clone()
    before = model(x)
    fold_parametrizations_(model)
    assert torch.equal(model[1].mask, shared) and "mask" in model[0]._buffers
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["weight_norm", "old_weight_norm", "old_spectral_norm"])
def test_a_weight_norm_folded_under_inference_mode_loads_and_trains_outside_it(norm):
    """torch's removal ran in the caller's inference mode: the new weight was an inference tensor."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    {"weight_norm": weight_norm, "old_weight_norm": torch.nn.utils.weight_norm,
     "old_spectral_norm": torch.nn.utils.spectral_norm}[norm](model[2])
    with torch.inference_mode():
        fold_parametrizations_(model)
    assert not any(p.is_inference() for p in model.parameters())
    model(torch.randn(4, 8)).sum().backward()
    assert model[2].weight.grad is not None
    model.load_state_dict({key: torch.zeros_like(value) for key, value in model.state_dict().items()})
