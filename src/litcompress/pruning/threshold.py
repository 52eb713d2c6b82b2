"""Exact global magnitude pruning without concatenating every score.

``torch.nn.utils.prune.global_unstructured`` copies every score of every tensor into
one vector and runs ``topk`` over it: the peak extra memory is a multiple of the model
size. Here the k-th smallest kept score is found by sample-guided bracketing: a small
random sample of the scores gives a narrow value interval that almost surely holds the
k-th value, counting passes (one tensor at a time) confirm it, and only the few
candidates inside the interval are gathered and sorted. The extra memory is the output
masks, a bool copy of each given mask (1 byte per entry, reused by every pass) and about one
tensor's worth of comparison temporaries; nothing is concatenated.

The result is identical to a stable sort of all kept scores in (tensor order, flat index)
order followed by pruning its first ``k`` entries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["holds_nan", "kth_smallest", "smallest_k_masks"]

# Gather the candidates once the bracket holds at most this many kept entries.
_GATHER_LIMIT = 1 << 20
# Number of sampled scores expected inside the current bracket per refinement.
_SAMPLE_SIZE = 1 << 16
# After this many refinements gather whatever the bracket holds (only hit on
# adversarial data such as huge runs of duplicates; still exact, just more memory).
_MAX_REFINEMENTS = 6
# Chunk length when locating the first ties, so no full-tensor index list is built.
_TIE_CHUNK = 1 << 20
# Fixed seed: the sample only guides the search, but runs must be reproducible.
_SAMPLE_SEED = 0x5EED


def holds_nan(tensor: Tensor) -> bool:
    """Whether ``tensor`` holds a NaN. A NaN anywhere makes the sum NaN, so one reduction (no tensor-sized
    temporary) clears the common case; only a NaN sum (a NaN, or infinities of both signs) is looked at entry by
    entry."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return False
    return bool(torch.isnan(tensor.sum())) and bool(torch.isnan(tensor).any())


class _Bound:
    """One end of the value bracket: a 0-dim tensor and whether it is inclusive."""

    __slots__ = ("value", "inclusive")

    def __init__(self, value: Tensor, inclusive: bool) -> None:
        self.value = value
        self.inclusive = inclusive


def common_dtype(scores: Sequence[Tensor]) -> torch.dtype:
    """Dtype in which every comparison is exact: the shared dtype, else float64."""
    dtypes = {score.dtype for score in scores}
    for dtype in dtypes:
        if dtype.is_complex:
            raise ValueError(f"scores must be real, got a tensor of dtype {dtype}")
    if len(dtypes) == 1:
        (dtype,) = dtypes
        return _RANKED_AS.get(dtype, dtype)
    if not any(dtype.is_floating_point for dtype in dtypes):
        return torch.int64  # every value of the others: float64 would round int64's above 2**53
    # float64 holds every float16/bfloat16/float32 value and integers below 2**53 exactly (int64 ones above it,
    # mixed with floats in one round, are rounded: tied with their neighbours).
    return torch.float64


# Signed integer scores whose magnitudes their own dtype cannot hold (the minimum's): ranked in these. int64 has no
# wider integer (float64 would round magnitudes above 2**53): its minimum is clamped (see `exact_magnitudes`).
_WIDER_FOR_MAGNITUDE = {torch.int8: torch.int16, torch.int16: torch.int32, torch.int32: torch.int64,
                        torch.int64: torch.int64}
# Dtypes torch has no abs (nor, but for bool, comparisons) for on the CPU: ranked as these hold their values.
_RANKED_AS = {torch.bool: torch.uint8, torch.uint16: torch.int64, torch.uint32: torch.int64, torch.uint64: torch.int64}
# What `exact_magnitudes` converts: torch's `abs` of them wraps or is not implemented.
CONVERTED_FOR_MAGNITUDES = (*_WIDER_FOR_MAGNITUDE, *_RANKED_AS)


def exact_magnitudes(scores: Tensor) -> Tensor:
    """``|scores|`` in a dtype that holds them and that torch ranks (a new tensor for the dtypes
    `CONVERTED_FOR_MAGNITUDES` names): ``abs`` of an int8 -128 is -128, the smallest value where it is the largest
    magnitude, and torch has no ``abs`` for bool or uint16/32/64. int64's minimum, -2**63, becomes 2**63 - 1 (tied
    with the largest int64 magnitude). Other dtypes: ``abs`` as it is."""
    if scores.dtype in _RANKED_AS:  # never negative
        return _ranked_as(scores)
    if scores.dtype not in _WIDER_FOR_MAGNITUDE:
        return scores.abs()
    if scores.dtype == torch.int64:
        return scores.clamp(min=-torch.iinfo(torch.int64).max).abs_()
    return scores.to(_WIDER_FOR_MAGNITUDE[scores.dtype]).abs_()


_UINT64_REFUSAL = ("uint64 scores above 2**63 - 1 cannot be ranked (torch compares no uint64 on the CPU); give them "
                   "as float64 or int64.")


def _beyond_int64(scores: Tensor) -> Tensor:
    """Where uint64 `scores` exceed 2**63 - 1 (torch has no comparison of uint64: their bits read negative as int64)."""
    return scores.view(torch.int64).lt(0)


def _ranked_as(scores: Tensor) -> Tensor:
    if scores.dtype == torch.uint64 and bool(_beyond_int64(scores).any()):
        raise ValueError(_UINT64_REFUSAL)
    return scores.to(_RANKED_AS[scores.dtype])


class _Inputs:
    """Validated scores (in the common dtype, lazily) and kept-entry masks."""

    def __init__(self, scores: Sequence[Tensor], masks: Sequence[Tensor | None], magnitude: bool = False) -> None:
        self.magnitude = magnitude
        # One reused buffer per (device, dtype) for |scores|: a fresh temporary per tensor and pass would
        # fragment the heap into a model-sized high-water mark.
        self._scratch: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        scores = list(scores)
        masks = list(masks)
        if len(scores) != len(masks):
            raise ValueError(
                f"got {len(scores)} score tensors but {len(masks)} masks; pass one mask "
                "(or None) per score tensor"
            )
        self.raw_scores = scores
        self.masks = masks
        self.dtype = common_dtype(scores) if scores else torch.float32
        if magnitude and self.dtype in _WIDER_FOR_MAGNITUDE:  # |-128| is no int8: it wrapped to -128, ranked first
            self.dtype = _WIDER_FOR_MAGNITUDE[self.dtype]
        self.kept_counts: list[int] = []
        # Flat bool kept-masks, built once: re-deriving `mask != 0` from float masks in every
        # pass costs more than the 1 byte per entry they take.
        self._kept: list[Tensor | None] = []
        # Whether each kept mask is our own copy (built from a float mask) rather than the caller's tensor: our
        # copies are reused as the output masks, which saves a mask-sized allocation per tensor.
        self._owns_kept: list[bool] = []
        for index, (score, mask) in enumerate(zip(scores, masks)):
            if not isinstance(score, Tensor):
                raise TypeError(f"scores[{index}] must be a torch.Tensor, got {type(score).__name__}")
            if mask is not None and mask.shape != score.shape:
                raise ValueError(
                    f"masks[{index}] has shape {tuple(mask.shape)} but scores[{index}] has "
                    f"shape {tuple(score.shape)}; they must match"
                )
            if holds_nan(score):
                raise ValueError(f"scores[{index}] contains NaN; scores must be comparable numbers")
            if mask is None:
                self._kept.append(None)
                self._owns_kept.append(False)
                self.kept_counts.append(score.numel())
            else:
                flat = mask.reshape(-1)
                kept = flat.to(score.device, torch.bool)  # nonzero -> True, as `!= 0` (half the time)
                self._kept.append(kept)
                self._owns_kept.append(kept is not flat)
                self.kept_counts.append(int(torch.count_nonzero(kept)))
        self.total_kept = sum(self.kept_counts)
        if not self.dtype.is_floating_point:  # ranked in int64 (in float64 they are rounded, as int64's are)
            for index, score in enumerate(scores):
                if score.dtype != torch.uint64:
                    continue
                beyond, kept = _beyond_int64(score).reshape(-1), self._kept[index]
                if bool((beyond if kept is None else beyond & kept).any()):  # (a pruned entry is never ranked)
                    raise ValueError(f"scores[{index}]: {_UINT64_REFUSAL}")

    def __len__(self) -> int:
        return len(self.raw_scores)

    def score(self, index: int, positions: Tensor | None = None) -> Tensor:
        """Flat scores of tensor ``index`` (only at ``positions`` if given) in the common dtype.

        A view when possible; with ``magnitude`` the absolute values, computed per call so that no copy of all
        the scores is ever held.
        """
        flat = self.raw_scores[index].reshape(-1)
        if flat.dtype in _RANKED_AS:  # never negative: their own values, in the round's dtype (checked to hold them)
            return (flat if positions is None else flat[positions]).to(self.dtype)
        if self.magnitude and flat.dtype in _WIDER_FOR_MAGNITUDE:
            flat = exact_magnitudes(flat if positions is None else flat[positions])
            return flat if flat.dtype == self.dtype else flat.to(self.dtype)
        if positions is not None:
            flat = flat[positions]
            if self.magnitude:
                flat = flat.abs()
        elif self.magnitude:
            key = (flat.device, flat.dtype)
            scratch = self._scratch.get(key)
            if scratch is None or scratch.numel() < flat.numel():
                scratch = self._scratch[key] = torch.empty(
                    max(s.numel() for s in self.raw_scores), dtype=flat.dtype, device=flat.device
                )
            flat = torch.abs(flat, out=scratch[: flat.numel()])  # valid until the next call: use it at once
        return flat if flat.dtype == self.dtype else flat.to(self.dtype)

    def kept(self, index: int) -> Tensor | None:
        """Flat bool mask of kept entries (do not modify), or None when every entry is kept."""
        return self._kept[index]

    def owns_kept(self, index: int) -> bool:
        """True when ``kept(index)`` is a private copy that the last pass may overwrite."""
        return self._owns_kept[index]


def _select(values: Tensor, kept: Tensor | None, lower: _Bound | None, upper: _Bound | None) -> Tensor | None:
    """Bool mask of kept entries inside the bracket; None means 'every entry'. Never writes to ``kept``."""
    selected: Tensor | None = None
    for bound, inclusive_op, strict_op in ((lower, torch.ge, torch.gt), (upper, torch.le, torch.lt)):
        if bound is None:
            continue
        inside = (inclusive_op if bound.inclusive else strict_op)(values, bound.value.to(values.device))
        selected = inside if selected is None else selected.logical_and_(inside)
    if kept is None:
        return selected
    return kept if selected is None else selected.logical_and_(kept)


def _count(values: Tensor, kept: Tensor | None, lower: _Bound | None, upper: _Bound | None) -> int:
    selected = _select(values, kept, lower, upper)
    return values.numel() if selected is None else int(torch.count_nonzero(selected))


def _sample_bracket(
    inputs: _Inputs,
    lower: _Bound | None,
    upper: _Bound | None,
    in_bracket: int,
    rank: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor] | None:
    """Sample scores inside the bracket and return sample quantiles around ``rank``.

    ``rank`` is 1-based among the ``in_bracket`` kept entries of the bracket. Returns
    None when the sample holds no candidate (the caller then gathers everything).
    """
    # Oversample in proportion to how small the bracket is relative to all entries.
    draw_fraction = min(1.0, _SAMPLE_SIZE / max(in_bracket, 1))
    pieces: list[Tensor] = []
    for index in range(len(inputs)):
        numel = inputs.raw_scores[index].numel()
        if numel == 0 or inputs.kept_counts[index] == 0:
            continue
        draws = min(numel, max(1, math.ceil(numel * draw_fraction)))
        positions = torch.randint(numel, (draws,), generator=generator).to(inputs.raw_scores[index].device)
        values = inputs.score(index, positions)
        kept = inputs.kept(index)
        selected = _select(values, None if kept is None else kept[positions], lower, upper)
        pieces.append((values if selected is None else values[selected]).cpu())
    sample = torch.cat(pieces) if pieces else torch.empty(0, dtype=inputs.dtype)
    if sample.numel() == 0:
        return None
    sample, _ = torch.sort(sample)
    size = sample.numel()
    fraction = (rank - 0.5) / in_bracket
    centre = fraction * size
    # Four standard deviations of the sample rank, plus slack for tiny samples.
    spread = 4.0 * math.sqrt(size * fraction * (1.0 - fraction)) + 2.0
    low_index = min(size - 1, max(0, math.floor(centre - spread)))
    high_index = min(size - 1, max(0, math.ceil(centre + spread)))
    return sample[low_index], sample[high_index]


class _Threshold:
    """The k-th smallest kept score and, per tensor, kept entries below it and equal to it."""

    def __init__(self, value: Tensor, below: list[int], ties: list[int]) -> None:
        self.value = value
        self.below = below
        self.ties = ties


def _find_threshold(inputs: _Inputs, k: int) -> _Threshold:
    """Locate the k-th smallest (1-based) kept score.

    Keeps a value bracket known to hold it, with per-tensor counts of kept entries below the
    bracket; refines the bracket from sample quantiles until few entries remain, then gathers
    those and sorts them. ``value`` is a 0-dim CPU tensor in the common dtype.
    """
    generator = torch.Generator().manual_seed(_SAMPLE_SEED)
    lower: _Bound | None = None
    upper: _Bound | None = None
    n_tensors = len(inputs)
    below = [0] * n_tensors  # per tensor: kept entries below the bracket
    in_bracket = inputs.total_kept
    for _ in range(_MAX_REFINEMENTS):
        if in_bracket <= _GATHER_LIMIT:
            break
        quantiles = _sample_bracket(inputs, lower, upper, in_bracket, k - sum(below), generator)
        if quantiles is None:
            break
        pivot_low, pivot_high = quantiles
        strictly_below_low = _Bound(pivot_low, inclusive=False)
        at_most_high = _Bound(pivot_high, inclusive=True)
        less_than_low: list[int] = []
        not_above_high: list[int] = []
        # The pass that counts also gathers [pivot_low, pivot_high] (the sample says it almost surely holds the k-th
        # value, and few entries): when it does, no second pass over the scores is needed. Past the gather limit
        # (long runs of equal scores) it only counts.
        gathered: list[Tensor] | None = []
        gathered_count = 0
        for index in range(n_tensors):
            values, kept = inputs.score(index), inputs.kept(index)
            less_than_low.append(_count(values, kept, None, strictly_below_low))
            if gathered is None:
                not_above_high.append(_count(values, kept, None, at_most_high))
                continue
            inside = _select(values, kept, _Bound(pivot_low, inclusive=True), at_most_high)
            chosen = values if inside is None else values[inside]
            not_above_high.append(less_than_low[-1] + chosen.numel())
            gathered_count += chosen.numel()
            if gathered_count > _GATHER_LIMIT:
                gathered = None
            else:
                gathered.append(_candidates(chosen))
        if gathered is not None and sum(less_than_low) < k <= sum(not_above_high):
            return _threshold_among(gathered, less_than_low, k, inputs.dtype)
        if k <= sum(less_than_low):
            upper = strictly_below_low
            in_bracket = sum(less_than_low) - sum(below)
        elif k <= sum(not_above_high):
            if bool(pivot_low == pivot_high):
                # Every kept entry of [pivot, pivot] equals the pivot: no need to gather them.
                ties = [high - low for high, low in zip(not_above_high, less_than_low)]
                return _Threshold(pivot_low, less_than_low, ties)
            narrowed = sum(not_above_high) - sum(less_than_low)
            if narrowed <= in_bracket // 2:
                lower, upper = _Bound(pivot_low, inclusive=True), at_most_high
                below, in_bracket = less_than_low, narrowed
                continue
            # Little progress: long runs of equal scores at the pivots. Settle on a pivot if it
            # is the k-th value, else step over both runs into the open interval between them.
            not_above_low: list[int] = []
            less_than_high: list[int] = []
            for index in range(n_tensors):
                values, kept = inputs.score(index), inputs.kept(index)
                not_above_low.append(_count(values, kept, None, _Bound(pivot_low, inclusive=True)))
                less_than_high.append(_count(values, kept, None, _Bound(pivot_high, inclusive=False)))
            if k <= sum(not_above_low):
                ties = [high - low for high, low in zip(not_above_low, less_than_low)]
                return _Threshold(pivot_low, less_than_low, ties)
            if k > sum(less_than_high):
                ties = [high - low for high, low in zip(not_above_high, less_than_high)]
                return _Threshold(pivot_high, less_than_high, ties)
            lower, upper = _Bound(pivot_low, inclusive=False), _Bound(pivot_high, inclusive=False)
            below, in_bracket = not_above_low, sum(less_than_high) - sum(not_above_low)
        else:
            lower = _Bound(pivot_high, inclusive=False)
            in_bracket = in_bracket + sum(below) - sum(not_above_high)
            below = not_above_high

    candidates = []
    for index in range(n_tensors):
        values, kept = inputs.score(index), inputs.kept(index)
        selected = _select(values, kept, lower, upper)
        candidates.append(_candidates(values if selected is None else values[selected]))
    return _threshold_among(candidates, below, k, inputs.dtype)


def _candidates(chosen: Tensor) -> Tensor:
    """The scores gathered from one tensor, on the CPU in a dtype kthvalue supports everywhere (exact for all
    inputs: they are few), copied (`chosen` may be the reused |scores| buffer)."""
    return chosen.to("cpu", torch.float64 if chosen.is_floating_point() else torch.int64, copy=True)


def _threshold_among(candidates: list[Tensor], below: list[int], k: int, dtype: torch.dtype) -> _Threshold:
    """The threshold when the k-th smallest kept score is among `candidates` (per tensor, the kept scores of a value
    interval) and `below[i]` kept scores of tensor i lie below that interval; its value in `dtype`, the scores'."""
    value, _ = torch.kthvalue(torch.cat(candidates), k - sum(below))
    return _Threshold(
        value.to(dtype),
        [count + int((c < value).sum()) for count, c in zip(below, candidates)],
        [int((c == value).sum()) for c in candidates],
    )


def _check_k(k: int, total_kept: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got k={k!r} of type {type(k).__name__}")
    if not 0 <= k <= total_kept:
        raise ValueError(
            f"k={k} is out of range: it must be between 0 and the number of kept entries "
            f"({total_kept})"
        )


def kth_smallest(
    scores: Sequence[Tensor], masks: Sequence[Tensor | None], k: int, *, magnitude: bool = False
) -> float:
    """The k-th smallest (1-based) score among kept entries (mask != 0; None = all kept).

    With ``magnitude=True`` the scores are ``|scores|``, without copying them. Raises ValueError unless
    1 <= k <= number of kept entries, or if a score is NaN.
    """
    inputs = _Inputs(scores, masks, magnitude)
    _check_k(k, inputs.total_kept)
    if k == 0:
        raise ValueError("k=0 has no k-th smallest value; k must be at least 1")
    return float(_find_threshold(inputs, k).value.item())


def _prune_first_ties(keep: Tensor, ties: Tensor, count: int) -> None:
    """Clear ``keep`` at the first ``count`` True entries of ``ties`` (both flat, in place)."""
    remaining = count
    for start in range(0, ties.numel(), _TIE_CHUNK):
        positions = torch.nonzero(ties[start : start + _TIE_CHUNK]).reshape(-1)[:remaining]
        keep[positions + start] = False
        remaining -= positions.numel()
        if remaining == 0:
            return


def smallest_k_masks(
    scores: Sequence[Tensor],
    masks: Sequence[Tensor | None],
    k: int,
    *,
    magnitude: bool = False,
    dtype: torch.dtype | None = None,
    out: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """New keep-masks (same shape/device as each score; of `dtype`, else of the old mask or, when None,
    of the score) after pruning exactly `k` more entries: the k smallest scores among entries
    still kept (mask != 0; None = all kept).

    ``magnitude=True`` ranks ``|scores|`` (L1 pruning) without a copy of all the scores; ``dtype=torch.bool``
    keeps the output at one byte per entry. ``out`` (one tensor per score, e.g. the mask buffers themselves) receives
    each new mask as soon as it is computed, so no second set of masks is ever held; it is also what is returned.

    Entries already pruned stay pruned. Ties at the threshold are broken deterministically
    (by tensor order, then flat index), so exactly k entries are newly pruned.
    0 <= k <= number of kept entries, else ValueError naming k. NaN scores raise ValueError.
    """
    inputs = _Inputs(scores, masks, magnitude)
    _check_k(k, inputs.total_kept)
    if out is not None and [o.shape for o in out] != [s.shape for s in inputs.raw_scores]:
        raise ValueError("out must hold one tensor of each score's shape, in the same order")
    threshold = _find_threshold(inputs, k) if k > 0 else None
    ties_to_prune = k - sum(threshold.below) if threshold is not None else 0

    # One pass per tensor: keep what was kept and is >= the threshold, then prune the first
    # remaining ties in (tensor order, flat index) order.
    new_masks: list[Tensor] = []
    for index in range(len(inputs)):
        raw_score, old_mask = inputs.raw_scores[index], inputs.masks[index]
        out_dtype = dtype or (raw_score.dtype if old_mask is None else old_mask.dtype)
        kept = inputs.kept(index)
        if threshold is None:
            keep = torch.ones(raw_score.numel(), dtype=torch.bool, device=raw_score.device) if kept is None else kept
        else:
            values = inputs.score(index)
            value = threshold.value.to(values.device)
            tie_share = min(ties_to_prune, threshold.ties[index])
            # Strictly above prunes every tie at once; otherwise keep >= and clear some ties.
            keep = values > value if tie_share == threshold.ties[index] else values >= value
            ties = None
            if 0 < tie_share < threshold.ties[index]:
                ties = values == value
                if kept is not None:
                    ties &= kept
            if kept is not None:
                if inputs.owns_kept(index):  # last use of our private copy: it becomes the output
                    keep = kept.logical_and_(keep)
                else:
                    keep &= kept
            if ties is not None:
                _prune_first_ties(keep, ties, tie_share)
            ties_to_prune -= tie_share
        if out is not None:
            out[index].copy_(keep.reshape(raw_score.shape))  # written now; `keep` is freed before the next tensor
            new_masks.append(out[index])
            continue
        # A fresh tensor, or our own kept copy, needs no copy; the caller's kept mask does (or a dtype change).
        reuse = keep is not kept or inputs.owns_kept(index)
        new_masks.append(keep.reshape(raw_score.shape).to(out_dtype, copy=not reuse))
    return new_masks
