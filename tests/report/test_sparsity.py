from __future__ import annotations

import io

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from litcompress.pruning import apply_mask_, prune_
from litcompress.report import sparsity_report
from litcompress.report.size import model_size_bytes
from litcompress.report.sparsity import percent
from tests.conftest import TimesBuffer


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 10), cols=st.integers(1, 10), seed=st.integers(0, 1000))
def test_counts_effective_zeros_per_tensor_and_total(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(cols, rows), nn.Linear(rows, 3))
    masks = [torch.rand(m.weight.shape, generator=g) > 0.5 for m in model]
    for m, mask in zip(model, masks):
        apply_mask_(m, "weight", mask)
    with torch.no_grad():
        model[1].weight_orig.view(-1)[0] = 0.0  # an exact zero that is not masked counts too
    report = sparsity_report(model)
    expected = [int((m.weight_orig * m.weight_mask == 0).sum()) for m in model]  # not the stale cached `weight`
    assert [t.zeros for t in report.tensors] == expected
    assert report.zeros == sum(expected) and report.numel == sum(m.weight.numel() for m in model)
    assert [t.name for t in report.tensors] == ["0.weight", "1.weight"]


def test_unpruned_model_reports_every_parameter_and_prints_a_table(capsys):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2, bias=False))
    report = sparsity_report(model, print_table=True)
    assert [t.name for t in report.tensors] == ["0.weight", "0.bias", "1.weight"]
    out = capsys.readouterr().out
    assert "total" in out and "0.weight" in out and out.count("\n") == len(report.tensors) + 4
    prune_([(model[0], "weight")], "l1_unstructured", 0.25)
    after = sparsity_report(model)
    assert after["0.weight"].zeros == 4 and after.sparsity == 4 / 16


@settings(max_examples=300, deadline=None)
@given(fraction=st.floats(0, 1), decimals=st.integers(0, 3))
def test_a_percentage_reads_full_or_none_only_when_it_is(fraction, decimals):
    """A layer with 4 of 100,000 weights left was printed as 100.00% sparse: every weight gone."""
    text = percent(fraction, decimals)
    assert (float(text.lstrip("<>").rstrip("%")) == 100) == (fraction == 1 and text[0] != ">")
    assert (float(text.lstrip("<>").rstrip("%")) == 0) == (fraction == 0 and text[0] != "<")
    if text[0] not in "<>":
        assert text == f"{fraction:.{decimals}%}"  # otherwise as Python rounds it


def test_a_layer_with_a_few_weights_left_is_not_printed_as_fully_sparse():
    model = nn.Sequential(nn.Linear(500, 200, bias=False), nn.Linear(200, 2, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[0, :4] = 1.0  # 4 of 100,000 left: 99.996%
        model[1].weight[0, 0] = 0.0  # 1 of 400 zero: 0.25%, shown as it rounds
    table = sparsity_report(model).table()
    assert " >99.99%" in table, table
    assert "100.00%" not in table and "0.25%" in table


def test_a_sparsified_model_reports_the_zeros_of_its_csr_weights():
    """sparsify's CSR weights are buffers: the default targets and explicit ones count them as the dense model's."""
    from torch.nn.utils import prune

    from litcompress.pruning import SparseLinear, sparsify

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    prune.l1_unstructured(model[0], "weight", amount=0.9)
    dense = sparsity_report(model, [(model[0], "weight"), (model[0], "bias"), (model[2], "weight"),
                                    (model[2], "bias")])
    sparse_model = sparsify(model, torch.randn(4, 32), min_speedup=0, repeats=1, time_model=False).model
    assert isinstance(sparse_model[0], SparseLinear)
    report = sparsity_report(sparse_model)
    assert [(t.name, t.zeros, t.numel) for t in report.tensors] == [(t.name, t.zeros, t.numel) for t in dense.tensors]
    assert sparsity_report(sparse_model, [(sparse_model[0], "weight")]).zeros == dense["0.weight"].zeros == 922


def test_a_saved_torchscript_program_of_a_sparsified_model_counts_its_csr_layers(tmp_path):
    """README ships a sparsified model as a traced program: its CSR layers are ScriptModules, not SparseLinear, and
    were left out without a word when another layer stayed dense (49.8% reported of a 91.1%-sparse model)."""
    import warnings

    from torch.nn.utils import prune

    from litcompress.pruning import SparseLinear, sparsify

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    prune.l1_unstructured(model[0], "weight", amount=0.9)
    x = torch.randn(4, 32)
    sparse_model = sparsify(model, x, min_speedup=0, repeats=1, time_model=False).model
    assert isinstance(sparse_model[0], SparseLinear) and isinstance(sparse_model[2], nn.Linear)  # one stays dense
    eager = sparsity_report(sparse_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice, sparse CSR's beta notice
        torch.jit.save(torch.jit.trace(sparse_model, x), tmp_path / "sparse.pt")
        programs = [torch.jit.load(tmp_path / "sparse.pt"), torch.jit.script(sparse_model)]
    for program in programs:
        report = sparsity_report(program)
        assert [(t.name, t.zeros, t.numel) for t in report.tensors] == [
            (t.name, t.zeros, t.numel) for t in eager.tensors]
        assert report["0.weight"].zeros == round(0.9 * 32 * 64)


def test_a_module_of_ones_own_with_a_csr_buffer_named_weight_reports_its_parameters():
    """Only TorchScript programs hold SparseLinear's buffers in place of the layer: a module of one's own with a CSR
    `weight` buffer was read as one (its parameters left out; a bool `bias` flag failed)."""

    class CsrScaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("weight", torch.eye(4).to_sparse_csr())
            self.scale = nn.Parameter(torch.zeros(4))
            self.bias = True

    report = sparsity_report(nn.Sequential(CsrScaled()))
    assert [(t.name, t.zeros, t.numel) for t in report.tensors] == [("0.scale", 4, 4)]


def test_a_module_registered_twice_goes_by_its_first_name_as_torch_names_it():
    """It went by its last name (`b.weight`), which `named_parameters()` never gives: `report["a.weight"]` failed."""
    model = nn.Module()
    model.a = model.b = nn.Linear(4, 4)
    report = sparsity_report(model)
    assert [t.name for t in report.tensors] == [name for name, _ in model.named_parameters()] == ["a.weight", "a.bias"]


def test_int8_weights_it_cannot_read_are_said_not_counted_as_dense():
    """A quantized model's report said 0% sparse (over no tensor, or over the float biases) without a word."""
    import warnings

    import pytest

    model = nn.Sequential(nn.Linear(16, 16)).eval()
    with torch.no_grad():
        model[0].weight[:8] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation of torch.ao
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    with pytest.warns(UserWarning, match="sparsity_report counts float tensors only: 0 hold int8 weights"):
        sparsity_report(quantized)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a float model, or targets given: nothing to say
        assert sparsity_report(model).sparsity == 0.5 * 256 / (256 + 16)
        sparsity_report(quantized, targets=[])
        model.register_buffer("lookup", torch.zeros(4, 4, dtype=torch.uint8))  # a table, no int8 weight
        sparsity_report(model)


def test_a_model_whose_weights_torch_does_not_hold_is_said_to_give_an_empty_report():
    """An ONNX Runtime session or a TorchScript int8 program of a 50%-sparse layer was reported 0.00% sparse,
    without a word."""
    import io
    import warnings

    import pytest

    from litcompress.quantization.backends.onnxruntime import OnnxRuntimeModule

    model = nn.Sequential(nn.Linear(16, 8)).eval()
    with torch.no_grad():
        model[0].weight[:, :8] = 0
    exported = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 16),), exported, dynamo=False)
        scripted = torch.jit.script(torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8))
    for held_elsewhere in (OnnxRuntimeModule(exported.getvalue()), scripted):
        with pytest.warns(UserWarning, match=r"found no torch tensor in .*: its weights are held outside torch"):
            assert sparsity_report(held_elsewhere).tensors == ()
    class Doubles(nn.Module):
        def forward(self, x):
            return 2 * x

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a module that simply has no weights: nothing to say
        sparsity_report(nn.Sequential(nn.ReLU()))
        sparsity_report(nn.Sequential(Doubles(), nn.ReLU()))


def test_a_masked_model_is_sized_by_the_weights_it_computes_with():
    """Its live masks' `weight_orig` and `weight_mask` were sized: nearly twice the model."""
    from litcompress.report.size import model_size_bytes

    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    dense = model_size_bytes(model)
    prune_([(model[0], "weight")], "l1_unstructured", 0.5)
    assert abs(model_size_bytes(model) - dense) < 0.01 * dense


def test_a_fabric_wrapped_model_names_its_tensors_as_its_state_dict_does():
    """Fabric's wrapper reaches its module through `_forward_module`: the report named `_forward_module.0.weight`,
    a name its state dict (`0.weight`) and the user's model do not have."""
    from lightning.fabric import Fabric

    torch.manual_seed(0)
    wrapped = Fabric(accelerator="cpu", devices=1).setup(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)))
    dense_names = [t.name for t in sparsity_report(wrapped).tensors]
    assert dense_names == list(wrapped.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    prune_([(wrapped.module[0], "weight")], "l1_unstructured", 12)
    report = sparsity_report(wrapped)
    assert [t.name for t in report.tensors] == ["0.weight"] and report["0.weight"].zeros == 12


def test_tied_weights_of_a_loaded_torchscript_model_count_once(tmp_path):
    """torch.jit.load gives parameters as plain tensors, so the tie (one tensor, two holders) went unseen and the
    embedding was counted twice: the pipeline's read-back TorchScript stage reported 38.8% where the model had 47.4%."""

    class TiedHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.mid = nn.Embedding(10, 8), nn.Linear(8, 8, bias=False)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(self.mid(self.emb(x)))

    model = TiedHead()
    with torch.no_grad():
        model.emb.weight[:5] = 0  # 40 of its 80 entries
    torch.jit.save(torch.jit.script(model), tmp_path / "tied.pt")
    loaded = torch.jit.load(tmp_path / "tied.pt")
    eager, read_back = sparsity_report(model), sparsity_report(loaded)
    assert [t.name for t in read_back.tensors] == [t.name for t in eager.tensors] == ["emb.weight", "mid.weight"]
    assert (read_back.zeros, read_back.numel) == (eager.zeros, eager.numel) == (40, 144)


def test_a_torchscript_int8_model_is_sized_as_its_file():
    """Its int8 layers' packed weights are in no state dict: an 81 KB file was sized 1.5 KB."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    int8 = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    scripted = torch.jit.trace(int8, torch.randn(2, 256))
    saved = io.BytesIO()
    torch.jit.save(scripted, saved)
    assert model_size_bytes(scripted) == len(saved.getvalue()) > 256 * 256  # the int8 weights, one byte each


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), old_style=st.booleans())
def test_parametrized_weights_count_as_the_values_the_model_computes_with(seed, old_style):
    from torch.ao.pruning import WeightNormSparsifier
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Linear(4, 4), nn.Linear(4, 3))
    sparsifier = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=4)
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}])
    sparsifier.step()  # torch's own sparsifier: a FakeSparsity parametrization masks half the weight
    assert [(t.name, t.zeros) for t in sparsity_report(model).tensors] == [("0.weight", 64)]  # the pruned tensors
    sparsifier.squash_mask()  # (folds the mask: a plain weight, half zeros)
    parametrize.register_parametrization(model[2], "weight", TimesBuffer((torch.rand(4, 16) > 0.5).float()))
    if old_style:
        torch.nn.utils.weight_norm(model[3])
        torch.nn.utils.spectral_norm(model[4])
    else:
        weight_norm(model[3])
        spectral_norm(model[4])
    with torch.no_grad():  # a row of zeros in the weight norm computes: its g is 0
        (model[3].weight_g if old_style else model[3].parametrizations.weight.original0)[1] = 0.0
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = sparsity_report(model)
    # one entry per weight the model computes with, none for the originals (g and v, `original`) or the masks
    assert [t.name for t in report.tensors] == [f"{i}.{n}" for i in (0, 2, 3, 4) for n in ("weight", "bias")]
    with torch.no_grad():
        model.eval()(torch.randn(2, 8))  # (the older hooks compute the weight attribute at a forward)
        for i in (0, 2, 3, 4):
            assert (report[f"{i}.weight"].zeros, report[f"{i}.weight"].numel) == \
                (int((model[i].weight == 0).sum()), model[i].weight.numel())
    assert report["0.weight"].zeros == 64 and report["3.weight"].zeros >= 4
    # reading the report ran no power iteration of spectral norm (a training model's u and v stay as they were)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.train()[4].eval()  # a module in its own mode inside a training model keeps it
    modes = [m.training for m in model.modules()]
    assert sparsity_report(model).zeros == report.zeros
    assert [m.training for m in model.modules()] == modes and not model[4].training


def test_tied_sparsifier_and_torch_masks_and_parametrized_buffers_each_count_as_they_compute():
    """A parametrization on one holder of a tied weight hid the other holder (its matrix was taken for the
    parametrization's original); a torch.ao.pruning mask beside torch.nn.utils.prune masks was left out (only the
    latter were 'pruned'); a parametrized buffer (a running mean) was counted as a weight."""
    from torch.ao.pruning import WeightNormSparsifier
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    tied = nn.ModuleDict({"emb": nn.Embedding(10, 4), "out": nn.Linear(4, 10, bias=False)})
    tied["out"].weight = tied["emb"].weight
    parametrize.register_parametrization(tied["out"], "weight", TimesBuffer((torch.rand(10, 4) > 0.5).float()))
    report = sparsity_report(tied)
    assert [(t.name, t.zeros) for t in report.tensors] == [("emb.weight", 0), ("out.weight",
                                                                              int((tied["out"].weight == 0).sum()))]

    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4), nn.Linear(4, 2))
    sparsifier = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=4)
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}])
    sparsifier.step()
    prune_([(model[2], "weight")], "l1_unstructured", 0.25)
    assert [(t.name, t.zeros) for t in sparsity_report(model).tensors] == [("0.weight", 64), ("2.weight", 16)]
    parametrize.register_parametrization(model[1], "running_mean", _Abs())
    assert "1.running_mean" not in [t.name for t in sparsity_report(nn.Sequential(model[1])).tensors]


class _Abs(nn.Module):
    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.abs()
