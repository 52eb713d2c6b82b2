"""Sparsity schedules for gradual pruning.

A schedule maps training progress ``t`` (optimizer steps or finished epochs, see
``unit``) to the *target total sparsity* of the pruned parameters, and says at which
``t`` a pruning round runs. Schedules are immutable and validated on construction.
The engine turns a target into an exact number of entries with :func:`count_to_prune`,
so the final sparsity is hit exactly.
"""

from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Literal

from litcompress._numbers import as_python_number, python_numbers_

__all__ = [
    "ConstantSparsity",
    "CallableSchedule",
    "CubicSchedule",
    "IterativeSchedule",
    "LinearSchedule",
    "PolynomialDecay",
    "SparsitySchedule",
    "Unit",
    "count_to_prune",
    "increment_for_target",
]

Unit = Literal["step", "epoch"]
_UNITS = ("step", "epoch")


# ----------------------------------------------------------------------------- validation
def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={value!r} must be an int (got {type(value).__name__}); pass a whole number >= {minimum}")
    if value < minimum:
        raise ValueError(f"{name}={value!r} must be >= {minimum}; pass a whole number >= {minimum}")


def _check_fraction(name: str, value: object, *, allow_one: bool = False) -> None:
    upper = "1]" if allow_one else "1)"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"{name}={value!r} must be a float in [0, {upper} (got {type(value).__name__}); pass e.g. {name}=0.5"
        )
    in_range = 0.0 <= value <= 1.0 if allow_one else 0.0 <= value < 1.0
    if not in_range:  # also catches NaN
        raise ValueError(f"{name}={value!r} is outside [0, {upper}; pass a sparsity fraction such as {name}=0.9")


def _check_unit(unit: object) -> None:
    if unit not in _UNITS:
        raise ValueError(f"unit={unit!r} is not supported; pass unit='step' or unit='epoch'")


def check_progress(t: object) -> None:
    """ValueError unless `t` is a whole step or epoch count (an int >= 0)."""
    if isinstance(t, bool) or not isinstance(t, numbers.Integral):
        raise ValueError(f"t={t!r} must be an int step or epoch count (got {type(t).__name__})")
    if t < 0:  # a negative count read as "before begin": a schedule with begin=0 gave its initial sparsity
        raise ValueError(f"t={t!r} must be a step or epoch count >= 0")


def _on_grid(t: int, begin: int, end: int, frequency: int) -> bool:
    """Pruning points: begin, every `frequency` after it, and `end` exactly."""
    return begin <= t <= end and ((t - begin) % frequency == 0 or t == end)


# ----------------------------------------------------------------------------- base class
class SparsitySchedule(abc.ABC):
    """Target total sparsity as a function of training progress.

    Concrete schedules provide ``unit`` (what ``t`` counts: ``"step"`` for optimizer steps,
    ``"epoch"`` for finished epochs), ``final_sparsity`` (the sparsity reached at ``end``)
    and ``end`` (the last progress at which a pruning round runs).
    """

    unit: Unit
    final_sparsity: float
    begin: int
    end: int

    @abc.abstractmethod
    def target(self, t: int) -> float:
        """Target total sparsity in [0, 1) at progress ``t``."""

    @abc.abstractmethod
    def should_prune(self, t: int) -> bool:
        """True at the progress values where a pruning round must run."""

    def last_point(self, after: int, upto: int) -> int | None:
        """The last pruning point in ``(after, upto]``, or None. Progress can move by more than one between two
        looks: with manual optimization, ``trainer.global_step`` counts every optimizer's steps (a GAN's two per
        batch), so a point passed over still owes its round, run late with that point's target."""
        return next((u for u in range(min(upto, self.end), max(after, self.begin - 1), -1) if self.should_prune(u)),
                    None)

    def reached_by(self, t: int) -> float:
        """The target of the last round at or before progress `t`: where a run stopped at `t` is (0 before the
        first round)."""
        return next((self.target(u) for u in range(min(t, self.end), self.begin - 1, -1) if self.should_prune(u)),
                    0.0)


# ----------------------------------------------------------------------------- polynomial
@dataclass(frozen=True, kw_only=True)
class PolynomialDecay(SparsitySchedule):
    """Zhu & Gupta (2017) gradual pruning:
    ``s_t = s_f + (s_i - s_f) * (1 - (t - begin) / (end - begin)) ** power`` for begin <= t <= end.

    Before ``begin`` the target is ``initial_sparsity`` but no round runs; after ``end`` it is
    ``final_sparsity``. Rounds run at ``begin``, every ``frequency`` after it, and at ``end``; or, with
    ``rounds`` instead of ``frequency``, at ``begin`` and ``rounds`` points spread evenly over ``(begin, end]``
    (gaps differ by at most one; every step when the span is shorter). ``target(begin) == initial_sparsity`` and
    ``target(end) == final_sparsity`` exactly.
    """

    final_sparsity: float
    begin: int
    end: int
    initial_sparsity: float = 0.0
    frequency: int = 1
    rounds: int | None = None
    power: float = 3
    unit: Unit = "step"

    def __post_init__(self) -> None:
        python_numbers_(self)
        _check_fraction("final_sparsity", self.final_sparsity)
        _check_fraction("initial_sparsity", self.initial_sparsity)
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"initial_sparsity={self.initial_sparsity!r} is above final_sparsity={self.final_sparsity!r}; "
                "sparsity only grows: pass initial_sparsity <= final_sparsity"
            )
        _check_int("begin", self.begin, minimum=0)
        _check_int("end", self.end, minimum=0)
        if self.end <= self.begin:
            raise ValueError(
                f"schedule ends before it starts: end={self.end!r} <= begin={self.begin!r}; pass end > begin"
            )
        _check_int("frequency", self.frequency, minimum=1)
        if self.rounds is not None:
            _check_int("rounds", self.rounds, minimum=1)
            if self.frequency != 1:
                raise ValueError(f"frequency={self.frequency!r} and rounds={self.rounds!r} both place the rounds; "
                                 "pass one of them")
        if isinstance(self.power, bool) or not isinstance(self.power, (int, float)) or not self.power > 0:
            raise ValueError(f"power={self.power!r} must be a number > 0; pass e.g. power=3 (cubic) or power=1 (linear)")
        if math.isinf(self.power):
            raise ValueError(f"power={self.power!r} must be finite; pass e.g. power=3")
        _check_unit(self.unit)

    def __repr__(self) -> str:
        # `rounds` shown only when given: the repr is part of the pruning callbacks' state keys, which checkpoints
        # written before it existed hold their states under
        shown = [f for f in fields(self) if f.repr and not (f.name == "rounds" and self.rounds is None)]
        return f"{type(self).__qualname__}({', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in shown)})"

    def target(self, t: int) -> float:
        check_progress(t)
        if t <= self.begin:
            return float(self.initial_sparsity)
        if t >= self.end:
            return float(self.final_sparsity)
        remaining = 1.0 - (t - self.begin) / (self.end - self.begin)
        value = self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * remaining**self.power
        # Clamp rounding noise so the curve stays monotone and inside its endpoints.
        return float(min(self.final_sparsity, max(self.initial_sparsity, value)))

    def should_prune(self, t: int) -> bool:
        check_progress(t)
        if self.rounds is None:
            return _on_grid(t, self.begin, self.end, self.frequency)
        if not self.begin <= t <= self.end:
            return False
        # the points are begin + ceil(k * span / rounds), k = 0..rounds: t is one when the first k whose point is at
        # or after it (k * span / rounds > offset - 1) lands on it
        offset, span = t - self.begin, self.end - self.begin
        first_k = (offset - 1) * self.rounds // span + 1
        return offset == 0 or -(-first_k * span // self.rounds) == offset


@dataclass(frozen=True, kw_only=True, repr=False)  # (PolynomialDecay's repr)
class CubicSchedule(PolynomialDecay):
    """:class:`PolynomialDecay` with the cubic exponent (``power=3``) of Zhu & Gupta fixed."""

    power: float = field(default=3, init=False)


@dataclass(frozen=True, kw_only=True, repr=False)  # (PolynomialDecay's repr)
class LinearSchedule(PolynomialDecay):
    """Sparsity grows linearly from ``initial_sparsity`` at ``begin`` to ``final_sparsity`` at ``end``."""

    power: float = field(default=1, init=False)


# ----------------------------------------------------------------------------- constant
@dataclass(frozen=True)
class ConstantSparsity(SparsitySchedule):
    """TF-MOT style: target is ``sparsity`` from ``begin`` on (0 before).

    Rounds run at ``begin``, every ``frequency`` after it, and at ``end``. ``end=None`` means a
    single round at ``begin`` (``end`` is then set to ``begin``).
    """

    sparsity: float
    begin: int = 0
    end: int = None  # type: ignore[assignment]  # None -> begin, normalised in __post_init__
    frequency: int = 1
    unit: Unit = "step"

    def __post_init__(self) -> None:
        python_numbers_(self)
        _check_fraction("sparsity", self.sparsity)
        _check_int("begin", self.begin, minimum=0)
        if self.end is None:
            object.__setattr__(self, "end", self.begin)  # frozen: set the normalised value once
        _check_int("end", self.end, minimum=0)
        if self.end < self.begin:
            raise ValueError(
                f"schedule ends before it starts: end={self.end!r} < begin={self.begin!r}; "
                "pass end >= begin, or end=None for a single round at begin"
            )
        _check_int("frequency", self.frequency, minimum=1)
        _check_unit(self.unit)

    @property
    def final_sparsity(self) -> float:  # type: ignore[override]
        return float(self.sparsity)

    def target(self, t: int) -> float:
        check_progress(t)
        return float(self.sparsity) if t >= self.begin else 0.0

    def should_prune(self, t: int) -> bool:
        check_progress(t)
        return _on_grid(t, self.begin, self.end, self.frequency)


# ----------------------------------------------------------------------------- iterative
@dataclass(frozen=True)
class IterativeSchedule(SparsitySchedule):
    """Iterative magnitude pruning: each of ``rounds`` rounds prunes ``rate_per_round`` of the
    weights still kept, so after r rounds the kept fraction is ``(1 - rate_per_round) ** r``.

    Rounds run at ``begin + i * frequency`` for ``i`` in ``0 .. rounds - 1``;
    ``target(t) = 1 - (1 - rate_per_round) ** r`` with r the number of rounds at or before ``t``.
    ``t`` counts finished units, so the default ``begin=1`` prunes first after one epoch (or step) of training.
    """

    rate_per_round: float
    rounds: int
    begin: int = 1
    frequency: int = 1
    unit: Unit = "epoch"

    def __post_init__(self) -> None:
        python_numbers_(self)
        _check_fraction("rate_per_round", self.rate_per_round)
        _check_int("rounds", self.rounds, minimum=1)
        _check_int("begin", self.begin, minimum=0)
        _check_int("frequency", self.frequency, minimum=1)
        _check_unit(self.unit)
        if not self.final_sparsity < 1.0:
            raise ValueError(
                f"rate_per_round={self.rate_per_round!r} over rounds={self.rounds!r} rounds reaches sparsity 1.0 "
                "in floating point; pass fewer rounds or a smaller rate_per_round"
            )

    @property
    def end(self) -> int:  # type: ignore[override]
        return self.begin + (self.rounds - 1) * self.frequency

    @property
    def final_sparsity(self) -> float:  # type: ignore[override]
        return self._sparsity_after(self.rounds)

    def _sparsity_after(self, rounds_done: int) -> float:
        return 1.0 - (1.0 - self.rate_per_round) ** rounds_done

    def target(self, t: int) -> float:
        check_progress(t)
        if t < self.begin:
            return 0.0
        rounds_done = min(self.rounds, (t - self.begin) // self.frequency + 1)
        return self._sparsity_after(rounds_done)

    def should_prune(self, t: int) -> bool:
        check_progress(t)
        return _on_grid(t, self.begin, self.end, self.frequency)


# ----------------------------------------------------------------------------- callable
@dataclass(frozen=True, kw_only=True)
class CallableSchedule(SparsitySchedule):
    """Wraps a user callable ``fn(t) -> target sparsity``; each result is validated when called
    (a real number in [0, 1)), ``fn(end)`` already at construction (else a run would fail at its last round).

    Rounds run at ``begin``, every ``frequency`` after it, and at ``end``; ``final_sparsity`` is
    ``fn(end)``. A decreasing ``fn`` never un-prunes: the engine prunes 0 entries then.
    """

    fn: Callable[[int], float]
    end: int
    begin: int = 0
    frequency: int = 1
    unit: Unit = "step"

    def __post_init__(self) -> None:
        python_numbers_(self)
        if not callable(self.fn):
            raise ValueError(f"fn={self.fn!r} is not callable; pass a function t -> target sparsity")
        _check_int("begin", self.begin, minimum=0)
        _check_int("end", self.end, minimum=0)
        if self.end < self.begin:
            raise ValueError(
                f"schedule ends before it starts: end={self.end!r} < begin={self.begin!r}; pass end >= begin"
            )
        _check_int("frequency", self.frequency, minimum=1)
        _check_unit(self.unit)
        self.target(self.end)  # the final sparsity: a value outside [0, 1) fails here, not after training

    @property
    def final_sparsity(self) -> float:  # type: ignore[override]
        return self.target(self.end)

    def target(self, t: int) -> float:
        check_progress(t)
        value = self.fn(t)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
            raise ValueError(
                f"schedule callable {self.fn!r} returned {value!r} at t={t}; it must return a float in [0, 1)"
            )
        return float(value)

    def should_prune(self, t: int) -> bool:
        check_progress(t)
        return _on_grid(t, self.begin, self.end, self.frequency)

    def reached_by(self, t: int) -> float:
        """The highest target of the rounds at or before `t`: a decreasing ``fn`` never un-prunes, so a run stopped
        at `t` is there (the last round's target said "stop at 10%" of a model at 50%)."""
        rounds = [*range(self.begin, min(t, self.end) + 1, self.frequency)] + ([self.end] if self.end <= t else [])
        return max((self.target(u) for u in rounds if self.should_prune(u)), default=0.0)


# ----------------------------------------------------------------------------- helpers
def increment_for_target(current_sparsity: float, target_sparsity: float) -> float:
    """Fraction of the *remaining* (kept) weights to prune so that total sparsity goes from
    ``current_sparsity`` to ``target_sparsity``: ``(target - current) / (1 - current)``, clipped at 0."""
    _check_fraction("current_sparsity", current_sparsity)
    _check_fraction("target_sparsity", target_sparsity, allow_one=True)
    return max(0.0, (target_sparsity - current_sparsity) / (1.0 - current_sparsity))


def check_channel_multiple(keep_multiple_of: object, owner: str) -> int | None:
    """`keep_multiple_of` as Python's int (numpy's ``int64(16)`` too), or None; ValueError for anything but an int
    >= 1 (0, -16 and True were ignored, 16.0 failed inside the rounding)."""
    if keep_multiple_of is None:
        return None
    number = as_python_number(keep_multiple_of)
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ValueError(f"{owner}(keep_multiple_of={keep_multiple_of!r}): expected an int >= 1 (e.g. 8 or 16), or "
                         "None.")
    return number


def kept_multiple(n_total: int, kept: int, multiple: int | None) -> int:
    """`kept` rounded up to a multiple of `multiple` (at most `n_total`; unchanged without `multiple`): kernels run
    faster on channel counts that fill their SIMD blocks."""
    if multiple is None or multiple <= 1:
        return kept
    return min(n_total, -(-kept // multiple) * multiple)


def block_multiple(keep_multiple_of: int | None, blocks: int) -> int | None:
    """The multiple each of `blocks` equal blocks of slices (a grouped conv's groups), pruned alike, keeps so that
    the layer keeps a multiple of `keep_multiple_of`: 64 channels in 4 groups keep 32, a multiple of 16, with 8 per
    group (rounding each group to 16 kept all 64)."""
    return None if keep_multiple_of is None else keep_multiple_of // math.gcd(keep_multiple_of, blocks)


def rounded_pruned_count(n_total: int, target: float, keep_multiple_of: int | None = None) -> int:
    """``round(target * n_total)``, or with `keep_multiple_of` the most pruned slices up to that many that leave a
    multiple of it (or all `n_total`, :func:`kept_multiple`). Never more than the unrounded count, and
    non-decreasing in `target`."""
    return n_total - kept_multiple(n_total, n_total - round(target * n_total), keep_multiple_of)


def structured_pruned_count(n_total: int, target: float, keep_multiple_of: int | None = None) -> int:
    """:func:`rounded_pruned_count` of a layer's rows/channels, leaving at least one (a multiple of
    `keep_multiple_of`): a layer with every channel pruned outputs a constant (0.75 of 2 rounds to both), which
    costs the model its input there and lets shrink remove nothing."""
    return min(rounded_pruned_count(n_total, target, keep_multiple_of),
               n_total - kept_multiple(n_total, 1, keep_multiple_of))


def count_to_prune(n_total: int, n_pruned: int, target: float) -> int:
    """Exact number of further entries to prune so that ``n_pruned`` becomes
    ``round(target * n_total)``; 0 when already at or above it (never negative)."""
    _check_int("n_total", n_total, minimum=0)
    _check_int("n_pruned", n_pruned, minimum=0)
    if n_pruned > n_total:
        raise ValueError(f"n_pruned={n_pruned!r} exceeds n_total={n_total!r}; pass 0 <= n_pruned <= n_total")
    _check_fraction("target", target, allow_one=True)
    return max(0, round(target * n_total) - n_pruned)
