"""Property tests for litcompress.pruning.threshold (exact global smallest-k pruning)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

import litcompress.pruning.threshold as threshold
from litcompress.pruning.threshold import kth_smallest, smallest_k_masks


@contextlib.contextmanager
def small_search_limits(gather_limit: int, sample_size: int) -> Iterator[None]:
    """Shrink the search constants so tiny inputs exercise the bracketing refinements."""
    saved = threshold._GATHER_LIMIT, threshold._SAMPLE_SIZE
    threshold._GATHER_LIMIT, threshold._SAMPLE_SIZE = gather_limit, sample_size
    try:
        yield
    finally:
        threshold._GATHER_LIMIT, threshold._SAMPLE_SIZE = saved


def reference_masks(scores: list[torch.Tensor], masks: list[torch.Tensor | None], k: int) -> list[torch.Tensor]:
    """Brute force: stable sort of all kept scores in (tensor order, flat index) order."""
    kept = torch.cat(
        [torch.ones(s.numel(), dtype=torch.bool) if m is None else m.reshape(-1) != 0 for s, m in zip(scores, masks)]
    )
    values = torch.cat([s.reshape(-1).to(torch.float64) for s in scores])
    kept_positions = torch.nonzero(kept).reshape(-1)
    order = torch.sort(values[kept_positions], stable=True).indices
    new_keep = kept.clone()
    new_keep[kept_positions[order[:k]]] = False
    out, offset = [], 0
    for score in scores:
        out.append(new_keep[offset : offset + score.numel()].reshape(score.shape))
        offset += score.numel()
    return out


shapes = st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple)
tied_values = st.sampled_from([-2.0, -0.0, 0.0, 0.5, 1.0, 3.0, math.inf, -math.inf])
any_values = st.floats(allow_nan=False, width=32)


@st.composite
def pruning_problems(draw: st.DrawFn) -> tuple[list[torch.Tensor], list[torch.Tensor | None], int]:
    n_tensors = draw(st.integers(1, 4))
    scores: list[torch.Tensor] = []
    masks: list[torch.Tensor | None] = []
    for _ in range(n_tensors):
        shape = draw(shapes)
        numel = math.prod(shape)
        values = draw(st.lists(draw(st.sampled_from([tied_values, any_values])), min_size=numel, max_size=numel))
        scores.append(torch.tensor(values, dtype=torch.float32).reshape(shape))
        if draw(st.booleans()):
            masks.append(None)
        else:
            kept = draw(st.lists(st.booleans(), min_size=numel, max_size=numel))
            mask_dtype = draw(st.sampled_from([torch.float32, torch.bool, torch.uint8]))
            masks.append(torch.tensor(kept, dtype=torch.bool).reshape(shape).to(mask_dtype))
    total_kept = sum(s.numel() if m is None else int(torch.count_nonzero(m)) for s, m in zip(scores, masks))
    k = draw(st.integers(0, total_kept))
    return scores, masks, k


def old_keep(score: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(score, dtype=torch.bool) if mask is None else mask != 0


@settings(max_examples=150, deadline=None)
@given(problem=pruning_problems(), tiny_limits=st.booleans())
def test_prunes_exactly_k_smallest_kept_entries(problem, tiny_limits: bool) -> None:
    scores, masks, k = problem
    limits = small_search_limits(2, 3) if tiny_limits else contextlib.nullcontext()
    with limits:
        new_masks = smallest_k_masks(scores, masks, k)

    newly_pruned_scores, still_kept_scores = [], []
    n_newly_pruned = 0
    for score, mask, new_mask in zip(scores, masks, new_masks):
        assert new_mask.shape == score.shape
        assert new_mask.device == score.device
        assert new_mask.dtype == (score.dtype if mask is None else mask.dtype)
        before, after = old_keep(score, mask), new_mask != 0
        assert not (after & ~before).any(), "an already pruned entry was un-pruned"
        newly_pruned = before & ~after
        n_newly_pruned += int(newly_pruned.sum())
        newly_pruned_scores.append(score[newly_pruned])
        still_kept_scores.append(score[after])
    assert n_newly_pruned == k
    pruned = torch.cat(newly_pruned_scores)
    kept = torch.cat(still_kept_scores)
    if pruned.numel() and kept.numel():
        assert pruned.max() <= kept.min()


@settings(max_examples=200, deadline=None)
@given(problem=pruning_problems(), limits=st.sampled_from([None, (3, 4), (100, 400)]))
def test_matches_stable_sort_reference_including_tie_order(problem, limits: tuple[int, int] | None) -> None:
    # (3, 4): refinements that count, then gather; (100, 400): a problem over 100 entries, sampled whole, is
    # bracketed tightly enough that the counting pass gathers the k-th value's neighbours at once
    scores, masks, k = problem
    with small_search_limits(*limits) if limits else contextlib.nullcontext():
        new_masks = smallest_k_masks(scores, masks, k)
    for ours, expected in zip(new_masks, reference_masks(scores, masks, k)):
        assert torch.equal(ours != 0, expected)


@settings(max_examples=60, deadline=None)
@given(problem=pruning_problems())
def test_kth_smallest_matches_sorted_kept_scores(problem) -> None:
    scores, masks, k = problem
    if k == 0:
        k = 1
    kept_values = torch.cat([s[old_keep(s, m)] for s, m in zip(scores, masks)])
    if kept_values.numel() == 0:
        return
    with small_search_limits(2, 3):
        value = kth_smallest(scores, masks, k)
    assert value == torch.sort(kept_values).values[k - 1].item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refinement_path_on_larger_continuous_data(seed: int) -> None:
    # Large enough that the bracketing refines several times with the reduced limits.
    generator = torch.Generator().manual_seed(seed)
    scores = [torch.randn(300, 70, generator=generator).abs(), torch.rand(5000, generator=generator) * 3]
    masks = [None, (torch.rand(5000, generator=generator) > 0.3).to(torch.float32)]
    kept_total = scores[0].numel() + int(masks[1].sum())
    k = kept_total // 3
    with small_search_limits(500, 200):
        ours = smallest_k_masks(scores, masks, k)
    for mine, expected in zip(ours, reference_masks(scores, masks, k)):
        assert torch.equal(mine != 0, expected)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), sizes=st.lists(st.integers(0, 700), min_size=1, max_size=4),
       distinct=st.sampled_from([None, 1, 3, 40]), k_fraction=st.floats(0, 1), masked=st.booleans())
def test_a_counting_pass_that_gathers_the_kth_values_neighbours_prunes_as_the_reference(
        seed: int, sizes: list[int], distinct: int | None, k_fraction: float, masked: bool) -> None:
    # Hundreds of entries, sampled whole (sample size 400) against a gather limit of 100: the first pass both counts
    # and gathers the bracket, and answers from it when the k-th value is inside; runs of equal values overflow the
    # gather and take the counting path.
    generator = torch.Generator().manual_seed(seed)
    scores = [torch.randn(n, generator=generator) if distinct is None
              else torch.randint(-distinct, distinct + 1, (n,), generator=generator).float() for n in sizes]
    masks = [torch.rand(n, generator=generator) > 0.3 if masked else None for n in sizes]
    k = round(k_fraction * sum(n if m is None else int(m.sum()) for n, m in zip(sizes, masks)))
    with small_search_limits(100, 400):
        ours = smallest_k_masks(scores, masks, k, magnitude=True)
    for mine, expected in zip(ours, reference_masks([s.abs() for s in scores], masks, k)):
        assert torch.equal(mine != 0, expected)


@pytest.mark.parametrize("k_fraction", [0.001, 0.5, 0.999])
def test_long_runs_of_equal_scores_settle_on_a_pivot(k_fraction: float) -> None:
    # Few distinct values: sample quantiles straddle whole runs of duplicates, so the search
    # must step over the runs (or settle on one) instead of re-sampling the same bracket.
    generator = torch.Generator().manual_seed(5)
    scores = [torch.randint(0, 3, (4000,), generator=generator).float() for _ in range(3)]
    masks = [None, (torch.rand(4000, generator=generator) > 0.5), None]
    kept_total = 8000 + int(masks[1].sum())
    k = round(k_fraction * kept_total)
    with small_search_limits(100, 50):
        ours = smallest_k_masks(scores, masks, k)
    for mine, expected in zip(ours, reference_masks(scores, masks, k)):
        assert torch.equal(mine != 0, expected)


def test_all_equal_scores_break_ties_by_tensor_then_index() -> None:
    scores = [torch.full((2, 3), 7.0), torch.full((4,), 7.0)]
    with small_search_limits(2, 3):
        first, second = smallest_k_masks(scores, [None, None], 8)
    assert torch.equal(first, torch.zeros(2, 3))
    assert torch.equal(second, torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_mixed_dtypes_compare_exactly() -> None:
    # 1 + 2**-30 is exact in float64 but rounds to 1.0 in float32: a float32 compare would tie them.
    scores = [torch.tensor([1.0 + 2.0**-30, 5.0], dtype=torch.float64), torch.tensor([1.0, 0.5], dtype=torch.float32)]
    first, second = smallest_k_masks(scores, [None, None], 2)
    assert first.tolist() == [1.0, 1.0]
    assert second.tolist() == [0.0, 0.0]
    assert first.dtype == torch.float64 and second.dtype == torch.float32


def test_integer_scores_are_supported() -> None:
    scores = [torch.tensor([[3, 1], [2, 2]]), torch.tensor([2, 0])]
    first, second = smallest_k_masks(scores, [None, torch.tensor([True, False])], 2)
    assert first.tolist() == [[1, 0], [0, 1]]
    assert second.tolist() == [True, False]


@pytest.mark.parametrize("k", [-1, 5])
def test_k_out_of_range_raises_naming_k(k: int) -> None:
    scores = [torch.arange(6.0)]
    masks = [torch.tensor([1, 1, 1, 1, 0, 0])]
    with pytest.raises(ValueError, match=rf"k={k}"):
        smallest_k_masks(scores, masks, k)


def test_non_int_k_raises() -> None:
    with pytest.raises(ValueError, match="k=2.0"):
        smallest_k_masks([torch.arange(6.0)], [None], 2.0)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=16), max_size=12),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]))
def test_holds_nan_is_isnan_any_whatever_the_infinities_and_overflows(values, dtype) -> None:
    # the sum screen: infinities of both signs sum to NaN, large float16 values overflow to inf
    tensor = torch.tensor(values, dtype=torch.float64).to(dtype)
    assert threshold.holds_nan(tensor) == bool(torch.isnan(tensor).any())


def test_float_masks_keep_what_is_not_zero_negative_zero_and_nan_as_before() -> None:
    # a mask converted to bool: -0.0 is pruned, NaN (as `!= 0` said) and any other value kept
    mask = torch.tensor([1.0, 0.0, -0.0, 0.5, math.nan, -2.0])
    new = smallest_k_masks([torch.arange(6.0)], [mask], 1)[0]
    assert new.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]


def test_nan_scores_are_rejected() -> None:
    with pytest.raises(ValueError, match="NaN"):
        smallest_k_masks([torch.ones(3), torch.tensor([1.0, math.nan])], [None, None], 1)


def test_mismatched_mask_shape_and_count_are_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        smallest_k_masks([torch.ones(2, 3)], [torch.ones(3, 2)], 1)
    with pytest.raises(ValueError, match="masks"):
        smallest_k_masks([torch.ones(2, 3)], [], 1)


def test_k_zero_returns_old_masks_unchanged() -> None:
    mask = torch.tensor([1.0, 0.0, 1.0])
    (new_mask,) = smallest_k_masks([torch.tensor([3.0, 1.0, 2.0])], [mask], 0)
    assert torch.equal(new_mask, mask)
    assert new_mask is not mask


def test_kth_smallest_rejects_k_zero() -> None:
    with pytest.raises(ValueError, match="k=0"):
        kth_smallest([torch.ones(3)], [None], 0)


@pytest.mark.parametrize("amount", [0.1, 0.5, 0.93])
def test_same_zeros_per_tensor_as_torch_global_unstructured(amount: float) -> None:
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(30, 50), nn.Linear(50, 20), nn.Linear(20, 7))
    weights = [layer.weight.detach().clone() for layer in reference]
    prune.global_unstructured(
        [(layer, "weight") for layer in reference], pruning_method=prune.L1Unstructured, amount=amount
    )
    n_total = sum(w.numel() for w in weights)
    ours = smallest_k_masks([w.abs() for w in weights], [None] * len(weights), round(amount * n_total))
    for layer, mask in zip(reference, ours):
        assert int((layer.weight_mask == 0).sum()) == int((mask == 0).sum())
        assert torch.equal(layer.weight_mask, mask)


def test_second_round_with_existing_masks_matches_torch_global_unstructured() -> None:
    torch.manual_seed(1)
    reference = nn.Sequential(nn.Linear(40, 30), nn.Linear(30, 10))
    weights = [layer.weight.detach().clone() for layer in reference]
    params = [(layer, "weight") for layer in reference]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.4)
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.5)

    n_total = sum(w.numel() for w in weights)
    first = smallest_k_masks([w.abs() for w in weights], [None, None], round(0.4 * n_total))
    kept = sum(int(m.sum()) for m in first)
    second = smallest_k_masks([w.abs() for w in weights], first, round(0.5 * kept))
    for layer, mask in zip(reference, second):
        assert torch.equal(layer.weight_mask, mask)


@settings(max_examples=100, deadline=None)
@given(problem=pruning_problems())
def test_magnitude_mode_equals_explicit_abs_and_bool_output(problem) -> None:
    """`magnitude=True` ranks |scores| exactly like passing the absolute values; `dtype` sets the output type."""
    scores, masks, k = problem
    expected = smallest_k_masks([s.abs() for s in scores], masks, k)
    actual = smallest_k_masks(scores, masks, k, magnitude=True, dtype=torch.bool)
    assert all(a.dtype == torch.bool for a in actual)
    assert all(torch.equal(a, e != 0) for a, e in zip(actual, expected))
    if k:
        assert kth_smallest(scores, masks, k, magnitude=True) == kth_smallest([s.abs() for s in scores], masks, k)


@settings(max_examples=100, deadline=None)
@given(problem=pruning_problems())
def test_out_receives_the_masks_even_when_it_is_the_input_mask(problem) -> None:
    """Writing into `out` (here: the float masks passed in, as the engine does) gives the returned masks."""
    scores, masks, k = problem
    buffers = [old_keep(s, m).float() for s, m in zip(scores, masks)]  # the engine's float mask buffers
    expected = smallest_k_masks(scores, [b.clone() for b in buffers], k, magnitude=True)
    returned = smallest_k_masks(scores, buffers, k, magnitude=True, out=buffers)
    assert all(r is b for r, b in zip(returned, buffers))
    assert all(torch.equal(b, e) for b, e in zip(buffers, expected))
    with pytest.raises(ValueError, match="out"):
        smallest_k_masks(scores, buffers, 0, out=[torch.zeros(1)] * (len(scores) + 1))


_SIGNED = [torch.int8, torch.int16, torch.int32, torch.int64]


@settings(max_examples=120, deadline=None)
@given(data=st.data(), dtypes=st.lists(st.sampled_from(_SIGNED), min_size=1, max_size=3))
def test_magnitudes_of_signed_integers_rank_their_minimum_largest(data, dtypes) -> None:
    """|-128| is no int8: abs wrapped the minimum to itself, so L1 pruning of int8 scores took the largest magnitude
    first. Every signed dtype (its minimum included), alone or mixed, ranks as the exact magnitudes do (int64 and
    mixed dtypes rank in float64, exact below 2**53)."""
    scores = []
    for dtype in dtypes:
        low, high = (-(2**53), 2**53) if dtype == torch.int64 else (torch.iinfo(dtype).min, torch.iinfo(dtype).max)
        values = data.draw(st.lists(st.sampled_from([low, low + 1, -5, 0, 3, 7, high]), min_size=1, max_size=6))
        scores.append(torch.tensor(values, dtype=dtype))
    exact = [[abs(int(v)) for v in s.tolist()] for s in scores]  # Python ints: no wrap, no rounding
    total = sum(len(e) for e in exact)
    k = data.draw(st.integers(1, total))
    order = sorted(((value, i, j) for i, e in enumerate(exact) for j, value in enumerate(e)))
    with small_search_limits(2, 3) if data.draw(st.booleans()) else contextlib.nullcontext():
        masks = smallest_k_masks(scores, [None] * len(scores), k, magnitude=True)
        kth = kth_smallest(scores, [None] * len(scores), k, magnitude=True)
    pruned = [[int(v) == 0 for v in m.tolist()] for m in masks]
    assert sum(map(sum, pruned)) == k
    largest_pruned = max(exact[i][j] for i, e in enumerate(pruned) for j, p in enumerate(e) if p)
    smallest_kept = min((exact[i][j] for i, e in enumerate(pruned) for j, p in enumerate(e) if not p), default=None)
    assert largest_pruned == order[k - 1][0]
    assert smallest_kept is None or largest_pruned <= smallest_kept
    assert float(kth) == float(order[k - 1][0])
    assert [s.dtype for s in scores] == dtypes  # the scores themselves are left as they were


def test_int64_magnitudes_are_ranked_exactly_beyond_float64s_integers() -> None:
    """Ranked in float64, 2**60 + 1, 2**60 + 2 and 2**60 + 3 tied with 2**60; int64's minimum ranks with its maximum
    (its magnitude, 2**63, is no int64)."""
    big = torch.tensor([2**60 + 1, 2**60, -(2**60) - 3, 2**60 + 2, -(2**63)], dtype=torch.int64)
    ranked = [smallest_k_masks([big], [None], k, magnitude=True)[0].tolist() for k in (1, 2, 3, 4)]
    assert ranked == [[1, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 1, 0, 1], [0, 0, 0, 0, 1]]
    assert kth_smallest([big], [None], 5, magnitude=True) == float(2**63 - 1)
    assert big.tolist()[-1] == -(2**63)  # the caller's tensor is left as it was


def test_a_round_of_integer_dtypes_only_ranks_in_int64_not_float64() -> None:
    """Mixed integer dtypes were ranked in float64, where 2**53 + 1 ties with 2**53 (the larger pruned first)."""
    big = torch.tensor([2**53 + 1, 2**53, 2**60 + 1, 2**60], dtype=torch.int64)
    small = torch.tensor([100, 100], dtype=torch.int8)
    masks = smallest_k_masks([big, small], [None, None], 3, magnitude=True)
    assert masks[0].tolist() == [1, 0, 1, 1] and masks[1].tolist() == [0, 0]
    mixed = [torch.tensor([3, 1], dtype=torch.uint8), torch.tensor([True, False]),
             torch.tensor([-2, 5], dtype=torch.int16)]
    masks = smallest_k_masks(mixed, [None] * 3, 3)
    assert [m.tolist() for m in masks] == [[1, 0], [True, False], [0, 1]]


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.uint16, torch.uint32, torch.uint64])
@pytest.mark.parametrize("magnitude", [False, True])
def test_bool_and_unsigned_scores_are_ranked_as_the_values_they_hold(dtype, magnitude) -> None:
    """torch has no abs of bool or uint16/32/64, nor comparisons of uint16/32/64 on the CPU: they failed in its
    words. They rank as their values, mixed with other dtypes too."""
    scores = torch.tensor([3, 1, 0, 2]).to(dtype)
    values = [int(v) for v in scores.tolist()]
    other = [-1.5, 5.0]
    masks = smallest_k_masks([scores, torch.tensor(other)], [None, None], 2, magnitude=magnitude)
    ranked = sorted([(v, 0, i) for i, v in enumerate(values)]
                    + [(abs(v) if magnitude else v, 1, i) for i, v in enumerate(other)])
    smallest = {(t, i) for _, t, i in ranked[:2]}
    assert [int(v) == 0 for v in masks[0].tolist()] == [(0, i) in smallest for i in range(4)]
    assert kth_smallest([scores], [None], 2, magnitude=magnitude) == float(sorted(values)[1])


def test_uint64_scores_beyond_int64_are_refused_in_words_only_where_ranked_in_int64() -> None:
    big = torch.tensor([2**64 - 1, 1, 5], dtype=torch.uint64)
    for k in (0, 1):  # whatever k
        with pytest.raises(ValueError, match=r"scores\[0\]: uint64 scores above 2\*\*63 - 1 cannot be ranked"):
            smallest_k_masks([big], [None], k)
    # masked out, it is not ranked; mixed with floats, the round is in float64, which holds it (rounded)
    assert smallest_k_masks([big], [torch.tensor([0, 1, 1])], 1)[0].tolist() == [0, 0, 1]
    assert smallest_k_masks([big, torch.tensor([1.0, 2.0])], [None, None], 1)[0].tolist() == [1, 0, 1]
