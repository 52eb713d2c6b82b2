"""The search: fallback of sensitive layers, never-None contract, bad input, budget."""

import copy
import math
import pickle
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import accuracy_fn, make_sensitive_mlp
from litcompress.quantization import (AccuracyCriterion, PTQConfig, QuantizationGoalWarning, layer_sensitivity,
                                      quantize)
from litcompress.quantization.backends import BACKEND_REGISTRY, BackendUnavailableError, Backend, get_backend
from litcompress.quantization.backends.exported import ExportedInference
from litcompress.quantization.backends.torch_ao import TorchAOBackend
from litcompress.quantization.tuner import UNUSED_MODEL_MESSAGE
from quant_helpers import quantized_layers, state_snapshot
from tests.conftest import Conv1D, CountsItsCalls

FAST = dict(latency_repeats=3, max_trials=6)


def test_sensitivity_ranks_the_broken_layer_first():
    model, x, _ = make_sensitive_mlp()
    for approach in ("dynamic", "static"):
        scores = layer_sensitivity(model, ["0", "2", "4"], [(x[:128],), (x[128:256],)], approach)
        assert min(scores, key=scores.get) == "0"
        assert scores["0"] < scores["2"] - 10 and scores["0"] < scores["4"] - 10
    # batches given as tensors, as quantize's calibration_data takes them (their rows were unpacked as inputs)
    assert layer_sensitivity(model, ["0", "2", "4"], [x[:128], x[128:256]], "dynamic") == \
        layer_sensitivity(model, ["0", "2", "4"], [(x[:128],), (x[128:256],)], "dynamic")
    with pytest.raises(ValueError, match=r"layer_sensitivity\(layers=...\): Sequential has no module named '9'"):
        layer_sensitivity(model, ["0", "9"], [x[:128]])


@pytest.mark.parametrize("min_speedup", [None, 1000.0], ids=["int8 chosen", "fp32 kept"])
def test_an_eval_fn_that_ends_in_training_mode_leaves_the_models_it_scores_in_theirs(min_speedup):
    """A validation loop's eval_fn ends with model.train(): the fp32 copy was then timed with dropout on (2x slower,
    the speed-up overstated by as much) and returned in training mode, as was a torch.ao candidate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4)).eval()
    x = torch.randn(64, 16)
    modes_seen = []

    def evaluate(candidate):
        modes_seen.append(candidate.training)
        candidate.eval()
        with torch.no_grad():
            value = -float((candidate(x) - model(x)).abs().mean())
        candidate.train()
        return value

    config = PTQConfig(backends=("torch_ao",), latency_repeats=3, max_trials=2,
                       **({} if min_speedup is None else {"min_speedup": min_speedup}))
    result = quantize(model, config, eval_fn=evaluate, example_inputs=x[:1], calibration_data=[x])
    assert (result.recipe is None) == (min_speedup is not None)
    assert not any(modes_seen)  # each scored in eval mode, the fp32 copy's second call too
    assert not any(m.training for m in result.model.modules() if isinstance(m, nn.Dropout))
    with torch.no_grad():
        assert torch.equal(result.model(x), result.model(x))  # dropout off
    assert not model.training


@pytest.mark.parametrize("overflow", [float("nan"), float("inf"), -float("inf")])
def test_a_nan_on_every_variant_still_falls_back_to_the_layer_that_causes_it(overflow):
    """A metric that is NaN while the first layer is int8 (a loss overflowing there): every knob variant failed,
    the search ended without the per-layer fallback that fixes it, and said no candidate could be built. An
    overflowing perplexity or loss is inf as often as NaN: the search ended so on inf after the NaN case was fixed."""
    torch.manual_seed(0)
    model, x, _ = make_sensitive_mlp()

    def evaluate(candidate):
        with torch.no_grad():
            out = candidate(x[:64])
        return overflow if type(candidate[0]) is not nn.Linear else -float((out - model(x[:64])).abs().mean())

    config = PTQConfig(approach="dynamic", backends=("torch_ao",), latency_repeats=3, max_trials=6)
    result = quantize(model, config, eval_fn=evaluate, example_inputs=x[:1])
    assert result.recipe is not None and "0" in result.recipe.fp32_layers
    assert [t.error is not None for t in result.trials][:2] == [True, True]


class CalledByKeyword(nn.Module):
    """The same layers as `make_sensitive_mlp`'s, the last called as ``fc(input=h)``."""

    def __init__(self, net: nn.Sequential) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[4](input=self.net[3](self.net[2](self.net[1](self.net[0](x)))))


@pytest.mark.parametrize("approach", ["static", "dynamic", "weight_only"])
def test_sensitivity_is_that_of_the_weights_and_inputs_the_layers_compute_with(approach):
    """A layer called with a keyword input failed (IndexError: no fallback in the search, said only in a note); a
    weight-normed layer's weight was left unquantized (scored inf on weight_only, as if never reached); a pruned
    model could not be copied (torch's deepcopy error naming weight_norm)."""
    from torch.nn.utils.parametrizations import weight_norm

    from litcompress.pruning import prune_
    from litcompress.pruning.engine import deepcopy_model, make_permanent_

    model, x, _ = make_sensitive_mlp()
    calibration, layers = [x[:128], x[128:256]], ["0", "2", "4"]
    expected = layer_sensitivity(model, layers, calibration, approach)
    keyword = layer_sensitivity(CalledByKeyword(model), [f"net.{n}" for n in layers], calibration, approach)
    assert keyword == {f"net.{n}": score for n, score in expected.items()}
    normed = copy.deepcopy(model)
    normed[2] = weight_norm(normed[2])
    for name, score in layer_sensitivity(normed, layers, calibration, approach).items():
        assert score == pytest.approx(expected[name], abs=0.05)  # the same weights, up to weight norm's rounding
    pruned = deepcopy_model(model)
    prune_([(pruned[0], "weight"), (pruned[2], "weight")], "l1_unstructured", 0.5)
    plain = deepcopy_model(pruned)
    make_permanent_(plain)
    assert layer_sensitivity(pruned, layers, calibration, approach) == \
        layer_sensitivity(plain, layers, calibration, approach)
    assert hasattr(pruned[0], "weight_orig")  # the user's pruned model keeps its masks


@pytest.mark.parametrize("backend, approach", [("torch_ao", "dynamic"), ("torch_ao", "static"),
                                               ("onnxruntime", "dynamic"), ("onnxruntime", "static"),
                                               ("pt2e", "static")])
def test_sensitive_layer_falls_back_to_fp32(backend, approach):
    model, x, labels = make_sensitive_mlp()
    before = state_snapshot(model)
    config = PTQConfig(approach=approach, backends=(backend,), accuracy=AccuracyCriterion(0.01), **FAST)
    result = quantize(model, config, eval_fn=accuracy_fn(x, labels),
                      calibration_data=[(x[i:i + 64],) for i in range(0, 256, 64)])
    assert result.goal_met
    assert "0" in result.recipe.fp32_layers
    assert len(result.recipe.fp32_layers) < 3  # still a quantized model
    flags = quantized_layers(result.model, backend, ["0", "2", "4"])
    assert flags["0"] is False and any(flags.values())
    # The first trial (everything int8) must have missed the goal: fallback was needed.
    assert not result.trials[0].meets_goal
    after = state_snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_goal_met_by_default_candidate_picks_fastest_passing(trained_mlp, digits):
    x_train, _, x_test, y_test = digits
    config = PTQConfig(approach="dynamic", backends=("torch_ao", "onnxruntime"), **FAST)
    result = quantize(trained_mlp, config, eval_fn=accuracy_fn(x_test, y_test), example_inputs=x_test[:1])
    assert result.goal_met and result.model is not None
    passing = [t for t in result.trials if t.meets_goal]
    assert result.latency_s == min(t.latency_s for t in passing)
    assert result.recipe in [t.recipe for t in passing]
    assert "fp32" in result.table() and result.recipe.describe() in result.table()
    with torch.no_grad():
        assert torch.allclose(result.model(x_test), trained_mlp(x_test), atol=0.5)


def test_an_eval_fn_that_scores_another_model_is_said(trained_mlp, digits):
    """`lambda m: accuracy(model)` for `lambda m: accuracy(m)`: every candidate would score as the fp32 model. The
    baseline evaluation sees the model it was given never ran: a warning and a message (not an error: a constant
    metric is a way to ask for no accuracy goal). A correct eval_fn gets neither."""
    _, _, x_test, y_test = digits
    config = PTQConfig(approach="dynamic", backends=("torch_ao",), **FAST)
    accuracy = accuracy_fn(x_test, y_test)
    with pytest.warns(UserWarning, match="eval_fn returned its metric without running the model it was given"):
        result = quantize(trained_mlp, config, eval_fn=lambda m: accuracy(trained_mlp), example_inputs=x_test[:1])
    assert UNUSED_MODEL_MESSAGE in result.messages
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        result = quantize(trained_mlp, config, eval_fn=accuracy, example_inputs=x_test[:1])
    assert UNUSED_MODEL_MESSAGE not in result.messages


def test_goal_not_met_returns_most_accurate_candidate_with_warning(trained_mlp, digits):
    x_test = digits[2]
    with torch.no_grad():
        reference = trained_mlp(x_test)

    def negative_max_error(model):  # only the exact fp32 model reaches 0
        with torch.no_grad():
            return -float((model(x_test) - reference).abs().max())

    config = PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=3, latency_repeats=3,
                       accuracy=AccuracyCriterion(tolerable_loss=0.0, relative=False))
    with pytest.warns(QuantizationGoalWarning, match="goal not met"):
        result = quantize(trained_mlp, config, eval_fn=negative_max_error, example_inputs=x_test[:1])
    assert result.model is not None and not result.goal_met
    assert len(result.trials) == 3
    best = max((t for t in result.trials if t.metric is not None), key=lambda t: t.metric)
    assert result.recipe == best.recipe and result.metric == best.metric


def test_lower_is_better_metric(trained_mlp, digits):
    x_test, y_test = digits[2], digits[3]

    def loss(model):
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(x_test), y_test))

    config = PTQConfig(approach="dynamic", backends=("torch_ao",),
                       accuracy=AccuracyCriterion(0.05, higher_is_better=False), **FAST)
    result = quantize(trained_mlp, config, eval_fn=loss, example_inputs=x_test[:1])
    assert result.goal_met and result.metric <= result.baseline_metric * 1.05


class FFTModel(nn.Module):
    """A Linear -> FFT -> Linear model: ONNX has no export for aten::fft_rfft."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(9, 4)

    def forward(self, x):
        return self.b(torch.fft.rfft(self.a(x)).abs())


def test_export_failure_names_the_op_and_other_backends_go_on():
    torch.manual_seed(0)
    model, x = FFTModel().eval(), torch.randn(64, 16)
    with torch.no_grad():
        labels = model(x).argmax(1)
    config = PTQConfig(approach="dynamic", backends=("onnxruntime", "torch_ao"),
                       accuracy=AccuracyCriterion(0.05), **FAST)
    result = quantize(model, config, eval_fn=accuracy_fn(x, labels), example_inputs=x[:1])
    failed = [t for t in result.trials if t.recipe.backend == "onnxruntime"]
    assert len(failed) == 1 and "fft" in failed[0].error.lower()
    assert result.recipe.backend == "torch_ao" and result.goal_met
    assert any("fft" in m.lower() for m in result.messages)


def test_no_candidate_at_all_returns_fp32_copy():
    torch.manual_seed(0)
    model, x = FFTModel().eval(), torch.randn(64, 16)
    config = PTQConfig(approach="dynamic", backends=("onnxruntime",), **FAST)
    with pytest.warns(QuantizationGoalWarning, match="fp32"):
        result = quantize(model, config, eval_fn=lambda m: 1.0, example_inputs=x[:1])
    assert result.recipe is None and result.model is not model and not result.goal_met
    assert torch.equal(result.model(x), model(x))


class _EncoderAndHead(nn.Module):
    """An encoder layer (whose Linear weights torch.ao's dynamic int8 leaves fp32: they are read, not called) and a
    head that int8 activations break (one huge feature): the head is both the most sensitive layer and the only one
    that backend quantizes."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(x).mean(1)
        return self.fc(torch.cat([h[:, :1] * 1000.0, h[:, 1:]], 1))


def test_no_fallback_keeps_every_layer_a_backend_quantizes_in_fp32():
    """The fallback ranked the layers every backend quantizes, whatever this one does: its first fallback kept the
    head, torch.ao's only int8 layer, in fp32 and that candidate (the fp32 model) met the goal as 'int8'."""
    torch.manual_seed(0)
    model = _EncoderAndHead().eval()
    with torch.no_grad():
        model.fc.weight[:, 0] = 1e-4
    x = torch.randn(16, 6, 16)
    reference = model(x).detach()
    config = PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=4, latency_repeats=2,
                       accuracy=AccuracyCriterion(tolerable_loss=1e-7, relative=False))
    with pytest.warns(QuantizationGoalWarning):
        result = quantize(model, config, eval_fn=lambda m: -float((m(x) - reference).pow(2).mean()), example_inputs=x)
    assert all("fc" not in trial.recipe.fp32_layers for trial in result.trials)
    assert result.recipe is not None and quantized_layers(result.model, "torch_ao", ["fc"]) == {"fc": True}


class _TiedHead(nn.Module):
    """An output layer tied to the embedding (a language model's), a hidden layer between."""

    def __init__(self) -> None:
        super().__init__()
        self.e, self.h, self.o = nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 50, bias=False)
        self.o.weight = self.e.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.relu(self.h(self.e(x))))


class _OwnLinear(nn.Linear):
    pass


def _searched_to_its_end(model: nn.Module, x: torch.Tensor, max_trials: int):
    """torch_ao dynamic under a goal nothing int8 meets (no loss at all): the fallback runs as far as it goes."""
    reference = model(x).detach()
    config = PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=max_trials, latency_repeats=2,
                       accuracy=AccuracyCriterion(tolerable_loss=0.0, relative=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuantizationGoalWarning)
        return quantize(model, config, eval_fn=lambda m: -float((m(x) - reference).abs().max()), example_inputs=x)


@pytest.mark.parametrize("make", [_TiedHead, lambda: nn.Sequential(_OwnLinear(16, 16), nn.ReLU(), nn.Linear(16, 4))])
def test_no_candidate_is_the_fp32_model_under_an_int8_recipe(make):
    """A tied output layer kept in fp32 keeps its embedding in fp32 too: the fallback fp32=['o', 'h'] left no int8
    layer and met the goal as 'int8'. quantize_dynamic swaps nn.Linear, not a subclass of it, which was counted as
    an int8 layer (a model of such layers came back as an int8 result holding none)."""
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randint(0, 50, (8, 5)) if isinstance(model, _TiedHead) else torch.randn(8, 16)
    result = _searched_to_its_end(model, x, max_trials=6)
    assert result.trials
    for trial in result.trials:  # every candidate held an int8 layer
        assert "o" not in trial.recipe.fp32_layers or "h" not in trial.recipe.fp32_layers
    assert result.recipe is not None
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in result.model.modules())


@pytest.mark.parametrize("make", [lambda: nn.Linear(16, 4), lambda: nn.Sequential(_OwnLinear(16, 4))],
                         ids=["the model itself", "a subclass"])
def test_torch_ao_skips_what_quantize_dynamic_does_not_swap_and_says_why(make):
    """quantize_dynamic swaps the children of the model whose type its mapping holds: a bare nn.Linear (the model
    itself) and a subclass stay fp32, and came back as int8 results holding no int8 layer."""
    config = PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=2, latency_repeats=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuantizationGoalWarning)
        result = quantize(make().eval(), config, eval_fn=lambda m: 1.0, example_inputs=torch.randn(4, 16))
    assert result.recipe is None and not result.trials
    assert any("of torch's own classes (not a subclass of them, nor the model itself)" in m for m in result.messages)


def test_onnxruntimes_skip_says_it_keeps_gru_layers_in_fp32():
    """The skip of a GRU-only model said "it quantizes nn.Linear, recurrent layers and embeddings" (found by a
    review)."""
    config = PTQConfig(approach="dynamic", backends=("onnxruntime",), max_trials=2, latency_repeats=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuantizationGoalWarning)
        result = quantize(nn.Sequential(nn.GRU(8, 16, batch_first=True)).eval(), config, eval_fn=lambda m: 1.0,
                          example_inputs=torch.randn(2, 5, 8))
    assert result.recipe is None
    assert any("backend 'onnxruntime' skipped" in m and "(not GRU layers nor EmbeddingBag" in m
               for m in result.messages)


class _TiedLanguageModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.h, self.h2 = nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.o = nn.Linear(16, 50, bias=False)
        self.o.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.relu(self.h2(torch.relu(self.h(self.emb(x))))))


def test_the_fallback_builds_no_model_twice_through_tied_layers():
    """fp32=['h', 'emb'] and fp32=['h', 'emb', 'o'] keep the same layers in fp32 (o is emb's tie): the second built
    the same model again and used up a trial."""
    from litcompress.quantization.backends.torch_ao import _with_tied_layers

    torch.manual_seed(0)
    model = _TiedLanguageModel().eval()
    x = torch.randint(0, 50, (8, 5))
    result = _searched_to_its_end(model, x, max_trials=8)
    built = [(t.recipe.with_fp32_layers(()), frozenset(_with_tied_layers(model, set(t.recipe.fp32_layers))))
             for t in result.trials]
    assert len(result.trials) >= 3 and len(set(built)) == len(built)


def test_a_backend_with_no_layer_to_quantize_is_skipped_not_reported_as_int8():
    """A conv-only model with approach='dynamic' (Linear, recurrent layers, embeddings): the first trial was the fp32
    model, taken as the int8 result that met the goal."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    x = torch.randn(8, 3, 8, 8)
    config = PTQConfig(approach="dynamic", backends=("torch_ao", "pt2e"), **FAST)
    with pytest.warns(QuantizationGoalWarning, match="fp32"):
        result = quantize(model, config, eval_fn=lambda m: 1.0, example_inputs=x)
    assert result.recipe is None and not result.trials and not result.goal_met
    for backend in ("torch_ao", "pt2e"):
        assert any(m.startswith(f"backend '{backend}' skipped: it quantizes no layer of this model for approach "
                                "'dynamic'") for m in result.messages)


def test_static_without_calibration_data_fails_early(trained_mlp, digits):
    with pytest.raises(ValueError, match="calibration_data.*static"):
        quantize(trained_mlp, PTQConfig(approach="static"), eval_fn=lambda m: 1.0, example_inputs=digits[2][:1])


def test_a_dataset_as_calibration_data_is_refused_before_any_work(trained_mlp, digits):
    """Its items are single samples: every backend failed on the batch dim they lack, with a shape error of its own,
    and the fp32 model came back (QuantizeOnFitEnd: after the training run)."""
    from torch.utils.data import DataLoader, TensorDataset

    from litcompress.pipeline import CompressionConfig, compress
    from litcompress.quantization.lightning import QuantizeOnFitEnd

    dataset = TensorDataset(digits[0][:64], digits[1][:64])
    calls = []
    message = r"calibration_data=TensorDataset\): a Dataset gives single samples, without a batch dim; give batches: "
    for refused in (
            lambda: quantize(trained_mlp, PTQConfig(approach="static"), eval_fn=lambda m: calls.append(m) or 1.0,
                             calibration_data=dataset),
            lambda: QuantizeOnFitEnd(PTQConfig(approach="static"), metric="val_acc", calibration_data=dataset),
            lambda: compress(trained_mlp, CompressionConfig(), eval_fn=lambda m: calls.append(m) or 1.0,
                             calibration_data=dataset, example_inputs=digits[2][:1])):
        with pytest.raises(TypeError, match=message + r"DataLoader\(dataset, batch_size=32\)"):
            refused()
    assert calls == []  # nothing was evaluated
    loader = DataLoader(dataset, batch_size=16)  # as the message says: batches calibrate every backend
    result = quantize(trained_mlp, PTQConfig(approach="static", backends=("onnxruntime",), max_trials=1,
                                             latency_repeats=2),
                      eval_fn=accuracy_fn(digits[2], digits[3]), calibration_data=loader)
    assert result.recipe is not None and result.trials[0].error is None


def test_a_dict_batch_names_its_keys_and_input_fn(trained_mlp, digits):
    batches = [{"pixels": digits[2][:8], "label": digits[3][:8]}]
    with pytest.raises(TypeError, match=r"batch of type dict \(keys: \['label', 'pixels'\]\).*input_fn="):
        quantize(trained_mlp, PTQConfig(approach="dynamic", **FAST), eval_fn=lambda m: 1.0, calibration_data=batches)
    result = quantize(trained_mlp, PTQConfig(approach="dynamic", backends=("torch_ao",), **FAST),
                      eval_fn=lambda m: 1.0, calibration_data=batches, input_fn=lambda batch: (batch["pixels"],))
    assert result.recipe is not None


def test_missing_inputs_fail_early(trained_mlp):
    with pytest.raises(ValueError, match="example_inputs"):
        quantize(trained_mlp, PTQConfig(approach="dynamic"), eval_fn=lambda m: 1.0)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 16), nn.Linear(4, 16), nn.Linear(16, 3)
        self.norm = nn.BatchNorm1d(16)

    def forward(self, x, y):
        return self.head(torch.relu(self.norm(self.a(x) + self.b(y))))


def test_a_batch_the_model_cannot_take_fails_before_any_evaluation_naming_input_fn():
    torch.manual_seed(0)
    model = _TwoInputs().train()
    model.norm.eval()  # a frozen BatchNorm inside a training model
    batches = [(torch.randn(8, 8), torch.randn(8, 3)) for _ in range(2)]  # y should have 4 features
    before = state_snapshot(model)
    evaluated = []
    message = r"first calibration batch.*\(8, 8\).*\(8, 3\).*input_fn=lambda batch"
    with pytest.raises(ValueError, match=message):
        quantize(model, PTQConfig(approach="static", **FAST), eval_fn=evaluated.append, calibration_data=batches)
    assert evaluated == []  # the baseline evaluation never ran
    assert model.training and not model.norm.training  # the check ran it in eval mode and gave each its mode back
    assert all(torch.equal(before[k], v) for k, v in state_snapshot(model).items())  # BatchNorm stats untouched


@pytest.mark.parametrize("with_calibration_data", [True, False])
def test_example_inputs_the_model_cannot_take_fail_early(trained_mlp, digits, with_calibration_data):
    # without calibration data the check was skipped: the baseline ran, then latency timing failed bare
    evaluated = []
    with pytest.raises(ValueError, match=r"example_inputs \(inputs: \(1, 10\)"):
        quantize(trained_mlp, PTQConfig(approach="dynamic", **FAST), eval_fn=lambda m: evaluated.append(m) or 1.0,
                 calibration_data=[digits[2][:4]] if with_calibration_data else None,
                 example_inputs=torch.zeros(1, 10))
    assert evaluated == []


def test_default_input_fn_reads_inputs_and_target_pairs():
    from litcompress.quantization.tuner import default_input_fn

    x, side, y = torch.randn(4, 8), torch.randn(4, 4), torch.arange(4)
    assert default_input_fn((x, y))[0] is x and len(default_input_fn((x, y))) == 1
    several = default_input_fn(((x, side), y))  # Lightning's `(x, side), y = batch`: several inputs, one target
    assert len(several) == 2 and several[0] is x and several[1] is side
    assert len(default_input_fn([[x, side], y])) == 2
    assert len(default_input_fn((x, side, y))) == 3  # not a pair: the whole batch, as before
    assert len(default_input_fn(((x, side), [y, y]))) == 2 and default_input_fn(((x, side), [y, y]))[0] is x


def test_model_input_fn_reads_a_dict_batch_by_forwards_parameter_names():
    from litcompress.quantization.tuner import model_input_fn

    read = model_input_fn(_TwoInputs())  # forward(x, y)
    x, y, label = torch.randn(4, 8), torch.randn(4, 4), torch.arange(4)
    inputs = read({"label": label, "y": y, "x": x})  # any key order; keys forward does not take are left out
    assert len(inputs) == 2 and inputs[0] is x and inputs[1] is y
    assert read({"x": x, "label": label})[0] is x  # leading parameters only: y may have a default
    assert read(((x, y), label)) == (x, y)  # other batches as default_input_fn reads them
    with pytest.raises(TypeError, match=r"keys: \['label', 'y'\].*leading parameters \(x, y\).*'x' is not in the "
                                        r"batch but \['y'\] are.*input_fn="):
        read({"y": y, "label": label})


class _OptionalMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 3)

    def forward(self, x, mask=None):
        return self.a(x) if mask is None else self.a(x) * mask


class _VarArgs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 3)

    def forward(self, x, *rest):
        return self.a(x)


def _identical(got: tuple, expected: tuple) -> bool:
    return len(got) == len(expected) and all(a is b for a, b in zip(got, expected))


def test_model_input_fn_reads_a_flat_batch_by_forwards_arity():
    from litcompress.quantization.tuner import model_input_fn

    x, mask, label = torch.randn(4, 8), torch.randn(4, 4), torch.arange(4)
    both = model_input_fn(_TwoInputs())  # forward(x, y): requires two, takes two
    assert _identical(both((x, mask)), (x, mask))  # its two inputs, not (inputs, target)
    assert _identical(both([x, mask, label]), (x, mask))  # a TensorDataset's (x, mask, y)
    assert _identical(both((x, mask, label, label)), (x, mask, label, label))  # no layout it knows: as given
    optional = model_input_fn(_OptionalMask())  # forward(x, mask=None): requires one, takes two
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (said only where asked: a plain quantize/compress call's raw batches)
        assert _identical(optional((x, label)), (x,))  # a pair, as for any one-input model
    # that an (x, mask) pair would lose its mask is said, once
    optional = model_input_fn(_OptionalMask(), say_optional_left_out=True)
    with pytest.warns(UserWarning, match=r"read as \(inputs, target\): _OptionalMask\(x\) is called without "
                                         r"its optional `mask`. If the second tensor is `mask`, pass input_fn=lambda "
                                         r"batch: tuple\(batch\); input_fn=lambda batch: \(batch\[0\],\) reads"):
        assert _identical(optional((x, label)), (x,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _identical(optional((x, label)), (x,))
        assert _identical(model_input_fn(_VarArgs(), say_optional_left_out=True)((x, label)), (x,))  # *args: none
    assert _identical(optional((x, mask, label)), (x, mask))
    one = model_input_fn(nn.Linear(8, 3))
    assert _identical(one((x, label)), (x,)) and _identical(one((x, mask, label)), (x, mask, label))


@pytest.mark.parametrize("layout", ["inputs", "inputs and target"])
def test_a_model_with_two_inputs_takes_flat_batches_without_input_fn(layout):
    torch.manual_seed(0)
    model = _TwoInputs().eval()
    batches = [(torch.randn(16, 8), torch.randn(16, 4)) for _ in range(4)]
    if layout == "inputs and target":
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
            torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]), torch.arange(64)), batch_size=16)
    result = quantize(model, PTQConfig(approach="static", backends=("torch_ao",), **FAST), eval_fn=lambda m: 1.0,
                      calibration_data=batches if layout == "inputs" else loader)
    assert result.recipe is not None and [t.shape for t in result.example_inputs] == [(16, 8), (16, 4)]


def test_a_model_with_two_inputs_takes_dict_batches_without_input_fn():
    torch.manual_seed(0)
    model = _TwoInputs().eval()
    batches = [{"x": torch.randn(16, 8), "y": torch.randn(16, 4), "label": torch.arange(16)} for _ in range(4)]
    result = quantize(model, PTQConfig(approach="static", backends=("onnxruntime",), **FAST), eval_fn=lambda m: 1.0,
                      calibration_data=batches)
    assert result.recipe is not None and [t.shape for t in result.example_inputs] == [(16, 8), (16, 4)]
    example = {"y": torch.randn(3, 4), "x": torch.randn(3, 8)}  # example_inputs as a dict, by forward's names
    result = quantize(model, PTQConfig(approach="dynamic", backends=("torch_ao",), **FAST), eval_fn=lambda m: 1.0,
                      example_inputs=example)
    assert result.example_inputs[0] is example["x"] and result.example_inputs[1] is example["y"]


@pytest.mark.parametrize("approach", ["dynamic", "static"])
def test_a_model_with_two_inputs_quantizes_on_every_backend_with_input_fn(approach, tmp_path):
    from litcompress.quantization import load_quantized

    torch.manual_seed(0)
    model = _TwoInputs().eval()
    batches = [(torch.randn(16, 8), torch.randn(16, 4)) for _ in range(4)]
    result = quantize(model, PTQConfig(approach=approach, **FAST), eval_fn=lambda m: 1.0, calibration_data=batches,
                      input_fn=lambda batch: tuple(batch))
    built = [t for t in result.trials if t.error is None]
    assert {t.recipe.backend for t in built} >= {"torch_ao", "onnxruntime", "pt2e"}
    x, y = batches[0]
    with torch.no_grad():
        expected, got = model(x, y), result.model(x, y)
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()
    path = tmp_path / ("model.onnx" if result.recipe.backend == "onnxruntime" else "model.pt")
    result.save(path)
    loaded, recipe = load_quantized(path)
    assert recipe == result.recipe
    with torch.no_grad():
        assert torch.allclose(loaded(x, y), got, atol=1e-5)


def test_a_model_with_two_inputs_takes_inputs_and_target_batches_without_input_fn():
    torch.manual_seed(0)
    model = _TwoInputs().eval()
    batches = [((torch.randn(16, 8), torch.randn(16, 4)), torch.randint(0, 3, (16,))) for _ in range(4)]
    result = quantize(model, PTQConfig(approach="static", backends=("onnxruntime",), **FAST), eval_fn=lambda m: 1.0,
                      calibration_data=batches)
    assert result.recipe is not None and result.recipe.approach == "static"
    (x, side), _ = batches[0]
    assert result.example_inputs[0].shape == x.shape and result.example_inputs[1].shape == side.shape
    with torch.no_grad():
        expected, got = model(x, side), result.model(x, side)
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()


@pytest.mark.parametrize("bad", [float("nan"), "0.9", None, torch.tensor([1.0, 2.0])])
def test_baseline_metric_must_be_a_finite_number(trained_mlp, digits, bad):
    with pytest.raises(ValueError, match="eval_fn returned"):
        quantize(trained_mlp, PTQConfig(approach="dynamic", backends=("torch_ao",), **FAST),
                 eval_fn=lambda m: bad, example_inputs=digits[2][:1])


def test_nan_from_a_candidate_is_recorded_and_search_goes_on(trained_mlp, digits):
    x_test = digits[2]
    with torch.no_grad():
        reference = trained_mlp(x_test)

    def nan_unless_exact(model):
        with torch.no_grad():
            return 1.0 if torch.equal(model(x_test), reference) else float("nan")

    config = PTQConfig(approach="dynamic", backends=("torch_ao",), **FAST)
    with pytest.warns(QuantizationGoalWarning, match=r"No quantized candidate could be scored: eval_fn gave NaN or inf "
                                                      "on every one it ran"):
        result = quantize(trained_mlp, config, eval_fn=nan_unless_exact, example_inputs=x_test[:1])
    # both knob variants, then the fallback from the first (a layer in fp32 may be what scores), never all of them
    assert [t.recipe.fp32_layers != () for t in result.trials] == [False, False, True]
    assert all("nan" in t.error for t in result.trials)
    assert result.recipe is None and result.model is not None


@pytest.mark.parametrize("overflow", [float("nan"), float("inf"), -float("inf")])
def test_a_nan_or_infinity_is_told_in_every_form_the_metric_check_takes(overflow):
    import numpy as np

    from litcompress.quantization.tuner import _is_not_finite, check_metric

    for value in (overflow, np.float64(overflow), np.float32(overflow), np.array([overflow]), np.array(overflow),
                  torch.tensor(overflow), torch.tensor([overflow])):
        assert _is_not_finite(value), value
        with pytest.raises(ValueError, match=f"returned {overflow}"):
            check_metric(value, "t")
    for value in (1.0, True, "nan", "inf", None, np.array([1.0]), torch.tensor([1.0, overflow])):
        assert not _is_not_finite(value), value


def test_the_warning_says_how_many_candidates_scored_nan_or_inf_when_the_others_failed(trained_mlp, digits):
    """It said eval_fn gave NaN or inf on every candidate when one did and eval_fn raised on the rest."""
    calls = []

    def inf_then_raises(model):
        calls.append(1)
        if len(calls) == 1:
            return 1.0
        if len(calls) == 2:
            return float("inf")
        raise RuntimeError("the metric broke")

    config = PTQConfig(approach="dynamic", backends=("torch_ao",), **FAST)
    with pytest.warns(QuantizationGoalWarning, match=r"No quantized candidate could be scored: eval_fn gave NaN or "
                                                      r"inf on 1 of the (\d+) tried, the others failed") as caught:
        result = quantize(trained_mlp, config, eval_fn=inf_then_raises, example_inputs=digits[2][:1])
    ran = int(re.search(r"on 1 of the (\d+)", str(caught[-1].message)).group(1))
    assert ran == len(result.trials) > 1 and "inf" in result.trials[0].error
    assert all("the metric broke" in t.error for t in result.trials[1:])


def test_an_eval_fn_that_raises_on_every_candidate_uses_no_fallback(trained_mlp, digits):
    """A bug in eval_fn (it raises past the baseline, or returns a string) is no reason to keep layers in fp32: the
    fallback ran trial after trial failing alike, up to max_trials."""
    calls = []

    def breaks_after_the_baseline(model):
        calls.append(1)
        if len(calls) > 1:
            raise KeyError("accuracy")
        return 1.0

    def a_string_after_the_baseline(model):
        calls.append(1)
        return 1.0 if len(calls) == 1 else "0.9"

    config = PTQConfig(approach="dynamic", backends=("torch_ao",), **FAST)
    for evaluate in (breaks_after_the_baseline, a_string_after_the_baseline):
        calls.clear()
        with pytest.warns(QuantizationGoalWarning, match="No quantized candidate could be built and scored"):
            result = quantize(trained_mlp, config, eval_fn=evaluate, example_inputs=digits[2][:1])
        assert [t.recipe.fp32_layers for t in result.trials] == [(), ()]


def test_a_candidate_that_fails_after_meeting_the_goal_does_not_end_its_backends_search(monkeypatch, trained_mlp,
                                                                                         digits):
    """Its metric met the goal but its timing failed: it is an error, not a pass, and the backend's next recipe runs."""
    from litcompress.quantization import tuner

    measure = tuner.measure_latencies
    calls = []

    def first_candidate_fails(models, *args, **kwargs):  # fault injection into our own timing, backends stay real
        calls.append(models)
        if len(calls) == 2:  # the baseline, then trial 1
            raise RuntimeError("timing failed")
        return measure(models, *args, **kwargs)

    monkeypatch.setattr(tuner, "measure_latencies", first_candidate_fails)
    config = PTQConfig(approach="dynamic", backends=("torch_ao",), **FAST)
    result = quantize(trained_mlp, config, eval_fn=accuracy_fn(digits[2], digits[3]), example_inputs=digits[2][:1])
    first, second = result.trials[:2]
    assert "timing failed" in first.error and not first.meets_goal
    assert second.recipe.backend == "torch_ao" and second.error is None and second.meets_goal
    assert result.goal_met and result.recipe == second.recipe


def test_timeout_keeps_what_was_found(trained_mlp, digits):
    config = PTQConfig(approach="dynamic", backends=("torch_ao",), timeout_s=1e-9, latency_repeats=3)
    with pytest.warns(QuantizationGoalWarning):
        result = quantize(trained_mlp, config, eval_fn=accuracy_fn(digits[2], digits[3]),
                          example_inputs=digits[2][:1])
    assert result.trials == [] and result.model is not None
    assert any("timeout_s" in m for m in result.messages)


def test_max_trials_is_a_hard_budget():
    model, x, labels = make_sensitive_mlp()
    config = PTQConfig(approach="dynamic", backends=("torch_ao", "onnxruntime"), max_trials=2, latency_repeats=3)
    with pytest.warns(QuantizationGoalWarning):
        result = quantize(model, config, eval_fn=accuracy_fn(x, labels), example_inputs=x[:1])
    assert len(result.trials) == 2 and result.model is not None


class UnavailableBackend(Backend):
    name = "unavailable"
    approaches = ("dynamic",)

    def check_available(self) -> None:
        raise BackendUnavailableError("unavailable backend: install the 'nothing' package")


def test_unavailable_backend_is_reported_and_skipped(monkeypatch, trained_mlp, digits):
    monkeypatch.setitem(BACKEND_REGISTRY, "unavailable", f"{__name__}:UnavailableBackend")
    config = PTQConfig(approach="dynamic", backends=("unavailable", "torch_ao"), **FAST)
    result = quantize(trained_mlp, config, eval_fn=accuracy_fn(digits[2], digits[3]), example_inputs=digits[2][:1])
    assert result.goal_met and result.recipe.backend == "torch_ao"
    assert any("install the 'nothing' package" in m for m in result.messages)


class RecordingTorchAO(TorchAOBackend):
    """torch.ao's backend, recording what the search times for each candidate."""

    timed: list[tuple[nn.Module, nn.Module]] = []

    def timed_form(self, quantized, example_inputs):
        form = super().timed_form(quantized, example_inputs)
        type(self).timed.append((quantized, form))
        return form


def test_torch_ao_candidates_are_timed_as_their_files_run_them(monkeypatch, trained_mlp, digits):
    """Their eager int8 modules run each op from Python (2-3x slower than the trace the file holds): the search said
    the int8 model was slower than fp32, min_speedup kept fp32, while the file shipped ran 2x faster."""
    monkeypatch.setitem(BACKEND_REGISTRY, "torch_ao", f"{__name__}:RecordingTorchAO")
    RecordingTorchAO.timed = []
    x = digits[2][:64]
    config = PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=2, latency_repeats=3)
    result = quantize(trained_mlp, config, eval_fn=accuracy_fn(digits[2], digits[3]), example_inputs=x)
    assert len(RecordingTorchAO.timed) == len([t for t in result.trials if t.error is None]) >= 1
    for candidate, form in RecordingTorchAO.timed:
        assert isinstance(form, torch.jit.ScriptModule)  # the trace, as torch.jit.save writes it
        torch.testing.assert_close(form(x), candidate(x), rtol=0, atol=0)
    backend = RecordingTorchAO()
    candidate = backend.quantize(copy.deepcopy(trained_mlp), result.recipe, (x,), [])
    assert backend.timed_form(candidate, (x,)) is backend.timed_form(candidate, (x,))  # traced once, in quantize


@pytest.mark.parametrize(("backend_name", "approach"), [("torchao", "weight_only"), ("pt2e", "static")])
def test_exported_candidates_are_timed_as_the_program_their_file_holds(backend_name, approach, trained_mlp, digits):
    """torchao's and pt2e's candidates were timed as the modules in memory: torchao's eager weight-only model ran a
    64-32-10 MLP 4x faster than the program load_quantized gives (0.08 vs 0.30 ms), which the search then chose by."""
    x = digits[2][:64]
    backend = get_backend(backend_name)
    recipe = backend.recipes(approach)[0]
    candidate = backend.quantize(copy.deepcopy(trained_mlp), recipe, (x,), [(x,)])
    form = backend.timed_form(candidate, (x,))
    assert isinstance(form, ExportedInference) and form is not candidate  # the program, loaded
    with torch.no_grad():
        torch.testing.assert_close(form(x), candidate(x))
    result = quantize(trained_mlp, PTQConfig(approach=approach, backends=(backend_name,), max_trials=1,
                                             latency_repeats=3),
                      eval_fn=accuracy_fn(digits[2], digits[3]), example_inputs=x, calibration_data=[(x,)])
    assert result.table().splitlines()[0].split()[4:6] == ["weights", "KiB"]  # the state dict's, not the file's


def test_backend_without_the_approach_is_skipped_with_message(trained_mlp, digits):
    """Beside one that does the approach (with none, PTQConfig refuses the list: test_config.py)."""
    config = PTQConfig(approach="weight_only", backends=("onnxruntime", "torchao"), **FAST)
    result = quantize(trained_mlp, config, eval_fn=lambda m: 1.0, example_inputs=digits[2][:1])
    assert any("does not support approach 'weight_only'" in m for m in result.messages)
    assert result.recipe is not None and result.recipe.backend == "torchao" and not math.isnan(result.metric)



WITHOUT_OPTIONAL = r"""
import sys, importlib.abc, json

class Block(importlib.abc.MetaPathFinder):
    # Simulates a machine without the optional packages.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"onnx", "onnxruntime", "torchao", "lightning"}:
            raise ImportError(f"No module named {name!r} (blocked for this test)")

sys.meta_path.insert(0, Block())
import torch
from torch import nn
import litcompress.quantization as q

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
x = torch.randn(32, 8)
result = q.quantize(model, q.PTQConfig(approach="dynamic", latency_repeats=3), eval_fn=lambda m: 1.0,
                    example_inputs=x[:1])
print(json.dumps({"backend": result.recipe.backend, "messages": result.messages,
                  "lightning_loaded": "lightning" in sys.modules}))
"""


def test_works_without_optional_backends_and_says_why():
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[2] / "src")
    proc = subprocess.run([sys.executable, "-c", WITHOUT_OPTIONAL], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": src})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["backend"] == "torch_ao" and not out["lightning_loaded"]
    skipped = " ".join(out["messages"])
    for name in ("onnxruntime", "pt2e", "torchao"):
        assert f"backend {name!r} skipped" in skipped
    assert "pip install onnx onnxruntime" in skipped


def test_interrupt_keeps_what_was_found(trained_mlp, digits):
    x_test, y_test = digits[2], digits[3]
    calls = []

    def evaluate_then_interrupt(model):
        calls.append(model)
        if len(calls) == 3:  # baseline, trial 1, then Ctrl-C during trial 2
            raise KeyboardInterrupt
        return accuracy_fn(x_test, y_test)(model)

    config = PTQConfig(approach="dynamic", backends=("torch_ao", "onnxruntime"), **FAST)
    result = quantize(trained_mlp, config, eval_fn=evaluate_then_interrupt, example_inputs=x_test[:1])
    assert result.goal_met and result.recipe == result.trials[0].recipe
    assert result.trials[1].error == "interrupted"
    assert any("interrupted" in m for m in result.messages)


@pytest.mark.parametrize("when", ["timing trial 2", "the final timing"])
def test_an_interrupt_while_timing_keeps_what_was_found_and_says_where(monkeypatch, trained_mlp, digits, when):
    """A Ctrl-C in the final interleaved timing raised out of quantize (the candidates that met the goal were lost);
    one while a scored trial was timed left it as 'missed the goal' with no reason."""
    from litcompress.quantization import tuner

    measure = tuner.measure_latencies
    calls = []

    def interrupted(models, *args, **kwargs):  # a Ctrl-C at a chosen moment of our own timing; backends stay real
        calls.append(len(models))
        if (when == "timing trial 2" and len(calls) == 3) or (when == "the final timing" and len(models) > 1):
            raise KeyboardInterrupt
        return measure(models, *args, **kwargs)

    monkeypatch.setattr(tuner, "measure_latencies", interrupted)
    config = PTQConfig(approach="dynamic", backends=("torch_ao", "onnxruntime"), **FAST)
    result = quantize(trained_mlp, config, eval_fn=accuracy_fn(digits[2], digits[3]), example_inputs=digits[2][:1])
    assert result.goal_met and result.recipe is not None and result.latency_s is not None
    if when == "timing trial 2":
        assert [t.error for t in result.trials] == [None, "interrupted"] and result.recipe == result.trials[0].recipe
        assert result.trials[1].metric is not None and not result.trials[1].meets_goal  # scored, never timed
        assert "interrupted" in result.table() and "interrupted during trial 2; keeping the best model so far." in \
            result.messages
    else:
        assert any("interrupted during the final interleaved timing; using per-trial timings" in m
                   for m in result.messages)


def test_an_interrupt_between_trials_names_the_last_finished_one_and_the_warning_says_so(monkeypatch):
    """Ctrl-C while the next (fallback) trial was chosen, from the layers' sensitivity: it was said to come 'during'
    the finished trial, and the warning advised raising max_trials."""
    from litcompress.quantization import tuner

    def interrupted(*args, **kwargs):  # a Ctrl-C while our own ranking runs; the backends stay real
        raise KeyboardInterrupt

    monkeypatch.setattr(tuner, "layer_sensitivity", interrupted)
    model, x, labels = make_sensitive_mlp()
    config = PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=4, latency_repeats=3)
    with pytest.warns(QuantizationGoalWarning, match=r"returning the most accurate finished candidate, trial \d .*"
                                                     r"The search was interrupted before it ended\."):
        result = quantize(model, config, eval_fn=accuracy_fn(x, labels), example_inputs=x[:1])
    assert len(result.trials) == 2 and all(t.error is None for t in result.trials)
    assert "interrupted after trial 2; keeping the best model so far." in result.messages


def test_an_interrupt_in_the_first_trial_is_said_as_such(trained_mlp, digits):
    calls = []

    def interrupt_at_trial_1(model):
        calls.append(model)
        if len(calls) == 2:  # the baseline, then Ctrl-C during trial 1
            raise KeyboardInterrupt
        return accuracy_fn(digits[2], digits[3])(model)

    config = PTQConfig(approach="dynamic", backends=("torch_ao",), **FAST)
    with pytest.warns(QuantizationGoalWarning, match=r"The search was interrupted during trial 1, before any "
                                                     r"quantized candidate was finished: returning an fp32 copy"):
        result = quantize(trained_mlp, config, eval_fn=interrupt_at_trial_1, example_inputs=digits[2][:1])
    assert result.recipe is None and result.model is not trained_mlp and result.trials[0].error == "interrupted"


def test_threads_are_pinned_for_the_whole_search(trained_mlp, digits):
    before = torch.get_num_threads()
    pinned = 1 if before > 1 else 2  # not torch's own setting, so that a session built with it would show
    config = PTQConfig(approach="dynamic", backends=("onnxruntime",), num_threads=pinned, **FAST)
    result = quantize(trained_mlp, config, eval_fn=accuracy_fn(digits[2], digits[3]), example_inputs=digits[2][:1])
    # The ORT candidate was built inside the pinned region: same thread count as the torch timings.
    assert result.model.session.get_session_options().intra_op_num_threads == pinned
    assert torch.get_num_threads() == before
    # and the result keeps them when its session is rebuilt (a copy, a pickle round trip), as PTQConfig says
    for rebuilt in (copy.deepcopy(result.model), pickle.loads(pickle.dumps(result.model))):
        assert rebuilt.session.get_session_options().intra_op_num_threads == pinned


@pytest.mark.parametrize("goal", ["met", "missed"])
def test_min_speedup_keeps_fp32_when_no_int8_model_is_fast_enough(trained_mlp, digits, goal):
    # 1000x is out of reach of any int8 kernel: whatever the timings, fp32 is kept, and the result says why
    x_train, _, x_test, y_test = digits
    with torch.no_grad():
        reference = trained_mlp(x_test)

    def negative_max_error(model):  # only the exact fp32 model reaches 0: every int8 candidate misses the goal
        with torch.no_grad():
            return -float((model(x_test) - reference).abs().max())

    accuracy = AccuracyCriterion(0.01) if goal == "met" else AccuracyCriterion(tolerable_loss=0.0, relative=False)
    eval_fn = accuracy_fn(x_test, y_test) if goal == "met" else negative_max_error
    config = PTQConfig(approach="dynamic", backends=("torch_ao",), accuracy=accuracy, min_speedup=1000.0, **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantizationGoalWarning)  # fp32 meets any goal: no warning
        result = quantize(trained_mlp, config, eval_fn=eval_fn, example_inputs=x_test[:1])
    assert result.recipe is None and result.goal_met
    assert result.metric == result.baseline_metric and result.latency_s == result.baseline_latency_s
    assert quantized_layers(result.model, "torch_ao", ["0", "2"]) == {"0": False, "2": False}
    assert any(t.metric is not None for t in result.trials)  # candidates were built, and turned down
    (said,) = [m for m in result.messages if m.startswith("min_speedup=1000:")]
    assert "keeping the fp32 model" in said and ("meeting the goal" in said) == (goal == "met")
    with torch.no_grad():
        torch.testing.assert_close(result.model(x_test), reference)


def test_a_reachable_min_speedup_keeps_the_fastest_int8_model(trained_mlp, digits):
    x_test, y_test = digits[2], digits[3]
    config = PTQConfig(approach="dynamic", backends=("torch_ao",), min_speedup=1e-6, **FAST)
    result = quantize(trained_mlp, config, eval_fn=accuracy_fn(x_test, y_test), example_inputs=x_test[:1])
    assert result.recipe is not None and result.goal_met
    assert not any(m.startswith("min_speedup=") for m in result.messages)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("approach", ["dynamic", "static"])
def test_a_model_in_another_float_dtype_quantizes_on_every_backend(dtype, approach, tmp_path):
    """A model trained with Lightning's precision="bf16-true" has bfloat16 weights. Before, torch_ao failed ("expected
    scalar type Float but found BFloat16") and ONNX Runtime had no kernel ("Gemm(13)"): only PT2E was left. A float64
    model's ONNX Runtime "int8" file was a float64 one (its quantizer leaves double MatMuls as they are)."""
    from litcompress.quantization import load_quantized

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    x = torch.randn(256, 32)
    labels = model(x).argmax(1)
    model = model.to(dtype)

    def accuracy(candidate: nn.Module) -> float:  # fed the model's own dtype, as the user's data loader gives it
        with torch.no_grad():
            return (candidate(x.to(dtype)).argmax(1) == labels).float().mean().item()

    result = quantize(model, PTQConfig(approach=approach, backends=("torch_ao", "onnxruntime", "pt2e"), **FAST),
                      eval_fn=accuracy, calibration_data=[x[:64].to(dtype)])
    assert {t.recipe.backend for t in result.trials} == {"torch_ao", "onnxruntime", "pt2e"}
    assert all(t.error is None and t.metric > 0.9 for t in result.trials)
    assert next(model.parameters()).dtype == dtype  # the model given is untouched
    with torch.no_grad():
        expected = result.model(x[:8].to(dtype))  # the result takes the model's inputs
    path = tmp_path / ("model.onnx" if result.recipe.backend == "onnxruntime" else "model.pt")
    result.save(path)
    loaded, _ = load_quantized(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x[:8].to(dtype).float()), expected)  # its file takes float32 inputs


def test_a_float64_models_onnx_file_holds_int8_weights(tmp_path):
    """ONNX Runtime's quantizer quantizes float MatMuls only: a float64 model's "int8" file kept every weight in
    float64. The search now quantizes a float32 copy."""
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)).eval().double()
    x = torch.randn(64, 32, dtype=torch.float64)
    result = quantize(model, PTQConfig(approach="dynamic", backends=("onnxruntime",), **FAST),
                      eval_fn=lambda m: 1.0, example_inputs=x[:8])
    result.save(tmp_path / "model.onnx")
    types = {i.data_type for i in onnx.load(str(tmp_path / "model.onnx")).graph.initializer if len(i.dims) == 2}
    assert types == {onnx.TensorProto.INT8}, types
    assert any("float64 weights were quantized from a float32 copy" in m for m in result.messages)


class GPTStyleMLP(nn.Module):
    """GPT-2's feed-forward block and head on a digits image read as 8 tokens of 8 pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.c_fc, self.c_proj, self.head = Conv1D(128, 8), Conv1D(32, 128), nn.Linear(8 * 32, 10)
        self.alias = self.c_fc  # one layer under two names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.c_proj(torch.nn.functional.gelu(self.c_fc(x.view(-1, 8, 8))))
        return self.head(hidden.flatten(1))


@pytest.mark.parametrize("backend", ["torch_ao", "onnxruntime", "pt2e"])
def test_transposed_linear_layers_are_quantized_on_every_backend(backend, digits):
    """torch_ao quantizes nn.Linear and pt2e the linear op: GPT-2's Conv1D layers (addmm on a transposed weight) stayed
    fp32 there, and a 'quantized' GPT-2 came out the size of the fp32 one."""
    x_train, y_train, x_test, y_test = digits
    torch.manual_seed(0)
    model = GPTStyleMLP()
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x_train), y_train).backward()
        optimizer.step()
    model.eval()
    config = PTQConfig(approach="dynamic", backends=(backend,), accuracy=AccuracyCriterion(0.02), **FAST)
    result = quantize(model, config, eval_fn=accuracy_fn(x_test, y_test), calibration_data=[(x_train[:64],)])
    assert result.goal_met and not result.recipe.fp32_layers, result.table()
    assert any("2 Conv1D layer(s)" in m and "c_fc, c_proj" in m for m in result.messages), result.messages
    if backend == "onnxruntime":  # the exporter names a 3-d MatMul's weight after the node: count the int8 weights
        import onnx

        initializers = onnx.load_from_string(result.model.model_bytes).graph.initializer
        assert sum(i.data_type == onnx.TensorProto.INT8 and i.name.endswith("_quantized") for i in initializers) == 3
    else:
        assert all(quantized_layers(result.model, backend, ["c_fc", "c_proj", "head"]).values())
    assert result.size_bytes < 0.7 * result.baseline_size_bytes  # the head's 2,560 weights are int8 as well
    assert type(model.c_fc) is Conv1D  # the model given is left as it is


def test_as_linear_layers_computes_the_same_and_keeps_aliases_one_layer():
    from litcompress.quantization.backends import as_linear_layers_

    torch.manual_seed(0)
    model = GPTStyleMLP().eval()
    x = torch.randn(5, 64)
    expected = model(x)
    assert as_linear_layers_(model) == ["c_fc", "c_proj"]
    assert type(model.c_fc) is nn.Linear and model.alias is model.c_fc
    torch.testing.assert_close(model(x), expected)

    class Conv1DOfAnotherKind(Conv1D):  # same attributes, another computation: left alone
        def forward(self, x):
            return super().forward(x) * 2

    Conv1DOfAnotherKind.__name__ = "Conv1D"
    other = nn.Sequential(Conv1DOfAnotherKind(4, 3))
    assert as_linear_layers_(other) == [] and type(other[0]) is Conv1DOfAnotherKind


def test_fallback_never_repeats_a_recipe_and_grows_the_fp32_set_until_one_layer_is_left():
    # When one more fp32 layer did not beat the best trial (ties are common with accuracy), the same recipe was
    # built again until max_trials ran out, and the layers after it were never tried.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 10)).eval()
    x = torch.randn(512, 32)
    with torch.no_grad():
        labels = model(x).argmax(1)
    config = PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=12, latency_repeats=2,
                       accuracy=AccuracyCriterion(tolerable_loss=0.0))  # fp32 is exact: no int8 trial can meet it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuantizationGoalWarning)
        result = quantize(model, config, eval_fn=accuracy_fn(x, labels), example_inputs=x[:8],
                          calibration_data=[x[:64]])
    recipes = [t.recipe for t in result.trials]
    assert len(recipes) == len(set(recipes)), result.table()
    assert len(recipes) < config.max_trials  # stopped when no larger fp32 set was left, not by the budget
    assert max(len(r.fp32_layers) for r in recipes) == 3  # every set up to all layers but one was reached


class _WithTrainingOnlyHead(nn.Module):
    """The sensitive MLP plus a head its forward never calls (one a training loss reads)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body, self.aux_head = body, nn.Linear(32, 8)

    def forward(self, x):
        return self.body(x)


def test_a_layer_forward_never_calls_leaves_the_fallback_to_the_others():
    # Static sensitivity failed with KeyError on the head (no observed range), and the search went on without any
    # fp32 fallback: the goal that keeping layer 0 in fp32 meets was missed.
    body, x, labels = make_sensitive_mlp()
    model = _WithTrainingOnlyHead(body).eval()
    scores = layer_sensitivity(model, ["body.0", "body.2", "aux_head"], [(x[:128],)], "static")
    assert scores["aux_head"] == math.inf and min(scores, key=scores.get) == "body.0"
    config = PTQConfig(approach="static", backends=("torch_ao",), accuracy=AccuracyCriterion(0.01), **FAST)
    result = quantize(model, config, eval_fn=accuracy_fn(x, labels),
                      calibration_data=[(x[i:i + 64],) for i in range(0, 256, 64)])
    assert result.goal_met and "body.0" in result.recipe.fp32_layers, result.table()
    assert "aux_head" not in result.recipe.fp32_layers
    assert not any("layer sensitivity failed" in m for m in result.messages)


class _BranchesOnTheBatchSize(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        hidden = torch.relu(self.fc(x))
        if x.shape[0] == 1:  # e.g. a serving shortcut: traced on a batch of several rows, never taken by a file
            hidden = hidden * 0
        return self.head(hidden)


@pytest.mark.parametrize("backend", ["torch_ao", "pt2e"])
def test_a_forward_that_depends_on_the_batch_size_is_said(backend):
    # The files and exported candidates silently took the example batch's path at batch 1 too.
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    config = PTQConfig(approach="dynamic", backends=(backend,), max_trials=1, latency_repeats=2,
                       accuracy=AccuracyCriterion(1.0, relative=False))
    for model, said in ((_BranchesOnTheBatchSize().eval(), True), (make_sensitive_mlp()[0], False)):
        inputs = x if said else make_sensitive_mlp()[1][:64]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = quantize(model, config, eval_fn=lambda m: 1.0, example_inputs=inputs[:1],
                              calibration_data=[inputs])  # the example is one row: the calibration batch is used
        messages = [m for m in result.messages if "differ when computed alone (batch 1)" in m]
        assert len(messages) == int(said) and sum(str(w.message) in messages for w in caught) == int(said)


def test_batch_dependence_counts_nan_in_one_only_and_ignores_nan_in_both_and_rounding():
    from litcompress.quantization.tuner import batch_dependence

    class AllNaN(nn.Module):
        def forward(self, x):
            return x * float("nan")

    class NaNAlone(nn.Module):
        def forward(self, x):
            return x * float("nan") if x.shape[0] == 1 else x

    x = torch.randn(6, 8)
    assert batch_dependence(AllNaN(), (x,)) is None  # NaN where the row alone is NaN too: no difference
    assert batch_dependence(NaNAlone(), (x,)) is not None  # NaN in one only is: Python's max() skipped it
    assert batch_dependence(nn.Linear(8, 3), (x,)) is None
    assert batch_dependence(_BranchesOnTheBatchSize().eval(), (x,)) is not None
    assert batch_dependence(nn.Linear(8, 3), (x[:1],)) is None  # one row: nothing to compare
    assert batch_dependence(_MaskedLogits().eval(), (x,)) is None  # -inf in both: was "by up to inf of their scale"


class _MaskedLogits(nn.Module):
    """Logits with classes 7-9 masked out (-inf), as a constrained decoder's."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        allowed = torch.arange(10) < 7
        return self.net(x).masked_fill(~allowed, float("-inf"))


def test_layers_of_a_model_with_masked_logits_are_ranked_and_fall_back():
    """Every layer's sensitivity was NaN, taken for "outputs unchanged ... never kept in fp32": the search ended
    after the knob variants without a fallback trial, the goal (no loss) missed."""
    torch.manual_seed(0)
    model = _MaskedLogits().eval()
    x = torch.randn(128, 8)
    calibration = [(x[i:i + 32],) for i in range(0, 128, 32)]
    scores = layer_sensitivity(model, ["net.0", "net.2", "net.4"], calibration, "dynamic")
    assert all(math.isfinite(score) for score in scores.values()), scores
    with torch.no_grad():
        reference = model(x)
    allowed = torch.isfinite(reference)

    def minus_error(candidate):
        with torch.no_grad():
            return -float((candidate(x) - reference)[allowed].abs().mean())

    config = PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=6, latency_repeats=2,
                       accuracy=AccuracyCriterion(tolerable_loss=0.0, relative=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = quantize(model, config, eval_fn=minus_error, calibration_data=[c[0] for c in calibration])
    assert any(trial.recipe.fp32_layers for trial in result.trials), result.table()
    assert not any("depends on the batch size" in message for message in result.messages)


def test_a_shared_iterator_of_calibration_batches_loses_none_past_those_read(trained_mlp, digits):
    """One batch past num_calibration_batches was pulled and dropped: a stream read on afterwards missed it."""
    x = digits[2]
    stream = iter([(x[i:i + 16],) for i in range(0, 96, 16)])
    config = PTQConfig(approach="static", backends=("torch_ao",), num_calibration_batches=2, **FAST)
    quantize(trained_mlp, config, eval_fn=lambda m: 1.0, calibration_data=stream)
    assert torch.equal(next(stream)[0], x[32:48])  # the third batch, still there


def test_a_tensor_given_as_calibration_data_is_refused_as_rows_not_batches():
    """Iterated, a tensor gives single samples: every candidate failed with its own shape error (or torch_ao
    calibrated on 16 single rows) and the fp32 model came back."""
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.randn(512, 64)
    with pytest.raises(TypeError, match=r"calibration_data=<a tensor of shape \(512, 64\)>\): iterating a tensor "
                                        r"gives its rows"):
        quantize(model, PTQConfig(approach="static"), eval_fn=lambda m: 1.0, calibration_data=x)


def test_calibration_data_that_is_one_batch_or_holds_a_batch_the_model_cannot_take_is_refused_before_any_work():
    """One (inputs, labels) pair was iterated tensor by tensor and a dict by its keys; a later batch of another width
    was never run before the search: every candidate failed and the fp32 model came back (the width taken for a
    dim that varies, a 'fixed dim' error on top)."""
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x, y = torch.randn(24, 16), torch.randint(0, 4, (24,))
    calls = []

    def eval_fn(m):
        calls.append(m)
        return 1.0

    for data, error, message in [
            ((x, y), TypeError, r"calibration_data=\(inputs of shape \(24, 16\), labels of shape \(24,\)\)\): that is "
                                r"one \(inputs, targets\) batch"),
            ({"x": x}, TypeError, r"calibration_data=<a dict with keys \['x'\]>\): a dict is one batch"),
            # iterated, its characters: "A batch of type str is not the model's inputs: pass input_fn=" (after the
            # whole fit, with QuantizeOnFitEnd)
            ("batches", TypeError, r"calibration_data='batches'\): expected batches .*, not a string"),
            ([x[:8], torch.randn(8, 15)], ValueError, r"could not be called as model\(\*inputs\) on calibration "
                                                      r"batch 1 \(inputs: \(8, 15\) torch.float32\)"),
            ((x, y[:, None].float()), ValueError, r"calibration batch 1 .* for one \(inputs, targets\) batch, give "
                                                  r"\[\(inputs, targets\)\]")]:
        with pytest.raises(error, match=message):
            quantize(model, PTQConfig(approach="static"), eval_fn=eval_fn, calibration_data=data)
    assert calls == []  # not even the baseline


class _OptionalMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.last = nn.Linear(16, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = torch.relu(self.first(x))
        return self.last(hidden if mask is None else hidden * mask)


@pytest.mark.parametrize("example", ["fewer inputs", "None for the mask"])
def test_calibration_batches_that_give_other_inputs_than_example_inputs_are_refused_before_any_work(example):
    """Batches (x, mask) with example_inputs (x,): the torch_ao and pt2e candidates failed ("forward() takes 2
    positional arguments but 3 were given", of the traced graph), and ONNX Runtime's dropped the masks from its feeds
    and calibrated without them, silently."""
    torch.manual_seed(0)
    x, mask = torch.randn(32, 16), (torch.rand(32, 8) > 0.5).float()
    calls = []

    def eval_fn(m):
        calls.append(m)
        return 1.0

    given = (x,) if example == "fewer inputs" else (x, None)
    shown = r"1 \(a tensor\)" if example == "fewer inputs" else r"2 \(a tensor, None\)"
    with pytest.raises(ValueError, match=rf"calibration batch 0 gives the model 2 input\(s\) \(a tensor, a tensor\), "
                                         rf"example_inputs {shown}: the candidates are traced or exported on "
                                         "example_inputs"):
        quantize(_OptionalMask().eval(), PTQConfig(approach="static", backends=("onnxruntime",)), eval_fn=eval_fn,
                 calibration_data=[(x, mask)], example_inputs=given, input_fn=tuple)
    assert calls == []  # not even the baseline
    if example == "fewer inputs":  # dynamic int8 calibrates nothing on the batches (pt2e's: on example_inputs)
        for backend in ("torch_ao", "pt2e"):
            dynamic = quantize(_OptionalMask().eval(), PTQConfig(approach="dynamic", backends=(backend,),
                                                                 max_trials=1),
                               eval_fn=eval_fn, calibration_data=[(x, mask)], example_inputs=given, input_fn=tuple)
            assert dynamic.recipe is not None and dynamic.recipe.backend == backend
    # the same inputs in both (the example left out: the first batch): quantized with the masks
    result = quantize(_OptionalMask().eval(), PTQConfig(approach="static", backends=("onnxruntime",), max_trials=1),
                      eval_fn=eval_fn, calibration_data=[(x, mask)], input_fn=tuple)
    assert result.recipe is not None and result.model(x, mask).shape == (32, 4)


def test_an_eval_fn_may_return_a_numpy_array_of_one_number():
    """A 0-d or one-element array was refused, though a tensor of one number is taken."""
    import numpy as np

    from litcompress.quantization.tuner import check_metric

    assert check_metric(np.array(0.5), "x") == 0.5 and check_metric(np.array([0.25]), "x") == 0.25
    with pytest.raises(ValueError, match="must return one finite number"):
        check_metric(np.array([0.5, 0.5]), "x")
    with pytest.raises(ValueError, match="must return a finite number"):
        check_metric(np.array(float("nan")), "x")


def test_timeout_s_counts_the_search_not_the_baseline():
    """A 2 s validation under timeout_s=1.5 ran no trial: the timer had started before the fp32 baseline, and the
    result said no candidate 'could be built'."""
    import time

    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.randn(64, 64)

    def slow(candidate):
        time.sleep(0.6)
        return float((candidate(x).argmax(1) == model(x).argmax(1)).float().mean())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = quantize(model, PTQConfig(approach="dynamic", backends=("torch_ao",), timeout_s=0.5,
                                           latency_repeats=2, accuracy=AccuracyCriterion(tolerable_loss=1.0)),
                          eval_fn=slow, example_inputs=x[:8])
    assert len(result.trials) == 1 and result.recipe is not None
    assert any("timeout_s=0.5 reached after 1 trials" in m for m in result.messages)


def test_a_search_timed_out_before_its_first_trial_says_no_candidate_was_tried():
    """It said "No quantized candidate could be built (see result.messages/trials)" where no trial had run."""
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    x = torch.randn(4, 8)
    with pytest.warns(QuantizationGoalWarning, match=r"No quantized candidate was tried \(timeout_s reached before "
                                                     r"the first trial\): returning an fp32 copy"):
        result = quantize(model, PTQConfig(approach="dynamic", backends=("torch_ao",), timeout_s=1e-9,
                                           latency_repeats=2), eval_fn=lambda m: float(m(x).sum() * 0 + 1),
                          example_inputs=x)
    assert result.trials == [] and result.recipe is None
    assert "timeout_s=1e-09 reached before the first trial." in result.messages


def test_an_embedding_table_onnxruntime_quantizes_with_one_scale_is_ranked_so_and_kept_fp32_by_the_fallback():
    """ONNX Runtime quantizes a table with one scale; the ranking measured it with one per row, so a table with one
    outlier row looked the least sensitive layer and was never kept fp32 (the goal was missed, trials left)."""

    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc1, self.fc2 = nn.Embedding(100, 16), nn.Linear(16, 32), nn.Linear(32, 5)

        def forward(self, ids):
            return self.fc2(torch.relu(self.fc1(self.emb(ids).mean(1))))

    torch.manual_seed(0)
    model = Bag().eval()
    with torch.no_grad():
        model.emb.weight[99] = 500.0  # a row never looked up, far larger than the rest
    ids = torch.randint(0, 99, (256, 6))
    with torch.no_grad():
        labels = model(ids).argmax(1)

    def accuracy(candidate):
        with torch.no_grad():
            return float((candidate(ids).argmax(1) == labels).float().mean())

    result = quantize(model, PTQConfig(approach="dynamic", backends=("onnxruntime",), max_trials=6, latency_repeats=2,
                                       accuracy=AccuracyCriterion(tolerable_loss=0.02)),
                      eval_fn=accuracy, calibration_data=[ids[:64]])
    assert result.goal_met and result.recipe.fp32_layers == ("emb",)
    ranked = next(m for m in result.messages if m.startswith("layer sensitivity"))
    assert "embedding tables with one scale each): emb=" in ranked  # the most sensitive, first


def test_a_relative_tolerance_of_a_zero_fp32_metric_is_said_to_allow_nothing():
    """A fidelity loss (the candidate's error against the fp32 outputs) is 0 for fp32: the relative goal was
    "metric <= 0", every candidate failed, and the warning said to raise the tolerable loss, which cannot help."""
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(64, 16)
    with torch.no_grad():
        reference = model(x)

    def error(candidate):
        with torch.no_grad():
            return float((candidate(x) - reference).pow(2).mean())

    criterion = AccuracyCriterion(tolerable_loss=0.5, higher_is_better=False)
    with pytest.warns(QuantizationGoalWarning) as said:
        result = quantize(model, PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=2,
                                           latency_repeats=2, accuracy=criterion), eval_fn=error, example_inputs=x)
    messages = [str(w.message) for w in said]
    assert any("the fp32 metric is 0, so a tolerance relative to it allows no change at all; "
               "AccuracyCriterion(relative=False)" in m for m in messages)
    assert not any("Raise max_trials or the tolerable loss" in m or "Every recipe was tried" in m for m in messages)
    absolute = quantize(model, PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=2, latency_repeats=2,
                                         accuracy=AccuracyCriterion(tolerable_loss=0.5, relative=False,
                                                                    higher_is_better=False)),
                        eval_fn=error, example_inputs=x)
    assert absolute.goal_met and absolute.recipe is not None and not result.goal_met


def _outlier_mlp() -> nn.Module:
    """An MLP whose second layer reads a dead unit with a huge weight: int8 per-tensor scales ruin it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        model[0].weight[0].zero_()
        model[0].bias[0] = -1.0
        model[2].weight.mul_(0.3)
        model[2].weight[:, 0] = 50.0
    return model.eval()


def test_no_other_backend_adds_an_fp32_fallback_once_a_candidate_meets_the_goal():
    """The README says so; a candidate that met the goal earlier in the same round still let the next backend run
    its fallback."""
    model, x = _outlier_mlp(), torch.randn(256, 32)
    with torch.no_grad():
        labels = model(x).argmax(1)

    def agreement(candidate):
        with torch.no_grad():
            return float((candidate(x).argmax(1) == labels).float().mean())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = quantize(model, PTQConfig(approach="dynamic", backends=("torch_ao", "onnxruntime"), max_trials=10,
                                           latency_repeats=2, accuracy=AccuracyCriterion(0.02)),
                          eval_fn=agreement, calibration_data=[x[:64]])
    met = [t.index for t in result.trials if t.meets_goal]
    assert met, [(t.recipe.describe(), t.metric) for t in result.trials]
    later_fallbacks = [t for t in result.trials if t.index > met[0] and t.recipe.fp32_layers]
    assert later_fallbacks == [], [t.recipe.describe() for t in result.trials]


def test_of_candidates_missing_the_goal_alike_the_fastest_is_returned():
    """Equal metrics (common with accuracy) were settled by trial order: the slower candidate, tried first."""
    model, x = _outlier_mlp(), torch.randn(256, 32)

    def metric(candidate):  # 1 for the fp32 model, 0.5 for every int8 one
        candidate(x)
        plain = all(type(m) in (nn.Sequential, nn.Linear, nn.ReLU) for m in candidate.modules())
        return 1.0 if plain else 0.5

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = quantize(model, PTQConfig(approach="dynamic", backends=("torch_ao", "onnxruntime"), max_trials=2,
                                           latency_repeats=2, accuracy=AccuracyCriterion(0.01)),
                          eval_fn=metric, example_inputs=x)
    ran = [t for t in result.trials if t.metric is not None]
    assert len(ran) == 2 and ran[0].metric == ran[1].metric == 0.5 and not result.goal_met
    fastest = min(ran, key=lambda t: t.latency_s)
    assert result.recipe == fastest.recipe


def test_static_quantization_with_calibration_data_that_gives_no_batch_says_so():
    from torch.utils.data import DataLoader, TensorDataset

    empty = DataLoader(TensorDataset(torch.randn(0, 8)), batch_size=4)
    with pytest.raises(ValueError, match=r"quantize\(calibration_data=...\) gave no batch \(an empty loader"):
        quantize(nn.Sequential(nn.Linear(8, 2)).eval(), PTQConfig(approach="static", backends=("torch_ao",)),
                 eval_fn=lambda m: 1.0, calibration_data=empty, example_inputs=torch.randn(2, 8))


def test_convolutions_a_dynamic_search_leaves_in_fp32_are_said():
    """--quantize weight_only/dynamic on a conv model: only its head was int8 (the file 4x the input's size for a
    DenseNet), without a word."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(8, 1, 8, 8)
    result = quantize(model, PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=1, latency_repeats=2,
                                       accuracy=AccuracyCriterion(tolerable_loss=1.0)),
                      eval_fn=lambda m: float(m(x).sum() * 0 + 1), example_inputs=x)
    assert ("approach='dynamic' leaves the 1 convolution(s) in fp32 (0): approach='static' quantizes them (torch_ao; "
            "CLI: --quantize static).") in result.messages
    # pt2e's static int8 takes no Conv1d: no promise it does
    ones = nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6, 3)).eval()
    x = torch.randn(8, 4, 8)
    result = quantize(ones, PTQConfig(approach="dynamic", backends=("pt2e",), max_trials=1, latency_repeats=2,
                                      compile=False, accuracy=AccuracyCriterion(tolerable_loss=1.0)),
                      eval_fn=lambda m: float(m(x).sum() * 0 + 1), example_inputs=x)
    assert not any("convolution(s) in fp32" in m for m in result.messages)


def test_a_free_length_declared_for_a_packed_sequence_model_is_taken():
    """The check shortened the padded sequences but not the lengths beside them, so the model failed on its own
    probe (a length longer than the sequence) and the declaration was refused as a size the model's code fixes."""
    from torch.nn.utils.rnn import pack_padded_sequence

    from litcompress.quantization.tuner import check_declared_dims_vary

    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm, self.fc = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 3)

        def forward(self, x, lengths):
            _, (hidden, _) = self.lstm(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
            return self.fc(hidden[-1])

    inputs = (torch.randn(4, 10, 8), torch.tensor([10, 7, 3, 9]))
    check_declared_dims_vary(Packed().eval(), inputs, {0: (1,)}, "compress: dynamic_dims")

    class BesideAnother(nn.Module):  # a second sequence, shortened to another length: the lengths go with the first
        def __init__(self) -> None:
            super().__init__()
            self.lstm, self.other = nn.LSTM(8, 8, batch_first=True), nn.Linear(8, 8)

        def forward(self, x, other, lengths):
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out = torch.nn.utils.rnn.pad_packed_sequence(self.lstm(packed)[0], batch_first=True)[0]
            return (out + x).mean(1) + self.other(other).mean(1)

    check_declared_dims_vary(BesideAnother().eval(), (torch.randn(3, 20, 8), torch.randn(3, 6, 8),
                                                      torch.tensor([20, 15, 9])), {0: (1,), 1: (1,)}, "quantize")
    with pytest.raises(ValueError, match=r"declares dim 2 of input 0 \(size 8\) free, but the model fails"):
        check_declared_dims_vary(Packed().eval(), inputs, {0: (2,)}, "compress: dynamic_dims")  # features: fixed


def test_a_chosen_backend_that_leaves_layers_fp32_others_quantize_is_said():
    """pt2e's dynamic int8 takes the Linears, not an LSTM: chosen by speed, its file kept the LSTM fp32 under an int8
    name (larger than the other candidates', the README's "it is int8" untrue), without a word."""

    class Reader(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm, self.head = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    model, x = Reader().eval(), torch.randn(8, 5, 8)

    def metric(candidate):  # torch_ao's candidates (their modules torch.ao's) miss the goal: pt2e's is chosen
        candidate(x)
        return 0.0 if any(type(m).__module__.startswith("torch.ao.nn") for m in candidate.modules()) else 1.0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = quantize(model, PTQConfig(approach="dynamic", backends=("pt2e", "torch_ao"), max_trials=4,
                                           latency_repeats=2, compile=False,
                                           accuracy=AccuracyCriterion(tolerable_loss=0.01)),
                          eval_fn=metric, example_inputs=x)
    assert result.recipe.backend == "pt2e"
    chosen = next(t.index for t in result.trials if t.recipe == result.recipe)
    assert [m for m in result.messages if "does not quantize" in m] == [
        f"trial {chosen}'s backend (pt2e) does not quantize lstm, which torch_ao does: they stay fp32 in it (the "
        "fastest candidate meeting the goal all the same); PTQConfig(backends=...) without it quantizes them."]


@pytest.mark.parametrize("approach", ["dynamic", "static"])
def test_the_checks_before_the_search_run_a_copy_so_a_forward_that_writes_state_leaves_the_model_as_it_was(
        approach):
    """The calibration batches, the example inputs and the batch-size dependence were checked on the model passed:
    a forward writing a buffer (a counter, a cache) changed it, against "the model you pass in is never modified"."""
    torch.manual_seed(0)
    model, x = CountsItsCalls(8, 16, 3).eval(), torch.randn(64, 8)
    result = quantize(model, PTQConfig(approach=approach, backends=("torch_ao",), max_trials=1),
                      eval_fn=lambda m: -float((m(x) - model.out(torch.relu(model.hidden(x)))).abs().mean()),
                      calibration_data=[(x[i:i + 16],) for i in range(0, 64, 16)], example_inputs=x[:16])
    assert int(model.calls) == 0 and result.model is not model


def test_a_relative_tolerance_of_one_or_more_on_a_positive_metric_is_said_to_accept_anything():
    """`tolerable_loss=5` meant as 5 %: the goal was "accuracy >= -3.9", met by a model that gets nothing right, and
    the search chose the fastest candidate without a word. A negative metric (-mse) takes such a tolerance as it is."""
    model, x, y = make_sensitive_mlp()  # its first layer breaks under int8: the int8 accuracy falls far
    loose = AccuracyCriterion(tolerable_loss=5)
    with pytest.warns(QuantizationGoalWarning, match=re.escape(
            "a relative tolerance of 5 is 500% of the fp32 metric, so any metric >= -4 meets the goal, a model that "
            "gets nothing right included; for 5 % give 0.05.")):
        result = quantize(model, PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=1,
                                           latency_repeats=2, accuracy=loose), eval_fn=accuracy_fn(x, y),
                          example_inputs=x[:64])
    assert result.baseline_metric == 1.0 and any(m.startswith("a relative tolerance of 5 is") for m in result.messages)

    def negative_error(candidate):
        with torch.no_grad():
            return -float((candidate(x) - model(x)).pow(2).mean()) - 1.0

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        scored = quantize(model, PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=1,
                                           latency_repeats=2, accuracy=loose), eval_fn=negative_error,
                          example_inputs=x[:64])
    assert not any("relative tolerance of" in m for m in [*scored.messages, *(str(w.message) for w in said)])
    anything = quantize(model, PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=1, latency_repeats=2,
                                         accuracy=AccuracyCriterion(tolerable_loss=1.0)), eval_fn=accuracy_fn(x, y),
                        example_inputs=x[:64])
    assert not any("relative tolerance of" in m for m in anything.messages)  # 100 %: "any metric >= 0", as meant
    with pytest.warns(QuantizationGoalWarning, match=re.escape("a relative tolerance of 1.004 is 100.4% of the fp32")):
        quantize(model, PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=1, latency_repeats=2,
                                  accuracy=AccuracyCriterion(tolerable_loss=1.004)), eval_fn=accuracy_fn(x, y),
                 example_inputs=x[:64])  # (it said "100%", the one tolerance it is not said for)


def test_lazy_layers_never_called_are_refused_rather_than_quantized_as_another_network():
    """The search's copy created weights of its own: the int8 result was of a network the model never became."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 3)), torch.randn(32, 8)
    with pytest.raises(ValueError, match=re.escape("quantize: 0.weight, 0.bias belong to lazy layers never called")):
        quantize(model, PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=1),
                 eval_fn=lambda m: 1.0, example_inputs=x)
    assert isinstance(model[0], nn.LazyLinear)


def test_a_lazy_batch_norm_without_parameters_never_called_is_refused_too():
    """affine=False: its uninitialized statistics are buffers, which the check did not read, and the search's copy
    failed inside torch's deepcopy ("Attempted to use an uninitialized parameter")."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LazyBatchNorm2d(affine=False), nn.ReLU(), nn.Flatten(),
                          nn.Linear(288, 3)).eval()
    with pytest.raises(ValueError, match=re.escape("quantize: 1.running_mean, 1.running_var belong to lazy layers "
                                                   "never called")):
        quantize(model, PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=1),
                 eval_fn=lambda m: 1.0, example_inputs=torch.randn(2, 3, 8, 8))


def test_pt2e_says_it_takes_conv2d_when_it_skips_a_model_of_other_convolutions():
    """Its static quantizer takes nn.Linear and nn.Conv2d: a model of Conv1d layers was skipped because "it quantizes
    nn.Linear and convolutions"."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.Conv1d(8, 4, 1)).eval(), torch.randn(8, 3, 16)
    result = quantize(model, PTQConfig(approach="static", backends=("pt2e", "torch_ao"), max_trials=1),
                      eval_fn=lambda m: 1.0, example_inputs=x, calibration_data=[x])
    assert "backend 'pt2e' skipped: it quantizes no layer of this model for approach 'static' (it quantizes " \
           "nn.Linear and nn.Conv2d)." in result.messages


def test_torch_ao_skips_a_torchscript_model_rather_than_choosing_it_unquantized():
    """Its eager quantization swaps nn.Linear modules, which a scripted model has none of: the 'int8' candidate was
    the fp32 model, chosen as int8 (sizes and outputs equal)."""
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    scripted = torch.jit.script(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval())
    with pytest.warns(QuantizationGoalWarning):
        result = quantize(scripted, PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=1,
                                              latency_repeats=2), eval_fn=lambda m: 1.0, example_inputs=x)
    assert result.recipe is None and not result.trials
    assert any(m.startswith("backend 'torch_ao' skipped: it quantizes eager modules") for m in result.messages)


@pytest.mark.parametrize("backend, approach", [("torchao", "weight_only"), ("pt2e", "dynamic")])
def test_torchao_and_pt2e_skip_a_torchscript_model_in_words_of_their_own(backend, approach):
    """Both trace with torch.export, which refuses a ScriptModule: every trial failed in torch's words."""
    pytest.importorskip("torchao")
    x = torch.randn(8, 16)
    scripted = torch.jit.script(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval())
    with pytest.warns(QuantizationGoalWarning):
        result = quantize(scripted, PTQConfig(approach=approach, backends=(backend,), max_trials=1,
                                              latency_repeats=2), eval_fn=lambda m: 1.0, example_inputs=x)
    assert not result.trials
    assert any(m.startswith(f"backend {backend!r} skipped: it quantizes eager modules") for m in result.messages)


def test_onnxruntime_quantizes_a_torchscript_model_and_its_fp32_copy_is_refused_as_export_in_words(tmp_path):
    """The ONNX export read the forward's signature of a ScriptModule's class (AttributeError: '_CachedForward');
    saving the fp32 copy as a torch.export program failed in torch's words, not as a format error with advice."""
    pytest.importorskip("onnxruntime")
    from litcompress.quantization import load_quantized, save_quantized
    from litcompress.quantization.artifact import Fp32FormatError

    torch.manual_seed(0)
    x = torch.randn(8, 16)
    eager = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    scripted = torch.jit.script(eager)
    scripted(x)  # called with gradients on: its graph executor then failed under the timing's inference mode
    result = quantize(scripted, PTQConfig(approach="dynamic", backends=("onnxruntime",), max_trials=1,
                                          latency_repeats=2, accuracy=AccuracyCriterion(1.0, relative=False)),
                      eval_fn=lambda m: -float((m(x) - eager(x)).abs().max()), example_inputs=x)
    assert result.recipe is not None and result.recipe.backend == "onnxruntime", result.table()
    with pytest.raises(Fp32FormatError, match=r"is TorchScript, which torch.export does not trace; "
                                              r"fp32_format='torchscript' writes it as it is, and 'onnx' exports it"):
        save_quantized(scripted, None, tmp_path / "model.pt2", (x,), fp32_format="export")
    assert not list(tmp_path.iterdir())
    save_quantized(scripted, None, tmp_path / "model.onnx", (x,), fp32_format="onnx")
    loaded, _ = load_quantized(tmp_path / "model.onnx")
    torch.testing.assert_close(loaded(x), eager(x), rtol=1e-5, atol=1e-5)


class _ScriptedEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.jit.script(nn.Sequential(nn.Linear(16, 32), nn.ReLU()))
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x))


def test_a_model_holding_a_scripted_part_is_quantized_by_torch_ao_dynamic_and_skipped_by_the_tracers(tmp_path):
    """The tracing backends failed in torch's words ("not part of the active trace", "is not an instance of
    torch.nn.Parameter"), and torch_ao static wrote a file that no loader read (AttributeError: '_type')."""
    pytest.importorskip("torchao")
    pytest.importorskip("onnxruntime")
    from litcompress.quantization import load_quantized, save_quantized
    from litcompress.quantization.artifact import Fp32FormatError

    torch.manual_seed(0)
    model, x = _ScriptedEncoder().eval(), torch.randn(8, 16)
    lenient = dict(max_trials=1, latency_repeats=2, accuracy=AccuracyCriterion(1.0, relative=False))
    for approach, backends in (("static", ("torch_ao", "pt2e", "onnxruntime")), ("weight_only", ("torchao",))):
        with pytest.warns(QuantizationGoalWarning):
            result = quantize(model, PTQConfig(approach=approach, backends=backends, **lenient), eval_fn=lambda m: 1.0,
                              example_inputs=x, calibration_data=[(x,)])
        assert not result.trials
        for backend in backends:
            assert any(m.startswith(f"backend {backend!r} skipped: it traces the model, and cannot trace through "
                                    "its TorchScript part(s) (enc)") for m in result.messages), result.messages
    result = quantize(model, PTQConfig(approach="dynamic", backends=("torch_ao",), **lenient), eval_fn=lambda m: 1.0,
                      example_inputs=x)
    assert result.recipe is not None and type(result.model.head) is not nn.Linear, result.table()
    result.save(tmp_path / "model.pt")
    loaded, _ = load_quantized(tmp_path / "model.pt")
    torch.testing.assert_close(loaded(x), result.model(x))
    with pytest.raises(Fp32FormatError, match=r"holds TorchScript modules \(enc\), which torch.export \(and the "
                                              r"ONNX exporter\) cannot trace through; fp32_format='torchscript'"):
        save_quantized(model, None, tmp_path / "fp32.pt2", (x,), fp32_format="export")
    with pytest.raises(Fp32FormatError, match=r"'onnx'\): this fp32 model holds TorchScript modules \(enc\), which "
                                              r"the ONNX exporter cannot trace through"):
        save_quantized(model, None, tmp_path / "fp32.onnx", (x,), fp32_format="onnx")


class _TakesADict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fc(batch["x"])


def test_a_torchscript_model_of_dict_inputs_is_skipped_in_words_about_its_inputs():
    """The search wraps a model of container inputs (as `model`): the note named a TorchScript part 'model' that the
    user's model does not have."""
    pytest.importorskip("onnxruntime")
    scripted = torch.jit.script(_TakesADict().eval())
    with pytest.warns(QuantizationGoalWarning):
        result = quantize(scripted, PTQConfig(approach="dynamic", backends=("onnxruntime",), max_trials=1,
                                              latency_repeats=2), eval_fn=lambda m: 1.0,
                          example_inputs=({"x": torch.randn(4, 16)},))
    assert any("the model is TorchScript and takes containers" in m for m in result.messages), result.messages


def test_an_input_fn_that_fails_on_a_batch_is_named_in_the_error():
    """A KeyError from the user's input_fn came out as it was, naming no argument: on a calibration batch, and on
    example inputs of a dict that forward's parameters do not name."""
    x = torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"input_fn failed on a batch \(TypeError: .*\): it maps a batch"):
        quantize(nn.Linear(16, 4).eval(), PTQConfig(approach="dynamic", backends=("torch_ao",)),
                 eval_fn=lambda m: 1.0, calibration_data=[(x, x)], input_fn=lambda batch: (batch["x"],))
    with pytest.raises(ValueError, match=r"input_fn failed on a batch \(KeyError: 'wrong'\)"):
        quantize(_TakesADict().eval(), PTQConfig(approach="dynamic", backends=("torch_ao",)), eval_fn=lambda m: 1.0,
                 example_inputs={"x": x}, input_fn=lambda batch: (batch["wrong"],))


class _BlockAppliedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.head = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.block(torch.relu(self.block(x)))))


def test_a_layer_called_twice_is_kept_fp32_by_torch_ao_static_and_the_trials_say_so():
    """torch.ao's int8 module holds one output scale for all its calls: the block's first call (range about +-1.9) was
    clipped to the second's (+-1.0), 0.13 of the output's range off, with nothing said; pt2e and ONNX Runtime observe
    each call apart."""
    torch.manual_seed(0)
    model = _BlockAppliedTwice().eval()
    calibration = [torch.randn(64, 16) for _ in range(4)]
    result = quantize(model, PTQConfig(approach="static", backends=("torch_ao",), max_trials=2,
                                       accuracy=AccuracyCriterion(tolerable_loss=0.5)),
                      eval_fn=lambda m: 1.0, calibration_data=calibration)
    assert result.recipe is not None and result.recipe.fp32_layers == ("block",)
    assert "block called more than once in forward" in result.trials[0].error
    x = calibration[0]
    with torch.no_grad():
        expected = model(x)
        assert float((result.model(x) - expected).abs().max() / expected.abs().max()) < 0.03


def test_a_retry_that_would_keep_every_layer_fp32_leaves_the_backend_instead():
    """The model's one layer, called twice: the retry kept it fp32 and returned that fp32 graph as torch_ao's static
    int8 result, which the fallback never does (all layers in fp32 is no quantization at all)."""
    class OneLayerTwice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.fc(x)))

    torch.manual_seed(0)
    result = quantize(OneLayerTwice().eval(), PTQConfig(approach="static", backends=("torch_ao",), max_trials=3),
                      eval_fn=lambda m: 1.0, calibration_data=[torch.randn(16, 8)])
    assert result.recipe is None and len(result.trials) == 1
    assert any("going on without backend 'torch_ao'" in message for message in result.messages)


@settings(max_examples=200, deadline=None)
@given(st.floats(1e-6, 1.0), st.one_of(st.floats(1e-6, 1.0), st.just(None)), st.integers(0, 20))
def test_two_latencies_said_side_by_side_differ_where_they_differ(a, b, ulps):
    """'slower than fp32 on this host (0.021 ms vs 0.021 ms)': two different medians read as equal (and a speed-up
    of 0.995x below min_speedup=1 as 1.00x)."""
    from litcompress.quantization.tuner import figures_apart, milliseconds_apart

    if b is None:  # medians a few ulps apart: sub-nanosecond, as per-call times of many calls can be
        b = a
        for _ in range(ulps):
            b = math.nextafter(b, 2.0)
    shown = milliseconds_apart(a, b)
    assert all(float(text) == pytest.approx(s * 1e3, rel=1e-9, abs=5e-4) for text, s in zip(shown, (a, b)))
    assert all(len(text.split(".")[1]) >= 3 for text in shown)
    assert (shown[0] != shown[1]) == (a * 1e3 != b * 1e3)
    assert milliseconds_apart(a, a) == [f"{a * 1e3:.3f}"] * 2
    ratio, bound = figures_apart(a / b, 1.0, decimals=2)
    assert (ratio == bound) == (a / b == 1.0) and float(ratio) == pytest.approx(a / b, abs=5e-3)


def test_a_goal_not_met_is_said_with_the_limit_that_ended_the_search():
    """It always said to raise max_trials/timeout_s, also when every recipe had been tried (with trials to spare, or
    with the last of them: this search has 3 recipes)."""
    import time

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2)).eval()
    x = torch.randn(64, 8)
    with torch.no_grad():
        reference = model(x)

    calls = []

    def closeness(candidate, pause=0.0):
        calls.append(None)
        if len(calls) > 1:  # (the candidates, not the fp32 baseline)
            time.sleep(pause)
        with torch.no_grad():
            return -float((candidate(x) - reference).abs().mean())

    criterion = AccuracyCriterion(tolerable_loss=0.0, relative=False)  # no int8 model meets it
    every = "Every recipe was tried: raise the tolerable loss, or give other backends."
    for max_trials, timeout_s, pause, said, trials in ((1, None, 0.0, "Raise max_trials or the tolerable loss.", 1),
                                                       (10, None, 0.0, every, 3), (3, None, 0.0, every, 3),
                                                       (10, 0.5, 0.6, "Raise timeout_s or the tolerable loss.", 1)):
        calls.clear()
        with pytest.warns(QuantizationGoalWarning, match=re.escape(said)):
            result = quantize(model, PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=max_trials,
                                               timeout_s=timeout_s, latency_repeats=2, num_threads=1,
                                               accuracy=criterion),
                              eval_fn=lambda m: closeness(m, pause), example_inputs=x[:16])
        assert len(result.trials) == trials
    assert any("(metric >= 0)" in m and "vs fp32 0." in m for m in result.messages)  # (the fp32 -0.0 said as -0)
    assert "fp32 baseline metric 0; goal: metric >= 0" in result.messages
    single = nn.Sequential(nn.Linear(8, 4)).eval()  # its fallback has no layer to keep in fp32: 2 recipes in all
    with torch.no_grad():
        reference = single(x)
    with pytest.warns(QuantizationGoalWarning, match=re.escape(every)):
        result = quantize(single, PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=2,
                                            latency_repeats=2, num_threads=1, accuracy=criterion),
                          eval_fn=closeness, example_inputs=x[:16])
    assert len(result.trials) == 2


@pytest.mark.parametrize("approach", ["dynamic", "static"])
def test_example_inputs_of_one_sample_without_its_batch_dim_are_refused_before_any_work(approach):
    """example_inputs=x[0] beside batches of x: a Linear front took the 1-d sample, every candidate was exported with
    the features as the free batch dim and failed ("Invalid rank for input"), and the fp32 model came back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(32, 16)
    calls = []

    def eval_fn(m):
        calls.append(m)
        return 1.0

    config = PTQConfig(approach=approach, backends=("onnxruntime",), max_trials=1)
    with pytest.raises(ValueError, match=r"quantize\(example_inputs=...\): input 0 has shape \(16,\), the calibration "
                                         r"batches' \(32, 16\): one sample without its batch dim. Give a batch "
                                         r"\(x\[:1\]"):
        quantize(model, config, eval_fn=eval_fn, calibration_data=[x], example_inputs=x[0])
    assert calls == []  # not even the baseline
    kept = quantize(model, config, eval_fn=eval_fn, calibration_data=[x], example_inputs=x[:1])  # one sample, batched
    assert kept.recipe is not None and kept.recipe.backend == "onnxruntime"


@settings(max_examples=50, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=5))
def test_figures_shown_apart_tell_different_values_apart_and_equal_ones_alike(values):
    from litcompress.quantization.tuner import significant_apart

    shown = significant_apart(*values)
    assert len(shown) == len(values)
    for a, b, text_a, text_b in ((a, b, x, y) for a, x in zip(values, shown) for b, y in zip(values, shown)):
        assert (text_a == text_b) == (a == b)


def test_a_missed_goal_shows_the_metric_apart_from_the_goal_and_the_baseline():
    """A loss of 1.000005 against fp32's exact 1 and a goal of <= 1: the table, and the warning, showed "1" for
    all three, beside "goal: no"."""
    from litcompress.quantization.tuner import significant_apart

    assert significant_apart(1.0, 1.0000050254, 1.0) == ["1", "1.00001", "1"] and significant_apart(-0.0) == ["0"]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(64, 16)
    with torch.no_grad():
        reference = model(x)

    def loss(candidate: nn.Module) -> float:
        with torch.no_grad():
            return 1.0 + float(((candidate(x) - reference) ** 2).mean())

    config = PTQConfig(backends=("torch_ao",), latency_repeats=2,
                       accuracy=AccuracyCriterion(tolerable_loss=0.0, higher_is_better=False))
    with pytest.warns(QuantizationGoalWarning) as caught:
        result = quantize(model, config, eval_fn=loss, example_inputs=x)
    assert not result.goal_met and result.metric > 1.0
    message = next(str(w.message) for w in caught if "Accuracy goal not met" in str(w.message))
    reached = re.search(r"with metric (\S+) vs fp32 1\.", message).group(1)
    assert message.startswith("Accuracy goal not met (metric <= 1): ") and float(reached) > 1.0
    rows = [line.split() for line in result.table().splitlines()[2:]]
    assert all(float(row[1]) > 1.0 for row in rows if row[1] != "-")


def test_the_trial_table_and_the_goal_note_show_a_missed_goal_apart_from_the_goal():
    """0.890996 against a goal of >= 0.891 was shown as 0.891 in the table, beside "no"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    calls = []

    def metric(candidate: nn.Module) -> float:
        calls.append(candidate)
        candidate(torch.randn(2, 8))
        return 0.9 if len(calls) == 1 else 0.890996  # the fp32 baseline first

    config = PTQConfig(backends=("torch_ao",), latency_repeats=2, max_trials=1,
                       accuracy=AccuracyCriterion(tolerable_loss=0.01, higher_is_better=True))
    with pytest.warns(QuantizationGoalWarning):
        result = quantize(model, config, eval_fn=metric, example_inputs=torch.randn(4, 8))
    assert result.goal == pytest.approx(0.891) and not result.goal_met
    assert "fp32 baseline metric 0.9; goal: metric >= 0.891" in result.messages
    trial = result.table().splitlines()[2].split()
    assert trial[1] == "0.890996" and trial[4] == "no"


def test_a_metric_meeting_the_goal_within_its_epsilon_is_not_told_apart_from_it_in_the_table():
    """0.7 against a float goal of 0.7000000000000001 (0.8 - 0.1), which it meets: every row took 16 digits."""
    import dataclasses

    from litcompress.quantization.tuner import QuantizationResult, Trial

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    scores = iter([0.8, 0.6912345290184021, 0.7])

    def metric(candidate: nn.Module) -> float:
        candidate(torch.randn(2, 8))
        return next(scores, 0.7)

    config = PTQConfig(backends=("torch_ao",), latency_repeats=2, max_trials=2,
                       accuracy=AccuracyCriterion(tolerable_loss=0.1, relative=False))
    result = quantize(model, config, eval_fn=metric, example_inputs=torch.randn(4, 8))
    assert result.goal == 0.8 - 0.1 != 0.7 and result.goal_met
    rows = [line.split()[1] for line in result.table().splitlines()[1:]]
    assert rows == ["0.8", "0.691235", "0.7"]
    assert isinstance(result, QuantizationResult) and all(isinstance(t, Trial) for t in result.trials)
    assert dataclasses.replace(result, goal=None).table().splitlines()[1:] == result.table().splitlines()[1:]
