"""Sparse kernels for unstructured pruning: a Linear layer whose weight is mostly zeros runs as a sparse CSR matrix
product (torch's CSR kernels: MKL's on x86 CPUs) where that is measured faster on this host, so 90-98% sparse
layers get faster, not only more compressible. Inference only.

:func:`sparsify` converts a copy of the model, layer by layer, each timed against its dense self on the inputs the
example batch gives it (interleaved, medians: :func:`litcompress.quantization.latency.measure_latencies`). The result
traces with ``torch.jit.trace`` (a TorchScript file that loads without litcompress); ONNX and ``torch.export``'s
files cannot hold sparse tensors.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from litcompress._inputs import copied
from litcompress._numbers import as_python_number, is_bool
from litcompress.pruning.engine import deepcopy_model, drawing_from, make_permanent_, tied_parameters
from litcompress.pruning.parametrizations import fold_parametrizations_
from litcompress.pruning.shrink import _scale_where_they_differ, max_output_difference
from litcompress.report.sparsity import percent


def _csr(weight: Tensor) -> Tensor:
    """`weight` (dense or CSR) as a detached CSR tensor storing its non-zeros only. Cloned: torch's to_sparse_csr
    gives column indices that view the second half of a storage twice their size (the COO row indices before them),
    which torch.save and torch.jit.save write whole (a sparse file 59% larger than its non-zeros need)."""
    weight = weight.detach()
    if weight.layout == torch.sparse_csr and not bool((weight.values() == 0).any()):
        return weight.clone()
    with warnings.catch_warnings():  # torch's "CSR support is in beta": nothing the caller can act on
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta")
        dense = weight.to_dense() if weight.layout == torch.sparse_csr else weight
        return dense.to_sparse_csr().clone()


class SparseLinear(nn.Module):
    """A Linear layer whose weight is a sparse CSR matrix (a buffer; for inference): ``y = x Wᵀ + b`` computed as
    ``addmm(b, W, xᵀ)ᵀ``. Takes inputs of any rank ``(..., in_features)``, as ``nn.Linear`` does. Built in eval
    mode; a forward in training mode with grad enabled warns (once) that nothing in it trains."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear: expected a 2-d weight (out_features, in_features), got {weight.dim()}-d.")
        if weight.device.type == "cpu" and weight.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"SparseLinear: torch's CSR products on CPU take float32 or float64 weights, got "
                             f"{weight.dtype}; keep this layer an nn.Linear (or convert it to float32 first).")
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        if bias is not None and (tuple(bias.shape) != (self.out_features,) or bias.dtype != weight.dtype):
            # (a (1,) bias was broadcast to every output, silently; others failed at the first call)
            raise ValueError(f"SparseLinear: expected a bias of shape ({self.out_features},) and dtype {weight.dtype} "
                             f"(the weight's), got {tuple(bias.shape)} {bias.dtype}.")
        self.register_buffer("weight", _csr(weight))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.training = False  # built for inference (a training forward is warned of)

    _said_frozen = False  # (a class default: layers pickled before it existed load too)

    def __deepcopy__(self, memo: dict) -> SparseLinear:
        # torch cannot deep-copy a CSR tensor (it has no storage to copy); `clone` copies it
        memo[id(self.weight)] = self.weight.clone()
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        for key, value in self.__dict__.items():
            copied.__dict__[key] = copy.deepcopy(value, memo)
        return copied

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        # The stored weight is replaced, not copied into: a CSR tensor takes only one of as many non-zeros. A dense
        # weight (an nn.Linear's, a pruned model's state dict) loads too, converted; one still pruned with a mask
        # (`weight_orig`/`weight_mask`) as `orig * mask`.
        read = set()
        for name in ("weight", "bias"):
            key = prefix + name
            orig, mask = f"{key}_orig", f"{key}_mask"
            if key not in state_dict and orig in state_dict and mask in state_dict:
                value = state_dict[orig].detach() * state_dict[mask].to(state_dict[orig].dtype)
                read |= {orig, mask}
            elif key in state_dict:
                value = state_dict[key]
                read.add(key)
            else:
                if strict and getattr(self, name) is not None:
                    missing_keys.append(key)
                continue
            expected = (self.out_features, self.in_features) if name == "weight" else (self.out_features,)
            if getattr(self, name) is None:
                unexpected_keys.append(key)
            elif tuple(value.shape) != expected:
                error_msgs.append(f"size mismatch for {key}: copying a tensor of shape {tuple(value.shape)}, the "
                                  f"shape in the current model is {expected}.")
            else:  # cast to this layer's dtype and device, as nn.Linear's copy_ does: a float64 or CPU file must
                # not change them; load_state_dict(assign=True) takes the file's, as it does for nn.Linear
                held = getattr(self, name)
                if not local_metadata.get("assign_to_params_buffers", False):
                    value = value.to(device=held.device, dtype=held.dtype)
                value = value.detach()
                setattr(self, name, _csr(value) if name == "weight" else value.clone())
        if strict:  # as nn.Module's own loading: keys of this layer it has no place for
            unexpected_keys.extend(key for key in state_dict if key.startswith(prefix) and key not in read
                                   and "." not in key[len(prefix):])

    @classmethod
    def from_dense(cls, linear: nn.Linear) -> SparseLinear:
        """The same layer with its weight (its zeros included, none stored) in CSR form."""
        return cls(linear.weight, linear.bias)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          dtype=self.weight.dtype, device=self.weight.device)
        with torch.no_grad():
            dense.weight.copy_(self.weight.to_dense())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    @property
    def density(self) -> float:
        """The fraction of the weight's entries stored (non-zero)."""
        return self.weight.values().numel() / max(1, self.out_features * self.in_features)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Linear's name: `layer(input=x)` keeps working
        if torch.jit.is_scripting():  # TorchScript compiles the product alone (it has no autocast or tracing)
            return self._product(input).t().reshape(input.shape[:-1] + (self.out_features,))
        return self._forward_eager(input)

    @torch.jit.unused
    def _forward_eager(self, x: Tensor) -> Tensor:
        # (each check here costs a fraction of a microsecond: a batch-1 product takes tens of them)
        dtype = self.weight.dtype
        if dtype is not torch.float32 and dtype is not torch.float64 and self.weight.device.type == "cpu":
            raise RuntimeError(f"SparseLinear: torch's CSR products on CPU take float32 or float64 weights, got "
                               f"{dtype} (the model was converted after sparsify: .half(), .to(...)); convert it "
                               "back with .float().")
        if x.shape[-1] != self.in_features:  # the rows would be re-chunked to in_features and the product run
            raise RuntimeError(f"SparseLinear: the input has {x.shape[-1]} features (shape {tuple(x.shape)}); this "
                               f"layer takes {self.in_features}.")
        if self.training and torch.is_grad_enabled() and not self._said_frozen:
            self._said_frozen = True  # once per layer
            warnings.warn("SparseLinear is for inference: its CSR weight and bias are buffers, which no optimizer "
                          "trains. Train the dense model (SparseLinear.to_dense() gives an nn.Linear back), or call "
                          "model.eval() for inference.", stacklevel=3)
        if torch.is_autocast_enabled(x.device.type):
            # autocast would run the CSR product in bfloat16/float16, which torch's CPU kernels lack: it runs in the
            # weight's dtype, on the input cast to it (no context entered otherwise: this is the fast path)
            with torch.autocast(x.device.type, enabled=False):
                return self._forward_eager(x.to(self.weight.dtype))
        out = self._product(x)
        if torch.jit.is_tracing():  # the trace would fix the rank with x.shape[:-1]: take the shape from a tensor
            return out.t().reshape_as(nn.functional.pad(x.narrow(-1, 0, 0), (0, self.out_features)))
        return out.t().reshape(x.shape[:-1] + (self.out_features,))

    def _product(self, x: Tensor) -> Tensor:
        """``W x_rowsᵀ (+ b)``: (out_features, rows), the rows of `x` being its leading dims flattened."""
        rows = x.reshape(-1, self.in_features).t()
        if self.bias is None:
            return torch.mm(self.weight, rows)
        return torch.addmm(self.bias.unsqueeze(1), self.weight, rows)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"density={self.density:.3f}")


@dataclass(frozen=True)
class SparseLayerReport:
    """One Linear layer's decision: its sparsity, its dense and CSR times on its input (None when not timed), and
    whether it was converted, else why not."""

    name: str
    shape: tuple[int, int]
    sparsity: float
    dense_ms: float | None
    sparse_ms: float | None
    converted: bool
    reason: str | None = None

    @property
    def speedup(self) -> float | None:
        return None if not self.dense_ms or not self.sparse_ms else self.dense_ms / self.sparse_ms


@dataclass(frozen=True)
class SparsifyReport:
    """What :func:`sparsify` measured and did: every Linear layer, then the whole model before and after (its
    times None when not timed: ``time_model=False``, or no layer converted, the model unchanged)."""

    layers: tuple[SparseLayerReport, ...]
    dense_ms: float | None
    sparse_ms: float | None
    max_abs_diff: float
    num_threads: int
    reverted: bool = False  # the layers' CSR kernels made the whole model slower: all were put back dense

    @property
    def converted(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers if layer.converted)

    @property
    def speedup(self) -> float | None:
        return None if not self.dense_ms or not self.sparse_ms else self.dense_ms / self.sparse_ms

    def table(self) -> str:
        lines = [f"{'layer':<32} {'shape':>11} {'sparsity':>8} {'dense ms':>9} {'CSR ms':>9} {'speed-up':>8}  kernel"]
        for layer in self.layers:
            times = (f"{layer.dense_ms:>9.4f} {layer.sparse_ms:>9.4f} {layer.speedup:>8.2f}"
                     if layer.dense_ms is not None and layer.sparse_ms is not None else f"{'-':>9} {'-':>9} {'-':>8}")
            kernel = "CSR" if layer.converted else f"dense ({layer.reason})"
            shape = f"{layer.shape[0]}x{layer.shape[1]}"
            sparsity = percent(layer.sparsity, 1)  # (>99.9% for a layer with weights left, not 100.0%)
            lines.append(f"{layer.name or '(the model)':<32} {shape:>11} {sparsity:>8} {times}  {kernel}")
        timed = (f"{self.dense_ms:.4g} -> {self.sparse_ms:.4g} ms ({self.speedup:.2f}x), "
                 if self.dense_ms is not None and self.sparse_ms is not None else "")
        if self.reverted:
            timed = (f"{self.dense_ms:.4g} ms dense, {self.sparse_ms:.4g} ms with the layers above on CSR "
                     f"({self.speedup:.2f}x): all put back dense, ")
        lines.append(f"model: {timed}{len(self.converted)} of {len(self.layers)} Linear layers on CSR kernels, "
                     f"{self.num_threads} thread(s); outputs differ by at most {self.max_abs_diff:.2g}")
        return "\n".join(lines)


@dataclass(frozen=True)
class SparsifyResult:
    """The sparsified copy and its report (the model given to :func:`sparsify` is left untouched)."""

    model: nn.Module
    report: SparsifyReport


def dense_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """`state_dict` (a sparsified model's) with every CSR weight as a dense tensor: what ``nn.Linear`` layers load
    (the dense model it came from, or a run of :func:`sparsify` that left other layers dense). ``SparseLinear``
    layers load either form."""
    return {key: value.to_dense() if isinstance(value, Tensor) and value.layout == torch.sparse_csr else value
            for key, value in state_dict.items()}


def _outputs_and_first_inputs(model: nn.Module, layers: dict[str, nn.Linear], inputs: tuple) -> tuple[Any, dict]:
    """`model`'s outputs on `inputs`, and the input each layer's first call receives meanwhile (layers whose forward is
    never called, such as an attention's ``out_proj`` whose weight is read directly, are absent)."""
    seen: dict[str, Tensor] = {}

    def recorder(name: str):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("input")  # `layer(input=x)` is a call too
            if name not in seen and isinstance(x, Tensor):
                seen[name] = x.detach()
        return record

    handles = [layer.register_forward_pre_hook(recorder(name), with_kwargs=True) for name, layer in layers.items()]
    try:
        with torch.no_grad(), _drawing_alike(model):
            outputs = model(*copied(inputs))
    finally:
        for handle in handles:
            handle.remove()
    return outputs, seen


def _read_outside_forward(model: nn.Module, layers: dict[str, nn.Linear]) -> dict[str, str]:
    """Why each of `layers` whose weight other code reads must stay dense, by name. The example batch cannot always
    tell: a CSR copy of a tied weight runs, but unties it (and stores the matrix twice); torch's
    ``TransformerEncoderLayer`` reads its feed-forward weights on its fused path only for batched inputs."""
    reasons: dict[str, str] = {}
    names = {id(layer): name for name, layer in layers.items()}
    for holders in tied_parameters(model.named_modules()):
        for path, module, tensor in holders:
            if id(module) in names and names[id(module)] not in reasons:
                other = next(f"{p or 'model'}.{t}" for p, m, t in holders if m is not module)
                reasons[names[id(module)]] = (f"its {tensor} is tied to {other}: a CSR copy would untie them and "
                                              "store the matrix twice")
    for name, layer in layers.items():
        # what the CSR copy would not run (the check on the example batch passes where a hook logs, or where the
        # extra term is zero there: a LoRA adapter before training)
        if type(layer).forward is not nn.Linear.forward:
            reasons.setdefault(name, f"{type(layer).__name__} has its own forward, which a CSR copy would not run")
        elif layer._forward_hooks or layer._forward_pre_hooks:
            reasons.setdefault(name, "it has forward hooks, which a CSR copy would not run")
    for path, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            for child in ("linear1", "linear2"):
                name = f"{path}.{child}" if path else child
                if name in layers:
                    reasons.setdefault(name, "torch's TransformerEncoderLayer reads it on its fused path, taken "
                                             "for batched inputs without grad")
    return reasons


def _plain_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with plain weights: pruning masks made permanent, parametrizations folded."""
    copied = deepcopy_model(model)
    make_permanent_(copied)
    fold_parametrizations_(copied)
    for module in copied.modules():
        # a LightningModule's `trainer` raises when unattached, and tracing reads every property: the flag Lightning's
        # own to_torchscript sets makes it answer None (our copy only; the result traces as the docstring says)
        if isinstance(getattr(module, "_jit_is_scripting", None), bool):
            module._jit_is_scripting = True
    return copied.eval()


def _placed(root: nn.Module, alias: str, module: nn.Module) -> nn.Module:
    """`root` with `module` at `alias`; `module` itself for the root's alias "" (a bare pruned ``nn.Linear``), which
    ``set_submodule`` refuses."""
    if not alias:
        return module
    root.set_submodule(alias, module)
    return root


def _drawing_alike(model: nn.Module):
    """Every call compared draws the same random numbers (a VAE's sampling, dropout left on in eval mode), so that
    the check sees what a conversion changed; the caller's generators are left as they were."""
    # (buffers too: a CUDA model whose Linear layers all went CSR holds its weights as buffers only)
    return drawing_from(0, [(m, n) for m in model.modules() for n, _ in itertools.chain(
        m.named_parameters(recurse=False), m.named_buffers(recurse=False))])


def _draws_randomly(model: nn.Module, inputs: tuple, reference: Any) -> bool:
    """Whether `model`'s outputs change with the random draws (dropout left on in eval mode, a VAE's sampling)."""
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            return max_output_difference(reference, model(*copied(inputs))) > 0
    except Exception:  # noqa: BLE001 - a model that fails on another seed is not told apart here
        return False


def _failure(model: nn.Module, inputs: tuple, reference: Any) -> str | None:
    """Why `model` no longer computes `reference` on `inputs` (an error, or outputs off by more than float rounding
    of CSR sums), or None."""
    try:
        with torch.no_grad(), _drawing_alike(model):
            outputs = model(*copied(inputs))
        difference = max_output_difference(reference, outputs)
    except Exception as error:  # noqa: BLE001 - any failure of the converted model keeps the layer dense
        return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:120]}"
    # relative to the largest output that changed: a -1e9 or finfo.min filling masked entries (equal in both)
    # made the tolerance as large, and any change passed
    scale = _scale_where_they_differ(reference, outputs)
    return None if difference <= 1e-4 * max(1.0, scale) else f"outputs changed by {difference:.3g}"


def sparsify(model: nn.Module, example_inputs: Tensor | tuple, *, min_sparsity: float = 0.7,
             min_speedup: float = 1.1, num_threads: int | None = None, repeats: int = 15,
             time_model: bool = True) -> SparsifyResult:
    """A copy of `model` whose sparse ``nn.Linear`` layers run on CSR kernels where that is faster here.

    Args:
        model: a pruned model (masks from ``torch.nn.utils.prune`` are made permanent on the copy); left untouched.
        example_inputs: one batch as forward takes it, of the batch size you will run: which kernel is faster
            depends on it (CSR gains most on large batches and the sparsest layers).
        min_sparsity: layers with a smaller fraction of zero weights are not timed (CSR kernels lose there).
        min_speedup: a layer is converted when its CSR product ran at least this many times faster than its
            dense one on its input (1.1: a clear gain, not noise). 0 converts every layer timed.
        num_threads: torch threads while timing (None: the current setting), the ones you will run with.
        repeats: interleaved timed blocks per layer and per model (medians compared).
        time_model: also time the whole model before and after (where a layer was converted): when it runs slower
            with its CSR layers (a speed-up below ``min(1, min_speedup)``: each layer was timed alone, and its
            kernels can still lose in the model), they are all put back dense, and the report says so. False:
            neither (a caller that times the result itself).

    Linear layers of other dtypes than float32, those forward never calls (an ``nn.MultiheadAttention``'s
    ``out_proj``), tied weights, ``nn.TransformerEncoderLayer``'s feed-forward layers (its fused path reads them),
    subclasses with a forward of their own (a LoRA adapter's), layers with forward hooks and
    those whose weight other code reads too (each conversion is checked on the example batch: the model must run and
    give the same outputs), and a layer registered under several names (torch.jit.trace fails on a CSR tensor held
    twice), stay dense; the report says why for each. Inference only: the CSR weights are buffers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify(model=...): expected an nn.Module, got {type(model).__name__}.")
    # numpy's float32(0.5), int64(2) as Python's (only float64, a float subclass, passed)
    min_sparsity, min_speedup, repeats, num_threads = (as_python_number(value) for value in (
        min_sparsity, min_speedup, repeats, num_threads))
    if not is_bool(time_model):  # ("no" timed the model)
        raise TypeError(f"sparsify(time_model={time_model!r}): expected True or False.")
    if isinstance(min_sparsity, bool) or not isinstance(min_sparsity, (int, float)) or not 0 <= min_sparsity < 1:
        raise ValueError(f"sparsify(min_sparsity={min_sparsity!r}): expected a fraction in [0, 1), e.g. 0.7.")
    if isinstance(min_speedup, bool) or not isinstance(min_speedup, (int, float)) or not (
            math.isfinite(min_speedup) and min_speedup >= 0):
        raise ValueError(f"sparsify(min_speedup={min_speedup!r}): expected a number >= 0 (1.1: 10% faster).")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"sparsify(repeats={repeats!r}): expected an int >= 1.")
    if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                    or num_threads < 1):
        raise ValueError(f"sparsify(num_threads={num_threads!r}): expected an int >= 1 or None.")
    # the timing rules and the inputs' normalisation; that package imports this one
    from litcompress.quantization.backends import to_inputs
    from litcompress.quantization.latency import measure_latencies

    inputs = to_inputs(example_inputs)
    work = _plain_copy(model)
    layers = {name: m for name, m in work.named_modules() if isinstance(m, nn.Linear)}
    # A layer object registered at several places (named_modules gives its first name only) stays dense: see below.
    paths: dict[int, list[str]] = {}
    for alias, module in work.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(alias)
    aliases = {name: paths[id(layer)] for name, layer in layers.items()}
    kept_dense = _read_outside_forward(work, layers)
    reference, first_inputs = _outputs_and_first_inputs(work, layers, inputs)
    random = None  # whether the model draws random numbers: asked once a conversion changes its outputs
    threads = num_threads or torch.get_num_threads()
    decisions: list[SparseLayerReport] = []
    for name, layer in layers.items():
        weight = layer.weight.detach()
        shape = (int(weight.shape[0]), int(weight.shape[1]))
        sparsity = float((weight == 0).sum()) / max(1, weight.numel())
        x = first_inputs.get(name)
        reason = (kept_dense[name] if name in kept_dense
                  else "no weights (a layer of 0 features)" if weight.numel() == 0
                  else f"sparsity below min_sparsity={min_sparsity:g}" if sparsity < min_sparsity
                  else "not float32" if weight.dtype != torch.float32 or (x is not None and x.dtype != torch.float32)
                  else "its forward is not called (its weight is read directly)" if x is None
                  # (torch.jit.trace, how a sparsified model ships, fails on a CSR tensor held twice: "aten::view")
                  else f"one layer under {len(aliases[name])} names ({', '.join(aliases[name])}): torch.jit.trace "
                       "fails on a CSR weight held twice" if len(aliases[name]) > 1 else None)
        if reason is not None:
            decisions.append(SparseLayerReport(name, shape, sparsity, None, None, False, reason))
            continue
        candidate = SparseLinear.from_dense(layer)
        dense_t, sparse_t = measure_latencies([layer, candidate], (x,), repeats=repeats, num_threads=num_threads)
        dense_ms, sparse_ms = 1e3 * dense_t["median"], 1e3 * sparse_t["median"]
        reason = None if dense_ms >= min_speedup * sparse_ms else f"CSR not {min_speedup:g}x faster here"
        if reason is None:
            work = _placed(work, name, candidate)  # (its one place: a layer under several names stays dense)
            # Code that reads this layer's weight outside its forward (F.linear on it, a fused path) now gets a CSR
            # tensor: the model's outputs tell, layer by layer.
            failure = _failure(work, inputs, reference)
            if failure is not None:
                work = _placed(work, name, layer)
                if random is None and failure.startswith("outputs changed"):
                    random = _draws_randomly(work, inputs, reference)  # (the layer is back: the dense model)
                reason = (f"kept dense: on CSR the model failed ({failure}); " + (
                    "the model draws random numbers (dropout left on, sampling), and a draw shaped like this layer's "
                    "output, which CSR lays out transposed, lands elsewhere" if random and failure.startswith(
                        "outputs changed") else "its weight is read outside its forward?"))
        decisions.append(SparseLayerReport(name, shape, sparsity, dense_ms, sparse_ms, reason is None, reason))
    dense_ms = sparse_ms = None
    reverted = False
    if time_model and any(layer.converted for layer in decisions):  # (nothing converted: two equal models, whose
        # ratio was the host's noise, printed as a gain of sparsify)
        with _drawing_alike(work):  # (the timed calls of a model that samples leave the caller's generators too)
            whole = measure_latencies([_plain_copy(model), work], inputs, repeats=repeats, num_threads=num_threads)
        dense_ms, sparse_ms = 1e3 * whole[0]["median"], 1e3 * whole[1]["median"]
        # each layer was timed alone, on its own input: in the model, its kernels can still lose (a small batch's
        # per-call overhead, a busy host); the whole model decides
        converted = [layer for layer in decisions if layer.converted]
        if converted and dense_ms < min(1.0, min_speedup) * sparse_ms:
            for layer in converted:
                work = _placed(work, layer.name, layers[layer.name])
            slower = "kept dense: the whole model ran slower with its CSR layers"
            decisions = [replace(layer, converted=False, reason=slower) if layer.converted else layer
                         for layer in decisions]
            reverted = True
    with torch.no_grad(), _drawing_alike(work):
        difference = max_output_difference(reference, work(*copied(inputs)))
    report = SparsifyReport(tuple(decisions), dense_ms, sparse_ms, difference, threads, reverted)
    return SparsifyResult(work, report)


__all__ = ["SparseLayerReport", "SparseLinear", "SparsifyReport", "SparsifyResult", "dense_state_dict", "sparsify"]
