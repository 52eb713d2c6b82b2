"""Knowledge distillation: train a (pruned, shrunk) student to match a frozen teacher's outputs as well as its labels.

The loss of Hinton et al. (2015), "Distilling the Knowledge in a Neural Network":
``(1 - alpha) * task_loss + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))``, the KL divergence
averaged over every position of the outputs (every row of ``(N, C)`` logits, every token of ``(N, L, C)``). The
``T^2`` keeps the soft term's gradients at the scale of the task loss's whatever the temperature. ``kind="mse"``
matches raw outputs instead (regression heads, embeddings).

Framework-free: a plain loop calls :meth:`Distiller.loss`; :class:`litcompress.callbacks.KnowledgeDistillation`
does it inside a Lightning fit.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree  # (torch.export's tree utilities: dicts, tuples, lists)

from litcompress.pruning.engine import MaskedStateLoadHook, deepcopy_model, is_bypass_hook, make_permanent_

DistillationKind = Literal["kl", "mse"]
DISTILLATION_KINDS: tuple[str, ...] = ("kl", "mse")


@dataclass(frozen=True)
class DistillationConfig:
    """How the student learns from the teacher.

    Args:
        temperature: softens both distributions before the KL divergence (``kind="kl"``); higher spreads the
            teacher's probability over the wrong classes, whose ranking is what the student learns beyond the labels.
            1 (the default): the teacher's own probabilities. Chosen on validation accuracy in
            ``benchmarks/distillation.py`` (BENCHMARKS.md): the small students pruning leaves did worse with softer
            targets (at 90% structured sparsity on digits, T=2 and T=4 lost 3 and 7.5 pt where T=1 was level).
        alpha: the distillation term's weight in ``(1 - alpha) * task_loss + alpha * distillation``; 1 trains on the
            teacher alone, 0 turns distillation off.
        kind: ``"kl"`` (logits; Hinton et al.) or ``"mse"`` (outputs matched directly, the temperature unused).
    """

    temperature: float = 1.0
    alpha: float = 0.5
    kind: DistillationKind = "kl"

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, numbers.Real) \
                or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"DistillationConfig(temperature={self.temperature!r}): expected a number > 0, e.g. 1.0 "
                             "(the plain softmax) or 2.0.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"DistillationConfig(alpha={self.alpha!r}): expected the distillation term's weight in "
                             "[0, 1], e.g. 0.5 (loss = (1 - alpha) * task loss + alpha * distillation).")
        if self.kind not in DISTILLATION_KINDS:
            raise ValueError(f"DistillationConfig(kind={self.kind!r}): use one of {DISTILLATION_KINDS} ('kl' for "
                             "logits, 'mse' for other outputs).")
        # numpy's and torch's scalars as plain floats (reprs, describe(), checkpoints' hyperparameters)
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "alpha", float(self.alpha))

    def describe(self) -> str:
        if self.kind == "mse":
            return f"distilled (mse, alpha={self.alpha:g})"
        return f"distilled (T={self.temperature:g}, alpha={self.alpha:g})"


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                      kind: DistillationKind = "kl") -> torch.Tensor:
    """The distillation term for one pair of outputs of equal shape (the last dimension: the classes).

    ``kind="kl"``: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over all positions (all
    dimensions but the last); zero exactly when the two agree up to a constant per position. ``kind="mse"``: the
    mean squared difference. The teacher's side carries no gradient. Computed in float32 at least (in bfloat16 the
    KL term came out negative for a third of the positions). With ``kind="kl"``, a class both models give ``-inf`` (a
    masked class, or a vocabulary token a mask rules out) adds nothing, where ``F.kl_div`` gives NaN; a position whose
    every logit is ``-inf`` has no distribution to compare (the term is NaN): leave padded positions out of the
    outputs given. ``kind="mse"`` gives NaN for any ``-inf``.
    """
    if not isinstance(student, torch.Tensor) or not isinstance(teacher, torch.Tensor):
        raise TypeError(f"distillation_loss: expected tensors, got {type(student).__name__} and "
                        f"{type(teacher).__name__}.")
    if student.shape != teacher.shape:
        raise ValueError(f"distillation_loss: the student's outputs have shape {tuple(student.shape)} and the "
                         f"teacher's {tuple(teacher.shape)}; distillation compares them entry by entry, so the two "
                         "models must answer the same question (same classes, same sequence length).")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
            math.isfinite(temperature) and temperature > 0):  # 0/nan/inf gave NaN, -1 a plausible number
        raise ValueError(f"distillation_loss(temperature={temperature!r}): expected a finite number > 0, e.g. 2.")
    dtype = torch.promote_types(student.dtype, torch.float32)
    student, teacher = student.to(dtype), teacher.detach().to(dtype)
    if kind == "mse":
        return F.mse_loss(student, teacher)
    result_dtype = dtype
    if temperature > _FLOAT32_TEMPERATURE:  # log p_t - log p_s cancels to float32's noise, which T**2 multiplies
        dtype = torch.float64
        student, teacher = student.to(dtype), teacher.to(dtype)
    if kind != "kl":
        raise ValueError(f"distillation_loss(kind={kind!r}): use one of {DISTILLATION_KINDS}.")
    if student.dim() == 0:
        raise ValueError("distillation_loss: a scalar output has no classes to soften; use kind='mse'.")
    if student.dim() == 1:  # a softmax over it would take the batch's samples for classes
        raise ValueError(f"distillation_loss(kind='kl'): outputs of shape {tuple(student.shape)} hold one value per "
                         "sample (a regression, or one binary logit), not class logits; use kind='mse'.")
    classes = student.shape[-1]
    if classes == 1:  # a softmax over one class is 1 whatever the logit: the term would be 0, silently
        raise ValueError(f"distillation_loss(kind='kl'): outputs of shape {tuple(student.shape)} hold one logit per "
                         "row, which a softmax cannot soften (the term is always 0); use kind='mse', or give two "
                         "logits per row.")
    log_p_student = F.log_softmax(student.reshape(-1, classes) / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.reshape(-1, classes) / temperature, dim=-1)
    # KL(teacher || student) per entry, p_t (log p_t - log p_s): 0 where the teacher gives a class no mass at all
    # (F.kl_div computes 0 * (-inf - -inf) = NaN there)
    per_entry = torch.where(log_p_teacher == float("-inf"), torch.zeros((), dtype=dtype, device=student.device),
                            log_p_teacher.exp() * (log_p_teacher - log_p_student))
    kl = per_entry.sum() / log_p_student.shape[0]  # "batchmean": per position
    return (kl * temperature ** 2).to(result_dtype)


# Above this temperature the KL term is computed in float64: in float32 it was 3% off at T=1e3 and negative at 1e4
# (logits / T nearly equal); below, float32's error is negligible (measured up to T=300).
_FLOAT32_TEMPERATURE = 64.0


def default_outputs(outputs: Any) -> torch.Tensor:
    """The tensor a model's outputs are distilled on: the outputs themselves, a mapping's (or a Hugging Face
    ``ModelOutput``'s) ``"logits"``, or the first tensor of a tuple/list."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and isinstance(outputs.get("logits"), torch.Tensor):
        return outputs["logits"]
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, Sequence) and not isinstance(outputs, str):
        for item in outputs:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"the model returned {type(outputs).__name__}, which holds no tensor to distill on (a tensor, "
                    "a mapping with 'logits', or a tuple starting with one); pass outputs_fn=lambda outputs: ... "
                    "that picks the logits.")


class Distiller:
    """A frozen teacher and the loss that pulls a student towards it.

    The teacher is copied (with ``copy=True``; the caller's model is left as it is), put in eval mode (no dropout;
    batch norm on its running statistics) and gets no gradients; it follows the inputs to their device. The copy
    keeps no forward (pre-)hooks but torch's reparametrizations (weight_norm, pruning masks): the model's feature
    captures and other callbacks' checks would fire on every teacher call. A hook that computes (scales the
    inputs, replaces the outputs) is therefore not part of the copy: put that in ``forward``, or pass ``copy=False``.
    Its pruning masks are made permanent (frozen, they never change), so :meth:`state_dict` holds the plain tensors
    a freshly built teacher loads; :meth:`load_state_dict` takes a masked teacher's state too.
    Use::

        distiller = Distiller(dense_model, DistillationConfig(temperature=1.0, alpha=0.5))
        for x, y in loader:
            logits = student(x)
            loss = distiller.loss(F.cross_entropy(logits, y), logits, x)   # runs the teacher on x
            loss.backward(); optimizer.step(); optimizer.zero_grad()

    Args:
        teacher: the model to learn from (e.g. the model before pruning), called with the student's inputs.
        config: temperature, weight and kind of the distillation term.
        copy: distill from a deep copy (True), or from `teacher` itself (its mode and ``requires_grad`` changed).
        outputs_fn: picks the tensor to distill on from a model's outputs (default :func:`default_outputs`),
            applied to the student's and the teacher's.
    """

    def __init__(self, teacher: nn.Module, config: DistillationConfig | None = None, *, copy: bool = True,
                 outputs_fn: Callable[[Any], torch.Tensor] | None = None) -> None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"Distiller(teacher={teacher!r}): expected an nn.Module.")
        config = DistillationConfig() if config is None else config
        if not isinstance(config, DistillationConfig):
            raise TypeError(f"Distiller(config={config!r}): expected a DistillationConfig.")
        if outputs_fn is not None and not callable(outputs_fn):
            raise TypeError(f"Distiller(outputs_fn={outputs_fn!r}): expected a function of the model's outputs.")
        if not isinstance(copy, bool):  # ("no" was truthy: the teacher was copied)
            raise TypeError(f"Distiller(copy={copy!r}): use True or False.")
        self.config = config
        self.outputs_fn = outputs_fn or default_outputs
        self.teacher = _frozen(teacher, copy)
        self._copied = copy

    @torch.no_grad()
    def teacher_outputs(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The teacher's outputs on these inputs (in eval mode, without gradients, on the inputs' device)."""
        device = _device_of(args, kwargs)
        held = next(itertools.chain(self.teacher.parameters(), self.teacher.buffers()), None)
        if device is not None and held is not None and held.device != device:
            self.teacher.to(device)  # only when the inputs moved: .to walks every tensor, even to stay
        self.teacher.eval()  # cheap, and a teacher given with copy=False may have been switched to train mode
        weight = next(self.teacher.parameters(), None)
        if weight is not None and weight.is_floating_point():
            # inputs in another float dtype (a bf16-true or 64-true fit, a float64 teacher): in the teacher's, which
            # keeps its precision (its outputs are compared in float32 at least)
            # (inside the dicts, tuples and lists a model takes too: a forward of a batch dict)
            args, kwargs = pytree.tree_map(lambda value: _as_dtype(value, weight.dtype), (args, kwargs))
        return self.outputs_fn(self.teacher(*args, **kwargs))

    def distillation_term(self, student_outputs: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The distillation term of the student's outputs on the inputs ``*args, **kwargs`` (given to the teacher)."""
        student = self.outputs_fn(student_outputs)
        return distillation_loss(student, self.teacher_outputs(*args, **kwargs), self.config.temperature,
                                 self.config.kind)

    def combine(self, task_loss: torch.Tensor, distillation: torch.Tensor) -> torch.Tensor:
        """``(1 - alpha) * task_loss + alpha * distillation``."""
        alpha = self.config.alpha
        return (1.0 - alpha) * task_loss + alpha * distillation

    def loss(self, task_loss: torch.Tensor, student_outputs: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The training loss: the task loss and the distillation term of the student's outputs on these inputs."""
        return self.combine(task_loss, self.distillation_term(student_outputs, *args, **kwargs))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.teacher.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a teacher's state: plain, or with ``<name>_orig``/``<name>_mask`` pairs (a pruned teacher given with
        ``copy=False``, or saved before copies were made permanent), into a teacher pruned or not."""
        state = dict(state)
        MaskedStateLoadHook()(self.teacher, state, "")  # the pairs re-create their masks; a plain tensor loads as orig
        self.teacher.load_state_dict(state)
        if self._copied:
            _fold_masks_(self.teacher)


def _fold_masks_(teacher: nn.Module) -> None:
    """Make a frozen copy's pruning masks permanent, so that its state's keys are plain (a resumed run's freshly
    built teacher loads them). A teacher with a mask on tied weights that another holder reads otherwise keeps every
    mask (it computes alike; load_state_dict takes either form)."""
    with contextlib.suppress(ValueError):  # make_permanent_'s refusal of such tied holders; it removes nothing then
        make_permanent_(teacher, owner="Distiller")


def _frozen(teacher: nn.Module, copy_it: bool) -> nn.Module:
    if copy_it:
        # the pruning engine's deep copy: a pruned teacher's cached masked weights copy too; a Trainer stays behind
        memo: dict[int, object] = {}
        trainer = getattr(teacher, "_trainer", None)
        if trainer is not None:
            memo[id(trainer)] = None
        teacher = deepcopy_model(teacher, memo)
        _drop_hooks_(teacher)
        _fold_masks_(teacher)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _drop_hooks_(teacher: nn.Module) -> None:
    """Take off the copy the forward (pre-)hooks it copied from the model: other callbacks' and the user's (a feature
    capture, a pruning callback's check) would fire on every teacher call, after the student's, and read the
    teacher's activations as the student's. torch's own reparametrizations (weight_norm, spectral_norm, pruning
    methods) stay: they compute the weights; so do litcompress's hooks that recompute the pruned weights an attention
    or a Transformer layer's fast path reads without calling their modules (else the teacher would compute with those
    cached at the model's last forward)."""
    for module in teacher.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks"):
            hooks = getattr(module, name)
            for key in [k for k, hook in hooks.items()
                        if not type(hook).__module__.startswith("torch.nn.utils") and not is_bypass_hook(hook)]:
                del hooks[key]
                for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                              "_forward_pre_hooks_with_kwargs"):
                    getattr(module, extra, {}).pop(key, None)


def _as_dtype(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    return value


def _device_of(args: Sequence[Any], kwargs: Mapping[str, Any]) -> torch.device | None:
    """The device of the first tensor among the inputs, inside dicts, tuples and lists too."""
    return next((value.device for value in pytree.tree_leaves((args, kwargs)) if isinstance(value, torch.Tensor)),
                None)


__all__ = ["DISTILLATION_KINDS", "DistillationConfig", "Distiller", "default_outputs", "distillation_loss"]
