"""Sparsity of a model, counted on the values it computes with."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from litcompress.pruning.engine import (Target, check_module, check_targets, distinct_targets, effective_tensor,
                                        pruned_targets, qualified_names)
from litcompress.pruning.parametrizations import computed_value, computed_weights, is_computed, is_sparsifier_mask


def percent(fraction: float, decimals: int) -> str:
    """`fraction` as a percentage that reads 100% or 0% only when it is exactly that: a layer with a few weights left
    (0.99996) printed as 100.0%, which says every weight is gone."""
    text = f"{fraction:.{decimals}%}"
    if 0 < fraction < 1 and text in (f"{1:.{decimals}%}", f"{0:.{decimals}%}"):
        step = 10.0 ** -(decimals + 2)  # the smallest step shown
        return f">{1 - step:.{decimals}%}" if fraction > 0.5 else f"<{step:.{decimals}%}"
    return text


@dataclass(frozen=True)
class TensorSparsity:
    """Zeros in one tensor."""

    name: str
    zeros: int
    numel: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """Per-tensor and total sparsity."""

    tensors: tuple[TensorSparsity, ...]

    @property
    def zeros(self) -> int:
        return sum(t.zeros for t in self.tensors)

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def __getitem__(self, name: str) -> TensorSparsity:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def table(self) -> str:
        """A plain-text table: one row per tensor, then the total."""
        rows = [(t.name, f"{t.zeros}", f"{t.numel}", percent(t.sparsity, 2)) for t in self.tensors]
        rows.append(("total", f"{self.zeros}", f"{self.numel}", percent(self.sparsity, 2)))
        header = ("tensor", "zeros", "numel", "sparsity")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]

        def line(r: Sequence[str]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([line(header), rule, *map(line, rows[:-1]), rule, line(rows[-1])])

    def __str__(self) -> str:
        return self.table()


def plain_values(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as a plain tensor: a quantized tensor subclass (torchao's ``Int8Tensor``, which implements neither
    ``==`` nor ``count_nonzero``) is dequantized; symmetric int8 keeps zeros exactly zero."""
    if type(tensor) not in (torch.Tensor, nn.Parameter) and callable(getattr(tensor, "dequantize", None)):
        return tensor.dequantize()
    return tensor


def tensor_sparsity(module: nn.Module, name: str, label: str | None = None) -> TensorSparsity:
    """Zeros of ``module.<name>`` in its effective values (``orig * mask`` when pruned; dequantized when it is a
    quantized tensor subclass)."""
    values = plain_values(computed_value(module, name) if is_computed(module, name) else effective_tensor(module, name))
    if values.layout != torch.strided:  # a CSR/COO weight (sparsify's SparseLinear): count its stored values
        values = values.to_dense() if values.layout == torch.sparse_coo else values
        stored = values if values.layout == torch.strided else values.values()
        return TensorSparsity(label or name, values.numel() - int(torch.count_nonzero(stored)), values.numel())
    return TensorSparsity(label or name, values.numel() - int(torch.count_nonzero(values)), values.numel())


def _weight_names(module: nn.Module) -> list[str]:
    """`module`'s own parameters, its computed weights (``weight_norm``, a masking parametrization) in place of the
    parameters they are computed from; a :class:`~litcompress.pruning.SparseLinear`'s weight and bias, which are
    buffers (it is for inference)."""
    from litcompress.pruning.sparse import SparseLinear  # the pruning package imports the report's helpers

    # (a traced or scripted SparseLinear is a ScriptModule holding the same buffers, the weight in CSR layout)
    if isinstance(module, SparseLinear) or _holds_csr_weight(module):
        return [n for n in ("weight", "bias") if getattr(module, n, None) is not None]
    if isinstance(module, parametrize.ParametrizationList):  # its originals: stored, not the values computed with
        return []
    computed, sources = computed_weights(module)
    names = [n for n, p in module.named_parameters(recurse=False) if p is not None and n not in sources]
    return sorted(computed + names, key=lambda n: n != "weight")  # (a parametrized weight moves out of the dict)


def _holds_csr_weight(module: nn.Module) -> bool:
    """A TorchScript SparseLinear (a module of one's own with a CSR buffer keeps its own parameters)."""
    if not isinstance(module, torch.jit.ScriptModule):
        return False
    weight = dict(module.named_buffers(recurse=False)).get("weight")
    return isinstance(weight, torch.Tensor) and weight.layout == torch.sparse_csr


def _int8_weights(model: nn.Module) -> list[str]:
    """Where `model` keeps weights as int8: torch.ao's quantized layers (packed, not parameters) and the int8
    tensors of an exported int8 program (PT2E's constants, as buffers)."""
    found = [path or type(module).__name__ for path, module in model.named_modules()
             if type(module).__module__.startswith("torch.ao.nn.quantized")
             and callable(getattr(module, "weight", None))]
    return found + [name for name, buffer in model.named_buffers()  # (a uint8 lookup table or mask is no weight)
                    if (buffer.dtype == torch.int8 and buffer.dim() >= 2) or buffer.is_quantized]


def _holds_weights_elsewhere(model: nn.Module) -> bool:
    """Whether `model` runs weights torch does not hold as tensors of its modules: a TorchScript program's, an ONNX
    Runtime session's (a module that simply has none, a ReLU or a user's parameter-free layer, is no such model)."""
    from litcompress.quantization.backends.onnxruntime import OnnxRuntimeModule  # (it imports the report's helpers)

    return any(isinstance(m, (torch.jit.ScriptModule, OnnxRuntimeModule)) for m in model.modules())


def _naming_root(model: nn.Module, targets: Sequence[Target]) -> nn.Module:
    """The module whose paths `model`'s state dict uses: Fabric's wrapper writes the module it wraps (its own paths
    run through ``_forward_module.``)."""
    inner = getattr(model, "_original_module", None)
    if isinstance(inner, nn.Module) and inner is not model:
        inside = {id(m) for m in inner.modules()}
        if all(id(m) in inside for m, _ in targets):
            return inner
    return model


def sparsity_report(
    model: nn.Module, targets: Sequence[Target] | None = None, *, print_table: bool = False
) -> SparsityReport:
    """Zeros of `targets` (default: every pruned tensor of `model`, masked by ``torch.nn.utils.prune`` or a
    ``torch.ao.pruning`` sparsifier, else every parameter, and the CSR weights and biases of
    :class:`~litcompress.pruning.SparseLinear` layers) in effective values.

    Effective values are ``orig * mask`` for pruned tensors, so zeros from pruning and exact zeros in the
    weights both count; a parametrized tensor (``weight_norm``, a ``torch.ao.pruning`` sparsifier's mask) counts as
    the tensor it computes, in place of its originals. Names are relative to `model`, as in its state dict (a
    Fabric-wrapped model's are those of the module it wraps). A tensor held by several modules (tied weights) is
    counted once, under its first name.
    """
    check_module(model, "sparsity_report")
    if targets is not None:
        targets = check_targets(targets, "sparsity_report")
    if targets is None:
        masked: dict[int, list[str]] = {}
        for _, m, n in pruned_targets(model):
            masked.setdefault(id(m), []).append(n)
        # torch.nn.utils.prune's masks and torch.ao.pruning sparsifiers' alike, in module order
        pruned = [(m, n) for m in model.modules()
                  for n in masked.get(id(m), []) + [n for n in computed_weights(m)[0] if is_sparsifier_mask(m, n)]]
        targets = pruned or [(m, n) for m in model.modules() for n in _weight_names(m)]
        unread = _int8_weights(model)
        if unread:  # its sparsity would be that of the float tensors left (the biases), 0% as often as not
            warnings.warn(f"sparsity_report counts float tensors only: {', '.join(unread[:4])}"
                          f"{' ...' if len(unread) > 4 else ''} hold int8 weights it does not read; report the model "
                          "before quantization.", stacklevel=2)
        elif not targets and _holds_weights_elsewhere(model):  # ("0.00%" said of a 50%-sparse ONNX Runtime model)
            warnings.warn(f"sparsity_report found no torch tensor in {type(model).__name__}: its weights are held "
                          "outside torch's parameters (an ONNX Runtime session, a TorchScript program), so the "
                          "report is empty; report the model it was made from.", stacklevel=2)
    targets = distinct_targets(targets)
    names = qualified_names(_naming_root(model, targets), targets)
    report = SparsityReport(tuple(tensor_sparsity(m, n, label) for label, (m, n) in zip(names, targets)))
    if print_table:
        print(report.table())
    return report
