"""The framework-free pipeline on real models, real pruning/quantization kernels and real files."""

from __future__ import annotations

import dataclasses
import os
import re
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from litcompress.data import load_digits_tensors
from litcompress.pipeline import CompressionConfig, PruneConfig, compress, prune_targets
from litcompress.pipeline.compress import PRUNED_STATE_FILE, SHRUNK_STATE_FILE, SLOWER, _slower_int8, _slower_shrunk
from litcompress.pipeline.config import PrunableLayers
from litcompress.pruning import (SparseLinear, is_pruned, make_permanent_, permanent_state_dict, prune_, prune_model_,
                                 removable_channels)
from litcompress.pruning.engine import deepcopy_model, pruned_targets
from litcompress.pruning.schedules import PolynomialDecay
from litcompress.quantization import AccuracyCriterion, PTQConfig, QuantizationGoalWarning, load_quantized, quantize
from litcompress.report.compression import Latency, StageMetrics
from litcompress.report.size import serialized_weights
from tests.conftest import CountsItsCalls, ReluMLP, TimesBuffer, agreeing_with, sgd_fine_tune

FAST = dict(latency_repeats=2, export=False)


@pytest.fixture(scope="module")
def digits():
    splits = load_digits_tensors(seed=0)
    return tuple(t for split in splits for t in split.tensors)  # x_train, y_train, x_val, y_val, x_test, y_test


def accuracy(x, y):
    def evaluate(model):
        with torch.no_grad():
            return float((model(x).argmax(1) == y).float().mean())
    return evaluate


def mlp(*widths: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-2], widths[-1]))


def train(model, x, y, steps=150, step_fn=None):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for t in range(1, steps + 1):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if step_fn is not None:
            step_fn(t)
    return model.eval()


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    return train(mlp(64, 96, 96, 10), digits[0], digits[1])


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


class EmbeddedAttention(nn.Module):
    """An embedding, an attention and a Linear head: weights the sparsity column must all count."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embedding(ids)
        return self.head(self.attention(h, h, h, need_weights=False)[0].mean(1))


def test_the_sparsity_column_counts_embeddings_and_attention_projections_a_run_prunes():
    from litcompress.pipeline.compress import weight_sparsity

    model = EmbeddedAttention()
    with torch.no_grad():
        model.embedding.weight[:, :4] = 0  # what --prune-embeddings zeroes: dims
        model.attention.in_proj_weight[:4] = 0  # and --prune-heads: a head's query rows
        model.head.weight[0] = 0
    embedding, projections = model.embedding.weight, model.attention.in_proj_weight
    linear = [model.attention.out_proj.weight, model.head.weight]
    for embeddings in (False, True):
        for attentions in (False, True):
            tensors = linear + [embedding] * embeddings + [projections] * attentions
            zeros = sum(int((t == 0).sum()) for t in tensors)
            assert weight_sparsity(model, embeddings=embeddings, attentions=attentions) == pytest.approx(
                zeros / sum(t.numel() for t in tensors))


def test_every_stage_runs_on_a_copy_and_the_last_is_measured_from_its_file(trained, digits, tmp_path):
    before = state_of(trained)
    x_val, y_val = digits[2], digits[3]
    config = CompressionConfig(
        prune=PruneConfig(sparsity=0.5, method="ln_structured"),
        quantize=PTQConfig(approach="dynamic", backends=("torch_ao", "onnxruntime"),
                           accuracy=AccuracyCriterion(tolerable_loss=0.05)),
        latency_repeats=3, num_threads=1,
    )
    tested: list[nn.Module] = []

    def test_accuracy(model):
        tested.append(model)
        return accuracy(digits[4], digits[5])(model)

    result = compress(trained, config, eval_fn=accuracy(x_val, y_val), test_fn=test_accuracy,
                      example_inputs=x_val[:32], calibration_data=[(digits[0][:128], None)], output_dir=tmp_path,
                      metric_name="val_acc", test_metric_name="test_acc")
    # The report-only test metric is taken as each stage is made, on the model its row measures; the last stage's
    # twice: in memory, then as its file read back, which replaces it in the report.
    reported = [result.stage_models[s.stage] for s in result.report.stages]
    assert len(tested) == len(reported) + 1 and tested[:-2] == reported[:-1] and tested[-1] is reported[-1]
    assert isinstance(tested[-2], nn.Sequential) and tested[-2] is not tested[-1]
    # The user's model is untouched: same values, no pruning re-parametrisation.
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())
    assert not any(is_pruned(m, "weight") for m in trained.modules())

    report = result.report
    assert [s.stage for s in report.stages] == ["input", "pruned", "shrunk", "quantized"]
    assert all(s.latency is not None and 0 < s.latency.min_ms <= s.latency.median_ms <= s.latency.max_ms
               for s in report.stages)
    assert report.metric_name == "val_acc" and report.test_metric_name == "test_acc"
    assert report.num_threads == 1 and report.batch_size == 32
    # Structured pruning zeroed half the rows of each hidden layer (the classifier is left whole) ...
    pruned = result.stage_models["pruned"]
    assert [int((m.weight.abs().sum(1) == 0).sum()) for m in pruned if isinstance(m, nn.Linear)] == [48, 48, 0]
    # ... which shrink removed, computing the same function.
    shrunk = result.stage_models["shrunk"]
    assert [m.out_features for m in shrunk if isinstance(m, nn.Linear)] == [48, 48, 10]
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x_val), pruned(x_val), rtol=1e-5, atol=1e-5)
    assert report["shrunk"].parameters == 64 * 48 + 48 + 48 * 48 + 48 + 48 * 10 + 10
    assert report["shrunk"].metric == report["pruned"].metric
    # The last stage is the exported file read back: its size is the file's, its outputs the in-memory model's.
    assert result.artifact is not None and result.artifact.exists()
    assert report["quantized"].size_bytes == result.artifact.stat().st_size
    assert report.artifact == str(result.artifact)
    loaded, recipe = load_quantized(result.artifact)
    assert recipe == result.quantization.recipe
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_val), result.model(x_val))
    assert report["quantized"].metric == pytest.approx(accuracy(x_val, y_val)(loaded))
    assert report["quantized"].test_metric == pytest.approx(accuracy(digits[4], digits[5])(loaded))
    # int8 weights are the shrunk model's: the row counts its parameters and zeros, whichever backend won
    for column in ("parameters", "nonzero_parameters", "weight_sparsity"):
        assert getattr(report["quantized"], column) == getattr(report["shrunk"], column)
    # The pruned state dict loads into the user's own architecture and reproduces the pruned stage.
    fresh = mlp(64, 96, 96, 10)
    fresh.load_state_dict(torch.load(tmp_path / PRUNED_STATE_FILE))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x_val), pruned(x_val))
    assert [title for title, _ in report.details] == ["Shrink", "Quantization trials"]


class _OwnLinear(nn.Module):
    """A layer class of one's own, with a `weight` the pipeline prunes when layer_types names it."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / in_features ** 0.5)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t() + self.bias


@pytest.mark.parametrize("head", [_OwnLinear, nn.Linear])
def test_the_sparsity_column_counts_the_layers_of_ones_own_the_run_prunes(head):
    """They were left out: "-" for a model of such layers only, the head's 88.4% for one pruned to 80%."""
    torch.manual_seed(0)
    model = nn.Sequential(_OwnLinear(16, 32), nn.ReLU(), _OwnLinear(32, 32), nn.ReLU(), head(32, 4))
    x = torch.randn(8, 16)
    config = CompressionConfig(prune=PruneConfig(sparsity=0.8, layer_types=(_OwnLinear, nn.Linear), exclude=()),
                               **FAST)
    result = compress(model, config, eval_fn=lambda m: float(m(x).sum()), example_inputs=x)
    weights = [m.weight for m in result.stage_models["pruned"] if hasattr(m, "weight")]
    expected = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert expected == pytest.approx(0.8, abs=1e-3)
    assert result.report["pruned"].weight_sparsity == pytest.approx(expected)
    assert result.report["input"].weight_sparsity == 0.0


class _LSTMHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.head = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


@pytest.mark.parametrize(("model_kind", "method", "optimizer_of", "warned"), [
    ("mlp", "l1_unstructured", "the user's model", True),
    ("mlp", "l1_unstructured", "the copy", False),
    ("mlp", "ln_structured", "the copy's head", False),  # the pruned layers left as they are: the loop's choice
    ("lstm", "ln_structured", "the user's model", True),  # units pruned, no weight target (it went unsaid)
    ("mlp", "l1_unstructured", "the copy's biases", False),  # BitFit: the copy trains (it was warned)
    ("mlp", "l1_unstructured", "the user's model, unfrozen in the loop", True),  # (it went unsaid)
])
def test_a_fine_tune_whose_optimizer_trains_the_users_model_is_said_to_have_trained_nothing(model_kind, method,
                                                                                           optimizer_of, warned):
    """An optimizer built before compress on the user's model stepped that model: every kept weight of the pruned
    stage was the input's, and the report said "10 rounds during 17 fine-tuning steps" without a word."""
    torch.manual_seed(0)
    model = ReluMLP(8, 16, 3) if model_kind == "mlp" else _LSTMHead()
    x = torch.randn(32, 8) if model_kind == "mlp" else torch.randn(32, 5, 8)
    y = torch.randint(0, 3, (32,))
    early = torch.optim.SGD(model.parameters(), lr=0.1)
    if optimizer_of.endswith("unfrozen in the loop"):
        model.requires_grad_(False)

    def fine_tune(work: nn.Module, step) -> None:
        work.requires_grad_(True)
        model.requires_grad_(True)
        biases = [p for name, p in work.named_parameters() if name.endswith("bias")]
        optimizer = {"the user's model": early, "the user's model, unfrozen in the loop": early,
                     "the copy": torch.optim.SGD(work.parameters(), lr=0.1),
                     "the copy's head": torch.optim.SGD(work.head.parameters(), lr=0.1),
                     "the copy's biases": torch.optim.SGD(biases, lr=0.1)}[optimizer_of]
        for t in range(1, 9):
            optimizer.zero_grad()
            for net in (model, work):  # both forward: only the optimizer's parameters step
                nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
            step(t)

    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, method=method), quantize=None, **FAST)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = compress(model, config, eval_fn=lambda m: float(m(x).sum()), example_inputs=x,
                          fine_tune=fine_tune, fine_tune_steps=8)
    said = [m for m in result.report.messages if "none changed a weight of the model it was given" in m]
    assert len(said) == int(warned)
    assert [str(w.message) for w in caught if "none changed a weight" in str(w.message)] == said
    if said:
        assert said[0].startswith("fine_tune made 8 optimizer steps, and none changed a weight of the model it was "
                                  "given, a copy of yours")


class _TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x)).mean(1))


ATTENTIONS_REMEDY = ("the attentions' projections with nn.MultiheadAttention among the layer_types and their names "
                     "(in_proj_weight, or q/k/v_proj_weight) in PruneConfig(parameter_names=...) (from Python)")
EMBEDDINGS_REMEDY = ("the pipeline prunes the embeddings when nn.Embedding and nn.EmbeddingBag are among "
                     "PruneConfig(layer_types=...) (from Python: the CLI's --prune-embeddings takes structured "
                     "methods)")


@pytest.mark.parametrize("given", [{}, {"exclude": ("emb", "enc.layers.0.self_attn")}, {"heads": 0.5}])
def test_unstructured_pruning_notes_the_weight_matrices_its_layer_types_leave_dense(given):
    """An embedding and an attention's in_proj_weight (42% of this model) stayed dense without a word, where
    ModelPruning and the IMP driver warn of them."""
    torch.manual_seed(0)
    model = _TinyEncoder().eval()
    x = torch.randint(0, 20, (4, 6))
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, **given), quantize=None, **FAST)
    result = compress(model, config, eval_fn=lambda m: 0.0, example_inputs=(x,))
    said = [m for m in result.report.messages if "outside its layer types dense" in m]
    if "exclude" in given:
        assert said == []
    elif "heads" in given:  # the attention goes by heads: the embedding only
        assert said == ["unstructured pruning leaves 1 weight matrix outside its layer types dense (emb.weight: 320 "
                        f"of the model's 2,595 parameters, 12%); {EMBEDDINGS_REMEDY}."]
    else:
        assert said == ["unstructured pruning leaves 2 weight matrices outside its layer types dense (emb.weight, "
                        "enc.layers.0.self_attn.in_proj_weight: 1,088 of the model's 2,595 parameters, 42%); "
                        f"{EMBEDDINGS_REMEDY} and {ATTENTIONS_REMEDY}, or by heads, PruneConfig(heads=...) (CLI "
                        "--prune-heads), where heads can be pruned."]
    if not said:
        return
    layer_types = (*PrunableLayers, nn.Embedding, nn.MultiheadAttention)  # the remedies followed: nothing left dense
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, layer_types=layer_types,
                                                 parameter_names=("weight", "in_proj_weight"), **given),
                               quantize=None, **FAST)
    result = compress(model, config, eval_fn=lambda m: 0.0, example_inputs=(x,))
    assert not [m for m in result.report.messages if "outside its layer types dense" in m]
    assert float((result.stage_models["pruned"].emb.weight == 0).float().mean()) > 0.1


class _TiedAndKeyed(nn.Module):
    """Two embeddings sharing one matrix, and an attention with keys and values of their own width (kdim/vdim),
    whose heads the pipeline cannot prune."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec = nn.Embedding(50, 16), nn.Embedding(50, 16)
        self.dec.weight = self.enc.weight
        self.att = nn.MultiheadAttention(16, 4, batch_first=True, kdim=8, vdim=8)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(x) + self.dec(x)
        return self.out(self.att(h, h[..., :8], h[..., :8])[0].mean(1))


def test_the_dense_matrices_note_counts_a_tied_matrix_once_and_offers_heads_only_where_they_can_be_pruned():
    """A tied embedding was counted under both holders (199% of the weights); heads=... was offered for an
    attention with kdim/vdim, which it refuses."""
    model = _TiedAndKeyed().eval()
    x = torch.randint(0, 50, (2, 5))
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5), quantize=None, **FAST)
    result = compress(model, config, eval_fn=lambda m: 0.0, example_inputs=(x,))
    said = [m for m in result.report.messages if "outside its layer types dense" in m]
    assert said == ["unstructured pruning leaves 4 weight matrices outside its layer types dense (enc.weight, "
                    "att.q_proj_weight, att.k_proj_weight, att.v_proj_weight: 1,312 of the model's 1,700 parameters, "
                    f"77%); {EMBEDDINGS_REMEDY} and {ATTENTIONS_REMEDY}."]  # (no heads: kdim/vdim)


@st.composite
def pruning_cases(draw):
    widths = [draw(st.integers(2, 24)) for _ in range(draw(st.integers(1, 3)))]
    structured = draw(st.booleans())
    return widths, structured, draw(st.floats(0.0, 0.95)), draw(st.integers(0, 2**16))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=pruning_cases())
def test_sparsity_is_hit_exactly_and_shrinking_keeps_the_outputs(case):
    widths, structured, sparsity, seed = case
    torch.manual_seed(seed)
    model = mlp(8, *widths, 3).eval()
    x = torch.randn(16, 8)
    config = CompressionConfig(prune=PruneConfig(sparsity=sparsity,
                                                 method="ln_structured" if structured else "l1_unstructured"), **FAST)
    result = compress(model, config, eval_fn=lambda m: float(m(x).sum()), example_inputs=x)
    pruned = result.stage_models["pruned"]
    linears = [m for m in pruned if isinstance(m, nn.Linear)]
    if structured:  # each hidden layer loses exactly round(s * rows) rows, one always kept; the output layer none
        assert [int((m.weight.abs().sum(1) == 0).sum()) for m in linears] == \
               [min(round(sparsity * m.out_features), m.out_features - 1) for m in linears[:-1]] + [0]
    else:  # globally, exactly round(s * n) of all the weights
        n = sum(m.weight.numel() for m in linears)
        assert sum(int((m.weight == 0).sum()) for m in linears) == round(sparsity * n)
        assert result.report["pruned"].weight_sparsity == pytest.approx(round(sparsity * n) / n)
    assert [t.name for t in result.sparsity.tensors] == [f"{i}.weight" for i, m in enumerate(pruned)
                                                         if isinstance(m, nn.Linear) and (m is not linears[-1]
                                                                                          or not structured)]
    # A hidden unit left without weights is removed (in an MLP every one can be); shrink adds a stage only then.
    dead = [int((m.weight.abs().sum(1) == 0).sum()) for m in linears[:-1]]
    assert ("shrunk" in result.stage_models) == (sum(dead) > 0)
    if sum(dead):
        shrunk = result.stage_models["shrunk"]
        # At least the dead units go (more, when removing them leaves a next-layer unit without inputs; a layer
        # keeps one unit).
        widths = [m.out_features for m in shrunk if isinstance(m, nn.Linear)]
        assert widths[-1] == 3 and all(w <= max(1, m.out_features - d) for w, m, d in zip(widths, linears, dead))
        with torch.no_grad():
            torch.testing.assert_close(shrunk(x), pruned(x), rtol=1e-4, atol=1e-5)


def test_fine_tuning_runs_the_schedule_in_the_training_loop(trained, digits):
    x, y = digits[0], digits[1]
    schedule = PolynomialDecay(final_sparsity=0.9, begin=10, end=60, frequency=10)
    seen: list[tuple[int, float]] = []

    def fine_tune(model, step):
        def after_step(t):
            step(t)
            weights = [m.weight for m in model if isinstance(m, nn.Linear)]
            zeros = sum(int((w == 0).sum()) for w in weights)
            seen.append((t, zeros / sum(w.numel() for w in weights)))
        train(model, x, y, steps=80, step_fn=after_step)

    config = CompressionConfig(prune=PruneConfig(schedule=schedule), **FAST)
    result = compress(trained, config, eval_fn=accuracy(digits[2], digits[3]), example_inputs=x[:8],
                      fine_tune=fine_tune, fine_tune_steps=80)
    # Sparsity is exactly the schedule's at every pruning point, and pruned weights stay zero in between.
    n = sum(m.weight.numel() for m in trained if isinstance(m, nn.Linear))
    previous = 0.0
    for t, sparsity in seen:
        assert sparsity == (round(schedule.target(t) * n) / n if schedule.should_prune(t) else previous), t
        previous = sparsity
    assert [t for t, _ in seen] == list(range(1, 81)) and previous == round(0.9 * n) / n
    # t=10 is the schedule's start (target 0); 20..60 prune.
    assert "5 rounds during 80 fine-tuning steps" in result.report["pruned"].description
    # the pruned model loads weights as a plain model does: its pruners' hooks went with them (they masked its zeros)
    pruned = result.stage_models["pruned"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruned.load_state_dict(pruned.state_dict())
    assert not pruned_targets(pruned) and not any(m._load_state_dict_post_hooks for m in pruned.modules())
    # Fine-tuning recovered a usable model: far above the same sparsity reached in one shot (0.25; 0.78-0.8 after
    # fine-tuning, by the host's float kernels).
    one_shot = deepcopy_model(trained)
    prune_model_(one_shot, "l1_unstructured", 0.9)
    assert result.report["pruned"].metric > accuracy(digits[2], digits[3])(one_shot) + 0.3


def padded_cnn() -> nn.Sequential:
    """Zero-padded 3x3 convs with BatchNorm, as most CNNs have them."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


def compress_on_images(digits, model: nn.Module, prune: PruneConfig, steps: int, **config):
    """Train `model` on the digits as 1x8x8 images for `steps`, then compress it while fine-tuning as long again;
    returns the result and the validation images."""
    x, y = digits[0].view(-1, 1, 8, 8), digits[1]
    x_val, y_val = digits[2].view(-1, 1, 8, 8), digits[3]
    torch.manual_seed(0)
    model = train(model, x, y, steps=steps)

    def fine_tune(m, step):
        train(m, x, y, steps=steps, step_fn=step)

    result = compress(model, CompressionConfig(prune=prune, **FAST, **config), eval_fn=accuracy(x_val, y_val),
                      example_inputs=x_val[:8], fine_tune=fine_tune, fine_tune_steps=steps)
    return result, x_val


@pytest.mark.parametrize("zero_batch_norm", [True, False])
def test_zero_batch_norm_lets_shrink_remove_filters_before_a_padded_conv(digits, zero_batch_norm):
    prune = PruneConfig(sparsity=0.5, method="ln_structured", zero_batch_norm=zero_batch_norm)
    result, x_val = compress_on_images(digits, padded_cnn(), prune, steps=40)
    first = next(layer for layer in result.shrink.layers if layer.name == "0")  # feeds the padded conv "3"
    pruned, shrunk = result.stage_models["pruned"], result.stage_models["shrunk"]
    if zero_batch_norm:  # every pruned filter of both convs is gone, and the function is the pruned model's
        assert [layer.channels_after for layer in result.shrink.layers] == [8, 8] and first.left == 0
        assert torch.equal(pruned[1].weight[pruned[0].weight.flatten(1).abs().sum(1) == 0], torch.zeros(8))
    else:  # the pruned filters of the first conv output ReLU(BatchNorm shift) != 0: they have to stay
        assert first.left > 0
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x_val), pruned(x_val), rtol=1e-5, atol=1e-5)


class BiasedDecoder(nn.Module):
    """Zero-padded convs with biases and no BatchNorm, and a transposed conv upsampling into one (a U-Net decoder):
    a pruned filter still outputs its bias, a constant the padded conv after it does not see as one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.up, self.out = nn.ConvTranspose2d(8, 8, 2, stride=2), nn.Conv2d(8, 10, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(torch.relu(self.conv2(torch.relu(self.conv1(x))))))
        return self.out(h).mean((2, 3))


@pytest.mark.parametrize("zero_batch_norm", [True, False])
def test_biases_of_pruned_filters_without_a_batch_norm_are_held_at_zero_so_the_filters_go(digits, zero_batch_norm):
    prune = PruneConfig(sparsity=0.5, method="ln_structured", zero_batch_norm=zero_batch_norm)
    result, x_val = compress_on_images(digits, BiasedDecoder(), prune, steps=30)
    pruned, shrunk = result.stage_models["pruned"], result.stage_models["shrunk"]
    said = [m for m in result.report.messages if m.startswith("zero_batch_norm: the biases")]
    widths = {name: shrunk.get_submodule(name).out_channels for name in ("conv1", "conv2", "up")}
    if zero_batch_norm:  # every pruned filter's bias is zero: its channel is zero, and goes
        assert widths == {"conv1": 4, "conv2": 4, "up": 4}
        for name in ("conv1", "conv2", "up"):
            layer = pruned.get_submodule(name)
            rows = layer.weight.transpose(0, 1) if name == "up" else layer.weight
            assert torch.equal(layer.bias[rows.flatten(1).abs().sum(1) == 0], torch.zeros(4))
        assert said == ["zero_batch_norm: the biases of pruned channels are held at zero in 3 layer(s) without a "
                        "BatchNorm before a place that needs zeros (conv1, conv2, up), so their channels output zero "
                        "and shrink can remove them where only a zero passes too (a zero-padded conv, a gate, a "
                        "product with per-token weights)."]
    else:  # the pruned filters output ReLU(bias) into padded convs: those that are not zero stay
        assert not said and any(width > 4 for width in widths.values())
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x_val), pruned(x_val), rtol=1e-5, atol=1e-5)


class GatedIntoConcatenation(nn.Module):
    """A biased conv read by a squeeze-and-excitation gate, whose output is concatenated before a BatchNorm: the
    BatchNorm held at zero comes after the gate, which reads a pruned filter's bias."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.squeeze, self.excite = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.side = nn.Conv2d(8, 4, 1)
        self.bn = nn.BatchNorm2d(12)
        self.head = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(torch.relu(self.stem(x))))
        h = h * torch.sigmoid(self.excite(torch.relu(self.squeeze(h.mean((2, 3), keepdim=True)))))
        return self.head(self.bn(torch.cat([h, self.side(h)], 1)).mean((2, 3)))


def test_a_biased_layer_gated_before_its_batch_norm_has_its_pruned_biases_held_so_its_filters_go(digits):
    """Its BatchNorm was held at zero and its biases were not: pruned filters reached the gate as ReLU(bias), and
    shrink kept every one (half of conv's filters zeroed for nothing)."""
    prune = PruneConfig(sparsity=0.5, method="ln_structured")
    result, x_val = compress_on_images(digits, GatedIntoConcatenation(), prune, steps=30)
    pruned, shrunk = result.stage_models["pruned"], result.stage_models["shrunk"]
    zero_filters = pruned.conv.weight.flatten(1).abs().sum(1) == 0
    assert int(zero_filters.sum()) == 4 and torch.equal(pruned.conv.bias[zero_filters], torch.zeros(4))
    assert (shrunk.conv.out_channels, shrunk.squeeze.in_channels, shrunk.excite.out_channels) == (4, 4, 4)
    assert any(m.startswith("zero_batch_norm: the biases of pruned channels are held at zero in ") and "conv" in m
               for m in result.report.messages)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x_val), pruned(x_val), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_residuals", [True, False])
def test_residual_groups_are_pruned_as_one_and_shrunk(digits, group_residuals):
    from tests.pruning.test_groups import ResNet

    prune = PruneConfig(sparsity=0.5, method="ln_structured", group_residuals=group_residuals)
    result, x_val = compress_on_images(digits, ResNet(), prune, steps=30)
    pruned, shrunk = result.stage_models["pruned"], result.stage_models["shrunk"]
    stream = ("stem.0", "blocks.0.conv2", "blocks.1.conv2")
    zero_filters = {name: int((m.weight.flatten(1).abs().sum(1) == 0).sum())
                    for name, m in pruned.named_modules() if isinstance(m, nn.Conv2d)}
    widths = {name: m.out_channels for name, m in shrunk.named_modules() if isinstance(m, nn.Conv2d)}
    left_out = [m for m in result.report.messages if m.startswith("removable_only:")]
    if group_residuals:  # the same 8 channels in the whole stream: gone from every layer writing or reading it
        assert all(zero_filters[name] == 8 for name in zero_filters)  # every conv lost exactly half its filters
        assert set(widths.values()) == {8} and shrunk.head[2].in_features == 8
        assert result.report["shrunk"].parameters < 0.3 * result.report["input"].parameters
        assert not left_out
    else:  # layer by layer, the stream's channels could not go: its layers are left whole (removable_only)
        assert {name: zero_filters[name] for name in stream} == dict.fromkeys(stream, 0)
        assert zero_filters["blocks.0.conv1"] == zero_filters["blocks.1.conv1"] == 8
        assert [widths[name] for name in stream] == [16, 16, 16]
        (said,) = left_out
        assert said.startswith("removable_only: 3 layer(s) left unpruned") and all(name in said for name in stream)
    assert any(m.startswith("group_residuals:") for m in result.report.messages) == group_residuals
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x_val), pruned(x_val), rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("config", [dict(exclude=("stem.0",)), dict(layer_types=(nn.Conv2d,))])
def test_a_residual_group_partly_among_the_targets_is_left_unpruned_not_masked_in_vain(digits, config):
    """exclude naming one layer of the stream, or layer_types leaving the Linear head out (the default exclude then
    took the stream's last conv for the classifier): the stream's other layers were pruned layer by layer, and shrink
    could remove none of their channels. Now every pruned channel goes (removable_only), and the report says which
    layers stay whole and why; with the head out of layer_types, the default exclude is the head and the stream is
    pruned as one."""
    from tests.pruning.test_groups import ResNet

    prune = PruneConfig(sparsity=0.5, method="ln_structured", **config)
    result, x_val = compress_on_images(digits, ResNet(), prune, steps=30)
    pruned, shrunk = result.stage_models["pruned"], result.stage_models["shrunk"]
    zero_filters = {name: int((m.weight.flatten(1).abs().sum(1) == 0).sum())
                    for name, m in pruned.named_modules() if isinstance(m, nn.Conv2d)}
    widths = {name: m.out_channels for name, m in shrunk.named_modules() if isinstance(m, nn.Conv2d)}
    assert all(widths[name] == m.out_channels - zero_filters[name]
               for name, m in pruned.named_modules() if isinstance(m, nn.Conv2d))  # every pruned filter removed
    said = [m for m in result.report.messages if m.startswith("removable_only:")]
    if "exclude" in config:
        assert zero_filters["blocks.0.conv2"] == zero_filters["blocks.1.conv2"] == 0
        assert zero_filters["blocks.0.conv1"] == zero_filters["blocks.1.conv1"] == 8
        assert any("blocks.0.conv2, blocks.1.conv2 write into residual groups with stem.0, which is not pruned" in m
                   for m in said)
    else:
        assert set(zero_filters.values()) == {8} and not said
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x_val), pruned(x_val), rtol=1e-5, atol=1e-5)


def test_a_test_metric_without_a_name_is_reported_as_test_and_rounding_is_no_change(tmp_path):
    """test_fn without test_metric_name: the metric was computed for every stage and shown nowhere. And a loss the
    ONNX file reproduces to the digits the report shows was said to differ from the in-memory model's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    x = torch.randn(16, 64)
    reference = model(x).detach()
    result = compress(model, CompressionConfig(prune=PruneConfig(sparsity=0.5), fp32_format="onnx", latency_repeats=2),
                      eval_fn=lambda m: -float((m(x) - reference).abs().mean()), test_fn=lambda m: 0.123,
                      example_inputs=x, output_dir=tmp_path)
    assert result.report.test_metric_name == "test"
    assert "test" in result.report.table().splitlines()[0] and "0.123" in result.report.markdown()
    assert not any("the exported file scores" in m for m in result.report.messages)


def test_one_shot_structured_pruning_groups_residuals_and_zeroes_batch_norms_too(digits):
    from tests.pruning.test_groups import ResNet

    x_val, y_val = digits[2].view(-1, 1, 8, 8), digits[3]
    torch.manual_seed(0)
    model = train(ResNet(), digits[0].view(-1, 1, 8, 8), digits[1], steps=30)
    prune = PruneConfig(sparsity=0.5, method="ln_structured", schedule="oneshot")
    result = compress(model, CompressionConfig(prune=prune, **FAST), eval_fn=accuracy(x_val, y_val),
                      example_inputs=x_val[:8])
    pruned, shrunk = result.stage_models["pruned"], result.stage_models["shrunk"]
    # the stream pruned as one group, and every pruned channel's BatchNorm at zero: all of them leave, even before
    # the zero-padded convs, as after gradual pruning
    assert {m.out_channels for m in shrunk.modules() if isinstance(m, nn.Conv2d)} == {8}
    assert all(layer.left == 0 for layer in result.shrink.layers)
    messages = result.report.messages
    assert any(m.startswith("group_residuals:") for m in messages)
    assert any(m.startswith("zero_batch_norm:") for m in messages)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x_val), pruned(x_val), rtol=1e-5, atol=1e-5)

def test_keep_multiple_of_keeps_channel_counts_that_fill_simd_blocks(digits):
    model = nn.Sequential(nn.Conv2d(1, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
                          nn.Conv2d(24, 40, 3, padding=1, bias=False), nn.BatchNorm2d(40), nn.ReLU(),
                          nn.Conv2d(40, 8, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    prune = PruneConfig(sparsity=0.5, method="ln_structured")
    result, x_val = compress_on_images(digits, model, prune, steps=20, keep_multiple_of=8)
    # half of 24 is 12, rounded up to 16 kept; half of 40 is 20 -> 24; 4 of the 1x1 conv's 8 -> 8 (none pruned)
    widths = [m.out_channels for m in result.stage_models["shrunk"] if isinstance(m, nn.Conv2d)]
    assert widths == [16, 24, 8]
    assert "channels kept in multiples of 8" in result.report["pruned"].description
    with torch.no_grad():
        torch.testing.assert_close(result.stage_models["shrunk"](x_val), result.stage_models["pruned"](x_val),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="keep_multiple_of=0\\): expected an int >= 1"):
        CompressionConfig(keep_multiple_of=0)


def test_a_keep_multiple_of_that_leaves_every_channel_is_refused_and_one_that_leaves_some_is_said():
    """keep_multiple_of=128 on layers of 64 channels pruned nothing, without a word, beside a report row described
    as ln_structured pruning to 80%."""
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    prune = PruneConfig(sparsity=0.8, method="ln_structured")

    def run(model: nn.Module, multiple: int):
        return compress(model, CompressionConfig(prune=prune, keep_multiple_of=multiple, export=False,
                                                 latency_repeats=1), eval_fn=lambda m: 1.0, example_inputs=x)

    narrow = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    with pytest.raises(ValueError, match=r"CompressionConfig\(keep_multiple_of=64\) keeps every channel of every "
                                         r"layer to prune at sparsity 80% \(channels per layer: 0.weight \(64\), "
                                         r"2.weight \(64\)\)"):
        run(narrow, 64)
    mixed = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 2))
    result = run(mixed, 64)
    assert any(m.startswith("CompressionConfig(keep_multiple_of=64): 1 of 2 layer(s) keep all their channels at "
                            "sparsity 80%") and
               m.endswith(": 2.weight (64).") for m in result.report.messages)
    assert result.model[0].out_features == 64 and result.model[2].out_features == 64  # 256 -> 64: a multiple
    # a grouped conv loses as many channels in each group: at 50%, 2 of each group's 4 kept make 8, a multiple of 4
    # (each group's count was rounded up to 4 instead: every channel kept, and the config refused); a multiple of 16
    # needs all 4 of each group
    def grouped() -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(),
                             nn.Conv2d(16, 2, 1))

    x = torch.randn(8, 3, 5, 5)
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured"), keep_multiple_of=4,
                               export=False, latency_repeats=1)
    shrunk = compress(grouped(), config, eval_fn=lambda m: 1.0, example_inputs=x).model
    assert [shrunk[0].out_channels, shrunk[2].in_channels, shrunk[2].out_channels, shrunk[2].groups] == [8, 8, 8, 4]
    with pytest.raises(ValueError, match=r"\(channels per layer: 0.weight \(16 in 4 groups\), 2.weight \(16 in 4 "
                                         r"groups\)\)"):
        compress(grouped(), dataclasses.replace(config, keep_multiple_of=16), eval_fn=lambda m: 1.0, example_inputs=x)


def test_keep_multiple_of_rounds_what_shrink_removes_after_unstructured_pruning(trained, digits):
    config = CompressionConfig(prune=PruneConfig(sparsity=0.97), keep_multiple_of=16, **FAST)
    result = compress(trained, config, eval_fn=accuracy(digits[2], digits[3]), example_inputs=digits[2][:8])
    exact = [int((m.weight != 0).any(dim=1).sum()) for m in result.stage_models["pruned"] if isinstance(m, nn.Linear)]
    shrunk = [m.out_features for m in result.stage_models["shrunk"] if isinstance(m, nn.Linear)]
    assert exact[:2] != [96, 96]  # 97% sparsity leaves hidden units without weights
    assert shrunk[:2] == [min(96, -(-n // 16) * 16) for n in exact[:2]] and shrunk[2] == 10


class RowTransformer(nn.Module):
    """Digits as sequences of 8 rows: a Linear embedding, torch's TransformerEncoder (2 layers), the mean over the
    rows, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x.view(-1, 8, 8))).mean(1))


def test_structured_pruning_prunes_only_what_shrink_can_remove(digits):
    x, y, x_val, y_val = digits[:4]
    torch.manual_seed(0)
    model = train(RowTransformer(), x, y, steps=20)

    def fine_tune(m, step):
        train(m, x, y, steps=20, step_fn=step)

    prune = PruneConfig(sparsity=0.5, method="ln_structured")
    feed_forward = [f"encoder.layers.{i}.linear1" for i in range(2)]
    assert [name for name, m in model.named_modules() for t, _ in prune_targets(model, prune) if t is m] == \
        feed_forward
    result = compress(model, CompressionConfig(prune=prune, **FAST), eval_fn=accuracy(x_val, y_val),
                      example_inputs=x_val[:8], fine_tune=fine_tune, fine_tune_steps=20)
    pruned, shrunk = result.stage_models["pruned"], result.stage_models["shrunk"]
    zero_rows = {name: int((m.weight.abs().sum(1) == 0).sum()) for name, m in pruned.named_modules()
                 if isinstance(m, nn.Linear)}
    assert {name: rows for name, rows in zero_rows.items() if rows} == dict.fromkeys(feed_forward, 16)
    assert [shrunk.get_submodule(name).out_features for name in feed_forward] == [16, 16]
    # per layer: 16 rows of linear1 (16 weights and a bias each) and the 16 matching columns of linear2
    assert result.report["shrunk"].parameters == result.report["input"].parameters - 2 * (16 * 17 + 16 * 16)
    (said,) = [m for m in result.report.messages if m.startswith("removable_only:")]
    assert said.startswith("removable_only: 5 layer(s) left unpruned") and "encoder.layers.1.linear2" in said
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x_val), pruned(x_val), rtol=1e-5, atol=1e-5)

    everything = PruneConfig(sparsity=0.5, method="ln_structured", removable_only=False)
    assert len(prune_targets(model, everything)) == 7  # embed, and out_proj, linear1, linear2 of both layers
    with pytest.raises(ValueError, match="shrink can remove the channels of none of the layers to prune"):
        prune_targets(nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.Linear(32, 10)), prune)



class UpConvNet(nn.Module):
    """A classifier on a U-Net path: the deep features come back up through a stride-2 transposed conv and meet the
    skip in a concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.enc2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.up, self.bn_up = nn.ConvTranspose2d(16, 8, 2, stride=2, bias=False), nn.BatchNorm2d(8)
        self.dec, self.bn3 = nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = torch.relu(self.bn1(self.enc1(x)))
        deep = torch.relu(self.bn2(self.enc2(nn.functional.max_pool2d(skip, 2))))
        up = torch.relu(self.bn_up(self.up(deep)))
        h = torch.relu(self.bn3(self.dec(torch.cat([up, skip], 1))))
        return self.head(nn.functional.adaptive_avg_pool2d(h, 1).flatten(1))


def test_structured_pruning_prunes_a_transposed_convs_output_channels_along_dim_1(digits):
    prune = PruneConfig(sparsity=0.5, method="ln_structured")
    result, x_val = compress_on_images(digits, UpConvNet(), prune, steps=30)
    pruned, shrunk = result.stage_models["pruned"], result.stage_models["shrunk"]
    up = pruned.up.weight  # [in, out, 2, 2]: output filters are dim 1; dim 0, its inputs, is left whole
    assert int((up.transpose(0, 1).flatten(1).abs().sum(1) == 0).sum()) == 4
    assert int((up.flatten(1).abs().sum(1) == 0).sum()) == 0
    widths = {name: (m.in_channels, m.out_channels) for name, m in shrunk.named_modules()
              if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))}
    assert widths == {"enc1": (1, 4), "enc2": (4, 8), "up": (8, 4), "dec": (4 + 4, 4)}
    assert shrunk.head.in_features == 4 and not any(m.startswith("removable_only:") for m in result.report.messages)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x_val), pruned(x_val), rtol=1e-5, atol=1e-5)

@given(fp32=st.floats(1e-3, 1e3), ratio=st.floats(0.1, 10), stage=st.sampled_from(["input", "pruned", "shrunk"]))
def test_an_int8_model_clearly_slower_than_its_fp32_model_is_said(fp32, ratio, stage):
    def row(name, median):
        return StageMetrics(name, name, latency=Latency(median / 2, median, median * 2))

    rows = ([] if stage == "input" else [row("input", 1.0)]) + [row(stage, fp32), row("quantized", fp32 * ratio)]
    said = _slower_int8(rows)
    if ratio > SLOWER * (1 + 1e-9):
        assert said.startswith(f"int8 does not pay off here: the quantized model ran {ratio:.2f}x slower than the "
                               f"{stage} fp32 model")
        assert f"stage_models[{stage!r}]" in said and "--quantize none" in said and "--min-speedup 1" in said
    elif ratio <= SLOWER * (1 - 1e-9):
        assert said is None
    assert _slower_int8([row("input", 1.0), row("shrunk", 5.0)]) is None  # not quantized


@given(before=st.floats(1e-3, 1e3), ratio=st.floats(0.1, 10), stage=st.sampled_from(["input", "pruned"]))
def test_a_shrunk_model_clearly_slower_than_the_stage_before_is_said(before, ratio, stage):
    """Widths shrunk to a non-multiple of 8 (512 -> 511) ran slower in five runs of five, without a word."""
    def row(name, median):
        return StageMetrics(name, name, latency=Latency(median / 2, median, median * 2))

    rows = ([] if stage == "input" else [row("input", 1.0)]) + [row(stage, before), row("shrunk", before * ratio),
                                                                  row("quantized", 1.0)]
    said = _slower_shrunk(rows)
    if ratio > SLOWER * (1 + 1e-9):
        assert said.startswith(f"shrink made the model smaller but not faster here: it ran {ratio:.2f}x slower than "
                               f"the {stage} model")
        assert "--keep-multiple-of 8" in said
        # widths already multiples of 8 (as --keep-multiple-of 8 leaves them): that advice would change nothing
        from litcompress.pruning.shrink import LayerShrink, ShrinkReport

        def report(*after: int) -> ShrinkReport:
            return ShrinkReport(tuple(LayerShrink(f"l{i}", "next", 32, width, 0) for i, width in enumerate(after)),
                                (), 100, 50)

        kept = _slower_shrunk(rows, report(16, 24))
        assert "Its widths are multiples of 8" in kept and "--keep-multiple-of" not in kept
        assert "(l1); CompressionConfig(keep_multiple_of=8)" in _slower_shrunk(rows, report(16, 20))
    elif ratio <= SLOWER * (1 - 1e-9):
        assert said is None
    assert _slower_shrunk([row("input", 1.0), row("pruned", 5.0)]) is None  # not shrunk


def test_a_metric_lost_to_one_shot_pruning_is_said_with_the_remedy(trained, digits):
    run = dict(eval_fn=accuracy(digits[2], digits[3]), example_inputs=digits[2][:8])
    harsh = compress(trained, CompressionConfig(prune=PruneConfig(sparsity=0.97), **FAST), **run).report
    assert harsh["pruned"].metric < 0.99 * harsh["input"].metric
    said = [m for m in harsh.messages if m.startswith("pruned in one shot without fine-tuning")]
    assert len(said) == 1 and f"from {harsh['input'].metric:.6g} to {harsh['pruned'].metric:.6g}" in said[0]
    assert "fine_tune=" in said[0] and "--prune-epochs" in said[0]
    # (each entry point's own way: CompressOnFitEnd takes no fine_tune=)
    assert "fine_tune_epochs=" in said[0] and "CompressOnFitEnd: a ModelPruning schedule in the fit" in said[0]
    mild = compress(trained, CompressionConfig(prune=PruneConfig(sparsity=0.05), **FAST), **run).report
    assert abs(mild["pruned"].metric - mild["input"].metric) <= 0.01 * mild["input"].metric
    assert not any(m.startswith("pruned in one shot") for m in mild.messages)
    # one shot follows no schedule: the description named the cubic one all the same
    assert harsh["pruned"].description.startswith("l1_unstructured global to 97.0%, one-shot, no fine-tuning")
    # a metric that improved (here: judged as a loss, so a lower accuracy is "better") needs no remedy
    as_loss = PTQConfig(backends=("torch_ao",), max_trials=1, accuracy=AccuracyCriterion(higher_is_better=False))
    improved = compress(trained, CompressionConfig(prune=PruneConfig(sparsity=0.97), quantize=as_loss, **FAST),
                        **run).report
    assert not any(m.startswith("pruned in one shot") for m in improved.messages)
    # without a quantize stage the direction is given as higher_is_better (compress_lightning's and the CLI's mode):
    # a loss that fell was said to need recovering
    one_shot = CompressionConfig(prune=PruneConfig(sparsity=0.97), **FAST)
    as_loss_only = compress(trained, one_shot, **run, higher_is_better=False).report
    assert not any(m.startswith("pruned in one shot") for m in as_loss_only.messages)
    as_accuracy = compress(trained, one_shot, **run, higher_is_better=True).report
    assert sum(m.startswith("pruned in one shot") for m in as_accuracy.messages) == 1


@pytest.mark.parametrize(("given", "error"), [
    ("max", r"compress\(higher_is_better='max'\): expected True, False \(a loss\) or None"),
    (1, r"compress\(higher_is_better=1\): expected True"),
    (True, r"compress\(higher_is_better=True\) against config.quantize.accuracy's higher_is_better=False"),
])
def test_a_metric_direction_that_is_no_bool_or_contradicts_the_quantization_goal_is_refused_before_any_stage(
        given, error, trained, digits):
    as_loss = PTQConfig(backends=("torch_ao",), max_trials=1, accuracy=AccuracyCriterion(higher_is_better=False))
    evaluated = []
    with pytest.raises((TypeError, ValueError), match=error):
        compress(trained, CompressionConfig(quantize=as_loss, **FAST), eval_fn=lambda m: evaluated.append(m) or 1.0,
                 example_inputs=digits[2][:8], higher_is_better=given)
    assert evaluated == []


@pytest.mark.parametrize("method", ["random_structured", "ln_structured"])
def test_each_structured_method_prunes_gradually_while_fine_tuning(trained, digits, method):
    """random_structured was handed ln_structured's norm `n`, which the gradual pruner refuses: every run with
    fine-tuning failed (one-shot ran)."""
    def fine_tune(model, step):
        train(model, digits[0], digits[1], steps=20, step_fn=step)

    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, method=method), **FAST)
    result = compress(trained, config, eval_fn=accuracy(digits[2], digits[3]), example_inputs=digits[2][:8],
                      fine_tune=fine_tune, fine_tune_steps=20)
    assert "during 20 fine-tuning steps" in result.report["pruned"].description
    hidden = [m for m in result.model if isinstance(m, nn.Linear)][:-1]
    widths = [m.out_features for m in trained if isinstance(m, nn.Linear)][:-1]
    assert [m.out_features for m in hidden] == [w - round(0.5 * w) for w in widths]  # half of each layer's units


@pytest.mark.parametrize("fine_tuned", [False, True])
def test_a_dim_the_layers_lack_is_refused_before_pruning_with_or_without_fine_tuning(trained, digits, fine_tuned):
    """Without fine-tuning, PruneConfig(dim=2) on Linear layers failed inside the engine with a bare IndexError
    ("tuple index out of range"); with it, GradualPruner refused it in its own name."""
    steps: list[int] = []

    def fine_tune(model, step):
        steps.append(0)
        train(model, digits[0], digits[1], steps=4, step_fn=step)

    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured", dim=2), **FAST)
    with pytest.raises(ValueError, match=r"^PruneConfig: dim=2 is not a dimension of every tensor pruned \(some "
                                         r"have 2\); 0 prunes output channels"):
        compress(trained, config, eval_fn=accuracy(digits[2], digits[3]), example_inputs=digits[2][:8],
                 **({"fine_tune": fine_tune, "fine_tune_steps": 4} if fine_tuned else {}))
    assert steps == []


def test_a_numpy_step_count_is_taken_as_an_int(trained, digits):
    """fine_tune_steps=np.int64(10) was refused as "give ... an int >= 1", where every config takes numpy's ints."""
    import numpy as np

    def fine_tune(model, step):
        train(model, digits[0], digits[1], steps=10, step_fn=step)

    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, schedule="linear", end=1.0), **FAST)
    result = compress(trained, config, eval_fn=accuracy(digits[2], digits[3]), example_inputs=digits[2][:8],
                      fine_tune=fine_tune, fine_tune_steps=np.int64(10))
    assert result.report["pruned"].weight_sparsity == pytest.approx(0.5, abs=1e-4)
    assert "during 10 fine-tuning steps" in result.report["pruned"].description


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="a folder that cannot be written to, even by root")
def test_an_output_dir_that_cannot_be_written_is_refused_before_any_stage(trained, digits):
    """It failed at the first file, after all the fine-tuning, in torch's words naming no file ("open file failed
    with strerror: No such file or directory")."""
    calls = []

    def fine_tune(model, step):
        calls.append(step)

    config = CompressionConfig(prune=PruneConfig(sparsity=0.5), **FAST)
    with pytest.raises(ValueError, match=r"compress\(output_dir='/proc/self'\): cannot write there"):
        compress(trained, config, eval_fn=lambda m: calls.append("eval") or 1.0, example_inputs=digits[2][:8],
                 fine_tune=fine_tune, fine_tune_steps=10, output_dir="/proc/self")
    assert calls == []


@pytest.mark.parametrize(("names", "said"), [
    (["pruned_state_dict.pt"], "pruned_state_dict.pt in it is a folder"),
    (["model.pt2", "shrunk_state_dict.pt"], "shrunk_state_dict.pt, model.pt2 in it are folders"),
])
def test_folders_named_as_files_the_run_writes_are_refused_before_any_stage(trained, digits, tmp_path, names, said):
    """Renaming the state dict over a folder of its name failed after every stage (IsADirectoryError naming a
    '.partial.pt' file); a model file's folder cost the run's file (a note after the work)."""
    calls = []
    for name in names:
        (tmp_path / name).mkdir()
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5), **FAST)
    with pytest.raises(ValueError, match=re.escape(f"compress(output_dir='{tmp_path}'): {said}, where this run")):
        compress(trained, config, eval_fn=lambda m: calls.append("eval") or 1.0, example_inputs=digits[2][:8],
                 output_dir=tmp_path)
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


class CompilesItsBody(nn.Module):
    """Compiles a block in __init__, as some models do: its state dict's keys hold `_orig_mod.`."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.compile(nn.Sequential(nn.Linear(64, 32), nn.ReLU()))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_the_pruned_state_loads_into_an_architecture_with_a_compiled_part(digits, tmp_path):
    """The file's keys were the eager copy's (body.0.weight): it did not load into the model's own class."""
    torch.manual_seed(0)
    model = CompilesItsBody()
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, schedule="oneshot"), shrink=False, export=False,
                               latency_repeats=2)
    result = compress(model, config, eval_fn=lambda m: 1.0, example_inputs=digits[2][:8], output_dir=tmp_path)
    fresh = CompilesItsBody()
    fresh.load_state_dict(torch.load(tmp_path / "pruned_state_dict.pt"))  # strict: every key matched
    pruned = result.stage_models["pruned"]
    assert torch.equal(fresh.body._orig_mod[0].weight, pruned.body[0].weight)
    assert torch.equal(fresh.head.weight, pruned.head.weight) and bool((fresh.head.weight == 0).any())
    # the narrow weights too
    from litcompress.pruning import load_shrunk_state_dict

    structured = CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured", schedule="oneshot"),
                                   export=False, latency_repeats=2)
    result = compress(model, structured, eval_fn=lambda m: 1.0, example_inputs=digits[2][:8],
                      output_dir=tmp_path / "shrunk")
    narrow = load_shrunk_state_dict(CompilesItsBody(), torch.load(tmp_path / "shrunk" / "shrunk_state_dict.pt"))
    assert narrow.body._orig_mod[0].out_features == result.stage_models["shrunk"].body[0].out_features < 32


class SharesACompiledBody(CompilesItsBody):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = self.body  # the compiled block under a second name (its keys are in the state dict twice)


def test_the_pruned_state_of_a_compiled_part_shared_under_two_names_loads_into_the_architecture(digits, tmp_path):
    """Only the first name of a shared compiled block was renamed: `trunk.0.weight` did not load."""
    torch.manual_seed(0)
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, schedule="oneshot"), shrink=False, export=False,
                               latency_repeats=2)
    result = compress(SharesACompiledBody(), config, eval_fn=lambda m: 1.0, example_inputs=digits[2][:8],
                      output_dir=tmp_path)
    fresh = SharesACompiledBody()
    fresh.load_state_dict(torch.load(tmp_path / "pruned_state_dict.pt"))  # strict: every key matched
    assert torch.equal(fresh.trunk._orig_mod[0].weight, result.stage_models["pruned"].body[0].weight)
    # the copy compressed is eager under both names (fx, the exporters and the int8 backends need that)
    assert result.stage_models["pruned"].trunk is result.stage_models["pruned"].body
    assert not any(type(m).__name__ == "OptimizedModule" for m in result.stage_models["pruned"].modules())


class _Dropping(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_every_stage_is_scored_tested_and_timed_in_eval_mode_whatever_eval_fn_leaves(digits):
    """An eval_fn ending in model.train(), as a validation loop does: the stages after the first were tested and
    timed with dropout on, and the result came back in training mode."""
    x = digits[2][:64]
    seen = []

    def evaluate(model):
        model.eval()
        with torch.no_grad():
            model(x)
        model.train()
        return 1.0

    def test(model):
        seen.append(model.training)
        return 1.0

    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, schedule="oneshot"), export=False, latency_repeats=2)
    result = compress(_Dropping().eval(), config, eval_fn=evaluate, test_fn=test, example_inputs=x[:8])
    assert len(seen) >= 2 and not any(seen)
    assert not result.model.training


def test_a_fine_tuning_loop_that_stops_early_still_reaches_the_sparsity(trained, digits):
    def fine_tune(model, step):
        train(model, digits[0], digits[1], steps=5, step_fn=step)

    config = CompressionConfig(prune=PruneConfig(sparsity=0.75, schedule="linear", end=1.0), **FAST)
    result = compress(trained, config, eval_fn=accuracy(digits[2], digits[3]), example_inputs=digits[2][:8],
                      fine_tune=fine_tune, fine_tune_steps=100)
    assert result.report["pruned"].weight_sparsity == pytest.approx(0.75, abs=1e-4)
    assert any("fine-tuning stopped at step 5, before its schedule ended (step 100)" in m
               for m in result.report.messages)
    # the row says the steps made (it said the 100 declared), and that the rest came at once
    assert "during 5 fine-tuning steps, the rest of the sparsity at once after them" in (
        result.report["pruned"].description)


def test_a_fine_tuning_loop_that_runs_past_its_declared_steps_is_said(trained, digits):
    """The row said "during 20 fine-tuning steps" for a loop that made 60, and nothing said that the schedule, laid
    over the 20 declared, had ended a third of the way in."""
    def fine_tune(model, step):
        train(model, digits[0], digits[1], steps=60, step_fn=step)

    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, schedule="linear"), **FAST)
    result = compress(trained, config, eval_fn=accuracy(digits[2], digits[3]), example_inputs=digits[2][:8],
                      fine_tune=fine_tune, fine_tune_steps=20)
    assert "during 60 fine-tuning steps" in result.report["pruned"].description
    assert any(m.startswith("fine-tuning made 60 optimizer steps, past fine_tune_steps=20: the schedule, laid over "
                            "20 steps, ended at step") for m in result.report.messages)
    # a schedule of the user's is laid by its own steps: nothing to say
    own = CompressionConfig(prune=PruneConfig(schedule=PolynomialDecay(final_sparsity=0.5, begin=0, end=60,
                                                                        frequency=10)), **FAST)
    result = compress(trained, own, eval_fn=accuracy(digits[2], digits[3]), example_inputs=digits[2][:8],
                      fine_tune=fine_tune, fine_tune_steps=20)
    assert "during 60 fine-tuning steps" in result.report["pruned"].description
    assert not any("past fine_tune_steps" in m for m in result.report.messages)
    # a loop that never calls step(t): said as such (it was "0 rounds during 0 fine-tuning steps")
    result = compress(trained, config, eval_fn=accuracy(digits[2], digits[3]), example_inputs=digits[2][:8],
                      fine_tune=lambda model, step: None, fine_tune_steps=20)
    assert "during fine-tuning that never called step(t) for a step t >= 1, the rest of the sparsity at once" in (
        result.report["pruned"].description)


def test_a_fine_tuning_loop_that_stops_early_is_said_when_only_recurrent_units_are_pruned():
    """The note counted the per-layer sets' entries only: with an LSTM's hidden units (or channel groups, or heads)
    all that was pruned, the rest was pruned afterwards without a word (and with no set, the note failed)."""
    class LSTMNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(8, 32, batch_first=True)
            self.head = nn.Linear(32, 2)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    torch.manual_seed(0)
    x = torch.randn(32, 5, 8)
    y = (x[:, 0, 0] > 0).long()

    def fine_tune(model, step):  # 6 of the 20 steps announced
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        for t in range(1, 7):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            step(t)

    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured"), **FAST)
    result = compress(LSTMNet(), config, eval_fn=accuracy(x, y), example_inputs=x[:8], fine_tune=fine_tune,
                      fine_tune_steps=20)
    said = [m for m in result.report.messages if m.startswith("fine-tuning stopped at step 6")]
    assert len(said) == 1 and re.search(r"the remaining [\d,]+ entries were pruned at once afterwards", said[0])
    assert result.model.lstm.hidden_size == 16


@pytest.mark.parametrize("fp32_format", ["export", "torchscript"])
def test_a_model_given_with_live_masks_is_timed_and_exported_as_it_ships(trained, digits, tmp_path, fp32_format):
    """A ModelPruning checkpoint loads with its masks on: with no stage to change it, the file held weight_orig and
    weight_mask (and multiplied them at every call), and the input row was timed with the masks' hooks, crediting the
    later stages with their cost (1.6-1.8x 'speed-ups')."""
    masked = deepcopy_model(trained)
    prune_model_(masked, "l1_unstructured", 0.75)
    config = CompressionConfig(prune=None, shrink=False, quantize=None, fp32_format=fp32_format, latency_repeats=2)
    result = compress(masked, config, eval_fn=accuracy(digits[2], digits[3]), example_inputs=digits[2][:8],
                      output_dir=tmp_path)
    assert not pruned_targets(result.stage_models["input"]) and not pruned_targets(result.model)
    assert pruned_targets(masked)  # the user's model as it was
    loaded, _ = load_quantized(result.artifact)
    names = [name for name, _ in loaded.named_parameters()] + [name for name, _ in loaded.named_buffers()]
    if fp32_format == "export":
        names = list(torch.export.load(result.artifact).state_dict)
    assert names and not any(name.endswith(("_orig", "_mask")) for name in names)
    with torch.no_grad():
        torch.testing.assert_close(loaded(digits[2][:8]), masked(digits[2][:8]))


def test_a_model_given_with_a_masking_parametrization_is_counted_and_sized_by_the_weights_it_computes_with():
    """The input row counted a parametrized weight's `original` (no zero in it: 4,810 parameters, 4,810 nonzero
    beside a 42% sparsity) and sized its mask buffer too (the pruned row's size ratio credited pruning with it)."""
    from torch.nn.utils import parametrize

    from litcompress.pruning import fold_parametrizations_

    torch.manual_seed(0)
    model = mlp(64, 64, 10)
    parametrize.register_parametrization(model[0], "weight", TimesBuffer((torch.rand(64, 64) > 0.5).float()))
    zeros = int((model[0].weight == 0).sum())
    plain = deepcopy_model(model)
    fold_parametrizations_(plain)  # (torch's removal on a deep copy deletes the original's property as well)
    config = CompressionConfig(prune=None, shrink=False, quantize=None, export=False, latency_repeats=2)
    row = compress(model, config, eval_fn=lambda m: 1.0, example_inputs=torch.randn(8, 64)).report.stages[0]
    assert row.parameters == sum(p.numel() for p in plain.parameters())
    assert row.nonzero_parameters == row.parameters - zeros and row.weight_sparsity == zeros / (64 * 64 + 64 * 10)
    assert row.size_bytes == len(serialized_weights(plain))
    assert parametrize.is_parametrized(model[0], "weight")  # the user's model as it was


class _TokenMean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(20, 8), nn.Linear(8, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(tokens).mean(1))


def test_dims_declared_free_are_left_free_in_an_unquantized_file(tmp_path):
    """Only the int8 file could leave a sequence length free (the CLI refused --dynamic-dims with --quantize none):
    the fp32 file of fixed-length batches took that length only."""
    torch.manual_seed(0)
    model, tokens = _TokenMean().eval(), torch.randint(0, 20, (4, 6))
    for declared in (None, {0: 1}):
        config = CompressionConfig(prune=None, quantize=None, fp32_format="onnx", latency_repeats=2,
                                   dynamic_dims=declared)
        result = compress(model, config, eval_fn=lambda m: 1.0, example_inputs=tokens, output_dir=tmp_path)
        loaded, _ = load_quantized(result.artifact)
        longer = torch.randint(0, 20, (3, 9))
        if declared is None:
            with pytest.raises(Exception, match="(?i)dimension|shape|index"):
                loaded(longer)
        else:
            torch.testing.assert_close(loaded(longer), model(longer))
    with pytest.raises(ValueError, match=r"a quantized one's are PTQConfig\(dynamic_dims=...\)"):
        CompressionConfig(quantize=PTQConfig(), dynamic_dims={0: 1})
    with pytest.raises(TypeError, match=r"^CompressionConfig\(dynamic_dims='x'\): expected a dict"):  # (PTQConfig's)
        CompressionConfig(dynamic_dims="x")


class _TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(8, 16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.a(x)
        return {"logits": self.out(h), "hidden": h}


def test_nothing_to_prune_says_which_layers_make_the_outputs_not_an_exclude_never_given():
    """It said 'outside exclude=['a', 'out']' to a user who gave no exclude."""
    with pytest.raises(ValueError) as error:
        prune_targets(_TwoOutputs(), PruneConfig(sparsity=0.5, method="ln_structured"), (torch.randn(2, 8),))
    assert "besides a, out, which make(s) the model's outputs" in str(error.value)
    assert "exclude=" not in str(error.value)


def test_a_model_already_sparser_than_asked_is_said_to_be_pruned_no_further(trained, digits):
    """The pruned row read 'l1_unstructured global to 50.0%' beside a sparsity column of 90% without a word."""
    sparse = deepcopy_model(trained)
    prune_model_(sparse, "l1_unstructured", 0.9)
    make_permanent_(sparse)
    result = compress(sparse, CompressionConfig(prune=PruneConfig(sparsity=0.5), shrink=False, **FAST),
                      eval_fn=accuracy(digits[2], digits[3]), example_inputs=digits[2][:8])
    assert result.report["pruned"].weight_sparsity == pytest.approx(0.9, abs=1e-3)
    said = "the model as given is 90.0% sparse, above the 50.0% asked"
    assert any(m.startswith(said) for m in result.report.messages)
    config = CompressionConfig(prune=PruneConfig(sparsity=0.95), shrink=False, **FAST)  # more: pruned, nothing said
    result = compress(sparse, config, eval_fn=accuracy(digits[2], digits[3]), example_inputs=digits[2][:8])
    assert not any("the model as given" in m for m in result.report.messages)


def test_an_untraceable_model_is_reported_unshrunk_and_exported_where_a_format_can(digits, tmp_path):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 32), nn.Linear(32, 10)

        def forward(self, x):
            h = torch.relu(self.a(x))
            if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                h = h * 1.0
            return self.b(h)

    torch.manual_seed(0)
    # masks without a trace: removable_only=False (by default structured pruning of an untraceable model is refused)
    prune = PruneConfig(sparsity=0.5, method="ln_structured", exclude=("b",), removable_only=False)
    run = dict(eval_fn=accuracy(digits[2], digits[3]), example_inputs=digits[2][:4])
    with pytest.warns(RuntimeWarning, match="export failed, no model file written: GuardOnDataDependentSymNode"):
        refused = compress(Branchy(), CompressionConfig(prune=prune, fp32_format="export", latency_repeats=2),
                           output_dir=tmp_path / "export", **run)
    assert refused.artifact is None and not any((tmp_path / "export").glob("model*"))
    assert any(m.endswith("(fp32_format='auto' or 'torchscript' or 'onnx' may export it)")
               for m in refused.report.messages)
    assert all(len(m.splitlines()) == 1 for m in refused.report.messages)  # not torch.export's pages of advice

    # TorchScript and ONNX trace one path through the branch: they write a file, and say so.
    with pytest.warns(torch.jit.TracerWarning):
        scripted = compress(Branchy(), CompressionConfig(prune=prune, fp32_format="torchscript", latency_repeats=2),
                            output_dir=tmp_path / "torchscript", **run)
    assert scripted.artifact.name == "model.pt"
    with pytest.warns(torch.jit.TracerWarning):  # "auto": torch.export refuses, so ONNX is kept, with its warning
        auto = compress(Branchy(), CompressionConfig(prune=prune, latency_repeats=2), output_dir=tmp_path / "auto",
                        **run)
    assert sorted(p.name for p in (tmp_path / "auto").glob("model*")) == ["model.onnx"]
    assert any(m.startswith("export to export: GuardOnDataDependentSymNode") and m.endswith("(skipped)")
               for m in auto.report.messages)
    for result in (refused, scripted, auto):
        assert [s.stage for s in result.report.stages] == ["input", "pruned"]
        assert any(m.startswith("shrink skipped: shrink needs a model torch.fx can trace")
                   for m in result.report.messages)
    for result in (scripted, auto):
        assert result.report["pruned"].size_bytes == result.artifact.stat().st_size
        assert any(m.startswith("export: TracerWarning") for m in result.report.messages)


@pytest.mark.parametrize(("backend", "approach"), [("pt2e", "static"), ("torchao", "weight_only")])
def test_a_torch_export_backend_is_exported_and_measured_as_read_back(trained, digits, tmp_path, backend, approach):
    # Their files are torch.export archives, whose loaded module refuses eval(): the pipeline must still judge it.
    x_val, y_val = digits[2], digits[3]
    config = CompressionConfig(quantize=PTQConfig(approach=approach, backends=(backend,), max_trials=1,
                                                  accuracy=AccuracyCriterion(tolerable_loss=0.05)),
                               shrink=False, latency_repeats=2)
    result = compress(trained, config, eval_fn=accuracy(x_val, y_val), example_inputs=x_val[:16],
                      calibration_data=[(digits[0][:128], None)], output_dir=tmp_path)
    assert result.artifact == tmp_path / "model.pt2"
    assert [s.stage for s in result.report.stages] == ["input", "quantized"]
    assert result.report["quantized"].size_bytes == result.artifact.stat().st_size
    loaded, recipe = load_quantized(result.artifact)
    assert recipe is not None and recipe.backend == backend
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_val), result.model(x_val), rtol=1e-4, atol=1e-4)
    assert result.report["quantized"].metric == pytest.approx(accuracy(x_val, y_val)(loaded))
    for column in ("parameters", "nonzero_parameters", "weight_sparsity"):  # the fp32 model's, for every backend
        assert getattr(result.report["quantized"], column) == getattr(result.report["input"], column)
    assert not any("Warning: " in m and "deprecated" in m for m in result.report.messages)  # torch's own notices


def test_export_alone_adds_a_row_for_the_file_kept_in_the_faster_format(trained, digits, tmp_path):
    result = compress(trained, CompressionConfig(shrink=False, latency_repeats=2),
                      eval_fn=accuracy(digits[2], digits[3]), example_inputs=digits[2][:4], output_dir=tmp_path)
    assert [s.stage for s in result.report.stages] == ["input", "exported"]
    assert result.report["exported"].metric == result.report["input"].metric
    # "auto": both formats were written, read back and timed; one file is left, no partial one.
    chosen = next(m for m in result.report.messages if m.startswith("fp32 file format chosen by speed"))
    assert "model.onnx" in chosen and "model.pt2" in chosen and chosen.endswith(f"kept {result.artifact.name}.")
    assert [p.name for p in tmp_path.glob("model*")] == [result.artifact.name]
    assert result.report["exported"].size_bytes == result.artifact.stat().st_size


def test_an_eval_fn_that_scores_another_model_is_said_once(trained, digits):
    """compress judges its input first; an eval_fn that never runs the model it is given (it closes over another)
    is said there, once for the run (the quantization search it calls would say it again)."""
    import warnings

    evaluate = accuracy(digits[2], digits[3])
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5), quantize=PTQConfig(backends=("torch_ao",),
                               latency_repeats=2), latency_repeats=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = compress(trained, config, eval_fn=lambda m: evaluate(trained), example_inputs=digits[2][:4])
    said = [w for w in caught if "without running the model it was given" in str(w.message)]
    assert len(said) == 1 and said[0].filename == __file__  # pointed at the caller
    assert sum("without running the model it was given" in m for m in result.report.messages) == 1
    assert len({s.metric for s in result.report.stages}) == 1  # what it would have judged: nothing


def test_an_earlier_runs_model_file_is_left_and_named(trained, digits, tmp_path):
    run = dict(eval_fn=accuracy(digits[2], digits[3]), example_inputs=digits[2][:4], output_dir=tmp_path)
    compress(trained, CompressionConfig(shrink=False, fp32_format="torchscript", latency_repeats=2), **run)
    earlier = (tmp_path / "model.pt").read_bytes()
    second = compress(trained, CompressionConfig(shrink=False, fp32_format="export", latency_repeats=2), **run)
    assert (tmp_path / "model.pt").read_bytes() == earlier  # the user's file, not ours to delete
    assert "model.pt in the output directory is not from this run (this run wrote model.pt2)." in \
        second.report.messages


def test_an_earlier_runs_state_dicts_are_named_when_this_run_writes_none(trained, digits, tmp_path):
    """A structured run writes pruned_state_dict.pt and shrunk_state_dict.pt; a later run into the same directory
    that prunes nothing leaves them (they may be all the user has of that run) and says they are not its own."""
    run = dict(eval_fn=accuracy(digits[2], digits[3]), example_inputs=digits[2][:4], output_dir=tmp_path)
    pruned = compress(trained, CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured"),
                                                 fp32_format="onnx", latency_repeats=2), **run)
    assert [s.stage for s in pruned.report.stages][-1] == "shrunk"
    assert {PRUNED_STATE_FILE, SHRUNK_STATE_FILE, "model.onnx"} <= {p.name for p in tmp_path.iterdir()}
    assert not any("not from this run" in m for m in pruned.report.messages)
    again = compress(trained, CompressionConfig(fp32_format="onnx", latency_repeats=2), **run)
    assert (f"{PRUNED_STATE_FILE}, {SHRUNK_STATE_FILE} in the output directory are not from this run (this run "
            "wrote model.onnx).") in again.report.messages


@pytest.mark.parametrize(("fp32_format", "name"), [("export", "model.pt2"), ("onnx", "model.onnx"),
                                                   ("torchscript", "model.pt")])
def test_an_fp32_format_asked_for_is_the_one_written(trained, digits, tmp_path, fp32_format, name):
    result = compress(trained, CompressionConfig(shrink=False, fp32_format=fp32_format, latency_repeats=2),
                      eval_fn=accuracy(digits[2], digits[3]), example_inputs=digits[2][:4], output_dir=tmp_path)
    assert [p.name for p in tmp_path.glob("model*")] == [name] and result.artifact == tmp_path / name
    assert not any(m.startswith("fp32 file format chosen") for m in result.report.messages)
    loaded, recipe = load_quantized(result.artifact)
    assert recipe is None
    with torch.no_grad():  # the batch dimension stays dynamic
        torch.testing.assert_close(loaded(digits[4]), trained(digits[4]), rtol=1e-5, atol=1e-5)


def test_sparse_kernels_run_the_sparsest_layers_on_csr_and_ship_them_as_torchscript(tmp_path):
    # fc2, 2048 x 2048 at 99% zeros: its CSR product runs tens of times faster than the dense one on any x86 host
    # (the decision is measured; a margin this wide keeps the test from depending on the machine's load)
    model = ReluMLP(64, 2048, 10).eval()
    x = torch.randn(64, 64)
    with torch.no_grad():
        reference = model(x).argmax(1)

    def agreement(candidate: nn.Module) -> float:
        with torch.no_grad():
            return float((candidate(x).argmax(1) == reference).float().mean())

    config = CompressionConfig(prune=PruneConfig(sparsity=0.99, scope="local"), shrink=False,
                               sparse_kernels=True, latency_repeats=2, num_threads=1)
    result = compress(model, config, eval_fn=agreement, example_inputs=x, output_dir=tmp_path)
    assert [row.stage for row in result.report.stages] == ["input", "pruned", "sparse"]
    assert isinstance(result.model.fc2, SparseLinear)  # fc1 and head: as their (closer) timings say
    assert "fc2" in dict(result.report.details)["Sparse kernels"]
    assert result.artifact == tmp_path / "model.pt"
    loaded, recipe = load_quantized(result.artifact)
    assert recipe is None
    pruned = result.stage_models["pruned"]
    other = torch.randn(5, 64)  # another batch size than the trace's
    with torch.no_grad():
        torch.testing.assert_close(loaded(other), pruned(other), rtol=1e-5, atol=1e-5)
    row, pruned_row = result.report["sparse"], result.report["pruned"]
    assert row.parameters == pruned_row.parameters and row.nonzero_parameters == pruned_row.nonzero_parameters
    assert row.size_bytes < pruned_row.size_bytes / 5  # the file stores the non-zeros only
    assert row.description.startswith("CSR kernels for ") and row.description.endswith("model.pt read back")
    assert not list(tmp_path.glob("model.onnx")) and not list(tmp_path.glob("model.pt2"))


def test_a_missed_accuracy_goal_is_a_warning_and_the_best_candidate_is_kept(trained, digits):
    # A metric that only the fp32 model can satisfy (the fraction of Linear layers left in fp32): every int8
    # candidate misses the goal, a fallback of some layers to fp32 included.
    def fp32_only(model):
        layers = [m for m in model.modules() if type(m).__name__ == "Linear"]  # fp32 and int8 alike
        return sum(type(m) is nn.Linear for m in layers) / len(layers)

    config = CompressionConfig(quantize=PTQConfig(backends=("torch_ao",), max_trials=2), shrink=False, **FAST)
    with pytest.warns(QuantizationGoalWarning, match="Accuracy goal not met"):
        result = compress(trained, config, eval_fn=fp32_only, example_inputs=digits[2][:4])
    assert result.report["quantized"].description.endswith("(goal missed)")
    assert result.quantization is not None and not result.quantization.goal_met


def test_a_test_metric_that_cannot_be_had_fails_at_its_stage(trained, digits) -> None:
    """test_fn's NaN for a later stage was refused only when the report was built, after every stage after it (here
    the int8 search) had run."""
    x, _, x_val, y_val, x_test, y_test = digits
    judged: list[str] = []

    def evaluate(model: nn.Module) -> float:
        judged.append(type(model).__name__)
        return accuracy(x_val, y_val)(model)

    def test(model: nn.Module) -> float:  # NaN once the model is sparse
        zeros = sum(int((p == 0).sum()) for p in model.parameters()) / sum(p.numel() for p in model.parameters())
        return float("nan") if zeros > 0.25 else accuracy(x_test, y_test)(model)

    config = CompressionConfig(prune=PruneConfig(sparsity=0.5), quantize=PTQConfig(approach="dynamic"),
                               latency_repeats=2, export=False)
    with pytest.raises(ValueError, match=r"^test_fn returned nan for stage 'pruned'"):
        compress(trained, config, eval_fn=evaluate, test_fn=test, example_inputs=x[:8], calibration_data=[x[:8]])
    assert len(judged) == 2  # the input and the pruned stage: no int8 candidate was built or judged


def test_bad_arguments_fail_before_any_work(trained, digits, tmp_path):
    x = digits[2][:4]
    evaluate = accuracy(digits[2], digits[3])
    schedule = PruneConfig(schedule=PolynomialDecay(final_sparsity=0.5, begin=0, end=10))
    with pytest.raises(ValueError, match="needs fine-tuning to run along"):
        compress(trained, CompressionConfig(prune=schedule), eval_fn=evaluate, example_inputs=x)
    with pytest.raises(ValueError, match="without config.prune"):
        compress(trained, CompressionConfig(), eval_fn=evaluate, example_inputs=x, fine_tune=lambda m, s: None,
                 fine_tune_steps=3)
    with pytest.raises(ValueError, match="fine_tune_steps=None"):
        compress(trained, CompressionConfig(prune=PruneConfig(sparsity=0.5)), eval_fn=evaluate, example_inputs=x,
                 fine_tune=lambda m, s: None)
    with pytest.raises(ValueError, match=re.escape("compress(fine_tune_steps=100) without fine_tune")):  # was ignored
        compress(trained, CompressionConfig(prune=PruneConfig(sparsity=0.5)), eval_fn=evaluate, example_inputs=x,
                 fine_tune_steps=100)
    with pytest.raises(ValueError, match="static quantization needs calibration"):
        compress(trained, CompressionConfig(quantize=PTQConfig(approach="static")), eval_fn=evaluate,
                 example_inputs=x)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(NotADirectoryError, match="is a file"):
        compress(trained, eval_fn=evaluate, example_inputs=x, output_dir=tmp_path / "file")
    with pytest.raises(NotADirectoryError, match=r"output_dir=.*file/out'\): .*file is a file, not a directory"):
        compress(trained, eval_fn=evaluate, example_inputs=x, output_dir=tmp_path / "file" / "out")  # mkdir's words
    (tmp_path / "link").symlink_to(tmp_path / "gone")  # "cannot write there (File exists)"
    with pytest.raises(NotADirectoryError, match=r"output_dir=.*link'\): .*link is a broken link \(to '.*gone'\)"):
        compress(trained, eval_fn=evaluate, example_inputs=x, output_dir=tmp_path / "link")
    assert (tmp_path / "file").read_text() == "mine"
    with pytest.raises(ValueError, match="names no module of the model: \\['fc9'\\]"):
        compress(trained, CompressionConfig(prune=PruneConfig(sparsity=0.5, exclude=("fc9",))), eval_fn=evaluate,
                 example_inputs=x)
    with pytest.raises(ValueError, match="eval_fn returned nan for stage 'input'"):
        compress(trained, eval_fn=lambda m: float("nan"), example_inputs=x)
    with pytest.raises(ValueError, match="^test_fn returned nan for stage 'input'"):  # not eval_fn, which is fine
        compress(trained, eval_fn=evaluate, test_fn=lambda m: float("nan"), example_inputs=x)
    with pytest.raises(TypeError, match="expected a CompressionConfig"):
        compress(trained, PruneConfig(sparsity=0.5), eval_fn=evaluate, example_inputs=x)
    # the report refused these after every stage had run
    with pytest.raises(TypeError, match=r"compress\(metric_name=None\): the report's title of eval_fn's column"):
        compress(trained, eval_fn=evaluate, example_inputs=x, metric_name=None)
    with pytest.raises(TypeError, match=r"compress\(test_metric_name=5\)"):
        compress(trained, eval_fn=evaluate, example_inputs=x, test_fn=evaluate, test_metric_name=5)
    with pytest.raises(ValueError, match=r"compress\(output_dir=''\): name a folder"):  # it wrote into the cwd
        compress(trained, eval_fn=evaluate, example_inputs=x, output_dir="")


def test_a_model_off_the_cpu_is_refused_before_any_fine_tuning_when_it_is_to_be_quantized(digits):
    """int8 models here are CPU models: a GPU model failed in a backend, after the fine-tuning (no GPU here: a model
    on torch's `meta` device, off the CPU as a GPU's is, takes the same path)."""
    x = digits[0][:16]
    off_the_cpu = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).to("meta")
    steps: list[int] = []
    with pytest.raises(ValueError, match=r"compress\(model=...\) with config.quantize: the model's tensors are on "
                                         r"meta.*Pass a CPU copy"):
        compress(off_the_cpu, CompressionConfig(prune=PruneConfig(sparsity=0.5), quantize=PTQConfig(), **FAST),
                 eval_fn=lambda m: 1.0, example_inputs=x, calibration_data=[(x,)],
                 fine_tune=lambda m, step: steps.append(step), fine_tune_steps=4)
    assert steps == []
    with pytest.raises(ValueError, match=r"quantize\(model=...\): the model's tensors are on meta"):
        quantize(off_the_cpu, PTQConfig(approach="dynamic"), eval_fn=lambda m: 1.0, example_inputs=x)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(64, 32), nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x, y):
        return self.head(torch.relu(self.a(x) + self.b(y)))


def test_calibration_batches_the_model_cannot_take_fail_before_fine_tuning(digits):
    x = digits[0][:16]
    model, config = _TwoInputs(), CompressionConfig(prune=PruneConfig(sparsity=0.5), quantize=PTQConfig(), **FAST)
    steps: list[int] = []
    with pytest.raises(ValueError, match="first calibration batch.*input_fn=lambda batch: tuple"):
        compress(model, config, eval_fn=lambda m: 1.0, example_inputs=(x, x), calibration_data=[(x, x[:, :8])] * 2,
                 fine_tune=lambda m, step: steps.append(step), fine_tune_steps=4)
    assert steps == []  # nothing trained
    with pytest.raises(ValueError, match=r"example_inputs \(inputs: \(16, 64\) torch.float32\)"):
        compress(model, config, eval_fn=lambda m: 1.0, example_inputs=x)
    # A one-shot iterator is not read ahead (its batch would be lost: static int8 would find no calibration data).
    static = CompressionConfig(prune=PruneConfig(sparsity=0.5), quantize=PTQConfig(approach="static"), **FAST)
    result = compress(model, static, eval_fn=lambda m: 1.0, example_inputs=(x, x), calibration_data=iter([(x, x)]),
                      input_fn=lambda batch: tuple(batch))
    assert result.quantization is not None and result.quantization.recipe.approach == "static"


def test_prune_targets_skip_the_classifier_only_for_structured_methods(trained):
    names = lambda targets: [id(m) for m, _ in targets]  # noqa: E731
    linears = [m for m in trained if isinstance(m, nn.Linear)]
    assert names(prune_targets(trained, PruneConfig(sparsity=0.5))) == [id(m) for m in linears]
    assert names(prune_targets(trained, PruneConfig(sparsity=0.5, method="ln_structured"))) == \
        [id(m) for m in linears[:-1]]
    with pytest.raises(ValueError, match="nothing to prune"):
        prune_targets(trained, PruneConfig(sparsity=0.5, layer_types=(nn.Conv2d,)))
    both = prune_targets(trained, PruneConfig(sparsity=0.5, parameter_names=("weight", "bias")))
    assert [n for _, n in both] == ["weight", "bias"] * 3


def test_an_fp32_model_can_be_exported_to_onnx(trained, digits, tmp_path):
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured"), fp32_format="onnx",
                               latency_repeats=2)
    result = compress(trained, config, eval_fn=accuracy(digits[2], digits[3]), example_inputs=digits[2][:8],
                      output_dir=tmp_path)
    assert result.artifact == tmp_path / "model.onnx"
    assert [s.stage for s in result.report.stages] == ["input", "pruned", "shrunk"]
    loaded, recipe = load_quantized(result.artifact)
    assert recipe is None  # fp32
    with torch.no_grad():
        torch.testing.assert_close(loaded(digits[4]), result.model(digits[4]), rtol=1e-4, atol=1e-5)
    assert result.report["shrunk"].size_bytes == result.artifact.stat().st_size
    # ONNX Runtime has no torch parameters: the row keeps the counts of the model it was exported from.
    assert result.report["shrunk"].parameters == sum(p.numel() for p in result.model.parameters()) == \
        64 * 48 + 48 + 48 * 48 + 48 + 48 * 10 + 10


def test_a_failed_export_is_reported_and_the_results_are_kept(digits, tmp_path):
    class Spectral(nn.Module):  # torch.onnx cannot export aten::fft_rfft
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 16), nn.Linear(9, 10)

        def forward(self, x):
            return self.b(torch.fft.rfft(self.a(x)).abs())

    (tmp_path / "model.onnx").write_bytes(b"an earlier run's model")
    with pytest.warns(RuntimeWarning, match="export failed, no model file written: ExportError"):
        result = compress(Spectral(), CompressionConfig(fp32_format="onnx", latency_repeats=2),
                          eval_fn=accuracy(digits[2], digits[3]), example_inputs=digits[2][:8], output_dir=tmp_path)
    assert result.artifact is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no partial file left behind ...
    assert (tmp_path / "model.onnx").read_bytes() == b"an earlier run's model"  # ... and the earlier file intact
    assert [s.stage for s in result.report.stages] == ["input"] and result.report["input"].latency is not None
    with pytest.raises(ValueError, match="fp32_format='tflite'"):
        CompressionConfig(fp32_format="tflite")


def test_gated_feed_forwards_are_pruned_as_one_and_shrunk(digits):
    # LLaMA-style blocks: w1 and w3 meet in a product, so the same channels go from both, and from w2's inputs
    from litcompress.models import GatedTransformerClassifier

    model = GatedTransformerClassifier(d_model=16, heads=2, layers=2, feed_forward=32)
    result, x_val = compress_on_images(digits, model, PruneConfig(sparsity=0.5, method="ln_structured"), steps=20)
    pruned, shrunk = result.stage_models["pruned"], result.stage_models["shrunk"]
    for block, before in zip(shrunk.blocks, pruned.blocks):
        ff, pruned_ff = block.feed_forward, before.feed_forward
        assert (ff.w1.out_features, ff.w3.out_features, ff.w2.in_features) == (16, 16, 16)
        dead = (pruned_ff.w1.weight == 0).all(1)
        assert int(dead.sum()) == 16 and torch.equal(dead, (pruned_ff.w3.weight == 0).all(1))
    assert any(m.startswith("group_residuals: 2 channel group(s) joined by a gating product") for m in
               result.report.messages)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x_val), pruned(x_val), rtol=1e-5, atol=1e-5)

    # layer by layer, neither factor could go on its own: the error names the remedy
    with pytest.raises(ValueError, match=r"group_residuals=True, zero_batch_norm=True\) prunes blocks\.0\."):
        compress(model, CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured",
                                                            group_residuals=False, schedule="oneshot"), **FAST),
                 eval_fn=accuracy(x_val, digits[3]), example_inputs=x_val[:8])


class BiasedJoin(nn.Module):
    """Two biased Linear layers whose outputs are added (two inputs' features fused) or multiplied (a gated block
    with biases): no BatchNorm to hold a pruned channel at zero, only the biases."""

    def __init__(self, product: bool) -> None:
        super().__init__()
        self.product = product
        self.a, self.b, self.out = nn.Linear(64, 16), nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.relu(self.a(x)), self.b(x)
        return self.out(a * b if self.product else a + torch.relu(b))


@pytest.mark.parametrize("product", [False, True], ids=["sum", "product"])
@pytest.mark.parametrize("fine_tune", [False, True], ids=["one-shot", "fine-tuned"])
def test_a_group_of_biased_layers_holds_the_pruned_channels_biases_at_zero_and_shrinks(digits, product, fine_tune):
    x, y, x_val, y_val = digits[:4]
    torch.manual_seed(0)
    model = train(BiasedJoin(product), x, y, steps=40)
    steps = 20
    prune = PruneConfig(sparsity=0.5, method="ln_structured", schedule="cubic" if fine_tune else "oneshot")
    result = compress(model, CompressionConfig(prune=prune, **FAST), eval_fn=accuracy(x_val, y_val),
                      example_inputs=x_val[:8], fine_tune=(lambda m, step: train(m, x, y, steps, step)) if fine_tune
                      else None, fine_tune_steps=steps if fine_tune else None)
    pruned, shrunk = result.stage_models["pruned"], result.stage_models["shrunk"]
    dead = (pruned.a.weight == 0).all(1)
    assert int(dead.sum()) == 8 and torch.equal(dead, (pruned.b.weight == 0).all(1))
    assert not pruned.a.bias[dead].any() and not pruned.b.bias[dead].any()
    assert not model.a.bias[dead].eq(0).any()  # the user's model keeps its biases
    assert (shrunk.a.out_features, shrunk.b.out_features, shrunk.out.in_features) == (8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x_val), pruned(x_val), rtol=1e-5, atol=1e-5)


class FusedGatedHead(nn.Module):
    """One biased Linear computes both factors of a gate: ``a, b = w13(x).chunk(2)``, then ``out(relu(a) * b)``."""

    def __init__(self) -> None:
        super().__init__()
        self.w13, self.out = nn.Linear(64, 32), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w13(x).chunk(2, dim=-1)
        return self.out(torch.relu(a) * b)


def test_a_fused_gate_loses_a_channel_from_both_of_its_halves(digits):
    x, y, x_val, y_val = digits[:4]
    torch.manual_seed(0)
    model = train(FusedGatedHead(), x, y, steps=40)
    steps = 20
    result = compress(model, CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured"), **FAST),
                      eval_fn=accuracy(x_val, y_val), example_inputs=x_val[:8],
                      fine_tune=lambda m, step: train(m, x, y, steps, step), fine_tune_steps=steps)
    pruned, shrunk = result.stage_models["pruned"], result.stage_models["shrunk"]
    dead = (pruned.w13.weight == 0).all(1)
    assert torch.equal(dead[:16], dead[16:]) and int(dead[:16].sum()) == 8  # channel j: rows j and 16 + j
    assert not pruned.w13.bias[dead].any()
    assert (shrunk.w13.out_features, shrunk.out.in_features) == (16, 8)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x_val), pruned(x_val), rtol=1e-5, atol=1e-5)


def test_min_speedup_out_of_reach_exports_the_fp32_model(trained, digits, tmp_path):
    x_val, y_val = digits[2], digits[3]
    ptq = PTQConfig(approach="dynamic", backends=("torch_ao",), latency_repeats=3, max_trials=2, min_speedup=1000.0)
    result = compress(trained, CompressionConfig(quantize=ptq, latency_repeats=2, fp32_format="export"),
                      eval_fn=accuracy(x_val, y_val), example_inputs=x_val[:8], output_dir=tmp_path)
    assert result.quantization.recipe is None and result.quantization.trials  # tried, and turned down
    assert "quantized" not in result.stage_models and result.artifact.name == "model.pt2"
    assert any(m.startswith("quantization: min_speedup=1000: no int8 model meeting the goal") for m in
               result.report.messages)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x_val), trained(x_val))


def _preview_cases():
    from litcompress.models import DenseNetClassifier, GatedTransformerClassifier, MobileNetClassifier
    from tests.pruning.test_groups import ResNet

    return {"resnet": ResNet, "mobilenet": lambda: MobileNetClassifier(width=8, blocks=2, expansion=4).net,
            "densenet": lambda: DenseNetClassifier(stem=8, growth=4, layers=2, blocks=2).net,
            "swiglu": lambda: GatedTransformerClassifier(d_model=16, feed_forward=32)}


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "densenet", "swiglu"])
@pytest.mark.parametrize("keep_multiple_of", [None, 4])
def test_preview_shrink_reaches_the_widths_compress_reaches(digits, name, keep_multiple_of):
    # Without data or training: the same layers, groups and widths as the pipeline's one-shot structured pruning
    from litcompress.pipeline import preview_shrink

    torch.manual_seed(0)
    model = _preview_cases()[name]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune = PruneConfig(sparsity=0.5, method="ln_structured", schedule="oneshot")
    preview, notes = preview_shrink(model, prune, keep_multiple_of=keep_multiple_of)
    x_val, y_val = digits[2].view(-1, 1, 8, 8), digits[3]
    result = compress(model, CompressionConfig(prune=prune, keep_multiple_of=keep_multiple_of, **FAST),
                      eval_fn=accuracy(x_val, y_val), example_inputs=x_val[:8])
    widths = {layer.name: layer.channels_after for layer in result.shrink.layers}
    assert {layer.name: layer.channels_after for layer in preview.report.layers} == widths and widths
    assert preview.report.parameters_after == result.report["shrunk"].parameters
    assert [n for n in notes if n.startswith("group_residuals")] == \
        [m for m in result.report.messages if m.startswith("group_residuals")]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is not touched


def test_a_transposed_conv_read_by_a_grouped_conv_loses_as_many_channels_from_each_group(digits):
    """Its output channels (dim 1) were pruned without the grouped conv's groups: 1 of 4 zero channels in one group,
    3 in the other, and shrink could remove only 2 of them, with no reason given."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.SiLU(), nn.ConvTranspose2d(8, 8, 3, padding=1), nn.SiLU(),
                          nn.Conv2d(8, 4, 3, padding=1, groups=2), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 10))
    prune = PruneConfig(sparsity=0.5, method="ln_structured")
    result, x_val = compress_on_images(digits, model, prune, steps=20)
    pruned, shrunk = result.stage_models["pruned"], result.stage_models["shrunk"]
    zero = pruned[2].weight.transpose(0, 1).flatten(1).abs().sum(1) == 0
    assert zero.view(2, 4).sum(1).tolist() == [2, 2]  # as many in each of the grouped conv's input groups
    assert (shrunk[2].out_channels, shrunk[4].in_channels, shrunk[4].out_channels) == (4, 4, 2)
    assert all(layer.left == 0 for layer in result.shrink.layers) and not result.shrink.kept
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x_val), pruned(x_val), rtol=1e-5, atol=1e-5)


def test_a_gated_group_through_a_depthwise_conv_after_a_sigmoid_is_left_unpruned():
    """The group's channels were taken to be zero once the depthwise filters are, which structured pruning never
    zeroes: conv and excite lost half their filters, shrink removed none, and a note said it could."""
    from litcompress.pipeline import preview_shrink
    from tests.pruning.test_shrink import SigmoidDepthwiseGate  # conv -> sigmoid -> depthwise -> a gate

    torch.manual_seed(0)
    prune = PruneConfig(sparsity=0.5, method="ln_structured")
    preview, notes = preview_shrink(SigmoidDepthwiseGate(), prune, example_inputs=torch.randn(2, 3, 20))
    assert {layer.name for layer in preview.report.layers} == {"stem", "squeeze"} and not preview.report.kept
    assert not any(n.startswith("group_residuals") for n in notes)
    assert any(n.startswith("removable_only: 2 layer(s) left unpruned") and "conv, excite" in n for n in notes)


class ConcatenatedIntoAGroupedConv(nn.Module):
    """`a`'s channels concatenated between `before` and `after` into a grouped conv of 2 groups: with `before` of
    one channel and `after` of one, `a`'s 4 reach each group 2 by 2; with `before` of 3, 1 and 3."""

    def __init__(self, before: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.before, self.a, self.after = (nn.Conv2d(4, width, 1, bias=False) for width in (before, 4, 1))
        self.grouped = nn.Conv2d(before + 5, 4, 1, groups=2)
        self.head = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.cat([torch.relu(self.before(h)), torch.relu(self.a(h)), torch.relu(self.after(h))], 1)
        return self.head(torch.relu(self.grouped(h)).mean((2, 3)))


@pytest.mark.parametrize("before", [1, 3])
def test_a_layer_concatenated_into_a_grouped_conv_is_pruned_only_where_its_groups_can_lose_as_many(before):
    """Spread over the groups 1 and 3, `a` was pruned 2 of 4 and shrink could remove none or some (it removes as
    many from each group); spread 2 and 2, it was pruned as one block, unevenly."""
    from litcompress.pipeline import preview_shrink

    torch.manual_seed(0)
    model = ConcatenatedIntoAGroupedConv(before)
    with torch.no_grad():  # the two weakest filters read by one group: pruned as one block, the group lost both
        model.a.weight[:2] *= 0.01
    preview, notes = preview_shrink(model, PruneConfig(sparsity=0.5, method="ln_structured"),
                                    example_inputs=torch.randn(2, 1, 8, 8))
    widths = {layer.name: (layer.channels_before, layer.channels_after, layer.left) for layer in preview.report.layers}
    if before == 1:  # each group loses one of a's channels
        assert widths["a"] == (4, 2, 0)
        assert preview.model.grouped.in_channels == 4
    else:
        assert "a" not in widths and not preview.report.kept
        assert any("a: a concatenation puts its channels among the inputs of the grouped conv grouped unevenly "
                   "(1, 3 in its 2 groups)" in n for n in notes)


def test_preview_shrink_wants_structured_pruning_of_output_channels(trained):
    from litcompress.pipeline import preview_shrink

    with pytest.raises(ValueError, match="give a structured PruneConfig on output channels"):
        preview_shrink(trained, PruneConfig(sparsity=0.5))


class _CompilesItsBody(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.compile(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), backend="eager")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("compiled", ["a part", "the model"])
def test_the_checks_before_compress_and_preview_shrink_read_a_compiled_model_as_compress_does(compiled):
    """compress prunes and shrinks the eager modules of compiled parts; prune_targets (the CLI's check before any
    training) and preview_shrink (`litcompress channels --sparsity`) traced the compiled model with torch.fx and
    refused it, while their message advised compress()."""
    from litcompress.pipeline import preview_shrink

    if compiled == "a part":
        model = _CompilesItsBody()
        eager = model.body._orig_mod
    else:
        torch.manual_seed(0)
        model = torch.compile(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), backend="eager")
        eager = model._orig_mod
    state = {name: value.clone() for name, value in model.state_dict().items()}
    prune = PruneConfig(sparsity=0.5, method="ln_structured")
    assert prune_targets(model, prune) == [(eager[0], "weight")]  # the model's own module, as compress prunes it
    preview, notes = preview_shrink(model, prune)
    assert preview.report.parameters_before == 64 * 32 + 32 + 32 * 10 + 10
    assert preview.report.parameters_after == 64 * 16 + 16 + 16 * 10 + 10
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    assert type(model.body if compiled == "a part" else model).__name__ == "OptimizedModule"
    # exclude names as model.named_modules() gives them (with `_orig_mod`) were refused as naming no module
    head = "body._orig_mod.2" if compiled == "a part" else "_orig_mod.2"
    assert prune_targets(model, PruneConfig(sparsity=0.5, method="ln_structured", exclude=(head,))) == [
        (eager[0], "weight")]
    if compiled == "the model":  # `_orig_mod` alone is the copy's root, no module it prunes: refused, not ignored
        with pytest.raises(ValueError, match=r"names no module of the model: \['_orig_mod'\]"):
            prune_targets(model, PruneConfig(sparsity=0.5, method="l1_unstructured", exclude=("_orig_mod",)))


def test_a_module_of_a_model_not_compiled_whose_attribute_is_named_orig_mod_is_excluded_by_its_name():
    class Holds(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self._orig_mod = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self._orig_mod(x))

    model = Holds()
    unstructured = dict(sparsity=0.5, method="l1_unstructured")
    assert prune_targets(model, PruneConfig(**unstructured, exclude=("_orig_mod.2",))) == [
        (model._orig_mod[0], "weight"), (model.head, "weight")]
    assert prune_targets(model, PruneConfig(**unstructured, exclude=("_orig_mod",))) == [(model.head, "weight")]


def test_unstructured_pruning_of_a_transformer_while_fine_tuning_reaches_the_attention(digits):
    # nn.MultiheadAttention reads its out_proj's weight without calling out_proj: pruned, it used to keep the tensor
    # cached at pruning, and the second backward failed
    from litcompress.models import TransformerClassifier

    model = TransformerClassifier(d_model=16, heads=2, layers=1, feed_forward=32)
    result, x_val = compress_on_images(digits, model, PruneConfig(sparsity=0.8), steps=10)
    pruned = result.stage_models["pruned"]
    assert result.sparsity.sparsity == pytest.approx(0.8, abs=1e-3)
    out_proj = pruned.encoder.layers[0].self_attn.out_proj
    assert float((out_proj.weight == 0).float().mean()) > 0.5
    before = result.stage_models["input"].encoder.layers[0].self_attn.out_proj.weight
    kept = out_proj.weight != 0
    assert not torch.equal(out_proj.weight[kept], before[kept])  # fine-tuning updated the attention's weights


def test_an_attentions_shape_checks_do_not_disqualify_its_onnx_file(digits, tmp_path):
    # nn.MultiheadAttention's "if <shape check>: raise" lines give TracerWarnings while tracing; they guard errors only,
    # so the ONNX file is right for other inputs and competes on speed like any other
    from litcompress.models import TransformerClassifier

    torch.manual_seed(0)
    model = TransformerClassifier(d_model=16, heads=2, layers=1, feed_forward=32).eval()
    x_val, y_val = digits[2].view(-1, 1, 8, 8), digits[3]
    result = compress(model, CompressionConfig(latency_repeats=2), eval_fn=accuracy(x_val, y_val),
                      example_inputs=x_val[:8], output_dir=tmp_path)
    messages = result.report.messages
    assert not any("data-dependent code" in m or m.startswith("export: TracerWarning") for m in messages)
    assert any(m.startswith("fp32 file format chosen by speed: model.onnx") for m in messages)  # both timed
    loaded = result.stage_models["exported"]
    with torch.no_grad():  # written at batch 8, right at another batch size
        torch.testing.assert_close(loaded(x_val[:5]), model(x_val[:5]), rtol=1e-4, atol=1e-5)


class _Tokens(nn.Module):
    """Token ids -> embeddings -> LSTM -> classes: a model fed sequences of several lengths."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 16)
        self.rnn = nn.LSTM(16, 32, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(tokens))[0][:, -1])


@pytest.mark.parametrize("quantized", [False, True])
def test_the_file_of_a_sequence_model_takes_lengths_the_pipeline_never_saw(quantized, tmp_path):
    torch.manual_seed(0)
    model = _Tokens().eval()
    batches = [(torch.randint(0, 30, (8, n)),) for n in (12, 20, 9)]
    eval_fn = agreeing_with(model, batches)
    quantize = PTQConfig(backends=("torch_ao",), accuracy=AccuracyCriterion(tolerable_loss=1.0), latency_repeats=2,
                         max_trials=1) if quantized else None
    result = compress(model, CompressionConfig(shrink=False, quantize=quantize, latency_repeats=2), eval_fn=eval_fn,
                      example_inputs=batches[0], calibration_data=batches, output_dir=tmp_path)
    assert result.artifact is not None, result.report.messages
    loaded, recipe = load_quantized(result.artifact)
    assert (recipe is not None) == quantized
    for n in (5, 33):
        tokens = torch.randint(0, 30, (3, n))
        with torch.no_grad():
            torch.testing.assert_close(loaded(tokens), result.model(tokens), rtol=1e-4, atol=1e-4)


class _PackedTokens(nn.Module):
    """Token ids and their lengths -> embeddings -> packed bidirectional LSTM -> last states joined -> classes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 16)
        self.rnn = nn.LSTM(16, 32, batch_first=True, bidirectional=True)
        self.head = nn.Linear(64, 3)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.embed(tokens), lengths, batch_first=True, enforce_sorted=False)
        h = self.rnn(packed)[1][0]
        return self.head(torch.cat((h[-2], h[-1]), dim=1))


def test_an_lstm_fed_packed_sequences_loses_half_its_units_and_is_written_as_torchscript_when_nothing_else_exports(
        tmp_path):
    torch.manual_seed(0)
    model = _PackedTokens().eval()
    batches = [(torch.randint(0, 30, (8, 12)), torch.randint(1, 13, (8,))) for _ in range(3)]
    result = compress(model, CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured"),
                                               latency_repeats=2),
                      eval_fn=agreeing_with(model, batches), example_inputs=batches[0], output_dir=tmp_path)
    assert (result.model.rnn.hidden_size, result.model.head.in_features) == (16, 32)
    assert result.report["shrunk"].description.startswith("16 hidden units removed")
    messages = result.report.messages
    assert any(m.startswith("export to onnx: ") for m in messages) and any(m.startswith("export to export: ")
                                                                           for m in messages)
    assert result.artifact.name == "model.pt"
    loaded, recipe = load_quantized(result.artifact)
    assert recipe is None
    for size, length in ((3, 12), (5, 20), (1, 4)):  # other batch sizes and lengths than the example's
        tokens, lengths = torch.randint(0, 30, (size, length)), torch.randint(1, length + 1, (size,))
        with torch.no_grad():
            torch.testing.assert_close(loaded(tokens, lengths), result.stage_models["pruned"](tokens, lengths),
                                       rtol=1e-4, atol=1e-5)


def test_a_declared_dynamic_dim_the_inputs_lack_fails_before_fine_tuning(digits):
    tuned = []
    with pytest.raises(ValueError, match="names dim 2 of input 0, which has 2 dims"):
        compress(nn.Linear(64, 10), CompressionConfig(prune=PruneConfig(sparsity=0.5),
                                                      quantize=PTQConfig(dynamic_dims={0: 2})),
                 eval_fn=lambda m: 1.0, example_inputs=digits[2][:4], fine_tune=lambda m, step: tuned.append(m),
                 fine_tune_steps=3)
    assert tuned == []


class _Pairs(nn.Module):
    """Reads its sequence in pairs: it takes even lengths only."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.view(x.shape[0], -1, 2)).mean(1)


def test_a_declared_dynamic_dim_the_model_fixes_fails_before_fine_tuning(digits, tmp_path):
    """A Linear's features declared free: torch.export failed after the fine-tuning, and an ONNX file declared them
    free and failed at any other size. A dim the model takes at other sizes (even ones only) is accepted."""
    tuned = []
    for config in (CompressionConfig(prune=PruneConfig(sparsity=0.5), quantize=None, dynamic_dims={0: 1}),
                   CompressionConfig(prune=PruneConfig(sparsity=0.5), quantize=PTQConfig(dynamic_dims={0: 1}))):
        with pytest.raises(ValueError, match=r"compress: dynamic_dims declares dim 1 of input 0 \(size 64\) free, but "
                                             r"the model fails on the inputs one shorter there and half as long"):
            compress(nn.Linear(64, 10), config, eval_fn=lambda m: 1.0, example_inputs=digits[2][:4],
                     fine_tune=lambda m, step: tuned.append(m), fine_tune_steps=3)
    assert tuned == []
    with pytest.raises(ValueError, match=r"quantize\(dynamic_dims=...\) declares dim 1 of input 0"):
        quantize(nn.Linear(64, 10), PTQConfig(approach="dynamic", dynamic_dims={0: 1}), eval_fn=lambda m: 1.0,
                 example_inputs=digits[2][:4])
    pairs, x = _Pairs().eval(), torch.randn(4, 8)
    result = compress(pairs, CompressionConfig(prune=None, quantize=None, fp32_format="onnx", latency_repeats=2,
                                               dynamic_dims={0: 1}), eval_fn=lambda m: 1.0, example_inputs=x,
                      output_dir=tmp_path)
    loaded, _ = load_quantized(result.artifact)
    torch.testing.assert_close(loaded(torch.randn(3, 12)).shape, torch.Size([3, 3]))


@pytest.mark.parametrize("rnn_kwargs", [{}, {"num_layers": 2, "bidirectional": True}, {"proj_size": 8}])
def test_unstructured_pruning_covers_every_weight_matrix_of_a_recurrent_layer(rnn_kwargs):
    model = nn.Sequential(nn.LSTM(16, 32, batch_first=True, **rnn_kwargs))
    lstm = model[0]
    expected = [n for n, p in lstm.named_parameters() if n.startswith("weight")]
    assert [n for _, n in prune_targets(model, PruneConfig(sparsity=0.5))] == expected
    cell = nn.Sequential(nn.GRUCell(4, 4), nn.Linear(4, 2))
    assert [n for _, n in prune_targets(cell, PruneConfig(sparsity=0.5))] == ["weight_ih", "weight_hh", "weight"]
    # "bias" stands for the recurrent biases as "weight" does for the matrices (a Linear's bias was pruned, these not)
    with_bias = PruneConfig(sparsity=0.5, parameter_names=("weight", "bias"))
    assert [n for _, n in prune_targets(model, with_bias)] == expected + [
        n for n, _ in lstm.named_parameters() if n.startswith("bias")]
    assert [n for _, n in prune_targets(cell, with_bias)] == ["weight_ih", "weight_hh", "bias_ih", "bias_hh",
                                                              "weight", "bias"]
    no_bias = nn.Sequential(nn.GRU(4, 4, bias=False))
    assert [n for _, n in prune_targets(no_bias, with_bias)] == ["weight_ih_l0", "weight_hh_l0"]
    # structured pruning would cut gate rows, no channel shrink can remove: a recurrent layer is left out
    with_head = nn.Sequential(nn.GRU(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    assert [type(m) for m, _ in prune_targets(with_head, PruneConfig(sparsity=0.5, method="ln_structured",
                                                                      removable_only=False))] == [nn.Linear]


def test_a_recurrent_model_is_pruned_to_the_exact_sparsity_over_its_lstm_and_head():
    torch.manual_seed(0)
    model = _Tokens()
    batches = [(torch.randint(0, 30, (8, n)), torch.randint(0, 3, (8,))) for n in (12, 20, 9)]

    fine_tune = sgd_fine_tune(batches, lr=0.1, steps=12)
    result = compress(model, CompressionConfig(prune=PruneConfig(sparsity=0.7), shrink=False, export=False,
                                               latency_repeats=2),
                      eval_fn=lambda m: 1.0, example_inputs=batches[0][0], fine_tune=fine_tune, fine_tune_steps=12)
    pruned = result.stage_models["pruned"]
    targets = prune_targets(pruned, PruneConfig(sparsity=0.7))
    zeros = sum(int((getattr(m, n) == 0).sum()) for m, n in targets)
    total = sum(getattr(m, n).numel() for m, n in targets)
    assert zeros == round(0.7 * total)  # global over the LSTM's matrices and the head
    assert all(0 < int((getattr(m, n) == 0).sum()) < getattr(m, n).numel() for m, n in targets)
    assert result.report["pruned"].weight_sparsity == pytest.approx(0.7, abs=1e-3)  # the report counts the LSTM
    assert pruned_targets(pruned) == []  # the stage model holds plain (permanent) weights
    assert pruned_targets(model) == []  # the caller's model is untouched


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_a_masked_recurrent_layer_computes_with_its_mask_and_keeps_it_through_permanence_and_its_state_dict(rnn):
    torch.manual_seed(0)
    model = nn.Sequential(rnn(6, 12, num_layers=2, batch_first=True))
    targets = prune_targets(model, PruneConfig(sparsity=0.6))
    prune_(targets, "l1_unstructured", 0.6)
    x = torch.randn(3, 7, 6)
    masked = model(x)[0]
    zeroed = deepcopy_model(model)  # after a forward: its cached masked weights are no graph leaves
    make_permanent_(zeroed)
    reference = rnn(6, 12, num_layers=2, batch_first=True)
    reference.load_state_dict({k.removeprefix("0."): v for k, v in permanent_state_dict(model).items()})
    assert int(sum((getattr(m, n) == 0).sum() for m, n in prune_targets(zeroed, PruneConfig(sparsity=0.6)))) > 0
    torch.testing.assert_close(zeroed(x)[0], masked)
    torch.testing.assert_close(reference(x)[0], masked)  # the plain weights a fresh LSTM loads are the masked ones
    masked.sum().backward()  # the gradient reaches the trainable weights through the mask
    orig = model[0].weight_hh_l0_orig
    assert orig.grad is not None and torch.all(orig.grad[model[0].weight_hh_l0_mask == 0] == 0)


def test_a_bfloat16_model_is_pruned_quantized_and_its_file_read_back(digits, tmp_path):
    x_val, y_val = digits[2], digits[3]
    torch.manual_seed(0)
    model = train(mlp(64, 96, 96, 10), digits[0], digits[1]).to(torch.bfloat16)

    def accuracy(candidate: nn.Module) -> float:
        with torch.no_grad():
            return (candidate(x_val.bfloat16()).argmax(1) == y_val).float().mean().item()

    config = CompressionConfig(prune=PruneConfig(sparsity=0.5), quantize=PTQConfig(approach="dynamic", max_trials=3),
                               latency_repeats=2)
    result = compress(model, config, eval_fn=accuracy, example_inputs=x_val[:16].bfloat16(), output_dir=tmp_path)
    quantized = result.report["quantized"]
    assert "read back" in quantized.description and quantized.metric > 0.9
    assert any("bfloat16 weights were quantized from a float32 copy" in m for m in result.report.messages)


def test_a_bfloat16_models_fp32_file_is_no_onnx_file(tmp_path):
    """ONNX Runtime's CPU kernels take no bfloat16: fp32_format='onnx' failed after every stage, in its words ("Could
    not find an implementation for Gemm(13)"), and 'auto' logged that failure before writing the torch.export file;
    save_quantized raised onnxruntime's own error."""
    from litcompress.quantization import save_quantized
    from litcompress.quantization.artifact import Fp32FormatError

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 3)).bfloat16().eval(), torch.randn(4, 4).bfloat16()
    stages = []

    def evaluate(candidate: nn.Module) -> float:
        stages.append(candidate)
        return 1.0

    with pytest.raises(ValueError, match=r"CompressionConfig\(fp32_format='onnx'\) for a model in bfloat16 "
                                         r"\(0.weight, 0.bias\): ONNX Runtime's CPU kernels do not take bfloat16"):
        compress(model, CompressionConfig(fp32_format="onnx", latency_repeats=1), eval_fn=evaluate, example_inputs=x,
                 output_dir=tmp_path / "onnx")
    assert not stages  # before any stage
    with pytest.raises(Fp32FormatError, match=r"the model computes in bfloat16 \(0.weight, 0.bias\)"):
        save_quantized(model, None, tmp_path / "m.onnx", x, fp32_format="onnx")
    result = compress(model, CompressionConfig(latency_repeats=1), eval_fn=evaluate, example_inputs=x,
                      output_dir=tmp_path / "auto")
    assert [p.name for p in (tmp_path / "auto").iterdir() if p.name.startswith("model")] == ["model.pt2"]
    assert not any("onnx" in m.lower() and "fail" in m.lower() for m in result.report.messages)
    # with quantize too: the fp32 model kept (int8 slower than asked) was the bf16 one, its ONNX file failed last
    stages.clear()
    quantizing = CompressionConfig(fp32_format="onnx", latency_repeats=1,
                                   quantize=PTQConfig(approach="dynamic", backends=("onnxruntime",), max_trials=1))
    with pytest.raises(ValueError, match=r"so its fp32 file cannot be ONNX"):
        compress(model, quantizing, eval_fn=evaluate, example_inputs=x, output_dir=tmp_path / "q")
    assert not stages


class _ScaledByBfloat16Buffer(nn.Module):
    """A float32 layer whose output a bfloat16 buffer, cast, scales: the model computes in float32."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("scale", torch.ones(3, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale.float()


def test_a_float32_model_holding_a_bfloat16_buffer_is_written_as_onnx(tmp_path):
    """The bfloat16 refusal counted buffers: such a model, which ONNX Runtime runs, was refused, and 'auto' skipped
    the ONNX file (7.5x faster here than the torch.export one)."""
    model, x = _ScaledByBfloat16Buffer().eval(), torch.randn(4, 4)
    result = compress(model, CompressionConfig(fp32_format="onnx", latency_repeats=1), eval_fn=lambda m: 1.0,
                      example_inputs=x, output_dir=tmp_path)
    assert (tmp_path / "model.onnx").exists()
    assert any("read back, its outputs differ" in m for m in result.report.messages)


def test_a_float16_models_onnx_runtime_int8_stage_is_sized_by_its_onnx_bytes(digits):
    """Without a file, an ONNX Runtime model is sized by its ONNX bytes. A half-precision model's int8 result wraps
    it (float inputs cast to float32), and was sized as the wrapper's empty state dict: 1.3 KiB for 9k weights."""
    from litcompress.report.size import model_size_bytes

    x_val, y_val = digits[2], digits[3]
    torch.manual_seed(0)
    model = train(mlp(64, 96, 96, 10), digits[0], digits[1]).half()

    def accuracy(candidate: nn.Module) -> float:
        with torch.no_grad():
            return (candidate(x_val.half()).argmax(1) == y_val).float().mean().item()

    config = CompressionConfig(prune=None, quantize=PTQConfig(backends=("onnxruntime",), max_trials=1),
                               latency_repeats=2)
    result = compress(model, config, eval_fn=accuracy, example_inputs=x_val[:16].half())
    quantized = result.stage_models["quantized"]
    onnx_bytes = quantized.model.model_bytes
    assert isinstance(onnx_bytes, bytes) and result.report["quantized"].size_bytes == len(onnx_bytes)
    weights = sum(p.numel() for p in model.parameters())
    assert weights < len(onnx_bytes) < 2 * weights  # int8: about a byte per weight, plus the graph
    assert model_size_bytes(quantized) == len(onnx_bytes)


def test_a_tied_output_layer_is_pruned_with_its_embedding_and_stays_tied(tmp_path):
    """A language model whose output layer holds its input embedding's matrix: the pipeline prunes the Linear
    layers, so the embedding must compute with the output layer's mask while fine-tuning, the tensor counts once in
    the sparsity, the saved state dict keeps one tensor under both names, and the fp32 file stores it once."""
    from tests.pruning.test_tied_weights import VOCAB, TiedLM, ids

    torch.manual_seed(0)
    model = TiedLM().eval()
    x = ids(0, batch=64)
    y = (x[:, 0] + x[:, 1]) % VOCAB
    masked_lookups: list[bool] = []

    def fine_tune(working, step):
        def after_step(t):
            step(t)
            if hasattr(working.head, "weight_mask"):
                mask = working.head.weight_mask
                masked_lookups.append(bool(torch.equal(working.embedding(torch.arange(VOCAB)) == 0,
                                                       (mask == 0) | (working.head.weight_orig == 0))))
        train(working, x, y, steps=30, step_fn=after_step)

    config = CompressionConfig(prune=PruneConfig(sparsity=0.6), latency_repeats=2, fp32_format="onnx")
    result = compress(model, config, eval_fn=lambda m: float((m(x).argmax(1) == y).float().mean()),
                      example_inputs=(x[:8],), fine_tune=fine_tune, fine_tune_steps=30, output_dir=tmp_path)
    assert masked_lookups and all(masked_lookups)
    targets = prune_targets(model, config.prune)
    assert (model.embedding, "weight") in targets  # found through the tie; the user's model is untouched
    assert not any(is_pruned(m, n) for m, n in targets) and model.head.weight is model.embedding.weight
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert result.sparsity.numel == linear and result.sparsity.zeros == round(0.6 * linear)
    state = torch.load(tmp_path / PRUNED_STATE_FILE)
    assert torch.equal(state["head.weight"], state["embedding.weight"])
    fresh = TiedLM(seed=1)
    fresh.load_state_dict(state)
    assert fresh.head.weight is fresh.embedding.weight and (fresh.embedding.weight == 0).any()
    onnx = pytest.importorskip("onnx")
    initializers = [tuple(i.dims) for i in onnx.load(str(result.artifact)).graph.initializer]
    assert sum(dims in ((VOCAB, 12), (12, VOCAB)) for dims in initializers) == 1


class Untraceable(nn.Module):
    """An MLP whose forward has data-dependent control flow, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(64, 32, 32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.net(x)
        return self.net(-x)


def test_structured_pruning_of_a_model_fx_cannot_trace_is_refused_before_fine_tuning(digits):
    """Without a trace shrink removes nothing, and removable_only could filter nothing: every layer was pruned by
    channel, a GPT's residual stream included (a probe's loss went from 0.80 to 4.5). Refused before any training;
    removable_only=False masks the channels all the same."""
    x_val, y_val = digits[2], digits[3]
    model = Untraceable().eval()
    tuned: list[int] = []

    def fine_tune(model, step):
        tuned.append(1)

    with pytest.raises(ValueError, match=r"shrink needs the model traced by torch.fx: tracing Untraceable with "
                                         r"torch.fx failed.*removable_only=False masks the channels anyway"):
        compress(model, CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured"), **FAST),
                 eval_fn=accuracy(x_val, y_val), example_inputs=x_val[:8], fine_tune=fine_tune, fine_tune_steps=10)
    assert not tuned
    with pytest.raises(ValueError, match="shrink needs the model traced"):
        prune_targets(model, PruneConfig(sparsity=0.5, method="ln_structured"))
    masked = compress(model, CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured",
                                                                 removable_only=False), **FAST),
                      eval_fn=accuracy(x_val, y_val), example_inputs=x_val[:8])
    assert masked.sparsity.sparsity > 0.4


class CompiledBody(nn.Module):
    """A model whose body is torch.compile'd (as Lightning's docs suggest for a LightningModule's network)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.compile(mlp(64, 48, 48, 10), backend="eager")  # eager backend: no compiler in the test

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_a_torch_compiled_model_is_compressed_as_the_eager_modules_it_compiles(trained, digits, tmp_path):
    """Before, every step that traces failed on a compiled module: shrink ("OptimizedModule is missing the required
    forward"), every int8 backend (torch.jit.trace, torch.onnx.export, torch.export), and the export."""
    x_val, y_val = digits[2], digits[3]
    for model in (torch.compile(trained, backend="eager"), CompiledBody()):
        config = CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured"),
                                   quantize=PTQConfig(backends=("torch_ao", "onnxruntime")), latency_repeats=2)
        result = compress(model, config, eval_fn=accuracy(x_val, y_val), example_inputs=x_val[:8],
                          output_dir=tmp_path / type(model).__name__)
        assert [s.stage for s in result.report.stages] == ["input", "pruned", "shrunk", "quantized"]
        assert all(t.error is None for t in result.quantization.trials)
        assert result.artifact is not None and result.artifact.exists()
        assert any(m.startswith("torch.compile'd module(s)") for m in result.report.messages)
    assert isinstance(model.body, torch._dynamo.OptimizedModule)  # the model given stays compiled


def test_a_sequence_models_token_pooled_layers_are_pruned_and_removed_with_the_example_inputs_ranks():
    """A feed-forward layer on every token, pooled over the tokens before the head (``head(ff(x).mean(1))``):
    whether dim 1 is the tokens depends on the input's rank, which the example inputs give. Before, structured
    pruning left the layer out ("its output goes to call_method mean, which shrink does not see through")."""
    from litcompress.pipeline import preview_shrink
    from tests.pruning.test_shrink import TokenPooling

    torch.manual_seed(0)
    model = TokenPooling("mean").eval()
    x = torch.randn(16, 5, 8)
    prune = PruneConfig(sparsity=0.5, method="ln_structured")
    with pytest.raises(ValueError, match="ff: its output goes to call_method mean, which shrink does not see"):
        prune_targets(model, prune)  # without inputs: the head is excluded, and ff is not removable
    assert prune_targets(model, prune, (x,)) == [(model.ff, "weight")]
    preview, notes = preview_shrink(model, prune, example_inputs=x)
    assert preview.model.ff.out_features == 8 and notes == []
    result = compress(model, CompressionConfig(prune=prune, quantize=None), eval_fn=lambda m: 1.0, example_inputs=x)
    assert result.stage_models["shrunk"].ff.out_features == 8
    assert not any("removable_only" in m for m in result.report.messages)


class FeaturesClassifier(nn.Module):
    """``forward(x, return_features=False)``, the features read by a Python ``if`` (fx cannot trace it as it is):
    structured pruning used to be refused and the fx and ONNX quantizers failed on it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(64, 96), nn.Linear(96, 96), nn.Linear(96, 10)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        features = torch.relu(self.b(torch.relu(self.a(x))))
        return features if return_features else self.head(features)


def test_a_model_with_a_flag_is_pruned_shrunk_and_quantized_keeping_the_layers_the_flag_returns(digits, tmp_path):
    torch.manual_seed(0)
    model = train(FeaturesClassifier(), digits[0], digits[1])
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured"),
                               quantize=PTQConfig(approach="static", backends=("torch_ao", "onnxruntime"),
                                                  max_trials=2, accuracy=AccuracyCriterion(tolerable_loss=0.05)),
                               latency_repeats=2)
    result = compress(model, config, eval_fn=accuracy(digits[2], digits[3]),
                      example_inputs=digits[2][:32],
                      calibration_data=[(digits[0][:128], None)], output_dir=tmp_path)
    # `b` writes the features forward returns with return_features=True: only `a` is pruned and narrowed
    pruned, shrunk = result.stage_models["pruned"], result.stage_models["shrunk"]
    assert int((pruned.a.weight.abs().sum(1) == 0).sum()) == 48 and not bool((pruned.b.weight == 0).any())
    assert (shrunk.a.out_features, shrunk.b.out_features) == (48, 96)
    x = digits[4]
    with torch.no_grad():
        for flag in (False, True):
            torch.testing.assert_close(shrunk(x, flag), pruned(x, flag), rtol=1e-4, atol=1e-5)
    assert [trial.error for trial in result.quantization.trials] == [None, None]
    loaded, _ = load_quantized(str(result.artifact))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model(x))


def test_gpt2_conv1d_layers_are_pruned_unstructured_and_counted():
    """GPT-2's Conv1D layers (Hugging Face; Linear with the weight stored transposed) were no pruning target: compress
    pruned only a GPT-2's output layer (its tied embedding table) to the sparsity asked, and the sparsity column
    counted that layer alone. Structured pruning leaves them out (their rows are input features)."""
    from tests.conftest import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(32, 8), nn.GELU(), Conv1D(8, 32), nn.Flatten(), nn.Linear(8 * 8, 3)).eval()
    x = torch.randn(16, 8, 8)
    assert [id(m) for m, _ in prune_targets(model, PruneConfig(sparsity=0.5))] == [id(model[i]) for i in (0, 2, 4)]
    assert [id(m) for m, _ in prune_targets(model, PruneConfig(sparsity=0.5, method="ln_structured",
                                                               removable_only=False, exclude=()))] == [id(model[4])]
    result = compress(model, CompressionConfig(prune=PruneConfig(sparsity=0.75), **FAST),
                      eval_fn=lambda m: float(m(x).abs().mean()), example_inputs=x)
    pruned = result.stage_models["pruned"]
    n = sum(pruned[i].weight.numel() for i in (0, 2, 4))
    assert sum(int((pruned[i].weight == 0).sum()) for i in (0, 2, 4)) == round(0.75 * n)
    assert result.report["pruned"].weight_sparsity == pytest.approx(round(0.75 * n) / n)


def test_a_layer_whose_features_are_mean_pooled_over_a_padding_mask_is_pruned_and_removed():
    """``(ff(x) * mask).sum(1) / mask.sum(1)``: a pruned row's bias is held at zero, so the row outputs zero, which
    the product with the mask keeps (a non-zero constant it would not), and shrink removes it."""
    from tests.text_task import TextClassifier, TextData

    torch.manual_seed(0)
    model = TextClassifier().eval()
    batch = next(iter(TextData().test_dataloader()))
    inputs = (batch["input_ids"], batch["attention_mask"])
    result = compress(model, CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured"),
                                               export=False, latency_repeats=2),
                      eval_fn=agreeing_with(model, [inputs]), example_inputs=inputs)
    shrunk = result.stage_models["shrunk"]
    assert (shrunk.ff[0].out_features, shrunk.ff[2].out_features, shrunk.head.in_features) == (32, 16, 16)
    assert any("held at zero in 1 layer(s) without a BatchNorm before a place that needs zeros (ff.2)" in m
               for m in result.report.messages)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(*inputs), result.stage_models["pruned"](*inputs), rtol=0, atol=1e-5)


def test_structured_pruning_of_an_embedding_prunes_its_dims_which_shrink_removes(tmp_path):
    torch.manual_seed(0)
    model = _PackedTokens().eval()
    batches = [(torch.randint(0, 30, (8, 12)), torch.randint(1, 13, (8,))) for _ in range(3)]
    prune = PruneConfig(sparsity=0.5, method="ln_structured", layer_types=(nn.Embedding, nn.LSTM, nn.Linear))
    result = compress(model, CompressionConfig(prune=prune, export=False, latency_repeats=2),
                      eval_fn=agreeing_with(model, batches), example_inputs=batches[0])
    embedding = result.stage_models["pruned"].embed.weight
    assert int((embedding == 0).all(0).sum()) == 8 and not bool((embedding == 0).all(1).any())  # dims, not tokens
    shrunk = result.stage_models["shrunk"]
    assert (shrunk.embed.embedding_dim, shrunk.rnn.input_size, shrunk.rnn.hidden_size) == (8, 8, 16)
    with torch.no_grad():
        for batch in batches:
            torch.testing.assert_close(shrunk(*batch), result.stage_models["pruned"](*batch), rtol=0, atol=1e-5)


def test_quantizing_an_lstm_fed_packed_sequences_says_why_trials_fail_without_pages_of_noise(tmp_path, capfd):
    """torch.ao's int8 LSTM fixes a packed batch's size in its trace (dozens of TracerWarnings) and torch's ONNX
    exporter fails on the packing after printing the whole graph to stdout: the trials' one-line reasons remain."""
    import warnings

    torch.manual_seed(0)
    model = _PackedTokens().eval()
    batches = [(torch.randint(0, 30, (8, 12)), torch.randint(1, 13, (8,))) for _ in range(3)]
    ptq = PTQConfig(backends=("torch_ao", "onnxruntime"), approach="dynamic",
                    accuracy=AccuracyCriterion(tolerable_loss=1.0), latency_repeats=2, max_trials=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = compress(model, CompressionConfig(quantize=ptq, latency_repeats=2),
                          eval_fn=agreeing_with(model, batches), example_inputs=batches[0], calibration_data=batches,
                          output_dir=tmp_path)
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    printed = capfd.readouterr()
    assert "Torch IR graph at exception" not in printed.out + printed.err
    messages = result.report.messages
    assert any("torch.jit.trace did not leave free dim 0 of input 0" in m for m in messages)
    assert any("onnxruntime: torch.onnx.export failed: RuntimeError" in m for m in messages)
    assert result.artifact is not None and "fp32=['rnn']" in result.report["quantized"].description


class _SharedLayer(nn.Module):
    """A 2048 x 2048 layer returned beside a number in a dict: TorchScript cannot write it on CSR. (A layer under
    two names, the first such model, is now kept dense by sparsify itself.)"""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.a, self.head = nn.Linear(64, 2048), nn.Linear(2048, 2048), nn.Linear(2048, 10)

    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": self.head(torch.relu(self.a(torch.relu(self.inp(x))))), "steps": 2}


def test_sparse_kernels_that_cannot_be_written_are_shown_dense_in_the_reports_table(tmp_path):
    """All layers went back dense, as the note said, but the 'Sparse kernels' table still listed them as CSR."""
    torch.manual_seed(0)
    model = _SharedLayer().eval()
    x = torch.randn(64, 64)
    config = CompressionConfig(prune=PruneConfig(sparsity=0.99, scope="local", exclude=("head",)), shrink=False,
                               sparse_kernels=True, latency_repeats=2, num_threads=1)
    result = compress(model, config, eval_fn=lambda m: 1.0, example_inputs=x, output_dir=tmp_path)
    said = [m for m in result.report.messages if "cannot be written as TorchScript" in m]
    assert len(said) == 1 and said[0].endswith("all kept dense.")
    assert "sparse" not in [row.stage for row in result.report.stages]
    table = dict(result.report.details)["Sparse kernels"]
    assert "kept dense: the model on CSR kernels cannot be written as TorchScript" in table
    assert not re.search(r" CSR$", table, re.M)
    assert re.search(r"^model: .* with the layers above on CSR \(.*\): all put back dense, 0 of 3 Linear layers on "
                     r"CSR kernels, 1 thread\(s\); outputs differ by at most 0$", table, re.M)


def test_sparse_kernels_with_no_layer_sparse_enough_say_that_none_was_timed():
    """The note said none 'ran at least 1.1x faster' and sent the reader to the table's times, all dashes."""
    model = ReluMLP(64, 32, 10).eval()
    x = torch.randn(8, 64)
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, scope="local"), shrink=False, sparse_kernels=True,
                               latency_repeats=2, num_threads=1)
    result = compress(model, config, eval_fn=lambda m: 1.0, example_inputs=x)
    said = [m for m in result.report.messages if m.startswith("sparse kernels:")]
    assert len(said) == 1 and "was a candidate (sparsity below min_sparsity=0.7), so none was timed" in said[0]
    assert "ran at least 1.1x faster" not in said[0] and "prune to a higher sparsity" in said[0]


def test_sparse_kernels_refusing_float64_layers_do_not_advise_pruning_more():
    """Layers 95% zero, kept dense for being float64, were said to need 'a higher sparsity'."""
    model = ReluMLP(64, 32, 10).double().eval()
    x = torch.randn(8, 64, dtype=torch.float64)
    config = CompressionConfig(prune=PruneConfig(sparsity=0.95, scope="local"), shrink=False, sparse_kernels=True,
                               latency_repeats=2, num_threads=1)
    result = compress(model, config, eval_fn=lambda m: 1.0, example_inputs=x)
    said = [m for m in result.report.messages if m.startswith("sparse kernels:")]
    assert len(said) == 1 and "was a candidate (not float32), so none was timed." in said[0]
    assert "higher sparsity" not in said[0]


class _HeadDefinedFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(32, 10)  # registered first, run last
        self.encoder = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())

    def forward(self, x):
        return self.classifier(self.encoder(x))


def test_structured_pruning_leaves_whole_the_layer_that_writes_the_output_not_the_last_registered():
    """The default exclude was the last layer registered: a head defined before its body left the body's last layer
    unpruned (and its channels in the shrunk model) without a word, while the head was left out anyway."""
    torch.manual_seed(0)
    model = _HeadDefinedFirst().eval()
    x = torch.rand(16, 64)
    config = PruneConfig(method="ln_structured", sparsity=0.5, schedule="oneshot")
    assert [(module, name) for module, name in prune_targets(model, config, (x,))] == [
        (model.encoder[0], "weight"), (model.encoder[2], "weight")]
    result = compress(model, CompressionConfig(prune=config, latency_repeats=2, export=False),
                      eval_fn=lambda m: 1.0, example_inputs=x)
    shrunk = result.stage_models["shrunk"]
    assert shrunk.encoder[0].out_features == 16 and shrunk.encoder[2].out_features == 16
    assert shrunk.classifier.out_features == 10


def test_a_model_given_with_live_structured_masks_is_pruned_further_and_shrunk_as_its_permanent_twin():
    """The masks' forward pre-hooks were taken for the user's hooks ("it has forward hooks, which the traced graph
    does not show"): structured pruning refused every layer of a ModelPruning(make_pruning_permanent=False) model."""
    x = torch.randn(64, 16)
    torch.manual_seed(0)
    masked = mlp(16, 32, 32, 4).eval()
    prune_([(masked[0], "weight"), (masked[2], "weight")], "ln_structured", 0.25, scope="local", n=2, dim=0)
    twin = deepcopy_model(masked)
    make_permanent_(twin)
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured"), **FAST)
    assert removable_channels(masked) == removable_channels(twin)
    results = [compress(model, config, eval_fn=lambda m: float(m(x).abs().mean()), example_inputs=x[:8])
               for model in (masked, twin)]
    assert [[s.parameters for s in r.report.stages] for r in results] == [[1732, 1732, 612]] * 2
    with torch.no_grad():
        assert torch.equal(results[0].model(x), results[1].model(x))
    assert pruned_targets(masked)  # the user's model keeps its masks


def test_the_export_touches_no_file_but_its_own(tmp_path):
    """The candidates were written as `model.partial.onnx` / `model.partial.pt2` and deleted after timing: a user's
    files of those names were overwritten, then deleted, on every run."""
    mine = {"model.partial.onnx": b"mine", "model.partial.pt2": b"mine too"}
    for name, content in mine.items():
        (tmp_path / name).write_bytes(content)
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    result = compress(mlp(8, 16, 4).eval(), CompressionConfig(latency_repeats=2), eval_fn=lambda m: 0.0,
                      example_inputs=x[:4], output_dir=tmp_path)
    assert result.artifact is not None and result.artifact.parent == tmp_path
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in mine} == mine
    assert not [p.name for p in tmp_path.iterdir() if ".partial" in p.name and p.name not in mine]


def test_a_model_on_csr_kernels_that_cannot_be_written_is_found_before_its_stage_is_kept():
    """A layer under two names (a shortcut attribute) or a dict output mixing types fails torch.jit.trace once on
    CSR kernels, and TorchScript is the one format that holds them: the sparse stage was kept, and no file at all
    was written. The pipeline now tries the write first and keeps the model dense where it fails."""
    from litcompress.pipeline.compress import _sparse_file_failure
    from litcompress.pruning.sparse import SparseLinear

    class Net(nn.Module):
        def __init__(self, alias: bool) -> None:
            super().__init__()
            self.body = nn.Sequential(SparseLinear(weight, torch.zeros(8)), nn.ReLU())
            self.head = nn.Linear(8, 2)
            if alias:
                self.shortcut = self.body[0]

        def forward(self, x):
            return self.head(self.body(x))

    torch.manual_seed(0)
    weight = torch.randn(8, 16) * (torch.rand(8, 16) > 0.9)
    x = torch.randn(4, 16)
    assert _sparse_file_failure(Net(alias=False), (x,)) is None
    said = _sparse_file_failure(Net(alias=True), (x,))
    assert said is not None and said.startswith("ExportError: torch_ao: torch.jit.trace failed")


class TimeMajorEncoder(nn.Module):
    """torch's default layout: (length, batch, features), or batch-first inputs transposed inside."""

    def __init__(self, transposes: bool = False) -> None:
        super().__init__()
        self.transposes = transposes
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0), 1,
                                         enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposes:
            x = x.transpose(0, 1)
        return self.head(self.enc(x).mean(0))


@pytest.mark.parametrize("transposes, dynamic_dims, batches, warned", [
    (False, None, 1, True), (True, None, 1, False), (False, {0: 1}, 1, False), (False, None, 2, False)])
def test_a_time_major_input_is_said_to_need_its_batch_dim_declared(tmp_path, transposes, dynamic_dims, batches,
                                                                    warned):
    """Dim 0 is left free as the batch: a (length, batch, features) input's file took no other batch size, and its
    read-back check (one more row along dim 0) passed. Only an input whose dim 1 reaches a time-major layer as its
    batch is named (not one the model transposes), and declaring dim 1 frees it, as data whose dim 1 varies does."""
    import warnings

    torch.manual_seed(0)
    model = TimeMajorEncoder(transposes).eval()
    x = torch.randn(*((4, 6, 16) if transposes else (6, 4, 16)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = compress(model, CompressionConfig(dynamic_dims=dynamic_dims, latency_repeats=2),
                          eval_fn=lambda m: 0.0, example_inputs=(x,), output_dir=tmp_path,
                          calibration_data=[x, x[:, :3]][:batches])
    said = [str(w.message) for w in caught if "time-major" in str(w.message)]
    assert said == ([r"compress: input 0 (shape (6, 4, 16)) reaches enc.layers.0.self_attn time-major "
                     r"(batch_first=False: its dim 1 is the batch), but the files leave dim 0 free as the batch, so "
                     r"an ONNX or torch.export file would take no other batch size; declare dynamic_dims={0: 1} "
                     r"(CLI: --dynamic-dims 0:1)."]
                    if warned else [])
    loaded, _ = load_quantized(result.artifact)
    other = torch.randn(*((2, 6, 16) if transposes else (6, 2, 16)))
    if warned:
        with pytest.raises(Exception, match=r"shape\[1\] to be equal to 4"):  # (the torch.export file's guard)
            loaded(other)
    else:
        with torch.no_grad():
            torch.testing.assert_close(loaded(other), model(other), atol=1e-5, rtol=1e-5)


def test_a_heads_fraction_that_rounds_to_no_head_is_refused_before_any_stage(digits):
    """0.2 of 2 heads rounds to 0: no head was pruned, and the stage and report said '20% of the attention heads'."""
    from litcompress.models import TransformerClassifier

    model = TransformerClassifier(d_model=16, heads=2, layers=2, feed_forward=32).eval()
    calls = []
    with pytest.raises(ValueError, match=r"PruneConfig\(heads=0.2\): 0.2 of each attention's heads prunes none in "
                                         r"encoder.layers.0.self_attn \(2\), encoder.layers.1.self_attn \(2\); "
                                         r"0.251 or more prunes one in each. No head would be pruned."):
        compress(model, CompressionConfig(prune=PruneConfig(sparsity=0.0, method="ln_structured", heads=0.2),
                                          quantize=None, export=False),
                 eval_fn=lambda m: calls.append(m) or 0.0, example_inputs=digits[2][:4].view(-1, 1, 8, 8))
    assert calls == []


def test_a_calibration_batch_the_model_cannot_take_fails_before_fine_tuning():
    """Only the first batch was run before the stages: a later one failed the search after all the fine-tuning. Two
    real batches get no hint to pass one (inputs, targets) batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    steps = []

    def fine_tune(m, step):
        steps.append(1)
        step(1)

    for data, hint in [([(x, y), (torch.randn(4, 7), y[:4])], False), ((x, torch.randn(16, 1)), True)]:
        with pytest.raises(ValueError, match=r"calibration batch 1 ") as error:
            compress(model, CompressionConfig(prune=PruneConfig(sparsity=0.5), quantize=PTQConfig(approach="static"),
                                              export=False), eval_fn=lambda m: 0.0, example_inputs=x[:4],
                     calibration_data=data, fine_tune=fine_tune, fine_tune_steps=1)
        assert ("give [(inputs, targets)]" in str(error.value)) == hint
    assert steps == []


class SigmoidBeforePaddedConv(nn.Module):
    """c1's zero channels become sigmoid(0) = 0.5 before a zero-padded conv: no held bias or BatchNorm zeroes them."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.c2, self.head = nn.Conv2d(8, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c2(torch.sigmoid(self.bn(self.c1(x)))).mean((2, 3)))


class BiasedConvIntoAGate(nn.Module):
    """c1 (a bias, no BatchNorm) feeds a squeeze-excitation gate: its pruned channels' biases must be held at zero."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.red, self.exp = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 3, 1), nn.Conv2d(3, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.silu(self.c1(x))
        y = y * torch.sigmoid(self.exp(nn.functional.relu(self.red(nn.functional.adaptive_avg_pool2d(y, 1)))))
        return self.head(y.mean((2, 3)))


class ShiftedSigmoidBeforePaddedConv(SigmoidBeforePaddedConv):
    """2 * sigmoid(x) - 1 maps 0 to 0: followed through the ops, the pruned channels stay zero (a review: each op
    judged alone refused it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c2(2 * torch.sigmoid(self.bn(self.c1(x))) - 1).mean((2, 3)))


class SoftplusBeforeAHeldBatchNorm(SigmoidBeforePaddedConv):
    """softplus(0) != 0 comes before the BatchNorm, which the pipeline holds at zero for the pruned channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c2(self.bn(nn.functional.softplus(self.c1(x)))).mean((2, 3)))


class BiasedDepthwiseBeforeAGate(nn.Module):
    """A pruned channel of c1 leaves the padded depthwise conv as its bias, a constant the gate does not keep."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.dw = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.red, self.exp, self.head = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(nn.functional.silu(self.c1(x)))
        y = y * torch.sigmoid(self.exp(nn.functional.relu(self.red(nn.functional.adaptive_avg_pool2d(y, 1)))))
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("model_class, c1_pruned", [
    (SigmoidBeforePaddedConv, False), (BiasedConvIntoAGate, True), (ShiftedSigmoidBeforePaddedConv, True),
    (SoftplusBeforeAHeldBatchNorm, True), (BiasedDepthwiseBeforeAGate, False)])
def test_structured_pruning_prunes_a_layer_only_where_shrink_removes_what_it_pruned(model_class, c1_pruned):
    """Found by a shrink fuzzer: both c1 were pruned and kept whole by shrink (accuracy lost, nothing saved), with
    advice to hold a BatchNorm at zero that the pipeline had already held (and that cannot zero a sigmoid's 0.5)."""
    from litcompress.pruning import channel_plan

    torch.manual_seed(0)
    model, x = model_class().eval(), torch.randn(16, 3, 6, 6)
    reason = channel_plan(model, example_inputs=(x,)).removable()["c1"]
    assert (reason is None) == c1_pruned, reason
    if not c1_pruned:
        assert "as a non-zero constant (" in reason
    result = compress(model, CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured"),
                                               quantize=None, export=False, latency_repeats=2),
                      eval_fn=lambda m: 0.0, example_inputs=x)
    pruned_rows = int((result.stage_models["pruned"].c1.weight.flatten(1).abs().sum(1) == 0).sum())
    width = result.stage_models["pruned"].c1.out_channels
    assert pruned_rows == (width // 2 if c1_pruned else 0)
    assert result.model.c1.out_channels == width - pruned_rows
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), result.stage_models["pruned"](x), rtol=1e-5, atol=1e-6)


def test_frozen_tensors_among_the_targets_are_said_and_exclude_leaves_them_dense(digits):
    """They were pruned with the rest, without a word, and no fine-tuning brought them back (ModelPruning and the IMP
    driver say it)."""
    x, y = digits[0][:256], digits[1][:256]
    torch.manual_seed(0)
    model = mlp(64, 32, 32, 10)
    model[0].requires_grad_(False)  # a frozen first layer (a backbone)
    fine_tune = sgd_fine_tune([(x, y)], lr=0.1, steps=4)
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5), quantize=None, export=False, latency_repeats=3)
    with pytest.warns(UserWarning, match=r"compress: 1 of the tensors to prune do not train \(requires_grad=False\): "
                                         r"0.weight\. .* PruneConfig\(exclude=\[...\]\) leaves them dense"):
        result = compress(model, config, eval_fn=accuracy(x, y), example_inputs=x[:8], fine_tune=fine_tune,
                          fine_tune_steps=4)
    assert any("do not train (requires_grad=False): 0.weight" in m for m in result.report.messages)
    assert float((result.stage_models["pruned"][0].weight == 0).float().mean()) > 0.1  # pruned, as said
    excluded = CompressionConfig(prune=PruneConfig(sparsity=0.5, exclude=("0",)), quantize=None, export=False,
                                 latency_repeats=3)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="compress: .* do not train")
        result = compress(model, excluded, eval_fn=accuracy(x, y), example_inputs=x[:8], fine_tune=fine_tune,
                          fine_tune_steps=4)
    assert not (result.stage_models["pruned"][0].weight == 0).any()
    with warnings.catch_warnings():  # one-shot (a model frozen for deployment): every tensor is pruned alike
        warnings.filterwarnings("error", message="compress: .* do not train")
        result = compress(model, config, eval_fn=accuracy(x, y), example_inputs=x[:8])
    assert not any("do not train" in m for m in result.report.messages)


def test_a_model_fabric_set_up_is_compressed_as_the_module_it_wraps(digits):
    """fx, shrink and the pt2e backend failed on Fabric's wrapper (shrink skipped, structured pruning refused): the
    module it wraps is compressed, and the wrapped model is left as it was."""
    from lightning.fabric import Fabric

    x_val, y_val = digits[2], digits[3]
    torch.manual_seed(0)
    model = ReluMLP(64, 32, 10)
    wrapped = Fabric(accelerator="cpu", devices=1).setup_module(model)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    prune = PruneConfig(sparsity=0.5, method="ln_structured", schedule="oneshot")
    result = compress(wrapped, CompressionConfig(prune=prune, **FAST), eval_fn=accuracy(x_val, y_val),
                      example_inputs=x_val[:8])
    shrunk = result.stage_models["shrunk"]
    assert type(shrunk) is ReluMLP and (shrunk.fc1.out_features, shrunk.fc2.out_features) == (16, 16)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x_val), result.stage_models["pruned"](x_val), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    # at bf16-true the wrapper casts the inputs to the module's bfloat16: kept, the model runs as the user's does
    half = Fabric(accelerator="cpu", devices=1, precision="bf16-true").setup_module(ReluMLP(64, 32, 10))
    result = compress(half, CompressionConfig(prune=None, quantize=None, shrink=False, **FAST),
                      eval_fn=accuracy(x_val, y_val), example_inputs=x_val[:8])
    assert result.report.stages[0].metric > 0


@pytest.mark.parametrize("quantized", [False, True])
def test_the_checks_before_the_stages_run_a_copy_so_a_forward_that_writes_state_leaves_the_model_as_it_was(
        digits, tmp_path, quantized):
    """The checks of the example inputs, the declared dims and the calibration batches ran the model passed: its
    counter moved (1 to 5 calls), against "the model you pass is never modified"."""
    model = CountsItsCalls(64, 32, 10).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x_val, y_val = digits[2], digits[3]
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured"), latency_repeats=2,
                               num_threads=1, quantize=PTQConfig(approach="static", backends=("torch_ao",),
                                                                 max_trials=1) if quantized else None)
    result = compress(model, config, eval_fn=accuracy(x_val, y_val), example_inputs=x_val[:32],
                      calibration_data=[(x_val[i:i + 32],) for i in range(0, 128, 32)], output_dir=tmp_path)
    assert int(model.calls) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert int(result.stage_models["input"].calls) > 0  # (the stages' copies ran)


def test_lazy_layers_never_called_are_refused_before_each_copy_draws_weights_of_its_own(digits, tmp_path):
    """Every stage's copy created its own random weights at its first call: the pruned row compared another network
    than the input row (a metric change with 0.01% pruned)."""
    x_val, y_val = digits[2], digits[3]
    model = nn.Sequential(nn.LazyLinear(32), nn.ReLU(), nn.Linear(32, 10))
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5), shrink=False, **FAST)
    with pytest.raises(ValueError, match=re.escape("compress: 0.weight, 0.bias belong to lazy layers never called")):
        compress(model, config, eval_fn=accuracy(x_val, y_val), example_inputs=x_val[:32])
    assert isinstance(model[0], nn.LazyLinear)  # as given
    model(x_val[:1])  # the remedy said
    result = compress(model, config, eval_fn=accuracy(x_val, y_val), example_inputs=x_val[:32])
    assert torch.equal(result.stage_models["input"][0].weight, model[0].weight)


def _fine_tune_loop(batches, steps, each_step=None):
    """A plain loop: SGD over `batches`, `step(t)` after each optimizer step, then `each_step(model, t)`."""
    return sgd_fine_tune(batches, 0.05, steps, each_step=each_step)


def _digits_batches(digits, count=4):
    return [(digits[0][i * 64:(i + 1) * 64], digits[1][i * 64:(i + 1) * 64]) for i in range(count)]


def test_a_layer_fine_tune_replaces_is_said_at_the_next_step_not_after_the_fine_tuning(digits):
    """The rounds pruned the detached layer, the new one never, and the report failed after all the steps with "is
    not a submodule of the model"."""
    replaced = []

    def replace(model, t):
        if t == 3:
            model[2] = nn.Linear(32, 32)
            replaced.append(t)

    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, schedule="linear"), shrink=False, **FAST)
    with pytest.raises(ValueError, match=re.escape("compress: fine_tune replaced the pruned layer(s) ['2']")):
        compress(mlp(64, 32, 32, 10), config, eval_fn=accuracy(digits[2], digits[3]), example_inputs=digits[2][:32],
                 fine_tune=_fine_tune_loop(_digits_batches(digits), 10, replace), fine_tune_steps=10)
    assert replaced == [3]


def test_a_fine_tune_returning_another_model_is_refused(digits):
    """It trained a copy and returned it: the kept weights were the input's, and the report said it fine-tuned."""

    def on_a_copy(model, step):
        trained = deepcopy_model(model)
        _fine_tune_loop(_digits_batches(digits), 4)(trained, step)
        return trained

    config = CompressionConfig(prune=PruneConfig(sparsity=0.5), shrink=False, **FAST)
    with pytest.raises(TypeError, match="fine_tune returned a model that does not hold the one it was given"):
        compress(mlp(64, 32, 10), config, eval_fn=accuracy(digits[2], digits[3]), example_inputs=digits[2][:32],
                 fine_tune=on_a_copy, fine_tune_steps=4)


def test_a_fine_tune_returning_a_wrapper_of_its_model_is_taken(digits):
    """Fabric's `model, opt = fabric.setup(model, opt); ...; return model` returns a wrapper holding the model it
    trained in place: it was refused (after the whole fine-tuning) as another model."""

    class Holder(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)

    def through_a_wrapper(model, step):
        wrapper = Holder(model)
        _fine_tune_loop(_digits_batches(digits), 4)(wrapper, step)
        return wrapper

    config = CompressionConfig(prune=PruneConfig(sparsity=0.5), shrink=False, **FAST)
    result = compress(mlp(64, 32, 10), config, eval_fn=accuracy(digits[2], digits[3]), example_inputs=digits[2][:32],
                      fine_tune=through_a_wrapper, fine_tune_steps=4)
    assert result.report["pruned"].weight_sparsity == pytest.approx(0.5, abs=0.01)


def test_masks_a_loop_made_permanent_are_not_said_to_have_been_unpruned(digits):
    """prune.remove at the loop's end keeps the zeros: 800 entries were said unpruned and pruned again."""

    def made_permanent(model, t):
        if t == 10:
            for module in model:
                if hasattr(module, "weight_orig"):
                    torch.nn.utils.prune.remove(module, "weight")

    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, schedule="linear", end=0.5), shrink=False, **FAST)
    result = compress(mlp(64, 32, 10), config, eval_fn=accuracy(digits[2], digits[3]), example_inputs=digits[2][:32],
                      fine_tune=_fine_tune_loop(_digits_batches(digits), 10, made_permanent), fine_tune_steps=10)
    assert not any("pruned again" in m or "pruned at once afterwards" in m for m in result.report.messages)
    assert "at once after them" not in result.report["pruned"].description
    assert result.report["pruned"].weight_sparsity == pytest.approx(0.5, abs=0.01)


def test_rounds_called_in_inference_mode_leave_training_working(digits):
    """step(t) in a loop's evaluation under torch.inference_mode made inference-tensor masks: the next training
    forward failed ("Inference tensors cannot be saved for backward")."""

    def fine_tune(model, step):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for t, (x, y) in enumerate(_digits_batches(digits) * 2, start=1):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            with torch.inference_mode():  # (an evaluation at the end of each "epoch", where the loop steps)
                step(t)

    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, schedule="linear"), shrink=False, **FAST)
    result = compress(mlp(64, 32, 10), config, eval_fn=accuracy(digits[2], digits[3]),
                      example_inputs=digits[2][:32], fine_tune=fine_tune, fine_tune_steps=8)
    assert result.report["pruned"].weight_sparsity == pytest.approx(0.5, abs=0.01)


def test_masks_lost_after_the_schedule_ended_and_a_count_restarted_are_said_as_what_they_are(digits):
    """A loop that restored its best weights (a state dict without masks) was said to have stopped before the
    schedule ended (at step 10, for an end at step 5); one whose count restarted each epoch, nothing."""
    saved = {}

    def restore_best(model, t):
        if t == 2:
            saved.update({k: v.clone() for k, v in model.state_dict().items()})
        if t == 10:
            for module in model:
                if hasattr(module, "weight_orig"):
                    torch.nn.utils.prune.remove(module, "weight")
            model.load_state_dict({k.replace("_orig", ""): v for k, v in saved.items() if not k.endswith("_mask")})

    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, schedule="linear", end=0.5), shrink=False, **FAST)
    result = compress(mlp(64, 32, 10), config, eval_fn=accuracy(digits[2], digits[3]),
                      example_inputs=digits[2][:32],
                      fine_tune=_fine_tune_loop(_digits_batches(digits), 10, restore_best), fine_tune_steps=10)
    assert any(m.startswith("fine-tuning reached its schedule's end (step 5), but") for m in result.report.messages)

    def per_epoch(model, step):
        for _ in range(3):
            _fine_tune_loop(_digits_batches(digits), 5)(model, step)  # t = 1..5 in every epoch

    result = compress(mlp(64, 32, 10), config, eval_fn=accuracy(digits[2], digits[3]),
                      example_inputs=digits[2][:32], fine_tune=per_epoch, fine_tune_steps=15)
    assert any(m.startswith("fine_tune called step(1) after step(5): t counts the loop's optimizer steps")
               for m in result.report.messages)


def test_a_link_to_a_folder_under_an_output_files_name_is_no_folder_in_the_way(tmp_path):
    """The write renames the file over the link (the folder it points to is left as it is): not refused."""
    from litcompress._files import folders_in_the_way

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "model.pt").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "model.onnx").mkdir()
    assert folders_in_the_way(tmp_path, ["model.pt", "model.onnx", "model.pt2"]) == ["model.onnx"]
    # Lightning's checkpoint save follows the link: it wrote the checkpoint into the folder under a temporary name
    (tmp_path / "dense.ckpt").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert folders_in_the_way(tmp_path, ["model.pt"], written_through_links=["dense.ckpt"]) == ["dense.ckpt"]


class _TakesNamedInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.second(torch.relu(self.first(image)))).mean((2, 3)))


def test_preview_shrink_reads_a_dict_of_example_inputs_as_compress_does():
    """compress reads a dict by forward's parameter names; preview_shrink, told to take the inputs compress takes,
    refused it ('Expected a tensor or a tuple of tensors')."""
    from litcompress.pipeline import preview_shrink

    torch.manual_seed(0)
    model, image = _TakesNamedInputs(), torch.randn(2, 1, 8, 8)
    prune = PruneConfig(sparsity=0.5, method="ln_structured")
    by_name, _ = preview_shrink(model, prune, example_inputs={"image": image})
    as_tensor, _ = preview_shrink(model, prune, example_inputs=image)
    assert by_name.report.table() == as_tensor.report.table() and by_name.report.parameters_after < sum(
        p.numel() for p in model.parameters())
    # a forward that takes the dict itself: read by input_fn, as compress(input_fn=) reads it
    whole, _ = preview_shrink(model, prune, example_inputs={"pixels": image}, input_fn=lambda batch: (batch["pixels"],))
    assert whole.report.table() == as_tensor.report.table()


@pytest.mark.parametrize("keep_multiple_of", [2.5, "8", 0, True])
def test_preview_shrink_names_a_bad_keep_multiple_of(keep_multiple_of):
    from litcompress.pipeline import preview_shrink

    with pytest.raises(ValueError, match=r"preview_shrink\(keep_multiple_of=.*\): expected an int >= 1"):
        preview_shrink(_TakesNamedInputs(), PruneConfig(sparsity=0.5, method="ln_structured"),
                       keep_multiple_of=keep_multiple_of)


def test_preview_shrink_names_its_own_keep_multiple_of_when_it_keeps_every_channel():
    from litcompress.pipeline import preview_shrink

    with pytest.raises(ValueError, match=r"^preview_shrink\(keep_multiple_of=64\) keeps every channel"):
        preview_shrink(_TakesNamedInputs(), PruneConfig(sparsity=0.5, method="ln_structured"), keep_multiple_of=64)


def test_preview_shrink_says_its_counts_follow_training_without_zero_batch_norm(digits):
    """With zero_batch_norm=False a pruned channel's constant (a BatchNorm's shift) decides whether shrink removes it
    before a zero-padded conv, and fine-tuning moves it: compress kept 12 and 13 channels where the preview said 9
    and 13, with nothing said."""
    from litcompress.pipeline import preview_shrink
    from tests.pruning.test_groups import ResNet, randomised

    torch.manual_seed(1)
    model = randomised(ResNet(), seed=1)
    x = digits[2][:16].view(-1, 1, 8, 8)

    def fine_tune(work, step):
        work.train()
        optimizer = torch.optim.SGD(work.parameters(), lr=1e-2)
        for t in range(1, 21):
            optimizer.zero_grad()
            work(x).pow(2).mean().backward()
            optimizer.step()
            step(t)

    for zero_batch_norm in (True, False):
        prune = PruneConfig(sparsity=0.5, method="ln_structured", schedule="cubic", zero_batch_norm=zero_batch_norm)
        preview, notes = preview_shrink(model, prune, example_inputs=x)
        said = [n for n in notes if n.startswith("zero_batch_norm=False: a pruned channel outputs a constant")]
        assert len(said) == (not zero_batch_norm)
        if zero_batch_norm:  # the promise the note qualifies: the same widths after fine-tuning
            result = compress(model, CompressionConfig(prune=prune, **FAST), eval_fn=accuracy(x, digits[3][:16]),
                              example_inputs=x, fine_tune=fine_tune, fine_tune_steps=20)
            assert {layer.name: layer.channels_after for layer in preview.report.layers} == \
                {layer.name: layer.channels_after for layer in result.shrink.layers}
