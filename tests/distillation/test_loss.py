"""The distillation loss and `Distiller`, without Lightning: maths as properties, a plain training loop."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from litcompress.data import DigitsDataModule
from litcompress.distillation import DistillationConfig, Distiller, default_outputs, distillation_loss

logits = st.tuples(st.integers(1, 6), st.integers(2, 12), st.integers(0, 2**31 - 1), st.floats(0.25, 20.0))


def _pair(rows: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, classes, generator=generator, dtype=torch.float64) * 3,
            torch.randn(rows, classes, generator=generator, dtype=torch.float64) * 3)


@settings(max_examples=60, deadline=None)
@given(logits)
def test_kl_term_is_nonnegative_and_zero_exactly_for_the_same_distribution(case):
    rows, classes, seed, temperature = case
    student, teacher = _pair(rows, classes, seed)
    assert float(distillation_loss(student, teacher, temperature)) >= -1e-12
    shifted = teacher + torch.randn(rows, 1, dtype=torch.float64)  # a constant per row: the same softmax
    assert abs(float(distillation_loss(shifted, teacher, temperature))) < 1e-10


@settings(max_examples=60, deadline=None)
@given(logits)
def test_kl_gradient_is_temperature_times_the_difference_of_the_softened_distributions(case):
    rows, classes, seed, temperature = case
    student, teacher = _pair(rows, classes, seed)
    student.requires_grad_(True)
    distillation_loss(student, teacher, temperature).backward()
    # d/ds of T^2 * KL(p_t || softmax(s / T)), averaged over rows: T * (softmax(s / T) - p_t) / rows
    expected = temperature * (torch.softmax(student.detach() / temperature, -1)
                              - torch.softmax(teacher / temperature, -1)) / rows
    torch.testing.assert_close(student.grad, expected)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(2, 7), st.integers(0, 2**31 - 1))
def test_sequence_outputs_average_over_every_position(batch, length, classes, seed):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, length, classes, generator=generator, dtype=torch.float64)
    teacher = torch.randn(batch, length, classes, generator=generator, dtype=torch.float64)
    flat = distillation_loss(student.reshape(-1, classes), teacher.reshape(-1, classes), 2.0)
    torch.testing.assert_close(distillation_loss(student, teacher, 2.0), flat)


def test_mse_kind_and_the_teacher_side_carries_no_gradient():
    student = torch.randn(4, 3, requires_grad=True)
    teacher = torch.randn(4, 3, requires_grad=True)
    loss = distillation_loss(student, teacher, temperature=7.0, kind="mse")
    torch.testing.assert_close(loss, F.mse_loss(student, teacher.detach()))
    distillation_loss(student, teacher, 2.0).backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"temperature": 0}, "temperature=0): expected a number > 0"),
    ({"temperature": float("inf")}, "temperature=inf): expected a number > 0"),
    ({"alpha": 1.5}, "alpha=1.5): expected the distillation term's weight in [0, 1]"),
    ({"alpha": True}, "alpha=True)"),
    ({"kind": "cosine"}, "kind='cosine'): use one of ('kl', 'mse')"),
])
def test_bad_configurations_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError) as error:
        DistillationConfig(**kwargs)
    assert message in str(error.value)


def test_mismatched_outputs_are_a_clear_error():
    with pytest.raises(ValueError, match=r"shape \(4, 10\) and the teacher's \(4, 5\)"):
        distillation_loss(torch.randn(4, 10), torch.randn(4, 5))
    with pytest.raises(ValueError, match="a scalar output has no classes"):
        distillation_loss(torch.tensor(1.0), torch.tensor(2.0))


class _ModelOutput(OrderedDict):
    """Like a Hugging Face ModelOutput: a mapping whose keys are also attributes."""

    def __getattr__(self, name):
        return self[name]


def test_default_outputs_finds_the_logits():
    x = torch.randn(2, 3)
    assert default_outputs(x) is x
    assert default_outputs({"logits": x, "loss": torch.tensor(0.0)}) is x
    assert default_outputs(_ModelOutput(loss=torch.tensor(0.0), logits=x)) is x
    assert default_outputs((x, "aux")) is x
    with pytest.raises(TypeError, match="pass outputs_fn="):
        default_outputs({"hidden": [x]})


def test_the_teacher_is_a_frozen_copy_and_alpha_weighs_the_two_terms():
    teacher = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    distiller = Distiller(teacher, DistillationConfig(temperature=3.0, alpha=0.25))
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())  # the caller's model untouched
    assert distiller.teacher is not teacher and not distiller.teacher.training
    x = torch.randn(5, 4)
    first, second = distiller.teacher_outputs(x), distiller.teacher_outputs(x)
    assert torch.equal(first, second) and not first.requires_grad  # eval mode: dropout off
    student = nn.Linear(4, 3)
    outputs, task = student(x), torch.tensor(0.8)
    term = distillation_loss(outputs, first, 3.0)
    torch.testing.assert_close(distiller.loss(task, outputs, x), 0.75 * task + 0.25 * term)
    only_task = Distiller(teacher, DistillationConfig(alpha=0.0)).loss(task, outputs, x)
    assert torch.equal(only_task, task)


def test_a_plain_loop_with_alpha_one_makes_the_student_agree_with_the_teacher():
    torch.manual_seed(0)
    data = DigitsDataModule()
    data.setup("fit")
    x, y = data.splits.train.tensors
    teacher = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        F.cross_entropy(teacher(x), y).backward()
        optimizer.step()
    student = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    distiller = Distiller(teacher, DistillationConfig(temperature=2.0, alpha=1.0))
    x_val = data.splits.val.tensors[0]

    def agreement() -> float:
        with torch.no_grad():
            return float((student(x_val).argmax(1) == distiller.teacher_outputs(x_val).argmax(1)).float().mean())

    before = agreement()
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    for _ in range(150):  # no label is seen: only the teacher's answers
        optimizer.zero_grad()
        distiller.loss(torch.tensor(0.0), student(x), x).backward()
        optimizer.step()
    assert before < 0.5 and agreement() > 0.9


def test_a_class_both_models_mask_with_minus_infinity_adds_nothing_and_half_precision_is_computed_in_float32():
    """F.kl_div gave NaN at -inf logits (0 * (-inf - -inf)), also with alpha=0; in bfloat16 the KL term came out
    negative for many positions."""
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    masked_student, masked_teacher = student.clone(), teacher.clone()
    masked_student[:, 4] = masked_teacher[:, 4] = float("-inf")
    on_four = distillation_loss(student[:, :4], teacher[:, :4], temperature=2.0)
    masked_student.requires_grad_(True)
    value = distillation_loss(masked_student, masked_teacher, temperature=2.0)
    torch.testing.assert_close(value, on_four)
    value.backward()
    assert torch.isfinite(masked_student.grad).all()  # the masked class gets no gradient, not NaN
    # alpha=0 turns distillation off there too (0 * NaN was NaN); the identity teacher returns its input
    assert Distiller(nn.Identity(), DistillationConfig(alpha=0.0)).loss(torch.tensor(1.0), masked_student,
                                                                        masked_teacher) == 1.0
    student16, teacher16 = torch.randn(200, 10).bfloat16(), torch.randn(200, 10).bfloat16()
    reference = distillation_loss(student16.double(), teacher16.double())
    value = distillation_loss(student16, teacher16)
    assert value.dtype == torch.float32 and value > 0
    torch.testing.assert_close(value.double(), reference, rtol=1e-5, atol=1e-6)


def test_numpy_scalars_are_numbers():
    import numpy as np

    config = DistillationConfig(temperature=np.float32(2.0), alpha=np.float32(0.25))
    assert config.temperature == 2.0 and type(config.temperature) is float and config.describe().endswith("0.25)")


def test_an_explicit_teacher_of_another_dtype_takes_the_inputs_in_its_own():
    torch.manual_seed(0)
    teacher = nn.Linear(4, 3).double()
    distiller = Distiller(teacher, DistillationConfig())
    x = torch.randn(5, 4).bfloat16()
    outputs = distiller.teacher_outputs(x)  # was: "mat1 and mat2 must have the same dtype"
    assert outputs.dtype == torch.float64
    torch.testing.assert_close(outputs, teacher(x.double()))


class _TakesABatchDict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, batch):
        return self.fc(batch["x"]) + self.fc(batch["pair"][1])


def test_a_teacher_of_another_dtype_takes_inputs_inside_a_dict_or_tuple_in_its_own():
    """Only tensors passed as they are were cast: a forward of a batch dict failed in torch's words ("mat1 and mat2
    must have the same dtype, but got Float and BFloat16")."""
    torch.manual_seed(0)
    teacher = _TakesABatchDict().to(torch.bfloat16)
    distiller = Distiller(teacher, DistillationConfig())
    batch = {"x": torch.randn(5, 4), "pair": (torch.arange(5), torch.randn(5, 4)), "ids": torch.arange(5)}
    outputs = distiller.teacher_outputs(batch)
    assert outputs.dtype == torch.bfloat16
    expected = teacher({"x": batch["x"].bfloat16(), "pair": (batch["pair"][0], batch["pair"][1].bfloat16())})
    torch.testing.assert_close(outputs, expected)
    assert batch["x"].dtype == torch.float32  # the caller's batch is not changed


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan"), float("inf"), True])
def test_a_temperature_that_is_no_positive_number_is_refused(temperature):
    """0, nan and inf gave NaN; -1 a plausible positive number computed on negated logits."""
    with pytest.raises(ValueError, match="expected a finite number > 0"):
        distillation_loss(torch.randn(4, 5), torch.randn(4, 5), temperature=temperature)


def test_a_copy_flag_that_is_no_bool_is_refused():
    """copy="no" was truthy: the teacher was copied, where the caller asked for its own model."""
    teacher = nn.Linear(3, 2)
    with pytest.raises(TypeError, match=r"Distiller\(copy='no'\): use True or False"):
        Distiller(teacher, copy="no")
    assert Distiller(teacher, copy=False).teacher is teacher


def test_the_teacher_of_a_pruned_transformer_computes_what_the_model_computes():
    """The copy lost the hooks that recompute the pruned weights an attention (and the layer's fast path) reads
    without calling their modules: the teacher computed with those of the model's last forward, a step old."""
    from litcompress.pruning import default_targets, keep_bypassed_weights_current_, prune_

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.enc(x).mean(1))

    net = Net()
    prune_(default_targets(net), "l1_unstructured", 0.5)
    keep_bypassed_weights_current_(net)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = torch.randn(8, 5, 16), torch.randint(0, 4, (8,))
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    teacher = Distiller(net)
    with torch.no_grad():
        torch.testing.assert_close(teacher.teacher_outputs(x), net.eval()(x))


def test_a_pruned_teachers_state_loads_into_a_freshly_built_distiller():
    """The copy kept its pruning masks, so its state held weight_orig/weight_mask: a resumed loop's Distiller, built
    afresh from the architecture, refused it (torch's missing and unexpected keys)."""
    from litcompress.pruning import default_targets, is_pruned, prune_

    def net() -> nn.Sequential:
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    torch.manual_seed(0)
    pruned = net()
    prune_(default_targets(pruned), "l1_unstructured", 0.5)
    x = torch.randn(8, 16)
    saved = Distiller(pruned).state_dict()
    assert set(saved) == set(net().state_dict())  # plain keys
    assert is_pruned(pruned[0], "weight")  # the caller's model keeps its masks
    given = Distiller(pruned, copy=False)  # the caller's own pruned model: its state holds the pairs
    for state in (saved, given.state_dict()):
        fresh = Distiller(net())
        fresh.load_state_dict(state)
        assert set(fresh.state_dict()) == set(saved)
        with torch.no_grad():
            torch.testing.assert_close(fresh.teacher_outputs(x), pruned(x))


@pytest.mark.parametrize("shape, message", [((32, 1), r"hold one logit per row, which a softmax cannot soften"),
                                            ((32,), r"hold one value per sample")])
def test_kl_on_outputs_without_classes_is_refused(shape, message):
    """One logit per row: the softmax is 1 whatever the logit, and the term was 0 (alpha=1 trained nothing); a 1-d
    output: the softmax ran over the batch's samples."""
    student, teacher = torch.randn(*shape), 100 * torch.randn(*shape)
    with pytest.raises(ValueError, match=message):
        distillation_loss(student, teacher)
    assert distillation_loss(student, teacher, kind="mse") > 0


@pytest.mark.parametrize("temperature", [1e3, 1e4, 1e6, 1e20])
def test_a_very_high_temperature_gives_float32_outputs_the_float64_term(temperature):
    """In float32 the KL term was 3% off at T=1e3, negative at 1e4 (-0.72 for 0.90), -44702 at 1e6 and NaN (NaN
    gradients) at 1e20: log p_t - log p_s cancels to float32's noise, which T**2 multiplies."""
    student, teacher = _pair(8, 10, 3)
    reference = distillation_loss(student, teacher, temperature)  # float64 inputs: float64 throughout
    student32 = student.float().requires_grad_(True)
    loss = distillation_loss(student32, teacher.float(), temperature)
    assert loss.dtype == torch.float32 and float(loss) >= 0
    assert float(loss) == pytest.approx(float(reference), rel=1e-4, abs=1e-6)
    loss.backward()
    assert bool(torch.isfinite(student32.grad).all())
