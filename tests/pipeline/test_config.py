"""Pipeline configuration: validated at construction, schedules spanning the fine-tuning steps."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import torch.nn.utils.prune as torch_prune
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from litcompress.pipeline import CompressionConfig, PruneConfig
from litcompress.pruning.schedules import IterativeSchedule, LinearSchedule, PolynomialDecay
from litcompress.quantization import PTQConfig


class ThresholdAndAmount(torch_prune.L1Unstructured):
    """A method with an argument no PruneConfig field gives."""

    def __init__(self, amount: float, threshold: float) -> None:
        super().__init__(amount)
        self.threshold = threshold


def test_defaults_pick_the_scope_each_method_supports():
    assert PruneConfig(sparsity=0.5).scope == "global"
    structured = PruneConfig(sparsity=0.5, method="ln_structured")
    assert structured.scope == "local" and structured.structured
    assert structured.method_kwargs() == {"dim": 0, "n": 2}
    assert PruneConfig(sparsity=0.5, method=torch_prune.RandomUnstructured).scope == "global"
    assert PruneConfig(sparsity=0.5).method_kwargs() == {}
    assert PruneConfig(sparsity=0.5, method="LN_Structured").method == "ln_structured"  # the pipeline compares it
    # given as torch's class or its import path too: compared as a name, ln_structured's residual groups were skipped
    for method in (torch_prune.LnStructured, "torch.nn.utils.prune.LnStructured"):
        assert PruneConfig(sparsity=0.5, method=method).method == "ln_structured"


@given(st.one_of(st.floats(allow_nan=True), st.integers(), st.booleans(), st.none(), st.text(max_size=3)))
def test_sparsity_outside_zero_one_is_refused(value):
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1
    if valid:
        assert PruneConfig(sparsity=value).sparsity == value
    else:
        with pytest.raises(ValueError, match="sparsity"):
            PruneConfig(sparsity=value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "l3_unstructured"}, "Unknown pruning method"),
        ({"schedule": "exponential"}, "schedule='exponential'"),
        ({"begin": 0.7, "end": 0.6}, "0 <= begin < end <= 1"),
        ({"end": 1.5}, "0 <= begin < end <= 1"),
        ({"end": True}, "0 <= begin < end <= 1"),  # a bool was taken for 1.0 (and begin=False for 0.0)
        ({"begin": False}, "0 <= begin < end <= 1"),
        ({"rounds": 0}, "rounds=0"),
        ({"scope": "everywhere"}, "scope='everywhere'"),
        ({"method": "ln_structured", "scope": "global"}, "needs an unstructured method"),
        ({"parameter_names": ()}, "name at least one tensor"),
        ({"parameter_names": ("weight", "")}, "non-empty strings"),
        ({"method": "ln_structured", "parameter_names": ("weight", "bias")}, "a bias has one dimension"),
        ({"layer_types": (nn.Linear, int)}, "nn.Module classes"),
        ({"exclude": (3,)}, "non-empty strings"),
        ({"exclude": 3}, r"PruneConfig\(exclude=3\): expected a name or a list of names"),  # was tuple()'s words
        ({"parameter_names": None}, r"PruneConfig\(parameter_names=None\): expected a name or a list of names"),
        ({"dim": 0.5}, "dim=0.5"),
        ({"norm": 0}, "norm=0"),
        ({"zero_batch_norm": "yes"}, "zero_batch_norm='yes'"),
        ({"group_residuals": 1}, "group_residuals=1"),
        # what the method alone decides: refused after compress evaluated the model
        ({"method": torch_prune.Identity}, "Identity takes no `amount`"),
        ({"method": torch_prune.CustomFromMask, "scope": "local"}, "CustomFromMask takes no `amount`"),
        ({"method": ThresholdAndAmount}, r"ThresholdAndAmount\): it needs 'threshold', which PruneConfig cannot pass"),
    ],
)
def test_bad_prune_config_fails_at_construction(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        PruneConfig(sparsity=0.5, **kwargs)


def test_a_schedule_object_sets_the_sparsity_and_must_count_steps():
    schedule = PolynomialDecay(final_sparsity=0.9, begin=0, end=100, frequency=10)
    config = PruneConfig(schedule=schedule)
    assert config.sparsity == 0.9 and config.step_schedule(5) is schedule
    assert PruneConfig(sparsity=0.9, schedule=schedule).sparsity == 0.9
    with pytest.raises(ValueError, match="disagrees with the schedule's final sparsity"):
        PruneConfig(sparsity=0.5, schedule=schedule)
    with pytest.raises(ValueError, match="unit='step'"):
        PruneConfig(schedule=IterativeSchedule(rate_per_round=0.2, rounds=3))
    with pytest.raises(ValueError, match="give the final sparsity"):
        PruneConfig()


@given(total=st.integers(2, 100_000), sparsity=st.floats(0, 0.99), begin=st.floats(0, 0.9),
       span=st.floats(0.01, 1), rounds=st.integers(1, 50), shape=st.sampled_from(["cubic", "linear"]))
def test_shaped_schedules_span_the_fine_tuning_steps(total, sparsity, begin, span, rounds, shape):
    end = min(1.0, begin + span)
    schedule = PruneConfig(sparsity=sparsity, schedule=shape, begin=begin, end=end, rounds=rounds).step_schedule(total)
    assert isinstance(schedule, PolynomialDecay) and schedule.unit == "step"
    assert isinstance(schedule, LinearSchedule) == (shape == "linear")
    assert 0 <= schedule.begin < schedule.end <= max(total, schedule.begin + 1)
    assert schedule.target(schedule.begin) == 0.0 and schedule.target(total) == sparsity
    points = [t for t in range(schedule.begin, schedule.end + 1) if schedule.should_prune(t)]
    # exactly `rounds` after begin (one per step when the span is shorter)
    assert len(points) == min(rounds, schedule.end - schedule.begin) + 1 and points[-1] == schedule.end


def test_oneshot_prunes_everything_at_step_zero():
    schedule = PruneConfig(sparsity=0.7, schedule="oneshot").step_schedule(500)
    assert schedule.should_prune(0) and schedule.target(0) == 0.7
    assert not any(schedule.should_prune(t) for t in range(2, 500))


def test_compression_config_checks_its_fields():
    config = CompressionConfig()
    assert config.prune is None and config.shrink and config.quantize is None and config.export
    with pytest.raises(TypeError, match="expected a PruneConfig"):
        CompressionConfig(prune=0.5)
    with pytest.raises(TypeError, match="expected a PTQConfig"):
        CompressionConfig(quantize="dynamic")
    with pytest.raises(TypeError, match="shrink=1"):
        CompressionConfig(shrink=1)
    with pytest.raises(ValueError, match="latency_repeats=0"):
        CompressionConfig(latency_repeats=0)
    with pytest.raises(ValueError, match="num_threads=0"):
        CompressionConfig(num_threads=0)
    assert CompressionConfig(quantize=PTQConfig(), num_threads=2).num_threads == 2
    with pytest.raises(TypeError, match="sparse_kernels='yes'"):
        CompressionConfig(sparse_kernels="yes")
    with pytest.raises(ValueError, match="alternatives; give quantize=None"):
        CompressionConfig(sparse_kernels=True, quantize=PTQConfig())
    with pytest.raises(ValueError, match="onnx files cannot hold sparse tensors"):
        CompressionConfig(sparse_kernels=True, fp32_format="onnx")
    assert CompressionConfig(sparse_kernels=True, fp32_format="torchscript").sparse_kernels


@pytest.mark.parametrize("method", ["ln_structured", "random_structured", torch_prune.LnStructured])
def test_sparse_kernels_after_structured_pruning_and_shrink_are_refused_and_without_shrink_taken(method):
    """Shrink removes what a structured method zeroes: the whole fine-tuning ran to say no layer was sparse enough."""
    name = method if isinstance(method, str) else "ln_structured"  # torch's class, taken as its name
    structured = PruneConfig(sparsity=0.5, method=method, scope="local")
    with pytest.raises(ValueError, match=re.escape(f"CompressionConfig(sparse_kernels=True) with PruneConfig("
                                                   f"method={name!r}): shrink removes the slices")):
        CompressionConfig(prune=structured, sparse_kernels=True)
    assert CompressionConfig(prune=structured, sparse_kernels=True, shrink=False).sparse_kernels  # zero rows on CSR
    assert CompressionConfig(prune=PruneConfig(sparsity=0.9), sparse_kernels=True).sparse_kernels
    assert math.isclose(PruneConfig(sparsity=0.25).sparsity, 0.25)


def test_the_pipeline_engine_does_not_import_lightning():
    code = ("import sys, litcompress; from litcompress import compress, CompressionConfig, PruneConfig; "
            "print('lightning' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "False"


def test_replace_derives_the_scope_and_the_schedules_sparsity_again():
    """`dataclasses.replace` passed the scope and sparsity __post_init__ had derived on as if given: a structured
    method was refused ("global pruning ... needs an unstructured method"), an unstructured one stayed local
    without a word, and a new schedule disagreed with the old one's sparsity."""
    import dataclasses

    unstructured = PruneConfig(sparsity=0.5)
    structured = dataclasses.replace(unstructured, method="ln_structured")
    assert structured.scope == "local" and structured == PruneConfig(sparsity=0.5, method="ln_structured")
    assert dataclasses.replace(structured, method="l1_unstructured").scope == "global"
    assert dataclasses.replace(PruneConfig(sparsity=0.5, scope="local"), method="ln_structured").scope == "local"
    with pytest.raises(ValueError, match="needs an unstructured method"):  # a scope given stays given
        dataclasses.replace(PruneConfig(sparsity=0.5, scope="global"), method="ln_structured")
    scheduled = PruneConfig(schedule=PolynomialDecay(final_sparsity=0.5, begin=0, end=10))
    assert dataclasses.replace(scheduled, schedule=PolynomialDecay(final_sparsity=0.8, begin=0, end=10)).sparsity == 0.8
    assert dataclasses.replace(scheduled, schedule="linear").sparsity == 0.5  # a shape: the sparsity is kept
    with pytest.raises(ValueError, match="disagrees with the schedule's final sparsity 0.8"):
        dataclasses.replace(scheduled, sparsity=0.5, schedule=PolynomialDecay(final_sparsity=0.8, begin=0, end=10))
    assert repr(structured.scope) == "'local'" and f"{scheduled.sparsity}" == "0.5"


def test_numpy_numbers_are_taken_as_python_numbers():
    """numpy's float32 0.5 was "not a fraction in [0, 1)", an int64 not "an int >= 1", and a float64 was kept as
    numpy's (into checkpoints and JSON)."""
    import numpy as np

    from litcompress.quantization import AccuracyCriterion

    prune = PruneConfig(sparsity=np.float32(0.5), rounds=np.int64(5), begin=np.float64(0.1))
    assert (prune.sparsity, prune.rounds) == (0.5, 5) and type(prune.begin) is float and type(prune.rounds) is int
    assert type(PruneConfig(sparsity=np.float64(0.5)).sparsity) is float
    assert CompressionConfig(num_threads=np.int64(1), latency_repeats=np.int32(3)).latency_repeats == 3
    quantize = PTQConfig(max_trials=np.int64(3), timeout_s=np.float32(2.5))
    assert (type(quantize.max_trials), quantize.timeout_s) == (int, 2.5)
    assert AccuracyCriterion(tolerable_loss=np.float32(0.25)).tolerable_loss == 0.25
    with pytest.raises(TypeError, match="expected True or False"):
        PruneConfig(sparsity=0.5, zero_batch_norm=np.bool_(True))  # not a number: numpy's bool is still refused


def test_a_structured_method_with_bias_is_named_as_given():
    """The message quoted method='LnStructured' (the class's name), which PruneConfig then refuses."""
    with pytest.raises(ValueError, match=r"^PruneConfig\(method='ln_structured', parameter_names=\('weight', "
                                         r"'bias'\)\)"):
        PruneConfig(sparsity=0.5, method="ln_structured", parameter_names=("weight", "bias"))
