"""Lightning adapter: judge candidates with the module's own validation metric.

A thin layer over the framework-free :func:`litcompress.quantization.quantize`; the only
module of the subpackage that imports lightning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import re
import signal
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import lightning as L
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden
import torch
from torch import nn

from litcompress._files import cannot_write, what_is_in_the_way
from litcompress.pruning.engine import deepcopy_model, is_compiled

from .config import PTQConfig, criterion_for_metric
from .tuner import (QuantizationResult, batch_inputs, check_calibration_data, devices_off_the_cpu, model_input_fn,
                    non_float32_dtypes, quantize, signature_or_none)

logger = logging.getLogger(__name__)


#: A Trainer that runs in this process on the CPU and writes nothing: no logger, checkpoints or progress output.
QUIET_CPU_TRAINER: dict = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False)


def internal_trainer(**overrides: Any) -> L.Trainer:
    """A :data:`QUIET_CPU_TRAINER` that evaluates candidates or reads a step's inputs, built by
    :func:`trainer_built_quietly`. Its logger takes and drops whatever it is given, so that a step calling
    ``self.logger`` (``self.logger.experiment.add_image(...)``) runs as in the user's fit: with none, it failed in an
    AttributeError at the first evaluation, after a whole fit for the fit-end callbacks. (The modules it validates
    are copies that log no hyperparameters: see :func:`evaluation_copy`.)"""
    root = overrides.get("default_root_dir") or os.getcwd()
    return trainer_built_quietly(**{**QUIET_CPU_TRAINER, "logger": _DiscardingLogger(root), **overrides})


class _DiscardingLogger(DummyLogger):
    """Lightning's ``DummyLogger`` (any call taken and dropped) whose ``save_dir``, ``root_dir`` and ``log_dir`` are
    the folder a Trainer without a logger gives as ``trainer.log_dir`` (its ``default_root_dir``): a step writing files
    into one of them found None."""

    def __init__(self, save_dir: str) -> None:
        super().__init__()
        self._save_dir = save_dir

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def root_dir(self) -> str:  # (the base class's: None; a step writing into self.logger.log_dir failed)
        return self._save_dir

    @property
    def log_dir(self) -> str:
        return self._save_dir


def evaluation_copy(module: L.LightningModule) -> L.LightningModule:
    """:func:`detached_copy` in eval mode for an internal trainer to validate: it logs no hyperparameters (with a
    logger, Lightning merges a module's and a DataModule's saved ones and refuses different values for one key, which
    the user's fit without a logger never did)."""
    copy = detached_copy(module).eval()
    copy._log_hyperparams = False  # (our copy's; the user's module keeps its own)
    return copy


def quiet_unless_asked(quiet: dict[str, Any], callbacks: Any) -> dict[str, Any]:
    """`quiet` (Trainer defaults turning a logger, checkpoints, the progress bar or the model summary off) less those
    a given callback needs: a ModelCheckpoint asks for checkpointing, a LearningRateMonitor for a logger (Lightning
    refuses them beside the quiet defaults, which are ours, not the user's)."""
    from lightning.pytorch.callbacks import (DeviceStatsMonitor, LearningRateMonitor, ModelCheckpoint, ModelSummary,
                                             ProgressBar)

    turned_on_by = dict(logger=(LearningRateMonitor, DeviceStatsMonitor), enable_checkpointing=ModelCheckpoint,
                        enable_progress_bar=ProgressBar, enable_model_summary=ModelSummary)
    callbacks = [callbacks] if isinstance(callbacks, L.Callback) else list(callbacks or [])
    return {key: value for key, value in quiet.items()
            if key not in turned_on_by or not any(isinstance(c, turned_on_by[key]) for c in callbacks)}


def trainer_built_quietly(**kwargs: Any) -> L.Trainer:
    """``Trainer(**kwargs)`` for one of the many trainers litcompress builds itself (evaluating candidates, reading a
    step's inputs, the rounds of a lottery-ticket search): the lines Lightning logs when one is built (the devices,
    ``limit_val_batches=1`` "was configured") are about no trainer the user made and would repeat at every stage or
    round, so they are left out; its warnings are not."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = rank_zero.level
    rank_zero.setLevel(max(level, logging.WARNING))
    try:
        return L.Trainer(**kwargs)
    finally:
        rank_zero.setLevel(level)


class Terminated(KeyboardInterrupt):
    """A run stopped by SIGTERM (a scheduler's or ``kill``'s), told apart from Ctrl-C where the exit code says which
    (143, not 130). A KeyboardInterrupt otherwise: whatever keeps its results on Ctrl-C keeps them here too."""


@contextlib.contextmanager
def ctrl_c_raises(trainer: L.Trainer) -> Iterator[None]:
    """Run a ``trainer.fit``/``validate``/``test`` inside so that Ctrl-C raises KeyboardInterrupt, as elsewhere in
    Python. Lightning catches it, tears the run down and calls ``sys.exit(1)``, which a caller cannot tell from a
    failure (a quantization search would end without what it found, a CLI run with exit code 1), and leaves SIGINT
    ignored for the rest of the process (a notebook or REPL would no longer stop on Ctrl-C): the handler from before
    is put back. A SIGTERM, which Lightning ends the loops on with ``SystemExit`` too, raises :class:`Terminated`."""
    main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        yield
    except SystemExit as exit_:
        if not trainer.interrupted:
            raise
        if handler is not None:
            signal.signal(signal.SIGINT, handler)
        raise (Terminated if isinstance(exit_, SIGTERMException) else KeyboardInterrupt) from None


def _evaluation_trainer() -> L.Trainer:
    return internal_trainer()


def _is_loader(value: object) -> bool:
    return isinstance(value, Iterable) and not isinstance(value, (torch.Tensor, str, bytes, Mapping, Sequence))


def each_loader(loaders: Any) -> list[Any]:
    """The dataloaders of several (a list, tuple or dict of them), or the one given, in a list."""
    if isinstance(loaders, Mapping) and loaders and all(_is_loader(v) for v in loaders.values()):
        return list(loaders.values())
    if isinstance(loaders, Sequence) and not isinstance(loaders, (str, bytes)) and loaders \
            and all(_is_loader(v) for v in loaders):
        return list(loaders)
    return [loaders]


def known_empty(loader: object) -> bool:
    """`loader` (a list, a DataLoader over a sized dataset) says it has no batch; one without a length is not."""
    try:
        return len(loader) == 0  # type: ignore[arg-type]
    except (TypeError, NotImplementedError):  # (a Dataset without __len__; an IterableDataset's loader)
        return False


NO_BATCH = object()  # next(iter(loader), NO_BATCH): a loader that gave no batch


def check_validation_batches(loaders: Any, owner: str, *, example_read: bool) -> None:
    """Refuse validation data that gives no batch, known before any evaluation: every loader empty (each candidate
    would be judged on nothing), or the first, whose first batch gives the example inputs when `example_read`
    (a bare StopIteration)."""
    every = each_loader(loaders)
    if all(known_empty(loader) for loader in every):
        raise ValueError(f"{owner}: the validation dataloader gives no batch, and every model is judged on it: give "
                         "it batches.")
    if example_read and known_empty(every[0]):
        raise ValueError(f"{owner}: the first validation dataloader gives no batch, and the example inputs (tracing, "
                         "timing) are read from it: give it batches, or example_inputs=.")


def first_loader(loaders: Any) -> Any:
    """The first of several dataloaders (a list, tuple or dict of them, as ``val_dataloader`` and
    ``train_dataloader`` may return), where batches are read for tracing and calibration; one as it is."""
    if isinstance(loaders, Mapping) and loaders and all(_is_loader(v) for v in loaders.values()):
        return next(iter(loaders.values()))
    if isinstance(loaders, Sequence) and not isinstance(loaders, (str, bytes)) and loaders \
            and all(_is_loader(v) for v in loaders):
        return loaders[0]
    return loaders


def logged_metrics(results: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The metrics ``trainer.validate``/``test`` returned, over all its dataloaders (one dict each). A metric logged
    with ``on_step=True, on_epoch=True`` comes back as ``<name>_epoch``; it is also under ``<name>``, as in
    ``trainer.callback_metrics`` (what ``ModelCheckpoint(monitor=<name>)`` reads)."""
    logged: dict[str, float] = {}
    for result in results:
        for name, value in result.items():
            logged.setdefault(name, value)
    for name, value in list(logged.items()):
        forked = re.fullmatch(r"(.+)_epoch(/dataloader_idx_\d+)?", name)
        if forked:
            logged.setdefault(forked.group(1) + (forked.group(2) or ""), value)
    return logged


def missing_metric_message(metric: str, logged: Mapping[str, float], step: str) -> str | None:
    """Why `metric` is not among the `logged` ones (None when it is), with the names to pass instead."""
    if metric in logged:
        return None
    per_loader = sorted(name for name in logged if name.startswith(f"{metric}/dataloader_idx_"))
    if per_loader:
        return (f"{metric!r} is logged by {step} once per dataloader, and Lightning names each "
                f"{per_loader}: pass one of these names (the first dataloader's is {per_loader[0]!r}).")
    if not logged:  # (a name was blamed when no batch ran: an empty loader, a limit of 0)
        return (f"{metric!r} was not logged by {step}, nor was anything else: did it run on no batch (an empty "
                "dataloader, or a limit_val_batches/limit_test_batches of 0)? Otherwise pass the name given to "
                f"self.log(...) in {step}.")
    return f"{metric!r} was not logged by {step}; logged: {sorted(logged)}. Pass the name given to self.log(...) " \
           f"in {step} (a value logged with on_epoch=False is not among what validate/test return: log it with " \
           "on_epoch=True, the default there)."


def detached_copy(module: L.LightningModule) -> L.LightningModule:
    """Deep copy without dragging the attached Trainer along (the user's module is untouched; pruned modules with
    their masks are copied too), its layers built: a module that builds them in ``configure_model`` has the copy's
    built here, as a Trainer would (Lightning asks that hook to be idempotent; see
    :func:`configure_outside_trainer_`)."""
    memo: dict[int, object] = {}
    trainer = getattr(module, "_trainer", None)
    if trainer is not None:
        memo[id(trainer)] = None
    copy = deepcopy_model(module, memo)
    for part in copy.modules():
        if isinstance(part, L.LightningModule):
            # Lightning's cache of which attribute holds each torchmetrics Metric, by id(): the originals' ids, so
            # the copy's `self.log("val_acc", self.acc)` failed ("Could not find the LightningModule attribute")
            part._metric_attributes = None
    configure_outside_trainer_(copy)
    return copy


def configure_outside_trainer_(module: L.LightningModule) -> None:
    """Call `module`'s ``configure_model`` as a Trainer would, where it overrides it. A hook that needs the Trainer
    (a tensor-parallel module reads ``self.device_mesh``) may fail here: that is let pass when the module has
    parameters already (a fitted module's layers exist), and raised when it has none (nothing would be left to
    compress)."""
    if not isinstance(module, L.LightningModule) or not is_overridden("configure_model", module):
        return
    try:
        module.configure_model()
    except Exception:  # noqa: BLE001 - any failure of the user's hook outside a Trainer
        if next(module.parameters(), None) is None:
            raise


class KeywordsAsPositional(nn.Module):
    """Calls `model` with keyword arguments turned into positional ones, in the order of `signature` (that of the
    forward `model` stands in for): ``self(input_ids=..., attention_mask=...)`` in a ``validation_step`` reaches an
    ONNX or TorchScript candidate, which takes positional inputs only."""

    def __init__(self, model: nn.Module, signature: inspect.Signature | None) -> None:
        super().__init__()
        self.model, self.signature = model, signature
        self.calls = 0  # how often the step called it: 0 means the metric was not the model's

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.signature is None or (not kwargs and all(isinstance(a, torch.Tensor) for a in args)):
            return self.model(*args, **kwargs)
        bound = self.signature.bind(*args, **kwargs).arguments
        keyword_only = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD)
        for parameter in self.signature.parameters.values():
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.name in bound and \
                    self._held_flag(parameter, bound[parameter.name]):
                del bound[parameter.name]
        given = [p for p in self.signature.parameters.values() if p.kind in keyword_only and p.name in bound]
        if given:
            raise TypeError(f"the model was called with the keyword-only input `{given[0].name}`: a compressed "
                            "model takes its inputs by position")
        parameters = [p for p in self.signature.parameters.values() if p.kind not in keyword_only]
        positional: list[Any] = []
        named: list[inspect.Parameter | None] = []  # the parameter of each positional value (None: of *args)
        for i, parameter in enumerate(parameters):
            if parameter.name not in bound:
                later = [p.name for p in parameters[i + 1:] if p.name in bound]
                if later:
                    raise TypeError(f"the model was called with {later} but without `{parameter.name}` before "
                                    "them: a compressed model takes its inputs by position, so give every input up "
                                    "to the last one")
                break
            if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
                positional.extend(bound[parameter.name])
                named.extend([None] * len(bound[parameter.name]))
            else:
                positional.append(bound[parameter.name])
                named.append(parameter)
        # trailing flags: a compressed model computes forward with them at their defaults, and takes the inputs only
        while named and named[-1] is not None and self._held_flag(named[-1], positional[-1]):
            named.pop()
            positional.pop()
        return self.model(*positional)

    @staticmethod
    def _held_flag(parameter: inspect.Parameter, value: object) -> bool:
        """Whether `value`, given for `parameter`, is a flag at its default (a non-tensor argument that a compressed
        model holds at its default); TypeError for a flag at another value, which no compressed model computes."""
        default = parameter.default
        if value is None and default is None:
            return True  # an optional input left out: the compressed model was built without it
        if not isinstance(default, (bool, int, float, str)) or type(value) is not type(default):
            return False  # an input (a tensor, a container): passed on as it is
        if value != default:
            raise TypeError(f"the model was called with {parameter.name}={value!r}: a compressed model computes "
                            f"forward with its flags at their defaults ({parameter.name}={parameter.default!r}); "
                            "call it so in the validation and test steps, or compress a sub-module whose forward "
                            "computes what they need (submodule=...)")
        return True


def lightning_eval_fn(module: L.LightningModule, datamodule: L.LightningDataModule | None, metric: str,
                      trainer: L.Trainer | None = None, submodule: str | None = None,
                      dataloaders=None,
                      stage: Literal["validate", "test"] = "validate") -> Callable[[nn.Module], float]:
    """Build ``eval_fn(candidate) -> float``: swap the candidate into a copy of ``module`` and
    return the ``metric`` logged by ``trainer.validate`` (or ``trainer.test`` with ``stage="test"``).

    With ``submodule=None`` the candidate replaces the module's ``forward`` (so ``validation_step``
    must call ``self(...)``); otherwise it replaces ``module.get_submodule(submodule)`` (a dotted path too).
    """
    if stage not in ("validate", "test"):
        raise ValueError(f"lightning_eval_fn(stage={stage!r}): use 'validate' or 'test'.")
    step = f"{type(module).__name__}.{'validation_step' if stage == 'validate' else 'test_step'}"
    host = evaluation_copy(module)
    trainer = trainer or _evaluation_trainer()

    replaced = host if submodule is None else host.get_submodule(submodule)
    signature = signature_or_none(replaced.forward)

    def evaluate(candidate: nn.Module) -> float:
        candidate = KeywordsAsPositional(candidate, signature)  # ONNX and TorchScript models take no keywords
        if submodule is None:
            # An instance attribute shadows the class's forward: self(x) now runs the candidate.
            object.__setattr__(host, "forward", candidate)
        else:
            host.set_submodule(submodule, candidate)
        run = trainer.validate if stage == "validate" else trainer.test
        attached = getattr(datamodule, "trainer", None)  # running attaches the DataModule to this trainer
        try:
            with ctrl_c_raises(trainer):  # the search keeps what it found (Lightning would exit the process)
                logged = logged_metrics(run(host, datamodule=datamodule, dataloaders=dataloaders, verbose=False))
            if metric not in logged and metric in trainer.callback_metrics:
                # logged with logger=False: validate/test return it not, and callback_metrics (what
                # ModelCheckpoint(monitor=...) reads) holds it
                logged[metric] = float(trainer.callback_metrics[metric])
        finally:
            if datamodule is not None and attached is not trainer:
                datamodule.trainer = attached  # the user's, after a fit, as they left it
        message = missing_metric_message(metric, logged, step)
        if message:
            raise KeyError(f"metric={message}")
        if candidate.calls == 0:
            raise ValueError(bypassed_model_message(host, submodule, step, metric))
        return float(logged[metric])

    # named so in the engine's errors (a NaN metric): the Lightning user wrote no eval_fn
    evaluate.metric_source = f"the {metric} that {step} logs"  # type: ignore[attr-defined]
    return evaluate


class _RecordInputs(nn.Module):
    """Runs `forward` (the model's own, bound) and keeps a detached copy of each call's positional inputs."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        super().__init__()
        object.__setattr__(self, "_forward", forward)  # not a sub-module: it may be the host's own forward
        self.inputs: list[tuple] = []

    def forward(self, *args: Any) -> Any:
        self.inputs.append(tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args))
        return self._forward(*args)


class StepInputReader:
    """Reads the inputs `module`'s ``validation_step`` passes to its model (``self(...)``, or `submodule`), on a copy
    of `module` made once for every loader read.

    A module that prepares its batches in its steps (``x.float() / 255``, a reshape) feeds its model other values than
    the batch holds: those, not the batch, are what calibration must observe and an export must be traced on."""

    def __init__(self, module: L.LightningModule, submodule: str | None = None) -> None:
        self.error: Exception | None = None  # why the last `read` found nothing, when the step failed
        self.host = evaluation_copy(module)
        replaced = self.host if submodule is None else self.host.get_submodule(submodule)
        forward = type(self.host).forward.__get__(self.host) if submodule is None else replaced.forward
        self.recorder = _RecordInputs(forward)
        candidate = KeywordsAsPositional(self.recorder, signature_or_none(replaced.forward))
        if submodule is None:
            object.__setattr__(self.host, "forward", candidate)
        else:
            self.host.set_submodule(submodule, candidate)

    def read(self, loader: Any, batches: int) -> list[tuple] | None:
        """The model's inputs on the first `batches` batches of `loader`, positional as a compressed model takes
        them; None when the step does not run on those batches or passes anything but tensors."""
        self.recorder.inputs = []
        self.error: Exception | None = None
        try:
            # fork_rng: reading a loader draws its seed from torch's generator, and the run's training must not
            # change; no inference mode: exporters trace the recorded inputs in autograd mode, where inference
            # tensors fail
            with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
                warnings.simplefilter("ignore")  # Lightning's notes on the loader (workers, batch sizes)
                trainer = internal_trainer(limit_val_batches=batches, inference_mode=False)
                with ctrl_c_raises(trainer):  # Ctrl-C here: KeyboardInterrupt, as elsewhere (Lightning exited)
                    trainer.validate(self.host, dataloaders=loader, verbose=False)
        except Exception as error:  # noqa: BLE001 - a step written for other batches: the batches are read as they are
            self.error = error
            return None
        inputs = self.recorder.inputs
        if not inputs or not all(isinstance(a, torch.Tensor) for call in inputs for a in call):
            return None
        return inputs


_INPUT_FN_REMEDY = "pass input_fn= (or calibration_data= and example_inputs=) with the model's inputs"


def step_model_inputs(module: L.LightningModule, loader: Any, batches: int, *, submodule: str | None = None,
                      remedy: str = _INPUT_FN_REMEDY,
                      on_unreadable: Callable[[Exception], None] | None = None) -> list[tuple] | None:
    """:meth:`StepInputReader.read` once: the inputs `module`'s ``validation_step`` gives its model on the first
    `batches` batches of `loader`. A step that cannot run on its own is said (INFO), with `remedy`, or its error is
    given to `on_unreadable` (a caller that may still refuse the run says it only if the run goes on)."""
    reader = StepInputReader(module, submodule)
    seen = reader.read(loader, batches)
    if seen is None and reader.error is not None:
        if on_unreadable is None:
            log_unreadable_step(module, reader.error, remedy)
        else:
            on_unreadable(reader.error)
    return seen


def log_unreadable_step(module: L.LightningModule, error: Exception, remedy: str) -> None:
    """Say that `module`'s ``validation_step`` failed when run on a loader alone, so the batches are used as they
    are: silently, a step that prepares its batches would have its model calibrated on values it never sees."""
    logger.info(f"{type(module).__name__}.validation_step could not be run on its own to read what it gives the "
                f"model ({type(error).__name__}: {error}), so the model is traced and calibrated on the batches as "
                f"they are: if the step prepares them (scales, casts, reshapes), {remedy}.")


def inputs_as_steps_give_them(module: L.LightningModule, val_loader: Any, train_loader: Any, *,
                              example_inputs: Any, calibration_data: Any, input_fn: Callable[[object], tuple] | None,
                              submodule: str | None, calibration_batches: int
                              ) -> tuple[Any, Any, Callable[[object], tuple] | None]:
    """``(example_inputs, calibration_data, input_fn)`` as the module's steps feed its model.

    When ``validation_step`` gives the model other inputs than its batch holds (it scales, casts or reshapes them),
    the example inputs (when not given) become those of the first validation batch and the calibration data (when
    not given) those of the first `calibration_batches` training batches, both read through ``validation_step``,
    with an `input_fn` that takes them as they are. Otherwise, or with an `input_fn` of the user's, nothing changes."""
    if input_fn is not None or val_loader is None or (example_inputs is not None and calibration_data is not None):
        return example_inputs, calibration_data, input_fn
    val_loader = first_loader(val_loader)
    try:
        with torch.random.fork_rng(devices=[]):
            first = next(iter(val_loader))
        from_batch = tuple(model_input_fn(module if submodule is None else module.get_submodule(submodule))(first))
    except Exception:  # noqa: BLE001 - a batch the default mapping cannot read: the steps say what the model takes
        from_batch = None
    reader = StepInputReader(module, submodule)
    seen = reader.read(val_loader, 1)
    step = f"{type(module).__name__}.validation_step"
    if seen is None and reader.error is not None:
        log_unreadable_step(module, reader.error, _INPUT_FN_REMEDY)
    if seen is None or (from_batch is not None and same_inputs(seen[0], from_batch)):
        return example_inputs, calibration_data, input_fn
    logger.info(f"{step} gives the model other inputs than its batches hold (it prepares them): the model is traced, "
                "timed and calibrated on the inputs that step gives it.")
    if example_inputs is None:
        example_inputs = seen[0]
    if calibration_data is None and train_loader is not None:
        recorded = reader.read(first_loader(train_loader), calibration_batches)
        if recorded is not None:
            return example_inputs, recorded, _as_given
    return example_inputs, calibration_data, input_fn


def _as_given(inputs: object) -> tuple:
    """`input_fn` for batches that already are the model's positional inputs."""
    return tuple(inputs)  # type: ignore[arg-type]


def same_inputs(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Whether two tuples of model inputs hold the same tensors (values, dtypes and shapes)."""
    return len(a) == len(b) and all(
        isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape
        and torch.equal(x, y) for x, y in zip(a, b))


def bypassed_model_message(host: nn.Module, submodule: str | None, step: str, metric: str) -> str:
    """Why a metric cannot judge a model its ``step`` never called, and which ``submodule`` to name instead."""
    holders = [name for name, child in host.named_children()
               if name != submodule and next(child.parameters(), None) is not None]
    called = "self(...)" if submodule is None else f"self.{submodule}"
    fix = f"have {step} call {called}"
    if len(holders) == 1:
        fix = f"pass submodule={holders[0]!r} (CLI: --submodule {holders[0]}), the sub-module it calls, or {fix}"
    elif holders:
        fix = f"pass the sub-module it calls as submodule= (CLI: --submodule), one of {holders}, or {fix}"
    return (f"{step} never called {called}, so {metric!r} was computed without the model under evaluation (every "
            f"candidate would score as the original): {fix}.")


def _has_submodule(module: nn.Module, path: str) -> bool:
    """Whether `path` (``"net"``, or dotted: ``"backbone.encoder"``) names a sub-module of `module`."""
    try:
        return path != "" and isinstance(module.get_submodule(path), nn.Module)
    except AttributeError:
        return False


def check_submodule_name(submodule: object, where: str) -> None:
    """At construction: `submodule` is None or a non-empty (dotted) attribute path; whether the module has it is
    checked when fitting starts, by `check_submodule`."""
    if submodule is not None and (not isinstance(submodule, str) or not submodule):
        raise TypeError(f"{where}(submodule={submodule!r}): expected the name of a sub-module of the LightningModule "
                        "(a dotted path such as 'net' or 'backbone.head'), or None for the whole module.")


def check_submodule(module: L.LightningModule, submodule: str | None, where: str, *,
                    command_line: bool = False) -> None:
    """`submodule` names a sub-module of `module`, by a dotted path too (ValueError naming its children otherwise);
    without one, `module` must have a forward of its own (a step that calls ``self.model(...)`` needs
    ``submodule="model"``). With `command_line`, `where` is the option that gave the module, and the errors name
    ``--submodule``."""
    children = [name for name, child in module.named_children() if next(child.parameters(), None) is not None]
    if submodule is not None:
        if not isinstance(submodule, str) or not _has_submodule(module, submodule):
            given = f"--submodule {submodule}" if command_line else f"{where}(submodule={submodule!r})"
            raise ValueError(f"{given}: {type(module).__name__} has no such sub-module; its sub-modules with "
                             f"parameters: {children}.")
    elif type(module).forward is L.LightningModule.forward and children:  # (no layers yet: configure_model's)
        if command_line:
            hint = f"--submodule NAME, the one they call (one of {children})"
        else:
            hint = (f"submodule={children[0]!r}" if len(children) == 1 else f"submodule= (one of {children})") \
                + ", the sub-module they call"
        raise ValueError(f"{where}: {type(module).__name__} defines no forward, so its steps call a sub-module "
                         f"(self.model(...)): pass {hint}.")


def quantize_lightning(
    module: L.LightningModule,
    config: PTQConfig | None = None,
    *,
    metric: str,
    datamodule: L.LightningDataModule | None = None,
    val_dataloaders=None,
    calibration_data: Iterable | None = None,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    input_fn: Callable[[object], tuple] | None = None,
    submodule: str | None = None,
    trainer: L.Trainer | None = None,
    mode: Literal["max", "min"] | None = None,
) -> QuantizationResult:
    """Quantize a LightningModule (or its ``submodule``), judged by its own validation ``metric``.

    Calibration data defaults to ``datamodule.train_dataloader()``; batches that are
    ``(inputs, target)`` pairs are fed as ``inputs`` (override with ``input_fn``).
    ``mode="min"`` for a lower-is-better metric (``val_loss``), as for Lightning's ``ModelCheckpoint``; a metric
    named like a loss or an error is refused without it (see :func:`~litcompress.quantization.config.
    criterion_for_metric`). A module on another device (after a GPU fit) is quantized from a CPU copy, where the
    int8 kernels run. Candidates are validated by a quiet CPU trainer of litcompress's own; a `trainer` given lends
    it its validation limits (``limit_val_batches``, ``limit_test_batches``) and is itself left as it was (its
    module, metrics and loggers: candidates' metrics are not the model's).
    """
    check_metric_name("metric", metric, "quantize_lightning", "validation_step")  # (re's "expected string")
    config = with_metric_mode(config, metric, mode, "quantize_lightning")
    module = on_the_cpu(lightning_module(module, "quantize_lightning"))
    check_submodule(module, submodule, "quantize_lightning")
    if datamodule is None and val_dataloaders is None:
        raise ValueError("quantize_lightning(datamodule=None, val_dataloaders=None): give one of them "
                         "so that candidates can be validated.")
    if datamodule is not None and not hasattr(datamodule, "val_dataloader"):  # ("no attribute 'val_dataloader'")
        raise TypeError(f"quantize_lightning(datamodule={type(datamodule).__name__}): expected a LightningDataModule; "
                        "give a validation DataLoader as val_dataloaders= (and calibration_data=) instead.")
    if trainer is not None and not isinstance(trainer, L.Trainer):  # (read after the fp32 model's evaluation)
        raise TypeError(f"quantize_lightning(trainer={trainer!r}): expected a lightning Trainer (whose "
                        "limit_val_batches and limit_test_batches the candidates' evaluations take) or None.")
    if datamodule is not None and hasattr(datamodule, "setup"):
        if hasattr(datamodule, "prepare_data"):  # as a Trainer does first: setup may read what it downloads
            datamodule.prepare_data()
        datamodule.setup("fit")
        if val_dataloaders is None:  # as trainer.validate, which judges the candidates, sets it up: a DataModule
            datamodule.setup("validate")  # may build its validation set only there (its loader failed)
    val_loader = val_dataloaders if val_dataloaders is not None else datamodule.val_dataloader()
    # a DataModule may have no training data when calibration data is given (or none at all: only validation data)
    train_loader = datamodule.train_dataloader() if datamodule is not None and calibration_data is None and (
        not isinstance(datamodule, L.LightningDataModule) or is_overridden("train_dataloader", datamodule)) else None
    empty_train = train_loader is not None and known_empty(first_loader(train_loader))
    if empty_train:  # as no training data (quantize's refusal named its own example_inputs/calibration_data)
        train_loader = None
    check_validation_batches(val_loader, "quantize_lightning",  # (a bare StopIteration)
                             example_read=example_inputs is None and calibration_data is None and train_loader is None)
    if config.approach == "static" and calibration_data is None and train_loader is None:
        # (quantize's own refusal named its calibration_data argument, which this call was not given)
        given = (f"the DataModule's train_dataloader {'is empty' if empty_train else 'is missing'}"
                 if datamodule is not None
                 else "val_dataloaders alone give no calibration data (they judge the candidates)")
        raise ValueError(f"quantize_lightning(approach='static'): {given}; static int8 calibrates its ranges on "
                         "training batches: give calibration_data=... (a DataLoader or list of batches), a DataModule "
                         "with a train_dataloader, or approach='dynamic'.")
    # a bf16-true or 64-true fit's module beside the loaders' float32 batches: evaluated in a float32 copy (before
    # its steps are run on a batch to find the model's inputs)
    module = float32_for_float32_batches(module, val_loader, input_fn, "quantize_lightning", submodule)
    example_inputs, calibration_data, input_fn = inputs_as_steps_give_them(
        module, val_loader, train_loader, example_inputs=example_inputs, calibration_data=calibration_data,
        input_fn=input_fn, submodule=submodule, calibration_batches=config.num_calibration_batches)
    if calibration_data is None and train_loader is not None:
        calibration_data = first_loader(train_loader)
    if example_inputs is None and calibration_data is None and val_loader is not None:
        # validation data alone (val_dataloaders, or a DataModule without training data): the first validation
        # batch is the example (export, latency); never calibration, which would fit the ranges to the data the
        # candidates are judged on
        batch = next(iter(first_loader(val_loader)), NO_BATCH)
        if batch is NO_BATCH:  # (a bare StopIteration) a loader without a length
            raise ValueError("quantize_lightning: the first validation dataloader gives no batch, and the example "
                             "inputs (tracing, timing) are read from it: give it batches, or example_inputs=.")
        host = module.get_submodule(submodule) if submodule else module
        example_inputs = batch_inputs(input_fn or model_input_fn(host), batch)
    if submodule:
        target = module.get_submodule(submodule)
    else:
        target = detached_copy(module)
        # Tracing/export reads every property; Lightning's `trainer` raises on an unattached module
        # unless this flag (the one Lightning's own to_torchscript sets) is on. Our copy only.
        target._jit_is_scripting = True
    if trainer is not None:  # run on a trainer of our own: validating on the user's would attach a candidate to it
        # (a limit of 0, a fit that skipped validation, would judge on nothing: the whole set then)
        trainer = internal_trainer(limit_val_batches=trainer.limit_val_batches or 1.0,
                                   limit_test_batches=trainer.limit_test_batches or 1.0)
    # val_dataloaders given with a DataModule: they validate (Lightning takes one or the other), the DataModule
    # calibrates
    eval_fn = lightning_eval_fn(module, datamodule if val_dataloaders is None else None, metric, trainer=trainer,
                                submodule=submodule, dataloaders=val_dataloaders)
    # (read as the steps give the model its batches: quantize's own reading of raw batches is not needed)
    return quantize(target, config, eval_fn=eval_fn, calibration_data=calibration_data,
                    example_inputs=example_inputs, input_fn=input_fn or model_input_fn(target))


def with_metric_mode(config: PTQConfig | None, metric: str, mode: str | None, where: str) -> PTQConfig:
    """`config` (default: ``PTQConfig()``) with its accuracy goal judging `metric` the way `mode` says."""
    config = config if config is not None else PTQConfig()
    if not isinstance(config, PTQConfig):
        raise TypeError(f"{where}(config={config!r}): expected a PTQConfig.")
    return dataclasses.replace(config, accuracy=criterion_for_metric(config.accuracy, metric, mode, where))


def quantize_checkpoint(module_class: type[L.LightningModule], checkpoint_path: str | os.PathLike,
                        config: PTQConfig | None = None, *, init_kwargs: Mapping[str, Any] | None = None,
                        **kwargs: Any) -> QuantizationResult:
    """Load ``module_class`` from a Lightning checkpoint and run :func:`quantize_lightning` on it (`kwargs`).

    `init_kwargs` go to ``module_class.__init__``, as ``load_from_checkpoint(path, **init_kwargs)`` passes them:
    arguments the checkpoint did not save (a module without ``save_hyperparameters()``), or values overriding
    those it saved."""
    from litcompress.callbacks.pruning import load_module_from_checkpoint

    if init_kwargs is not None and not isinstance(init_kwargs, Mapping):
        raise TypeError(f"quantize_checkpoint(init_kwargs={init_kwargs!r}): expected a dict of "
                        f"{module_class.__name__}.__init__ arguments.")
    # a checkpoint written while pruning with masks loads too; int8 takes the pruned weights, zeros and all
    try:
        module = load_module_from_checkpoint(module_class, os.fspath(checkpoint_path), keep_masks=False,
                                             **dict(init_kwargs or {}))
    except TypeError as error:  # __init__'s own "missing 1 required positional argument: 'hidden'"
        if not (str(error).startswith(f"{module_class.__name__}.__init__() missing") and "required" in str(error)):
            raise
        raise TypeError(f"quantize_checkpoint: {error}: the checkpoint saved no value for it (a module without "
                        "save_hyperparameters(), or another class's checkpoint): give it as init_kwargs={...}, as "
                        "the module was built.") from error
    return quantize_lightning(module, config, **kwargs)


def has_validation_data(trainer: L.Trainer) -> bool:
    """Whether this fit has validation dataloaders (given to ``fit``, or a module's ``val_dataloader``), read where
    Lightning's own check reads it; True when that place moved (the run then fails at its end, not before)."""
    try:
        return bool(trainer.fit_loop.epoch_loop.val_loop._data_source.is_defined())
    except AttributeError:
        return True


def fit_val_dataloaders(trainer: L.Trainer) -> Any:
    """The validation dataloaders of this fit: ``trainer.val_dataloaders``, which Lightning fills once its validation
    loop has run, else where that loop reads them from (those given to ``fit``, or the module's
    ``val_dataloader()``): a fit whose validation never ran (no sanity check, ``check_val_every_n_epoch`` beyond
    its epochs) still has them."""
    loaders = trainer.val_dataloaders
    if loaders is None:
        try:
            source = trainer.fit_loop.epoch_loop.val_loop._data_source
            loaders = source.dataloader() if source.is_defined() else None
        except AttributeError:  # the place moved: as before
            pass
    return loaders


def check_fit_for_fit_end_work(trainer: L.Trainer, owner: str, judged: str, instead: str) -> None:
    """Refuse, at ``setup``, a fit in which work done when fit ends would fail after all the training: one without
    validation data (its metric judges every `judged`), or one on several processes (every rank would do the work and
    write the same files; `instead` says what to run on the saved checkpoint)."""
    if not has_validation_data(trainer):
        raise ValueError(f"{owner} needs validation data, whose metric judges every {judged}: trainer.fit(model, "
                         "datamodule=...) with a val_dataloader, or trainer.fit(model, train_loader, val_loader).")
    if trainer.world_size > 1:
        raise ValueError(f"{owner} runs in a single process; after a multi-device fit, run {instead} on the saved "
                         "checkpoint.")


def warn_if_sanity_check_missed(trainer: L.Trainer, pl_module: L.LightningModule, metric: str, owner: str,
                                which: str = "the sanity-check batches", logged: dict | None = None) -> bool:
    """After the validation sanity check that starts a fit (or, `which`, the fit's first validation, where it had
    none, `logged` its metrics): warn, before the next training step, when its batches logged metrics but not
    `metric`, which is read at fit end (a misspelt name fails there). A warning, not an error: a module may log its
    metrics only outside the sanity check (``if self.trainer.sanity_checking``). Returns whether the metrics could be
    checked (some logged)."""
    logged = dict(trainer.callback_metrics) if logged is None else logged  # only the names are read
    message = missing_metric_message(metric, logged, f"{type(pl_module).__name__}.validation_step") if logged else None
    if message:
        warnings.warn(f"{owner}(metric={metric!r}) reads it when fit ends, but {which} did not log it: {message}",
                      UserWarning, stacklevel=2)
    return bool(logged)


class MetricCheckedEarly(L.Callback):
    """For a callback that reads ``self.metric`` when fit ends: a metric its validation step does not log is said
    after the sanity check, or, where none ran (``num_sanity_val_steps=0``, or its batches logged nothing), after
    the fit's first validation; it was said only at fit end, after the whole fit."""

    metric: str
    _OWNER = ""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._metric_checked = False

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._metric_checked = warn_if_sanity_check_missed(trainer, pl_module, self.metric, self._OWNER)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the metrics training logged: a name only training_step logs is not the validation's
        self._metrics_before = dict(trainer.callback_metrics)  # (the objects: a value logged anew is another)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or getattr(self, "_metric_checked", True):
            return
        before = getattr(self, "_metrics_before", {})
        logged = {name: value for name, value in trainer.callback_metrics.items() if before.get(name) is not value}
        self._metrics_before = {}
        self._metric_checked = warn_if_sanity_check_missed(trainer, pl_module, self.metric, self._OWNER,
                                                           which="the fit's first validation", logged=logged)


def check_metric_name(argument: str, metric: object, owner: str, step: str) -> None:
    """`metric` names a metric that `step` logs: a non-empty string."""
    if not isinstance(metric, str):
        example = "'test_acc'" if step == "test_step" else "'val_acc'"
        raise TypeError(f"{owner}({argument}={metric!r}): name the metric {step} logs, a str such as {example}.")
    if not metric:
        raise ValueError(f"{owner}({argument}=''): name the metric {step} logs.")


def check_output_dir(output_dir: object, owner: str) -> None:
    """At construction: `output_dir` names a folder to write to, a non-empty str or os.PathLike."""
    if not isinstance(output_dir, (str, os.PathLike)):
        raise TypeError(f"{owner}(output_dir={output_dir!r}): expected a path (a str or os.PathLike).")
    if os.fspath(output_dir) == "":
        raise ValueError(f"{owner}(output_dir=''): name a folder to write to.")
    blocking = what_is_in_the_way(Path(os.fspath(output_dir)))  # (it failed only at fit end, after all the training)
    if blocking is not None:
        raise ValueError(f"{owner}(output_dir={os.fspath(output_dir)!r}): {blocking}; give a folder to write to.")


def check_save_path(save_path: object, owner: str) -> None:
    """At construction: a path a file can be written to, not after the fit."""
    if not isinstance(save_path, (str, os.PathLike)):
        raise TypeError(f"{owner}(save_path={save_path!r}): give the path of the file to write (str or "
                        "os.PathLike), e.g. 'out/model.pt2'.")
    text = os.fspath(save_path)
    if not text or text.endswith(("/", os.sep)) or os.path.isdir(text):
        raise ValueError(f"{owner}(save_path={save_path!r}): give the path of a file to write (e.g. "
                         "'out/model.pt2'), not a folder.")
    blocking = what_is_in_the_way(Path(text).parent)
    if blocking is not None:  # (mkdir's "File exists" at setup, or at fit end)
        raise ValueError(f"{owner}(save_path={save_path!r}): {blocking}; give a path in a folder.")


def make_save_path_folder(save_path: str | os.PathLike, owner: str) -> None:
    """At setup: make `save_path`'s folder and write a temporary file in it, so that a folder that cannot be written
    fails before the fit (it failed after the fit and the search, in torch's words naming no file)."""
    why = cannot_write(Path(os.path.abspath(os.fspath(save_path))).parent)
    if why is not None:
        raise ValueError(f"{owner}(save_path={os.fspath(save_path)!r}): cannot write there ({why}); give a path in a "
                         "folder this process can write to.")


def check_fit_end_weights(weights: object, owner: str) -> None:
    """`weights` names the weights a fit-end callback works on: ``"last"`` or ``"best"``."""
    if weights not in ("last", "best"):
        raise ValueError(f"{owner}(weights={weights!r}): use 'last' (the weights the fit ends with) or 'best' (those "
                         "of the best file of the trainer's ModelCheckpoint).")


def best_checkpoint(trainer: L.Trainer) -> Any:
    """The ModelCheckpoint whose best file ``weights="best"`` reads: the trainer's first one where it monitors a
    metric, else the first that does (one without a monitor saves the latest weights, not the best: a periodic one
    listed first was read, silently), else None. One with ``save_top_k=0`` keeps no file: passed over (it was
    chosen, and the fit's last weights compressed, beside another's best file)."""
    monitored = [callback for callback in trainer.checkpoint_callbacks
                 if getattr(callback, "monitor", None) and getattr(callback, "save_top_k", 1) != 0]
    first = trainer.checkpoint_callback
    return first if first in monitored else (monitored[0] if monitored else None)


def check_best_weights_can_be_found(trainer: L.Trainer, weights: str, owner: str) -> None:
    """At ``setup``: ``weights="best"`` reads the best file of a ModelCheckpoint that monitors a metric, which must
    exist (the default one, without a monitor, saves the latest weights)."""
    if weights == "best" and best_checkpoint(trainer) is None:
        keeping_none = any(getattr(callback, "monitor", None) for callback in trainer.checkpoint_callbacks)
        found = ("has none" if trainer.checkpoint_callback is None else
                 "has none that monitors a metric and keeps a file (with save_top_k=0 it keeps none)" if keeping_none
                 else "has none that monitors a metric (without a monitor it saves the latest weights, which "
                 "weights='last' works on)")
        raise ValueError(f"{owner}(weights='best') reads the best file of the trainer's ModelCheckpoint, and this "
                         f"trainer {found}: add ModelCheckpoint(monitor=...) to its callbacks (and "
                         "enable_checkpointing=True), or use weights='last'.")


def skipped_for_fast_dev_run(trainer: L.Trainer, owner: str, verb: str) -> bool:
    """True, and said, under ``Trainer(fast_dev_run=...)``: it runs a batch of each loop to find bugs and writes no
    checkpoint or log, and a fit-end search that judges every candidate on the whole validation set, then writes a
    model, is left out in the same way."""
    if not trainer.fast_dev_run:
        return False
    logger.info(f"{owner}: skipped under fast_dev_run, which runs a batch of each loop to find bugs and writes no "
                f"checkpoint; its `result` stays None. Fit without fast_dev_run to {verb} the model.")
    return True


def fit_end_module(trainer: L.Trainer, pl_module: L.LightningModule, weights: str, owner: str) -> L.LightningModule:
    """The module a fit-end callback works on: `pl_module` as the fit ended (``"last"``), or a copy holding the
    weights of the best file of the trainer's ModelCheckpoint (``"best"``, as ``trainer.test(ckpt_path="best")`` reads
    them; a file written while pruning with masks loads too, its pruning made permanent). Where the fit left it:
    ``quantize_lightning`` and ``compress_lightning`` take a CPU copy of a module on a GPU."""
    checkpoint = best_checkpoint(trainer)
    best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
    if weights == "last":
        best_score = getattr(checkpoint, "best_model_score", None)
        # Not compared with the last logged score: it may be of earlier weights (an epoch without validation,
        # pruning after it), and a log line naming it would give these weights a score they do not have
        if best and best_score is not None:
            logger.info(f"{owner} works on the weights the fit ended with; the ModelCheckpoint's best "
                        f"({checkpoint.monitor}={float(best_score):.6g}) is in {best}: {owner}(weights='best') works "
                        "on those.")
        return pl_module
    if not best:
        warnings.warn(f"{owner}(weights='best'): the ModelCheckpoint saved no file in this fit, so the weights the fit "
                      "ended with are used.", UserWarning, stacklevel=2)
        return pl_module
    from litcompress.pruning.engine import load_pruned_state_dict, make_permanent_

    module = detached_copy(pl_module)
    # the file holds either format: plain weights, or `<name>_orig`/`<name>_mask` pairs
    make_permanent_(module, owner=owner)
    import fsspec  # (Lightning's own dependency: a ModelCheckpoint may write to s3://, gs://, memory://)

    with fsspec.open(best, "rb") as file:
        state = torch.load(file, map_location="cpu", weights_only=False)["state_dict"]  # this fit's own file
    load_pruned_state_dict(module, state, keep_masks=False)
    score = getattr(checkpoint, "best_model_score", None)
    logger.info(f"{owner} works on the weights of {best}"
                + (f" ({checkpoint.monitor}={float(score):.6g})." if score is not None else "."))
    saved, ended = _zero_weight_fraction(module), _zero_weight_fraction(pl_module)
    if saved < ended - 1e-3:
        warnings.warn(f"{owner}(weights='best'): the best file, {best}, holds weights {saved:.1%} zero, fewer than the "
                      f"{ended:.1%} the fit ended with: it was saved while pruning still went on. Let the "
                      "ModelCheckpoint save only once pruning is done (e.g. a schedule that ends earlier), or use "
                      "weights='last'.", UserWarning, stacklevel=2)
    return module


def lightning_module(module: object, where: str) -> L.LightningModule:
    """`module`, or the LightningModule a ``torch.compile`` wrapper compiles (the work is done on eager copies)."""
    inner = module
    while isinstance(inner, nn.Module) and is_compiled(inner):
        inner = inner._orig_mod
    if not isinstance(inner, L.LightningModule):
        raise TypeError(f"{where}(module=...): expected a LightningModule, got {type(module).__name__}.")
    return inner


def on_the_cpu(module: L.LightningModule) -> L.LightningModule:
    """`module` when its tensors are on the CPU; else a CPU copy (the user's module stays where it is)."""
    if not devices_off_the_cpu(module):
        return module
    return detached_copy(module).to("cpu")


def float32_for_float32_batches(module: L.LightningModule, loader: Any, input_fn: Callable[[Any], Any] | None,
                                where: str, submodule: str | None = None) -> L.LightningModule:
    """`module`, or a float32 copy of a bfloat16/float16/float64 module whose model inputs, read from `loader`'s first
    batch (by `input_fn`, else as batches are read by default), are float32 (a ``precision="bf16-true"`` or
    ``"64-true"`` fit's: Lightning cast the batches, which litcompress's trainers feed as they come, so every
    evaluation failed on mismatched dtypes after the fit). A module fed inputs of its own dtype (its data's) is left
    as it is: the int8 candidates cast their inputs to float32 themselves. The first float input decides (the
    features; a mask or a per-sample weight beside them may come in another dtype). A bfloat16/float16 module whose
    first batch cannot be read is copied too (int8 kernels take float32). The user's module is left as it is; a
    loader is read only for such a module."""
    dtypes = non_float32_dtypes(module)
    low = {dtype for dtype in dtypes if dtype != torch.float64}
    if not dtypes or (not low and loader is None):
        return module
    batch = next(iter(first_loader(loader)), None) if loader is not None else None
    floats = []
    if batch is not None:
        host = module.get_submodule(submodule) if submodule else module
        try:
            inputs = (input_fn or model_input_fn(host))(batch)  # the model's inputs, not a float64 target beside them
        except Exception:  # noqa: BLE001 - a batch only the steps can read: its tensors as they are
            inputs = batch
        floats = [t for t in torch.utils._pytree.tree_leaves(inputs)
                  if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if floats and floats[0].dtype in dtypes:  # fed its own dtype: its first float input (its features) decides,
        return module                         # not a mask or a weight beside them, in either dtype
    if not low and (not floats or batch is None):  # a float64 module and no float batch to judge by
        return module
    names = ", ".join(sorted(str(dtype).removeprefix("torch.") for dtype in dtypes))
    logger.info(f"{where}: {type(module).__name__}'s {names} weights are evaluated and compressed in a float32 copy "
                "(the loaders give float32 batches, which Lightning's fit cast; litcompress's trainers feed them as "
                "they come, and int8 kernels take float32).")
    return detached_copy(module).float()


def _zero_weight_fraction(module: nn.Module) -> float:
    """The fraction of zeros among the entries of `module`'s matrices and kernels, as computed (masks applied)."""
    from litcompress.report.sparsity import sparsity_report

    # a pruned tensor's parameter is `<name>_orig`; the report reads `<name>` as orig * mask
    targets = [(sub, name.removesuffix("_orig")) for sub in module.modules()
               for name, parameter in sub.named_parameters(recurse=False) if parameter.dim() > 1]
    return sparsity_report(module, targets).sparsity if targets else 0.0


class QuantizeOnFitEnd(MetricCheckedEarly):
    """Quantize the trained module when ``fit`` ends, judged by its validation ``metric``.

    The result is kept in ``self.result`` and, with ``save_path``, written as one artefact. ``weights="best"``
    quantizes the weights of the best file of the trainer's ``ModelCheckpoint(monitor=...)`` (as
    ``trainer.test(ckpt_path="best")`` reads them) instead of those the fit ends with (``"last"``).
    """

    def __init__(self, config: PTQConfig, metric: str, *, submodule: str | None = None,
                 save_path: str | os.PathLike | None = None, calibration_data: Iterable | None = None,
                 input_fn: Callable[[object], tuple] | None = None, mode: Literal["max", "min"] | None = None,
                 weights: Literal["last", "best"] = "last") -> None:
        if not isinstance(config, PTQConfig):
            raise TypeError(f"QuantizeOnFitEnd(config={config!r}): expected a PTQConfig.")
        check_metric_name("metric", metric, "QuantizeOnFitEnd", "validation_step")
        if save_path is not None:
            check_save_path(save_path, "QuantizeOnFitEnd")
        check_fit_end_weights(weights, "QuantizeOnFitEnd")
        check_calibration_data(calibration_data, "QuantizeOnFitEnd")
        check_submodule_name(submodule, "QuantizeOnFitEnd")
        if input_fn is not None and not callable(input_fn):  # a bare TypeError after the whole fit
            raise TypeError(f"QuantizeOnFitEnd(input_fn={input_fn!r}): expected a function of a batch that returns "
                            "the model's positional inputs.")
        config = with_metric_mode(config, metric, mode, "QuantizeOnFitEnd")  # before training, not after it
        self.config, self.metric, self.submodule, self.mode = config, metric, submodule, mode
        self.save_path, self.calibration_data, self.input_fn = save_path, calibration_data, input_fn
        self.weights = weights
        self.result: QuantizationResult | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """What would fail after training fails before it."""
        if stage != "fit":
            return
        self.result = None  # this fit's, once it ends: a fit skipped or stopped left the last one's
        check_fit_for_fit_end_work(trainer, "QuantizeOnFitEnd", "candidate",
                                   "litcompress.quantization.lightning.quantize_checkpoint (or `litcompress compress "
                                   "--checkpoint --prune none`)")
        check_best_weights_can_be_found(trainer, self.weights, "QuantizeOnFitEnd")
        # a folder that cannot be written fails here, not after the search (fast_dev_run skips the work and the file:
        # no folder for it either, as CompressOnFitEnd makes none)
        if self.save_path is not None and trainer.is_global_zero and not trainer.fast_dev_run:
            make_save_path_folder(self.save_path, "QuantizeOnFitEnd")

    _OWNER = "QuantizeOnFitEnd"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        # here, not at setup: a module's configure_model (run after setup) may build the sub-module
        check_submodule(pl_module, self.submodule, "QuantizeOnFitEnd")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # torch's generator as the fit left it: its calibration, evaluation and fine-tuning draws leave no trace on
        # what the script does next (a second model's initialisation, say)
        with torch.random.fork_rng(devices=[]):
            self._work_on_fit_end(trainer, pl_module)

    def _work_on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if skipped_for_fast_dev_run(trainer, "QuantizeOnFitEnd", "quantize"):
            return
        pl_module = fit_end_module(trainer, pl_module, self.weights, "QuantizeOnFitEnd")
        datamodule = trainer.datamodule
        # the fit's validation loaders judge, a DataModule's too: the score the fit logged is the baseline (each
        # candidate's trainer.validate(datamodule=...) set it up for "validate" anew, which may build another set)
        val_dataloaders = fit_val_dataloaders(trainer)
        calibration, example_inputs, input_fn = self.calibration_data, None, self.input_fn
        if calibration is None and datamodule is None:
            # (a bf16-true or 64-true fit's module beside float32 batches: its steps are run on a float32 copy, as
            # quantize_lightning runs them)
            pl_module = float32_for_float32_batches(pl_module, val_dataloaders, input_fn, "QuantizeOnFitEnd",
                                                    self.submodule)
            # the fit's loaders, read as its steps give the model their batches (a DataModule's: by quantize_lightning)
            train = first_loader(trainer.train_dataloader)
            example_inputs, calibration, input_fn = inputs_as_steps_give_them(
                pl_module, val_dataloaders, train, example_inputs=None, calibration_data=None, input_fn=input_fn,
                submodule=self.submodule, calibration_batches=self.config.num_calibration_batches)
            if calibration is None:  # the batches are the model's inputs: read as they are (and not checked again)
                calibration = train
                input_fn = input_fn or model_input_fn(
                    pl_module if self.submodule is None else pl_module.get_submodule(self.submodule))
        self.result = quantize_lightning(
            pl_module, self.config, metric=self.metric, datamodule=datamodule, val_dataloaders=val_dataloaders,
            calibration_data=calibration, example_inputs=example_inputs, input_fn=input_fn, submodule=self.submodule,
            mode=self.mode, trainer=trainer)  # the fit's validation limits: the metric its checkpoints scored
        if self.save_path is not None:
            self.result.save(os.fspath(self.save_path))
