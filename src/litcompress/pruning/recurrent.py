"""Hidden units of recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``): rank, prune (mask) and remove them.

A recurrent layer's weight matrices stack one block of `hidden_size` rows per gate (LSTM: input, forget, cell and
output gates; GRU: reset, update and new gates; RNN: one), so a row is no channel: hidden unit j owns row j of every
gate block, in every layer and direction, and column j of the recurrent weights (and of the next layer's input
weights). `nn.LSTM` gives all its layers one `hidden_size`, so a unit is removable only as index j of every layer.

Unit j outputs exactly zero at every time step, whatever the input, when its *candidate* rows are zero (the rows
that feed new values into the state: the LSTM's cell gate g, the GRU's new gate n, the RNN's only gate) and the
initial state is zero (no ``hx`` passed): the LSTM's cell then stays ``f * 0 + i * tanh(0) = 0`` and its output
``o * tanh(0) = 0``; the GRU's state ``(1 - z) * tanh(0) + z * 0 = 0``; the RNN's ``tanh(0) = 0``. Its other
gates' rows and its columns then compute nothing that reaches an output, so :func:`keep_units_` removes all of
them. Pruning a unit (:func:`prune_units_`) masks all of its rows and biases, in every layer and direction.

An LSTM with ``proj_size`` outputs ``weight_hr @ h``, P projected features instead of its units: its units are then
internal (the projection's columns), and only its cell state ``c_n`` shows them.
"""

from __future__ import annotations

import torch
import torch.nn.utils.prune as torch_prune
from torch import Tensor, nn

from .engine import (apply_mask_, check_fraction, check_keep_multiple_of, check_module_names, effective_tensor,
                     is_excluded, pruned_targets)
from .methods import is_ln_norm
from .parametrizations import has_computed_tensors
from .schedules import kept_multiple, rounded_pruned_count

__all__ = ["RECURRENT_LAYERS", "gate_count", "is_projected", "keep_units_", "prunable_recurrent_layers",
           "prune_units_", "unit_norms", "units_why_not", "zero_units"]

#: The recurrent layers whose hidden units litcompress prunes and removes (their cells are called once per step
#: from a Python loop, which a trace unrolls: they are left alone).
RECURRENT_LAYERS = (nn.LSTM, nn.GRU, nn.RNN)


def gate_count(rnn: nn.RNNBase) -> int:
    """The blocks of `hidden_size` rows in each of `rnn`'s weight matrices."""
    return {"LSTM": 4, "GRU": 3}.get(rnn.mode, 1)


def _candidate_gate(rnn: nn.RNNBase) -> int:
    """The gate block whose rows feed new values into the state (LSTM: g, third of i, f, g, o; GRU: n, third of r,
    z, n; RNN: its only one)."""
    return 2 if rnn.mode in ("LSTM", "GRU") else 0


def _suffixes(rnn: nn.RNNBase) -> list[str]:
    """The tensor-name suffix of each layer and direction: ``_l0``, ``_l0_reverse``, ``_l1``, ..."""
    directions = ("", "_reverse") if rnn.bidirectional else ("",)
    return [f"_l{layer}{direction}" for layer in range(rnn.num_layers) for direction in directions]


def is_projected(rnn: nn.Module) -> bool:
    """An LSTM with ``proj_size``: its outputs and hidden state are projections of its units."""
    return bool(getattr(rnn, "proj_size", 0))


def units_why_not(rnn: nn.Module) -> str | None:
    """Why `rnn`'s hidden units cannot be pruned or removed, or None."""
    if type(rnn) not in RECURRENT_LAYERS:  # a subclass may have another forward
        return f"{type(rnn).__name__} is not one of nn.LSTM, nn.GRU, nn.RNN"
    if rnn.hidden_size < 2:
        return "it has a single hidden unit"
    return None


def unit_norms(rnn: nn.RNNBase, n: float = 2) -> Tensor:
    """Each hidden unit's importance: the Ln norm of its rows in all gate blocks of every weight matrix, in every
    layer and direction."""
    gates, hidden = gate_count(rnn), rnn.hidden_size
    rows = torch.cat([effective_tensor(rnn, kind + suffix).reshape(gates, hidden, -1).transpose(0, 1).flatten(1)
                      for suffix in _suffixes(rnn) for kind in ("weight_ih", "weight_hh")], dim=1)
    return torch.linalg.vector_norm(rows, ord=n, dim=1)  # ord=inf: the largest magnitude, as ln_structured's


def zero_units(rnn: nn.RNNBase) -> Tensor:
    """A bool per hidden unit: True when it outputs exactly zero from a zero initial state, whatever the input (its
    candidate rows and biases are zero in every layer and direction; see the module docstring)."""
    gates, hidden, gate = gate_count(rnn), rnn.hidden_size, _candidate_gate(rnn)
    zero = torch.ones(hidden, dtype=torch.bool)
    with torch.no_grad():
        for suffix in _suffixes(rnn):
            for kind in ("weight_ih", "weight_hh"):
                rows = effective_tensor(rnn, kind + suffix).reshape(gates, hidden, -1)[gate]
                zero &= (rows == 0).all(dim=1).cpu()
            if rnn.bias:
                for kind in ("bias_ih", "bias_hh"):
                    zero &= (effective_tensor(rnn, kind + suffix).reshape(gates, hidden)[gate] == 0).cpu()
    return zero


def prunable_recurrent_layers(model: nn.Module, exclude: tuple[str, ...] = ()) -> list[str]:
    """The names of `model`'s recurrent layers whose units :func:`prune_units_` prunes (outside `exclude`, modules
    named there and the modules inside them)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, RECURRENT_LAYERS) and not is_excluded(name, exclude)
            and units_why_not(module) is None]


def units_to_prune(hidden: int, fraction: float, keep_multiple_of: int | None = None) -> int:
    """How many of a layer's `hidden` units a round at `fraction` masks (before those already zero): the rounded
    count, leaving a multiple of `keep_multiple_of`, and never every unit."""
    count = rounded_pruned_count(hidden, fraction, keep_multiple_of)
    if count >= hidden:  # every unit: the fewest that may stay, a multiple of keep_multiple_of (at most them all)
        count = hidden - kept_multiple(hidden, 1, keep_multiple_of)
    return min(count, hidden - 1)


def prune_units_(model: nn.Module, fraction: float, *, exclude: tuple[str, ...] = (), n: float | str = 2,
                 names: tuple[str, ...] | None = None, keep_multiple_of: int | None = None) -> dict[str, int]:
    """Mask the ``round(fraction * hidden_size)`` hidden units with the smallest :func:`unit_norms` in each recurrent
    layer of `model` (`names`: only those), at least one unit staying: their rows in every gate block of every
    weight matrix and bias, in every layer and direction, through ``torch.nn.utils.prune`` masks. With
    `keep_multiple_of`, fewer, so that the units kept are a multiple of it (kernels run faster on such widths): at
    least `keep_multiple_of` units stay, or the whole layer when it has no more.
    `n`: the norm order (a number, or 'fro', which for a unit's flattened rows is the L2 norm).
    Units already masked (or zero) stay masked, so growing fractions along a schedule prune a growing set. Returns
    the masked unit count per layer. Layers named in `exclude`, or whose units cannot be removed
    (:func:`units_why_not`), are left.
    """
    fraction = check_fraction(fraction, "prune_units_", "fraction", "each recurrent layer's hidden units")
    exclude = check_module_names(model, exclude, "prune_units_", "exclude")  # a string excluded nothing
    modules = dict(model.named_modules())
    if names is not None:  # a string matched substrings, an unknown name nothing, without a word
        names = check_module_names(model, names, "prune_units_", "names")
        not_recurrent = [name for name in names if not isinstance(modules[name], RECURRENT_LAYERS)]
        if not_recurrent:
            raise ValueError(f"prune_units_(names={names!r}): {not_recurrent} are no nn.LSTM/GRU/RNN.")
    keep_multiple_of = check_keep_multiple_of(keep_multiple_of, torch_prune.LnStructured)
    if n == "fro":  # a unit's rows flattened: their Frobenius norm is the L2 norm
        n = 2
    if not is_ln_norm(n) or isinstance(n, str):  # 'nuc' ranks matrices; a unit is one vector of rows
        raise ValueError(f"prune_units_: n={n!r}: expected a number (1, 2, float('inf'), ...) or 'fro': the norm "
                         "of each unit's rows in every gate, layer and direction.")
    masked: dict[str, int] = {}
    for name in prunable_recurrent_layers(model, exclude):
        if names is not None and name not in names:
            continue
        rnn = modules[name]
        hidden, zero = rnn.hidden_size, zero_units(rnn)
        count = min(max(units_to_prune(hidden, fraction, keep_multiple_of), int(zero.sum())), hidden - 1)
        norms = unit_norms(rnn, n).cpu()
        norms[zero] = -1.0  # pruned earlier (or dead): first out
        pruned = torch.argsort(norms, stable=True)[:count]
        keep_rows = torch.ones(hidden, dtype=torch.bool)
        keep_rows[pruned] = False
        keep_columns = keep_rows.clone()  # a projection's columns: one per unit
        keep_rows = keep_rows.repeat(gate_count(rnn))  # the same unit in every gate block
        for suffix in _suffixes(rnn):
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"):
                if not hasattr(rnn, kind + suffix):  # bias=False, no projection
                    continue
                tensor = effective_tensor(rnn, kind + suffix)
                if kind == "weight_hr":
                    mask = keep_columns.to(tensor.device).view(1, -1).expand_as(tensor)
                else:
                    mask = keep_rows.to(tensor.device).view(-1, *([1] * (tensor.dim() - 1))).expand_as(tensor)
                # combined with the tensor's mask: another pruner's zeros in it (ModelPruning on weight_hh) stay
                apply_mask_(rnn, kind + suffix, mask.to(tensor.dtype).contiguous())
        masked[name] = count
    return masked


def _kept_indices(rnn: nn.RNNBase, keep: Tensor, size: int, what: str, caller: str) -> Tensor:
    """`keep` as indices into `size` items: integer indices as given, or a bool mask of `size` entries (the
    ``~zero_units(rnn)`` a caller naturally passes: its True/False were taken as the indices 1 and 0, and a layer of
    repeated units built, silently). Refuses a layer still computing its weights from pruning masks, parametrizations
    or weight/spectral norm hooks (the new parameters went under the old hooks, and its next forward failed)."""
    if pruned_targets(rnn):
        raise ValueError(f"{caller}: the layer still computes its weights from pruning masks; make them permanent "
                         "first (litcompress.make_permanent_(model)).")
    if has_computed_tensors(rnn):
        raise ValueError(f"{caller}: the layer computes its weights from a parametrization or a weight/spectral norm "
                         "hook; fold them into plain weights first (litcompress.pruning.fold_parametrizations_).")
    if not isinstance(keep, Tensor) or keep.dim() != 1:
        given = f"a tensor of shape {list(keep.shape)}" if isinstance(keep, Tensor) else type(keep).__name__
        raise TypeError(f"{caller}(keep=...): expected a 1-d tensor of {what} indices or a bool mask of {size}, "
                        f"got {given}.")
    if keep.dtype == torch.bool:
        if keep.numel() != size:
            raise ValueError(f"{caller}(keep=...): a bool mask must have one entry per {what} ({size}), got "
                             f"{keep.numel()}.")
        keep = keep.nonzero().flatten()
    elif keep.is_floating_point() or keep.is_complex():
        raise TypeError(f"{caller}(keep=...): expected integer indices or a bool mask, got {keep.dtype}.")
    keep = keep.to(torch.long).cpu()
    if keep.numel() == 0 or int(keep.min()) < 0 or int(keep.max()) >= size or keep.unique().numel() != keep.numel():
        raise ValueError(f"{caller}(keep=...): expected distinct {what} indices in [0, {size}), at least one; got "
                         f"{keep.tolist()[:10]}.")
    return keep


@torch.no_grad()
def keep_units_(rnn: nn.RNNBase, keep: Tensor) -> None:
    """Keep only the hidden units `keep` (distinct indices, or a bool mask of ``hidden_size``) of `rnn`, in every
    layer and direction: their rows in every gate block, their columns of the recurrent weights and of the next
    layer's input weights (of the projection, with ``proj_size``: the recurrent and next layer's weights read its P
    features). Parameters are replaced (``requires_grad`` kept); pruning masks must be made permanent first."""
    gates, hidden = gate_count(rnn), rnn.hidden_size
    directions = 2 if rnn.bidirectional else 1
    keep = _kept_indices(rnn, keep, hidden, "hidden unit", "keep_units_")
    if is_projected(rnn) and keep.numel() <= rnn.proj_size:
        # torch tells a projection by h's size differing from c's, and its constructor refuses this too
        raise ValueError(f"an LSTM with proj_size={rnn.proj_size} needs more hidden units than that; "
                         f"{keep.numel()} were to be kept.")
    rows = torch.cat([keep + g * hidden for g in range(gates)])
    inputs = torch.cat([keep + d * hidden for d in range(directions)])  # a later layer reads every direction
    projected = is_projected(rnn)
    for suffix in _suffixes(rnn):
        layer = int(suffix[2:].split("_")[0])
        for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"):
            name = kind + suffix
            old = getattr(rnn, name, None)
            if old is None:
                continue
            if kind == "weight_hr":
                new = old.detach()[:, keep.to(old.device)]
            else:
                new = old.detach()[rows.to(old.device)]
            if kind == "weight_hh" and not projected:
                new = new[:, keep.to(old.device)]
            elif kind == "weight_ih" and layer > 0 and not projected:
                new = new[:, inputs.to(old.device)]
            setattr(rnn, name, nn.Parameter(new.clone(), old.requires_grad))
    rnn.hidden_size = int(keep.numel())
    rnn._init_flat_weights()  # the forward reads _flat_weights, built from the tensors' names


@torch.no_grad()
def keep_inputs_(rnn: nn.RNNBase, keep: Tensor, constants: Tensor | None = None,
                 removed: Tensor | None = None) -> None:
    """Keep only the input features `keep` (distinct indices, or a bool mask of ``input_size``) of `rnn`'s first
    layer, in each direction; the `removed` ones carried the `constants`, whose contribution goes into
    ``bias_ih_l0`` (which the caller made sure exists when any constant is not zero)."""
    keep = _kept_indices(rnn, keep, rnn.input_size, "input feature", "keep_inputs_")
    for suffix in ("_l0", "_l0_reverse") if rnn.bidirectional else ("_l0",):
        weight = getattr(rnn, "weight_ih" + suffix)
        if constants is not None and removed is not None and bool((constants != 0).any()):
            contribution = weight.detach().double()[:, removed.to(weight.device)] @ constants.double().to(
                weight.device)
            bias = getattr(rnn, "bias_ih" + suffix)
            bias.data = (bias.data.double() + contribution).to(bias.dtype)
        new = weight.detach()[:, keep.to(torch.long).to(weight.device)]
        setattr(rnn, "weight_ih" + suffix, nn.Parameter(new.clone(), weight.requires_grad))
    rnn.input_size = int(keep.numel())
    rnn._init_flat_weights()
