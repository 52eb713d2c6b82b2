"""Iterative magnitude pruning (IMP) for lottery tickets (Frankle & Carbin 2019; Frankle et al. 2019).

train -> prune p% of each layer's remaining weights by magnitude -> rewind survivors to their values at
initialisation (or at an early point k) -> retrain, for R rounds. Framework-free: training and evaluation are
callables, so a plain loop or a Lightning `Trainer` (see :mod:`litcompress.callbacks.lottery`) can drive it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from litcompress.pruning.engine import (
    Scope,
    Target,
    deepcopy_model,
    default_targets,
    distinct_targets,
    is_pruned,
    keep_bypassed_weights_current_,
    mask_of,
    prune_,
    qualified_names,
    remaining_count,
    set_mask_,
)
from litcompress.pruning.lottery import rewind_, take_snapshot

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
            lines.append(f"{r.round:>5}  {r.remaining:>8.2%}  {r.metric:.4f}  {control:>14}")
        return "\n".join(lines)


def _validate(rounds: int, rate: float, layer_rates: Mapping[str, float], control: str) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"`rounds` must be an int >= 1, got {rounds!r}.")
    for name, value in {"rate": rate, **{f"layer_rates[{k!r}]": v for k, v in layer_rates.items()}}.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 < value < 1:
            raise ValueError(f"`{name}` must be a fraction in (0, 1) of the remaining weights, got {value!r}.")
    if control not in ("none", "final", "every"):
        raise ValueError(f"`control` must be 'none', 'final' or 'every', got {control!r}.")


def _remaining_fraction(targets: Sequence[Target]) -> float:
    targets = distinct_targets(targets)
    kept = sum(remaining_count(m, n) for m, n in targets)
    return kept / sum(getattr(m, n).numel() for m, n in targets)


def _random_reinit_control(
    pristine: nn.Module, names: Sequence[str], masks: Mapping[str, Tensor], train: TrainFn, evaluate: EvaluateFn,
    seed: int,
) -> float:
    """Train the same sparse architecture from freshly drawn weights (the control of Frankle & Carbin)."""
    control = deepcopy_model(pristine)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for module in control.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
    for name in names:
        path, _, tensor = name.rpartition(".")
        set_mask_(control.get_submodule(path), tensor, masks[name])
    keep_bypassed_weights_current_(control)
    train(control)
    return float(evaluate(control))


def iterative_magnitude_pruning(
    model: nn.Module,
    train: TrainFn,
    evaluate: EvaluateFn,
    *,
    rounds: int,
    rate: float = 0.2,
    layer_rates: Mapping[str, float] | None = None,
    parameter_names: Sequence[str] = ("weight",),
    scope: Scope = "local",
    train_to_rewind_point: TrainFn | None = None,
    control: str = "final",
    control_seed: int = 12345,
) -> LotteryTicket:
    """Find a lottery ticket in a copy of `model` (the model passed in is not modified).

    Args:
        model: the network at initialisation.
        train: trains a model in place (a fresh optimizer each call, as IMP prescribes).
        evaluate: returns the metric to report (higher or lower is better: it is only reported).
        rounds: pruning rounds; after r rounds a layer keeps ``(1 - rate) ** r`` of its weights.
        rate: fraction of each layer's remaining weights pruned per round (``scope="local"``), or of all of them
            (``"global"``).
        layer_rates: per-tensor overrides by qualified name, e.g. ``{"net.4.weight": 0.1}`` for the output layer,
            as Frankle & Carbin do (local scope only).
        parameter_names: which tensors of each module to prune.
        train_to_rewind_point: trains the copy to the rewind point k before the snapshot (late resetting);
            None rewinds to initialisation.
        control: ``"final"`` trains a random re-initialisation with the final mask, ``"every"`` after every
            round, ``"none"`` skips it.

    Returns:
        the ticket: the trained sparse network, its masks, the rewound weights and a table per round (round 0
        is the dense network).
    """
    layer_rates = dict(layer_rates or {})
    _validate(rounds, rate, layer_rates, control)
    network = deepcopy_model(model)
    keep_bypassed_weights_current_(network)  # once: the hooks recompute whatever masks the rounds add
    pristine = deepcopy_model(model) if control != "none" else None  # the control's architecture, untrained
    targets = default_targets(network, parameter_names)
    if not targets:
        raise ValueError(f"nothing to prune: {type(model).__name__} has no {list(parameter_names)} parameter (a "
                         "module that builds its layers later, e.g. in `configure_model`, must have built them).")
    names = qualified_names(network, targets)
    unknown = set(layer_rates) - set(names)
    if unknown:
        raise ValueError(f"`layer_rates` names {sorted(unknown)}, which are not pruned tensors; choose from {names}.")
    if layer_rates and scope == "global":
        raise ValueError("`layer_rates` needs `scope='local'`: global pruning ranks all layers together.")

    if train_to_rewind_point is not None:
        train_to_rewind_point(network)
    snapshot = take_snapshot(targets)

    def state_now() -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in network.state_dict().items()}

    rewound: dict[str, Tensor] = {}  # set after the last pruning round (rounds >= 1)

    table: list[IMPRound] = []
    for r in range(rounds + 1):
        if r > 0:
            if scope == "global":
                prune_(targets, "l1_unstructured", rate, scope="global")
            else:
                for name, target in zip(names, targets):
                    prune_([target], "l1_unstructured", layer_rates.get(name, rate), scope="local")
            rewind_(targets, snapshot)
            if r == rounds:  # the ticket: the final mask on the rewound weights
                rewound = state_now()
        train(network)
        metric = float(evaluate(network))
        if math.isnan(metric):
            raise ValueError(f"`evaluate` returned NaN in round {r}; it must return a number.")
        run_control = r > 0 and (control == "every" or (control == "final" and r == rounds))
        control_metric = None
        if run_control or r == rounds:
            masks = {n: mask_of(m, t).detach().clone() for n, (m, t) in zip(names, targets) if is_pruned(m, t)}
        if run_control:
            assert pristine is not None
            control_metric = _random_reinit_control(pristine, names, masks, train, evaluate, control_seed + r)
        table.append(IMPRound(r, _remaining_fraction(targets), metric, control_metric))
    return LotteryTicket(model=network, masks=masks, rewound_state=rewound, rounds=table)
