"""`ModelPruning`: a drop-in replacement for Lightning's callback of the same name, minus its defects.

Same constructor, hooks, override points, log lines and validation messages as
``lightning.pytorch.callbacks.ModelPruning`` (Lightning 2.6). Differences, all deliberate:

* checkpoints always load: with ``make_pruning_permanent=True`` every state dict of the model (``weights_only``
  checkpoints too) holds effective weights; with ``False`` it holds ``<name>_orig``/``<name>_mask`` and the
  masks are re-created on load (``trainer.fit(ckpt_path=...)``; :func:`litcompress.load_pruned_state_dict`
  for a fresh model);
* the callback keeps state (rounds, history, masks, the lottery-ticket snapshot) in the checkpoint, so a
  resumed run continues exactly;
* only real pruning re-parametrisations are touched (a buffer called ``attn_mask`` is left alone);
* the lottery-ticket snapshot is taken once, on the CPU, when fitting starts, and resets copy its values; a reset is
  applied when training goes on after its round, so a fit that ends on a round keeps its trained weights;
* ``fit`` -> ``test`` -> ``fit`` with one callback works;
* ``amount`` is validated at construction; custom ``BasePruningMethod`` classes work in local mode too;
* under DDP, masks (and reset weights) are broadcast from rank 0 after every round (and reset).

The callback is a thin adapter: the work is done by :mod:`litcompress.pruning`.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import numbers
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.callbacks.finetuning import BaseFinetuning
from lightning.pytorch.core.module import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_debug, rank_zero_only, rank_zero_warn
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from litcompress._numbers import as_python_number, exact_python_number, is_bool as _is_bool
from litcompress.callbacks.schedule_checks import (NO_VALIDATION_IN_FIT, EpochSteps, max_steps_ends_it_early,
                                                   epochs_finished_at_the_last_validation, has_early_stopping,
                                                   fit_too_short_message, limit_reached, steps_in_epoch,
                                                   stopped_early_message, validations_end_before_message)
from litcompress.callbacks.targets import TargetsFoundOnceConfigured, masks_to_save
from litcompress.pruning import engine
from litcompress.pruning.distributed import broadcast_pruning_state_
from litcompress.pruning.lottery import Snapshot, at_snapshot, rewind_, snapshot_tensor, take_snapshot
from litcompress.pruning.methods import (PRUNING_FUNCTIONS, PRUNING_METHODS, accepted_kwargs, check_countable_slices,
                                        import_pruning_method, is_import_path, is_ln_norm, is_pruning_method,
                                        norm_refusal, required_kwargs, structured_dim, takes_amount)
from litcompress.pruning.narrow import narrow_to_state_dict_
from litcompress.pruning.parametrizations import SCRIPTED_HINT, check_prunable, is_scripted, parametrized_tensors
from litcompress.pruning.schedules import SparsitySchedule
from litcompress.report.sparsity import TensorSparsity

log = logging.getLogger(__name__)

_PARAM_TUPLE = tuple[nn.Module, str]
_PARAM_LIST = Sequence[_PARAM_TUPLE]
_MODULE_CONTAINERS = (LightningModule, nn.Sequential, nn.ModuleList, nn.ModuleDict)
_STATE_VERSION = 1


#: Mixed into the run's seed for resample_parameters' stream (any constant other than 0 would do).
_RESAMPLE_SEED_SALT = 0x5EED_0F_7E5A_4D1E
_SCHEDULE_SEED_SALT = 0x3C6E_F372_FE94_F82B


def _resample_stream_start() -> Tensor:
    """The state `resample_parameters` draws from first: a stream of its own, resumable (in the callback's state) and
    seeded by the run's seed, but not with it (the layers were built under that seed, and reset_parameters would
    draw their initial weights again)."""
    return torch.Generator().manual_seed(torch.initial_seed() ^ _RESAMPLE_SEED_SALT).get_state()


_NO_VALIDATION_MESSAGE = (
    "ModelPruning(prune_on_train_epoch_end=False) prunes at the end of each validation, and {runs} ({why}), so "
    "{pruned}. Pass prune_on_train_epoch_end=True to prune at the end of each training epoch.")
_NO_VALIDATION_CAUSES = "limit_val_batches=0, no validation_step or no val_dataloader"
_NO_VALIDATION_BY_CADENCE = ("check_val_every_n_epoch / val_check_interval validate after more epochs or batches than "
                             "it trains")


class ModelPruning(TargetsFoundOnceConfigured):
    """Prune a model's parameters during training with ``torch.nn.utils.prune``.

    Args:
        pruning_fn: a name (``"l1_unstructured"``, ``"random_unstructured"``, ``"ln_structured"``,
            ``"random_structured"``) or a ``torch.nn.utils.prune.BasePruningMethod`` subclass (the class).
        parameters_to_prune: ``(module, "parameter_name")`` pairs; empty means every ``parameter_names``
            parameter of every non-container module.
        parameter_names: ``"weight"`` and/or ``"bias"``.
        use_global_unstructured: rank all parameters together (unstructured methods only).
        amount: per round, a fraction in [0, 1] of the *remaining* weights, an int count, or a callable
            ``epoch -> amount`` (Lightning's meaning); or a :class:`~litcompress.pruning.schedules.SparsitySchedule`
            giving the *target total sparsity* by optimizer step or finished epoch, hit exactly at every round.
        apply_pruning: whether to prune, or a callable ``epoch -> bool``.
        make_pruning_permanent: remove the re-parametrisation when training ends, and save effective
            weights in every checkpoint while the live model keeps its masks.
        use_lottery_ticket_hypothesis: after each round, reset surviving weights to their values when fitting
            started (a bool or a callable ``epoch -> bool``). The reset is for the training that follows the round:
            it is applied when training goes on (before the next batch), so a round at the end of a fit leaves the
            trained weights, pruned; ``apply_lottery_ticket_hypothesis()`` then gives the ticket. With a schedule
            by optimizer step, ``True`` (a reset at every round) is refused: pass False or a callable.
        resample_parameters: with the lottery ticket, draw fresh values (``reset_parameters``) instead.
        pruning_dim: the dimension for structured methods.
        pruning_norm: the norm for ``ln_structured``.
        verbose: 0 silent, 1 total sparsity, 2 per-parameter sparsity (INFO log lines).
        prune_on_train_epoch_end: prune at the end of the training epoch, else of the validation epoch.
        rewind_to_step: take the lottery-ticket snapshot after this many optimizer steps instead of when
            fitting starts ("late resetting", Frankle et al. 2019). Must come before the first pruning round.
        rewind_to_epoch: the same, after this many finished epochs.
        reset_optimizer: clear the optimizers' state (momenta) after each lottery-ticket reset.
        keep_multiple_of: with a structured method and a schedule, round the rows/channels each layer keeps up to a
            multiple of this (e.g. 16): CPU kernels run faster on such counts, depthwise convolutions most.
        log_sparsity: after each round, send the fraction of the targets' entries pruned to the trainer's loggers as
            ``pruning/sparsity`` (at the round's ``global_step``), so it is plotted beside the loss (TensorBoard, CSV).

    With a structured method on output channels (``pruning_dim=0``) and a schedule, the channels of grouped convs
    (ResNeXt's) and of the layers that grouped convs read are pruned evenly over those groups, the only way
    ``litcompress.shrink`` can remove them (the layers that read them are found by tracing the model with torch.fx;
    a model it cannot trace gets the grouped convs' own groups only).

    A tensor held by several modules (tied weights: an output layer holding its input embedding's matrix) is pruned
    under every module that holds it, with one mask, and counts once. A module that builds its layers in
    ``configure_model`` has its targets found when the stage starts (the Trainer calls that hook after ``setup``).
    """

    PARAMETER_NAMES = ("weight", "bias")

    def __init__(
        self,
        # the class first: LightningCLI then reads `mymodule.MyMethod` as the class, and torch's names as strings
        pruning_fn: Union[type[torch.nn.utils.prune.BasePruningMethod], str, Callable],
        parameters_to_prune: _PARAM_LIST = (),
        parameter_names: Optional[list[str]] = None,
        use_global_unstructured: bool = True,
        amount: Union[int, float, SparsitySchedule, Callable[[int], Union[int, float]]] = 0.5,
        apply_pruning: Union[bool, Callable[[int], bool]] = True,
        make_pruning_permanent: bool = True,
        use_lottery_ticket_hypothesis: Union[bool, Callable[[int], bool]] = True,
        resample_parameters: bool = False,
        pruning_dim: Optional[int] = None,
        pruning_norm: Optional[Union[int, float, str]] = None,  # torch's ln_structured `n`: inf, 'fro' too
        verbose: int = 0,
        prune_on_train_epoch_end: bool = True,
        *,
        rewind_to_step: Optional[int] = None,
        rewind_to_epoch: Optional[int] = None,
        reset_optimizer: bool = False,
        keep_multiple_of: Optional[int] = None,
        log_sparsity: bool = True,
    ) -> None:
        # on/off flags as their siblings': a string ("False") was truthy (global pruning, permanent masks)
        for flag, value in (("use_global_unstructured", use_global_unstructured),
                            ("make_pruning_permanent", make_pruning_permanent),
                            ("prune_on_train_epoch_end", prune_on_train_epoch_end)):
            if not _is_bool(value):
                raise MisconfigurationException(f"`{flag}={value!r}`: pass True or False.")
        use_global_unstructured, make_pruning_permanent, prune_on_train_epoch_end = (
            bool(use_global_unstructured), bool(make_pruning_permanent), bool(prune_on_train_epoch_end))
        if isinstance(parameter_names, str):  # (walked letter by letter: "name: w isn't in ...")
            raise MisconfigurationException(f"`parameter_names={parameter_names!r}`: pass a list of names, e.g. "
                                            f"[{parameter_names!r}].")
        if parameter_names is not None and not isinstance(parameter_names, Iterable):  # ("'bool' not iterable")
            raise MisconfigurationException(f"`parameter_names={parameter_names!r}`: pass a list of names, e.g. "
                                            "['weight'] or ['weight', 'bias'].")
        if parameter_names is not None and not isinstance(parameter_names, Sequence):
            # once: a generator, checked below, was empty when read again; as str (numpy's str_ named the state key
            # otherwise, which a resume with a list did not find), and a set in one order (its own changes with the
            # process's hash seed, and the key with it)
            names = [str(name) if isinstance(name, str) else name for name in parameter_names]
            parameter_names = sorted(names) if isinstance(parameter_names, (set, frozenset)) and all(
                isinstance(name, str) for name in names) else names
        if not isinstance(amount, (int, float)):  # numpy's float32(0.5), int64(3): refused as no number (its float64,
            amount = as_python_number(amount)     # a float, is kept as given: it names the state in checkpoints)
        self._use_global_unstructured = use_global_unstructured
        self._parameters_to_prune = parameters_to_prune
        # as given: the defaults are found again on each model (one callback for the models of a sweep)
        self._given_parameters_to_prune = parameters_to_prune
        self._use_lottery_ticket_hypothesis = use_lottery_ticket_hypothesis
        self._prune_on_train_epoch_end = prune_on_train_epoch_end
        self._validations_this_fit = 0  # validation runs outside sanity checking, counted for on_train_end
        self._parameter_names = parameter_names or self.PARAMETER_NAMES
        self._method_kwargs: dict[str, Any] = {}
        self._keyed_method_kwargs: Optional[dict[str, Any]] = None  # a custom method's dim/n as given (the state key)
        # what `_create_pruning_fn` made of a name; a subclass's own (or a `pruning_fn` set later) prunes instead, as
        # Lightning's callback calls it
        self._default_pruning_fn: Any = None
        self._pruning_method_name: Optional[str] = None

        for name in self._parameter_names:
            if name not in self.PARAMETER_NAMES:
                raise MisconfigurationException(
                    f"The provided `parameter_names` name: {name} isn't in {self.PARAMETER_NAMES}"
                )

        if is_import_path(pruning_fn):
            pruning_fn = _imported_pruning_method(pruning_fn)
        self._given_pruning_fn = pruning_fn
        if isinstance(pruning_fn, str):
            pruning_kwargs: dict[str, Any] = {}
            pruning_fn = pruning_fn.lower()
            if pruning_fn not in PRUNING_FUNCTIONS:
                raise MisconfigurationException(
                    f"The provided `pruning_fn` {pruning_fn} isn't available in PyTorch's"
                    f" built-in functions: {list(PRUNING_FUNCTIONS.keys())} "
                )
            if pruning_fn.endswith("_structured"):
                if pruning_dim is None:
                    raise MisconfigurationException(
                        "When requesting `structured` pruning, the `pruning_dim` should be provided."
                    )
                _check_int("pruning_dim", pruning_dim)
                if pruning_fn == "ln_structured":
                    if pruning_norm is None:
                        raise MisconfigurationException(
                            "When requesting `ln_structured` pruning, the `pruning_norm` should be provided."
                        )
                    _check_norm(pruning_norm)
                    pruning_kwargs["n"] = pruning_norm
                pruning_kwargs["dim"] = pruning_dim
            self._method = PRUNING_METHODS[pruning_fn]
            self._method_kwargs = pruning_kwargs
            pruning_fn = self._create_pruning_fn(pruning_fn, **pruning_kwargs)
            if type(self)._create_pruning_fn is ModelPruning._create_pruning_fn:
                self._default_pruning_fn = pruning_fn
        elif self._is_pruning_method(pruning_fn):
            # Lightning refuses custom methods in local mode; the engine applies them like any other, with
            # `pruning_dim` as `dim` and `pruning_norm` as `n` to a method that takes them (torch's LnStructured).
            self._method = pruning_fn
            self._pruning_method_name = pruning_fn.__name__
            # kept only for a method that takes them: one that does not ignores them, as Lightning's callback
            # does (the setup checks refused a dim "out of range" for a bias, a norm for a shape, that it never uses)
            given = {}  # (the state key holds them as given: a checkpoint's key names them, taken or not)
            if pruning_dim is not None:
                _check_int("pruning_dim", pruning_dim)
                given["dim"] = pruning_dim
            if pruning_norm is not None:
                _check_norm(pruning_norm)
                given["n"] = pruning_norm
            self._keyed_method_kwargs = dict(given)
            self._method_kwargs.update(accepted_kwargs(pruning_fn, given, via_apply=True))
            if use_global_unstructured:  # before the arguments it misses: none would make it run (Lightning's order)
                _check_unstructured_in_global(pruning_fn, self._method)
            missing = sorted(required_kwargs(pruning_fn) - set(self._method_kwargs))
            if missing:
                given = {"dim": "pruning_dim", "n": "pruning_norm"}
                raise MisconfigurationException(
                    f"`{pruning_fn.__name__}` needs {', '.join(f'`{m}`' for m in missing)}: "
                    + ("; ".join(f"pass `{given[m]}=...`" for m in missing if m in given) or
                       "ModelPruning passes a method `amount`, and `pruning_dim` as `dim`, `pruning_norm` as `n`: "
                       "give the others defaults in a subclass")
                    + "."
                )
        else:
            raise MisconfigurationException(
                f"`pruning_fn` is expected to be a str in {list(PRUNING_FUNCTIONS.keys())}"
                f" or a PyTorch `BasePruningMethod`. Found: {pruning_fn}."
                " HINT: if passing a `BasePruningMethod`, pass the class, not an instance"
            )

        if use_global_unstructured:
            _check_unstructured_in_global(pruning_fn, self._method)

        self.pruning_fn = pruning_fn
        self._apply_pruning = _check_flag("apply_pruning", apply_pruning)
        self._make_pruning_permanent = make_pruning_permanent
        self._use_lottery_ticket_hypothesis = _check_flag("use_lottery_ticket_hypothesis",
                                                          use_lottery_ticket_hypothesis)
        # as Python bools from here on: the checks below test `is True` / `is False` (a numpy bool skipped them)
        apply_pruning, use_lottery_ticket_hypothesis = self._apply_pruning, self._use_lottery_ticket_hypothesis

        self._schedule = amount if isinstance(amount, SparsitySchedule) else None
        if self._schedule is None and not (isinstance(amount, (int, float)) or callable(amount)):
            raise MisconfigurationException(
                "`amount` should be provided and be either an int, a float or Callable function."
            )
        if self._schedule is None and not callable(amount):
            _check_amount(amount)
        if self._schedule is not None and not takes_amount(self._method):
            raise MisconfigurationException(
                f"`{self._method.__name__}` takes no `amount`, so an `amount` schedule cannot bring it to its targets"
                " (they would be ignored): give its __init__ an `amount` parameter, or use a float `amount` (each round"
                " then prunes what the method decides)."
            )
        if self._schedule is not None and not use_global_unstructured:
            try:  # a target reached by counting the slices along the method's `dim`
                check_countable_slices(self._method, self._method_kwargs, "ModelPruning")
            except TypeError as error:
                raise MisconfigurationException(str(error)) from None
        if self._schedule is not None and self._schedule.unit == "step" and use_lottery_ticket_hypothesis is True:
            raise MisconfigurationException(
                "A step-level `amount` schedule with `use_lottery_ticket_hypothesis=True` would reset the weights"
                " at every pruning step and undo training. Pass `use_lottery_ticket_hypothesis=False`, or a"
                " callable `epoch -> bool` for the epochs that should rewind."
            )
        self.amount = amount
        keep_multiple_of = as_python_number(keep_multiple_of)  # (numpy's int64(8) was refused)
        if keep_multiple_of is not None and not (
                isinstance(keep_multiple_of, int) and not isinstance(keep_multiple_of, bool) and keep_multiple_of >= 1
                and self._method.PRUNING_TYPE == "structured" and self._schedule is not None):  # type: ignore
            raise MisconfigurationException(
                f"`keep_multiple_of={keep_multiple_of!r}` rounds the rows/channels a structured method keeps up to a"
                " multiple of it, at the targets of an `amount` schedule: pass an int >= 1 with a structured"
                " `pruning_fn` and a `SparsitySchedule` amount."
            )
        self._keep_multiple_of = keep_multiple_of
        if not isinstance(log_sparsity, bool):
            raise MisconfigurationException(f"`log_sparsity={log_sparsity!r}`: pass True or False.")
        self._log_sparsity = log_sparsity
        self._slice_groups: dict[tuple[nn.Module, str], int] = {}
        # Lightning-style rounds at the end of every epoch: the first at point 0 (its end), as a schedule counts
        self._first_epoch_round = 0 if (self._schedule is None and apply_pruning is True and prune_on_train_epoch_end
                                        and not callable(amount) and bool(amount)) else None
        self._rewind_unit, self._rewind_point = _check_rewind(rewind_to_step, rewind_to_epoch, self._schedule,
                                                              self._first_epoch_round)
        if not _is_bool(reset_optimizer):  # "no" was truthy: it cleared the optimizer's state
            raise MisconfigurationException(f"`reset_optimizer={reset_optimizer!r}`: pass True or False.")
        if not _is_bool(resample_parameters):  # "no" was truthy: every reset drew fresh weights
            raise MisconfigurationException(f"`resample_parameters={resample_parameters!r}`: pass True or False.")
        reset_optimizer, resample_parameters = bool(reset_optimizer), bool(resample_parameters)
        self._resample_parameters = resample_parameters
        if use_lottery_ticket_hypothesis is False and resample_parameters:  # (Lightning's: accepted, with a word)
            rank_zero_warn("ModelPruning(resample_parameters=True) re-draws the weights of the lottery ticket's "
                           "resets, which use_lottery_ticket_hypothesis=False turns off: it does nothing here.")
        if use_lottery_ticket_hypothesis is False and (rewind_to_step is not None or rewind_to_epoch is not None
                                                       or reset_optimizer):
            given = [f"{name}={value!r}" for name, value in (("rewind_to_step", rewind_to_step),
                     ("rewind_to_epoch", rewind_to_epoch), ("reset_optimizer", reset_optimizer))
                     if (value is not None if name.startswith("rewind") else value)]
            raise MisconfigurationException(f"`{', '.join(given)}` rewind(s) the lottery ticket's weights, which "
                                            "`use_lottery_ticket_hypothesis=False` turns off: drop it, or pass "
                                            "use_lottery_ticket_hypothesis=True (or a callable of the epoch).")
        self._reset_optimizer = reset_optimizer

        if verbose not in (0, 1, 2):
            raise MisconfigurationException("`verbose` must be any of (0, 1, 2)")
        self._verbose = verbose

        if parameters_to_prune and not _is_param_list(parameters_to_prune):
            raise MisconfigurationException(
                "The provided `parameters_to_prune` should either be list of tuple"
                " with 2 elements: (nn.Module, parameter_name_to_prune) or None"
            )

        # What tells this callback from another one in the same Trainer besides the fields every key has (added
        # only when given, so that the keys of earlier checkpoints stay as they were).
        self._key_extras: dict[str, str] = {}
        if parameters_to_prune and _is_param_list(parameters_to_prune):
            self._key_extras["targets"] = ", ".join(
                f"{type(module).__name__}{_shape_of(getattr(module, name, None))}.{name}"
                for module, name in parameters_to_prune)
        if self._apply_pruning is not True:
            self._key_extras["apply_pruning"] = _describe(self._apply_pruning)

        self._forget_the_model()
        self._warned_fit_too_short = False
        self._warned_validations_end_before = False
        self._foretold_progress: Optional[int] = None  # epochs finished at the last validation, as said at start
        self._warned_no_validation = False
        self._skipped_targets: list[tuple[int, float]] = []  # this fit's schedule rounds apply_pruning said no to
        self._output_hooks: list[Any] = []  # on the first training forward only (`_watch_for_the_output_layer`)
        self._qualified_names: list[str] = []
        self._pending_state: Optional[dict[str, Any]] = None
        self._state_restored = False  # from a checkpoint: else a resumed fit keeps the checkpoint's zeros as masks
        self._step_at_batch_start = -1  # `trainer.global_step` when the current training batch began
        self._fit_trainer: Optional["pl.Trainer"] = None  # from `setup` to `teardown` of a fit
        self._sparing_masks_of: Optional["pl.Trainer"] = None  # see `_sparing_others`
        self._hook_handles: list[Any] = []
        self._left_masked: set[tuple[int, str]] = set()  # the tensors other pruners keep masked

    def _forget_the_model(self) -> None:
        """The state kept across fits and checkpoints (see `state_dict`) as a new callback has it: at construction,
        and when the callback is reused for another model (the next of a k-fold loop or a sweep)."""
        self._rounds = 0
        self._last_step = -1
        # training epochs whose end this callback saw; None until a fit or a checkpoint says (a fresh callback on a
        # fit resumed from a checkpoint written without it has nothing to catch up)
        self._epochs_ended: Optional[int] = None
        # with rounds at validation ends: the (epoch, at its last batch) of a validation due after the last batch,
        # not run yet (a checkpoint saved at that batch resumes without it); "unknown" where Lightning could not say
        self._validation_due: Union[tuple[int, bool], None, str] = None
        self._validation_due_restored: Union[tuple[int, bool], None, str] = "unknown"
        self._caught_up_at_step: Optional[int] = None
        self._rounds_at_train_start = 0
        self._epoch_progress_at_train_start = -1
        self._epoch_progress = -1  # epochs finished when an epoch-level schedule last looked for its points
        self._history: list[dict[str, Any]] = []
        # a round asked for a lottery-ticket reset that waits for training to go on (see `_run_pruning`)
        self._reset_pending = False
        # the ticket taken by hand after a fit made the masks permanent: the next fit masks its zeros, as it does
        # before a pending reset (else they would train back)
        self._ticket_zeros_to_mask = False
        self._warned_emptied: set[tuple[int, str]] = set()  # tensors a round left without entries, already said
        self._original_layers: Optional[Snapshot] = None  # the lottery ticket's snapshot
        # `resample_parameters`' own random stream, kept in the state: a resumed fit draws what the uninterrupted one
        # drew (Lightning restores no global RNG), and the draws leave the training's global RNG alone
        self._resample_rng_state: Optional[Tensor] = None
        self._schedule_seed: Optional[int] = None

    # ------------------------------------------------------------------------------------ override points
    def filter_parameters_to_prune(self, parameters_to_prune: _PARAM_LIST = ()) -> _PARAM_LIST:
        """This function can be overridden to control which module to prune."""
        return parameters_to_prune

    def _create_pruning_fn(self, pruning_fn: str, **kwargs: Any) -> Union[Callable, type]:
        """The method class (global mode) or the `torch.nn.utils.prune` function with its kwargs bound (local)."""
        if self._use_global_unstructured:
            self._pruning_method_name = PRUNING_METHODS[pruning_fn].__name__
            return PRUNING_METHODS[pruning_fn]
        self._pruning_method_name = PRUNING_FUNCTIONS[pruning_fn].__name__
        return ModelPruning._wrap_pruning_fn(PRUNING_FUNCTIONS[pruning_fn], **kwargs)

    @staticmethod
    def _wrap_pruning_fn(pruning_fn: Callable, **kwargs: Any) -> Callable:
        return partial(pruning_fn, **kwargs)

    def make_pruning_permanent(self, module: nn.Module) -> None:
        """Removes pruning buffers from any pruned modules (when this callback's hooks call it, those another pruning
        callback of the trainer keeps: a ``UnitPruning(make_pruning_permanent=False)``'s were lost at fit end, and
        its resumed fit trained the units back)."""
        held = {id(sub) for sub in module.modules()}  # (a subclass may pass a part of the model: its own pairs)
        others = self._masks_others_keep(self._sparing_masks_of)
        engine.make_permanent_(module, keep=[(sub, name) for sub, name in others
                                             if id(engine.eager_module(sub)) in held])

    @contextmanager
    def _sparing_others(self, trainer: Optional["pl.Trainer"]) -> Iterator[None]:
        """Within, :meth:`make_pruning_permanent` (a subclass may override it, as Lightning's) leaves the masks the
        other pruning callbacks of `trainer` keep; called by hand, it removes every mask, as Lightning's does."""
        self._sparing_masks_of = trainer
        try:
            yield
        finally:
            self._sparing_masks_of = None

    def _make_restored_masks_permanent(self, pl_module: LightningModule) -> None:
        with self._sparing_others(pl_module._trainer):
            self.make_pruning_permanent(pl_module)

    def apply_lottery_ticket_hypothesis(self) -> None:
        r"""Reset the surviving weights to their values when fitting started (step 4 of the lottery ticket
        hypothesis, Frankle & Carbin 2019), or to freshly drawn values with ``resample_parameters``.

        The values are copied: the snapshot never changes, however many rounds follow. A tensor whose pruning was
        made permanent (after a fit) keeps its zeros.
        """
        if self._original_layers is None:  # (a bare assert said nothing)
            raise RuntimeError("ModelPruning.apply_lottery_ticket_hypothesis(): this callback holds no snapshot of "
                               "initial weights: it has run no fit in this process with the lottery ticket on. Under "
                               "strategy='ddp_spawn' (or ddp_fork, ddp_notebook) the fit runs in worker processes, "
                               "whose callbacks are copies; use strategy='ddp' to keep the callback's state here.")
        permanent = [(module, name, getattr(module, name) == 0)
                     for module, name in engine.distinct_targets(self._parameters_to_prune)
                     if not engine.is_pruned(module, name)]
        if self._resample_parameters:
            if self._resample_rng_state is None:
                self._resample_rng_state = _resample_stream_start()
            with torch.random.fork_rng(devices=[]):  # CPU draws (a CUDA layer's draw on CUDA's generator)
                torch.set_rng_state(self._resample_rng_state)
                rewind_(self._parameters_to_prune, self._original_layers, resample=True)
                self._resample_rng_state = torch.get_rng_state()
        else:
            rewind_(self._parameters_to_prune, self._original_layers)
        with torch.no_grad():
            for module, name, zeros in permanent:
                getattr(module, name).masked_fill_(zeros, 0)
        self._ticket_zeros_to_mask = self._ticket_zeros_to_mask or bool(permanent)
        self._reset_pending = False

    def _custom_pruning_fn(self) -> bool:
        """Whether `pruning_fn` is a subclass's own (from its `_create_pruning_fn`, or set on the instance) rather
        than the method the constructor resolved."""
        return isinstance(self._given_pruning_fn, str) and self.pruning_fn is not self._default_pruning_fn

    def _apply_local_pruning(self, amount: Union[int, float]) -> None:
        if self._custom_pruning_fn():
            for module, name in engine.distinct_targets(self._parameters_to_prune):
                self.pruning_fn(module, name=name, amount=amount)
            return
        with engine.naming_targets(self._parameters_to_prune, self._qualified_names):
            engine.prune_(self._parameters_to_prune, self._method, amount, scope="local", **self._method_kwargs)

    def _apply_global_pruning(self, amount: Union[int, float]) -> None:
        method = self.pruning_fn if self._custom_pruning_fn() else self._method
        with engine.naming_targets(self._parameters_to_prune, self._qualified_names):
            engine.prune_(self._parameters_to_prune, method, amount, scope="global", **self._method_kwargs)

    @staticmethod
    def _get_pruned_stats(module: nn.Module, name: str) -> tuple[int, int]:
        """Entries the mask prunes (as Lightning counts them: an embedding's zero padding row is no pruning), and the
        tensor's size."""
        return engine.pruned_count(module, name), getattr(module, name).numel()

    def apply_pruning(self, amount: Union[int, float]) -> None:
        """Applies pruning to ``parameters_to_prune``."""
        with self._logging_sparsity(amount):
            if self._use_global_unstructured:
                self._apply_global_pruning(amount)
            else:
                self._apply_local_pruning(amount)

    @contextmanager
    def _logging_sparsity(self, amount: Union[int, float]) -> Iterator[None]:
        """With ``verbose``, log the sparsity before -> after the pruning done inside the block."""
        if not self._verbose:
            yield
            return
        prev_stats = [self._get_pruned_stats(m, n) for m, n in self._parameters_to_prune]
        yield
        curr_stats = [self._get_pruned_stats(m, n) for m, n in self._parameters_to_prune]
        self._log_sparsity_stats(prev_stats, curr_stats, amount=amount)

    @rank_zero_only
    def _log_sparsity_stats(
        self, prev: list[tuple[int, int]], curr: list[tuple[int, int]], amount: Union[int, float] = 0
    ) -> None:
        # a tied tensor counts once in the total, and so does a target listed twice (a module registered under two
        # names), with the zeros of its most pruned holder (before a round, torch's pruning of one holder alone left
        # the other unmasked)
        keys = [engine.tensor_key(m, n) for m, n in self._parameters_to_prune]

        def once_per_tensor(stats: list[tuple[int, int]]) -> list[tuple[int, int]]:
            most: dict[object, tuple[int, int]] = {}
            for key, (zeros, numel) in zip(keys, stats):
                if key not in most or zeros > most[key][0]:
                    most[key] = (zeros, numel)
            return list(most.values())

        counted = once_per_tensor(curr)
        total = TensorSparsity("total", sum(z for z, _ in counted), sum(n for _, n in counted))
        prev_zeros = sum(z for z, _ in once_per_tensor(prev))
        log.info(
            f"Applied `{self._pruning_method_name}`. Pruned:"
            f" {prev_zeros}/{total.numel} ({prev_zeros / total.numel if total.numel else 0.0:.2%}) ->"
            f" {total.zeros}/{total.numel} ({total.sparsity:.2%})"
        )
        if self._verbose == 2:
            for i, (module, name) in enumerate(self._parameters_to_prune):
                before, after = TensorSparsity(name, *prev[i]), TensorSparsity(name, *curr[i])
                log.info(
                    f"Applied `{self._pruning_method_name}` to `{module!r}.{name}` with amount={amount}. Pruned:"
                    f" {before.zeros} ({before.sparsity:.2%}) -> {after.zeros} ({after.sparsity:.2%})"
                )

    # ------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: "pl.Trainer", pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and trainer is not None and self._make_pruning_permanent:
            _refuse_weight_averaging_after(self, trainer.callbacks)
        self._fit_trainer = trainer if stage == "fit" else None
        super().setup(trainer, pl_module, stage)  # finds the targets now, or once `configure_model` has run

    def _fit_world_size(self) -> int | None:
        """The processes of the fit this callback prunes in (None outside a fit: a direct call, in a plain loop)."""
        return None if self._fit_trainer is None else self._fit_trainer.world_size

    def _find_targets(self, pl_module: LightningModule, stage: str) -> None:
        """Resolve ``parameters_to_prune`` on the model, register the state-dict hooks, restore a loaded state."""
        modules = {id(module) for module in pl_module.modules()}
        if self._qualified_names and not any(id(m) in modules for m, _ in self._parameters_to_prune):
            self._forget_the_model()  # reused for another model: its rounds, history and snapshot were the last one's
        given = bool(self._given_parameters_to_prune)
        parameters_to_prune = self.sanitize_parameters_to_prune(
            pl_module, self._given_parameters_to_prune, parameter_names=self._parameter_names
        )
        # tied weights: every module holding a pruned tensor computes with its mask
        self._parameters_to_prune = engine.with_tied_targets(pl_module,
                                                             self.filter_parameters_to_prune(parameters_to_prune))
        self._check_parametrized(pl_module, given)
        self._validate_against_model(pl_module)
        if stage == "fit":  # rounds run while fitting only; validate/test need no trace
            self._slice_groups = self._even_slices(pl_module)
        self._qualified_names = engine.qualified_names(pl_module, self._parameters_to_prune)
        if stage == "fit" and not self._parameters_to_prune:
            # Lightning's callback fails in torch.cat at the first global round, or its log line divides by zero
            rank_zero_warn(f"ModelPruning: no tensor to prune in {type(pl_module).__name__}"
                           f"{' after filter_parameters_to_prune' if parameters_to_prune else ''}: nothing is pruned "
                           "in this fit.")
        if stage == "fit" and not given:
            self._warn_of_frozen_defaults()
            self._warn_of_recurrent_defaults(pl_module)
        if stage == "fit":
            self._warn_of_gate_rows()
        self._remove_hooks()
        self._hook_handles = engine.register_state_hooks(
            self._parameters_to_prune, permanent_state_dict=self._make_pruning_permanent, left_masked=self._left_masked
        )
        # a checkpoint's masked pairs of tensors that are no target now (resumed with other parameter_names) load
        # masked too, as `_keep_the_zeros_of_a_checkpoint_without_state` then says, rather than failing the load
        self._hook_handles.append(pl_module.register_load_state_dict_pre_hook(engine.MaskedStateLoadHook()))
        self._hook_handles.append(pl_module.register_load_state_dict_post_hook(engine.RefreshAfterLoadHook()))
        engine.keep_bypassed_weights_current_(pl_module)  # attention's out_proj: its forward is never called
        if self._pending_state is not None:
            self._restore(self._pending_state)

    def _warn_of_gate_rows(self) -> None:
        """A structured method on a recurrent layer's weight matrices masks rows, and a row there is one gate of one
        hidden unit: the unit keeps computing, and no shrink can remove it (Lightning prunes them alike)."""
        if getattr(self._method, "PRUNING_TYPE", None) != "structured":
            return
        gates = [qname for qname, (module, name) in zip(self._qualified_names, self._parameters_to_prune)
                 if isinstance(module, (nn.RNNBase, nn.RNNCellBase)) and name.startswith("weight")]
        if gates:
            rank_zero_warn(
                f"ModelPruning: a structured method on {', '.join(gates[:4])}{', ...' if len(gates) > 4 else ''}, "
                "a recurrent layer's gate-stacked matrices, masks single gates of hidden units: the units keep "
                "computing, and shrink cannot remove them, so the model gets no smaller or faster. "
                "litcompress.callbacks.UnitPruning prunes whole hidden units (every gate, layer and direction), which "
                "shrink removes.")

    def _warn_of_frozen_defaults(self) -> None:
        """The default targets are every layer's tensors, a frozen teacher's or backbone's too (as in Lightning):
        a round prunes those, and no training brings them back. (Not said beside a ``BaseFinetuning`` callback, such
        as ``BackboneFinetuning``: it freezes the backbone in its own ``setup`` and unfreezes it later.)"""
        trainer = self._fit_trainer
        if trainer is not None and any(isinstance(callback, BaseFinetuning) for callback in trainer.callbacks):
            return
        frozen = [qname for qname, (module, name) in zip(self._qualified_names, self._parameters_to_prune)
                  if not engine.trainable_tensor(module, name).requires_grad]
        if frozen:
            rank_zero_warn(
                f"ModelPruning's default targets include {len(frozen)} tensor(s) that do not train "
                f"(requires_grad=False): {', '.join(frozen[:5])}{', ...' if len(frozen) > 5 else ''}. Each round "
                "prunes them too (a frozen teacher or backbone), and no training brings them back. Pass "
                "`parameters_to_prune` naming the layers to prune: left out, they stay dense; named, they are pruned "
                "without this warning.")

    def _warn_of_recurrent_defaults(self, pl_module: LightningModule) -> None:
        """The default targets are the layers' `weight`/`bias` parameters (as in Lightning), which a recurrent
        layer's matrices (``weight_ih_l0``, ...) and an attention's ``in_proj_weight`` are not: they stay dense, and
        the logged sparsity leaves them out."""
        left_out = engine.matrices_left_out(pl_module, self._parameters_to_prune) \
            if "weight" in self._parameter_names else {}
        if left_out:
            first, names = next(iter(left_out.items()))
            example = ", ".join(f"(model.{first}, {name!r})" for name in names)
            rank_zero_warn(engine.left_out_message(
                "ModelPruning's default targets (as Lightning's)", pl_module, left_out,
                f"the sparsity it logs leaves them out. Name them in `parameters_to_prune` (with the layers to prune "
                f"beside them) to prune them, e.g. [{example}, ...]."))

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self._resample_parameters and self._resample_rng_state is None and trainer.world_size > 1:
            # rank 0's stream on every rank: ranks not seeded alike drew other weights, which the fit's broadcast
            # after each reset hid, but a ticket taken by hand after the fit (apply_lottery_ticket_hypothesis, as
            # the end-of-fit message advises) differed from rank to rank
            states = [_resample_stream_start()]
            torch.distributed.broadcast_object_list(states, src=0)
            self._resample_rng_state = states[0]
        self._rename_finetuning_parameters()  # a BaseFinetuning listed after this callback: restored since
        self._keep_the_zeros_of_a_checkpoint_without_state(trainer)
        # Snapshot here rather than in `setup`: the strategy has now synchronised the initial weights across
        # ranks, and a snapshot restored from a checkpoint is already in place. (Lazy layers: once they exist.)
        if self._rewind_point in (None, 0) and self._deferred_stage is None:
            self._take_snapshot_once()
        self._warned_fit_too_short = False  # (said in on_train_start, if so)
        # a count no target can give up failed after the first epoch; (a resumed fit's masks come from its
        # checkpoint, which some strategies load after this hook: checked at its round)
        if (trainer.ckpt_path is None and self._schedule is None and isinstance(self.amount, numbers.Integral)
                and self.amount > 0 and self._apply_pruning is not False and self._parameters_to_prune and not any(
                    is_lazy(engine.trainable_tensor(m, n)) for m, n in self._parameters_to_prune)):
            self._check_amount_fits(self.amount)
        self._refuse_rounds_a_dimless_method_cannot_run(trainer)
        self._say_if_checkpoints_miss_their_scores(trainer)
        self._validations_this_fit = 0
        self._caught_up_at_step = None  # (an earlier fit's)
        self._skipped_targets = []

    def _refuse_rounds_a_dimless_method_cannot_run(self, trainer: "pl.Trainer") -> None:
        """A structured method without a `dim` prunes a tensor once: torch's second round on it fails. A fresh fit
        certain to run two rounds at epoch ends (or one on a tensor already pruned) is refused as it starts; the
        refusal came at the second round, an epoch of training in."""
        if (getattr(self._method, "PRUNING_TYPE", None) != "structured" or self._schedule is not None
                or structured_dim(self._method, self._method_kwargs) is not None or callable(self.amount)
                or not self.amount or self._apply_pruning is not True or not self._prune_on_train_epoch_end
                or trainer.ckpt_path is not None or trainer.max_steps != -1 or trainer.limit_train_batches == 0):
            return  # (rounds at validation ends, or a fit bounded by steps: how many run is not known here)
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None else 1000  # (Lightning's default)
        rounds = math.inf if max_epochs == -1 else max_epochs - trainer.current_epoch
        # a reset this callback owes from its last fit masks every target again as training starts
        owes_reset = self._reset_pending or self._ticket_zeros_to_mask
        targets = list(self._parameters_to_prune or [])  # (none yet where the layers come later: lazy ones)
        pruned = [q for q, (m, n) in zip(engine.qualified_names(trainer.lightning_module, targets), targets)
                  if owes_reset or engine.is_pruned(m, n)]
        if rounds < 1 or (rounds < 2 and not pruned):
            return
        cannot = (f"`{self._method.__name__}` is structured but has no `dim`, so it can prune a tensor only once"
                  " (torch's second round on a tensor fails)")
        fix_the_method = ("give its __init__ a `dim` parameter stored as `self.dim` (the dimension whose slices it"
                          " prunes)")
        if not pruned:
            raise MisconfigurationException(
                f"{cannot}, and this fit prunes at each of its {'unbounded' if rounds == math.inf else rounds} epoch"
                f" end(s): {fix_the_method}, or prune once: `max_epochs=1` or an `amount` callable that is 0 after the"
                " epoch to prune, e.g. `amount=lambda epoch: 0.5 if epoch == 0 else 0`."
            )
        why = ("masked again as training starts (this callback's lottery-ticket reset keeps its zeros pruned)"
               if owes_reset else "still masked")
        raise MisconfigurationException(
            f"{cannot}, and this fit's first round would be a second one: {', '.join(pruned[:4])}"
            f"{' ...' if len(pruned) > 4 else ''} {'is' if len(pruned) == 1 else 'are'} {why}."
            f" {fix_the_method.capitalize()}, or fit again with a new ModelPruning on a model whose pruning is"
            " permanent (`make_pruning_permanent=True`, or `litcompress.pruning.make_permanent_(model)`)."
        )

    def _keep_the_zeros_of_a_checkpoint_without_state(self, trainer: "pl.Trainer") -> None:
        """A fit resumed from a checkpoint holding no state of this callback (one of Lightning's ModelPruning, whose
        permanent pruning saves plain weights with zeros, or of this callback configured otherwise): without masks,
        the pruned entries would train back to non-zero values and the sparsity reached be lost. The zeros of each
        target are taken as its mask; a target that is all zeros (a zero-initialised layer) is left to train."""
        if trainer.ckpt_path is None or self._state_restored:
            return
        # whether it was pruned: masks came with its weights, or zeros as pruning leaves them (not an embedding's
        # padding row): the message names a pruning callback only then
        pruned_before = bool(engine.pruned_targets(trainer.lightning_module)) or any(
            engine.holds_pruning_zeros(module, name) for module, name in self._parameters_to_prune)
        kept, masked = 0, set()
        for module, name in engine.distinct_targets(self._parameters_to_prune):
            if engine.is_pruned(module, name):  # its mask came with the weights (`<name>_mask` keys)
                continue
            zeros = getattr(module, name) == 0
            count = int(zeros.sum())
            if 0 < count < zeros.numel():
                engine.set_mask_(module, name, ~zeros)
                kept += count
                masked.add(engine.tensor_key(module, name))
        engine.share_tied_masks_(self._parameters_to_prune, masked)
        targets = {(id(module), name) for module, name in self._parameters_to_prune}
        others = [f"{path}.{name}" if path else name for path, module, name in
                  engine.pruned_targets(trainer.lightning_module) if (id(module), name) not in targets]
        if others:
            _info_on_rank_zero(
                f"`ModelPruning`: this fit resumes from a checkpoint that masks {len(others)} tensor(s) this callback "
                f"does not prune ({', '.join(others[:6])}{' ...' if len(others) > 6 else ''}): their masks are kept "
                "as they are, so their pruned entries stay zero.")
        # the initial weights are in this callback's state: without it (a masked checkpoint's zeros came with their
        # masks, so `kept` is 0) the ticket would quietly reset to the weights resumed
        snapshot = (" Its lottery-ticket snapshot is of the weights resumed: the initial weights are kept in this "
                    "callback's state, which the checkpoint does not hold under its key."
                    if self._use_lottery_ticket_hypothesis and self._rewind_point in (None, 0) and pruned_before
                    else "")  # (a checkpoint never pruned: a fine-tune's start, which the snapshot rightly is)
        if pruned_before and (kept or snapshot):
            zeros = (f", so the {kept:,} zero entries of the pruned tensors are kept pruned (masked), rather than "
                     "trained back." if kept else ".")
            _info_on_rank_zero(
                f"`ModelPruning`: this fit resumes from a checkpoint without this callback's state (saved by "
                f"Lightning's ModelPruning, or by this one configured otherwise){zeros}{snapshot}")

    def _watch_for_the_output_layer(self, pl_module: LightningModule) -> None:
        """With rows pruned (a structured method on dim 0), note which layer with weights the first training forward
        runs last: when it is a target, its rows are the model's outputs (see `_warn_if_outputs_are_pruned`)."""
        self._remove_output_hooks()  # (a fit that crashed before its first batch's end left them on)
        if getattr(self._method, "PRUNING_TYPE", None) != "structured" or self._pruned_dim() != 0:
            return
        self._last_run: Optional[nn.Module] = None

        def ran(module: nn.Module, args: Any, output: Any) -> None:
            self._last_run = module

        self._output_hooks = [module.register_forward_hook(ran) for module in pl_module.modules()
                              if next(module.parameters(recurse=False), None) is not None]

    def _remove_output_hooks(self) -> None:
        for handle in self._output_hooks:
            handle.remove()
        self._output_hooks = []

    def on_exception(self, trainer: "pl.Trainer", pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning calls neither on_fit_end nor teardown after an exception (a crash, Ctrl-C): the model leaves the
        # fit without this callback's output-layer hooks, which shrink refuses
        self._remove_output_hooks()

    def _warn_if_outputs_are_pruned(self) -> None:
        self._remove_output_hooks()
        last = self._last_run
        names = [qname for qname, (module, name) in zip(self._qualified_names, self._parameters_to_prune)
                 if module is last and name == "weight"]
        if names:
            rank_zero_warn(
                f"ModelPruning({self._pruning_method_name!r}, pruning_dim=0) prunes whole rows of {names[0]}, the last "
                f"layer the model runs: its rows are the model's outputs ({last.weight.shape[0]} here), and a pruned "
                "one gives the same value for every input (a class that can never win). Leave it out: "
                "parameters_to_prune without it.")

    def _say_if_checkpoints_miss_their_scores(self, trainer: "pl.Trainer") -> None:
        """A monitored ModelCheckpoint that saves when the training epoch ends saves after this callback's round of
        that epoch (Lightning runs checkpoint callbacks last), while its score came from the validation before it."""
        if not (self._prune_on_train_epoch_end and (self._schedule is None or self._schedule.unit == "epoch")):
            return
        for checkpoint in trainer.checkpoint_callbacks:
            try:
                at_epoch_end = checkpoint.monitor is not None and checkpoint._should_save_on_train_epoch_end(trainer)
            except AttributeError:  # Lightning moved it: nothing said
                continue
            if at_epoch_end:
                _info_on_rank_zero(
                    f"`ModelPruning`: ModelCheckpoint(monitor={checkpoint.monitor!r}) saves at the end of each "
                    "training epoch, after that epoch's pruning round, so its files hold weights pruned once more "
                    "than those its score measured. ModelCheckpoint(save_on_train_epoch_end=False) saves them as "
                    "scored, when validation ends.")

    def _warn_if_fit_ends_before_the_schedule(self, trainer: "pl.Trainer") -> None:
        """In `on_train_start`, not before: the fit's length needs its training data, which set up earlier would be
        a resumed fit's without its restored state (Lightning restores the loops after `on_fit_start`): its
        dataloader would start over and be built as for epoch 0."""
        self._warned_fit_too_short = False
        if self._schedule is not None:
            from litcompress.quantization.lightning import has_validation_data

            at_validation = not self._prune_on_train_epoch_end and self._schedule.unit == "epoch"
            if at_validation and self._why_no_validation_runs(trainer, trainer.lightning_module) is not None:
                return  # it prunes nothing: said by the warning that no validation runs
            message = fit_too_short_message(self._schedule, trainer, "sparsity",
                                            at_validation=at_validation and has_validation_data(trainer))
            if message:
                self._warned_fit_too_short = True
                rank_zero_warn(message)

    def _masked_targets(self) -> list[tuple[nn.Module, str]]:
        return list(self._parameters_to_prune or [])

    def _keeps_masks(self) -> bool:
        return not self._make_pruning_permanent

    def _find_targets_if_deferred(self, pl_module: LightningModule, *, forward_done: bool = False) -> bool:
        found = super()._find_targets_if_deferred(pl_module, forward_done=forward_done)
        fitting = pl_module._trainer is not None and pl_module.trainer.state.fn == TrainerFn.FITTING
        if found and fitting and self._rewind_point in (None, 0):
            self._take_snapshot_once()  # lazy layers, called for the first time: their initial values, untrained
        return found

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        if self._rewind_unit == "epoch" and trainer.current_epoch == self._rewind_point:
            self._take_snapshot_once()

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step
        if self._reset_pending or self._ticket_zeros_to_mask:
            masked = set()
            for module, name in engine.distinct_targets(self._parameters_to_prune):
                if not engine.is_pruned(module, name):  # made permanent when the last fit ended: its zeros are the
                    engine.set_mask_(module, name, getattr(module, name) != 0)  # mask the reset must keep
                    masked.add(engine.tensor_key(module, name))
            engine.share_tied_masks_(self._parameters_to_prune, masked)
            self._ticket_zeros_to_mask = False
        if self._reset_pending:
            changes = self._resample_parameters or not at_snapshot(self._parameters_to_prune, self._original_layers)
            self.apply_lottery_ticket_hypothesis()
            self._reset_pending = False
            if changes:  # what a round inside an accumulation window left there was computed on the weights the
                for optimizer in trainer.optimizers:  # reset undid (a reset before any step keeps them)
                    optimizer.zero_grad(set_to_none=True)
            if self._reset_optimizer:
                for optimizer in trainer.optimizers:
                    optimizer.state.clear()
            broadcast_pruning_state_(self._parameters_to_prune, values=True,  # `resample_parameters` draws per rank
                                     world_size=self._fit_world_size())

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._leave_masked_what_others_keep(trainer)  # (targets found late: at a first backward) before a checkpoint
        if self._output_hooks:
            self._warn_if_outputs_are_pruned()
        self._caught_up_at_step = None  # a batch trained since the resume: a validation now is a new one
        if not self._prune_on_train_epoch_end:  # before a checkpoint this batch end may save (ModelCheckpoint: last)
            follows = _validation_follows_batch(trainer)
            self._validation_due = "unknown" if follows is None else (
                (pl_module.current_epoch, _at_last_batch(trainer)) if follows else None)
        step = trainer.global_step
        # gradient accumulation: several batches per optimizer step; a round follows a step (the first fit's batch
        # ends at step 0 without one, and a round there would come before the snapshot of `rewind_to_step=1`)
        if step == self._last_step or step == self._step_at_batch_start:
            return
        # `global_step` counts every optimizer's steps: with manual optimization it can move by more than one per
        # batch (a GAN's two), so look for the points passed since the last batch, not only at `step`
        previous, self._last_step = self._last_step, step
        if self._rewind_unit == "step" and self._step_at_batch_start < self._rewind_point <= step:
            self._take_snapshot_once()  # this batch's steps reached k (not a fit resumed past it)
        if self._schedule is not None and self._schedule.unit == "step":
            point = self._schedule.last_point(previous, step) if step > previous else None
            if point is not None:
                self._run_pruning(pl_module.current_epoch, trainer=trainer, progress=point)

    def teardown(self, trainer: "pl.Trainer", pl_module: LightningModule, stage: str) -> None:
        self._fit_trainer = None
        super().teardown(trainer, pl_module, stage)  # masks an evaluation's ckpt_path restored: made permanent
        self._remove_hooks()
        self._remove_output_hooks()  # a fit that ended before its first batch did
        if _in_spawned_worker(trainer):
            # `ddp_spawn` hands rank 0's weights to the parent process as a state dict loaded with strict=False into
            # the parent's unpruned model, where `<name>_orig`/`<name>_mask` keys would be dropped silently: hand over
            # the effective weights instead. (The worker's model is discarded right after.)
            self._hook_handles = engine.register_state_hooks(self._parameters_to_prune, permanent_state_dict=True)

    def _run_pruning(self, current_epoch: int, trainer: Optional["pl.Trainer"] = None,
                     progress: Optional[int] = None) -> None:
        """One round; with a schedule, to its target at `progress` (default: where training is)."""
        if progress is None and self._schedule is not None:
            progress = self._progress(current_epoch, trainer)
        prune = self._apply_pruning(current_epoch) if callable(self._apply_pruning) else self._apply_pruning
        if not prune:
            if self._schedule is not None and callable(self._apply_pruning):
                self._skipped_targets.append((current_epoch, self._schedule.target(progress)))
            return
        before = self._total_zeros()
        if self._schedule is not None:
            target = self._schedule.target(progress)
            self._prune_to_target(target, progress)
            amount: Union[int, float] = target
        else:
            # as given (a callable's numpy float32 counts in float32, as Lightning's callback does); its history entry
            # holds the same number as Python's (a numpy scalar made the checkpoint refuse weights-only loading)
            amount = self.amount(current_epoch) if callable(self.amount) else self.amount
            if not amount:
                return
            _check_amount(amount, epoch=current_epoch)
            self._check_amount_fits(amount)
            # a random method draws from the round's own stream, as a schedule's rounds do: torch's global state,
            # which Lightning's checkpoints do not hold, gave a resumed fit other masks than the uninterrupted one
            step = trainer.global_step if trainer is not None else self._last_step
            point = (max(step, -1) + 1) << 24 | current_epoch  # (several rounds an epoch: at validation ends)
            with engine.drawing_from(engine.round_seed(self._random_stream_base(), point), self._parameters_to_prune):
                self.apply_pruning(amount)

        # a schedule's round that prunes nothing (its begin, cubic from 0; a constant target held; an increment that
        # rounds to no entry) has nothing to rewind, and would undo the training since the last round
        pruned = self._total_zeros() > before if self._schedule is not None else amount > 0
        reset = (
            self._use_lottery_ticket_hypothesis(current_epoch)
            if callable(self._use_lottery_ticket_hypothesis)
            else self._use_lottery_ticket_hypothesis
        ) and pruned
        if reset:
            if self._original_layers is None:
                where = self._last_step if self._rewind_unit == "step" else current_epoch
                if self._rewind_point not in (None, 0) and trainer is not None and where > self._rewind_point:
                    raise MisconfigurationException(
                        f"A lottery-ticket reset was asked for at epoch {current_epoch}, and this fit started past its"
                        f" rewind point (`rewind_to_{self._rewind_unit}={self._rewind_point}`): it resumed from a"
                        " checkpoint that holds no snapshot of this callback (saved without it, or by it configured"
                        " otherwise), so the weights to rewind to are not known. Resume from a checkpoint this"
                        " callback saved, or rewind to initialisation (no `rewind_to_*`: the weights resumed)."
                    )
                if self._rewind_point not in (None, 0):
                    raise MisconfigurationException(
                        f"A lottery-ticket reset was asked for at epoch {current_epoch}, before the rewind point"
                        f" (`rewind_to_{self._rewind_unit}={self._rewind_point}`) was reached. Rewind to a point"
                        " before the first pruning round, or start pruning later."
                    )
                self._take_snapshot_once()  # pruning outside `fit` (a direct call): snapshot now
            if trainer is None:
                self.apply_lottery_ticket_hypothesis()
            else:
                # Applied before the next batch rather than now: the reset is for the training that follows, and a
                # round at the end of the fit would otherwise hand back the untrained initial weights as the model
                # (and the epoch's checkpoint, saved after this hook). Nothing trains in between, so the training
                # is the same either way.
                self._reset_pending = True
        broadcast_pruning_state_(self._parameters_to_prune, values=bool(reset) and trainer is None,
                                 world_size=self._fit_world_size())
        self._rounds += 1
        after = self._total_zeros()
        if self._log_sparsity and trainer is not None:
            self._send_sparsity_to_loggers(trainer, after)
        self._warn_of_emptied_tensors()
        self._history.append(
            {"round": self._rounds, "epoch": current_epoch, "step": trainer.global_step if trainer else None,
             "amount": exact_python_number(amount), "zeros_before": before, "zeros_after": after,
             "lottery_ticket_reset": bool(reset)}
        )

    def _send_sparsity_to_loggers(self, trainer: "pl.Trainer", pruned: int) -> None:
        """The targets' pruned fraction (`pruned` entries of them), to each logger (they write on rank zero only)."""
        total = sum(getattr(m, n).numel() for m, n in engine.distinct_targets(self._parameters_to_prune))
        if not total:
            return
        for logger in trainer.loggers:
            logger.log_metrics({"pruning/sparsity": pruned / total}, step=trainer.global_step)

    def _warn_of_emptied_tensors(self) -> None:
        """A round that pruned every entry of a weight has cut the model at that layer (global rounds do this when one
        layer's magnitudes are all below the others'): say so once per tensor, naming it."""
        names = {(id(m), n): q for q, (m, n) in zip(self._qualified_names, self._parameters_to_prune)}
        emptied = [key for key in ((id(m), n) for m, n in engine.emptied_targets(self._parameters_to_prune))
                   if key not in self._warned_emptied]
        if emptied:
            self._warned_emptied.update(emptied)
            scope = "global" if self._use_global_unstructured else "local"
            rank_zero_warn(engine.emptied_message(
                f"ModelPruning (round {self._rounds})", [names.get(key, key[1]) for key in emptied], scope,
                per_layer="prune per layer (`use_global_unstructured=False`)", targets="`parameters_to_prune`"))

    def _warn_if_rounds_were_skipped(self) -> None:
        """A schedule's rounds that `apply_pruning` refused are caught up by the next round it allows; those after
        the last allowed one are not, and the fit ends short of the schedule's sparsity: say so."""
        reached = next((round_["amount"] for round_ in reversed(self._history)), 0.0)
        missed = [(epoch, target) for epoch, target in self._skipped_targets if target > reached]
        if missed:
            epochs = ", ".join(str(epoch) for epoch in sorted({epoch for epoch, _ in missed}))
            rank_zero_warn(
                f"ModelPruning: `apply_pruning` returned False for the schedule's last rounds (epoch {epochs}), so the "
                f"fit ends at the {reached:.1%} target of its last round, short of "
                f"{max(target for _, target in missed):.1%}. Let `apply_pruning` allow the epochs of the schedule's "
                "last rounds, or end the schedule earlier."
            )

    def _progress(self, current_epoch: int, trainer: Optional["pl.Trainer"]) -> int:
        """Where training is, in the schedule's unit: optimizer steps done, or epochs finished."""
        assert self._schedule is not None
        if self._schedule.unit == "step":
            return trainer.global_step if trainer is not None else self._last_step
        return current_epoch + 1

    def _random_stream_base(self) -> int:
        """The base of the rounds' random streams (kept in the state, so a resumed fit draws on): seeded by the run's
        seed, not with it, and by the targets (two callbacks with a random method draw apart: see targets_digest)."""
        if self._schedule_seed is None:
            self._schedule_seed = torch.initial_seed() ^ _SCHEDULE_SEED_SALT ^ engine.targets_digest(
                self._parameters_to_prune, self._qualified_names)
        return self._schedule_seed

    def _prune_to_target(self, target: float, progress: int) -> None:
        """One scheduled round: bring the targets to `target` total sparsity (each target with per-layer scope). A
        random method draws from the round's own stream (`round_seed`, its base in the state): a resumed fit draws
        the masks the uninterrupted one did."""
        even = {"slice_groups": self._slice_groups} if self._slice_groups else {}
        seed = engine.round_seed(self._random_stream_base(), progress)
        with self._logging_sparsity(target), engine.drawing_from(seed, self._parameters_to_prune), \
                engine.naming_targets(self._parameters_to_prune, self._qualified_names):
            engine.prune_to_sparsity_(
                self._parameters_to_prune, self._method, target,
                scope="global" if self._use_global_unstructured else "local", keep_multiple_of=self._keep_multiple_of,
                **self._method_kwargs, **even,
            )

    def _even_slices(self, pl_module: LightningModule) -> dict[tuple[nn.Module, str], int]:
        """For a schedule's structured rounds on output channels: the weight targets whose channels go evenly over
        groups (see the class docstring), with how many."""
        if self._schedule is None or self._method.PRUNING_TYPE != "structured" or self._pruned_dim() != 0:
            return {}
        from litcompress.pruning.shrink import channel_plan, is_grouped

        groups = {id(m): m.groups for m, name in self._parameters_to_prune if name == "weight" and is_grouped(m)}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                plan = channel_plan(pl_module)
        except Exception:  # noqa: BLE001 - a model fx cannot trace: the grouped convs' own groups only
            plan = None
        if plan is not None:
            modules = dict(pl_module.named_modules())
            for name, count in plan.slice_groups.items():
                module = modules.get(name)
                if module is not None:
                    groups[id(module)] = math.lcm(groups.get(id(module), 1), count)
        return {(m, name): groups[id(m)] for m, name in self._parameters_to_prune
                if name == "weight" and groups.get(id(m), 1) > 1}

    def _epoch_round_due(self, current_epoch: int, epoch_finished: bool = True) -> tuple[bool, Optional[int]]:
        """Whether the boundary at the end of `current_epoch` (or, not `epoch_finished`, a validation inside it)
        prunes, and with a schedule to which point's target.

        Without a schedule, every boundary prunes (Lightning's amounts). With one, only epoch-level schedules prune
        there, to the last of their points passed since the last boundary looked: rounds that prune at validation
        see every n-th epoch end (`check_val_every_n_epoch`), and a point between two would never run otherwise."""
        if self._schedule is None:
            return True, None
        if self._schedule.unit != "epoch":
            return False, None
        progress = current_epoch + 1 if epoch_finished else current_epoch  # epochs finished
        previous, self._epoch_progress = self._epoch_progress, max(self._epoch_progress, progress)
        point = self._schedule.last_point(previous, progress) if progress > previous else None
        return point is not None, point

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        if self._prune_on_train_epoch_end:
            due, point = self._epoch_round_due(pl_module.current_epoch)
            if due:
                rank_zero_debug("`ModelPruning.on_train_epoch_end`. Applying pruning")
                self._run_pruning(pl_module.current_epoch, trainer=trainer, progress=point)
        self._epochs_ended = pl_module.current_epoch + 1

    def on_train_start(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        # (here, not at fit start: a fit resumed from a finished one trains nothing, skips this hook and would leave
        # the hooks on for the fit-end callbacks, whose shrink refuses a layer with forward hooks)
        self._watch_for_the_output_layer(pl_module)
        self._rounds_at_train_start = self._rounds  # (a resumed fit's caught-up rounds, below, count as this fit's)
        self._epoch_progress_at_train_start = self._epoch_progress  # (an earlier fit's, or a checkpoint's)
        self._leave_masked_what_others_keep(trainer)  # every callback's targets are found by now (on_fit_start)
        # A fit resumed from a checkpoint saved at an epoch's last batch (`every_n_train_steps`) starts the next
        # epoch without the end hooks (validation, `on_train_epoch_end`) of the one saved, nor the next one's
        # `on_train_epoch_start`: the rounds and the snapshot those would have made are made here, before training
        # goes on, where the uninterrupted run made them.
        # Lightning skips, too, a validation due after the batch a checkpoint was saved at (inside an epoch, with
        # val_check_interval): its round, with rounds at validation ends, runs here as well.
        due, self._validation_due_restored = self._validation_due_restored, "unknown"
        if self._epochs_ended is not None:
            for epoch in range(self._epochs_ended, trainer.current_epoch):
                validated = None if due == "unknown" else due is not None and due[0] == epoch
                self._catch_up_epoch_end(trainer, epoch, validated)
        if isinstance(due, tuple) and due[0] == trainer.current_epoch and not self._prune_on_train_epoch_end:
            round_due, point = self._epoch_round_due(due[0], epoch_finished=due[1])
            if round_due:
                _info_on_rank_zero(f"`ModelPruning`: this fit resumed after a batch of epoch {due[0]} that a "
                                   "validation followed, which Lightning skips; its pruning round runs now.")
                self._run_pruning(due[0], trainer=trainer, progress=point)
                self._caught_up_at_step = trainer.global_step
        self._epochs_ended = trainer.current_epoch
        self._warn_if_fit_ends_before_the_schedule(trainer)
        self._warn_if_validations_end_before_the_schedule(trainer)
        self._warn_if_no_validation_runs(trainer, pl_module)
        if trainer.global_step == 0 and self._original_layers is None:
            self._check_rewind_against_the_epochs(trainer)
        if self._rewind_unit == "epoch" and trainer.current_epoch == self._rewind_point:
            self._take_snapshot_once()

    def _warn_if_no_validation_runs(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        """Rounds at validation ends in a fit that validates nothing: said as it starts (it was said when training
        ended, after every epoch had trained unpruned)."""
        self._warned_no_validation = False
        if self._prune_on_train_epoch_end or (self._schedule is not None and self._schedule.unit != "epoch"):
            return
        why = self._why_no_validation_runs(trainer, pl_module)
        if why is None:
            return
        self._warned_no_validation = True
        rank_zero_warn(_NO_VALIDATION_MESSAGE.format(runs="this fit runs none", why=why,
                                                     pruned="it will prune nothing"))

    @staticmethod
    def _why_no_validation_runs(trainer: "pl.Trainer", pl_module: LightningModule) -> Optional[str]:
        """Why this fit runs no validation (its settings, or a cadence past its epochs); None where it runs some, or
        where that is unknown."""
        from litcompress.quantization.lightning import has_validation_data

        if not (has_validation_data(trainer) and is_overridden("validation_step", pl_module)
                and trainer.limit_val_batches not in (0, 0.0)):
            return _NO_VALIDATION_CAUSES
        if epochs_finished_at_the_last_validation(trainer) == NO_VALIDATION_IN_FIT:
            return _NO_VALIDATION_BY_CADENCE
        return None

    def _warn_if_validations_end_before_the_schedule(self, trainer: "pl.Trainer") -> None:
        """Rounds at validation ends: an epoch schedule whose end the fit's last validation comes before stops short
        (said now, where the training batches, and so the validation cadence's last point, are known)."""
        self._warned_validations_end_before, self._foretold_progress = False, None
        if self._prune_on_train_epoch_end or self._schedule is None or self._schedule.unit != "epoch":
            return
        from litcompress.quantization.lightning import has_validation_data

        progress = epochs_finished_at_the_last_validation(trainer) if has_validation_data(trainer) else None
        if progress == NO_VALIDATION_IN_FIT:  # said by the warning that no validation runs
            self._warned_validations_end_before = True
            return
        if self._warned_fit_too_short:  # which said the sparsity of the last validation, where it was known
            self._warned_validations_end_before = progress is not None
            self._foretold_progress = progress
            return
        message = None if progress is None else validations_end_before_message(
            self._schedule, progress, ended=False, early_stopping=has_early_stopping(trainer))
        if message:
            self._warned_validations_end_before, self._foretold_progress = True, progress
            rank_zero_warn(message)

    def _foretold(self) -> bool:
        """Whether the sparsity this fit reached is the one said when it started (its last validation, foreseen):
        a fit that something stopped sooner (EarlyStopping, a time limit) or whose validations ran on nothing did
        not reach it, and is told what it reached when it ends."""
        return self._warned_validations_end_before and self._foretold_progress == self._epoch_progress

    def _check_rewind_against_the_epochs(self, trainer: "pl.Trainer") -> None:
        """A rewind point in steps with rounds at epoch ends, or in epochs with rounds at steps: whether the snapshot
        precedes the first round depends on the optimizer steps per epoch, known now (a GradientAccumulationScheduler's
        factors counted: it sets ``trainer.accumulate_grad_batches`` only as each epoch starts). One after it fails
        here, before training, rather than at the first reset."""
        if self._rewind_point in (None, 0) or steps_in_epoch(trainer) is None \
                or not trainer.lightning_module.automatic_optimization:  # manual: steps per batch unknown
            return
        steps = EpochSteps(trainer)  # Lightning steps at an epoch's end too
        if (self._schedule is None and self._first_epoch_round is None and self._prune_on_train_epoch_end
                and (callable(self.amount) or callable(self._apply_pruning))):
            self._check_rewind_against_the_callables(trainer, steps)
        elif (self._schedule is None and self._first_epoch_round is None and not self._prune_on_train_epoch_end
                and self._apply_pruning is True and not callable(self.amount) and bool(self.amount)):
            self._check_rewind_against_the_first_validation(trainer, steps)
        elif self._rewind_unit == "step":
            first = (_first_round(self._schedule) if self._schedule is not None and self._schedule.unit == "epoch"
                     else self._first_epoch_round)
            last = None if first is None else steps.before(max(first, 1))  # the round at that epoch's end comes after
            max_steps = trainer.max_steps if trainer.max_steps is not None and trainer.max_steps >= 0 else None
            if last is not None and max_steps is not None and max_steps < last:
                # max_steps ends that epoch early, and Lightning runs its end (the round) all the same
                last = max_steps if max_steps > steps.before(max(first, 1) - 1) else None
            if last is not None and self._rewind_point > last:
                raise MisconfigurationException(
                    f"`rewind_to_step={self._rewind_point}` is after the first pruning round, at the end of epoch "
                    f"{max(first, 1) - 1} (optimizer step {last} at {steps.said()}"
                    + (f", max_steps={max_steps}" if last == max_steps else "") + "): the snapshot would "
                    f"hold pruned weights. Rewind to step {last} or earlier."
                )
        elif self._schedule is not None and self._schedule.unit == "step":
            step = _first_round(self._schedule)
            if step is not None and steps.before(self._rewind_point) >= max(step, 1):
                raise MisconfigurationException(
                    f"`rewind_to_epoch={self._rewind_point}` (optimizer step {steps.before(self._rewind_point)} at "
                    f"{steps.said()}) is after the first pruning round, at step {max(step, 1)} of the "
                    "`amount` schedule: the snapshot would hold pruned weights. Rewind to an earlier epoch, or give "
                    "`rewind_to_step`."
                )

    def _check_rewind_against_the_callables(self, trainer: "pl.Trainer", steps: EpochSteps) -> None:
        """A callable `amount` or `apply_pruning` says which epoch ends prune: called as Lightning calls them at each
        epoch's end (`amount` only where `apply_pruning` says to prune, the lottery flag only where `amount` prunes),
        for the epochs that end before the rewind point, the first round that resets is found before training (it
        was found at that reset, after the epochs before it had trained)."""
        point, unit = self._rewind_point, self._rewind_unit
        max_steps = trainer.max_steps if trainer.max_steps is not None and trainer.max_steps >= 0 else None
        epochs = point if unit == "epoch" else steps.epochs_starting_before(point)
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            epochs = min(epochs, trainer.max_epochs)

        def value(flag: Any, epoch: int) -> Any:
            return flag(epoch) if callable(flag) else flag

        for epoch in range(epochs):
            try:
                resets = (value(self._apply_pruning, epoch) and value(self.amount, epoch)
                          and value(self._use_lottery_ticket_hypothesis, epoch))
            except Exception:  # noqa: BLE001 - a callable for epochs it does not expect: the reset checks it
                return
            if not resets:
                continue
            last = epoch if unit == "epoch" else steps.before(epoch + 1)
            if unit == "step" and max_steps is not None and max_steps < last:
                # max_steps ends that epoch early, and Lightning runs its end (the round) all the same
                last = max_steps if max_steps > steps.before(epoch) else point
            if point > last:
                raise MisconfigurationException(
                    f"`rewind_to_{unit}={point}` is after the first pruning round that resets, at the end of epoch "
                    f"{epoch} (as `amount`/`apply_pruning` give it"
                    + (f"; optimizer step {last} at {steps.said()}" if unit == "step" else "")
                    + (f", max_steps={max_steps}" if unit == "step" and last == max_steps else "")
                    + f"): the snapshot would hold pruned weights. Rewind to {unit} {last} or earlier.")
            return

    def _check_rewind_against_the_first_validation(self, trainer: "pl.Trainer", steps: EpochSteps) -> None:
        """Lightning-style rounds at validation ends (``prune_on_train_epoch_end=False``): the first runs at the fit's
        first validation, whose epoch and step the trainer knows now."""
        from litcompress.quantization.lightning import has_validation_data

        batches = int(trainer.num_training_batches)
        every, interval = trainer.check_val_every_n_epoch, trainer.val_check_batch
        if not has_validation_data(trainer) or not isinstance(interval, int) or interval < 1:
            return  # no validation, no rounds (said at fit end)

        def steps_after(epoch: int, batch: int) -> int:  # optimizer steps once `batch` batches of `epoch` trained
            if batch >= batches:  # an epoch's end steps on what it accumulated
                return steps.of(epoch)
            return batch // steps.factor(epoch)

        if every is None:  # validation every `interval` batches of the fit, across epochs
            epoch = (interval - 1) // batches
            step = steps.before(epoch) + steps_after(epoch, interval - epoch * batches)
        else:
            epoch = every - 1
            step = steps.before(epoch) + steps_after(epoch, min(interval, batches))
        last = epoch if self._rewind_unit == "epoch" else step
        if self._rewind_point > last:
            raise MisconfigurationException(
                f"`rewind_to_{self._rewind_unit}={self._rewind_point}` is after the first pruning round, at the fit's "
                f"first validation (epoch {epoch}, optimizer step {step}; `prune_on_train_epoch_end=False`): the "
                f"snapshot would hold pruned weights. Rewind to {self._rewind_unit} {last} or earlier."
            )

    def _catch_up_epoch_end(self, trainer: "pl.Trainer", epoch: int, validated: Optional[bool] = None) -> None:
        """The round that the end of `epoch` (skipped by a resumed fit) would have run; `validated`: whether a
        validation was due at its last batch (None: unknown, from `check_val_every_n_epoch`)."""
        if validated is None:
            validated = (trainer.check_val_every_n_epoch is not None
                         and (epoch + 1) % trainer.check_val_every_n_epoch == 0)
        if not (self._prune_on_train_epoch_end or validated):
            return
        due, point = self._epoch_round_due(epoch)
        if due:
            _info_on_rank_zero(f"`ModelPruning`: this fit resumed after the last batch of epoch {epoch}, whose end "
                               "Lightning skips; its pruning round runs now.")
            self._run_pruning(epoch, trainer=trainer, progress=point)
            self._caught_up_at_step = trainer.global_step

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return  # `trainer.validate()` evaluates: it prunes nothing (Lightning's callback ran a round there)
        self._validations_this_fit += 1
        self._validation_due = None  # it ran
        if not self._prune_on_train_epoch_end \
                and self._caught_up_at_step != trainer.global_step:  # a skipped validation's round ran at resume
            # a validation inside an epoch (val_check_interval) has not finished it: a schedule's point counts
            # finished epochs
            due, point = self._epoch_round_due(pl_module.current_epoch, epoch_finished=_at_last_batch(trainer))
            if due:
                rank_zero_debug("`ModelPruning.on_validation_epoch_end`. Applying pruning")
                self._run_pruning(pl_module.current_epoch, trainer=trainer, progress=point)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        self._remove_output_hooks()  # a fit that ended before its first batch did
        # a fit resumed from a checkpoint of a finished one trains nothing, and Lightning skips `on_train_end`
        if self._make_pruning_permanent and any(engine.is_pruned(m, n) for m, n in self._parameters_to_prune or ()):
            with self._sparing_others(trainer):
                self.make_pruning_permanent(pl_module)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        prunes_per_epoch = self._schedule is None or self._schedule.unit == "epoch"
        schedule_done = self._schedule is not None and self._epoch_progress >= 0 \
            and self._schedule.reached_by(self._epoch_progress) >= self._schedule.final_sparsity
        if not self._prune_on_train_epoch_end and prunes_per_epoch and trainer.current_epoch > 0 \
                and not self._validations_this_fit and self._caught_up_at_step is None \
                and self._rounds == self._rounds_at_train_start and not schedule_done \
                and not self._warned_no_validation and not self._foretold():  # (said when it started)
            # (a resumed fit's caught-up round with no batch trained after it: a round ran, and none was missed)
            # Lightning's callback prunes nothing then, without a word
            limit, settings = limit_reached(trainer), self._why_no_validation_runs(trainer, pl_module)
            # (a max_steps that max_epochs reaches as soon is no cause: the cadence is)
            cut_short = limit == "max_time" or (limit is not None and limit.startswith("max_steps")
                                                and max_steps_ends_it_early(trainer) is not False)
            why = (settings if settings == _NO_VALIDATION_CAUSES
                   else f"{limit} ended it before its first validation" if cut_short
                   else "a callback (EarlyStopping, say) stopped it before its first validation" if limit is None
                   else settings or "its validation dataloaders gave no batch")
            rank_zero_warn(_NO_VALIDATION_MESSAGE.format(runs="no validation ran in this fit", why=why,
                                                         pruned="nothing was pruned"))
        if self._schedule is not None:
            progress = self._progress(pl_module.current_epoch - 1, trainer)  # epochs finished, or steps done
            looked = self._epoch_progress  # epochs finished at the last validation that looked for rounds
            rounds_at_validation = not self._prune_on_train_epoch_end and self._schedule.unit == "epoch"
            # (from this fit's validations only: a callback fitted before keeps its furthest point, which a
            # validation of this fit may not pass)
            at_validation = rounds_at_validation and self._validations_this_fit and looked >= 0 \
                and looked > self._epoch_progress_at_train_start
            if rounds_at_validation and not self._validations_this_fit and self._caught_up_at_step is None:
                pass  # no round ran in this fit: said above, or when it started
            elif at_validation and looked < progress:  # epochs finished after it pruned nothing: said from it
                message = validations_end_before_message(self._schedule, looked, ended=True)
                if message and not self._foretold():  # (said when fitting started)
                    rank_zero_warn(message)
            else:
                limit = limit_reached(trainer)
                message = stopped_early_message(self._schedule, progress, "sparsity", limit)
                # said when fitting started, unless something else than its limits stopped it (EarlyStopping)
                if message and (not self._warned_fit_too_short or limit is None):
                    rank_zero_warn(message)
                if not message and at_validation and not self._foretold():
                    message = validations_end_before_message(self._schedule, looked, ended=True)
                    if message:
                        rank_zero_warn(message)
            self._warn_if_rounds_were_skipped()
        if self._reset_pending:
            _info_on_rank_zero("`ModelPruning`: the last round's lottery-ticket reset waits for training to go on (a "
                               "next fit, or one resumed from a checkpoint), so the model keeps its trained weights, "
                               "pruned. " + ("(This fit ran in spawned worker processes: the callback of the process "
                                             "that started it holds none of this state.)"
                                             if _in_spawned_worker(trainer) else
                                             "`apply_lottery_ticket_hypothesis()` on the callback resets them now "
                                             "(the ticket)."))
        if self._make_pruning_permanent:
            rank_zero_debug("`ModelPruning.on_train_end`. Pruning is made permanent for this checkpoint")
            with self._sparing_others(trainer):
                self.make_pruning_permanent(pl_module)
        else:  # `module.<name>` is the tensor of the last forward, from before the last optimizer step
            with torch.no_grad():  # a tensor without autograd history, as after an evaluation: the model deep-copies
                for module, name in self._parameters_to_prune:
                    engine.refresh_cached_tensor(module, name)

    # ------------------------------------------------------------------------------------------ state
    #: what the state key is made of: reassigning one makes it again (see `memoized_state_key`)
    _KEYED_ATTRIBUTES = frozenset({"amount", "_pruning_method_name", "_use_global_unstructured", "_parameter_names",
                                   "_method_kwargs", "_keyed_method_kwargs", "_key_extras"})

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._KEYED_ATTRIBUTES:
            self.__dict__.pop(_STATE_KEY_MEMO, None)
        super().__setattr__(name, value)

    @property
    def state_key(self) -> str:
        # Unique per configuration, so that several pruning callbacks can share a Trainer and a checkpoint.
        return memoized_state_key(self, lambda: canonical_numbers(self._generate_state_key(
            pruning_fn=self._pruning_method_name,
            amount=_describe(self.amount),
            scope="global" if self._use_global_unstructured else "local",
            parameter_names=list(self._parameter_names),
            pruning=self._method_kwargs if self._keyed_method_kwargs is None else self._keyed_method_kwargs,
            **self._key_extras,
        )))

    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """A lambda or local function (`amount`, `apply_pruning`) is keyed by where it is written: moved to another
        line of the script, the resumed callback's key differs from the checkpoint's in that place only. The state
        saved under such a key is restored when it is the only one and no other callback claims it; with several,
        none is (which is whose cannot be told), and that is said. A key that differs otherwise is another
        configuration, whose run starts from the checkpoint's weights (its zeros kept pruned), as before. Lightning
        calls this before it hands callbacks the states under their own keys."""
        restore_state_under_moved_key(self, trainer, checkpoint)

    def state_dict(self) -> dict[str, Any]:
        """Rounds applied, their history, the current masks and the lottery-ticket snapshot (CPU tensors); a state
        loaded before the model's parameters were found, as it was loaded."""
        if self._pending_state is not None:  # (not applied yet: the callback's own fields are still empty)
            return dict(self._pending_state)
        targets = self._parameters_to_prune if self._qualified_names else []
        # (rounds ran: a target without a mask had it made permanent when the fit ended)
        masks = masks_to_save(self._qualified_names, targets, made_permanent=bool(self._rounds))
        snapshot = None
        if self._original_layers is not None and targets:
            snapshot = {
                qname: snapshot_tensor(self._original_layers, i).detach().clone()
                for i, qname in enumerate(self._qualified_names)
            }
        return {
            "version": _STATE_VERSION,
            "rounds": self._rounds,
            "last_step": self._last_step,
            "epochs_ended": self._epochs_ended,
            "validation_due": list(self._validation_due) if isinstance(self._validation_due, tuple)
            else self._validation_due,
            "epoch_progress": self._epoch_progress,
            "history": list(self._history),
            "parameters": list(self._qualified_names),
            "masks": masks,
            "lottery_ticket_snapshot": snapshot,
            "lottery_ticket_reset_pending": self._reset_pending,
            "resample_rng_state": self._resample_rng_state,
            "schedule_seed": self._schedule_seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what `state_dict` saved; masks are re-created on the model once it is known (``setup``)."""
        if self._qualified_names and self._deferred_stage is None:  # (put off: a previous model's targets)
            self._restore(state_dict)
        else:
            self._pending_state = state_dict
        self._rename_finetuning_parameters()  # a BaseFinetuning listed before this callback: restored already

    def _rename_finetuning_parameters(self) -> None:
        """Lightning's ``BaseFinetuning`` (``BackboneFinetuning``) keeps the optimizer's parameter groups by
        parameter *name*, taken at several epoch starts, and on a resumed fit looks them up in
        ``named_parameters()`` in its ``on_fit_start``. Pruning renames ``<name>`` to ``<name>_orig`` (the same
        tensor), so names taken before pruning began, or after it, fail there (``KeyError``). Each restored name
        that the model no longer has is renamed to the one of the same tensor now. Called once its state is restored
        (after this callback's own, or when fitting starts, whichever is later)."""
        trainer = self._fit_trainer
        if trainer is None:
            return
        names = {name for name, _ in trainer.lightning_module.named_parameters()}

        def now(name: str) -> str:
            if name in names:
                return name
            if name + "_orig" in names:
                return name + "_orig"
            return name.removesuffix("_orig") if name.removesuffix("_orig") in names else name

        for callback in trainer.callbacks:
            metadata = getattr(callback, "_internal_optimizer_metadata", None)
            if not isinstance(callback, BaseFinetuning) or not getattr(callback, "_restarting", False) \
                    or not isinstance(metadata, dict):
                continue
            for groups in metadata.values():
                for group in groups:
                    group["params"] = [now(name) for name in group.get("params", [])]

    def _restore(self, state: dict[str, Any]) -> None:
        self._pending_state = None
        self._state_restored = True
        self._note_restored_masks(state, self._make_pruning_permanent)
        self._rounds = int(state.get("rounds", 0))
        self._last_step = int(state.get("last_step", -1))
        self._epochs_ended = state.get("epochs_ended")  # None from an older checkpoint: nothing is caught up
        due = state.get("validation_due", "unknown")  # an older checkpoint: from check_val_every_n_epoch, as then
        self._validation_due_restored = tuple(due) if isinstance(due, list) else due
        # an older checkpoint: its rounds ran at the epoch ends it saw
        self._epoch_progress = int(state.get("epoch_progress", self._epochs_ended if self._epochs_ended else -1))
        self._history = list(state.get("history", []))
        self._reset_pending = bool(state.get("lottery_ticket_reset_pending", False))
        self._resample_rng_state = state.get("resample_rng_state")
        self._schedule_seed = state.get("schedule_seed")
        index = {qname: i for i, qname in enumerate(self._qualified_names)}
        unknown = [q for q in state.get("masks", {}) if q not in index]
        if unknown:
            raise MisconfigurationException(
                f"The checkpoint's `ModelPruning` state prunes {unknown}, which this callback does not target"
                f" ({self._qualified_names}). Use the same `parameters_to_prune` as the run that saved it."
            )
        for qname, mask in state.get("masks", {}).items():
            module, name = self._parameters_to_prune[index[qname]]
            engine.set_mask_(module, name, mask)
        snapshot = state.get("lottery_ticket_snapshot")
        if snapshot:
            self._original_layers = take_snapshot(self._parameters_to_prune)
            for qname, values in snapshot.items():
                with torch.no_grad():
                    snapshot_tensor(self._original_layers, index[qname]).copy_(values)

    # ------------------------------------------------------------------------------------------ helpers
    def _take_snapshot_once(self) -> None:
        if self._use_lottery_ticket_hypothesis and self._original_layers is None:
            self._original_layers = take_snapshot(self._parameters_to_prune)

    def _total_zeros(self) -> int:
        """Entries masked out across the targets (mask counts: cheaper than the effective values, for the history)."""
        return sum(engine.pruned_count(m, n) for m, n in engine.distinct_targets(self._parameters_to_prune))

    def _check_parametrized(self, pl_module: LightningModule, given: bool) -> None:
        """Parametrized weights (``weight_norm``, ``spectral_norm``) cannot be masked by torch's pruning: an
        explicit one fails here, before training; the defaults leave them out, as Lightning's callback does, and
        a warning names them (otherwise the layers of a weight-normed model would stay dense without a word)."""
        never_called = [f"{type(m).__name__}.{n}" for m, n in self._parameters_to_prune if is_lazy(getattr(m, n))]
        if never_called:
            raise MisconfigurationException(f"`parameters_to_prune`: {', '.join(never_called)} belong to lazy layers "
                                            "that the first forward pass did not call: their weights do not exist.")
        try:
            check_prunable(self._parameters_to_prune)
        except ValueError as err:
            raise MisconfigurationException(f"`parameters_to_prune`: {err}") from None
        if given:
            return
        names = self._parameter_names or self.PARAMETER_NAMES
        skipped = [f"{path}.{name}" if path else name
                   for path, _, name in parametrized_tensors(pl_module) if name in names]
        if skipped:
            rank_zero_warn(
                f"ModelPruning leaves out {len(skipped)} parametrized tensor(s), which torch.nn.utils.prune cannot "
                f"mask: {', '.join(skipped)}. To prune them, call "
                "litcompress.pruning.fold_parametrizations_(model) before fitting (each becomes a plain layer "
                "holding its current weight), or pass `parameters_to_prune` without them to "
                "silence this."
            )
        lazy = engine.lazy_parameter_names(pl_module)
        if lazy:
            rank_zero_warn(f"ModelPruning leaves out {', '.join(lazy[:5])}{', ...' if len(lazy) > 5 else ''}: lazy "
                           "layers that the first forward pass did not call, whose weights do not exist.")
        scripted = [path for path, module in pl_module.named_modules() if is_scripted(module)
                    and any(isinstance(getattr(module, name, None), nn.Parameter) for name in names)]
        if scripted:
            rank_zero_warn(
                f"ModelPruning leaves out the tensors of {len(scripted)} TorchScript module(s), which "
                f"torch.nn.utils.prune cannot re-parametrise: {', '.join(scripted[:5])}"
                f"{', ...' if len(scripted) > 5 else ''}. To prune them, {SCRIPTED_HINT}; or pass "
                "`parameters_to_prune` without them to silence this."
            )

    def _pruned_dim(self) -> Optional[int]:
        """The dim a structured method prunes slices along: `pruning_dim`, or a method's own default."""
        if getattr(self._method, "PRUNING_TYPE", None) != "structured":
            return self._method_kwargs.get("dim")
        return structured_dim(self._method, self._method_kwargs)

    def _validate_against_model(self, pl_module: LightningModule) -> None:
        """Checks that need the model: a structured method's targets have slices to prune (torch refuses a 1-d
        tensor only when the first round runs, after training), and `pruning_dim` is within their dimensions."""
        dim = self._pruned_dim()
        structured = getattr(self._method, "PRUNING_TYPE", None) == "structured"
        for module, name in self._parameters_to_prune:
            ndim = engine.trainable_tensor(module, name).dim()
            if structured and ndim < 2:
                flat = [q for q, (m, n) in zip(engine.qualified_names(pl_module, self._parameters_to_prune),
                                                    self._parameters_to_prune)
                        if engine.trainable_tensor(m, n).dim() < 2]
                fix = ("Pass `parameter_names=[\"weight\"]` (the default names the biases too) or leave it out of "
                       "`parameters_to_prune`." if name == "bias" else
                       "Leave the 1-d weights (norm layers' scales) out: pass `parameters_to_prune` naming the layers "
                       "whose rows or channels to prune, e.g. `[(m, \"weight\") for m in model.modules() if "
                       "isinstance(m, (nn.Linear, nn.Conv2d))]`.")
                raise MisconfigurationException(
                    f"`{self._pruning_method_name}` prunes whole slices of multidimensional tensors, but"
                    f" `{type(module).__name__}.{name}` has {ndim} dimension ({len(flat)} such target(s): "
                    f"{', '.join(flat[:4])}{' ...' if len(flat) > 4 else ''}). {fix}"
                )
            if dim is not None and not -ndim <= dim < ndim:
                raise MisconfigurationException(
                    f"`pruning_dim={dim}` is out of range for `{type(module).__name__}.{name}` with {ndim}"
                    f" dimension(s). Choose a dimension in [{-ndim}, {ndim - 1}] or restrict `parameter_names`"
                    " / `parameters_to_prune` to tensors that have it."
                )
            norm = self._method_kwargs.get("n")
            tensor = engine.trainable_tensor(module, name)
            if norm is not None and dim is not None and not is_lazy(tensor):
                # torch ranks the slices by this norm over the other dimensions: 'fro' and 'nuc' need matrices
                refusal = norm_refusal(tensor, norm, dim)
                if refusal is not None:
                    raise MisconfigurationException(
                        f"`pruning_norm={norm!r}` does not apply to `{type(module).__name__}.{name}` of shape "
                        f"{tuple(tensor.shape)}: torch takes it over the {ndim - 1} dimension(s) besides "
                        f"`pruning_dim={dim}`, and says: {refusal}. Use a number (1, 2, float('inf'), ...)."
                    )

    def _check_amount_fits(self, amount: Union[int, float]) -> None:
        if not isinstance(amount, numbers.Integral):
            return
        targets = engine.distinct_targets(self._parameters_to_prune)
        structured = getattr(self._method, "PRUNING_TYPE", None) == "structured"
        dim = self._pruned_dim() if structured else None
        if dim is not None:  # a structured method's count is of slices (the round's own check)
            if not all(-engine.trainable_tensor(m, n).dim() <= dim < engine.trainable_tensor(m, n).dim()
                       for m, n in targets):
                return  # (refused at setup in its own words)
            remaining, what = [engine.remaining_slices(m, n, dim) for m, n in targets], f"slices along dim={dim}"
        else:
            remaining, what = [engine.remaining_count(m, n) for m, n in targets], "entries"
        try:
            engine.check_count_fits(int(amount), remaining, "global" if self._use_global_unstructured else "local",
                                    what=what)
        except ValueError as err:
            raise MisconfigurationException(f"{err} Use a smaller count or a fraction.") from None

    @staticmethod
    def sanitize_parameters_to_prune(
        pl_module: LightningModule, parameters_to_prune: _PARAM_LIST = (), parameter_names: Sequence[str] = ()
    ) -> _PARAM_LIST:
        """Check ``parameters_to_prune`` against the model, or list every ``parameter_names`` parameter of every
        non-container module when it is empty.

        Raises:
            MisconfigurationException:
                If ``parameters_to_prune`` doesn't exist in the model, or
                if ``parameters_to_prune`` is neither a list nor a tuple.
        """
        parameters = parameter_names or ModelPruning.PARAMETER_NAMES
        current_modules = [m for m in pl_module.modules() if not isinstance(m, _MODULE_CONTAINERS)]

        if not parameters_to_prune:
            return [
                (m, p)
                for p in parameters
                for m in current_modules
                if not is_scripted(m)  # torch cannot prune TorchScript modules (warned at setup)
                and (isinstance(getattr(m, p, None), nn.Parameter) or engine.is_pruned(m, p))
                and not is_lazy(getattr(m, p))  # a lazy layer the forward pass never called (warned)
            ]
        if not _is_param_list(parameters_to_prune):
            raise MisconfigurationException(
                "The provided `parameters_to_prune` should either be list of tuple"
                " with 2 elements: (nn.Module, parameter_name_to_prune) or None"
            )
        known = {id(m) for m in current_modules}
        missing_modules, missing_parameters, absent = [], [], []
        for module, name in parameters_to_prune:
            if id(module) not in known:
                missing_modules.append(module)
                continue
            if not hasattr(module, name):
                missing_parameters.append(name)
            elif not isinstance(getattr(module, name), torch.Tensor):  # e.g. `bias` of a layer built with bias=False
                missing_parameters.append(name)
                absent.append(f"`{type(module).__name__}.{name}` is {getattr(module, name)!r}")
        if missing_modules or missing_parameters:
            raise MisconfigurationException(
                "Some provided `parameters_to_prune` don't exist in the model."
                f" Found missing modules: {missing_modules} and missing parameters: {missing_parameters}"
                + (f" ({', '.join(absent)})." if absent else "")
            )
        return parameters_to_prune

    @staticmethod
    def _is_pruning_method(method: Any) -> bool:
        return is_pruning_method(method)


@rank_zero_only
def _info_on_rank_zero(message: str, logger: logging.Logger = log) -> None:
    """An INFO line, once under DDP (every process runs the callbacks), on `logger` (this module's by default)."""
    logger.info(message)


def _in_spawned_worker(trainer: Optional["pl.Trainer"]) -> bool:
    """True inside a process started by Lightning's multiprocessing launcher (``ddp_spawn``, ``ddp_fork``)."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    return isinstance(launcher, _MultiProcessingLauncher)


#: where `_describe` says a lambda or a local function is written: ``@script.py:12``
_WRITTEN_AT = re.compile(r"@[^:'\"@]+:\d+")


def _shape_of(tensor: Any) -> str:
    """A target's shape for the state key: a lazy layer's has none yet (nor a tensor set to None)."""
    if not isinstance(tensor, torch.Tensor):
        return "[]"
    return "[lazy]" if is_lazy(tensor) else str(list(tensor.shape))


def _without_locations(key: str) -> str:
    return canonical_numbers(_WRITTEN_AT.sub("", key))


_WHOLE_FLOAT = re.compile(r"(?<![\w.])(-?\d+)\.0(?![\w.])")


_STATE_KEY_MEMO = "_state_key_memo"


def memoized_state_key(callback: Callback, make: Callable[[], str]) -> str:
    """`callback`'s state key as `make` gives it, made once: Lightning reads the key at every hook it calls (to name
    the hook for its profiler), six times a training step, and describing a schedule each time made a step of a small
    model a sixth slower. The callback's ``__setattr__`` drops it when an attribute it is made of is reassigned."""
    key = callback.__dict__.get(_STATE_KEY_MEMO)
    if key is None:
        key = callback.__dict__[_STATE_KEY_MEMO] = make()
    return key


def canonical_numbers(key: str) -> str:
    """`key` with whole floats written as ints (``power=3.0`` as ``power=3``): LightningCLI hands a parameter typed
    ``float`` a float, Python code often an int, and the same schedule must find its state under one key."""
    return _WHOLE_FLOAT.sub(r"\1", key)


def _describe(value: Any) -> str:
    """A stable description of a number, schedule or callable (a repr with no memory address, so that a resumed run
    in a new process finds the state its checkpoint holds under the callback's `state_key`)."""
    if isinstance(value, partial):
        arguments = [_describe(a) for a in value.args] + [f"{k}={_describe(v)}" for k, v in value.keywords.items()]
        return f"functools.partial({', '.join([_describe(value.func), *arguments])})"
    if callable(value) and hasattr(value, "__qualname__"):
        where = ""
        code = getattr(value, "__code__", None)
        if code is not None and "<" in value.__qualname__:  # lambdas and local functions share their names
            where = f"@{os.path.basename(code.co_filename)}:{code.co_firstlineno}"
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}{where}"
    text = repr(value)
    if " at 0x" in text:  # object's default repr: its class is what stays the same from one process to the next
        return f"{type(value).__module__}.{type(value).__qualname__}"
    return text


def _is_param_list(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value)
        and all(isinstance(a, nn.Module) and isinstance(b, str) for a, b in value)
    )


def _check_amount(amount: Any, epoch: Optional[int] = None) -> None:
    where = f" (returned by the `amount` callable at epoch {epoch})" if epoch is not None else ""
    try:
        engine.validate_amount(amount)
    except (TypeError, ValueError) as err:
        raise MisconfigurationException(f"Invalid `amount={amount!r}`{where}: {err}") from None


def _validation_follows_batch(trainer: "pl.Trainer") -> Optional[bool]:
    """Whether Lightning validates after the batch whose end is running (its own rule, which a resumed fit reads to
    skip that validation); None where this Lightning has no such rule to ask."""
    loop = trainer.fit_loop.epoch_loop
    try:
        return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
    except (AttributeError, TypeError):
        return None


def _at_last_batch(trainer: "pl.Trainer") -> bool:
    """Whether the batch whose end is running is its epoch's last."""
    return bool(getattr(getattr(trainer.fit_loop.epoch_loop, "batch_progress", None), "is_last_batch", True))


def _first_round(schedule: SparsitySchedule) -> Optional[int]:
    """The schedule's first point with a round that prunes anything (in its unit), or None."""
    return next((t for t in range(schedule.begin, schedule.end + 1)
                 if schedule.should_prune(t) and schedule.target(t) > 0), None)


def _check_rewind(
    step: Optional[int], epoch: Optional[int], schedule: Optional[SparsitySchedule], first_epoch_round: Optional[int]
) -> tuple[Optional[str], Optional[int]]:
    """Validate the rewind point; returns ``(unit, point)`` or ``(None, None)`` for "when fitting starts".

    A schedule's point t in epochs is "t epochs done": its round runs at the end of epoch max(t, 1) - 1, before the
    start of epoch max(t, 1), whose snapshot would hold pruned weights. Its point t in steps runs in the batch whose
    optimizer step reaches max(t, 1), after that step's snapshot. Point 0, the snapshot taken when fitting starts,
    precedes every round. `first_epoch_round` is the first such point without a schedule (0 when every epoch end
    prunes), if known. Points in the other unit are checked when fitting starts, with the steps per epoch known
    (``on_train_start``)."""
    if step is not None and epoch is not None:
        raise MisconfigurationException("Pass either `rewind_to_step` or `rewind_to_epoch`, not both.")
    unit, point = ("step", step) if step is not None else ("epoch", epoch) if epoch is not None else (None, None)
    if point is None:
        return None, None
    if isinstance(point, bool) or not isinstance(point, numbers.Integral) or point < 0:
        raise MisconfigurationException(f"`rewind_to_{unit}` must be an int >= 0, got {point!r}.")
    first = (_first_round(schedule) if schedule is not None and schedule.unit == unit
             else first_epoch_round if schedule is None and unit == "epoch" else None)
    last = None if first is None else max(first, 1) - 1 if unit == "epoch" else max(first, 1)  # the latest point
    if last is not None and point > last:
        where = (f"{unit} {first} of the `amount` schedule" if schedule is not None
                 else "the end of epoch 0: every epoch end prunes")
        raise MisconfigurationException(
            f"`rewind_to_{unit}={point}` is not before the first pruning round ({where}): the snapshot would hold "
            f"pruned weights. Rewind to {unit} {last} or earlier."
        )
    return unit, int(point)


def _check_flag(argument: str, value: Any) -> Any:
    if _is_bool(value):  # numpy's too, as Lightning takes it: a Python bool (`is True` tests read it)
        return bool(value)
    if not callable(value):
        raise MisconfigurationException(
            f"`{argument}` must be a bool or a callable `epoch -> bool`, got {value!r}."
        )
    return value


def _check_unstructured_in_global(pruning_fn: Any, method: Any) -> None:
    """Lightning's refusal of a structured method under ``use_global_unstructured=True``, in its words."""
    if method.PRUNING_TYPE != "unstructured":
        raise MisconfigurationException(
            'Only the "unstructured" PRUNING_TYPE is supported with `use_global_unstructured=True`.'
            f" Found method {pruning_fn} of type {method.PRUNING_TYPE}. "
        )


def _imported_pruning_method(path: str) -> type:
    """The `BasePruningMethod` subclass a ``pruning_fn`` import path names: the user's path was refused as a
    misspelt built-in name (lowercased, its import error lost) where LightningCLI could not import it."""
    try:
        return import_pruning_method(path)
    except ValueError as error:
        raise MisconfigurationException(f"The provided `pruning_fn` {error}") from error.__cause__


def _check_int(argument: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise MisconfigurationException(f"`{argument}` must be an int, got {value!r}.")


def _check_norm(value: Any) -> None:
    if not is_ln_norm(value):  # whether a target's shape suits a matrix norm is checked at setup, on the model
        raise MisconfigurationException(
            f"`pruning_norm` must be a number (1, 2, float('inf'), ...) or 'fro' or 'nuc', as torch's `ln_structured`"
            f" takes, got {value!r}."
        )


def load_pruned_checkpoint(
    model: nn.Module, checkpoint: Union[str, "os.PathLike[str]", dict[str, Any]], *, keep_masks: bool = True,
    strict: bool = True,
) -> nn.Module:
    """Load a Lightning checkpoint written with pruning into a fresh, unpruned `model`; returns `model`.

    Works with both formats: ``<name>_orig``/``<name>_mask`` keys (``make_pruning_permanent=False``, also
    Lightning's own callback) and effective weights plus this callback's saved masks. With ``keep_masks=True`` the
    model ends with live masks (to continue pruning or training sparse; a weights-only checkpoint holds none, which
    is warned of); with ``False`` it is permanent, ready for inference or export.
    """
    if not isinstance(model, nn.Module):  # (a class failed in `Module.parameters()`, missing `self`)
        given = model.__name__ if isinstance(model, type) else type(model).__name__
        raise TypeError(f"load_pruned_checkpoint(model={given}): expected the fresh model to load into, an nn.Module "
                        f"instance (e.g. {given}(...)); `load_module_from_checkpoint(cls, path)` takes the class and "
                        "builds it from the checkpoint's hyperparameters.")
    for flag, value in (("keep_masks", keep_masks), ("strict", strict)):  # ("no" was taken for True)
        if not _is_bool(value):
            raise TypeError(f"load_pruned_checkpoint({flag}={value!r}): expected True or False.")
    # a path, a file object (as torch.load takes), or what torch.load gave (None: torch's "no attribute 'seek'")
    if not isinstance(checkpoint, (dict, str, os.PathLike)) and not hasattr(checkpoint, "read"):
        raise TypeError(f"load_pruned_checkpoint(checkpoint={type(checkpoint).__name__}): expected the path of a "
                        "Lightning checkpoint (.ckpt), a file object, or the dict torch.load(path) gives.")
    if not isinstance(checkpoint, dict):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError("Not a Lightning checkpoint (no 'state_dict'); use `load_pruned_state_dict` for a state dict.")
    engine.load_pruned_state_dict(model, checkpoint["state_dict"], strict=strict)
    if keep_masks:
        _restore_saved_masks_(model, checkpoint, strict=strict, owner="load_pruned_checkpoint")
    else:
        engine.make_permanent_(model)
    return model


def _restore_saved_masks_(model: nn.Module, checkpoint: Mapping[str, Any], *, strict: bool, owner: str) -> None:
    """Re-create on `model` the masks the pruning callbacks saved in `checkpoint`'s callback states: ModelPruning's
    (and a subclass's, under its own name), UnitPruning's and HeadPruning's (they were left out: the pruned units and
    heads grew back in a fit that went on). Not `strict`: masks of tensors `model` lacks are skipped. A weights-only
    checkpoint of a pruned model (its zeros, no states) is warned of, naming `owner`, the loader called."""
    if "callbacks" not in checkpoint and not engine.pruned_targets(model) and any(
            engine.holds_pruning_zeros(module, name) for module in model.modules()
            for name, _ in module.named_parameters(recurse=False)):  # (a model never pruned has nothing to keep)
        warnings.warn(f"{owner}(keep_masks=True): the checkpoint holds no callback states (saved with "
                      "save_weights_only=True?), so no pruning masks came with it: the zeros are in the weights, but "
                      "nothing keeps them at zero if training goes on. Mask them to keep them: "
                      "litcompress.pruning.set_mask_(module, 'weight', module.weight != 0) for each pruned tensor.",
                      stacklevel=3)
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and isinstance(state.get("masks"), dict) and state["masks"] \
                and ("rounds" in state or "pruned_once" in state):  # ModelPruning's, or UnitPruning/HeadPruning's
            engine.restore_masks_(model, state["masks"], strict=strict)


def load_module_from_checkpoint(
    module_class: type[LightningModule], checkpoint_path: Union[str, "os.PathLike[str]"], *, keep_masks: bool = True,
    **kwargs: Any,
) -> LightningModule:
    """``module_class.load_from_checkpoint(checkpoint_path, map_location="cpu", **kwargs)`` that also reads a
    checkpoint written while pruning with masks (``<name>_orig``/``<name>_mask`` keys: ``make_pruning_permanent=False``,
    Lightning's callback too), which ``load_from_checkpoint`` refuses, and one of a module whose layers
    :func:`~litcompress.pruning.shrink.shrink` narrowed (its layers are narrowed alike,
    :func:`~litcompress.pruning.narrow.narrow_to_state_dict_`). `keep_masks`: as in :func:`load_pruned_checkpoint`."""
    if not (isinstance(module_class, type) and issubclass(module_class, LightningModule)):
        given = module_class.__name__ if isinstance(module_class, type) else type(module_class).__name__
        raise TypeError(f"load_module_from_checkpoint(module_class={given}): expected a LightningModule subclass "
                        "(the class itself), which the checkpoint's hyperparameters build; load_pruned_checkpoint"
                        "(model, path) loads into a model you built.")
    map_location = kwargs.pop("map_location", "cpu")  # Lightning's argument, passed on (it was given twice)
    strict = kwargs.pop("strict", None)  # None: the module's `strict_loading`, as Lightning's loader reads it
    for flag, value in (("keep_masks", keep_masks), ("strict", strict)):  # ("no" was taken for True)
        if not _is_bool(value) and (flag == "keep_masks" or value is not None):
            also = " (or None: the module's strict_loading)" if flag == "strict" else ""
            raise TypeError(f"load_module_from_checkpoint({flag}={value!r}): expected True or False{also}.")
    checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=False)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:  # (KeyError: 'pytorch-lightning_version')
        raise ValueError(f"load_module_from_checkpoint: {str(checkpoint_path)!r} is not a Lightning checkpoint (no "
                         "'state_dict'); a state dict loads into a model you built with "
                         "litcompress.load_pruned_state_dict(model, torch.load(path)).")
    state = checkpoint["state_dict"]
    masked = any(k.endswith("_mask") and k[: -len("_mask")] + "_orig" in state for k in state)
    try:
        if not masked:
            # effective weights: the masks are in the callbacks' states
            module = module_class.load_from_checkpoint(checkpoint_path, map_location=map_location, strict=strict,
                                                       **kwargs)
            if keep_masks:
                _restore_saved_masks_(module, checkpoint, strict=_strictness(module, strict),
                                      owner="load_module_from_checkpoint")
            return module
        # Lightning builds the module and loads its effective weights (`orig * mask`) as it would a permanent
        # checkpoint's, `strict` and the module's `strict_loading` as they are; the masks go on below
        module = module_class.load_from_checkpoint(_with_effective_weights(checkpoint), map_location=map_location,
                                                   strict=strict, **kwargs)
    except RuntimeError as error:  # size mismatches: the checkpoint of a model `shrink` narrowed?
        if "Error(s) in loading state_dict" not in str(error):
            raise
        changed = shapes_changed_by(module_class, checkpoint, kwargs)
        if changed:  # the sizes asked for here, not a shrunk model's: narrowing would drop them silently
            given = ", ".join(f"{name}={value!r}" for name, value in kwargs.items())
            raise RuntimeError(f"{error}\n(load_module_from_checkpoint: {given} given here build {changed[0]} with "
                               "another shape than the checkpoint's hyperparameters and weights; a shrunk model's "
                               "checkpoint is narrowed only as its own hyperparameters build it.)") from error
        module = built_without_weights(module_class, checkpoint, **kwargs)
        try:
            narrowed = narrow_to_state_dict_(module, state)
        except ValueError as not_shrunk:  # e.g. a new, wider head: torch's size mismatch, with why it stands
            raise RuntimeError(f"{error}\n(load_module_from_checkpoint: not the checkpoint of a shrunk "
                               f"{module_class.__name__} either: {not_shrunk})") from error
        if not masked:
            if not narrowed:
                raise
            module.load_state_dict(state, strict=_strictness(module, strict))
            if keep_masks:
                _restore_saved_masks_(module, checkpoint, strict=_strictness(module, strict),
                                      owner="load_module_from_checkpoint")
            return module
    narrow_to_state_dict_(module, state)  # a non-strict load skips the `<name>_orig` keys unchecked: narrow here
    return load_pruned_checkpoint(module, checkpoint, keep_masks=keep_masks, strict=_strictness(module, strict))


def shapes_changed_by(module_class: type[LightningModule], checkpoint: Mapping[str, Any], kwargs: Mapping[str, Any]
                      ) -> list[str]:
    """The tensors `kwargs` (hyperparameters given over the checkpoint's) build with another shape than both the
    module the checkpoint's own hyperparameters build and the checkpoint's weights (a shrunk checkpoint's narrower
    weights, which such arguments may describe, fit); none when a module cannot be built (the load says why)."""
    if not kwargs:
        return []
    try:
        saved, given = ({name: tuple(value.shape) for name, value in
                         built_without_weights(module_class, dict(checkpoint), **args).state_dict().items()}
                        for args in ({}, kwargs))
    except Exception:  # noqa: BLE001 - the load that follows fails with its own words
        return []
    stored = {key.removesuffix("_orig"): tuple(value.shape) for key, value in (checkpoint.get("state_dict") or {})
              .items() if isinstance(value, torch.Tensor) and not key.endswith("_mask")}
    return [name for name, shape in given.items()
            if shape != saved.get(name, shape) and shape != stored.get(name, saved.get(name))]


def _strictness(module: nn.Module, strict: Optional[bool]) -> bool:
    """`strict` as given, else the module's ``strict_loading`` (True unless it sets it), as Lightning reads them."""
    return strict if strict is not None else bool(getattr(module, "strict_loading", True))


def _with_effective_weights(checkpoint: dict[str, Any]) -> io.BytesIO:
    """`checkpoint`, written to memory with each ``<name>_orig``/``<name>_mask`` pair of its state dict as the one
    weight ``<name>`` they compute (``orig * mask``), for ``load_from_checkpoint`` to read as a permanent one."""
    state = checkpoint["state_dict"]
    effective: dict[str, Any] = {}
    for key, value in state.items():
        if key.endswith("_orig") and key[: -len("_orig")] + "_mask" in state:
            base = key[: -len("_orig")]
            effective[base] = value * state[base + "_mask"].to(value.dtype)
        elif not (key.endswith("_mask") and key[: -len("_mask")] + "_orig" in state):
            effective[key] = value
    buffer = io.BytesIO()  # without the optimizers' states (often the largest part): building needs none of them
    torch.save({**checkpoint, "state_dict": effective, "optimizer_states": [], "lr_schedulers": []}, buffer)
    buffer.seek(0)
    return buffer


def built_without_weights(module_class: type[LightningModule], checkpoint: dict[str, Any], **kwargs: Any
                          ) -> LightningModule:
    """The module ``load_from_checkpoint`` builds from the checkpoint's hyperparameters (its hooks run), before any
    weight is loaded into it."""
    buffer = io.BytesIO()
    torch.save({**checkpoint, "state_dict": {}}, buffer)
    buffer.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module_class.load_from_checkpoint(buffer, map_location="cpu", strict=False, **kwargs)


def restore_state_under_moved_key(callback: Callback, trainer: "pl.Trainer", checkpoint: dict[str, Any]) -> None:
    """In `on_load_checkpoint`: when `checkpoint` holds no state under `callback.state_key` but exactly one, claimed by
    no other callback of `trainer`, under a key that differs from it only in where a function (a lambda) is written,
    load that one, with a warning; with several such keys, load none and say so."""
    states = checkpoint.get("callbacks") or {}
    if callback.state_key in states:
        return
    claimed = {c.state_key for c in trainer.callbacks if isinstance(c, Callback)}
    # a key written before whole floats were written as ints (or by LightningCLI, which hands float-typed schedule
    # arguments floats): the same configuration
    same = [k for k in states if isinstance(k, str) and k not in claimed and canonical_numbers(k) == callback.state_key]
    if len(same) == 1:
        callback.load_state_dict(copy.deepcopy(states[same[0]]))
        return
    mine = _without_locations(callback.state_key)
    moved = [k for k in states if isinstance(k, str) and k not in claimed and _without_locations(k) == mine]
    if len(moved) == 1:
        rank_zero_warn(
            f"`{type(callback).__name__}`: the checkpoint holds this callback's state under {moved[0]!r}, which "
            f"differs from its own key {callback.state_key!r} only in where a function is written; it is restored."
        )
        callback.load_state_dict(copy.deepcopy(states[moved[0]]))
    elif moved:
        rank_zero_warn(
            f"`{type(callback).__name__}`: the checkpoint holds no state under this callback's key "
            f"{callback.state_key!r} but {len(moved)} that differ from it only in where a function is written "
            f"({', '.join(map(repr, moved))}): which is this callback's cannot be told, so none is restored. "
            "Construct the callbacks as in the run that wrote the checkpoint."
        )


def restore_state_under_class_key(callback: Callback, trainer: "pl.Trainer", checkpoint: dict[str, Any]) -> None:
    """In `on_load_checkpoint` of a callback whose `state_key` came to name its arguments: a checkpoint written before
    holds its state under the class name; load it from there when the callback's own key is missing and no other
    callback of `trainer` has the class name for its key."""
    states = checkpoint.get("callbacks") or {}
    plain = type(callback).__qualname__
    claimed = {c.state_key for c in trainer.callbacks if isinstance(c, Callback)}
    if callback.state_key not in states and plain in states and plain not in claimed:
        callback.load_state_dict(copy.deepcopy(states[plain]))


def _weight_averaging_callbacks(callbacks: Sequence[Any]) -> list[str]:
    """The class names of Lightning's weight-averaging callbacks (StochasticWeightAveraging, EMAWeightAveraging and
    other WeightAveraging subclasses) among `callbacks`."""
    from lightning.pytorch import callbacks as lightning_callbacks

    kinds = tuple(getattr(lightning_callbacks, name) for name in ("StochasticWeightAveraging", "WeightAveraging")
                  if hasattr(lightning_callbacks, name))
    return sorted({type(callback).__name__ for callback in callbacks if isinstance(callback, kinds)})


def _refuse_weight_averaging_after(pruning: Callback, callbacks: Sequence[Any]) -> None:
    """Lightning's weight-averaging callbacks keep a copy of the model from their ``setup`` and, at the end of fit,
    copy the averaged parameters over the model's (by position: ModelPruning keeps the parameters' order). Listed
    after a ModelPruning that makes pruning permanent, they do so after the masks are multiplied in: the model comes
    back dense, which Lightning's ModelPruning lets happen silently. Listed before it, the averaged weights are
    masked as they should be."""
    position = next((i for i, callback in enumerate(callbacks) if callback is pruning), -1)
    after = _weight_averaging_callbacks(callbacks[position + 1:])
    if after:
        name = type(pruning).__name__  # ModelPruning, UnitPruning, HeadPruning
        raise MisconfigurationException(
            f"{name}(make_pruning_permanent=True) is listed before {', '.join(after)}: at the end of fit the "
            "averaging callback writes its averaged parameters over the pruned weights, after the masks were made "
            f"permanent, and the model would come back unpruned. List {name} after {after[0]} in "
            "Trainer(callbacks=[...]) (the averaged weights are then masked), or pass make_pruning_permanent=False."
        )
