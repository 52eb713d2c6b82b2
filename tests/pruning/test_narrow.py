"""A shrunk model's state dict loads into a model built at the original widths: narrowed, it computes exactly what
the shrunk model does (state dicts round-tripped through files, `weights_only=True`)."""

from __future__ import annotations

import io
import re

import lightning as L
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from litcompress import (ModelPruning, load_module_from_checkpoint, load_shrunk_state_dict, make_permanent_, prune_,
                         shrink)
from litcompress.data import DigitsDataModule
from litcompress.models import (CNNClassifier, DenseNetClassifier, GatedTransformerClassifier, MLPClassifier,
                                MobileNetClassifier, ResNeXtClassifier, TransformerClassifier)
from litcompress.pruning import HeadPrunedAttention, is_pruned, narrow_to_state_dict_, prune_heads_, removable_channels


MLP_WITH_16_UNITS = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16)).state_dict()


def _through_a_file(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _trained_statistics_(model: nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                if module.bias is not None:
                    module.bias.normal_(0, 0.1)


def _pruned_and_shrunk(model: nn.Module, x: torch.Tensor, heads: bool = False) -> nn.Module:
    """Half of the channels of every layer shrink can narrow, (half the heads), then shrink."""
    modules = dict(model.named_modules())
    names = [name for name, reason in removable_channels(model).items() if reason is None]
    prune_([(modules[name], "weight") for name in names], "ln_structured", 0.5, n=1, dim=0, scope="local")
    if heads:
        prune_heads_(model, 0.5)
    make_permanent_(model)
    return shrink(model.eval(), example_inputs=(x,)).model.eval()


MODELS = {
    "mlp": (lambda: MLPClassifier(hidden=(48, 40)), (64,)),
    "cnn": (lambda: CNNClassifier(channels=(12, 16)), (1, 8, 8)),
    "resnext (grouped convs)": (lambda: ResNeXtClassifier(channels=16, width=32, groups=4), (1, 8, 8)),
    "mobilenet (depthwise, squeeze-excitation)": (
        lambda: MobileNetClassifier(width=8, expansion=4, squeeze_excitation=True), (1, 8, 8)),
    "densenet (concatenations)": (lambda: DenseNetClassifier(), (1, 8, 8)),
    "transposed and 1-d convs": (lambda: nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 6, 2, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(2), nn.Conv1d(6, 5, 3), nn.PReLU(5), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(5, 3)),
        (1, 8, 8)),
    "batch norm without affine parameters": (lambda: nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8, affine=False), nn.ReLU(), nn.Conv2d(8, 6, 1), nn.ReLU(), nn.Flatten(),
        nn.Linear(6 * 6 * 6, 3)), (1, 8, 8)),
    "transformer (heads)": (lambda: TransformerClassifier(d_model=32, heads=4), (1, 8, 8)),
    "swiglu (heads, gates)": (lambda: GatedTransformerClassifier(), (1, 8, 8)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_a_fresh_model_narrowed_to_the_state_computes_what_the_shrunk_one_does(name):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build()
    _trained_statistics_(model)
    x = torch.randn(4, *shape)
    shrunk = _pruned_and_shrunk(model, x, heads="heads" in name)
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in build().parameters())
    state = _through_a_file(shrunk.state_dict())

    fresh = build()
    with pytest.raises(RuntimeError, match="size mismatch|Missing key"):
        fresh.load_state_dict(state)
    fresh = load_shrunk_state_dict(build(), state).eval()
    assert [(n, p.shape) for n, p in fresh.named_parameters()] == [(n, p.shape) for n, p in shrunk.named_parameters()]
    with torch.no_grad():
        assert torch.equal(fresh(x), shrunk(x))
    for module, like in zip(fresh.modules(), shrunk.modules()):  # the layers' own view of their sizes too
        assert type(module) is type(like)
        for attribute in ("in_features", "out_features", "in_channels", "out_channels", "groups", "num_features",
                          "num_heads", "kept_heads", "original_heads"):
            assert getattr(module, attribute, None) == getattr(like, attribute, None), (name, attribute)


@settings(max_examples=25, deadline=None)
@given(widths=st.lists(st.integers(1, 12), min_size=1, max_size=3), data=st.data())
def test_any_rows_removed_from_an_mlp_load_back(widths, data):
    """Property: whichever rows shrink removed (every one of a layer's too), the narrowed fresh model matches."""
    sizes = [5, *widths, 3]
    biases = data.draw(st.lists(st.booleans(), min_size=len(sizes) - 1, max_size=len(sizes) - 1), label="biases")

    def build() -> nn.Sequential:
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for a, b, bias in zip(sizes, sizes[1:], biases):
            layers += [nn.Linear(a, b, bias=bias), nn.ReLU()]
        return nn.Sequential(*layers[:-1])

    model = build()
    with torch.no_grad():
        for layer in list(model)[:-1:2]:
            rows = data.draw(st.lists(st.integers(0, layer.out_features - 1), unique=True), label="zero rows")
            layer.weight[rows] = 0
    x = torch.randn(7, 5)
    shrunk = shrink(model, example_inputs=(x,)).model
    fresh = load_shrunk_state_dict(build(), _through_a_file(shrunk.state_dict()))
    assert torch.equal(fresh(x), shrunk(x))


def test_a_bias_that_folding_created_and_a_masked_state_are_read():
    """A constant channel folded into a bias-less consumer gives it a bias; a state written while pruning with masks
    (`weight_orig`/`weight_mask`) narrows alike."""

    def build() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4, bias=False))

    model = build()
    with torch.no_grad():
        model[0].weight[[1, 5]] = 0  # biases kept: those channels output constants, folded into model[2]
    x = torch.randn(3, 6)
    shrunk = shrink(model, example_inputs=(x,)).model
    assert shrunk[2].bias is not None and shrunk[0].out_features == 6
    fresh = load_shrunk_state_dict(build(), shrunk.state_dict())
    assert fresh[2].bias is not None and torch.equal(fresh(x), shrunk(x))

    prune_([(shrunk[0], "weight")], "l1_unstructured", 0.5, scope="local")
    masked = build()
    narrowed = narrow_to_state_dict_(masked, shrunk.state_dict())
    assert narrowed == ["0", "2"] and masked[0].weight.shape == (6, 6)
    # and loads, its masks re-created (it was torch's missing/unexpected keys error)
    reloaded = load_shrunk_state_dict(build(), _through_a_file(shrunk.state_dict()))
    assert torch.equal(reloaded[0].weight_mask, shrunk[0].weight_mask) and torch.equal(reloaded(x), shrunk(x))


def test_a_state_that_shrink_cannot_have_written_is_refused():
    """shrink only removes channels, evenly over a grouped conv's groups: a wider layer (a model built with other
    widths), another kernel size or uneven groups is named, not loaded into a resized model."""
    conv = nn.Sequential(nn.Conv2d(8, 8, 3, groups=4))
    with pytest.raises(ValueError, match=r"0: a weight of shape \(6, 2, 3, 3\) does not fit its 4 groups"):
        narrow_to_state_dict_(conv, {"0.weight": torch.zeros(6, 2, 3, 3)})
    with pytest.raises(ValueError, match=r"0: the state dict's tensor of shape \(8, 2, 5, 5\) does not fit"):
        narrow_to_state_dict_(conv, {"0.weight": torch.zeros(8, 2, 5, 5)})
    mlp = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    with pytest.raises(ValueError, match=r"0: the state dict's tensor of shape \(16, 4\) does not fit in the "
                                         r"layer's \(8, 4\).*one built with other widths"):
        load_shrunk_state_dict(mlp, MLP_WITH_16_UNITS)
    assert mlp[0].weight.shape == (8, 4)  # refused, not resized
    # every layer is checked before any is resized: a later misfit leaves the earlier, fitting layers as built
    two = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    state = {"0.weight": torch.zeros(5, 4), "0.bias": torch.zeros(5), "2.weight": torch.zeros(9, 5),
             "2.bias": torch.zeros(9)}
    with pytest.raises(ValueError, match=r"2: the state dict's tensor of shape \(9, 5\) does not fit"):
        narrow_to_state_dict_(two, state)
    assert two[0].weight.shape == (8, 4) and two[0].out_features == 8 and two[2].in_features == 8


def test_the_kept_heads_travel_with_the_state_dict():
    """A 3-D attention mask holds one (L, S) mask per original head: the reloaded attention reads the kept heads'
    (not its first ones), because the state dict records which they were."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.Linear(16, 2)).eval()
    with torch.no_grad():  # heads 0 and 2 add nothing: their value rows are zero
        value = layer.self_attn.in_proj_weight[32:]
        value[0:4] = 0
        value[8:12] = 0
        layer.self_attn.in_proj_bias[32:36] = 0
        layer.self_attn.in_proj_bias[40:44] = 0
    x = torch.randn(2, 5, 16)
    shrunk = shrink(model, example_inputs=(x,)).model.eval()
    assert shrunk[0].self_attn.kept_heads == (1, 3)
    state = _through_a_file(shrunk.state_dict())
    assert state["0.self_attn._extra_state"].tolist() == [4, 1, 3]  # original heads, then the kept ones

    torch.manual_seed(1)
    fresh = load_shrunk_state_dict(nn.Sequential(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True),
                                                 nn.Linear(16, 2)), state).eval()
    attention = fresh[0].self_attn
    assert isinstance(attention, HeadPrunedAttention) and attention.kept_heads == (1, 3)
    mask = torch.randn(2 * 4, 5, 5)  # (batch * original heads, L, S)
    with torch.no_grad():
        expected = shrunk[0].self_attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        assert torch.equal(attention(x, x, x, attn_mask=mask, need_weights=False)[0], expected)
        assert torch.equal(fresh(x), shrunk(x))
    # into a model built with other heads (of other widths), whose inner channels the kept heads fill all the same:
    # "HeadPrunedAttention: the state keeps heads [1, 3], but this module has 1 head(s)", of an attention of 2
    for heads in (2, 8):
        other = nn.Sequential(nn.TransformerEncoderLayer(16, heads, 32, dropout=0.0, batch_first=True),
                              nn.Linear(16, 2))
        with pytest.raises(ValueError, match=rf"^0\.self_attn: the state dict's attention was shrunk from one of 4 "
                                             rf"heads, and this model's has {heads}: not a shrunk state of this model"):
            load_shrunk_state_dict(other, state)
        assert isinstance(other[0].self_attn, nn.MultiheadAttention)  # left as it was


def test_a_shrunk_attention_pruned_on_with_masks_loads_with_them():
    """Its projections' `q_proj.weight_orig`/`_mask` were not read as a HeadPrunedAttention's: torch's attention
    stayed, and the load failed on missing `in_proj_weight` keys (a shrunk LSTM's masked state loaded)."""
    torch.manual_seed(0)

    def build() -> nn.Sequential:
        return nn.Sequential(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), nn.Linear(16, 2))

    model = build().eval()
    prune_heads_(model, 0.5)
    x = torch.randn(2, 5, 16)
    shrunk = shrink(model, example_inputs=(x,)).model.eval()
    linears = [(m, "weight") for m in shrunk.modules() if isinstance(m, nn.Linear)]
    prune_(linears, "l1_unstructured", 0.3)  # fine-tuned on under ModelPruning(make_pruning_permanent=False)
    state = _through_a_file(shrunk.state_dict())
    assert "0.self_attn.q_proj.weight_orig" in state and "0.self_attn.q_proj.weight" not in state
    fresh = load_shrunk_state_dict(build(), state).eval()
    assert isinstance(fresh[0].self_attn, HeadPrunedAttention)
    assert is_pruned(fresh[0].self_attn.q_proj, "weight")  # its masks re-created
    with torch.no_grad():
        assert torch.equal(fresh(x), shrunk(x))


def _quiet_trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, limit_val_batches=2, **kwargs)


def test_a_checkpoint_of_a_module_fine_tuned_after_shrink_loads_and_resumes(tmp_path):
    """Lightning's `load_from_checkpoint` fails on the narrow shapes; `load_module_from_checkpoint` builds the module
    from its hyperparameters, narrows it and loads it; a fresh module narrowed first resumes `fit` from the
    checkpoint, optimizer state included."""
    L.seed_everything(0)
    data = DigitsDataModule(batch_size=64, flatten=False)
    data.setup("fit")
    x = next(iter(data.val_dataloader()))[0][:8]
    module = CNNClassifier(channels=(12, 16), lr=1e-2)
    _trained_statistics_(module)
    shrunk = _pruned_and_shrunk(module, x).train()
    path = tmp_path / "shrunk.ckpt"
    trainer = _quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=3)
    trainer.fit(shrunk, datamodule=data)
    trainer.save_checkpoint(path)

    with pytest.raises(RuntimeError, match="size mismatch"):
        CNNClassifier.load_from_checkpoint(path)
    loaded = load_module_from_checkpoint(CNNClassifier, path).eval()
    shrunk.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), shrunk(x))

    resumed = CNNClassifier(channels=(12, 16), lr=1e-2)
    narrow_to_state_dict_(resumed, torch.load(path, weights_only=False)["state_dict"])
    trainer = _quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=3)
    trainer.fit(resumed, datamodule=data, ckpt_path=path)
    assert trainer.global_step == 3 + 3  # the checkpoint's 3 steps, then one more epoch


def test_a_checkpoint_written_while_pruning_a_shrunk_module_with_masks_loads(tmp_path):
    L.seed_everything(0)
    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    x = next(iter(data.val_dataloader()))[0][:8]
    shrunk = _pruned_and_shrunk(MLPClassifier(hidden=(48, 40), lr=1e-2), x).train()
    trainer = _quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=3, callbacks=[
        ModelPruning("l1_unstructured", amount=0.3, make_pruning_permanent=False)])
    trainer.fit(shrunk, datamodule=data)
    path = tmp_path / "masked.ckpt"
    trainer.save_checkpoint(path)
    assert any(key.endswith("weight_mask") for key in torch.load(path, weights_only=False)["state_dict"])
    loaded = load_module_from_checkpoint(MLPClassifier, path, keep_masks=False).eval()
    # a hyperparameter given over the saved ones that builds no other shape: still narrowed
    relearning = load_module_from_checkpoint(MLPClassifier, path, keep_masks=False, lr=0.5).eval()
    assert relearning.hparams.lr == 0.5
    make_permanent_(shrunk)
    with torch.no_grad():
        assert torch.equal(loaded(x), shrunk.eval()(x)) and torch.equal(relearning(x), loaded(x))


def test_a_width_given_to_the_loader_is_not_narrowed_away(tmp_path):
    """load_module_from_checkpoint(MLPClassifier, path, hidden=(64,)) took the checkpoint's 32-wide weights for a
    shrunk model's and narrowed the module back to them, silently (hparams said 64); Lightning's loader refuses."""
    L.seed_everything(0)
    trainer = _quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=2)
    trainer.fit(MLPClassifier(hidden=(32,)), datamodule=DigitsDataModule(batch_size=64))
    path = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(RuntimeError, match=r"size mismatch(.|\n)*hidden=\(64,\) given here build net.0.weight "
                                           r"with another shape than the checkpoint's hyperparameters and weights"):
        load_module_from_checkpoint(MLPClassifier, path, hidden=(64,))
    same = load_module_from_checkpoint(MLPClassifier, path, hidden=(32,))  # the saved value: no override
    assert same.net[0].out_features == 32


class _WiderHead(MLPClassifier):
    """The checkpoint's backbone under a new head with more classes (fine-tuning a pruned model on a new task)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.net[-1] = nn.Linear(self.net[-1].in_features, 12)


@pytest.mark.parametrize("permanent", [True, False], ids=["permanent", "masked"])
def test_a_module_with_a_wider_head_than_the_checkpoint_is_refused_not_narrowed_to_it(tmp_path, permanent):
    """load_module_from_checkpoint(_WiderHead, path) read the 10-class checkpoint as a shrunk model's and narrowed the
    new 12-class head back to 10 outputs, silently, `strict=True` too; Lightning's loader refuses. shrink never
    narrows a layer's outputs without the inputs that read them, so a state narrower in outputs only is no shrink's."""
    L.seed_everything(0)
    trainer = _quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[
        ModelPruning("l1_unstructured", amount=0.5, make_pruning_permanent=permanent, verbose=0)])
    trainer.fit(MLPClassifier(hidden=(32,)), datamodule=DigitsDataModule(batch_size=64))
    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"size mismatch for net.2.weight(.|\n)*not the checkpoint of a shrunk "
                                               r"_WiderHead either: 'net.2': the state dict's tensors are narrower "
                                               r"than this model's in their outputs only"):
            load_module_from_checkpoint(_WiderHead, path, strict=strict)
    # the same refusal from the engine, before any layer is resized; a shrunk state (inputs read fewer) still loads
    state = torch.load(path, weights_only=False)["state_dict"]
    head = _WiderHead(hidden=(32,))
    with pytest.raises(ValueError, match="narrower than this model's in their outputs only"):
        narrow_to_state_dict_(head, state)
    assert head.net[2].out_features == 12 and head.net[2].weight.shape == (12, 32)
    shrunk_state = {"net.0.weight": torch.zeros(20, 64), "net.0.bias": torch.zeros(20),
                    "net.2.weight": torch.zeros(10, 20), "net.2.bias": torch.zeros(10)}
    assert narrow_to_state_dict_(MLPClassifier(hidden=(32,)), shrunk_state) == ["net.0", "net.2"]


@pytest.mark.parametrize("normed", [0, 4], ids=["narrowed", "kept"])
@pytest.mark.parametrize("parametrize", ["weight_norm", "parametrizations.weight_norm"])
def test_a_weight_norm_layer_names_the_fold_that_lets_the_state_load(parametrize, normed):
    """torch's "attribute 'weight' already exists" (a KeyError from inside the resize), or, for a weight-normed layer
    that keeps its shape, its missing and unexpected keys: the pipeline writes shrunk_state_dict.pt with plain
    weights, which a fresh weight-normed model takes once folded."""
    from litcompress import shrink
    from litcompress.pruning import fold_parametrizations_

    def build():
        torch.manual_seed(0)
        layers = [nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4)]
        norm = nn.utils.weight_norm if parametrize == "weight_norm" else nn.utils.parametrizations.weight_norm
        layers[normed] = norm(layers[normed])
        return nn.Sequential(*layers)

    model = build()
    fold_parametrizations_(model)
    with torch.no_grad():
        model[0].weight[:5] = 0
        model[0].bias[:5] = 0
    x = torch.randn(3, 16)
    result = shrink(model, (x,))
    state = result.model.state_dict()
    fresh = build()
    with pytest.raises(ValueError, match=rf"^{normed}: its weight is computed by a parametrization .* call "
                                         r"litcompress.pruning.fold_parametrizations_\(model\) on the fresh model"):
        load_shrunk_state_dict(fresh, state)
    fold_parametrizations_(fresh)
    with torch.no_grad():
        torch.testing.assert_close(load_shrunk_state_dict(fresh, state)(x), result.model(x))


def test_states_a_parametrized_layer_reads_itself_load_and_a_plain_one_of_any_tensor_is_refused_unchanged():
    """The fold hint refused an old-format spectral_norm state (weight, weight_orig, weight_u: torch's own hook reads
    it), and looked at `weight` only: a parametrized bias failed inside the resize, the weight already narrowed.
    After the hinted fold, a spectral_norm layer took the plain state (torch left its load hook behind)."""
    from litcompress.pruning import fold_parametrizations_

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.utils.spectral_norm(nn.Linear(6, 5)), nn.ReLU(), nn.Linear(5, 2))

    model = build().train()
    model(torch.randn(4, 6))
    legacy = {k: v for k, v in model.state_dict().items() if k != "0.weight_v"}
    legacy["0.weight"] = model[0].weight.detach().clone()
    load_shrunk_state_dict(build(), legacy)  # the parametrization's own keys are there: torch reads them

    class Doubled(nn.Module):
        def forward(self, x):
            return 2 * x

    fresh = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    torch.nn.utils.parametrize.register_parametrization(fresh[0], "bias", Doubled())
    narrow = {"0.weight": torch.zeros(8, 16), "0.bias": torch.zeros(8), "2.weight": torch.zeros(4, 8),
              "2.bias": torch.zeros(4)}
    with pytest.raises(ValueError, match=r"^0: its bias is computed by a parametrization"):
        load_shrunk_state_dict(fresh, narrow)
    assert fresh[0].weight.shape == (12, 16)  # nothing changed
    folded = build()
    fold_parametrizations_(folded)
    plain = {k: v for k, v in nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).state_dict().items()}
    load_shrunk_state_dict(folded, plain)
    assert torch.equal(folded[0].weight, plain["0.weight"])



class _AttentionThenLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.att = nn.MultiheadAttention(16, 4, batch_first=True)
        self.rnn, self.head = nn.LSTM(16, 12, batch_first=True), nn.Linear(12, 3)

    def forward(self, x):
        attended, _ = self.att(x, x, x, need_weights=False)
        out, _ = self.rnn(attended)
        return self.head(out[:, -1])


def test_a_model_narrowed_by_a_first_load_narrows_again_to_a_narrower_state_or_refuses_a_wider_one_unchanged():
    """A second load_shrunk_state_dict into a model already holding a HeadPrunedAttention resized its projections
    (plain Linear layers) and the LSTM but kept its head count: the load failed ("the state keeps heads [2], but
    this module has 2 head(s)") and left a model whose forward failed."""
    from litcompress.pruning.recurrent import prune_units_

    x = torch.randn(2, 5, 16)
    states = []
    for fraction in (0.5, 0.75):
        model = _AttentionThenLSTM().eval()
        prune_heads_(model, fraction)
        prune_units_(model, fraction)
        shrunk = shrink(model, (x,)).model.eval()
        with torch.no_grad():
            states.append((shrunk.state_dict(), shrunk(x)))
    fresh = _AttentionThenLSTM().eval()
    for state, expected in states:  # half the heads, then a quarter
        load_shrunk_state_dict(fresh, state)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), expected)
    assert fresh.att.num_heads == 1
    with pytest.raises(ValueError, match=r"att: the state dict's attention has 8 inner channels.*not a shrunk state"):
        load_shrunk_state_dict(fresh, states[0][0])  # wider than the model now is
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), states[1][1])  # refused before anything changed


@pytest.mark.parametrize("layer, bias_shape", [(nn.Linear(4, 16), (20,)), (nn.Linear(4, 3), (5,)),
                                               (nn.Linear(4, 3), (3, 1)), (nn.Conv2d(3, 16, 3), (2,)),
                                               (nn.ConvTranspose2d(6, 8, 3, groups=2), (6,))])
def test_a_bias_that_is_not_one_value_per_output_is_refused_and_the_model_left_as_it_was(layer, bias_shape):
    """The layer took a bias of any shape (a Linear(4, 16) with 20 values), and failed at its first forward."""
    model = nn.Sequential(layer)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    state["0.bias"] = torch.zeros(bias_shape)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"0: the state dict's bias has shape {re.escape(str(bias_shape))}.*one "
                                         "value per output"):
        load_shrunk_state_dict(model, state)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())


class CompilesItsBody(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.compile(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU()),
                                  backend="eager")
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.mark.parametrize("compiled_root", [False, True])
def test_a_shrunk_state_loads_into_a_model_that_compiles_a_part(compiled_root):
    """shrink returns an eager copy, keyed `body.0.weight`; a model of the class that compiles `body` keys it
    `body._orig_mod.0.weight`: the load failed with torch's missing and unexpected keys (compress renamed them)."""
    from litcompress.pruning import prune_model_
    from litcompress.pruning.shrink import shrink

    def build() -> nn.Module:
        model = CompilesItsBody()
        return torch.compile(model, backend="eager") if compiled_root else model

    torch.manual_seed(0)
    model, x = build(), torch.randn(4, 8)
    prune_model_(model, "ln_structured", 0.5, n=2, dim=0, scope="local")
    with torch.no_grad():
        masked = model(x)
    state = shrink(model, (x,)).model.state_dict()
    assert "body.0.weight" in state
    fresh = load_shrunk_state_dict(build(), state)
    with torch.no_grad():
        assert torch.allclose(fresh(x), masked, atol=1e-6)
    assert fresh.state_dict().keys() == build().state_dict().keys()  # its own keys, narrowed in place


def test_a_compiled_part_shared_under_two_names_and_its_modules_versions_are_keyed_as_the_model_keys_them():
    """A compiled block at two attributes is in the state dict under both: the second name was left eager (missing
    and unexpected keys); the renamed state keeps the modules' versions (`_metadata`), as a batch norm reads them."""
    from litcompress.pruning.narrow import keyed_as_compiled_parts
    from litcompress.pruning.shrink import shrink

    class Shares(nn.Module):
        def __init__(self, compiled: bool) -> None:
            super().__init__()
            body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
            self.body = torch.compile(body, backend="eager") if compiled else body
            self.body2 = self.body
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body2(self.body(x)))

    torch.manual_seed(1)
    source, x = Shares(compiled=False).eval(), torch.randn(5, 4)
    prune_([(source.body[0], "weight")], "ln_structured", 0.5, n=1, dim=0, scope="local")
    with torch.no_grad():
        masked = source(x)
    state = shrink(source, (x,)).model.state_dict()
    fresh = Shares(compiled=True).eval()
    keyed = keyed_as_compiled_parts(fresh, state)
    assert set(keyed) == set(fresh.state_dict())
    assert keyed._metadata["body._orig_mod.1"] == state._metadata["body.1"]  # the batch norm's version
    load_shrunk_state_dict(fresh, state)
    with torch.no_grad():
        assert torch.allclose(fresh(x), masked, atol=1e-6)
