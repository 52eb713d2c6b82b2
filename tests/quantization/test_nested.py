"""Models whose inputs are containers (``forward(self, batch)`` reading ``batch["x"]``) quantize on every backend."""

from __future__ import annotations

import pickle
from collections import namedtuple
from collections.abc import Callable

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from litcompress import AccuracyCriterion, CompressionConfig, PTQConfig, compress, load_quantized, quantize
from litcompress.quantization.nested import InputStructure, NestedInputs, flat_inputs, is_nested

Pair = namedtuple("Pair", ["left", "right"])


class ReadsADict(nn.Module):
    """Reads ``batch["x"]`` and ``batch["side"]["mask"]``; ``batch["label"]`` is there too and never read."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, batch):
        hidden = torch.relu(self.a(batch["x"])) * batch["side"]["mask"]
        return self.b(hidden) * batch["side"]["scale"]


def batch(seed: int, size: int = 16, order: str = "x first") -> dict:
    g = torch.Generator().manual_seed(seed)
    x, mask = torch.randn(size, 8, generator=g), (torch.rand(size, 32, generator=g) > 0.2).float()
    label = torch.randint(0, 4, (size,), generator=g)
    side = {"mask": mask, "scale": 2.0}  # a number among the tensors: a constant of the quantized model
    return {"x": x, "side": side, "label": label} if order == "x first" else {"label": label, "side": side, "x": x}


leaves = st.one_of(st.integers(-3, 3), st.booleans(), st.none(),
                   st.integers(1, 3).map(lambda n: torch.randn(n, 2)))
trees = st.recursive(leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.lists(inner, max_size=3).map(tuple),
    st.dictionaries(st.sampled_from("abcd"), inner, max_size=3), st.tuples(inner, inner).map(lambda t: Pair(*t))),
    max_leaves=8)


def _same_tree(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a is b
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_tree(x, y) for x, y in zip(a, b))
    return a == b


@settings(max_examples=80, deadline=None)
@given(st.lists(trees, min_size=1, max_size=3))
def test_flattening_keeps_every_tensor_and_rebuilds_the_same_inputs(inputs):
    inputs = tuple(inputs)
    structure = InputStructure.of(inputs)
    tensors = structure.flatten(inputs)
    assert all(isinstance(t, torch.Tensor) for t in tensors)
    assert len(tensors) == len(structure.tensor_positions)
    assert _same_tree(structure.unflatten(tensors), inputs)
    assert pickle.loads(pickle.dumps(structure)) == structure  # without pickling the TreeSpec (deprecated)


def test_inputs_structured_otherwise_are_refused_with_what_differs():
    structure = InputStructure.of((batch(0),))
    reordered = batch(1, order="label first")  # the same keys, built in another order: the same input
    label, mask, x = structure.flatten((reordered,))  # by sorted key
    assert label is reordered["label"] and mask is reordered["side"]["mask"] and x is reordered["x"]
    with pytest.raises(ValueError, match="not structured as the example inputs"):
        structure.flatten(({"x": torch.randn(2, 8)},))
    changed = batch(1)
    changed["side"]["scale"] = 3.0
    with pytest.raises(ValueError, match=r"non-tensor entry 2.0 .* gives 3.0"):
        structure.flatten((changed,))
    # a number or None among the positional inputs is held as a constant too (no exporter takes one)
    assert is_nested((batch(0),)) and is_nested((torch.randn(2), None, 3)) and not is_nested((torch.randn(2),))
    with pytest.raises(ValueError, match="hold no tensor"):
        flat_inputs(ReadsADict(), InputStructure.of(({"scale": 1.0},)))


def test_a_flat_model_takes_the_tensors_and_computes_what_the_model_does():
    torch.manual_seed(0)
    model, inputs = ReadsADict().eval(), (batch(0),)
    structure = InputStructure.of(inputs)
    flat = flat_inputs(model, structure)
    placeholders = torch.fx.symbolic_trace(flat).graph.find_nodes(op="placeholder")
    assert [p.name for p in placeholders] == ["input_0", "input_1", "input_2"]  # one per tensor, not one *args
    with torch.no_grad():
        expected = model(*inputs)
        assert torch.equal(flat(*structure.flatten(inputs)), expected)
        assert torch.equal(NestedInputs(flat, structure)(*inputs), expected)
    # the wrapper's class is built at run time: pickling (torch.save of a result) rebuilds it
    restored = pickle.loads(pickle.dumps(NestedInputs(flat, structure)))
    assert type(restored.model) is type(flat) and not restored.model.model.training
    with torch.no_grad():
        assert torch.equal(restored(*inputs), expected)


@pytest.mark.parametrize("approach", ["dynamic", "static"])
def test_a_model_of_dict_inputs_quantizes_on_every_backend_and_saves_a_file_of_its_tensors(approach, tmp_path):
    torch.manual_seed(0)
    model = ReadsADict().eval()
    batches = [batch(seed) for seed in range(4)]
    with torch.no_grad():
        references = [model(b) for b in batches]

    def error(candidate: nn.Module) -> float:  # called with the user's dicts, as the model is
        with torch.no_grad():
            return max(float((candidate(b) - r).abs().max()) for b, r in zip(batches, references))

    config = PTQConfig(approach=approach, max_trials=3, latency_repeats=2)
    result = quantize(model, config, eval_fn=lambda m: -error(m), calibration_data=batches,
                      input_fn=lambda b: (b,))
    built = {t.recipe.backend: t for t in result.trials if t.error is None}
    assert set(built) >= {"torch_ao", "onnxruntime", "pt2e"}, [t.error for t in result.trials]
    scale = max(float(r.abs().max()) for r in references)
    assert all(-t.metric < 0.1 * scale for t in built.values())
    assert any("takes containers or non-tensor values as inputs" in m for m in result.messages)
    assert error(result.model) < 0.1 * scale  # the result takes dicts too

    path = tmp_path / ("model" + (".onnx" if result.recipe.backend == "onnxruntime" else ".pt"))
    result.save(path)
    loaded, recipe = load_quantized(path)
    assert recipe == result.recipe
    structure = InputStructure.of((batches[0],))
    with torch.no_grad():  # the file takes the dict's tensors by sorted key: label (never read), mask, x
        torch.testing.assert_close(loaded(*structure.flatten((batches[1],))), result.model(batches[1]))


def _model_batches_and_agreement() -> tuple[nn.Module, list[dict], Callable[[nn.Module], float]]:
    """The model, four batches, and the share of the first batch on which a candidate predicts as the model does."""
    torch.manual_seed(0)
    model = ReadsADict().eval()
    batches = [batch(seed) for seed in range(4)]

    def agreement(candidate: nn.Module) -> float:
        with torch.no_grad():
            return float((candidate(batches[0]).argmax(1) == model(batches[0]).argmax(1)).float().mean())

    return model, batches, agreement


def test_the_pipeline_exports_a_model_of_dict_inputs_and_reads_its_file_back(tmp_path):
    model, batches, agreement = _model_batches_and_agreement()

    for quantize_config in (PTQConfig(backends=("onnxruntime",), max_trials=1), None):
        config = CompressionConfig(prune=None, quantize=quantize_config, latency_repeats=2)
        result = compress(model, config, eval_fn=agreement, example_inputs=(batches[0],), calibration_data=batches,
                          input_fn=lambda b: (b,), output_dir=tmp_path / str(quantize_config is None))
        final = result.report.stages[-1]
        assert "read back" in final.description and final.metric > 0.9
        assert result.artifact is not None and result.artifact.exists()


def test_a_dict_example_read_by_the_input_fn_given_where_its_keys_are_not_forwards_parameters(tmp_path):
    """forward(batch) takes the dict itself: example_inputs={"x": ..., ...} (not keyed by forward's parameters) is
    read by the input_fn given, as the batches are (it was refused with a hint to pass that input_fn), in quantize and
    in the pipeline alike; a tuple holding the dict is read as before."""
    model, batches, agreement = _model_batches_and_agreement()

    config = PTQConfig(backends=("onnxruntime",), max_trials=1, latency_repeats=2)
    outcomes = [quantize(model, config, eval_fn=agreement, calibration_data=batches, example_inputs=example,
                         input_fn=lambda b: (b,)) for example in (batches[0], (batches[0],))]
    assert [r.recipe for r in outcomes] == [outcomes[1].recipe] * 2 and outcomes[0].recipe is not None
    with torch.no_grad():
        assert torch.equal(outcomes[0].model(batches[1]), outcomes[1].model(batches[1]))
    result = compress(model, CompressionConfig(prune=None, quantize=config, latency_repeats=2), eval_fn=agreement,
                      example_inputs=batches[0], calibration_data=batches, input_fn=lambda b: (b,),
                      output_dir=tmp_path)
    assert result.report.stages[-1].metric > 0.9
    with pytest.raises(TypeError, match="pass input_fn="):  # without one, the dict's keys must name the parameters
        quantize(model, config, eval_fn=agreement, calibration_data=[(b,) for b in batches],
                 example_inputs=batches[0])


class DividedByATemperature(nn.Module):
    """``forward(x, temperature)``: a Python number among the positional inputs."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x, temperature):
        return self.head(torch.relu(self.fc(x))) / temperature


@pytest.mark.parametrize("approach", ["dynamic", "static"])
def test_a_positional_number_is_a_constant_of_the_quantized_model_and_its_file(approach, tmp_path):
    # Every backend failed on it ("'float' object has no attribute 'dim'", a "fixed batch dim"), the fp32 copy
    # came back, and saving that copy crashed.
    torch.manual_seed(0)
    model, x = DividedByATemperature().eval(), torch.randn(64, 8)
    with torch.no_grad():
        reference = model(x, 2.0)
    config = PTQConfig(approach=approach, max_trials=3, latency_repeats=2,
                       accuracy=AccuracyCriterion(1.0, relative=False))
    result = quantize(model, config, eval_fn=lambda m: -float((m(x, 2.0) - reference).abs().max()),
                      calibration_data=[(x, 2.0)], input_fn=lambda b: b)
    built = {t.recipe.backend for t in result.trials if t.error is None}
    assert built >= {"torch_ao", "onnxruntime", "pt2e"}, [t.error for t in result.trials]
    assert any("(2.0) are constants of the quantized model" in m for m in result.messages)
    with torch.no_grad():
        assert float((result.model(x, 2.0) - reference).abs().max()) < 0.1 * float(reference.abs().max())
        with pytest.raises(ValueError, match="non-tensor entry 2.0 of the example inputs"):
            result.model(x, 3.0)
    result.save(tmp_path / "model")
    saved = next(tmp_path.iterdir())
    loaded, _ = load_quantized(saved)
    with torch.no_grad():  # the file takes the tensor only
        torch.testing.assert_close(loaded(x[:5]), result.model(x[:5], 2.0), rtol=1e-4, atol=1e-4)


class ReadsADictWithASensitiveHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.h = nn.Linear(8, 32), nn.Linear(32, 3)
        with torch.no_grad():
            self.h.weight[0, 0] = 40.0  # int8 breaks it: the search keeps it fp32

    def forward(self, batch):
        return self.h(torch.relu(self.a(batch["x"]))) * batch["scale"]


def test_a_model_of_container_inputs_has_its_layers_named_as_it_names_them():
    """The search ran on a wrapper holding the model as `model`: the recipe said fp32=['model.h'] and the
    sensitivity line 'model.h=35.1', names the user's model (and QATConfig(fp32_layers=...) given them) lacks."""
    torch.manual_seed(0)
    model = ReadsADictWithASensitiveHead()
    torch.nn.utils.parametrizations.weight_norm(model.a)  # folded in the copy quantized: said by its tensor's name
    x, scale = torch.randn(128, 8), torch.rand(128, 1) + 0.5
    batches = [{"x": x[i:i + 32], "scale": scale[i:i + 32]} for i in range(0, 128, 32)]
    with torch.no_grad():
        reference = [model(batch) for batch in batches]

    def error(candidate):
        with torch.no_grad():
            return sum(float((candidate(b) - r).pow(2).mean()) for b, r in zip(batches, reference))

    result = quantize(model, PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=4, latency_repeats=2,
                                       accuracy=AccuracyCriterion(1e-9, relative=False, higher_is_better=False)),
                      eval_fn=error, calibration_data=[(b,) for b in batches], input_fn=lambda b: b)
    names = {name for name, _ in model.named_modules() if name}
    assert result.recipe is not None and result.recipe.fp32_layers == ("h",)
    assert all(set(t.recipe.fp32_layers) <= names for t in result.trials)
    ranked = next(m for m in result.messages if m.startswith("layer sensitivity"))
    assert "h=" in ranked and "model." not in ranked
    folded = next(m for m in result.messages if m.startswith("folded"))
    assert folded.endswith(": a.weight (_WeightNorm).")
