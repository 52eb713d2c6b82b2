"""measure_latencies: block timing, rotating interleaving, pinned threads restored."""

from __future__ import annotations

import time

import pytest
import torch

from litcompress.quantization.latency import measure_latencies


class Recorder:
    """A model that records when it is called (by whom, in what order) and can take a fixed minimum time."""

    def __init__(self, name: str, log: list[str], sleep_s: float = 0.0) -> None:
        self.name, self.log, self.sleep_s = name, log, sleep_s

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(self.name)
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return x


def test_fast_models_are_timed_in_blocks_and_slow_ones_call_by_call():
    log: list[str] = []
    fast, slow = Recorder("fast", log), Recorder("slow", log, sleep_s=3e-3)
    stats = measure_latencies([fast, slow], (torch.zeros(1),), repeats=4, warmup=1, min_block_s=2e-3)
    # warm-up + one calibration call each, then 4 samples: one call per sample for the slow model, a block of
    # several for the fast one (a no-op is far below 2 ms)
    assert log.count("slow") == 1 + 1 + 4
    assert (log.count("fast") - 2) % 4 == 0 and log.count("fast") - 2 > 4
    assert stats[1]["min"] >= 3e-3  # a sample is seconds per call, never less than the sleep
    for s in stats:
        assert 0 < s["min"] <= s["median"] <= s["max"]


def test_rotation_puts_every_model_first_equally_often_and_threads_are_restored():
    log: list[str] = []
    models = [Recorder(str(i), log) for i in range(3)]
    before = torch.get_num_threads()
    measure_latencies(models, (torch.zeros(1),), repeats=6, warmup=0, num_threads=1, min_block_s=0)
    assert torch.get_num_threads() == before
    timed = log[3:]  # after one calibration call each; min_block_s=0 is one call per sample
    rounds = [timed[3 * r:3 * r + 3] for r in range(6)]
    assert all(sorted(r) == ["0", "1", "2"] for r in rounds) and len(timed) == 18
    assert sorted(r[0] for r in rounds) == ["0", "0", "1", "1", "2", "2"]


@pytest.mark.parametrize("kwargs", [dict(repeats=0), dict(warmup=-1), dict(min_block_s=-1.0)])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError, match="measure_latencies"):
        measure_latencies([lambda x: x], (torch.zeros(1),), **kwargs)


class StallsOnce(Recorder):
    """A fast model whose `stall_at`-th call (counted from 1) stalls, as one call on a busy host can."""

    def __init__(self, log: list[str], stall_at: int) -> None:
        super().__init__("stalls", log)
        self.stall_at = stall_at

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.sleep_s = 20e-3 if len(self.log) + 1 == self.stall_at else 0.0
        return super().__call__(x)


@pytest.mark.parametrize("stall_at", [1, 2, 3, 4])
def test_one_stalled_call_before_the_samples_does_not_make_every_block_one_call(stall_at):
    """The block was sized from the one call after the warm-up: had it stalled, a model of microseconds was timed
    one call per sample, the timer's noise the blocks are there to avoid."""
    log: list[str] = []
    measure_latencies([StallsOnce(log, stall_at)], (torch.zeros(1),), repeats=4, warmup=3, min_block_s=2e-3)
    per_sample = (len(log) - 4) / 4  # after 3 warm-up calls and one more
    assert per_sample > 10  # a no-op takes well under 2e-3 / 10 s


def test_a_tensor_is_the_one_argument_of_each_call():
    shapes: list[tuple[int, ...]] = []
    measure_latencies([lambda x: shapes.append(tuple(x.shape))], torch.zeros(3, 16), repeats=2, warmup=1,
                      min_block_s=0)
    assert set(shapes) == {(3, 16)}
