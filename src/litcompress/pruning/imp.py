"""Iterative magnitude pruning (IMP) for lottery tickets (Frankle & Carbin 2019; Frankle et al. 2019).

train -> prune p% of each layer's remaining weights by magnitude -> rewind the network to its state at
initialisation (or at an early point k), the pruned weights' survivors and everything else (biases, normalisation
layers and their running statistics) alike, as Frankle & Carbin and OpenLTH do -> retrain, for R rounds.
Framework-free: training and evaluation are callables, so a plain loop or a Lightning `Trainer` (see
:mod:`litcompress.callbacks.lottery`) can drive it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import numbers
import os
import random
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.nn.utils.prune import BasePruningMethod

from litcompress._numbers import as_python_number
from litcompress._files import cannot_write, what_is_in_the_way, written_atomically
from litcompress.pruning.engine import (
    Scope,
    Target,
    close_names,
    deepcopy_model,
    default_targets,
    distinct_targets,
    emptied_message,
    emptied_targets,
    is_pruned,
    keep_bypassed_weights_current_,
    left_out_message,
    mask_of,
    matrices_left_out,
    prune_to_sparsity_,
    qualified_names,
    refresh_cached_tensor,
    remaining_count,
    set_mask_,
    tensor_key,
    trainable_tensor,
)
from litcompress.pruning.lottery import redraw_parameters_, rewind_, snapshot_tensor, take_snapshot
from litcompress.pruning.parametrizations import parametrized_tensors
from litcompress.report.sparsity import percent

log = logging.getLogger(__name__)

#: layers whose weights IMP never prunes (Frankle & Carbin prune Linear and conv weights)
_NORMALISATIONS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)
#: nor an activation's parameters (a PReLU slope pruned to 0 turns its channel into a ReLU)
_NOT_PRUNED = _NORMALISATIONS + (nn.PReLU,)

TrainFn = Callable[[nn.Module], None]
EvaluateFn = Callable[[nn.Module], float]


@dataclass(frozen=True)
class IMPRound:
    """One row of the IMP table: the network trained after `round` pruning rounds."""

    round: int
    remaining: float  # fraction of the pruned tensors' entries still kept
    metric: float
    control_metric: float | None = None  # same mask, freshly drawn weights


@dataclass
class LotteryTicket:
    """What IMP found: the trained sparse network, its ticket (mask + rewound weights) and the per-round table."""

    model: nn.Module
    masks: dict[str, Tensor]
    rewound_state: dict[str, Tensor]
    rounds: list[IMPRound] = field(default_factory=list)

    @property
    def remaining(self) -> float:
        return self.rounds[-1].remaining

    def table(self) -> str:
        """A plain-text table, one row per round."""
        lines = ["round  remaining  metric  random re-init"]
        for r in self.rounds:
            control = "" if r.control_metric is None else f"{r.control_metric:.4f}"
            lines.append(f"{r.round:>5}  {percent(r.remaining, 2):>8}  {r.metric:.4f}  {control:>14}")
        return "\n".join(lines)


def checked_search_arguments(rounds: int, rate: float, layer_rates: Mapping[str, float] | None, control: str,
                             scope: object = "local", parameter_names: object = ("weight",), exclude: object = (),
                             control_seed: object = 0) -> tuple[int, float, dict[str, float]]:
    """``rounds, rate, layer_rates`` as Python numbers, once :func:`iterative_magnitude_pruning`'s arguments are
    checked (a clear error for a bad one); its Lightning driver checks them before any fit or evaluation too."""
    if layer_rates is not None and not isinstance(layer_rates, Mapping):  # (dict()'s own words, or taken as none)
        raise TypeError(f"`layer_rates` must be a mapping {{name: rate}}, e.g. {{'net.4.weight': 0.1}}, got "
                        f"{layer_rates!r}.")
    # numpy's int64(3), float32(0.2) as Python's (refused; the saved settings hold Python numbers)
    rounds, rate = as_python_number(rounds), as_python_number(rate)
    layer_rates = {name: as_python_number(value) for name, value in (layer_rates or {}).items()}
    _validate(rounds, rate, layer_rates, control, scope, parameter_names, exclude, control_seed)
    return rounds, rate, layer_rates


def _names(names: object) -> bool:
    """`names` is a collection of str (a str itself is not: its characters are no names; nor a generator, which
    this check would use up, leaving nothing for the search: its exclusions were ignored)."""
    return isinstance(names, Collection) and not isinstance(names, str) and all(isinstance(n, str) for n in names)


def _validate(rounds: int, rate: float, layer_rates: Mapping[str, float], control: str, scope: object = "local",
              parameter_names: object = ("weight",), exclude: object = (), control_seed: object = 0) -> None:
    if not _names(exclude):  # (None: "'NoneType' object is not iterable")
        raise TypeError(f"`exclude` must be a sequence of names, e.g. ['head.weight'] or ['head'], got {exclude!r}.")
    if scope not in ("local", "global"):  # anything else ran local pruning without a word
        raise ValueError(f"`scope` must be 'local' or 'global', got {scope!r}.")
    if not _names(parameter_names):
        raise TypeError(f"`parameter_names` must be a sequence of names, e.g. ('weight',), got {parameter_names!r}.")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"`rounds` must be an int >= 1, got {rounds!r}.")
    for name, value in {"rate": rate, **{f"layer_rates[{k!r}]": v for k, v in layer_rates.items()}}.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 < value < 1:
            raise ValueError(f"`{name}` must be a fraction in (0, 1) of the remaining weights, got {value!r}.")
    if control not in ("none", "final", "every"):
        raise ValueError(f"`control` must be 'none', 'final' or 'every', got {control!r}.")
    # (the control's round seeds it with control_seed + round, after the ticket's training: saved as given, a bad one
    # failed there and every resume with it)
    if isinstance(control_seed, bool) or not isinstance(control_seed, numbers.Integral):
        raise TypeError(f"`control_seed` must be an int, got {control_seed!r}.")


def check_checkpoint_path(checkpoint_path: object) -> None:
    """`checkpoint_path` names a file (a str or os.PathLike, not ''), or is None."""
    if checkpoint_path is not None and not isinstance(checkpoint_path, (str, os.PathLike)):  # (os.fspath's words)
        raise TypeError(f"`checkpoint_path` must name a file to write (a str or os.PathLike), or be None; got "
                        f"{checkpoint_path!r}.")
    if checkpoint_path is not None and os.fspath(checkpoint_path) == "":  # ("'.' is a directory")
        raise ValueError("`checkpoint_path` is '': name a file to write, e.g. 'imp_search.pt', or pass None.")


def _check_search_parts(model: object, train: object, evaluate: object, train_to_rewind_point: object,
                        train_control: object, checkpoint_path: object, checkpoint_settings: object) -> None:
    """Before any training: a model, functions where functions are called (a bad `evaluate` failed after the first
    training, a bad `train_control` after the whole search), a path and a mapping."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module (the network at initialisation), got {type(model).__name__}.")
    functions = {"train": train, "evaluate": evaluate, "train_to_rewind_point": train_to_rewind_point,
                 "train_control": train_control}
    for name, function in functions.items():
        if not callable(function) and (function is not None or name in ("train", "evaluate")):
            said = "model" if name == "evaluate" else "model in place"
            raise TypeError(f"`{name}` must be a function of the {said}, e.g. `def {name}(model): ...`"
                            f"{'' if name in ('train', 'evaluate') else ', or None'}, got {function!r}.")
    check_checkpoint_path(checkpoint_path)
    if checkpoint_settings is not None and not isinstance(checkpoint_settings, Mapping):
        raise TypeError(f"`checkpoint_settings` must be a mapping {{name: value}} (e.g. {{'lr': 0.1}}), or None; got "
                        f"{checkpoint_settings!r}.")


def _remaining_fraction(targets: Sequence[Target]) -> float:
    targets = distinct_targets(targets)
    kept = sum(remaining_count(m, n) for m, n in targets)
    return kept / sum(getattr(m, n).numel() for m, n in targets)


def _random_reinit_control(
    pristine: nn.Module, names: Sequence[str], masks: Mapping[str, Tensor], train: TrainFn, evaluate: EvaluateFn,
    seed: int,
) -> object:
    """Train the same sparse architecture from freshly drawn weights (the control of Frankle & Carbin). The random
    streams are left as they were: with control='every' the ticket's rounds (a shuffling loader draws on them) must
    not depend on whether a control ran before them."""
    states = _random_states()
    try:
        return _trained_control(pristine, names, masks, train, evaluate, seed)
    finally:
        _restore_random_states(states)


def _trained_control(
    pristine: nn.Module, names: Sequence[str], masks: Mapping[str, Tensor], train: TrainFn, evaluate: EvaluateFn,
    seed: int,
) -> object:
    control = deepcopy_model(pristine)
    # what does not train (a frozen pretrained backbone) stays as given, as in every round of the ticket: the control
    # varies the initial values of what the search trains, not fixed features
    frozen = {name: param.detach().clone() for name, param in control.named_parameters() if not param.requires_grad}
    # and every buffer (a BatchNorm's running statistics, which its reset_parameters() resets too), as each round of
    # the ticket rewinds them to the values given
    buffers = [(buffer, buffer.clone()) for buffer in control.buffers()]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        redraw_parameters_(control)
    with torch.no_grad():
        for name, param in control.named_parameters():
            if name in frozen:
                param.copy_(frozen[name])
        for buffer, value in buffers:
            buffer.copy_(value)
    for module in control.modules():  # a frozen tensor pruned before the search: its masked copy of the values kept
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, BasePruningMethod):
                refresh_cached_tensor(module, hook._tensor_name)
    for name in names:
        path, _, tensor = name.rpartition(".")
        set_mask_(control.get_submodule(path), tensor, masks[name])
    keep_bypassed_weights_current_(control)
    train(control)
    return evaluate(control)


_STATE_FORMAT = 3  # 1: rounds rewound the pruned weights only; 2: not the non-persistent buffers, pruned `rate` of
#                     what was left each round


def _random_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        return states
    states["numpy"] = numpy.random.get_state()
    return states


def _restore_random_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        import numpy

        numpy.random.set_state(states["numpy"])


def _writes_files() -> bool:
    """False on every rank but the first of a distributed run (DDP: each rank runs the same search), which would
    otherwise all write one file at once (and say each line of progress once per rank)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def _warn_on_first_rank(message: str) -> None:
    """A warning of the search's set-up or rounds, said once in a distributed run (each rank runs the same search)."""
    if _writes_files():
        warnings.warn(message, UserWarning, stacklevel=3)


def _fingerprint(model: nn.Module) -> str:
    """A digest of `model`'s state (names, shapes, dtypes, values): the network a search starts from."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        if isinstance(value, Tensor) and not value.is_meta:
            digest.update(f"{value.dtype}{value.layout}{tuple(value.shape)}".encode())
            value = value.detach().cpu()
            if value.layout != torch.strided:  # (a graph network's sparse adjacency buffer)
                value = value.to_dense()
            if value.is_quantized:  # its integers and what they stand for (scales, zero points)
                digest.update(value.dequantize().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
                value = value.int_repr()
            digest.update(value.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def _load_search(path: Path, settings: Mapping[str, Any], rounds: int,
                 initial: str | None = None) -> dict[str, Any] | None:
    """The state a search with `settings`, from a network of digest `initial`, saved at `path`, or None when there is
    none yet; an error when the file holds another search (resuming it with other arguments, or another network,
    would mix two searches)."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any file that torch.load cannot read (a bare UnpicklingError)
        raise ValueError(f"checkpoint_path={str(path)!r} is not a file iterative_magnitude_pruning wrote (torch.load: "
                         f"{type(error).__name__}: {error}); pass another path, or remove it to start "
                         "afresh.") from error
    if isinstance(state, dict) and state.get("format") in (1, 2):
        what = ("rewound the pruned weights only (biases and normalisation statistics kept their trained values)"
                if state["format"] == 1 else "did not rewind non-persistent buffers and pruned `rate` of the weights "
                "left, each round rounded on its own")
        raise ValueError(f"checkpoint_path={str(path)!r} holds a search of an earlier litcompress, whose rounds "
                         f"{what}: its rounds cannot go on as this version's. Remove it to start afresh.")
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
        raise ValueError(f"checkpoint_path={str(path)!r} is not a file iterative_magnitude_pruning wrote; pass "
                         "another path, or remove it to start afresh.")
    damage = _damage(state)
    if damage is not None:
        raise ValueError(f"checkpoint_path={str(path)!r} is not a file iterative_magnitude_pruning wrote as it is "
                         f"({damage}): pass another path, or remove it to start afresh.")
    # (a setting the file does not hold, one an earlier version did not record, is not compared)
    differing = [f"{key}={state['settings'][key]!r}, not {value!r}" for key, value in settings.items()
                 if key in state["settings"] and state["settings"][key] != value]
    if differing:
        raise ValueError(f"checkpoint_path={str(path)!r} holds a search with {'; '.join(differing)}: pass the "
                         "arguments it was started with to resume it, or another path to start afresh.")
    saved_initial = state.get("initial")  # (files of earlier versions do not hold it)
    if initial is not None and saved_initial is not None and saved_initial != initial:
        raise ValueError(f"checkpoint_path={str(path)!r} holds a search that started from another network (other "
                         "initial weights, or other layer shapes): pass the model it started from, built with the "
                         "same seed, to resume it, or another path to start afresh.")
    if state["done"] > rounds:
        raise ValueError(f"checkpoint_path={str(path)!r} holds a search that finished round {state['done']}, "
                         f"past rounds={rounds}: pass rounds >= {state['done']}.")
    return state


_STATE_KEYS = {"settings": dict, "done": int, "network": dict, "snapshot": dict, "rest": dict, "rewound": dict,
               "table": list, "random": dict}


def _damage(state: dict) -> str | None:
    """What a search's file lacks or holds amiss (edited, or cut short by another program), or None."""
    for key, kind in _STATE_KEYS.items():
        if key not in state:
            return f"no {key!r}"
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            return f"its {key!r} is of type {type(state[key]).__name__}, not {kind.__name__}"
    if state["done"] < 0 or len(state["table"]) != state["done"] + 1:  # a row per round, the dense one (0) first
        return f"its table holds {len(state['table'])} row(s) for rounds 0 to {state['done']}"
    if not all(isinstance(row, dict) for row in state["table"]):
        return "its table holds rows that are not dicts"
    return None


def iterative_magnitude_pruning(
    model: nn.Module,
    train: TrainFn,
    evaluate: EvaluateFn,
    *,
    rounds: int,
    rate: float = 0.2,
    layer_rates: Mapping[str, float] | None = None,
    parameter_names: Sequence[str] = ("weight",),
    exclude: Sequence[str] = (),
    scope: Scope = "local",
    train_to_rewind_point: TrainFn | None = None,
    control: str = "final",
    train_control: TrainFn | None = None,
    control_seed: int = 12345,
    checkpoint_path: str | os.PathLike[str] | None = None,
    checkpoint_settings: Mapping[str, Any] | None = None,
) -> LotteryTicket:
    """Find a lottery ticket in a copy of `model` (the model passed in is not modified).

    Args:
        model: the network at initialisation.
        train: trains a model in place (a fresh optimizer each call, as IMP prescribes).
        evaluate: returns the metric to report (higher or lower is better: it is only reported).
        rounds: pruning rounds; round r prunes a layer to the sparsity ``1 - (1 - rate) ** r``, that share of its
            n weights rounded (all the pruned weights together under ``scope="global"``), so that about
            ``(1 - rate) ** r`` are left: not `rate` of what is left, each round rounded on its own, which drifted.
        rate: fraction of each layer's remaining weights pruned per round (``scope="local"``), or of all of them
            (``"global"``).
        layer_rates: per-tensor overrides by qualified name, e.g. ``{"net.4.weight": 0.1}`` for the output layer,
            as Frankle & Carbin do (local scope only).
        parameter_names: which tensors of each module to prune (normalisation layers' are left out: their scales
            and shifts are rewound with the rest of the network, never pruned; nor are ``nn.PReLU`` slopes).
        exclude: tensors left dense, by qualified name (``"head.weight"``) or module name (``"head"``): an
            embedding, a frozen layer (which retraining cannot adapt: such tensors are warned of).
        train_to_rewind_point: trains the copy to the rewind point k before the snapshot (late resetting);
            None rewinds to initialisation.
        control: ``"final"`` trains a random re-initialisation with the final mask, ``"every"`` after every
            round, ``"none"`` skips it. Frozen parameters (``requires_grad=False``) keep their values in it, and
            the buffers (running statistics) start from the values given: those the ticket's rounds rewind to when
            rewinding to initialisation (with `train_to_rewind_point`, the ticket's rounds start from the buffers at
            step k, the control from the initial ones).
        train_control: trains the control (default: `train`), e.g. without the checkpoints `train` writes.
        checkpoint_path: a file written after every round (the network with its masks, the rewound weights, the
            table so far, the random number generators' states). When it exists, the search resumes after its last
            round instead of starting afresh: a search killed in round r trains again from round r, and, with
            training that is deterministic, ends as the uninterrupted search would. Resuming asks for the same
            arguments and a `model` of the same initial weights (rounds may grow: the search goes on); a finished
            search returns its ticket at once.
        checkpoint_settings: more values that must equal the saved ones to resume (what `train` does: its
            recipe, a rewind step), compared with ``==`` and stored with the search.

    Returns:
        the ticket: the trained sparse network, its masks, the rewound weights and a table per round (round 0
        is the dense network).
    """
    rounds, rate, layer_rates = checked_search_arguments(rounds, rate, layer_rates, control, scope, parameter_names,
                                                         exclude, control_seed)
    _check_search_parts(model, train, evaluate, train_to_rewind_point, train_control, checkpoint_path,
                        checkpoint_settings)
    control_seed = int(control_seed)  # (numpy's: the saved settings hold Python numbers)
    network = deepcopy_model(model)
    keep_bypassed_weights_current_(network)  # once: the hooks recompute whatever masks the rounds add
    pristine = deepcopy_model(model) if control != "none" else None  # the control's architecture, untrained
    targets = [(module, name) for module, name in default_targets(network, parameter_names)
               if not isinstance(module, _NOT_PRUNED)]
    if not targets:
        raise ValueError(f"nothing to prune: {type(model).__name__} has no {list(parameter_names)} parameter (a "
                         "module that builds its layers later, e.g. in `configure_model`, must have built them).")
    names = qualified_names(network, targets)
    lazy = [name for (module, tensor), name in zip(targets, names) if is_lazy(trainable_tensor(module, tensor))]
    if lazy:  # torch's "uninitialized parameter" error when the snapshot is taken, else
        raise ValueError(f"{', '.join(lazy)}: lazy layers never called, whose weights do not exist yet (nor the "
                         "initial values a ticket rewinds to); call the model once on an example batch before the "
                         "search.")
    found = {name for _, name in targets}
    missing = [name for name in parameter_names if name not in found]
    if missing:  # a misspelt name ('bais') pruned nothing of it, silently
        raise ValueError(f"`parameter_names` {missing}: no pruned module of {type(model).__name__} has such a "
                         f"tensor; the others found: {sorted(found)}.")
    module_names = [name.rpartition(".")[0] for name in names]
    # weight_norm / spectral_norm weights are computed at every access: torch's pruning cannot mask them
    computed = [(path, f"{path}.{name}" if path else name) for path, _, name in parametrized_tensors(network)
                if name in parameter_names]
    unknown = sorted(set(exclude) - set(names) - set(module_names) - {n for pair in computed for n in pair})
    if unknown:
        raise ValueError(f"`exclude` names {unknown}, which are neither pruned tensors nor their modules"
                         f"{close_names(unknown, names + module_names)}; choose from {names}.")
    skipped = [name for path, name in computed if name not in exclude and path not in exclude]
    if skipped:  # ModelPruning warns of them too: the table's sparsity would not count them
        _warn_on_first_rank(f"iterative_magnitude_pruning leaves out {len(skipped)} parametrized tensor(s), which "
                      f"torch.nn.utils.prune cannot mask: {', '.join(skipped)}; they stay dense. To prune them, call "
                      "litcompress.pruning.fold_parametrizations_(model) before the search (each becomes a plain "
                      "layer holding its current weight), or exclude them to silence this.")
    kept = [i for i, (name, path) in enumerate(zip(names, module_names)) if name not in exclude and path not in exclude]
    if not kept:
        raise ValueError(f"`exclude` {list(exclude)} leaves nothing to prune of {names}.")
    # tied weights (a language model's head holding its embedding's matrix) are one tensor: one mask, or none
    keys = [tensor_key(m, n) for m, n in targets]
    half_excluded = [(names[i], names[j]) for i in range(len(names)) if i not in kept
                     for j in kept if keys[j] == keys[i]]
    if half_excluded:
        left, pruned = half_excluded[0]
        raise ValueError(f"`exclude` leaves {left} dense, but it is the same tensor as {pruned} (tied weights), "
                         f"which would be pruned: the one matrix cannot be both. Exclude both, or neither.")
    every_target = targets
    targets, names, keys = [targets[i] for i in kept], [names[i] for i in kept], [keys[i] for i in kept]
    # (the targets before `exclude`: a layer excluded is dense as asked)
    left_out = {path: kept_dense for path, matrices in matrices_left_out(network, every_target).items()
                if path not in exclude and (kept_dense := [n for n in matrices if f"{path}.{n}" not in exclude])
                } if "weight" in parameter_names else {}
    if left_out:  # the table's "remaining" counts the pruned tensors only: a 12.5% ticket could be nearly dense
        missing = list(dict.fromkeys(name for matrices in left_out.values() for name in matrices
                                     if name not in parameter_names))
        _warn_on_first_rank(left_out_message(
            "iterative_magnitude_pruning", network, left_out, "the table's sparsity leaves them out. Name them in "
            f"parameter_names to prune them too: parameter_names={[*parameter_names, *missing]!r}."))
    frozen = [name for (module, tensor), name in zip(targets, names)
              if not trainable_tensor(module, tensor).requires_grad]
    if frozen:  # ModelPruning warns of them too
        _warn_on_first_rank(f"iterative_magnitude_pruning: {frozen} do not train (requires_grad=False): pruned, they "
                            "are never retrained; leave them dense with exclude=[...].")
    unknown = set(layer_rates) - set(names)
    if unknown:
        raise ValueError(f"`layer_rates` names {sorted(unknown)}, which are not pruned tensors; choose from {names}.")
    if layer_rates and scope == "global":
        raise ValueError("`layer_rates` needs `scope='local'`: global pruning ranks all layers together.")
    tied_groups: dict[object, list[int]] = {}  # per tensor, the indices of its targets (several when tied)
    for i, key in enumerate(keys):
        tied_groups.setdefault(key, []).append(i)
    for group in tied_groups.values():
        if len({layer_rates.get(names[i], rate) for i in group}) > 1:
            raise ValueError(f"`layer_rates`: {' and '.join(names[i] for i in group)} are the same tensor (tied "
                             "weights), pruned with one mask: give them one rate.")

    def state_now() -> dict[str, Tensor]:
        # (a module's get_extra_state may be any object: a format version, a vocabulary)
        return {k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)
                for k, v in network.state_dict().items()}

    pruned_keys = {f"{name}{suffix}" for name in names for suffix in ("", "_orig", "_mask")}

    def the_rest() -> dict[str, Tensor]:
        """Everything in the network's state but the pruned tensors (and their masks), as it is now: its
        non-persistent buffers too, which a state dict leaves out (each round went on from the last one's trained
        values, where the control starts from those given)."""
        rest = {k: v for k, v in state_now().items() if k not in pruned_keys}
        rest.update({name: buffer.detach().clone() for name, buffer in network.named_buffers()
                     if name not in rest and name not in pruned_keys})
        return rest

    path = None if checkpoint_path is None else Path(checkpoint_path)
    if path is not None:  # before any training: a file that cannot be written would fail after the first round
        if path.is_dir():
            raise IsADirectoryError(f"checkpoint_path={str(path)!r} is a directory; name a file in it, e.g. "
                                    f"{str(path / 'imp.pt')!r}.")
        blocking = what_is_in_the_way(path.parent)
        if blocking is not None:  # (mkdir's "Not a directory")
            raise NotADirectoryError(f"checkpoint_path={str(path)!r}: {blocking}.")
        why = cannot_write(path.parent)  # (made if missing; one that cannot be written failed after round 0)
        if why is not None:
            raise PermissionError(f"checkpoint_path={str(path)!r}: cannot write there ({why}); give a path in a "
                                  "folder this process can write to.")
    settings = dict(names=names, parameter_names=list(parameter_names), rate=rate, layer_rates=layer_rates,
                    scope=scope, control=control, control_seed=control_seed,
                    rewinds_late=train_to_rewind_point is not None, **dict(checkpoint_settings or {}))
    # the network as given (rank 0's, which writes the file: under DDP another rank's may differ until synced)
    initial = _fingerprint(model) if path is not None and _writes_files() else None
    saved = None if path is None else _load_search(path, settings, rounds, initial)
    if saved is None:
        if train_to_rewind_point is not None:
            train_to_rewind_point(network)
        snapshot, rest = take_snapshot(targets), the_rest()
        rewound: dict[str, Tensor] = {}  # set after the last pruning round (rounds >= 1)
        table: list[IMPRound] = []
    else:
        for name, (module, tensor) in zip(names, targets):
            if f"{name}_mask" in saved["network"]:
                set_mask_(module, tensor, saved["network"][f"{name}_mask"])
        network.load_state_dict(saved["network"])
        with torch.no_grad():  # `weight` as the loaded orig * mask, as after the round's last forward
            for module, tensor in targets:
                refresh_cached_tensor(module, tensor)
        snapshot = take_snapshot(targets)
        with torch.no_grad():
            for i, name in enumerate(names):
                snapshot_tensor(snapshot, i).copy_(saved["snapshot"][name])
        rest, rewound, table = saved["rest"], saved["rewound"], [IMPRound(**row) for row in saved["table"]]
        _restore_random_states(saved["random"])
        if _writes_files():  # (rank 0 only: each rank runs the same search)
            log.info(f"IMP: resumed from {path} after round {saved['done']} of {rounds}"
                     + (" (finished)" if saved["done"] == rounds else ""))

    warned_empty: set[str] = set()
    for r in range(len(table), rounds + 1):
        if r > 0:
            # to what r rounds leave, (1 - rate) ** r of the weights (pruning `rate` of those left, each round
            # rounded on its own, drifted from it, and a small layer stopped losing weights without a word)
            if scope == "global":
                prune_to_sparsity_(targets, "l1_unstructured", 1.0 - (1.0 - rate) ** r, scope="global")
            else:  # a tied tensor once, under all its holders
                for group in tied_groups.values():
                    kept = (1.0 - layer_rates.get(names[group[0]], rate)) ** r
                    prune_to_sparsity_([targets[i] for i in group], "l1_unstructured", 1.0 - kept, scope="local")
            empty = {(id(module), tensor) for module, tensor in emptied_targets(targets)}
            emptied = [name for name, (module, tensor) in zip(names, targets)
                       if (id(module), tensor) in empty and name not in warned_empty]
            if emptied:  # as ModelPruning and GradualPruner say it
                warned_empty.update(emptied)
                _warn_on_first_rank(emptied_message(f"iterative_magnitude_pruning (round {r})", emptied, scope,
                                                    per_layer="scope='local'", targets="the search (exclude=[...])"))
            rewind_(targets, snapshot)
            _load_in_place_(network, rest)
            if r == rounds:  # the ticket: the final mask on the rewound weights
                rewound = state_now()
        train(network)
        metric = _metric(evaluate(network), f"in round {r}")
        run_control = r > 0 and (control == "every" or (control == "final" and r == rounds))
        control_metric = None
        if run_control:
            assert pristine is not None
            control_metric = _metric(
                _random_reinit_control(pristine, names, _masks(names, targets), train_control or train, evaluate,
                                       control_seed + r),
                f"for the random re-initialisation control of round {r}")
        table.append(IMPRound(r, _remaining_fraction(targets), metric, control_metric))
        control_note = "" if control_metric is None else f", random re-init {control_metric:.4f}"
        if _writes_files():  # a search runs for hours: its progress, round by round (rank 0's)
            log.info(f"IMP round {r}/{rounds}: {percent(table[-1].remaining, 2)} of the weights left, metric "
                     f"{metric:.4f}{control_note}")
        if path is not None and _writes_files():
            with written_atomically(path) as partial:  # a search killed while writing keeps its previous file
                torch.save(dict(format=_STATE_FORMAT, settings=settings, initial=initial, done=r,
                                network=state_now(),
                                snapshot={name: snapshot_tensor(snapshot, i) for i, name in enumerate(names)},
                                rest=rest, rewound=rewound, table=[dataclasses.asdict(row) for row in table],
                                random=_random_states()), partial)
    return LotteryTicket(model=network, masks=_masks(names, targets), rewound_state=rewound, rounds=table)


def _metric(value: object, where: str) -> float:
    """`evaluate`'s answer as a float: a number (or a one-element tensor or array); else refused in words, as NaN is
    (float() of None, or of a tensor of several values, said it in torch's or Python's words)."""
    try:
        metric = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"`evaluate` returned {type(value).__name__} {where}; it must return a number (e.g. the "
                        "accuracy as a float).") from None
    if math.isnan(metric):
        raise ValueError(f"`evaluate` returned NaN {where}; it must return a number.")
    return metric


def _load_in_place_(network: nn.Module, values: Mapping[str, Tensor]) -> None:
    """Copy `values` into the network's own parameters and buffers of those names (an optimizer built on them, or a
    Trainer holding them, keeps them)."""
    own = network.state_dict(keep_vars=True)
    unsaved = {}  # non-persistent buffers (in a round's rewind point), which no optimizer holds
    for name, buffer in network.named_buffers():
        if name not in own:
            unsaved[name] = own[name] = buffer
    held = {id(tensor) for tensor in (*network.parameters(), *network.buffers())}
    extra = {}  # a module's extra state (get_extra_state's object, a tensor too): its set_extra_state takes it
    with torch.no_grad():
        for key, value in values.items():
            if key in unsaved and unsaved[key].shape != value.shape:  # a cache forward regrew: set as it was
                path, _, leaf = key.rpartition(".")
                network.get_submodule(path)._buffers[leaf] = value.clone()
            elif key in unsaved or (key in own and isinstance(own[key], Tensor) and id(own[key]) in held):
                own[key].copy_(value)
            elif key in own:
                extra[key] = value
            # (else a non-persistent buffer the network no longer has, renamed since a resumed file: nothing to do)
    if extra:
        network.load_state_dict(extra, strict=False)


def _masks(names: Sequence[str], targets: Sequence[Target]) -> dict[str, Tensor]:
    return {n: mask_of(m, t).detach().clone() for n, (m, t) in zip(names, targets) if is_pruned(m, t)}
