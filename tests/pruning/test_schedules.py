"""Property and validation tests for litcompress.pruning.schedules."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from litcompress.pruning.schedules import (
    CallableSchedule,
    ConstantSparsity,
    CubicSchedule,
    IterativeSchedule,
    LinearSchedule,
    PolynomialDecay,
    SparsitySchedule,
    count_to_prune,
    rounded_pruned_count,
    increment_for_target,
)

fractions = st.floats(min_value=0.0, max_value=1.0, exclude_max=True, allow_nan=False)


@st.composite
def polynomial_schedules(draw: st.DrawFn) -> PolynomialDecay:
    low, high = sorted((draw(fractions), draw(fractions)))
    begin = draw(st.integers(0, 1_000))
    end = begin + draw(st.integers(1, 5_000))
    kind = draw(st.sampled_from(["poly", "cubic", "linear"]))
    common = dict(
        initial_sparsity=low,
        final_sparsity=high,
        begin=begin,
        end=end,
        frequency=draw(st.integers(1, 500)),
        unit=draw(st.sampled_from(["step", "epoch"])),
    )
    if kind == "cubic":
        return CubicSchedule(**common)
    if kind == "linear":
        return LinearSchedule(**common)
    return PolynomialDecay(power=draw(st.floats(min_value=0.05, max_value=20.0)), **common)


@st.composite
def any_schedules(draw: st.DrawFn) -> SparsitySchedule:
    kind = draw(st.sampled_from(["poly", "constant", "iterative"]))
    if kind == "poly":
        return draw(polynomial_schedules())
    if kind == "constant":
        begin = draw(st.integers(0, 1_000))
        end = draw(st.one_of(st.none(), st.integers(begin, begin + 3_000)))
        return ConstantSparsity(draw(fractions), begin=begin, end=end, frequency=draw(st.integers(1, 100)))
    return IterativeSchedule(
        draw(st.floats(min_value=0.0, max_value=0.5)),
        draw(st.integers(1, 30)),
        begin=draw(st.integers(0, 100)),
        frequency=draw(st.integers(1, 20)),
    )


def progress_points(schedule: SparsitySchedule) -> list[int]:
    """Every t around the schedule's active range (sampled when long, keeping the grid edges)."""
    end = schedule.end
    points = set(range(0, min(end + 3, 400)))
    points.update(range(max(0, end - 200), end + 3))
    points.update(range(0, end + 3, max(1, end // 300)))
    return sorted(points)


@settings(max_examples=150, deadline=None)
@given(schedule=any_schedules())
def test_target_is_monotone_non_decreasing_and_in_unit_interval(schedule: SparsitySchedule) -> None:
    previous = -1.0
    for t in progress_points(schedule):
        value = schedule.target(t)
        assert isinstance(value, float)
        assert 0.0 <= value < 1.0
        assert value >= previous, f"target decreased at t={t}"
        previous = value
    assert schedule.target(schedule.end + 10_000) == schedule.final_sparsity


@settings(max_examples=200, deadline=None)
@given(schedule=polynomial_schedules())
def test_polynomial_endpoints_are_exact(schedule: PolynomialDecay) -> None:
    assert schedule.target(schedule.begin) == schedule.initial_sparsity
    assert schedule.target(schedule.end) == schedule.final_sparsity
    assert schedule.target(max(0, schedule.begin - 1)) == schedule.initial_sparsity
    assert schedule.begin == 0 or not schedule.should_prune(schedule.begin - 1)  # (a count below 0 is refused)
    assert not schedule.should_prune(schedule.end + 1)


@settings(max_examples=150, deadline=None)
@given(schedule=any_schedules())
def test_should_prune_at_begin_and_end_and_only_on_the_grid(schedule: SparsitySchedule) -> None:
    begin, end, frequency = schedule.begin, schedule.end, schedule.frequency  # type: ignore[attr-defined]
    assert schedule.should_prune(begin)
    assert schedule.should_prune(end)
    for t in progress_points(schedule):
        expected = begin <= t <= end and ((t - begin) % frequency == 0 or t == end)
        assert schedule.should_prune(t) == expected


@settings(max_examples=200, deadline=None)
@given(begin=st.integers(0, 1_000), span=st.integers(1, 3_000), rounds=st.integers(1, 400),
       shape=st.sampled_from([PolynomialDecay, CubicSchedule, LinearSchedule]))
def test_rounds_are_that_many_points_spread_evenly_up_to_end(begin: int, span: int, rounds: int, shape) -> None:
    """`rounds` gives exactly that many rounds after `begin` (every step when the span is shorter), with gaps that
    differ by at most one step; an integer `frequency` of ceil(span / rounds) gave 11 rounds for 20 over 21 steps."""
    schedule = shape(final_sparsity=0.8, begin=begin, end=begin + span, rounds=rounds)
    points = [t for t in range(max(0, begin - 2), begin + span + 3) if schedule.should_prune(t)]
    assert points[0] == begin and points[-1] == begin + span
    assert len(points) - 1 == min(rounds, span)
    gaps = {b - a for a, b in zip(points, points[1:])}
    assert max(gaps) - min(gaps) <= 1
    assert schedule.last_point(begin, begin + span) == begin + span and schedule.reached_by(begin + span) == 0.8


@settings(max_examples=60, deadline=None)  # (each example scans every step of its schedule)
@given(schedule=any_schedules())
def test_reached_by_is_the_target_of_the_last_round_so_far(schedule: SparsitySchedule) -> None:
    """What a run stopped at `t` reached: used to warn when a fit is shorter than its schedule."""
    previous, last_round, scanned = 0.0, None, schedule.begin - 1
    for t in progress_points(schedule):  # sorted: each step is scanned once for rounds
        for u in range(scanned + 1, min(t, schedule.end) + 1):
            if schedule.should_prune(u):
                last_round = u
        scanned = max(scanned, min(t, schedule.end))
        assert schedule.reached_by(t) == (schedule.target(last_round) if last_round is not None else 0.0)
        assert schedule.reached_by(t) >= previous
        previous = schedule.reached_by(t)
    assert schedule.reached_by(schedule.end) == schedule.target(schedule.end)


@settings(max_examples=150, deadline=None)
@given(schedule=any_schedules(), stride=st.integers(1, 7))
def test_last_point_is_the_last_round_passed_over(schedule: SparsitySchedule, stride: int) -> None:
    """Progress that moves by `stride` between looks (a GAN's optimizers) finds every round it passed, once."""
    points = progress_points(schedule)
    for after, upto in zip(points, points[1:]):
        passed = [u for u in range(after + 1, upto + 1) if schedule.should_prune(u)]
        assert schedule.last_point(after, upto) == (passed[-1] if passed else None)
    ends = list(range(-1, schedule.end + stride + 1, stride))
    found = [schedule.last_point(a, b) for a, b in zip(ends, ends[1:])]
    rounds = [u for u in range(schedule.begin, schedule.end + 1) if schedule.should_prune(u)]
    assert set(found) - {None} <= set(rounds)
    assert rounds[-1] in found  # the last round is never missed


def test_reached_by_gives_the_readmes_example() -> None:
    """README: a 90% schedule to step 1000 in a 100-step fit leaves 24%."""
    schedule = PolynomialDecay(final_sparsity=0.9, begin=0, end=1000, frequency=10)
    assert schedule.reached_by(100) == pytest.approx(0.9 * (1 - 0.9 ** 3))
    assert f"{schedule.reached_by(100):.0%}" == "24%"
    assert schedule.reached_by(105) == schedule.reached_by(100)  # no round between grid points


@settings(max_examples=150, deadline=None)
@given(schedule=any_schedules(), n_total=st.integers(0, 10_000_000))
def test_count_to_prune_hits_rounded_target_exactly_along_schedule(schedule: SparsitySchedule, n_total: int) -> None:
    n_pruned = 0
    for t in range(0, schedule.end + 2):
        if not schedule.should_prune(t):
            continue
        step = count_to_prune(n_total, n_pruned, schedule.target(t))
        assert step >= 0
        n_pruned += step
        assert n_pruned == round(schedule.target(t) * n_total)
        if t > 3_000:  # long schedules: the endpoint check below covers the rest
            break
    final_step = count_to_prune(n_total, n_pruned, schedule.target(schedule.end))
    assert n_pruned + final_step == round(schedule.final_sparsity * n_total)
    assert n_pruned + final_step <= n_total


def test_cubic_matches_zhu_gupta_formula() -> None:
    schedule = PolynomialDecay(initial_sparsity=0.1, final_sparsity=0.9, begin=10, end=110)
    for t in (20, 35, 60, 99):
        expected = 0.9 + (0.1 - 0.9) * (1 - (t - 10) / 100) ** 3
        assert schedule.target(t) == pytest.approx(expected, rel=1e-12)
    assert CubicSchedule(initial_sparsity=0.1, final_sparsity=0.9, begin=10, end=110).target(60) == schedule.target(60)
    assert LinearSchedule(final_sparsity=0.8, begin=0, end=4).target(1) == pytest.approx(0.2)
    assert schedule.target(200) == 0.9


def test_iterative_schedule_compounds_rate() -> None:
    schedule = IterativeSchedule(0.2, 3, begin=2, frequency=5)
    assert schedule.unit == "epoch"
    assert schedule.end == 12
    assert schedule.target(1) == 0.0
    assert schedule.target(2) == pytest.approx(0.2)
    assert schedule.target(7) == pytest.approx(1 - 0.8**2)
    assert schedule.target(100) == pytest.approx(1 - 0.8**3) == schedule.final_sparsity
    assert [t for t in range(20) if schedule.should_prune(t)] == [2, 7, 12]


def test_constant_sparsity() -> None:
    single = ConstantSparsity(0.6, begin=4)
    assert single.end == 4
    assert single.final_sparsity == 0.6
    assert (single.target(3), single.target(4), single.target(50)) == (0.0, 0.6, 0.6)
    assert [t for t in range(10) if single.should_prune(t)] == [4]
    repeated = ConstantSparsity(0.6, begin=0, end=7, frequency=3, unit="epoch")
    assert [t for t in range(10) if repeated.should_prune(t)] == [0, 3, 6, 7]


def test_callable_schedule_validates_results_at_call_time() -> None:
    schedule = CallableSchedule(fn=lambda t: min(0.05 * t, 0.9), end=20, frequency=5)
    assert schedule.target(4) == pytest.approx(0.2)
    assert schedule.final_sparsity == 0.9
    assert [t for t in range(25) if schedule.should_prune(t)] == [0, 5, 10, 15, 20]
    for bad in (1.0, -0.1, math.nan, "0.5", True):
        broken = CallableSchedule(fn=lambda t, bad=bad: 0.1 if t == 3 else bad, end=3)
        with pytest.raises(ValueError, match=r"returned .* at t=2.*\[0, 1\)"):
            broken.target(2)
        # the final sparsity is checked when the schedule is made: a run failed at its last round, after training
        with pytest.raises(ValueError, match=r"returned .* at t=3.*\[0, 1\)"):
            CallableSchedule(fn=lambda t, bad=bad: bad, end=3)
    with pytest.raises(ValueError, match=r"returned 1.0 at t=100"):
        CallableSchedule(fn=lambda t: min(1.0, t / 100), end=100, frequency=10)


def test_schedules_are_frozen() -> None:
    schedule = PolynomialDecay(final_sparsity=0.5, begin=0, end=10)
    with pytest.raises(AttributeError):
        schedule.end = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: PolynomialDecay(final_sparsity=0.5, begin=10, end=10), r"ends before it starts.*end=10.*begin=10"),
        (lambda: PolynomialDecay(final_sparsity=0.5, begin=10, end=3), r"ends before it starts"),
        (lambda: PolynomialDecay(final_sparsity=1.0, begin=0, end=3), r"final_sparsity=1.0 .*\[0, 1\)"),
        (lambda: PolynomialDecay(final_sparsity=-0.1, begin=0, end=3), r"final_sparsity=-0.1"),
        (lambda: PolynomialDecay(final_sparsity=math.nan, begin=0, end=3), r"final_sparsity=nan"),
        (lambda: PolynomialDecay(initial_sparsity=0.6, final_sparsity=0.5, begin=0, end=3), r"initial_sparsity=0.6 .*above"),
        (lambda: PolynomialDecay(final_sparsity=0.5, begin=0, end=3, frequency=0), r"frequency=0 must be >= 1"),
        (lambda: PolynomialDecay(final_sparsity=0.5, begin=0, end=3, rounds=0), r"rounds=0 must be >= 1"),
        (lambda: CubicSchedule(final_sparsity=0.5, begin=0, end=3, rounds=2.0), r"rounds=2.0 must be an int"),
        (lambda: LinearSchedule(final_sparsity=0.5, begin=0, end=9, rounds=3, frequency=3),
         r"frequency=3 and rounds=3 both place the rounds; pass one of them"),
        (lambda: PolynomialDecay(final_sparsity=0.5, begin=0, end=3, power=0), r"power=0 must be a number > 0"),
        (lambda: PolynomialDecay(final_sparsity=0.5, begin=0, end=3, power=-2.0), r"power=-2.0"),
        (lambda: PolynomialDecay(final_sparsity=0.5, begin=0, end=3, power=math.inf), r"power=inf must be finite"),
        (lambda: PolynomialDecay(final_sparsity=0.5, begin=-1, end=3), r"begin=-1 must be >= 0"),
        (lambda: PolynomialDecay(final_sparsity=0.5, begin=0, end=3, unit="batch"), r"unit='batch'.*'step'.*'epoch'"),
        (lambda: PolynomialDecay(final_sparsity=True, begin=0, end=3), r"final_sparsity=True must be a float"),
        (lambda: PolynomialDecay(final_sparsity=0.5, begin=False, end=3), r"begin=False must be an int"),
        (lambda: PolynomialDecay(final_sparsity=0.5, begin=0, end=3.0), r"end=3.0 must be an int"),
        (lambda: PolynomialDecay(final_sparsity=0.5, begin=0, end=3, power=True), r"power=True"),
        (lambda: LinearSchedule(final_sparsity=0.5, begin=5, end=2), r"ends before it starts"),
        (lambda: ConstantSparsity(1.5), r"sparsity=1.5"),
        (lambda: ConstantSparsity(0.5, begin=5, end=2), r"ends before it starts"),
        (lambda: ConstantSparsity(0.5, frequency=0), r"frequency=0"),
        (lambda: ConstantSparsity(0.5, unit="epochs"), r"unit='epochs'"),
        (lambda: IterativeSchedule(0.2, 0), r"rounds=0 must be >= 1"),
        (lambda: IterativeSchedule(1.0, 3), r"rate_per_round=1.0"),
        (lambda: IterativeSchedule(0.2, 3, begin=-4), r"begin=-4"),
        (lambda: IterativeSchedule(0.2, True), r"rounds=True must be an int"),
        (lambda: IterativeSchedule(0.999, 100_000), r"reaches sparsity 1.0"),
        (lambda: CallableSchedule(fn=0.5, end=3), r"fn=0.5 is not callable"),  # type: ignore[arg-type]
        (lambda: CallableSchedule(fn=lambda t: 0.1, begin=4, end=3), r"ends before it starts"),
        (lambda: CallableSchedule(fn=lambda t: 0.1, end=3, unit="iteration"), r"unit='iteration'"),
    ],
)
def test_invalid_construction_raises_naming_argument_and_value(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_target_rejects_non_int_progress() -> None:
    schedule = PolynomialDecay(final_sparsity=0.5, begin=0, end=3)
    with pytest.raises(ValueError, match=r"t=1.5"):
        schedule.target(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"t=True"):
        schedule.should_prune(True)


@settings(max_examples=200, deadline=None)
@given(current=fractions, target=st.floats(0.0, 1.0))
def test_increment_for_target_composes_to_target(current: float, target: float) -> None:
    increment = increment_for_target(current, target)
    assert increment >= 0.0
    if target >= current:
        assert current + (1 - current) * increment == pytest.approx(target, abs=1e-9)
    else:
        assert increment == 0.0


def test_increment_for_target_examples_and_validation() -> None:
    assert increment_for_target(0.5, 0.75) == 0.5
    assert increment_for_target(0.0, 0.3) == 0.3
    assert increment_for_target(0.8, 0.5) == 0.0
    with pytest.raises(ValueError, match=r"current_sparsity=1.0"):
        increment_for_target(1.0, 1.0)
    with pytest.raises(ValueError, match=r"target_sparsity=1.2"):
        increment_for_target(0.2, 1.2)


def test_count_to_prune_examples_and_validation() -> None:
    assert count_to_prune(1000, 0, 0.5) == 500
    assert count_to_prune(1000, 400, 0.5) == 100
    assert count_to_prune(1000, 600, 0.5) == 0
    assert count_to_prune(7, 0, 0.5) == round(3.5)
    assert count_to_prune(10, 3, 1.0) == 7
    with pytest.raises(ValueError, match=r"n_pruned=11 exceeds n_total=10"):
        count_to_prune(10, 11, 0.5)
    with pytest.raises(ValueError, match=r"n_total=-1"):
        count_to_prune(-1, 0, 0.5)
    with pytest.raises(ValueError, match=r"target=1.5"):
        count_to_prune(10, 0, 1.5)
    with pytest.raises(ValueError, match=r"n_total=True"):
        count_to_prune(True, 0, 0.5)


@given(n_total=st.integers(0, 600), targets=st.lists(st.floats(0, 1), min_size=2, max_size=6),
       multiple=st.integers(1, 32))
def test_rounded_counts_keep_a_multiple_and_never_prune_more_or_go_back(n_total, targets, multiple) -> None:
    counts = [rounded_pruned_count(n_total, t, multiple) for t in sorted(targets)]
    for target, pruned in zip(sorted(targets), counts):
        assert 0 <= pruned <= round(target * n_total)  # never more than the unrounded count
        kept = n_total - pruned
        assert kept % multiple == 0 or kept == n_total  # a multiple, unless none can be pruned
        assert kept - (n_total - round(target * n_total)) < multiple  # the least rounding up that works
    assert counts == sorted(counts)  # a rising schedule never has to un-prune
    assert [rounded_pruned_count(n_total, t, None) for t in targets] == [round(t * n_total) for t in targets]



def test_numpy_numbers_are_real_numbers_and_kept_as_python_ones() -> None:
    """numpy's float32 and int64 were refused ("must be a float in [0, 1)"), though the docs ask for real numbers
    and `prune_(amount=np.float32(0.5))` takes them."""
    import numpy as np

    schedule = PolynomialDecay(final_sparsity=np.float32(0.75), begin=np.int64(0), end=np.int64(10),
                               frequency=np.int64(2), power=np.float64(3))
    assert [type(v) for v in (schedule.final_sparsity, schedule.begin, schedule.end, schedule.frequency)] == \
        [float, int, int, int]
    assert schedule.target(10) == float(np.float32(0.75))
    assert ConstantSparsity(sparsity=np.float64(0.5), begin=np.int32(3)).target(3) == 0.5
    assert IterativeSchedule(rate_per_round=np.float32(0.5), rounds=np.int64(2)).final_sparsity == 0.75
    returned = CallableSchedule(fn=lambda t: np.float32(0.3), end=4)
    assert returned.target(2) == float(np.float32(0.3)) and type(returned.target(2)) is float
    with pytest.raises(ValueError, match="must be a float in"):
        PolynomialDecay(final_sparsity=np.bool_(True), begin=0, end=4)


def test_the_repr_shows_rounds_only_when_given_as_the_state_keys_of_older_checkpoints_hold_it() -> None:
    """The repr is part of the pruning callbacks' state keys: with `rounds=None` in it, a checkpoint written before
    `rounds` existed no longer restored a callback scheduled by PolynomialDecay (it started its rounds afresh)."""
    before = ("PolynomialDecay(final_sparsity=0.8, begin=0, end=16, initial_sparsity=0, frequency=2, power=3, "
              "unit='step')")
    assert repr(PolynomialDecay(final_sparsity=0.8, begin=0, end=16, initial_sparsity=0, frequency=2)) == before
    assert repr(CubicSchedule(final_sparsity=0.5, begin=1, end=9)) == (
        "CubicSchedule(final_sparsity=0.5, begin=1, end=9, initial_sparsity=0.0, frequency=1, power=3, unit='step')")
    assert repr(LinearSchedule(final_sparsity=0.5, begin=1, end=9, rounds=4)) == (
        "LinearSchedule(final_sparsity=0.5, begin=1, end=9, initial_sparsity=0.0, frequency=1, rounds=4, power=1, "
        "unit='step')")


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(0.0, 0.95), min_size=1, max_size=12), begin=st.integers(0, 5),
       span=st.integers(0, 30), frequency=st.integers(1, 7), t=st.integers(0, 45))
def test_a_callable_schedule_is_reached_at_the_highest_target_of_its_rounds_so_far(values, begin, span, frequency, t):
    """A decreasing fn never un-prunes: a run stopped at t holds the highest target of its rounds so far, where the
    last round's was said ("it will stop at 10.0%" of a model pruned to 50%, its final sparsity)."""
    from litcompress.callbacks.schedule_checks import stopped_early_message

    schedule = CallableSchedule(fn=lambda u: values[u % len(values)], begin=begin, end=begin + span,
                                frequency=frequency)
    rounds = [u for u in range(t + 1) if schedule.should_prune(u)]
    assert schedule.reached_by(t) == max((schedule.target(u) for u in rounds), default=0.0)
    message = stopped_early_message(schedule, t, "sparsity")
    assert (message is None) == (t >= schedule.end or schedule.reached_by(t) >= schedule.final_sparsity)
