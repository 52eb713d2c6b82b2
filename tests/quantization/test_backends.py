"""Each backend on small real models: outputs close to fp32, fp32 layers honoured, input untouched."""

import copy
import warnings

import pytest
from hypothesis import given, settings, strategies as st
import torch
from torch import nn


from litcompress.quantization import Recipe, get_backend, sqnr_db
from litcompress.quantization.backends import quantizable_layers

from quant_helpers import quantized_layers, state_snapshot

BACKENDS = ["torch_ao", "onnxruntime", "pt2e"]


def _calibration(x, batch=64, batches=4):
    return [(x[i:i + batch],) for i in range(0, batch * batches, batch)]


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("approach", ["dynamic", "static"])
def test_int8_outputs_close_to_fp32_on_mlp_and_cnn(backend_name, approach, trained_mlp, trained_cnn, digits):
    x_train, _, x_test, y_test = digits
    model, shape = (trained_mlp, (-1, 64)) if approach == "dynamic" else (trained_cnn, (-1, 1, 8, 8))
    x_train, x_test = x_train.view(shape), x_test.view(shape)
    before = state_snapshot(model)
    backend = get_backend(backend_name)
    recipe = backend.recipes(approach)[0]
    quantized = backend.quantize(copy.deepcopy(model), recipe, (x_test[:1],), _calibration(x_train))
    with torch.no_grad():
        reference, output = model(x_test), quantized(x_test)
    assert output.shape == reference.shape
    assert sqnr_db(reference, output) > 20.0
    accuracy_fp32 = (reference.argmax(1) == y_test).float().mean()
    accuracy_int8 = (output.argmax(1) == y_test).float().mean()
    assert accuracy_int8 >= accuracy_fp32 - 0.03
    layers = quantizable_layers(model, approach)
    assert all(quantized_layers(quantized, backend_name, layers).values())
    after = state_snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_fp32_layers_stay_float_in_static_cnn(backend_name, trained_cnn, digits):
    x = digits[0].view(-1, 1, 8, 8)
    backend = get_backend(backend_name)
    recipe = backend.recipes("static")[0].with_fp32_layers(("conv1",))
    quantized = backend.quantize(copy.deepcopy(trained_cnn), recipe, (x[:1],), _calibration(x))
    flags = quantized_layers(quantized, backend_name, ["conv1", "conv2", "fc"])
    assert flags == {"conv1": False, "conv2": True, "fc": True}
    with torch.no_grad():
        assert sqnr_db(trained_cnn(x[:200]), quantized(x[:200])) > 20.0


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_fp32_layers_stay_float_in_dynamic_mlp(backend_name, trained_mlp, digits):
    x = digits[0]
    backend = get_backend(backend_name)
    recipe = backend.recipes("dynamic")[0].with_fp32_layers(("2",))
    quantized = backend.quantize(copy.deepcopy(trained_mlp), recipe, (x[:1],), _calibration(x))
    assert quantized_layers(quantized, backend_name, ["0", "2"]) == {"0": True, "2": False}


@pytest.mark.parametrize("backend_name", ["torch_ao", "onnxruntime"])
def test_calibration_knobs_give_different_valid_models(backend_name, trained_cnn, digits):
    x = digits[0].view(-1, 1, 8, 8)
    backend = get_backend(backend_name)
    outputs = []
    for recipe in backend.recipes("static"):
        quantized = backend.quantize(copy.deepcopy(trained_cnn), recipe, (x[:1],), _calibration(x))
        with torch.no_grad():
            outputs.append(quantized(x[:200]))
        assert sqnr_db(trained_cnn(x[:200]).detach(), outputs[-1]) > 15.0
    assert len(outputs) >= 2 and not torch.equal(outputs[0], outputs[1])


def test_per_tensor_recipe_is_a_real_knob(trained_mlp, digits):
    x = digits[0]
    backend = get_backend("torch_ao")
    per_channel, per_tensor = (backend.quantize(copy.deepcopy(trained_mlp), Recipe("torch_ao", "dynamic", per_channel=pc),
                                                (x[:1],), []) for pc in (True, False))
    assert per_channel[0].weight().qscheme() == torch.per_channel_affine
    assert per_tensor[0].weight().qscheme() == torch.per_tensor_affine


def test_onnx_export_leaves_the_users_module_untouched(trained_cnn, digits):
    from litcompress.quantization.backends.onnxruntime import export_onnx

    before = state_snapshot(trained_cnn)
    modules_before = [type(m) for m in trained_cnn.modules()]
    export_onnx(trained_cnn, (digits[0][:1].view(1, 1, 8, 8),))
    after = state_snapshot(trained_cnn)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in trained_cnn.modules()] == modules_before


def test_onnxruntime_module_survives_deepcopy(trained_mlp, digits):
    backend = get_backend("onnxruntime")
    quantized = backend.quantize(copy.deepcopy(trained_mlp), backend.recipes("dynamic")[0], (digits[0][:1],), [])
    clone = copy.deepcopy(quantized)
    assert torch.equal(clone(digits[2]), quantized(digits[2]))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["cnn", "pre-activation"])
def test_pt2e_compiled_matches_eager_converted(which, trained_cnn, digits):
    x = digits[0].view(-1, 1, 8, 8)
    model = trained_cnn if which == "cnn" else _trained_statistics(_PreActivation())  # its batch norms: mul + add
    backend = get_backend("pt2e")
    recipe = backend.recipes("static")[0]
    eager = backend.quantize(copy.deepcopy(model), recipe, (x[:32],), _calibration(x))
    backend.compile = True
    compiled = backend.quantize(copy.deepcopy(model), recipe, (x[:32],), _calibration(x))
    with torch.no_grad():
        assert sqnr_db(eager(x[:32]), compiled(x[:32])) > 25.0


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        return {"logits": y, "pair": (y * 2, y.argmax(1))}


def test_a_compiled_candidate_returns_tensors_of_every_output_as_the_eager_one_does_and_is_sized_once():
    """Only a bare tensor output was brought out of inference mode: a dict's tensors refused in-place ops and
    autograd ("Inplace update to inference tensor outside InferenceMode"); and the state dict held every tensor twice
    (the program, and the compiled wrapper's copy of it), which the search's sizes counted."""
    from litcompress.report.size import model_size_bytes

    torch.manual_seed(0)
    model, x = _TwoHeads().eval(), torch.randn(8, 16)
    backend = get_backend("pt2e")
    recipe = backend.recipes("dynamic")[0]
    eager = backend.quantize(copy.deepcopy(model), recipe, (x,), [(x,)])
    backend.compile = True
    try:
        compiled = backend.quantize(copy.deepcopy(model), recipe, (x,), [(x,)])
    finally:
        backend.compile = False
    out, reference = compiled(x), eager(x)
    leaves = [out["logits"], *out["pair"]]
    assert not any(t.is_inference() for t in leaves)
    torch.testing.assert_close(out["logits"], reference["logits"], rtol=1e-4, atol=1e-4)
    assert torch.equal(out["pair"][1], reference["pair"][1])
    out["logits"].add_(1)  # in place, and through autograd
    weight = torch.ones(4, requires_grad=True)
    (out["pair"][0] * weight).sum().backward()
    assert weight.grad is not None
    assert set(compiled.state_dict()) == set(eager.state_dict())
    assert model_size_bytes(compiled) == model_size_bytes(eager)
    # a copy is compiled too (deepcopy gave back the plain graph the compiled wrapper wraps: the copy ran uncompiled)
    copied = copy.deepcopy(compiled)
    assert type(copied._compiled).__name__ == "OptimizedModule" and copied._compiled._orig_mod is copied.program
    torch.testing.assert_close(copied(x)["logits"], reference["logits"], rtol=1e-4, atol=1e-4)


def test_compile_without_a_cpp_compiler_is_refused_before_any_work(trained_mlp, digits, tmp_path):
    """A pt2e search with PTQConfig(compile=True) calibrated and exported each candidate, then failed it in
    inductor's words (the search going on without pt2e); load_quantized(compile=True) failed at the first call."""
    import torch._inductor.config as inductor_config

    from litcompress.quantization import PTQConfig, load_quantized, quantize, save_quantized

    save_quantized(trained_mlp, None, tmp_path / "fp32.pt2", (digits[2][:2],))
    evaluated = []
    refusal = r"compile=True\): torch.compile's inductor needs a working C\+\+ compiler"
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/g++",)}):
        with pytest.raises(ValueError, match=r"PTQConfig\(" + refusal):
            quantize(trained_mlp, PTQConfig(backends=("pt2e", "torch_ao"), compile=True, max_trials=2),
                     eval_fn=lambda m: evaluated.append(m) or 1.0, example_inputs=digits[2][:2])
        with pytest.raises(ValueError, match=r"load_quantized\('.*fp32.pt2', " + refusal):
            load_quantized(tmp_path / "fp32.pt2", compile=True)
        # without pt2e among the backends nothing compiles: no compiler needed
        result = quantize(trained_mlp, PTQConfig(backends=("torch_ao",), compile=True, max_trials=1,
                                                 latency_repeats=2), eval_fn=lambda m: 1.0,
                          example_inputs=digits[2][:2])
    assert evaluated == [] and result.recipe is not None


class _PreActivation(nn.Module):
    """Batch norms prepare_pt2e cannot fold into a producer: after an addition (pre-activation ResNet) and after a
    concatenation (DenseNet-BC)."""

    def __init__(self, affine: bool = True, track_running_stats: bool = True):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
        self.norm_sum = nn.BatchNorm2d(4, affine=affine, track_running_stats=track_running_stats)
        self.norm_cat = nn.BatchNorm2d(8, affine=affine, track_running_stats=track_running_stats)
        self.head = nn.Linear(8, 3)
        self.norm_features = nn.BatchNorm1d(8, affine=affine, track_running_stats=track_running_stats)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        y = torch.cat([torch.relu(self.norm_sum(a + b)), a], dim=1)
        return self.head(torch.relu(self.norm_features(torch.relu(self.norm_cat(y)).mean((2, 3)))))


def _trained_statistics(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for module in model.modules():  # non-trivial statistics and affine parameters
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.affine:
                nn.init.uniform_(module.weight, 0.5, 2.0)
                nn.init.uniform_(module.bias, -1.0, 1.0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8) * 3 + 1)
    return model.eval()


@pytest.mark.parametrize("affine", [True, False])
def test_pt2e_batch_norms_left_by_prepare_become_the_same_affine_map(affine):
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    from litcompress.quantization.backends.pt2e import _fold_standalone_batch_norms_

    model = _trained_statistics(_PreActivation(affine=affine))
    x = torch.randn(4, 1, 8, 8)
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(torch.export.export(model, (x,)).module(), quantizer)

    def batch_norms():
        return [n for n in prepared.graph.nodes if "batch_norm" in str(n.target)]

    assert len(batch_norms()) == 3  # none follows a conv or Linear
    with torch.no_grad():
        before = prepared(x)
        assert _fold_standalone_batch_norms_(prepared) == 3
        assert batch_norms() == []
        torch.testing.assert_close(prepared(x), before, rtol=1e-5, atol=1e-5)


def test_pt2e_leaves_batch_norms_that_use_batch_statistics():
    from litcompress.quantization.backends.pt2e import _fold_standalone_batch_norms_

    model = _PreActivation(track_running_stats=False).eval()  # normalises by each batch's statistics, even in eval
    x = torch.randn(4, 1, 8, 8)
    graph = torch.export.export(model, (x,)).module()
    with torch.no_grad():
        before = graph(x)
        assert _fold_standalone_batch_norms_(graph) == 0
        torch.testing.assert_close(graph(x), before)


class _NormedHead(_PreActivation):
    """A batch norm straight into a Linear (no activation between), as in `out(bn(fc(x) + x))`."""

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        y = torch.cat([torch.relu(self.norm_sum(a + b)), a], dim=1)
        return self.head(self.norm_features(torch.relu(self.norm_cat(y)).mean((2, 3))))


@pytest.mark.parametrize("approach", ["static", "dynamic"])
@pytest.mark.parametrize("architecture", [_PreActivation, _NormedHead])
def test_pt2e_int8_of_a_pre_activation_model_tracks_fp32_and_round_trips(tmp_path, approach, architecture):
    """Dynamic: a Linear right after a folded batch norm kept its annotation keyed by the erased node, and
    convert_pt2e failed ("No chose qparams node found for linear"): no pt2e dynamic candidate for such models."""
    from litcompress.quantization import load_quantized, save_quantized

    model = _trained_statistics(architecture())
    calibration = [(torch.randn(16, 1, 8, 8) * 3 + 1,) for _ in range(4)]
    backend = get_backend("pt2e")
    recipe = backend.recipes(approach)[0]
    quantized = backend.quantize(copy.deepcopy(model), recipe, calibration[0], calibration)
    assert not [n for n in quantized.program.graph.nodes if "batch_norm" in str(n.target)]
    x = calibration[0][0]
    with torch.no_grad():
        assert sqnr_db(model(x), quantized(x)) > 20.0
        save_quantized(quantized, recipe, tmp_path / "model.pt2", (x,))
        loaded, loaded_recipe = load_quantized(tmp_path / "model.pt2")
        assert loaded_recipe == recipe
        torch.testing.assert_close(loaded(x), quantized(x))


class _ScaledByAnInput(nn.Module):
    """Divides by an input of one element that is no batch: ``torch.tensor([2.0])`` beside a batch of rows."""

    def __init__(self, features: int = 4) -> None:
        super().__init__()
        self.a = nn.Linear(16, features)

    def forward(self, x, temperature):
        return self.a(x) / temperature


@pytest.mark.parametrize(("backend_name", "approach"), [("pt2e", "dynamic"), ("pt2e", "static"),
                                                         ("torchao", "weight_only")])
def test_an_input_of_one_element_beside_a_batch_is_no_batch_to_double_for_the_export(backend_name, approach,
                                                                                      tmp_path):
    """It was doubled as a batch of 1 would be (to keep the batch free in the export), so the model met a
    temperature of two elements: every pt2e and torchao candidate failed (and so did saving the fp32 model)."""
    from litcompress.quantization import load_quantized, save_quantized

    torch.manual_seed(0)
    model = _ScaledByAnInput().eval()
    batches = [(torch.randn(8, 16), torch.tensor([2.0])) for _ in range(3)]
    backend = get_backend(backend_name)
    recipe = backend.recipes(approach)[0]
    quantized = backend.quantize(copy.deepcopy(model), recipe, batches[0], batches)
    x = torch.randn(5, 16)  # another batch size
    with torch.no_grad():
        assert sqnr_db(model(x, batches[0][1]), quantized(x, batches[0][1])) > 20.0
        save_quantized(quantized, recipe, tmp_path / "model.pt2", batches[0])
        loaded, _ = load_quantized(tmp_path / "model.pt2")
        torch.testing.assert_close(loaded(x, batches[0][1]), quantized(x, batches[0][1]))
        save_quantized(model, None, tmp_path / "fp32.pt2", batches[0])
        fp32, _ = load_quantized(tmp_path / "fp32.pt2")
        for inputs in ((x, batches[0][1]), batches[0]):  # another batch size, and the inputs it was saved with
            torch.testing.assert_close(fp32(*inputs), model(*inputs))
            torch.testing.assert_close(loaded(*inputs), quantized(*inputs))


def test_a_batch_of_one_shared_by_every_input_is_still_doubled_to_keep_the_batch_free(tmp_path):
    from litcompress.quantization import load_quantized, save_quantized
    from litcompress.quantization.backends.exported import export_inputs

    model = _ScaledByAnInput().eval()
    one = (torch.randn(1, 16), torch.ones(1, 1))
    assert [t.shape[0] for t in export_inputs(one, model)] == [2, 2]
    save_quantized(model, None, tmp_path / "fp32.pt2", one)
    loaded, _ = load_quantized(tmp_path / "fp32.pt2")
    x, temperature = torch.randn(6, 16), torch.rand(6, 1) + 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, temperature), model(x, temperature))
    # a one-element input that is no batch beside a batch of 1: the batch is doubled, the temperature left, and the
    # file takes other batch sizes (both were left at 1, and the file was silently fixed to a batch of 1)
    example = (torch.randn(1, 16), torch.tensor([2.0]))
    assert [t.shape[0] for t in export_inputs(example, model)] == [2, 1]
    save_quantized(model, None, tmp_path / "temperature.pt2", example)
    loaded, _ = load_quantized(tmp_path / "temperature.pt2")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, example[1]), model(x, example[1]))


@pytest.mark.parametrize("rows", [8, 1])
def test_a_temperature_that_broadcasts_only_by_chance_when_doubled_is_refused_not_saved_fixed(rows, tmp_path):
    """With 2 output features a doubled temperature broadcasts as a batch would: the program exported on it took a
    temperature of 2 elements only, and its file refused the very inputs it was saved with. Exported on the inputs
    as given, a temperature that stays 1 while the batch grows cannot be told from a batch the model fixes: refused
    in words, naming the input, rather than written so."""
    from litcompress.quantization import save_quantized
    from litcompress.quantization.backends import FixedDimError

    example = (torch.randn(rows, 16), torch.tensor([2.0]))
    with pytest.raises(FixedDimError, match=r"fixed dim 0 of input .*1 \(size 1\)"):  # (the batch of 1 with it)
        save_quantized(_ScaledByAnInput(2).eval(), None, tmp_path / "fp32.pt2", example)
    assert not (tmp_path / "fp32.pt2").exists()


class _UnrollsItsRows(nn.Module):
    """Runs a layer on each row of `x` in a Python loop: the export fixes x's rows, which the eager model does not."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, y):
        return torch.stack([self.lin(row) for row in x]).sum(0) + self.lin(y).mean(0)


def test_a_batch_the_export_fixes_while_the_eager_model_takes_others_is_refused(tmp_path):
    """A file of it would refuse other batch sizes the eager model takes."""
    from litcompress.quantization import save_quantized
    from litcompress.quantization.backends import FixedDimError

    with pytest.raises(FixedDimError, match=r"fixed dim 0 of input 0 \(size 3\)"):
        save_quantized(_UnrollsItsRows().eval(), None, tmp_path / "fp32.pt2", (torch.randn(3, 4), torch.randn(3, 4)))


class _Keys(nn.Module):
    """Scores a batch against a fixed table of keys: an input whose first dim is no batch."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)

    def forward(self, x, keys):
        return self.a(x) @ keys.T


@pytest.mark.parametrize(("backend_name", "approach"), [("pt2e", "dynamic"), ("torchao", "weight_only")])
def test_a_batch_of_one_beside_a_table_of_another_size_is_doubled_and_stays_free(backend_name, approach, tmp_path):
    """Doubling a batch of 1 was given up as soon as another input had another first dim (a table of 5 keys): the
    export fixed the batch at 1 and every export-based candidate failed."""
    from litcompress.quantization import load_quantized, save_quantized

    torch.manual_seed(0)
    model = _Keys().eval()
    example = (torch.randn(1, 16), torch.randn(5, 16))
    backend = get_backend(backend_name)
    recipe = backend.recipes(approach)[0]
    quantized = backend.quantize(copy.deepcopy(model), recipe, example, [example])
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert sqnr_db(model(x, example[1]), quantized(x, example[1])) > 20.0
        save_quantized(model, None, tmp_path / "fp32.pt2", example)
        fp32, _ = load_quantized(tmp_path / "fp32.pt2")
        torch.testing.assert_close(fp32(x, example[1]), model(x, example[1]))


def test_torchao_weight_only_close_to_fp32_and_honours_fp32_layers(trained_mlp, digits):
    x = digits[2]
    backend = get_backend("torchao")
    recipe = backend.recipes("weight_only")[0]
    quantized = backend.quantize(copy.deepcopy(trained_mlp), recipe, (x[:1],), [])
    with torch.no_grad():
        assert sqnr_db(trained_mlp(x), quantized(x)) > 30.0  # float activations: only weight rounding
    assert quantized_layers(quantized, "torchao", ["0", "2"]) == {"0": True, "2": True}
    partial = backend.quantize(copy.deepcopy(trained_mlp), recipe.with_fp32_layers(("0",)), (x[:1],), [])
    assert quantized_layers(partial, "torchao", ["0", "2"]) == {"0": False, "2": True}


@pytest.mark.parametrize("backend_name, approach", [("onnxruntime", "dynamic"), ("onnxruntime", "static"),
                                                    ("torchao", "weight_only")])
def test_quantizing_leaves_the_process_logging_and_compiler_settings_as_they_were(backend_name, approach,
                                                                                    trained_mlp, digits):
    """ORT's quantizer logs with the module-level logging.info, which gave a root logger without handlers one
    (the application's logging.basicConfig then did nothing); torchao's weight-only config turned on inductor's
    autotuning flags for every later torch.compile."""
    import logging

    import torch._inductor.config as inductor_config

    flags = ("coordinate_descent_tuning", "coordinate_descent_check_all_directions", "force_fuse_int_mm_with_mul")
    compiler_before = {flag: getattr(inductor_config, flag) for flag in flags}
    root = logging.getLogger()
    handlers = root.handlers[:]
    root.handlers.clear()  # as in an application that has not configured logging (pytest's capture has)
    try:
        backend = get_backend(backend_name)
        x = digits[2]
        backend.quantize(copy.deepcopy(trained_mlp), backend.recipes(approach)[0], (x[:1],), _calibration(x))
        assert root.handlers == []
    finally:
        root.handlers[:] = handlers
    assert {flag: getattr(inductor_config, flag) for flag in flags} == compiler_before


class GateViewedByItsShape(nn.Module):
    """A squeeze-and-excitation gate reshaped with arithmetic on its shape, ``g.view(g.shape + (1, 1))``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        g = torch.sigmoid(self.fc(h.mean((2, 3))))
        return self.head((h * g.view(g.shape + (1, 1))).mean((2, 3)))


def test_torch_ao_static_names_an_observer_placed_on_shape_arithmetic():
    """torch.ao observes the operator.add of a torch.Size, and its observer failed with a bare "'torch.Size' object
    has no attribute 'detach'" at every knob variant; it is said once, with the way round it, and the search leaves
    the backend for those that quantize the model."""
    from litcompress.quantization import PTQConfig, quantize
    from litcompress.quantization.backends import ExportError

    torch.manual_seed(0)
    model, x = GateViewedByItsShape().eval(), torch.randn(4, 3, 8, 8)
    backend = get_backend("torch_ao")
    with pytest.raises(ExportError, match=r"^torch_ao static: torch\.ao placed an observer on arithmetic of shapes or "
                                          r"sizes, which is no tensor \(AttributeError: 'torch\.Size' object"):
        backend.quantize(copy.deepcopy(model), backend.recipes("static")[0], (x[:2],), [(x,)])

    class ScaledByLengths(nn.Module):  # its own AttributeError on a list of lengths: as it is, not an observer's
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, h, lengths):
            return self.fc(h) * lengths.float().unsqueeze(1)

    with pytest.raises(AttributeError, match="^'list' object has no attribute 'float'$"):
        backend.quantize(ScaledByLengths().eval(), backend.recipes("static")[0], (torch.randn(4, 8), torch.ones(4)),
                         [(torch.randn(4, 8), [1.0, 2.0, 3.0, 4.0])])
    with torch.no_grad():
        reference = model(x)
    result = quantize(model, PTQConfig(approach="static", backends=("torch_ao", "onnxruntime"), max_trials=3,
                                       latency_repeats=1), eval_fn=lambda q: -float((q(x) - reference).pow(2).mean()),
                      calibration_data=[(x,)], example_inputs=x[:2])
    assert [t.recipe.backend for t in result.trials] == ["torch_ao", "onnxruntime", "onnxruntime"][:len(result.trials)]
    assert result.trials[0].error.startswith("torch_ao static: torch.ao placed an observer")
    assert result.recipe is not None and result.recipe.backend == "onnxruntime"


def test_backends_reject_approaches_they_do_not_have(trained_mlp, digits):
    with pytest.raises(ValueError, match="weight_only"):
        get_backend("torch_ao").quantize(copy.deepcopy(trained_mlp), Recipe("torch_ao", "weight_only"),
                                         (digits[2][:1],), [])


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), width=st.sampled_from([8, 32, 96]), per_channel=st.booleans())
def test_dynamic_int8_tracks_fp32_for_random_linears(seed, width, per_channel):
    """Property: for any random MLP, torch.ao dynamic int8 output stays within ~25 dB SQNR of fp32."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4)).eval()
    x = torch.randn(64, width)
    backend = get_backend("torch_ao")
    quantized = backend.quantize(copy.deepcopy(model), Recipe("torch_ao", "dynamic", per_channel=per_channel),
                                 (x[:1],), [])
    with torch.no_grad():
        assert sqnr_db(model(x), quantized(x)) > 25.0


def test_dynamic_int8_leaves_the_linears_of_torch_transformer_layers_in_fp32():
    """torch.ao's int8 Linear has a weight() method where the Transformer layers' fast-path checks and
    MultiheadAttention read a .weight tensor (pytorch/pytorch#109987): quantized, they fail at the first call."""
    from tests.pipeline.test_compress import RowTransformer

    torch.manual_seed(0)
    model = RowTransformer().eval()
    x = torch.randn(16, 64)
    quantized = get_backend("torch_ao").quantize(copy.deepcopy(model), Recipe("torch_ao", "dynamic"), (x[:1],), [])
    int8 = {name for name, m in quantized.named_modules() if type(m).__module__.startswith("torch.ao.nn.quantized")
            and not name.endswith("._packed_params")}
    assert int8 == {"embed", "head"}
    with torch.no_grad():  # the fused fast path (eval, no grad) and the plain one both run
        assert sqnr_db(model(x), quantized(x)) > 25.0
    assert sqnr_db(model(x).detach(), quantized(x).detach()) > 25.0


def test_dynamic_int8_covers_a_transformer_layer_whose_attention_shrink_narrowed():
    """An encoder layer holding a HeadPrunedAttention never takes its fused fast path: every Linear is called, so
    every Linear can be int8, the attention's projections included."""
    from litcompress import make_permanent_, shrink
    from litcompress.pruning import prune_heads_
    from tests.pipeline.test_compress import RowTransformer

    torch.manual_seed(0)
    model = RowTransformer().eval()
    x = torch.randn(16, 64)
    prune_heads_(model, 0.5)
    make_permanent_(model)
    narrowed = shrink(model, x).model
    quantized = get_backend("torch_ao").quantize(copy.deepcopy(narrowed), Recipe("torch_ao", "dynamic"), (x[:1],), [])
    int8 = {name for name, m in quantized.named_modules() if type(m).__module__.startswith("torch.ao.nn.quantized")
            and not name.endswith("._packed_params")}
    layers = [f"encoder.layers.{i}.{leaf}" for i in range(2)
              for leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                           "linear1", "linear2")]
    assert int8 == {"embed", "head", *layers}
    with torch.no_grad():
        assert sqnr_db(narrowed(x), quantized(x)) > 25.0


def test_weight_only_int8_leaves_the_linears_of_torch_attention_and_transformer_layers_in_fp32():
    """torchao's int8 weight is a tensor subclass that F.multi_head_attention_forward (out_proj.weight read as a
    tensor) cannot run; the other Linears, the gated feed-forward's among them, are quantized."""
    from litcompress.models import GatedTransformerClassifier
    from tests.pipeline.test_compress import RowTransformer

    torch.manual_seed(0)
    x = torch.randn(16, 64)
    for model, inputs in ((RowTransformer().eval(), x), (GatedTransformerClassifier().eval(), x.view(16, 1, 8, 8))):
        backend = get_backend("torchao")
        quantized = backend.quantize(copy.deepcopy(model), backend.recipes("weight_only")[0], (inputs[:1],), [])
        kept = {name for name, m in quantized.named_modules()
                if isinstance(m, nn.Linear) and type(m.weight) in (torch.Tensor, nn.Parameter)}
        attention = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)
                     and (".self_attn." in f".{name}." or ".attention." in f".{name}.")}
        assert attention and attention <= kept and kept != {n for n, m in model.named_modules()
                                                             if isinstance(m, nn.Linear)}
        with torch.no_grad():
            assert sqnr_db(model(inputs), quantized(inputs)) > 25.0


@given(scale=st.floats(1e-3, 1e3), noise=st.floats(1e-4, 1e-1))
def test_sqnr_is_scale_invariant_and_falls_with_noise(scale, noise):
    torch.manual_seed(0)
    signal = torch.randn(1000)
    perturbation = torch.randn(1000)
    small = sqnr_db(signal * scale, (signal + noise * perturbation) * scale)
    large = sqnr_db(signal * scale, (signal + 2 * noise * perturbation) * scale)
    assert sqnr_db(signal, signal) == float("inf")
    assert abs(small - sqnr_db(signal, signal + noise * perturbation)) < 1e-2
    assert large < small


@given(masked=st.lists(st.booleans(), min_size=8, max_size=8), noise=st.floats(1e-4, 1e-1))
def test_sqnr_of_outputs_with_equal_infinities_is_that_of_their_finite_entries(masked, noise):
    """Masked logits (-inf in both outputs) made the noise NaN (-inf - -inf), every layer's sensitivity NaN, and the
    search took the layers for ones quantization leaves unchanged: no fp32 fallback ran."""
    torch.manual_seed(0)
    reference, perturbation = torch.randn(50, 8), torch.randn(50, 8)
    approximation = reference + noise * perturbation
    where = torch.tensor(masked).expand(50, 8)
    expected = sqnr_db(reference[~where], approximation[~where]) if not all(masked) else float("inf")
    masked_reference = reference.masked_fill(where, float("-inf"))
    got = sqnr_db(masked_reference, approximation.masked_fill(where, float("-inf")))
    assert got == expected or abs(got - expected) < 1e-3 * max(1.0, abs(expected))
    assert sqnr_db(masked_reference, masked_reference) == float("inf")
    if any(masked):  # an infinity in one output only is infinite noise: the most sensitive
        assert sqnr_db(masked_reference, approximation) == float("-inf")


@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_exports_to_onnx_with_the_same_outputs(affine):
    # the legacy exporter has no aten::rms_norm at any opset: the copy it exports writes RMSNorm in plain ops
    from litcompress.models import GatedTransformerClassifier
    from litcompress.quantization.backends.onnxruntime import OnnxRuntimeModule, export_onnx

    torch.manual_seed(0)
    model = GatedTransformerClassifier().eval()
    model.norm = nn.RMSNorm(32, eps=1e-5, elementwise_affine=affine)
    for name, parameter in model.named_parameters():
        if "norm" in name:
            parameter.data.uniform_(0.5, 1.5)
    x = torch.rand(5, 1, 8, 8)
    runtime = OnnxRuntimeModule(export_onnx(model, (x[:2],)))  # exported at batch 2, run at 5
    with torch.no_grad():
        torch.testing.assert_close(runtime(x), model(x), rtol=1e-4, atol=1e-5)
    assert sum(isinstance(m, nn.RMSNorm) for m in model.modules()) == 5  # the user's model keeps its modules
    # the host's recipe: without VNNI, int8 products saturate unless the weights keep 7 bits (reduce_range)
    backend = get_backend("onnxruntime")
    quantized = backend.quantize(copy.deepcopy(model), backend.recipes("dynamic")[0], (x[:2],), [(x[:2],)])
    with torch.no_grad():
        assert sqnr_db(model(x), quantized(x)) > 20


class IgnoresItsFirstInput(nn.Module):
    """forward(mask, x) that never reads `mask` (in eval mode, say): the ONNX exporter leaves input_0 out."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize("approach", ["dynamic", "static"])
def test_onnxruntime_feeds_each_input_by_its_index_when_the_graph_reads_only_some(approach):
    """ORT's feed paired the graph's inputs with the model's in order: with input_0 left out, x went to nothing
    and the mask to input_1 (a shape error here; wrong outputs where the shapes agree)."""
    torch.manual_seed(0)
    model = IgnoresItsFirstInput().eval()
    batches = [(torch.ones(16, 3), torch.randn(16, 8)) for _ in range(4)]
    quantized = get_backend("onnxruntime").quantize(copy.deepcopy(model), next(iter(
        get_backend("onnxruntime").recipes(approach))), batches[0], batches)
    assert quantized.input_names == ["input_1"]
    with torch.no_grad():
        torch.testing.assert_close(quantized(*batches[1]), model(*batches[1]), atol=0.05, rtol=0.05)


class FlaggedCNN(nn.Module):
    """Forward takes flags besides its input, read by Python `if`s (a common user pattern): fx symbolised them
    (torch_ao static failed to trace) and the legacy ONNX exporter passed the keyword-only one by position."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16, 10)

    def forward(self, x, return_features=False, *, log_probs: bool = False):
        h = torch.flatten(nn.functional.max_pool2d(torch.relu(self.conv(x)), 2), 1)
        if return_features:
            return h
        logits = self.fc(h)
        return logits.log_softmax(1) if log_probs else logits


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("approach", ["dynamic", "static"])
def test_a_forward_with_flags_quantizes_on_every_backend_with_the_flags_at_their_defaults(backend_name, approach,
                                                                                           tmp_path):
    from litcompress.quantization import AccuracyCriterion, PTQConfig, load_quantized, quantize

    torch.manual_seed(0)
    model = FlaggedCNN().eval()
    x = torch.randn(256, 1, 8, 8)
    before = state_snapshot(model)
    config = PTQConfig(approach=approach, backends=(backend_name,), max_trials=1,
                       accuracy=AccuracyCriterion(tolerable_loss=0.1))
    with torch.no_grad():
        labels = model(x).argmax(1)
    result = quantize(model, config, eval_fn=lambda m: (m(x).argmax(1) == labels).float().mean().item(),
                      calibration_data=_calibration(x), example_inputs=x[:4])
    assert [trial.error for trial in result.trials] == [None]
    with torch.no_grad():
        reference, output = model(x), result.model(x)
    assert output.shape == reference.shape and sqnr_db(reference, output) > 20.0
    result.save(str(tmp_path / "model.int8"))
    loaded, _ = load_quantized(str(tmp_path / "model.int8"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x[:7]), result.model(x[:7]), atol=1e-4, rtol=1e-4)
    after = state_snapshot(model)
    assert type(model) is FlaggedCNN and all(torch.equal(before[k], after[k]) for k in before)


def test_taking_only_inputs_holds_defaults_and_leaves_forwards_without_extra_parameters_alone():
    from litcompress.quantization.tracing import taking_only_inputs_

    model = taking_only_inputs_(FlaggedCNN(), 1)
    assert type(model) is not FlaggedCNN and isinstance(model, FlaggedCNN) and type(model).__name__ == "FlaggedCNN"
    graph = torch.fx.symbolic_trace(model).graph
    assert [node.target for node in graph.nodes if node.op == "placeholder"] == ["x"]
    plain = nn.Linear(3, 2)
    assert type(taking_only_inputs_(plain, 1)) is nn.Linear   # nothing beyond its input
    assert type(taking_only_inputs_(FlaggedCNN(), 2)) is not FlaggedCNN  # the flag given: the keyword-only one held


class OptionalMask(nn.Module):
    """``forward(x, mask=None)`` called without a mask: fx took the ``mask is not None`` path (a Proxy is not None),
    so torch_ao's prepared model failed on the missing mask."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x, mask=None):
        h = torch.relu(self.a(x))
        return self.b(h if mask is None else h * mask)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_an_optional_input_left_out_of_the_example_inputs_is_held_at_its_default(backend_name):
    torch.manual_seed(0)
    model = OptionalMask().eval()
    x = torch.randn(256, 8)
    backend = get_backend(backend_name)
    quantized = backend.quantize(copy.deepcopy(model), backend.recipes("static")[0], (x[:4],), _calibration(x))
    with torch.no_grad():
        assert sqnr_db(model(x), quantized(x)) > 20.0


class Decoder(nn.Module):
    """A U-Net-style decoder: PReLU activations and ``ConvTranspose2d(c, c', 2, stride=2)`` upsampling. torch's int8
    kernels were wrong for both on x86: the transposed conv read memory it should not (other outputs on every call),
    PReLU's positive side was off, and with a per-channel weight observer torch.ao refused the transposed conv and
    failed on PReLU's weight."""

    def __init__(self):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.PReLU(16),
                                  nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.PReLU())
        self.up = nn.Sequential(nn.ConvTranspose2d(32, 16, 2, stride=2), nn.PReLU(16),
                                nn.ConvTranspose2d(16, 8, 2, stride=2), nn.ReLU(), nn.Conv2d(8, 1, 1))

    def forward(self, x):
        return self.up(self.down(x))


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_static_int8_of_a_decoder_with_transposed_convs_and_prelu_tracks_fp32_on_every_call(backend_name, tmp_path):
    from litcompress.quantization import load_quantized, save_quantized

    torch.manual_seed(0)
    model = Decoder().eval()
    x = torch.rand(96, 1, 16, 16)
    backend = get_backend(backend_name)
    for recipe in backend.recipes("static"):
        quantized = backend.quantize(copy.deepcopy(model), recipe, (x[:8],), _calibration(x, batch=32, batches=2))
        with torch.no_grad():
            reference, first, second = model(x[64:]), quantized(x[64:]), quantized(x[64:])
            rows = quantized(x[64:65])
        torch.testing.assert_close(second, first)
        torch.testing.assert_close(rows, first[:1])   # a row's output does not depend on the batch around it
        assert sqnr_db(reference, first) > 20.0, recipe.describe()
    path = tmp_path / f"decoder{backend.artifact_suffix}"
    save_quantized(quantized, recipe, path, (x[:8],))
    loaded, _ = load_quantized(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x[64:]), first, rtol=1e-4, atol=1e-4)


def test_a_model_that_answers_the_same_inputs_differently_is_named_as_such_not_as_a_fixed_dim():
    from litcompress.quantization.backends import ExportError, FixedDimError, check_free_dims

    model = nn.Linear(4, 3)
    x = torch.randn(5, 4)

    def unsteady(inputs):   # what torch's int8 ConvTranspose2d did: other values on every call
        return model(inputs) + torch.rand(1)

    unsteady_message = "other outputs on the same inputs from one call to the next.*no file can reproduce it"
    with pytest.raises(ExportError, match=unsteady_message) as caught:
        check_free_dims(unsteady, unsteady, (x,), None, "torch.jit.trace")
    assert not isinstance(caught.value, FixedDimError)
    with pytest.raises(FixedDimError, match="did not leave free dim 0"):   # a steady model whose file fixed the batch
        check_free_dims(model, lambda inputs: model(inputs)[:5], (x,), None, "torch.jit.trace")
    check_free_dims(model, model, (x,), None, "torch.jit.trace")

    def steady_on_the_example(inputs):  # a model whose inputs' rows must differ: a repeated one is no input it takes
        return model(inputs) + (torch.rand(1) if len(inputs) != len(x) else 0)

    check_free_dims(steady_on_the_example, steady_on_the_example, (x,), None, "torch.jit.trace")  # a variant it
    # does not take checks nothing


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class _NestedSequenceModel(nn.Module):
    """Linear layers nested in a container, on (batch, tokens, features): ONNX renames their transposed weights."""

    def __init__(self):
        super().__init__()
        self.blocks, self.head = nn.Sequential(_Block(), _Block()), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.blocks(x))


@pytest.mark.parametrize("approach", ["dynamic", "static"])
def test_onnxruntime_keeps_nested_fp32_layers_float(approach):
    # Nested layers' nodes ("/blocks/blocks.1/fc1/MatMul") were not matched: only their bias Adds stayed float, so a
    # recipe (and the search's trial table) listed fp32 layers that ran int8.
    torch.manual_seed(0)
    model, x = _NestedSequenceModel().eval(), torch.randn(8, 6, 16)
    backend = get_backend("onnxruntime")
    layers = ("blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head")
    recipe = Recipe("onnxruntime", approach, fp32_layers=layers)
    every_layer_fp32 = backend.quantize(copy.deepcopy(model), recipe, (x[:2],), [(x,)])
    with torch.no_grad():
        torch.testing.assert_close(every_layer_fp32(x), model(x), rtol=1e-5, atol=1e-5)
    # a container's name keeps every layer inside it float, and only those
    one_block = backend.quantize(copy.deepcopy(model), recipe.with_fp32_layers(("blocks.1",)), (x[:2],), [(x,)])
    assert _onnx_int8_layers(one_block, [n for n, _ in model.named_modules()]) == {"blocks.0.fc1", "blocks.0.fc2",
                                                                                  "head"}


def _onnx_int8_layers(quantized, module_names) -> set[str]:
    """The torch modules whose matrix products ORT runs in int8 (dynamic integer ops, or static QDQ weights)."""
    import onnx

    from litcompress.quantization.backends.onnxruntime import _scope_candidates

    graph = onnx.load_from_string(quantized.model_bytes).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {min(_scope_candidates(n.name, module_names)) for n in graph.node
            if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")
            or (n.op_type in ("MatMul", "Gemm") and all(i in dequantized for i in n.input[:2]))}


class _MLPBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.heads = nn.ModuleDict({"cls": nn.Linear(16, 16)})

    def forward(self, x):
        return self.heads["cls"](x + self.mlp(x))


class _BlocksNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks, self.head = nn.ModuleList([_MLPBlock()]), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.blocks[0](x).mean(1))


@pytest.mark.parametrize("approach", ["dynamic", "static"])
def test_onnxruntime_keeps_layers_of_containers_inside_blocks_fp32(approach):
    """The exporter names a container's child relative to the module above the container ("mlp.0" in blocks.0.mlp.0)
    and a ModuleDict's child by its key ("cls"): those layers, MatMuls over (batch, tokens, features), stayed int8
    under a recipe naming them fp32, and the search's fallback trials changed nothing."""
    torch.manual_seed(0)
    model = _BlocksNet().eval()
    x = torch.randn(8, 10, 16)
    names = [n for n, _ in model.named_modules()]
    backend = get_backend("onnxruntime")
    recipe = next(r for r in backend.recipes(approach))
    every = backend.quantize(copy.deepcopy(model), recipe, (x[:2],), [(x,)])
    assert {"blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.0.heads.cls"} <= _onnx_int8_layers(every, names)
    kept = ("blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.0.heads.cls")
    fallback = backend.quantize(copy.deepcopy(model), recipe.with_fp32_layers(kept), (x[:2],), [(x,)])
    assert not set(kept) & _onnx_int8_layers(fallback, names)


class _TwoDictsBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.heads, self.aux = nn.ModuleDict({"cls": nn.Linear(16, 16)}), nn.ModuleDict({"cls": nn.Linear(16, 16)})

    def forward(self, x):
        return self.heads["cls"](self.aux["cls"](x))


def test_onnxruntime_an_fp32_layer_whose_scope_name_two_modules_share_keeps_its_nodes_fp32():
    """Two ModuleDicts with a "cls" each export as scopes "cls" and "cls_1": "cls" went to the first such module
    whatever was called, "cls_1" to none, so naming one layer fp32 left its MatMul int8 (and kept another's)."""
    import onnx

    from litcompress.quantization.backends.onnxruntime import _nodes_of_layers, export_onnx_with_structure

    model = nn.Sequential(_TwoDictsBlock()).eval()
    onnx_bytes, _ = export_onnx_with_structure(model, (torch.randn(2, 5, 16),))  # (3-d: MatMul, named by scope)
    graph = onnx.load_from_string(onnx_bytes)
    names = [n for n, _ in model.named_modules()]
    products = {n.name for n in graph.graph.node if n.op_type == "MatMul"}
    assert len(products) == 2
    for layer in ("0.heads.cls", "0.aux.cls"):
        assert products <= set(_nodes_of_layers(graph, [layer], names))  # the one named among them, on the safe side


def test_onnxruntime_fp32_layer_names_match_one_module_not_every_leaf_of_that_name():
    import onnx

    from litcompress.quantization.backends.onnxruntime import _nodes_of_layers, export_onnx_with_structure

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return torch.relu(self.fc(x))

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.fc = Inner(), nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(self.block(x))

    model = Outer().eval()
    onnx_bytes, _ = export_onnx_with_structure(model, (torch.randn(2, 16),))
    graph = onnx.load_from_string(onnx_bytes)
    names = [n for n, _ in model.named_modules()]
    top, nested = _nodes_of_layers(graph, ["fc"], names), _nodes_of_layers(graph, ["block.fc"], names)
    assert top and nested and not set(top) & set(nested)  # 'fc' took '/block/fc/Gemm' too


@pytest.mark.parametrize("backend", ["torch_ao", "onnxruntime", "pt2e"])
def test_dynamic_int8_leaves_convolutions_fp32_so_every_quantized_layer_can_fall_back(backend):
    """pt2e's dynamic recipe quantized convolutions too (a global config), which the search's fp32 fallback, knowing
    dynamic int8 as Linear layers', could never return to fp32: with every layer it knows in fp32 the outputs still
    differed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)).eval()
    x = torch.randn(32, 1, 8, 8)
    known = quantizable_layers(model, "dynamic")
    assert known == ["3"]
    implementation = get_backend(backend)
    recipe = implementation.recipes("dynamic")[0]
    quantized = implementation.quantize(copy.deepcopy(model), recipe, (x,), [(x,)])
    everything_fp32 = implementation.quantize(copy.deepcopy(model), recipe.with_fp32_layers(tuple(known)), (x,), [(x,)])
    with torch.no_grad():
        assert not torch.allclose(quantized(x), model(x), atol=1e-6)  # the Linear layer was quantized
        torch.testing.assert_close(everything_fp32(x), model(x), rtol=1e-5, atol=1e-5)


def test_an_onnx_runtime_model_refuses_inputs_beyond_those_of_its_example(tmp_path):
    """A flag passed explicitly (model(x, True)) was dropped: the file returned the default's output structure, where
    the fp32 model returned a tuple (pt2e refuses such a call, torch_ao honours it). The file read back refuses it
    too."""
    from litcompress.quantization import AccuracyCriterion, PTQConfig, load_quantized, quantize

    torch.manual_seed(0)
    model = OptionalMask().eval()
    x, mask = torch.randn(64, 8), torch.ones(64, 16)
    backend = get_backend("onnxruntime")
    quantized = backend.quantize(copy.deepcopy(model), backend.recipes("dynamic")[0], (x[:4],), [(x[:16],)])
    with pytest.raises(TypeError, match=r"takes 1 positional input\(s\), those of its example, and was given 2"):
        quantized(x, mask)
    result = quantize(model, PTQConfig(approach="dynamic", backends=("onnxruntime",), latency_repeats=2,
                                       accuracy=AccuracyCriterion(tolerable_loss=1.0)), eval_fn=lambda m: 1.0,
                      example_inputs=(x[:4],))
    result.save(tmp_path / "m.onnx")
    loaded, _ = load_quantized(tmp_path / "m.onnx")
    assert loaded(x).shape == model(x).shape
    with pytest.raises(TypeError, match="and was given 2"):
        loaded(x, mask)


class _SummedBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(100, 16, mode="sum")
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.bag(x))


class _Residual(nn.Module):
    """Functional ops between the layers: torch.ao ties their qconfig to the calling module, not to a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) + x


class _MethodsBlock(nn.Module):
    """Tensor methods (transpose, mean, sigmoid) between the layers, which torch.ao quantizes with no per-call
    qconfig."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.conv, self.head = nn.Linear(16, 16), nn.Conv1d(16, 16, 1), nn.Linear(16, 3)

    def forward(self, h):
        pooled = self.conv(h).transpose(1, 2).mean(1)
        return self.head(torch.relu(self.fc(pooled)) + pooled.sigmoid())


class _CatNorm(nn.Module):
    """Two branches concatenated, then a LayerNorm (a module with parameters, but no layer of the fallback's)."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right, self.norm = nn.Linear(8, 8), nn.Linear(8, 8), nn.LayerNorm(16)
        self.act, self.out = nn.ReLU(), nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.act(self.norm(torch.cat([self.left(x), self.right(x)], 1))))


class _ReluReadTwice(nn.Module):
    """An op on the input read by a layer and by the add that reads that layer: each can run fp32 only with the
    other."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)

    def forward(self, x):
        h = torch.relu(x)
        return self.a(h) + h


class _AttentionBlock(nn.Module):
    """A residual add reading an nn.MultiheadAttention, which torch.ao's static int8 leaves fp32 (its output is no
    int8 value)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.attention, self.head = nn.Linear(4, 16), nn.MultiheadAttention(16, 2, batch_first=True), \
            nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attention(h, h, h, need_weights=False)[0]
        return self.head(h.mean(1))


class _SharedNorm(nn.Module):
    """One LayerNorm module called on two branches (convert swaps the module for all its calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.norm, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 4)

    def forward(self, x):
        return self.c(self.norm(self.a(x)) * self.norm(self.b(x)))


_LAYER_KINDS = {
    "shared-norm": (_SharedNorm, lambda: torch.randn(32, 16), "static"),
    "relu-read-twice": (_ReluReadTwice, lambda: torch.randn(32, 16), "static"),
    "residual": (_Residual, lambda: torch.randn(32, 16), "static"),
    "methods": (_MethodsBlock, lambda: torch.randn(8, 16, 6), "static"),
    "cat-norm": (_CatNorm, lambda: torch.randn(32, 8), "static"),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(4, 8, 3), nn.Conv1d(8, 4, 3)), lambda: torch.randn(8, 4, 16),
               "static"),
    "conv1d-relu": (lambda: nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Conv1d(8, 4, 3), nn.ReLU()),
                    lambda: torch.randn(8, 4, 16), "static"),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(4, 8, 3), nn.ReLU(), nn.Conv3d(8, 4, 3)),
               lambda: torch.randn(8, 4, 6, 6, 6), "static"),
    "embedding-bag": (_SummedBag, lambda: torch.randint(0, 100, (8, 5)), "dynamic"),
}


@pytest.mark.parametrize("kind", list(_LAYER_KINDS))
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_the_layers_a_backend_names_as_quantizable_are_the_ones_it_quantizes(backend_name, kind, request):
    """pt2e named Conv3d layers (which X86InductorQuantizer leaves fp32) and ONNX Runtime an EmbeddingBag (a Loop of
    Gathers its dynamic quantizer does not reach) as quantizable: a model of them came back fp32 under an int8 recipe,
    and a fallback "kept" them in fp32 to no effect. pt2e quantized a Conv1d followed by a ReLU without naming it,
    so that no fallback could return it to fp32. torch.ao's static int8 kept the ops between layers it was told to
    keep fp32 (a ReLU, a residual add, a transpose, a sigmoid) int8: a residual block with both Linears in fp32 was
    0.028 from the fp32 outputs. Each named layer is int8, with every other in fp32 too; all of them in fp32 is the fp32
    model."""
    if (backend_name, kind) == ("pt2e", "shared-norm"):
        request.applymarker(pytest.mark.xfail(strict=True, reason="pt2e's quantizer keeps a mul of two fp32 layers' "
                                              "values int8 (quantize/dequantize pairs on its inputs)"))
    build, inputs, approach = _LAYER_KINDS[kind]
    torch.manual_seed(0)
    model, x = build().eval(), inputs()
    backend = get_backend(backend_name)
    layers = backend.quantizable_layers(model, approach)
    recipe = backend.recipes(approach)[0]
    if layers:
        quantized = backend.quantize(copy.deepcopy(model), recipe, (x,), [(x,)])
        assert all(quantized_layers(quantized, backend_name, layers).values())
        for layer in layers if len(layers) > 1 else ():
            others = tuple(name for name in layers if name != layer)
            alone = backend.quantize(copy.deepcopy(model), recipe.with_fp32_layers(others), (x,), [(x,)])
            assert quantized_layers(alone, backend_name, layers) == {name: name == layer for name in layers}
    everything_fp32 = backend.quantize(copy.deepcopy(model), recipe.with_fp32_layers(tuple(layers)), (x,), [(x,)])
    with torch.no_grad():
        torch.testing.assert_close(everything_fp32(x), model(x), rtol=1e-5, atol=1e-5)


class _SigmoidIntoAdd(nn.Module):
    """A layer's output read by a tensor method whose result an int8 add reads."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        with torch.no_grad():
            self.a.weight.mul_(4)  # outputs well outside [0, 1]

    def forward(self, x):
        return self.c(self.b(x) + self.a(x).sigmoid())


def test_torch_ao_static_a_method_reading_a_layer_kept_fp32_reads_its_fp32_values():
    """torch.ao quantized the method's input at the sigmoid's fixed output scale, clipping the fp32 layer's outputs
    to [0, 1]: keeping that layer fp32 made the model 20x further from fp32 than all-int8 (0.55 against 0.027)."""
    torch.manual_seed(0)
    model, x = _SigmoidIntoAdd().eval(), torch.randn(64, 16)
    backend = get_backend("torch_ao")
    recipe = backend.recipes("static")[0]
    with torch.no_grad():
        expected = model(x)
        errors = {kept: float((backend.quantize(copy.deepcopy(model), recipe.with_fp32_layers(kept), (x,), [(x,)])(x)
                               - expected).abs().max()) for kept in [(), ("a",)]}
    assert errors[("a",)] <= errors[()]


class _ViewFlattened(nn.Module):
    """The classic classifier: ``x.view(x.size(0), -1)`` of a convolution's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.size(0), -1))


def test_torch_ao_static_quantizes_a_view_of_an_int8_convolutions_output():
    """torch.ao's int8 convolution returns a channels-last tensor, which view cannot flatten: every static candidate
    of such a model failed ("view size is not compatible with input tensor's size and stride")."""
    torch.manual_seed(0)
    model, x = _ViewFlattened().eval(), torch.randn(16, 3, 4, 4)
    backend = get_backend("torch_ao")
    quantized = backend.quantize(copy.deepcopy(model), backend.recipes("static")[0], (x,), [(x,)])
    assert all(quantized_layers(quantized, "torch_ao", ["conv", "fc"]).values())
    with torch.no_grad():
        assert sqnr_db(model(x), quantized(x)) > 25.0
        torch.testing.assert_close(backend.timed_form(quantized, (x,))(x), quantized(x))


@pytest.mark.parametrize(("backend_name", "approach"), [("torch_ao", "static"), ("pt2e", "static"),
                                                         ("pt2e", "dynamic")])
def test_an_attention_left_fp32_is_no_layer_to_fall_back_and_an_add_beside_it_goes_fp32(backend_name, approach):
    """torch.ao's static int8 has no kernel for nn.MultiheadAttention: its output is fp32, and the residual add reading
    it and an fp32 layer's output is fp32 too when every layer is (it was read as int8, and every block's add stayed
    quantized: 0.012 from the fp32 outputs). pt2e named the attention's out_proj as quantizable, which it leaves fp32
    (the attention reads its weight): a fallback "kept" it fp32 to no effect."""
    torch.manual_seed(0)
    model, x = _AttentionBlock().eval(), torch.randn(8, 5, 4)
    backend = get_backend(backend_name)
    layers = backend.quantizable_layers(model, approach)
    assert layers == ["embed", "head"]
    recipe = backend.recipes(approach)[0]
    assert all(quantized_layers(backend.quantize(copy.deepcopy(model), recipe, (x,), [(x,)]), backend_name,
                                layers).values())
    everything_fp32 = backend.quantize(copy.deepcopy(model), recipe.with_fp32_layers(tuple(layers)), (x,), [(x,)])
    head_alone = backend.quantize(copy.deepcopy(model), recipe.with_fp32_layers(("embed",)), (x,), [(x,)])
    assert quantized_layers(head_alone, backend_name, layers) == {"embed": False, "head": True}
    with torch.no_grad():
        torch.testing.assert_close(everything_fp32(x), model(x), rtol=1e-5, atol=1e-5)


def test_torch_ao_static_offers_no_layer_inside_a_module_fx_calls_as_one():
    """FX calls torch.nn's TransformerEncoderLayer as one op, so static int8 never reaches its Linear layers: the
    search offered them as fp32 fallbacks, trials that built the same model under a recipe naming them fp32."""
    class Encoded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 16)
            self.enc = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.enc(self.proj(x)).mean(1))

    model = Encoded().eval()
    assert get_backend("torch_ao").quantizable_layers(model, "static") == ["proj", "head"]
    model.body = nn.Module()  # a bare holder, never called: FX reaches its layers one by one
    model.body.fc = nn.Linear(16, 16)
    assert get_backend("torch_ao").quantizable_layers(model, "static") == ["proj", "head", "body.fc"]
    assert {"enc.linear1", "enc.linear2"} <= set(get_backend("pt2e").quantizable_layers(model, "static"))  # traced in


class _DecoderWithModuleActivation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, activation=nn.Sigmoid(), batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.layer(x, x))


@pytest.mark.parametrize("backend, approach", [("torch_ao", "dynamic"), ("onnxruntime", "static"),
                                               ("pt2e", "dynamic")])
def test_int8_models_of_a_decoder_layer_with_a_module_activation_keep_that_activation(backend, approach, tmp_path):
    """Each candidate was quantized from a deep copy, in which torch's `TransformerDecoderLayer.__setstate__` puts
    `F.relu` over a module activation: every backend's int8 model was 0.23 off (10x its int8 error) and the tuner
    judged those."""
    from litcompress.quantization import PTQConfig, load_quantized, quantize

    torch.manual_seed(0)
    model = _DecoderWithModuleActivation().eval()
    x = torch.randn(8, 5, 16)
    with torch.no_grad():
        expected = model(x)
    config = PTQConfig(approach=approach, backends=(backend,), max_trials=1, latency_repeats=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a tiny model: int8 is slower here, which is said)
        result = quantize(model, config, eval_fn=lambda m: -float((m(x) - expected).abs().max()),
                          example_inputs=x[:2], calibration_data=[x])
        assert result.recipe is not None and result.recipe.backend == backend
        result.save(tmp_path / f"model{get_backend(backend).artifact_suffix}")
    loaded, _ = load_quantized(next(tmp_path.iterdir()))
    with torch.no_grad():
        for int8 in (result.model, loaded):
            assert (int8(x) - expected).abs().max() < 0.08  # int8 error ~0.01-0.03; the ReLU's 0.23


class _MaskedSum(nn.Module):
    """Multiplies its hidden features by a bool (batch, tokens) mask: an int8 op reads a non-float input."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)) * mask.unsqueeze(-1)).sum(1)


class _MasksItsInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x * mask))).sum(1)  # (an int8 mul: pt2e observes both its inputs)


@pytest.mark.parametrize("backend_name, model_class, mask_shape", [("torch_ao", _MaskedSum, (8, 5)),
                                                                   ("pt2e", _MasksItsInputs, (8, 5, 8))])
def test_static_int8_on_a_model_whose_int8_op_reads_a_bool_input_is_left_once_naming_it(backend_name, model_class,
                                                                                         mask_shape):
    """Each knob variant failed on its own in torch's words ("Quantize only works on Float Tensor, got Bool",
    '"linspace_cpu" not implemented for Bool'), using up max_trials; ONNX Runtime's static int8 takes the model."""
    from litcompress.quantization import AccuracyCriterion, PTQConfig, quantize

    torch.manual_seed(0)
    model = model_class().eval()
    batches = [(torch.randn(8, 5, 8), torch.rand(mask_shape) > 0.5) for _ in range(3)]
    config = PTQConfig(approach="static", backends=(backend_name, "onnxruntime"), max_trials=4, latency_repeats=2,
                       accuracy=AccuracyCriterion(tolerable_loss=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = quantize(model, config, eval_fn=lambda m: 1.0, calibration_data=batches,
                          example_inputs=batches[0])
    failed = [t for t in result.trials if t.recipe.backend == backend_name]
    assert len(failed) == 1 and failed[0].error.startswith(
        f"{backend_name} static: an int8 op reads a tensor that is not float") and \
        f"such as the model's input 1 (bool {mask_shape})" in failed[0].error
    assert result.recipe is not None and result.recipe.backend == "onnxruntime"
    with torch.no_grad():
        assert sqnr_db(model(*batches[1]), result.model(*batches[1])) > 15.0


class _MasksByASign(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) * (x > 0))  # a bool the forward computes, read by an int8 mul


@pytest.mark.parametrize("backend_name", ["torch_ao", "pt2e"])
def test_a_computed_bool_read_by_an_int8_op_is_said_once_and_the_backend_left(backend_name):
    """A model of float inputs only: every knob variant failed in torch's words ("Quantize only works on Float Tensor,
    got Bool")."""
    from litcompress.quantization import PTQConfig, quantize

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = quantize(_MasksByASign().eval(), PTQConfig(approach="static", backends=(backend_name,), max_trials=3),
                          eval_fn=lambda m: 1.0, calibration_data=[torch.randn(16, 8)])
    assert len(result.trials) == 1 and result.trials[0].error.startswith(
        f"{backend_name} static: an int8 op reads a tensor that is not float")
    assert "a comparison's result (x > 0)" in result.trials[0].error


class _TakesStarArgs(nn.Module):
    """forward(x, *rest): torch.export matches the inputs past `x` to `rest` as one tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 2)

    def forward(self, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x + sum(rest))))


@pytest.mark.parametrize("backend, approach", [("pt2e", "dynamic"), ("torchao", "weight_only")])
def test_a_forward_taking_star_args_is_exported_and_its_fp32_file_written(tmp_path, backend, approach):
    """Its dynamic shapes were given flat, one per input, which torch.export refused as a structure mismatch: every
    trial of the exporting backends failed, and the fp32 copy they fell back to could not be saved either."""
    from litcompress.quantization import PTQConfig, load_quantized, quantize

    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randn(32, 8)
    model = _TakesStarArgs()
    evaluate = lambda m: -float((m(x, y) - model(x, y)).abs().mean())  # noqa: E731
    config = PTQConfig(approach=approach, backends=(backend,), max_trials=1, num_threads=1, latency_repeats=2)
    result = quantize(model, config, eval_fn=evaluate, calibration_data=[(x[:16], y[:16])],
                      input_fn=lambda batch: tuple(batch), example_inputs=(x[:16], y[:16]))
    assert result.recipe is not None and result.recipe.backend == backend, result.trials[0].error
    result.save(tmp_path / "int8.pt2")
    loaded, _ = load_quantized(tmp_path / "int8.pt2")
    assert torch.equal(loaded(x[:5], y[:5]), result.model(x[:5], y[:5]))  # another batch size
    fp32 = quantize(model, PTQConfig(backends=(backend,), approach=approach, max_trials=1, num_threads=1,
                                     latency_repeats=2, min_speedup=1000.0), eval_fn=evaluate,
                    calibration_data=[(x[:16], y[:16])], input_fn=lambda batch: tuple(batch),
                    example_inputs=(x[:16], y[:16]))
    assert fp32.recipe is None
    fp32.save(tmp_path / "fp32.pt2")
    reloaded, _ = load_quantized(tmp_path / "fp32.pt2")
    torch.testing.assert_close(reloaded(x[:3], y[:3]), model(x[:3], y[:3]))
