"""Exact global magnitude pruning without concatenating every score.

``torch.nn.utils.prune.global_unstructured`` copies every score of every tensor into
one vector and runs ``topk`` over it: the peak extra memory is a multiple of the model
size. Here the k-th smallest kept score is found by sample-guided bracketing: a small
random sample of the scores gives a narrow value interval that almost surely holds the
k-th value, counting passes (one tensor at a time) confirm it, and only the few
candidates inside the interval are gathered and sorted. The peak extra memory is about
one tensor's worth of temporaries plus the output masks.

The result is identical to a stable sort of all kept scores in (tensor order, flat index)
order followed by pruning its first ``k`` entries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["kth_smallest", "smallest_k_masks"]

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


class _Bound:
    """One end of the value bracket: a 0-dim tensor and whether it is inclusive."""

    __slots__ = ("value", "inclusive")

    def __init__(self, value: Tensor, inclusive: bool) -> None:
        self.value = value
        self.inclusive = inclusive


def _common_dtype(scores: Sequence[Tensor]) -> torch.dtype:
    """Dtype in which every comparison is exact: the shared dtype, else float64."""
    dtypes = {score.dtype for score in scores}
    for dtype in dtypes:
        if dtype.is_complex:
            raise ValueError(f"scores must be real, got a tensor of dtype {dtype}")
    if len(dtypes) == 1:
        (dtype,) = dtypes
        return torch.uint8 if dtype == torch.bool else dtype
    # float64 holds every float16/bfloat16/float32 value and integers below 2**53 exactly.
    return torch.float64


class _Inputs:
    """Validated scores (in the common dtype, lazily) and kept-entry masks."""

    def __init__(self, scores: Sequence[Tensor], masks: Sequence[Tensor | None]) -> None:
        scores = list(scores)
        masks = list(masks)
        if len(scores) != len(masks):
            raise ValueError(
                f"got {len(scores)} score tensors but {len(masks)} masks; pass one mask "
                "(or None) per score tensor"
            )
        self.raw_scores = scores
        self.masks = masks
        self.dtype = _common_dtype(scores) if scores else torch.float32
        self.kept_counts: list[int] = []
        for index, (score, mask) in enumerate(zip(scores, masks)):
            if not isinstance(score, Tensor):
                raise TypeError(f"scores[{index}] must be a torch.Tensor, got {type(score).__name__}")
            if mask is not None and mask.shape != score.shape:
                raise ValueError(
                    f"masks[{index}] has shape {tuple(mask.shape)} but scores[{index}] has "
                    f"shape {tuple(score.shape)}; they must match"
                )
            if score.is_floating_point() and bool(torch.isnan(score).any()):
                raise ValueError(f"scores[{index}] contains NaN; scores must be comparable numbers")
            self.kept_counts.append(score.numel() if mask is None else int(torch.count_nonzero(mask)))
        self.total_kept = sum(self.kept_counts)

    def __len__(self) -> int:
        return len(self.raw_scores)

    def score(self, index: int) -> Tensor:
        """Flat scores of tensor ``index`` in the common dtype (a view when possible)."""
        flat = self.raw_scores[index].reshape(-1)
        return flat if flat.dtype == self.dtype else flat.to(self.dtype)

    def kept(self, index: int) -> Tensor | None:
        """Flat bool mask of kept entries, or None when every entry is kept."""
        mask = self.masks[index]
        if mask is None:
            return None
        flat = mask.reshape(-1)
        return flat if flat.dtype == torch.bool else flat != 0


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
    total_numel = sum(inputs.raw_scores[i].numel() for i in range(len(inputs)))
    # Oversample in proportion to how small the bracket is relative to all entries.
    draw_fraction = min(1.0, _SAMPLE_SIZE / max(in_bracket, 1))
    pieces: list[Tensor] = []
    for index in range(len(inputs)):
        numel = inputs.raw_scores[index].numel()
        if numel == 0 or inputs.kept_counts[index] == 0:
            continue
        draws = min(numel, max(1, math.ceil(numel * draw_fraction)))
        positions = torch.randint(numel, (draws,), generator=generator).to(inputs.raw_scores[index].device)
        values = inputs.score(index)[positions]
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


def _kth_smallest_tensor(inputs: _Inputs, k: int) -> Tensor:
    """The k-th smallest (1-based) kept score as a 0-dim CPU tensor in the common dtype."""
    generator = torch.Generator().manual_seed(_SAMPLE_SEED)
    lower: _Bound | None = None
    upper: _Bound | None = None
    below = 0  # kept entries strictly below the bracket
    in_bracket = inputs.total_kept
    for _ in range(_MAX_REFINEMENTS):
        if in_bracket <= _GATHER_LIMIT:
            break
        rank = k - below
        quantiles = _sample_bracket(inputs, lower, upper, in_bracket, rank, generator)
        if quantiles is None:
            break
        pivot_low, pivot_high = quantiles
        less_than_low = 0
        at_most_high = 0
        low_bound = _Bound(pivot_low, inclusive=True)
        high_bound = _Bound(pivot_high, inclusive=True)
        for index in range(len(inputs)):
            values, kept = inputs.score(index), inputs.kept(index)
            less_than_low += _count(values, kept, None, _Bound(pivot_low, inclusive=False))
            at_most_high += _count(values, kept, None, high_bound)
        if k <= less_than_low:
            upper = _Bound(pivot_low, inclusive=False)
            in_bracket = less_than_low - below
        elif k <= at_most_high:
            if bool(pivot_low == pivot_high):
                return pivot_low  # every entry of the bracket equals the pivot
            lower, upper = low_bound, high_bound
            below, in_bracket = less_than_low, at_most_high - less_than_low
        else:
            lower = _Bound(pivot_high, inclusive=False)
            in_bracket = in_bracket + below - at_most_high
            below = at_most_high
    candidates = []
    for index in range(len(inputs)):
        values, kept = inputs.score(index), inputs.kept(index)
        selected = _select(values, kept, lower, upper)
        candidates.append((values if selected is None else values[selected]).cpu())
    gathered = torch.cat(candidates)
    # The candidates are few: widen to a dtype kthvalue supports everywhere (exact for all inputs).
    gathered = gathered.to(torch.float64 if gathered.is_floating_point() else torch.int64)
    value, _ = torch.kthvalue(gathered, k - below)
    return value.to(inputs.dtype)


def _check_k(k: int, total_kept: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got k={k!r} of type {type(k).__name__}")
    if not 0 <= k <= total_kept:
        raise ValueError(
            f"k={k} is out of range: it must be between 0 and the number of kept entries "
            f"({total_kept})"
        )


def kth_smallest(scores: Sequence[Tensor], masks: Sequence[Tensor | None], k: int) -> float:
    """The k-th smallest (1-based) score among kept entries (mask != 0; None = all kept).

    Raises ValueError unless 1 <= k <= number of kept entries, or if a score is NaN.
    """
    inputs = _Inputs(scores, masks)
    _check_k(k, inputs.total_kept)
    if k == 0:
        raise ValueError("k=0 has no k-th smallest value; k must be at least 1")
    return float(_kth_smallest_tensor(inputs, k).item())


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
    scores: Sequence[Tensor], masks: Sequence[Tensor | None], k: int
) -> list[Tensor]:
    """New keep-masks (same shape/device as each score; dtype of the old mask or, when None,
    of the score) after pruning exactly `k` more entries: the k smallest scores among entries
    still kept (mask != 0; None = all kept).

    Entries already pruned stay pruned. Ties at the threshold are broken deterministically
    (by tensor order, then flat index), so exactly k entries are newly pruned.
    0 <= k <= number of kept entries, else ValueError naming k. NaN scores raise ValueError.
    """
    inputs = _Inputs(scores, masks)
    _check_k(k, inputs.total_kept)
    threshold = _kth_smallest_tensor(inputs, k) if k > 0 else None

    # First pass: how many kept entries lie strictly below the threshold, and how many tie.
    below_counts: list[int] = []
    tie_counts: list[int] = []
    for index in range(len(inputs)):
        if threshold is None:
            below_counts.append(0)
            tie_counts.append(0)
            continue
        values, kept = inputs.score(index), inputs.kept(index)
        value = threshold.to(values.device)
        below_counts.append(_count(values, kept, None, _Bound(value, inclusive=False)))
        ties = values == value
        if kept is not None:
            ties &= kept
        tie_counts.append(int(torch.count_nonzero(ties)))
    ties_to_prune = k - sum(below_counts)

    # Second pass: build each mask, pruning the first remaining ties in tensor order.
    new_masks: list[Tensor] = []
    for index in range(len(inputs)):
        raw_score, old_mask = inputs.raw_scores[index], inputs.masks[index]
        out_dtype = raw_score.dtype if old_mask is None else old_mask.dtype
        kept = inputs.kept(index)
        keep = torch.ones(raw_score.numel(), dtype=torch.bool, device=raw_score.device) if kept is None else kept.clone()
        if threshold is not None:
            values = inputs.score(index)
            value = threshold.to(values.device)
            keep &= values >= value
            tie_share = min(ties_to_prune, tie_counts[index])
            if tie_share == tie_counts[index] and tie_share > 0:
                keep &= values != value
            elif tie_share > 0:
                ties = values == value
                if kept is not None:
                    ties &= kept
                _prune_first_ties(keep, ties, tie_share)
            ties_to_prune -= tie_share
        new_masks.append(keep.reshape(raw_score.shape).to(out_dtype))
    return new_masks
