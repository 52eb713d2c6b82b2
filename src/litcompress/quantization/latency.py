"""Latency measurement on this host, following the rules that make CPU timings repeatable.

- glibc's allocator is pinned (no mmap/trim churn between runs), once per process;
- torch's thread count is pinned while measuring;
- variants are interleaved, their order rotating from round to round (AB, BA, AB, ...), so that host noise and
  the position in a round hit all of them alike;
- each sample is a block of calls long enough to time (not one sub-millisecond call);
- medians are reported.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import statistics
import time
from typing import Callable, Iterator, Sequence

import torch

from litcompress._inputs import copied, written_into

_ALLOCATOR_PINNED = False
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def pin_allocator() -> bool:
    """Raise glibc's mmap/trim thresholds to 1 GiB (process-wide, idempotent). False if not glibc."""
    global _ALLOCATOR_PINNED
    if _ALLOCATOR_PINNED:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        return False
    _ALLOCATOR_PINNED = True
    return True


@contextlib.contextmanager
def pinned_threads(num_threads: int | None) -> Iterator[None]:
    """Pin torch's intra-op threads for the duration (restored afterwards)."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure_latencies(models: Sequence[Callable], inputs: tuple | torch.Tensor, repeats: int = 20, warmup: int = 3,
                      num_threads: int | None = None, min_block_s: float = 2e-3) -> list[dict[str, float]]:
    """Interleaved latency of each model on ``inputs`` (the positional arguments of a call; a tensor is the one
    argument): min/median/max seconds per call.

    Each of the `repeats` samples of a model is one block of back-to-back calls lasting at least `min_block_s`
    (one call for slow models), divided by the number of calls: a single call of a model that runs in 0.1 ms is
    mostly timer and cache noise. The block is sized from the fastest of the warm-up calls after the first and one
    more call, so one stalled call does not make every block one call. The order of the models rotates from one
    repeat to the next, so none is always measured right after the same neighbour.
    """
    if repeats < 1 or warmup < 0 or min_block_s < 0:
        raise ValueError(f"measure_latencies: repeats >= 1, warmup >= 0 and min_block_s >= 0 "
                         f"(got {repeats}, {warmup}, {min_block_s}).")
    if isinstance(inputs, torch.Tensor):  # iterated, its rows were the arguments
        inputs = (inputs,)
    pin_allocator()
    samples: list[list[float]] = [[] for _ in models]
    # (no inference mode for TorchScript: a scripted model called once with gradients on keeps a graph executor that
    # then fails under it, "Inference tensors cannot be saved for backward")
    scripted = any(isinstance(m, torch.jit.ScriptModule) for model in models if isinstance(model, torch.nn.Module)
                   for m in model.modules())
    with pinned_threads(num_threads), torch.no_grad() if scripted else torch.inference_mode():
        calls, writes = [], []
        for model in models:
            timings, written = [], False
            for _ in range(warmup + 1):
                args = copied(inputs)  # (outside the timer) a forward writing into its inputs leaves the caller's
                start = time.perf_counter()
                model(*args)
                timings.append(time.perf_counter() - start)
                written = written or written_into(args, inputs)
            one_call = min(timings[1:] or timings)  # the first call may set up (allocations, kernels' caches)
            calls.append(max(1, math.ceil(min_block_s / max(one_call, 1e-9))) if min_block_s else 1)
            writes.append(written)
        for r in range(repeats):
            for k in range(len(models)):
                i = (r + k) % len(models)
                model, n = models[i], calls[i]
                while True:
                    # one copy per call where the forward writes into its inputs (the block's calls ran on drifting
                    # values: halved 200 times, denormals), else one for the block
                    per_call = [copied(inputs) for _ in range(n)] if writes[i] else [copied(inputs)] * n
                    start = time.perf_counter()
                    for args in per_call:
                        model(*args)
                    elapsed = time.perf_counter() - start
                    if writes[i] or not written_into(per_call[0], inputs):
                        break
                    writes[i] = True  # it wrote only now (not in the warm-up): this block again, a copy per call
                samples[i].append(elapsed / n)
    return [{"min": min(s), "median": statistics.median(s), "max": max(s)} for s in samples]
