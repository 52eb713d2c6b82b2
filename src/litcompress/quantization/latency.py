"""Latency measurement on this host, following the rules that make CPU timings repeatable.

- glibc's allocator is pinned (no mmap/trim churn between runs), once per process;
- torch's thread count is pinned while measuring;
- variants are interleaved (A, B, A, B, ...) so that host noise hits all of them alike;
- medians are reported.
"""

from __future__ import annotations

import contextlib
import ctypes
import statistics
import time
from typing import Callable, Iterator, Sequence

import torch

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


def measure_latencies(models: Sequence[Callable], inputs: tuple, repeats: int = 20, warmup: int = 3,
                      num_threads: int | None = None) -> list[dict[str, float]]:
    """Interleaved latency of each model on ``inputs``: min/median/max seconds per call."""
    pin_allocator()
    samples: list[list[float]] = [[] for _ in models]
    with pinned_threads(num_threads), torch.inference_mode():
        for model in models:
            for _ in range(warmup):
                model(*inputs)
        for _ in range(repeats):
            for i, model in enumerate(models):
                start = time.perf_counter()
                model(*inputs)
                samples[i].append(time.perf_counter() - start)
    return [{"min": min(s), "median": statistics.median(s), "max": max(s)} for s in samples]
