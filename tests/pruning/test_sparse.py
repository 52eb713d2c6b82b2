"""Sparse CSR kernels for pruned Linear layers: the same outputs, the copy converted, the user's model untouched,
files that load back. Which kernel is faster is measured on the host (benchmarks/sparse.py), never asserted here:
`min_speedup=0` converts every layer timed."""

from __future__ import annotations

import io
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

from litcompress.pruning import SparseLinear, is_pruned, sparsify
from litcompress.report.size import model_size_bytes
from tests.conftest import ReluMLP


def _sparse_linear(out_features: int, in_features: int, sparsity: float, bias: bool, seed: int) -> nn.Linear:
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=generator))
        layer.weight[torch.rand(out_features, in_features, generator=generator) < sparsity] = 0
        if bias:
            layer.bias.copy_(torch.randn(out_features, generator=generator))
    return layer


@settings(max_examples=60, deadline=None)
@given(out_features=st.integers(1, 24), in_features=st.integers(1, 24), sparsity=st.floats(0.0, 1.0),
       bias=st.booleans(), leading=st.lists(st.integers(1, 4), min_size=0, max_size=2), seed=st.integers(0, 2**16))
def test_sparse_linear_computes_the_dense_layer(out_features, in_features, sparsity, bias, leading, seed):
    dense = _sparse_linear(out_features, in_features, sparsity, bias, seed)
    sparse = SparseLinear.from_dense(dense)
    x = torch.randn(*leading, in_features, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-5)
    assert sparse.weight.layout == torch.sparse_csr
    assert sparse.weight.values().numel() == int((dense.weight != 0).sum())  # no zero is stored
    back = sparse.to_dense()
    assert torch.equal(back.weight, dense.weight)
    assert (back.bias is None) == (not bias) and (not bias or torch.equal(back.bias, dense.bias))


def _mlp() -> ReluMLP:
    return ReluMLP(32, 64, 5)


def _pruned_mlp(amount: float = 0.9) -> ReluMLP:
    model = _mlp()
    prune.global_unstructured([(model.fc1, "weight"), (model.fc2, "weight")], prune.L1Unstructured, amount=amount)
    return model


def test_sparsify_converts_a_copy_and_leaves_the_pruned_model_as_it_was():
    model = _pruned_mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 32)
    result = sparsify(model, x, min_speedup=0, repeats=1)
    assert isinstance(result.model.fc1, SparseLinear) and isinstance(result.model.fc2, SparseLinear)
    assert isinstance(result.model.head, nn.Linear)  # dense: below min_sparsity
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result.model(torch.randn(3, 32)).shape, torch.Size([3, 5]))
    report = result.report
    assert report.converted == ("fc1", "fc2")
    fc1, fc2, head = report.layers
    zeros = int((model.fc1.weight == 0).sum()) + int((model.fc2.weight == 0).sum())
    assert fc1.sparsity * 32 * 64 + fc2.sparsity * 64 * 64 == pytest.approx(zeros)
    assert zeros == round(0.9 * (32 * 64 + 64 * 64))  # global pruning hit exactly
    assert head.reason == "sparsity below min_sparsity=0.7" and head.dense_ms is None
    assert report.max_abs_diff < 1e-5 and report.dense_ms > 0 and report.sparse_ms > 0
    assert "fc1" in report.table() and "CSR" in report.table()
    assert is_pruned(model.fc1, "weight") and is_pruned(model.fc2, "weight")  # the user's model: still masked
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_a_layer_whose_forward_is_not_called_or_not_float32_stays_dense_and_says_why():
    class WithAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
            self.proj = nn.Linear(16, 16).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y, _ = self.attention(x, x, x)
            return self.proj(y.double())

    model = WithAttention().eval()
    with torch.no_grad():  # all but a few zeros: sparse enough to be timed
        model.attention.out_proj.weight[:, 2:] = 0
        model.proj.weight[:, 1:] = 0
    x = torch.randn(2, 5, 16)
    result = sparsify(model, x, min_speedup=0, repeats=1)
    reasons = {layer.name: layer.reason for layer in result.report.layers}
    assert reasons == {"attention.out_proj": "its forward is not called (its weight is read directly)",
                       "proj": "not float32"}
    assert result.report.converted == ()
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x))


def test_a_layer_with_one_weight_left_is_not_printed_as_100_percent_sparse():
    """Its sparsity was printed with a plain format: 0.99976 as 100.0%, which says every weight is gone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[3, 5] = 1.0
    report = sparsify(model, torch.randn(4, 64), min_speedup=0, repeats=1, time_model=False).report
    assert report.layers[0].sparsity == 1 - 1 / 4096
    row = next(line for line in report.table().splitlines() if line.startswith("0 "))
    assert ">99.9%" in row and "100.0%" not in row


def test_without_time_model_the_whole_model_is_not_timed_and_the_table_says_the_rest():
    result = sparsify(_pruned_mlp(), torch.randn(4, 32), min_speedup=0, repeats=1, time_model=False)
    report = result.report
    assert (report.dense_ms, report.sparse_ms, report.speedup) == (None, None, None)
    assert report.converted == ("fc1", "fc2") and all(layer.dense_ms for layer in report.layers[:2])
    assert report.table().splitlines()[-1].startswith("model: 2 of 3 Linear layers on CSR kernels, ")


def test_a_layer_csr_does_not_speed_up_enough_stays_dense():
    result = sparsify(_pruned_mlp(), torch.randn(4, 32), min_speedup=1e9, repeats=1)
    assert result.report.converted == ()
    assert {layer.reason for layer in result.report.layers[:2]} == {"CSR not 1e+09x faster here"}


def test_the_sparsified_model_saves_and_loads_as_torchscript_and_as_a_state_dict():
    model = _pruned_mlp(0.95)
    x = torch.randn(6, 32)
    sparse = sparsify(model, x, min_speedup=0, repeats=1).model
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        torch.jit.save(torch.jit.trace(sparse, x), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    other = torch.randn(11, 32)  # another batch size than the trace's
    with torch.no_grad():
        torch.testing.assert_close(loaded(other), model(other), rtol=1e-5, atol=1e-5)
    state = io.BytesIO()
    torch.save(sparse.state_dict(), state)
    state.seek(0)
    fresh = sparsify(_pruned_mlp(0.5), x, min_speedup=0, min_sparsity=0.0, repeats=1).model  # same structure
    fresh.load_state_dict(torch.load(state))
    with torch.no_grad():
        torch.testing.assert_close(fresh(other), model(other), rtol=1e-5, atol=1e-5)


def test_a_dense_state_dict_loads_into_the_sparsified_model_converted():
    """What the pipeline writes (pruned_state_dict.pt: plain dense weights with their zeros) loads straight into a
    sparsified model of the same architecture; a wrong shape is said, as nn.Linear says it."""
    x = torch.randn(4, 32)
    sparse = sparsify(_pruned_mlp(0.5), x, min_speedup=0, min_sparsity=0.0, repeats=1).model
    dense = _pruned_mlp(0.9)
    prune.remove(dense.fc1, "weight")
    prune.remove(dense.fc2, "weight")
    sparse.load_state_dict(dense.state_dict())
    assert sparse.fc2.weight.values().numel() == int((dense.fc2.weight != 0).sum())
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-5)
    wrong = {**dense.state_dict(), "fc1.weight": torch.zeros(64, 31)}
    with pytest.raises(RuntimeError, match=r"size mismatch for fc1.weight.*\(64, 31\)"):
        sparse.load_state_dict(wrong)
    without_bias = {k: v for k, v in dense.state_dict().items() if k != "head.bias"}
    with pytest.raises(RuntimeError, match="Missing key.*head.bias"):
        sparse.load_state_dict(without_bias)


def test_a_state_dict_still_pruned_with_masks_loads_as_its_effective_weights():
    """`weight_orig`/`weight_mask` (a model pruned on with masks): loaded as orig * mask. They were neither read nor
    reported: strict loading named only the missing `weight`, and strict=False kept the old weights without a word.
    A key the layer has no place for is reported under strict loading, as nn.Linear's loading reports it."""
    x = torch.randn(4, 32)
    sparse = sparsify(_pruned_mlp(0.5), x, min_speedup=0, min_sparsity=0.0, repeats=1).model
    masked = _pruned_mlp(0.9)
    assert is_pruned(masked.fc1, "weight")
    for strict in (True, False):
        result = sparse.load_state_dict(masked.state_dict(), strict=strict)
        assert not result.missing_keys and not result.unexpected_keys
        with torch.no_grad():
            torch.testing.assert_close(sparse(x), masked(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"fc1.scale\""):
        sparse.load_state_dict({**masked.state_dict(), "fc1.scale": torch.ones(1)})


def test_a_sparse_layer_deep_copies_into_an_independent_one():
    """torch cannot deep-copy a CSR tensor; the pipeline copies every stage's model."""
    import copy

    layer = SparseLinear.from_dense(_sparse_linear(6, 5, 0.8, True, 1))
    twin = copy.deepcopy(layer)
    assert twin.weight is not layer.weight and torch.equal(twin.weight.to_dense(), layer.weight.to_dense())
    twin.weight.values().zero_()
    twin.bias.zero_()
    assert layer.weight.values().abs().sum() > 0 and layer.bias.abs().sum() > 0


def test_a_weight_also_read_outside_its_layer_keeps_that_layer_dense():
    """A converted layer hands a CSR tensor to whatever else reads its weight (here a weight norm, as some
    normalisation or regularisation code computes in forward): the model fails with it, so that layer stays dense and
    says why; the other layers are converted as usual."""

    class ReadsWeight(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = _sparse_linear(16, 16, 0.9, True, 2)
            self.head = _sparse_linear(4, 16, 0.9, True, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.fc(x) / self.fc.weight.norm())

    model = ReadsWeight()
    x = torch.randn(3, 16)
    result = sparsify(model, x, min_speedup=0, repeats=1)
    assert result.report.converted == ("head",) and isinstance(result.model.fc, nn.Linear)
    fc = result.report.layers[0]
    assert fc.reason.startswith("kept dense: on CSR the model failed (NotImplementedError")
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x))


def test_a_model_that_samples_in_forward_is_compared_on_the_same_draws_and_the_callers_generator_is_untouched():
    """A VAE's decoder after its sampling: each check drew other noise, so every layer was kept dense, blamed on its
    weight being read outside forward, and the report said outputs differed by 1.4 for a model it had not changed."""

    class SamplingDecoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = _sparse_linear(16, 32, 0.0, True, 4)  # dense: not timed
            self.dec = _sparse_linear(10, 8, 0.9, True, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mu, log_var = self.enc(x).chunk(2, -1)
            return self.dec(mu + torch.randn_like(mu) * log_var.exp())

    model = SamplingDecoder()
    x = torch.randn(6, 32)
    state = torch.get_rng_state()
    result = sparsify(model, x, min_speedup=0, repeats=1)
    assert torch.equal(torch.get_rng_state(), state)  # the checks and timings drew from a generator of their own
    assert result.report.converted == ("dec",) and isinstance(result.model.dec, SparseLinear)
    assert result.report.max_abs_diff <= 1e-5
    with torch.random.fork_rng():
        torch.manual_seed(1)
        expected = model(x)
        torch.manual_seed(1)
        torch.testing.assert_close(result.model(x), expected)


def test_a_layer_whose_output_dropout_left_on_reads_stays_dense_and_the_report_says_why():
    """A draw shaped like a CSR layer's (transposed) output lands elsewhere: the reason blamed its weight being read
    outside forward."""

    class DropoutOn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.head = _sparse_linear(32, 16, 0.9, True, 7), _sparse_linear(4, 32, 0.9, True, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(F.dropout(self.fc(x), 0.5, training=True))

    result = sparsify(DropoutOn(), torch.randn(8, 16), min_speedup=0, repeats=1, time_model=False)
    assert result.report.converted == ("head",)
    assert result.report.layers[0].reason.endswith(
        "the model draws random numbers (dropout left on, sampling), and a draw shaped like this layer's output, which "
        "CSR lays out transposed, lands elsewhere")


def test_load_state_dict_with_assign_takes_the_files_tensors_as_nn_linear_does():
    """assign=True onto a layer on the meta device failed converting the value to CSR there."""
    dense = _sparse_linear(8, 6, 0.8, True, 9)
    layer = SparseLinear.from_dense(dense).to("meta")
    layer.load_state_dict(dense.state_dict(), assign=True)
    assert layer.weight.device.type == layer.bias.device.type == "cpu"
    x = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense(x))


def test_a_layer_of_no_features_stays_dense_at_min_sparsity_0():
    """Its 0 weights passed min_sparsity=0, and timing its CSR copy crashed sparsify (a reshape to (-1, 0))."""
    model = nn.Sequential(nn.Linear(0, 8), nn.ReLU(), _sparse_linear(4, 8, 0.9, True, 6))
    result = sparsify(model, torch.randn(3, 0), min_sparsity=0, min_speedup=0, repeats=1, time_model=False)
    assert result.report.converted == ("2",) and result.report.layers[0].reason == "no weights (a layer of 0 features)"


def test_a_layer_called_twice_is_converted_once_and_computes_both_calls():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = _sparse_linear(20, 20, 0.9, True, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.fc(x)))

    model = Shared()
    x = torch.randn(4, 7, 20)
    result = sparsify(model, x, min_speedup=0, repeats=1)
    assert result.report.converted == ("fc",)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"min_sparsity": 1.0}, "min_sparsity=1.0"), ({"min_sparsity": -0.1}, "min_sparsity=-0.1"),
    ({"min_speedup": -1}, "min_speedup=-1"), ({"min_speedup": float("nan")}, "min_speedup=nan"),
    ({"repeats": 0}, "repeats=0"), ({"num_threads": 0}, "num_threads=0"),
])
def test_bad_arguments_are_refused_before_any_work(kwargs, message):
    with pytest.raises(ValueError, match=f"sparsify\\({message}\\)"):
        sparsify(_mlp(), torch.randn(2, 32), **kwargs)


def test_numpy_numbers_are_taken_and_a_non_bool_time_model_refused():
    """np.float32(0.5) and np.int64(2) were refused ("expected ..."; only np.float64, a float, passed); "no" for
    time_model timed the model."""
    import numpy as np

    model = _pruned_mlp()
    result = sparsify(model, torch.randn(2, 32), min_sparsity=np.float32(0.5), min_speedup=np.float32(0),
                      repeats=np.int64(1), num_threads=np.int64(1), time_model=np.False_)
    assert result.report.converted and result.report.dense_ms is None
    with pytest.raises(TypeError, match=r"sparsify\(time_model='no'\): expected True or False"):
        sparsify(model, torch.randn(2, 32), time_model="no")


def test_inputs_and_models_of_the_wrong_kind_are_refused():
    with pytest.raises(TypeError, match="Expected a tensor or a tuple of tensors as model inputs, got dict"):
        sparsify(_mlp(), {"x": torch.randn(2, 32)})
    with pytest.raises(TypeError, match="expected an nn.Module"):
        sparsify(F.relu, torch.randn(2, 32))
    with pytest.raises(ValueError, match="expected a 2-d weight"):
        SparseLinear(torch.randn(2, 3, 4))


def test_a_tied_weight_stays_dense_so_the_tie_and_the_file_size_stay():
    """A CSR copy of a weight an embedding also holds runs and gives the same outputs, so the example batch cannot
    tell; but the two would no longer share one tensor and the file would hold the matrix twice."""

    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(40, 16)
            self.head = nn.Linear(16, 40, bias=False)
            self.head.weight = self.emb.weight
            self.mid = _sparse_linear(16, 16, 0.9, True, 4)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.mid(self.emb(tokens))))

    model = TiedLM()
    with torch.no_grad():  # 90% zeros, as pruning both holders together leaves them
        model.emb.weight[torch.rand(40, 16, generator=torch.Generator().manual_seed(0)) < 0.9] = 0
    tokens = torch.randint(0, 40, (3, 5))
    result = sparsify(model, tokens, min_speedup=0, repeats=1, time_model=False)
    assert result.report.converted == ("mid",)
    head = next(layer for layer in result.report.layers if layer.name == "head")
    assert head.reason.startswith("its weight is tied to emb.weight")
    assert result.model.head.weight is result.model.emb.weight
    with torch.no_grad():
        torch.testing.assert_close(result.model(tokens), model(tokens))


def test_a_layer_object_registered_at_two_places_stays_dense_and_shared():
    """Converted at both places, its CSR weight was held twice, which torch.jit.trace cannot trace."""
    layer = _sparse_linear(20, 20, 0.9, True, 5)
    model = nn.Sequential(layer, nn.ReLU(), layer)
    x = torch.randn(4, 20)
    result = sparsify(model, x, min_speedup=0, repeats=1, time_model=False)
    assert result.report.converted == ()
    assert result.report.layers[0].reason.startswith("one layer under 2 names (0, 2)")
    assert type(result.model[2]) is nn.Linear and result.model[2] is result.model[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.trace(result.model, x)(x), model(x), rtol=1e-5, atol=1e-5)


def test_transformer_encoder_feed_forward_stays_dense_even_when_the_example_is_unbatched():
    """The fused path that reads linear1/linear2's weights runs for batched inputs only: an unbatched example batch
    passes the check, and the model would then fail on the batches it serves."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True, dropout=0.0).eval()
    for linear in (layer.linear1, layer.linear2):
        prune.l1_unstructured(linear, "weight", amount=0.9)
    result = sparsify(layer, torch.randn(6, 16), min_speedup=0, repeats=1, time_model=False)
    assert result.report.converted == ()
    assert all("fused path" in row.reason for row in result.report.layers if row.name in ("linear1", "linear2"))
    batch = torch.randn(4, 6, 16)
    with torch.no_grad():
        torch.testing.assert_close(result.model(batch), layer(batch))


def test_a_layer_called_with_the_input_keyword_is_timed_and_converted():
    class KeywordCall(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = _sparse_linear(16, 16, 0.9, True, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(input=x)

    model = KeywordCall()
    x = torch.randn(5, 16)
    result = sparsify(model, x, min_speedup=0, repeats=1, time_model=False)
    assert result.report.converted == ("fc",)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_weight_csr_kernels_cannot_multiply_is_refused_when_built(dtype):
    with pytest.raises(ValueError, match="float32 or float64"):
        SparseLinear.from_dense(nn.Linear(4, 3).to(dtype))


def test_a_float64_state_dict_keeps_the_layer_float32():
    layer = SparseLinear.from_dense(_sparse_linear(6, 5, 0.8, True, 7))
    dense = _sparse_linear(6, 5, 0.5, True, 8).double()
    layer.load_state_dict(dense.state_dict())
    assert layer.weight.dtype == layer.bias.dtype == torch.float32
    x = torch.randn(2, 5)
    torch.testing.assert_close(layer(x), dense.float()(x))


@settings(max_examples=20, deadline=None)
@given(traced_leading=st.lists(st.integers(1, 3), max_size=2), leading=st.lists(st.integers(1, 3), max_size=3),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_a_traced_sparse_layer_takes_inputs_of_any_rank_as_a_traced_linear(traced_leading, leading, bias, seed):
    """The trace recorded `x.shape[:-1]` with its length: a layer traced on (8, 16) failed on (2, 5, 16) and (16,)
    ("shape '[2, 32]' is invalid"), where a traced nn.Linear runs; the pipeline saves model.pt traced."""
    dense = _sparse_linear(6, 5, 0.8, bias, seed)
    example = torch.randn(*traced_leading, 5)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "CSR support is in beta" and trace warnings
        traced = torch.jit.trace(SparseLinear.from_dense(dense), example)
        x = torch.randn(*leading, 5, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(traced(x), dense(x), rtol=1e-5, atol=1e-5)


def test_under_cpu_autocast_a_sparse_layer_runs_in_float32_and_half_weights_are_refused_in_words():
    """bf16-mixed evaluation (Lightning's trainer.test/predict run under CPU autocast) failed inside torch
    ('"addmm_out_sparse_csr_impl_mkl" not implemented for BFloat16'), where the dense model runs; so did `.half()`."""
    dense = _sparse_linear(6, 5, 0.8, True, 0)
    sparse = SparseLinear.from_dense(dense)
    x = torch.randn(4, 5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = sparse(x)
        sparse(x.bfloat16())  # a bfloat16 input, as an autocast layer before it gives
    assert out.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(out, dense(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="CSR products on CPU take float32 or float64 weights, got torch.float16"):
        sparse.half()(x.half())


class LoRALinear(nn.Linear):
    """A Linear with a low-rank term of its own forward adds (zero until B trains, as LoRA initialises it)."""

    def __init__(self, in_features: int, out_features: int, rank: int = 2) -> None:
        super().__init__(in_features, out_features)
        self.A = nn.Parameter(torch.randn(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, x):
        return super().forward(x) + x @ self.A.t() @ self.B.t()


def test_layers_a_csr_copy_would_not_run_as_they_are_stay_dense_and_masked_outputs_do_not_loosen_the_check():
    """A LoRA-style subclass lost its own forward (and A, B) once converted: the check on the example batch let it
    through when B was zero, or when outputs held finfo.min at masked positions (the tolerance scaled with it).
    A layer's forward hooks were dropped."""
    torch.manual_seed(0)
    model = nn.Sequential(_sparse_linear(16, 16, 0.9, True, 1), nn.ReLU(), LoRALinear(16, 4))
    with torch.no_grad():
        model[2].weight[torch.rand(4, 16) < 0.9] = 0
    seen = []
    model[0].register_forward_hook(lambda module, args, output: seen.append(output.shape))
    result = sparsify(model, torch.randn(8, 16), min_speedup=0, repeats=1)
    reasons = {layer.name: layer.reason for layer in result.report.layers}
    assert reasons == {"0": "it has forward hooks, which a CSR copy would not run",
                       "2": "LoRALinear has its own forward, which a CSR copy would not run"}

    class Masked(nn.Module):  # the fill equal in both outputs: it must not set the tolerance
        def __init__(self) -> None:
            super().__init__()
            self.fc = _sparse_linear(4, 16, 0.9, True, 2)

        def forward(self, x):
            return self.fc(x).masked_fill(torch.tensor([True, False, False, False]), torch.finfo(x.dtype).min)

    from litcompress.pruning.sparse import _failure

    masked, x = Masked().eval(), torch.randn(8, 16)
    with torch.no_grad():
        reference = masked(x)
        masked.fc.bias += 0.5  # a change the CSR copy would have made
    assert _failure(masked, (x,), reference) == "outputs changed by 0.5"


@pytest.mark.parametrize("bias", [True, False])
def test_a_sparse_layer_scripts_to_the_dense_layers_outputs(bias):
    """TorchScript compiles its product only (no autocast, no tracing there): the eager checks stay out of it."""
    dense = _sparse_linear(6, 5, 0.8, bias, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(SparseLinear.from_dense(dense))
    x = torch.randn(2, 3, 5)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), dense(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("whole_model_ms", "kept"), [((1.0, 1.6), False), ((1.0, 0.8), True)])
def test_csr_layers_that_make_the_whole_model_slower_are_put_back_dense(monkeypatch, whole_model_ms, kept):
    """Each layer is timed alone on its input; in the model its kernels can still lose (LeNet-300-100 at batch 1 ran
    0.2x with its first layer on CSR, measured 1.5x faster alone on a busy host), and the slower model was returned.
    The timings here are given (the decision, not the host, is under test)."""
    from litcompress.quantization import latency

    def timed(models, inputs, **kwargs):  # per layer: CSR twice as fast; the whole model: as given
        times = (2.0, 1.0) if isinstance(models[1], SparseLinear) else whole_model_ms
        return [{"min": t / 1e3, "median": t / 1e3, "max": t / 1e3} for t in times]

    monkeypatch.setattr(latency, "measure_latencies", timed)
    model = _pruned_mlp()
    x = torch.randn(4, 32)
    result = sparsify(model, x, repeats=1)
    report = result.report
    assert (report.dense_ms, report.sparse_ms, report.reverted) == (*whole_model_ms, not kept)
    assert isinstance(result.model.fc1, SparseLinear) == kept and isinstance(result.model.fc2, SparseLinear) == kept
    assert report.converted == (("fc1", "fc2") if kept else ())
    if not kept:
        assert {layer.reason for layer in report.layers[:2]} == {"kept dense: the whole model ran slower with its "
                                                                  "CSR layers"}
        assert "all put back dense" in report.table().splitlines()[-1]
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-5)
    forced = sparsify(model, x, repeats=1, min_speedup=0)  # "converts every layer timed": the whole model too
    assert forced.report.converted == ("fc1", "fc2") and not forced.report.reverted


def test_a_sparse_layer_refuses_inputs_and_biases_that_do_not_fit_in_words():
    """An input of the wrong width was re-chunked to in_features (an empty batch ran; others failed reshaping the
    output); a (1,) bias was broadcast to every output, and a bias of another dtype failed at the first call."""
    weight = torch.randn(5, 8)
    layer = SparseLinear(weight, torch.randn(5))
    for shape in ((4, 6), (0, 6), (16,), (2, 4, 12)):
        with pytest.raises(RuntimeError, match=re.escape(f"the input has {shape[-1]} features (shape {shape}); this "
                                                         "layer takes 8")):
            layer(torch.randn(shape))
    for bias in (torch.randn(1), torch.randn(3), torch.randn(5, dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"expected a bias of shape \(5,\) and dtype torch.float32"):
            SparseLinear(weight, bias)


def test_a_training_forward_through_a_sparse_layer_is_warned_of_once():
    """Its weight is a buffer: layers stayed frozen in a fine-tuning loop without a word."""
    layer = SparseLinear(torch.randn(5, 8))
    assert not layer.training  # built for inference
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(2, 8))
        with torch.no_grad():
            layer.train()(torch.randn(2, 8))
    with pytest.warns(UserWarning, match=r"SparseLinear is for inference: .* buffers, which no optimizer trains"):
        layer(torch.randn(2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(2, 8))  # once per layer


def test_a_sparsified_state_dict_turned_dense_loads_into_the_dense_model():
    """A CSR weight does not load into an nn.Linear (torch: "copy_sparse_compressed_ expected sparse compressed
    tensor layout"): the dense model, or a run of sparsify that kept that layer dense."""
    from litcompress.pruning import dense_state_dict

    model = _pruned_mlp(0.95)
    x = torch.randn(6, 32)
    sparse = sparsify(model, x, min_speedup=0, repeats=1)
    assert sparse.report.converted
    state = dense_state_dict(sparse.model.state_dict())
    assert all(value.layout == torch.strided for value in state.values())
    dense = _mlp()
    dense.load_state_dict(state)  # strict
    with torch.no_grad():
        torch.testing.assert_close(dense(x), sparse.model(x), rtol=1e-5, atol=1e-5)


def test_the_library_loaders_load_a_sparsified_state_dict_into_the_dense_model():
    """load_shrunk_state_dict / load_pruned_state_dict failed on CSR weights in torch's words (equal shapes, a
    layout error) where dense_state_dict's conversion was all they needed."""
    from litcompress.pruning.engine import load_pruned_state_dict
    from litcompress.pruning.narrow import load_shrunk_state_dict

    model = _pruned_mlp(0.95)
    x = torch.randn(6, 32)
    sparse = sparsify(model, x, min_speedup=0, repeats=1)
    state = sparse.model.state_dict()
    assert any(value.layout == torch.sparse_csr for value in state.values())
    for load in (load_shrunk_state_dict, load_pruned_state_dict):
        dense = load(_mlp(), state)
        assert all(p.layout == torch.strided for p in dense.parameters())
        with torch.no_grad():
            torch.testing.assert_close(dense(x), sparse.model(x), rtol=1e-5, atol=1e-5)
    assert any(value.layout == torch.sparse_csr for value in state.values())  # the caller's state as it was


class _GraphLayer(nn.Module):
    """A graph convolution whose adjacency is a sparse COO buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("adj", torch.sparse_coo_tensor(torch.tensor([[0, 1, 2], [1, 2, 0]]), torch.ones(3),
                                                            (3, 3)).coalesce())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sparse.mm(self.adj, self.lin(x))


def test_a_sparse_tensor_the_model_holds_sparse_is_loaded_sparse():
    """The loaders' densifying of CSR weights (above) made every sparse entry dense: a model's own sparse buffer
    then failed to load ("copy_() between dense and sparse Tensors")."""
    from litcompress.pruning.engine import load_pruned_state_dict
    from litcompress.pruning.narrow import load_shrunk_state_dict

    torch.manual_seed(0)
    source = _GraphLayer()
    prune.l1_unstructured(source.lin, "weight", 0.5)
    x = torch.randn(3, 4)
    for load in (load_shrunk_state_dict, load_pruned_state_dict):
        loaded = load(_GraphLayer(), source.state_dict())
        assert loaded.adj.layout == torch.sparse_coo
        torch.testing.assert_close(loaded(x), source(x))


def test_a_sparsified_lightning_module_traces_as_the_docstring_says():
    """Tracing reads every property, and an unattached LightningModule's `trainer` raises: the result of sparsify on
    any built-in classifier failed torch.jit.trace ("MLPClassifier is not attached to a `Trainer`")."""
    from litcompress.models import MLPClassifier

    torch.manual_seed(0)
    model = MLPClassifier(hidden=(64,)).eval()
    prune.l1_unstructured(model.net[0], "weight", amount=0.95)
    x = torch.rand(8, 64)
    result = sparsify(model, x, min_speedup=0, repeats=1, time_model=False)
    assert result.report.converted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        traced = torch.jit.trace(result.model, x)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="not attached to a `Trainer`"):
        model.trainer  # the user's module is left as it was


def test_a_model_with_no_layer_converted_is_not_timed_as_if_sparsify_had_changed_it():
    """Two equal models were timed, and the report printed their ratio (host noise: 2.57x, 3.52x) as the model's
    speed-up on CSR kernels, with 0 of 3 layers converted."""
    model = _pruned_mlp()
    result = sparsify(model, torch.randn(8, 32), min_speedup=1e9, repeats=1)  # no layer gains that much
    report = result.report
    assert report.converted == () and (report.dense_ms, report.sparse_ms, report.speedup) == (None, None, None)
    assert "model: 0 of 3 Linear layers on CSR kernels" in report.table()


@pytest.mark.parametrize(("whole_model_ms", "kept"), [(None, True), ((1.0, 1.6), False)])
def test_a_pruned_bare_linear_layer_is_sparsified_as_the_model_itself(monkeypatch, whole_model_ms, kept):
    """A model that is one pruned ``nn.Linear``: its alias is "", which ``set_submodule`` refuses (a ValueError from
    torch whenever CSR won the timing, so the same call worked or failed by host). The copy is the converted layer,
    or the dense one where the whole model ran slower (timings given there: the decision is under test)."""
    if whole_model_ms is not None:
        from litcompress.quantization import latency

        calls: list[int] = []

        def timed(models, inputs, **kwargs):  # the layer alone first (CSR twice as fast), then the whole model
            calls.append(1)
            times = (2.0, 1.0) if len(calls) == 1 else whole_model_ms
            return [{"min": t / 1e3, "median": t / 1e3, "max": t / 1e3} for t in times]

        monkeypatch.setattr(latency, "measure_latencies", timed)
    layer = nn.Linear(64, 32)
    prune.l1_unstructured(layer, "weight", amount=0.95)
    x = torch.randn(16, 64)
    result = sparsify(layer, x, repeats=1, min_speedup=0 if whole_model_ms is None else 1.1)
    assert isinstance(result.model, SparseLinear) == kept and isinstance(result.model, nn.Module)
    assert result.report.converted == (("",) if kept else ()) and result.report.reverted == (not kept)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), layer(x), rtol=1e-5, atol=1e-5)
    assert result.report.table().splitlines()[1].startswith("(the model) ")
    assert is_pruned(layer, "weight")  # the user's layer: still masked, not the converted copy


def test_a_layer_under_two_names_stays_dense_so_the_model_can_be_traced():
    """Converted at both names, its CSR weight was held twice, and torch.jit.trace (the README's way to ship the
    result) failed inside torch ("Could not run 'aten::view' ... 'SparseCsrCPU'"), naming neither layer nor cause."""

    class Shortcut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.shared, self.head = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)
            self.again = self.shared  # the same layer registered under a second name

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.again(torch.relu(self.shared(torch.relu(self.inp(x)))))))

    torch.manual_seed(0)
    model, x = Shortcut().eval(), torch.randn(8, 16)
    for layer in (model.inp, model.shared):
        prune.l1_unstructured(layer, "weight", amount=0.95)
    result = sparsify(model, x, min_speedup=0, time_model=False, repeats=1)
    reasons = {layer.name: layer.reason for layer in result.report.layers}
    assert reasons["shared"] == ("one layer under 2 names (shared, again): torch.jit.trace fails on a CSR weight "
                                 "held twice")
    assert result.report.converted == ("inp",) and result.model.shared is result.model.again
    traced = torch.jit.trace(result.model, x)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_csr_weight_stores_its_non_zeros_only_in_memory_and_in_files():
    """torch's to_sparse_csr gives column indices viewing half of a storage twice their size, which torch.save and
    torch.jit.save wrote whole: the sparse layer's file and reported size were ~59% over its non-zeros."""
    torch.manual_seed(0)
    dense = nn.Linear(256, 256)
    with torch.no_grad():
        dense.weight[torch.rand_like(dense.weight) < 0.95] = 0.0
    csr = SparseLinear.from_dense(dense)
    for layer in (csr, SparseLinear(csr.weight, csr.bias)):  # from a dense weight, and from a CSR one
        weight = layer.weight
        nnz = weight.values().numel()
        storages = [weight.crow_indices(), weight.col_indices(), weight.values()]
        assert [t.untyped_storage().nbytes() for t in storages] == [t.numel() * t.element_size() for t in storages]
        saved = io.BytesIO()
        torch.save(layer.state_dict(), saved)
        assert len(saved.getvalue()) < nnz * (8 + 4) + 257 * 8 + 256 * 4 + 4096  # the arrays, and a pickle's room
        assert model_size_bytes(layer) == len(saved.getvalue())
