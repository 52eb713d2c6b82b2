"""Which TracerWarnings are passed on: those of data-dependent branches, not those of conditions guarding errors."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from litcompress.quantization.tracing import guards_an_error, tracer_warnings_that_matter


def test_guards_an_error_tells_shape_checks_from_data_dependent_branches(tmp_path):
    source = tmp_path / "code.py"
    source.write_text("if x.shape != y.shape:\n    raise AssertionError('no')\nassert x.numel() > 0\n"
                      "if h.sum() > 0:\n    h = h * 2\n")

    def caught(line):
        return warnings.WarningMessage("m", torch.jit.TracerWarning, str(source), line)

    assert [guards_an_error(caught(line)) for line in (1, 3, 4)] == [True, True, False]


class Branches(nn.Module):
    """One condition that guards an error and one that chooses what to compute."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:
            raise ValueError("too large")
        if x.mean() > 0:
            return x * 2
        return x


def test_only_the_warnings_of_data_dependent_branches_are_passed_on():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tracer_warnings_that_matter():
            torch.jit.trace(Branches(), (torch.ones(3),), check_trace=False)
            warnings.warn("something else", UserWarning)  # others inside the block are not passed on
    lines = [(w.category, w.lineno) for w in caught]
    branch = Branches.forward.__code__.co_firstlineno + 3  # the `if x.mean() > 0:` line
    assert lines == [(torch.jit.TracerWarning, branch)]
    # and torch's RNN shape checks (if ...: raise), which a bare trace warns about, are not
    for quiet in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with tracer_warnings_that_matter() if quiet else warnings.catch_warnings():
                torch.jit.trace(nn.LSTM(4, 4, batch_first=True), (torch.randn(2, 3, 4),), check_trace=False)
        assert any(issubclass(w.category, torch.jit.TracerWarning) for w in caught) != quiet


def _quantize_graph(scale_from_data: bool) -> torch.fx.GraphModule:
    """dequantize(quantize_per_tensor(x, scale, zero_point)), the scale an attribute (a constant) or computed from
    x (data), the zero point an attribute; as torch.ao's converted graphs call quantized ops."""
    root = nn.Module()
    root.register_buffer("scale", torch.tensor(0.1))
    root.register_buffer("zero_point", torch.tensor(128))
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    scale = graph.call_function(torch.ops.aten.mean.default, (x,)) if scale_from_data else graph.get_attr("scale")
    quantized = graph.call_function(torch.ops.aten.quantize_per_tensor.default,
                                    (x, scale, graph.get_attr("zero_point"), torch.quint8))
    graph.output(graph.call_method("dequantize", (quantized,)))
    return torch.fx.GraphModule(root, graph)


def test_an_ops_number_converted_from_a_constant_is_not_passed_on_one_from_data_is():
    """torch.ao's residual adds (quantized.add_relu(x, y, scale, zero_point), the scale an attribute) made every
    int8 ResNet's report say that its trace "might not generalize to other inputs"; a number from data still does."""
    from litcompress.quantization.tracing import numbers_read_from_constants

    for from_data in (False, True):
        model = _quantize_graph(from_data)
        constants = numbers_read_from_constants(model)
        assert constants is not from_data
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with tracer_warnings_that_matter(numbers_are_constants=constants):
                traced = torch.jit.trace(model, (torch.rand(3) + 1,), check_trace=False)
        conversions = [w for w in caught if "Converting a tensor to a Python" in str(w.message)]
        assert bool(conversions) is from_data
        x = torch.rand(3) + 1
        if not from_data:  # a constant is right for every input; a number from data is frozen at the example's
            torch.testing.assert_close(traced(x), model(x))
    assert not numbers_read_from_constants(Branches())  # no graph, nothing to vouch for


def test_an_int8_resnets_file_is_written_without_a_tracer_warning(tmp_path):
    from litcompress.models import ResNetClassifier
    from litcompress.quantization import PTQConfig, quantize

    torch.manual_seed(0)
    model, x = ResNetClassifier(image_size=8).eval(), torch.randn(8, 1, 8, 8)
    result = quantize(model, PTQConfig(approach="static", backends=("torch_ao",), max_trials=1, latency_repeats=3),
                      eval_fn=lambda m: 1.0, calibration_data=[x])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result.save(tmp_path / "model.pt")
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
