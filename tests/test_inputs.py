"""A model whose forward writes into its input (an in-place first op) leaves the caller's tensors as they were, and
the library's checks compare calls on the same inputs (`litcompress._inputs.copied`)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from litcompress import compress, quantize, shrink
from litcompress.pipeline import CompressionConfig, PruneConfig
from litcompress.pruning import prune_model_, sparsify
from litcompress.quantization import PTQConfig, measure_latencies


class DoublesItsInput(nn.Module):
    """Preprocessing written in place: each call doubles the tensor it is given."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(2)


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(DoublesItsInput(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.randn(8, 16)
    return x, x.clone()


def quantize_dynamic(x: torch.Tensor) -> None:
    quantize(model(), PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=1), eval_fn=lambda m: 1.0,
             example_inputs=x)


def quantize_static(backend: str):
    def run(x: torch.Tensor) -> None:
        quantize(model(), PTQConfig(approach="static", backends=(backend,), max_trials=1), eval_fn=lambda m: 1.0,
                 example_inputs=x, calibration_data=[x, x[:4]])
    return run


def shrink_structured(x: torch.Tensor) -> None:
    pruned = model()
    prune_model_(pruned, "ln_structured", 0.5, scope="local", n=1, dim=0)
    shrink(pruned, x)


def sparsify_unstructured(x: torch.Tensor) -> None:
    pruned = model()
    prune_model_(pruned, "l1_unstructured", 0.9)
    sparsify(pruned, x, min_sparsity=0.5)


def compress_all(x: torch.Tensor) -> None:
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured"),
                               quantize=PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=1),
                               latency_repeats=2, export=False)
    compress(model(), config, eval_fn=lambda m: 1.0, example_inputs=x)


@pytest.mark.parametrize("call", [
    quantize_dynamic, quantize_static("torch_ao"), quantize_static("onnxruntime"), shrink_structured,
    sparsify_unstructured, compress_all, lambda x: measure_latencies([model(), model()], (x,), repeats=3)],
    ids=["quantize-dynamic", "quantize-static-torch_ao", "quantize-static-onnxruntime", "shrink", "sparsify",
         "compress", "measure_latencies"])
def test_a_forward_writing_into_its_input_leaves_the_callers_tensors_and_raises_no_false_alarm(call):
    """The example batch came back filled with inf (doubled at each of the library's calls), quantize warned that the
    model depends on the batch size (the row cut from a tensor the last call had doubled), and shrink refused a plain
    Linear: "the shrunk model's outputs differ from the original's ... its forward probably depends on a layer's
    width"."""
    x, before = inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call(x)
    assert torch.equal(x, before)
    assert not [str(w.message) for w in caught if "depends on the batch size" in str(w.message)
                or "differ when computed alone" in str(w.message)]


def test_measure_latencies_gives_each_call_of_a_forward_writing_into_its_input_the_inputs_given():
    """One copy served a whole timed block: a forward halving its input in place ran its calls on 2^-100 (denormals,
    slow on many CPUs) instead of the batch given."""
    seen: list[float] = []

    class HalvesItsInput(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(float(x.abs().max()))
            return x.mul_(0.5).sum()

    x = torch.ones(4, 16)
    measure_latencies([HalvesItsInput()], (x,), repeats=3, warmup=1)
    assert len(seen) > 10 and set(seen) == {1.0} and torch.equal(x, torch.ones(4, 16))


def test_measure_latencies_finds_a_forward_that_writes_into_its_input_only_now_and_then():
    """Found in the warm-up only: a forward writing on every fifth call shared one copy through the timed blocks, its
    input halved 18 times."""
    seen: list[float] = []
    calls = [0]

    class HalvesItsInputAtTimes(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            seen.append(float(x.abs().max()))
            return (x.mul_(0.5) if calls[0] % 5 == 0 else x).sum()

    measure_latencies([HalvesItsInputAtTimes()], torch.ones(4, 8), repeats=3, warmup=3, min_block_s=1e-3)
    # the block in which it first wrote ran on halved inputs, and was taken again with a copy per call: every call
    # since saw the inputs given
    assert len(seen) > 40 and set(seen[-20:]) == {1.0}
