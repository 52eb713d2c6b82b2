"""Models that return dicts, tuples and lists of tensors (multi-task heads, Hugging Face style outputs).

Before, every ONNX Runtime candidate of such a model failed in the user's eval_fn (the file returned a flat tuple),
torch_ao's trace refused a dict, and layer sensitivity failed, so the search had one backend left.
"""

from __future__ import annotations

import json
from collections import OrderedDict, namedtuple
from dataclasses import dataclass
from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from litcompress.quantization import AccuracyCriterion, PTQConfig, load_quantized, quantize, save_quantized
from litcompress.quantization.outputs import output_structure, rebuild, tensor_leaves
from litcompress.quantization.sensitivity import layer_sensitivity

tensors = st.builds(lambda n, seed: torch.randn(n, 3, generator=torch.Generator().manual_seed(seed)),
                    st.integers(1, 4), st.integers(0, 1000))
@dataclass
class DataclassOutput:
    """A model output written as a dataclass (``return DataclassOutput(logits, hidden)``)."""

    logits: object
    hidden: object = None


outputs = st.recursive(
    st.one_of(tensors, st.none()),
    lambda children: st.one_of(st.lists(children, max_size=3), st.lists(children, max_size=3).map(tuple),
                               st.dictionaries(st.one_of(st.text(min_size=1, max_size=5), st.integers(0, 9)),
                                               children, max_size=3),
                               st.tuples(children, children).map(lambda pair: DataclassOutput(*pair))),
    max_leaves=8,
)


def same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a is b
    if a is None:
        return b is None
    if isinstance(a, DataclassOutput):
        return type(b) is DataclassOutput and same(a.logits, b.logits) and same(a.hidden, b.hidden)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


@settings(max_examples=60, deadline=None)
@given(outputs)
def test_an_output_is_rebuilt_from_its_json_structure_and_its_leaves(output):
    structure = json.loads(json.dumps(output_structure(output)))  # what a file's metadata keeps
    assert same(rebuild(structure, tensor_leaves(output)), output)


def test_a_leaf_that_is_not_a_tensor_is_named():
    with pytest.raises(TypeError, match=r"output\['aux'\]\[1\] is a str"):
        output_structure({"logits": torch.ones(1), "aux": (torch.ones(1), "note")})
    with pytest.raises(ValueError, match="more outputs"):
        rebuild("tensor", [torch.ones(1), torch.ones(1)])


class _MultiTask(nn.Module):
    def __init__(self, nested: bool = False, int_keys: bool = False):
        super().__init__()
        self.body, self.cls, self.reg = nn.Linear(32, 64), nn.Linear(64, 4), nn.Linear(64, 2)
        self.nested, self.int_keys = nested, int_keys

    def forward(self, x):
        features = torch.relu(self.body(x))
        if self.int_keys:  # keyed by task index, the classes' head second
            return {1: self.reg(features), 0: self.cls(features)}
        if self.nested:
            return {"logits": self.cls(features), "heads": (self.reg(features), [features])}
        return {"logits": self.cls(features), "box": self.reg(features)}


def _data(nested: bool = False, int_keys: bool = False):
    torch.manual_seed(0)
    model = _MultiTask(nested, int_keys).eval()
    x = torch.randn(256, 32)
    key = 0 if int_keys else "logits"
    labels = model(x)[key].argmax(1)

    def accuracy(candidate: nn.Module) -> float:
        with torch.no_grad():
            return (candidate(x)[key].argmax(1) == labels).float().mean().item()
    return model, x, accuracy


@pytest.mark.parametrize("approach", ["dynamic", "static"])
def test_a_model_returning_a_dict_quantizes_on_every_backend(approach):
    model, x, accuracy = _data()
    result = quantize(model, PTQConfig(approach=approach, backends=("torch_ao", "onnxruntime", "pt2e"),
                                       latency_repeats=3, max_trials=6),
                      eval_fn=accuracy, calibration_data=[x[i:i + 32] for i in range(0, 256, 32)],
                      example_inputs=x[:32])
    assert {t.recipe.backend for t in result.trials} == {"torch_ao", "onnxruntime", "pt2e"}
    assert all(t.error is None and t.metric > 0.9 for t in result.trials)
    assert not any("sensitivity failed" in m for m in result.messages)


@pytest.mark.parametrize(("backend", "nested", "int_keys"),
                         [("torch_ao", False, False), ("torch_ao", True, False), ("torch_ao", False, True),
                          ("onnxruntime", False, False), ("onnxruntime", True, False), ("onnxruntime", False, True),
                          ("pt2e", True, False), ("pt2e", False, True)])
def test_the_file_of_a_model_returning_a_dict_returns_the_dict(backend, nested, int_keys, tmp_path):
    """Dicts whose values are not all tensors (TorchScript types a dict by one value type) and dicts with int keys
    (TorchScript takes str keys only; the ONNX exporter made the key an output) are written as their tensors and
    rebuilt when read."""
    model, x, accuracy = _data(nested, int_keys)
    result = quantize(model, PTQConfig(approach="static", backends=(backend,), latency_repeats=3, max_trials=1),
                      eval_fn=accuracy, calibration_data=[x[:64]], example_inputs=x[:32])
    assert result.recipe is not None and result.recipe.backend == backend
    path = tmp_path / {"onnxruntime": "model.onnx", "torch_ao": "model.pt", "pt2e": "model.pt2"}[backend]
    result.save(path)
    loaded, _ = load_quantized(path)  # as in a fresh process: the structure comes from the file
    with torch.no_grad():
        expected, got = model(x[:7]), loaded(x[:7])  # a batch size the search never saw
    assert list(got) == list(expected)
    if nested:
        assert isinstance(got["heads"], tuple) and isinstance(got["heads"][1], list)
        assert got["heads"][1][0].shape == (7, 64)
    for leaf, reference in zip(tensor_leaves(got), tensor_leaves(expected), strict=True):
        assert (leaf - reference).abs().max() < 0.1 * reference.abs().max()




def test_layer_sensitivity_reads_every_tensor_of_a_dict_output():
    torch.manual_seed(0)
    model = _MultiTask(nested=True).eval()
    scores = layer_sensitivity(model, ["body", "cls", "reg"], [(torch.randn(32, 32),)], approach="dynamic")
    assert set(scores) == {"body", "cls", "reg"} and all(s > 10 for s in scores.values())
    # `reg` changes only the second head: an SQNR over the first tensor alone would call it harmless (inf)
    assert scores["reg"] != float("inf")


class Prediction(NamedTuple):
    logits: torch.Tensor
    box: torch.Tensor


class ModelOutput(OrderedDict):
    """Like Hugging Face's ModelOutput: a mapping whose entries are attributes too."""

    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self[name]
        except KeyError as error:
            raise AttributeError(name) from error


class _Named(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.body, self.cls, self.reg, self.kind = nn.Linear(32, 64), nn.Linear(64, 4), nn.Linear(64, 2), kind

    def forward(self, x):
        features = torch.relu(self.body(x))
        if self.kind == "namedtuple":
            return Prediction(self.cls(features), self.reg(features))
        return ModelOutput(logits=self.cls(features), box=self.reg(features))


@pytest.mark.parametrize("backend", ["onnxruntime", "torch_ao", "pt2e", "torchao"])
@pytest.mark.parametrize("kind", ["namedtuple", "model_output"])
def test_a_named_tuple_or_a_model_output_comes_back_as_its_class(kind, backend, tmp_path):
    """Only ONNX Runtime's file gave it back: torch_ao's returned a plain tuple or dict (`.logits` failed), and
    torch.export (pt2e, torchao) could not save a named tuple nor trace a ModelOutput (every trial failed)."""
    torch.manual_seed(0)
    model, x = _Named(kind).eval(), torch.randn(64, 32)
    labels = model(x).logits.argmax(1)

    def accuracy(candidate: nn.Module) -> float:  # reads the output by attribute, as Hugging Face code does
        with torch.no_grad():
            return (candidate(x).logits.argmax(1) == labels).float().mean().item()

    approach = "weight_only" if backend == "torchao" else "dynamic"
    result = quantize(model, PTQConfig(approach=approach, backends=(backend,), latency_repeats=3,
                                       max_trials=1), eval_fn=accuracy, example_inputs=x[:16])
    assert result.trials[0].error is None and result.metric > 0.9
    path = tmp_path / {"onnxruntime": "model.onnx", "torch_ao": "model.pt"}.get(backend, "model.pt2")
    result.save(path)
    loaded, _ = load_quantized(path)
    with torch.no_grad():
        expected = model(x[:5])
        for got in (result.model(x[:5]), loaded(x[:5])):
            assert type(got) is type(expected) and (got.box - expected.box).abs().max() < 0.1
    # a class that cannot be imported where the file is loaded leaves the plain structure
    structure = {"dict": [["logits", "tensor"]], "class": "no_such_module:Output"}
    assert rebuild(structure, [torch.ones(1)]).keys() == {"logits"}


def test_a_named_tuple_is_rebuilt_with_its_own_field_names_wherever_the_file_is_loaded():
    """Only the class's path was recorded: a script loading a file saved by another, each with its own `Out` of other
    fields, got the tensors poured into its `Out` by position (`.logits` held the features), and a fresh process
    without the class a plain tuple (`.logits` failed)."""
    saved = output_structure(Prediction(torch.zeros(1), torch.zeros(2)))
    assert saved["fields"] == list(Prediction._fields)
    logits, box = torch.ones(1), torch.full((2,), 2.0)
    assert type(rebuild(saved, [logits, box])) is Prediction  # the class where it is importable
    for where in ("no_such_module:Prediction", f"{__name__}:_OtherPrediction"):  # (another class of that name)
        got = rebuild({**saved, "class": where}, [logits, box])
        assert got._fields == Prediction._fields and got.logits is logits and got.box is box
    old = {key: value for key, value in saved.items() if key != "fields"}  # a file written before the names were
    assert type(rebuild({**old, "class": "no_such_module:Prediction"}, [logits, box])) is tuple


_OtherPrediction = namedtuple("Prediction", "box logits")  # another script's class of the same name


class _LogitsAndNone(nn.Module):
    """``return logits, None``: an auxiliary output present in training only (a loss, attention maps)."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(32, 64), nn.Linear(64, 4)

    def forward(self, x):
        return self.head(torch.relu(self.body(x))), None


class _ReturnsADataclass(_LogitsAndNone):
    def forward(self, x):
        hidden = torch.relu(self.body(x))
        return DataclassOutput(self.head(hidden), hidden)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch_ao", "pt2e", "torchao"])
@pytest.mark.parametrize("returns", ["logits and None", "a dataclass"])
def test_a_none_or_a_dataclass_output_comes_back_from_the_file(backend, returns, tmp_path):
    """ONNX Runtime failed on both ("output[1] is a NoneType, not a tensor"; "... is a DataclassOutput"), torch_ao's
    TorchScript trace too ("Only tensors, lists, tuples of tensors, or dictionary of tensors"), torch.export on the
    dataclass ("not a known type", in pt2e and in torchao's export check): the file now returns the tensors and the
    recorded structure rebuilds the output, in memory and from the file."""
    torch.manual_seed(0)
    model, x = (_LogitsAndNone() if returns == "logits and None" else _ReturnsADataclass()).eval(), torch.randn(64, 32)

    def logits(output):
        return output[0] if isinstance(output, tuple) else output.logits

    with torch.no_grad():
        reference = logits(model(x))
    approach = "weight_only" if backend == "torchao" else "static"
    result = quantize(model, PTQConfig(approach=approach, backends=(backend,), latency_repeats=2, max_trials=1),
                      eval_fn=lambda m: -float((logits(m(x)) - reference).abs().max()), calibration_data=[x])
    assert result.recipe is not None and result.recipe.backend == backend, [t.error for t in result.trials]
    path = tmp_path / {"onnxruntime": "model.onnx", "torch_ao": "model.pt"}.get(backend, "model.pt2")
    result.save(path)
    loaded, _ = load_quantized(path)
    with torch.no_grad():
        for got in (result.model(x[:5]), loaded(x[:5])):
            if returns == "logits and None":
                assert isinstance(got, tuple) and len(got) == 2 and got[1] is None
            else:
                assert type(got) is DataclassOutput and got.hidden.shape == (5, 64)
            assert (logits(got) - reference[:5]).abs().max() < 0.1 * reference.abs().max()


@pytest.mark.parametrize("fp32_format", ["export", "onnx", "torchscript"])
def test_an_fp32_file_of_a_model_returning_a_dataclass_returns_it(fp32_format, tmp_path):
    from litcompress.quantization import save_quantized

    torch.manual_seed(0)
    model, x = _ReturnsADataclass().eval(), torch.randn(8, 32)
    path = tmp_path / {"export": "model.pt2", "onnx": "model.onnx", "torchscript": "model.pt"}[fp32_format]
    save_quantized(model, None, path, (x,), fp32_format=fp32_format)
    loaded, recipe = load_quantized(path)
    with torch.no_grad():
        got, expected = loaded(x[:3]), model(x[:3])
    assert recipe is None and type(got) is DataclassOutput
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.hidden, expected.hidden, rtol=1e-4, atol=1e-5)


def _check_the_fp32_file_returns_what_the_model_does(model: nn.Module, x: torch.Tensor, fp32_format: str,
                                                     folder) -> None:
    """Saved from a batch of 32 rows, read back, run on 7: the same containers and keys, the same tensors."""
    path = folder / {"torchscript": "model.pt", "onnx": "model.onnx", "export": "model.pt2"}[fp32_format]
    save_quantized(model, None, path, x[:32], fp32_format=fp32_format)
    loaded, _ = load_quantized(path)
    with torch.no_grad():
        expected, got = model(x[:7]), loaded(x[:7])
    assert same_structure(got, expected)
    for leaf, reference in zip(tensor_leaves(got), tensor_leaves(expected), strict=True):
        torch.testing.assert_close(leaf, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fp32_format", ["torchscript", "onnx", "export"])
@pytest.mark.parametrize("int_keys", [False, True], ids=["mixed-values", "int-keys"])
def test_an_fp32_file_of_a_model_returning_a_dict_returns_the_dict(fp32_format, int_keys, tmp_path):
    model, x, _ = _data(nested=not int_keys, int_keys=int_keys)
    _check_the_fp32_file_returns_what_the_model_does(model, x, fp32_format, tmp_path)


def same_structure(a: object, b: object) -> bool:
    """Same containers, keys and tensor shapes (the leaves' values are compared apart)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape
    if a is None:
        return b is None
    if isinstance(a, DataclassOutput):
        return type(b) is DataclassOutput and same_structure(a.logits, b.logits) and same_structure(a.hidden, b.hidden)
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(same_structure(a[k], b[k]) for k in a)
    return type(a) is type(b) and len(a) == len(b) and all(same_structure(x, y) for x, y in zip(a, b))


_SHAPES = {  # outputs TorchScript cannot return as they are (a list or dict of several types, an empty container)
    "list-mixed": lambda a, b: [a, {"p": b}],
    "tuple-of-lists": lambda a, b: (a, [b, (a, b)]),
    "list-of-lists": lambda a, b: [[a], b],
    "list-of-dicts": lambda a, b: [{"p": a, "q": b}, {"p": b}],
    "empty-dict": lambda a, b: (a, {}),
    "empty-list": lambda a, b: (a, [], b),
}


class _Shaped(nn.Module):
    def __init__(self, shape: str) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(32, 16), nn.Linear(16, 4)
        self.shape = shape

    def forward(self, x):
        features = torch.relu(self.body(x))
        return _SHAPES[self.shape](self.head(features), features)


@pytest.mark.parametrize("fp32_format", ["torchscript", "onnx", "export"])
@pytest.mark.parametrize("shape", list(_SHAPES))
def test_an_fp32_file_returns_containers_of_several_types_and_empty_ones(shape, fp32_format, tmp_path):
    torch.manual_seed(0)
    _check_the_fp32_file_returns_what_the_model_does(_Shaped(shape).eval(), torch.randn(64, 32), fp32_format, tmp_path)


def test_torch_ao_quantizes_a_model_returning_a_list_of_dicts():
    torch.manual_seed(0)
    model, x = _Shaped("list-of-dicts").eval(), torch.randn(64, 32)
    labels = model(x)[0]["p"].argmax(1)

    def accuracy(candidate: nn.Module) -> float:
        with torch.no_grad():
            return (candidate(x)[0]["p"].argmax(1) == labels).float().mean().item()
    result = quantize(model, PTQConfig(approach="dynamic", backends=("torch_ao",), latency_repeats=2, max_trials=1,
                                       accuracy=AccuracyCriterion(0.2, relative=False)),
                      eval_fn=accuracy, example_inputs=x[:32])
    (trial,) = result.trials
    assert trial.error is None and result.recipe is not None


class _Returns(nn.Module):
    """Returns `structure` rebuilt from leaves computed from its input (x, 2x, 3x, ...)."""

    def __init__(self, structure, leaves: int) -> None:
        super().__init__()
        self.structure, self.leaves = structure, leaves

    def forward(self, x):
        return rebuild(self.structure, [x * (i + 1) for i in range(self.leaves)])


# containers of tensors only (a None or a dataclass anywhere sends the whole output through its tensors already)
plain_outputs = st.recursive(
    tensors,
    lambda children: st.one_of(st.lists(children, max_size=3), st.lists(children, max_size=3).map(tuple),
                               st.dictionaries(st.one_of(st.text(min_size=1, max_size=5), st.integers(0, 9)),
                                               children, max_size=3)),
    max_leaves=6,
)


@settings(max_examples=40, deadline=None)
@given(output=st.one_of(plain_outputs, outputs), fp32_format=st.sampled_from(["torchscript", "onnx"]))
def test_a_file_returns_any_output_structure(output, fp32_format, tmp_path_factory):
    """Whatever the nesting (tuples, lists and dicts of several types, int keys, empty containers, None, a
    dataclass), the file returns the model's output as it is, or rebuilt from its tensors."""
    leaves = len(tensor_leaves(output))
    if not leaves:
        return  # a file returns tensors; an output without any is no model's
    model = _Returns(json.loads(json.dumps(output_structure(output))), leaves)
    x = torch.randn(4, 3)
    path = tmp_path_factory.mktemp("out") / ("model.pt" if fp32_format == "torchscript" else "model.onnx")
    save_quantized(model, None, path, x, fp32_format=fp32_format)
    loaded, _ = load_quantized(path)
    y = torch.randn(6, 3)
    expected, got = model(y), loaded(y)
    assert same_structure(got, expected)
    for leaf, reference in zip(tensor_leaves(got), tensor_leaves(expected), strict=True):
        torch.testing.assert_close(leaf, reference)
