"""`KnowledgeDistillation`: fine-tune a LightningModule (a pruned one, typically) against a frozen teacher.

A thin adapter over :class:`litcompress.distillation.Distiller`. How it plugs in: during the fit, each call the
training step makes to the model (``self(x)``, or ``self.<submodule>(x)``) is seen by a forward hook, which runs the
teacher on the same inputs; the loss the step returns becomes ``(1 - alpha) * loss + alpha * distillation`` (logged
as ``distill_loss``). The step itself, the optimizer and the module's ``state_dict`` are the user's: nothing is
registered in the module, and the training step is back as it was when the fit ends (or fails).

The default teacher is the model itself as it is when distillation starts (the dense model, before a pruning
callback in the same fit prunes it; a model with lazy layers as the first step's forward made it); it is kept in
the callback's checkpoint state, so ``trainer.fit(ckpt_path=...)`` resumes with the same teacher.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.core.module import LightningModule
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn
from torch.nn.parameter import is_lazy
from torch.utils import _pytree as pytree

from litcompress.distillation.loss import DistillationConfig, DistillationKind, Distiller, distillation_loss

log = logging.getLogger(__name__)

_OWNER = "KnowledgeDistillation"


_NO_STEP = object()  # a module without an instance-level training_step


class KnowledgeDistillation(Callback):
    """Distil a teacher into the trained module during ``fit`` (Hinton et al. 2015).

    Args:
        teacher: the model to learn from, called with the inputs the training step gives the student (copied, left
            as it is; the copy without its forward hooks, see :class:`~litcompress.distillation.Distiller`). None
            (the default): a frozen copy of the module (or `submodule`) as it is at the start of the first fit, e.g.
            the dense model that a pruning callback in the same fit then prunes (a callback reused for another
            model copies that one at its first fit). That copy is not attached to the
            Trainer: a forward that reads ``self.trainer`` fails there (pass `teacher` or `submodule`).
        temperature, alpha, kind: the loss (:class:`litcompress.distillation.DistillationConfig`): the training
            step's loss becomes ``(1 - alpha) * loss + alpha * distillation``.
        submodule: distil ``getattr(module, submodule)``'s outputs (the calls ``self.<submodule>(...)``) rather than
            the LightningModule's own (``self(...)``).
        outputs_fn: picks the tensor to distil on from the model's outputs (default: the outputs, their
            ``"logits"``, or the first tensor of a tuple).
        log_name: the name the distillation term is logged under in the training step (None: not logged).

    The training step must call the model through ``__call__`` (``self(x)``, not ``self.forward(x)``) and return
    its loss (a tensor, or a dict with ``"loss"``); manual optimization is refused (its step runs backward itself).
    """

    def __init__(self, teacher: nn.Module | None = None, *, temperature: float = 1.0, alpha: float = 0.5,
                 kind: DistillationKind = "kl", submodule: str | None = None,
                 # returns a Tensor; not typed so: LightningCLI then refuses a function not annotated `-> Tensor`
                 outputs_fn: Callable[[Any], Any] | None = None,
                 log_name: str | None = "distill_loss") -> None:
        self.config = DistillationConfig(temperature=temperature, alpha=alpha, kind=kind)
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"{_OWNER}(teacher={teacher!r}): expected an nn.Module, or None for a frozen copy of the "
                            "trained model as it is when the fit starts.")
        if submodule is not None and (not isinstance(submodule, str) or not submodule):
            raise ValueError(f"{_OWNER}(submodule={submodule!r}): expected the name of an attribute of the "
                             "LightningModule, e.g. 'net'.")
        if outputs_fn is not None and not callable(outputs_fn):
            raise TypeError(f"{_OWNER}(outputs_fn={outputs_fn!r}): expected a function of the model's outputs.")
        if log_name is not None and (not isinstance(log_name, str) or not log_name):
            raise ValueError(f"{_OWNER}(log_name={log_name!r}): expected a metric name or None.")
        self.submodule, self.outputs_fn, self.log_name = submodule, outputs_fn, log_name
        self.teacher_given = teacher is not None
        # an explicit teacher is copied now: later changes to the caller's model do not reach it
        self.distiller: Distiller | None = (
            Distiller(teacher, self.config, outputs_fn=outputs_fn) if teacher is not None else None)
        self._restored_teacher: Mapping[str, torch.Tensor] | None = None
        # the module the default teacher was copied from, or restored for (weakly: the callback does not keep it
        # alive); None for a teacher given, or not copied yet, or in a copy of the callback (a spawned worker's)
        self._teacher_source: weakref.ref[nn.Module] | None = None
        self._installed: dict[int, Any] = {}  # id(module) -> the step it shadows

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_teacher_source"] = None  # (a weak reference does not pickle: a spawned worker's copy keeps its teacher)
        return state

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher (None until the first fit starts, when it is a copy of the trained model)."""
        return None if self.distiller is None else self.distiller.teacher

    # ------------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: "pl.Trainer", pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ValueError(f"{_OWNER}: {type(pl_module).__name__} uses manual optimization, whose training_step "
                             "runs backward itself, so the distillation term cannot join its loss. Use "
                             "litcompress.distillation.Distiller in the step: loss = distiller.loss(loss, outputs, x).")

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        from litcompress.callbacks.pruning import _in_spawned_worker, _info_on_rank_zero

        if not self.teacher_given and self.distiller is None and self._restored_teacher is None \
                and _in_spawned_worker(trainer):  # (a resumed fit's teacher is the checkpoint's)
            # the launcher pickled this callback into the workers: the teacher they copy never reaches the caller's
            _info_on_rank_zero(
                f"{_OWNER}: under a spawned launcher ({type(trainer.strategy).__name__}) the fit runs in worker "
                "processes, whose callbacks are copies: the default teacher, a copy of the model as this fit starts, "
                "stays there, and a later fit with this callback distils from the model as that fit starts. Pass "
                "teacher= to keep one teacher across fits, or use strategy='ddp'.", log)
        student = self._student(pl_module)
        if trainer.ckpt_path is None:  # (Lightning restores callbacks for validate and test too: not for this fit)
            self._restored_teacher = None
        source = None if self._teacher_source is None else self._teacher_source()
        if not self.teacher_given and self.distiller is not None and self._teacher_source is not None \
                and source is not student:
            # reused for another model (the next of a k-fold loop or a sweep): its teacher is a copy of that one
            self.distiller, self._teacher_source = None, None
            if self._restored_teacher is None:
                _info_on_rank_zero(f"{_OWNER}: reused for another model: the default teacher is now a copy of "
                                   f"{type(student).__name__} as this fit starts (not of the model of the last "
                                   "fit).", log)
        if not self.teacher_given and self._restored_teacher is not None:
            self.distiller = None  # resumed: the checkpoint's teacher, in a copy of this fit's model
        if not any(is_lazy(p) for p in student.parameters()):
            self._teacher_copied_from(student)
        # (else its lazy layers have no weights yet: the copy is taken in the first training step, after the
        # student's forward gave them theirs and before any optimizer step)
        self._install(pl_module, student)

    def _teacher_copied_from(self, student: nn.Module) -> Distiller:
        """The distiller, whose teacher is a frozen copy of `student` (or the teacher given or restored) once made."""
        if self.distiller is None:
            try:
                self.distiller = Distiller(student, self.config, outputs_fn=self.outputs_fn)
            except (TypeError, copy.Error, RuntimeError) as error:  # deepcopy's: a lock, an open file, a generator
                raise TypeError(
                    f"{_OWNER}: the default teacher is a deep copy of {type(student).__name__} made when the fit "
                    f"starts, and copying it failed ({type(error).__name__}: {error}). Make the model copyable, or "
                    "pass teacher= (the model to learn from) or submodule= (the part of the module to copy)."
                ) from error
            self._teacher_source = weakref.ref(student)  # (a restored teacher too: this run's, from here)
            if self._restored_teacher is not None:  # (Distiller made the copy's masks permanent where it could)
                expected = _tensor_names(self.distiller.teacher.state_dict())
                saved = _tensor_names(self._restored_teacher)
                if expected != saved:  # a teacher of another module (the checkpoint's callback had another submodule)
                    raise ValueError(
                        f"{_OWNER}(submodule={self.submodule!r}): the checkpoint's teacher is of another module "
                        f"(its tensors {sorted(saved)[:3]}..., this student's {sorted(expected)[:3]}...): resume with "
                        "the arguments of the fit that wrote it, or start the fit afresh.")
                self.distiller.load_state_dict(self._restored_teacher)
        self._restored_teacher = None
        return self.distiller

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        self._uninstall(pl_module)

    def on_exception(self, trainer: "pl.Trainer", pl_module: LightningModule, exception: BaseException) -> None:
        self._uninstall(pl_module)

    def teardown(self, trainer: "pl.Trainer", pl_module: LightningModule, stage: str) -> None:
        self._uninstall(pl_module)

    def state_dict(self) -> dict[str, Any]:
        if self.teacher_given or self.distiller is None:
            return {}  # a teacher given to the constructor is given again on resume
        return {"teacher": self.distiller.state_dict()}

    @property
    def state_key(self) -> str:
        # several may join one fit (logits and features, two teachers): each under its own key; the default one's
        # key stays the class name it always was
        if self.submodule is None and self.log_name == "distill_loss":
            return super().state_key
        return self._generate_state_key(submodule=self.submodule, log_name=self.log_name)

    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        from litcompress.callbacks.pruning import restore_state_under_class_key

        self._restored_teacher = None  # (this checkpoint's comes next, where it holds one: not an earlier one's)
        restore_state_under_class_key(self, trainer, checkpoint)  # written before the key named its arguments

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        teacher = state_dict.get("teacher")
        if teacher is None or self.teacher_given:  # a teacher given to the constructor stays the teacher
            return
        # a fit resumed from it takes it when it starts, in a copy of the model it trains (the teacher kept from a
        # fit of another model, of other widths maybe, is no copy for it); a validate or test with ckpt_path restores
        # callbacks too, and leaves the teacher this callback has as it is
        self._restored_teacher = teacher

    # ------------------------------------------------------------------------------------------------ plumbing
    def _student(self, pl_module: LightningModule) -> nn.Module:
        if self.submodule is None:
            return pl_module
        try:  # a dotted path ("net.2") too, as QuantizationAwareTraining(submodule=...) takes it
            student = pl_module.get_submodule(self.submodule)
        except AttributeError:
            student = None
        if not isinstance(student, nn.Module):
            raise ValueError(f"{_OWNER}(submodule={self.submodule!r}): {type(pl_module).__name__} has no such "
                             f"sub-module; its modules are {[name for name, _ in pl_module.named_children()]}.")
        return student

    def _install(self, pl_module: LightningModule, student: nn.Module) -> None:
        if id(pl_module) in self._installed:
            return
        original = pl_module.training_step
        compiled = vars(pl_module).get("_compiler_ctx")
        if isinstance(compiled, dict) and not hasattr(getattr(original, "__func__", None), "_fit_ended"):
            # a fit of torch.compile(module): Lightning compiled the step in place. Wrapping the compiled step fails
            # (its self.log reads this wrapper's signature inside the graph); the eager step calls the compiled
            # forward all the same
            original = compiled.get("original_training_step", original)
        callback = self

        def training_step(module: LightningModule, *args: Any, **kwargs: Any) -> Any:
            return callback._distilled_step(module, student, original, args, kwargs)

        # Lightning decides which arguments to pass (batch_idx or not) from the step's signature: keep the original's
        func = getattr(original, "__func__", None)
        training_step.__signature__ = inspect.signature(func if func is not None else original)  # type: ignore[attr-defined]
        training_step.__wrapped__ = original  # type: ignore[attr-defined]
        # An instance attribute shadows the class's method for this fit; when it ends the attribute is what it was
        # (the user's own instance-level step, or none): kept on the wrapper, which `_uninstall` unwinds
        training_step._previous_step = pl_module.__dict__.get("training_step", _NO_STEP)  # type: ignore[attr-defined]
        training_step._fit_ended = False  # type: ignore[attr-defined]
        pl_module.training_step = training_step.__get__(pl_module)  # type: ignore[method-assign]
        self._installed[id(pl_module)] = pl_module.training_step

    def _uninstall(self, pl_module: LightningModule) -> None:
        installed = self._installed.pop(id(pl_module), None)
        if installed is None:
            return
        installed.__func__._fit_ended = True
        # unwind every wrapper whose callback is done (two callbacks end in either order), down to the user's step
        step = pl_module.__dict__.get("training_step", _NO_STEP)
        while step is not _NO_STEP and getattr(step, "_fit_ended", False):
            step = step._previous_step
        if step is _NO_STEP:
            pl_module.__dict__.pop("training_step", None)
        else:
            pl_module.__dict__["training_step"] = step

    def _distilled_step(self, module: LightningModule, student: nn.Module, original: Callable[..., Any],
                        args: tuple, kwargs: dict) -> Any:
        terms: list[torch.Tensor] = []
        batch_sizes: list[int] = []
        # The inputs as the student's forward got them, copied before it runs: a forward that scales its input in
        # place (x /= 255) gave the teacher inputs scaled twice, and the teacher's own in-place op changed a tensor
        # the student's graph had saved (backward failed, at alpha=0 too). One entry per call, nested calls too.
        given_inputs: list[tuple[tuple, dict] | None] = []

        def copy_inputs(_: nn.Module, inputs: tuple, keywords: dict) -> None:
            given_inputs.append(_tensors_copied((inputs, keywords)) if torch.is_grad_enabled() else None)

        def hook(_: nn.Module, inputs: tuple, keywords: dict, outputs: Any) -> None:
            copied = given_inputs.pop()
            if copied is not None:
                inputs, keywords = copied
            distiller = self._teacher_copied_from(student)
            picked = distiller.outputs_fn(outputs)
            if not isinstance(picked, torch.Tensor):
                raise TypeError(f"{_OWNER}: outputs_fn returned {type(picked).__name__} for the model's "
                                f"{type(outputs).__name__} outputs; it must return the tensor to distill on (e.g. "
                                "lambda outputs: outputs['logits']).")
            if not picked.requires_grad:
                return  # a call without gradients (under no_grad): nothing to train
            try:
                teacher_outputs = distiller.teacher_outputs(*inputs, **keywords)
            except Exception as error:
                if self.teacher_given:
                    raise
                # the user's forward, run on the copy: its error would name a module that looks like the student
                raise RuntimeError(
                    f"{_OWNER}: the teacher's forward failed ({type(error).__name__}: {error}). The teacher is a "
                    "frozen copy of the model made when the fit started: in eval mode and not attached to the "
                    "Trainer (its forward cannot read self.trainer, and self.current_epoch is 0 there). Pass "
                    "teacher= (the model to learn from) or submodule= (a part whose forward needs neither)."
                ) from error
            terms.append(distillation_loss(picked, teacher_outputs, distiller.config.temperature,
                                           distiller.config.kind))
            batch_sizes.append(int(picked.shape[0]) if picked.dim() else 1)

        # (the copy runs after the pre-hooks registered before it: the inputs forward itself is given)
        handles = (student.register_forward_pre_hook(copy_inputs, with_kwargs=True),
                   student.register_forward_hook(hook, with_kwargs=True))
        try:
            output = original(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        if output is None:
            return None  # the step skipped this batch
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"{_OWNER}: training_step returned {type(output).__name__}; expected the loss tensor or a "
                            "dict with 'loss', to which the distillation term is added.")
        if not terms:
            called = "self(...)" if self.submodule is None else f"self.{self.submodule}(...)"
            raise RuntimeError(f"{_OWNER}: the training step never called {called} with gradients on, so there are "
                               "no outputs to compare with the teacher's. Call the model through __call__ "
                               f"({called}, not .forward(...)){'' if self.submodule else ', or pass submodule='}.")
        distillation = torch.stack(terms).mean()
        if self.log_name is not None:
            # the batch size given: Lightning's guess from the batch warns on dict batches
            # (synced: an epoch's value over every process's batches, as Lightning recommends under DDP)
            module.log(self.log_name, distillation.detach(), on_step=False, on_epoch=True, batch_size=batch_sizes[0],
                       sync_dist=True)
        combined = self._teacher_copied_from(student).combine(loss, distillation)
        return {**output, "loss": combined} if isinstance(output, Mapping) else combined


def _tensors_copied(inputs: Any) -> Any:
    """`inputs` with every tensor inside them copied (detached), the containers as they are otherwise: through those
    torch's pytree knows (tuples, lists, dicts, namedtuples, classes registered with it); into dataclasses (every
    field, frozen ones and ``init=False`` ones too, without running ``__init__`` or ``__post_init__`` again), dict and
    list subclasses (new objects filled through the built-in types' methods) and other mappings and sequences
    (``UserDict``: rebuilt from their items by Lightning's ``apply_to_collection``, a sequence's attributes kept). An
    object it cannot copy, or of another kind, is given as it is: the student's own batch is never written to."""
    def leaf_copied(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach().clone()
        try:
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                new = copy.copy(value)
                if new is value:  # (a __copy__ returning itself: the copies would go into the student's batch)
                    return value
                for field in dataclasses.fields(value):
                    if hasattr(value, field.name):
                        object.__setattr__(new, field.name, _tensors_copied(getattr(value, field.name)))
                return new
            if isinstance(value, (dict, list)):
                # a new object filled through the built-in type's own methods (a custom __copy__ or storage of its
                # own could share the student's batch, which the copies then went into), its attributes kept
                new = type(value).__new__(type(value))
                if hasattr(value, "__dict__"):
                    new.__dict__.update(vars(value))
                if isinstance(value, dict):
                    dict.update(new, {key: _tensors_copied(item) for key, item in dict.items(value)})
                else:
                    list.extend(new, [_tensors_copied(item) for item in list.__iter__(value)])
                return new
            if isinstance(value, (Mapping, Sequence)) and not isinstance(value, (str, bytes)):
                new = apply_to_collection(value, torch.Tensor, lambda tensor: tensor.detach().clone(),
                                          allow_frozen=True)  # (rebuilt from its items: a new object)
                if isinstance(value, Sequence) and type(new) is type(value) and hasattr(value, "__dict__"):
                    new.__dict__.update(vars(value))  # (a `tag` its constructor set)
                return new if type(new) is type(value) and new is not value else value
        except Exception:  # noqa: BLE001 - a container it cannot copy: as it is, as before the copy
            return value
        return value

    return pytree.tree_map(leaf_copied, inputs)


__all__ = ["KnowledgeDistillation"]


def _tensor_names(state: Mapping[str, Any]) -> set[str]:
    """The tensors a teacher's state holds, masked (``<name>_orig``/``<name>_mask``) or plain alike."""
    return {key.removesuffix("_orig") for key in state
            if not (key.endswith("_mask") and key.removesuffix("_mask") + "_orig" in state)}
