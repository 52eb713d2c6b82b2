"""``torch.export`` archives (``.pt2``) with litcompress's metadata inside: the format of the torchao backends and
of unquantized (fp32) models.

TorchScript (``torch.jit.trace``/``save``) is deprecated in torch 2.13; an exported program is its replacement.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
import zipfile
from collections.abc import Callable

import torch
from torch import nn

from litcompress._inputs import copied
from litcompress.pruning.engine import deepcopy_model

from ..outputs import RebuiltOutputs, Structure, tensor_leaves_of, untraceable_structure
from ..shapes import (DynamicDims, describe_fixed, export_dynamic_shapes, export_specialised_dims, fixed_size_hint,
                      grouped_as_forward_takes, grown_along_batch)
from . import FixedDimError, Inputs

METADATA_FILE = "litcompress.json"
OUTPUTS_FILE = "litcompress_outputs.json"  # the output structure, when the program returns its tensors flat


def export_inputs(example_inputs: Inputs, module: nn.Module) -> Inputs:
    """Example inputs fit to export: an input whose first dim is 1 gets 2 rows (torch.export specialises a size-1
    dimension, a batch of 2 keeps it dynamic), where `module` runs on it doubled, one at a time (a one-element input
    that is no batch, a temperature ``torch.tensor([2.0])`` the model broadcasts, stays as it is, and a batch of 1
    beside it is doubled all the same)."""
    ones = [i for i, t in enumerate(example_inputs) if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == 1]

    def doubled(indices: set[int]) -> Inputs:
        return tuple(torch.cat([t, t]) if i in indices else t for i, t in enumerate(example_inputs))

    every = doubled(set(ones))
    if not ones or _takes(module, every):
        return every
    kept: set[int] = set()
    for i in ones:
        if _takes(module, doubled(kept | {i})):
            kept.add(i)
    return doubled(kept)


def export_program(module: nn.Module, example_inputs: Inputs,
                   dynamic_dims: DynamicDims | None) -> torch.export.ExportedProgram:
    """``torch.export`` `module` on `example_inputs` (a first dim of 1 doubled: :func:`export_inputs`) leaving
    `dynamic_dims` free (None: the batch dims); raises :class:`FixedDimError` when the model's code fixes one of them
    (the batch only if `module` takes another).

    A program exported on doubled inputs must take the inputs given: one that does not (an input that only
    broadcast by chance when doubled, a temperature of 2 elements beside 2 features, had its size fixed at 2) is
    exported again on them as given, where the check below refuses what it cannot tell apart from a fixed batch."""
    inputs = export_inputs(example_inputs, module)
    program = _exported(module, inputs, dynamic_dims)
    if any(a is not b for a, b in zip(inputs, example_inputs)) and not _takes(program.module(), example_inputs):
        inputs, program = tuple(example_inputs), _exported(module, tuple(example_inputs), dynamic_dims)
    fixed = export_specialised_dims(program, inputs, dynamic_dims)
    if any(d == 0 for _, d, _ in fixed) and not _takes(module, grown_along_batch(inputs, dynamic_dims)):
        fixed = [f for f in fixed if f[1] != 0]  # the model's own code needs the example's batch size
    if fixed:
        raise FixedDimError(f"torch.export fixed {describe_fixed(fixed)}, which must stay free (the batch, a dim "
                            "that varies in the data or one declared in dynamic_dims): the model's code fixes it "
                            "there (an RNN unrolls over its sequence length, for one)")
    return program


def _exported(module: nn.Module, inputs: Inputs, dynamic_dims: DynamicDims | None) -> torch.export.ExportedProgram:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(module, inputs, dynamic_shapes=grouped_as_forward_takes(
            module, export_dynamic_shapes(inputs, dynamic_dims)))


def _takes(module: nn.Module, inputs: Inputs | None) -> bool:
    """Whether `module` runs on `inputs`; its buffers as they were either way (a module in training mode probed on a
    grown batch would move its batch norms' statistics)."""
    if inputs is None:
        return False
    saved = {name: buffer.clone() for name, buffer in module.named_buffers()}
    try:  # (a probe in training mode draws dropout masks: the random streams are left as they were)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            module(*copied(inputs))
    except Exception:
        return False
    finally:
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                if name in saved and buffer.shape == saved[name].shape:
                    buffer.copy_(saved[name])
    return True


def save_program(module: nn.Module, path: str | os.PathLike, metadata: str, example_inputs: Inputs, *,
                 eval_mode: bool = True, dynamic_dims: DynamicDims | None = None,
                 outputs: Structure | None = None) -> None:
    """Export a copy of `module` (leaving the batch dims and `dynamic_dims` free) and save it to `path` with
    `metadata` inside. An output torch.export cannot return (a dataclass) is exported flat, with its structure
    (`outputs`, found by running `module` when it is in eval mode) in the archive, and rebuilt by `load_program`.

    `eval_mode=False` exports the module in the mode it is in: a graph that was itself exported refuses ``eval()``.
    """
    module = deepcopy_model(module)
    inputs = tuple(example_inputs)
    if eval_mode:
        module.eval()
        outputs = outputs or untraceable_structure(module, inputs)
    if outputs is not None:
        module = tensor_leaves_of(module, inputs)
    program = export_program(module, inputs, dynamic_dims)
    program.example_inputs = None  # else the archive carries the example batch (as large as a small model)
    extra = {METADATA_FILE: metadata}
    if outputs is not None:
        extra[OUTPUTS_FILE] = json.dumps(outputs)
    if hasattr(path, "write"):  # (an in-memory file: `loaded_as_its_file`)
        torch.export.save(program, path, extra_files=extra)
        return
    with open(path, "wb") as file:  # a file object: torch warns of a path whose name does not end in .pt2
        torch.export.save(program, file, extra_files=extra)


def loaded_as_its_file(save: Callable[[io.BytesIO], None]) -> nn.Module:
    """What the ``.pt2`` file `save` writes runs once loaded, written to and read from memory: the form a search
    times (torchao's eager weight-only model ran a 64-32-10 MLP 4x faster than its loaded program, pt2e's converted
    graph 1.25x), as :func:`load_program` rebuilds it."""
    buffer = io.BytesIO()
    save(buffer)
    buffer.seek(0)
    extra = {OUTPUTS_FILE: ""}
    module: nn.Module = ExportedInference(torch.export.load(buffer, extra_files=extra).module())
    return RebuiltOutputs(module, json.loads(extra[OUTPUTS_FILE])) if extra[OUTPUTS_FILE] else module


def save_loaded_program(module: nn.Module, path: str | os.PathLike, metadata: str, example_inputs: Inputs, *,
                        dynamic_dims: DynamicDims | None = None) -> bool:
    """Save `module` again if it is what :func:`load_program` returns (its graph, already an eval-mode export, with
    the output structure it is rebuilt to); False, saving nothing, for any other module."""
    structure = None
    if isinstance(module, RebuiltOutputs) and isinstance(module.model, ExportedInference):
        structure, module = module.structure, module.model
    if not isinstance(module, ExportedInference):
        return False
    save_program(module.program, path, metadata, example_inputs, eval_mode=False, dynamic_dims=dynamic_dims,
                 outputs=structure)
    return True


def read_metadata(path: str | os.PathLike) -> dict:
    """The litcompress metadata of a ``.pt2`` archive, read without loading its program (whose operators may need a
    library imported first)."""
    with zipfile.ZipFile(path) as archive:
        name = next((n for n in archive.namelist() if n.endswith(f"extra/{METADATA_FILE}")), None)
        if name is None:
            raise ValueError(f"{os.fspath(path)} is a torch.export archive but not a litcompress artefact.")
        return json.loads(archive.read(name))


class ExportedInference(nn.Module):
    """An exported graph (``torch.export``, or a PT2E conversion of one) as an ordinary inference module.

    torch's exported modules refuse ``eval()`` and ``train()``, which callers (and Lightning) routinely invoke, also
    on a parent module. The graph was exported in eval mode and stays so: here those calls only set the flag.
    """

    def __init__(self, program: nn.Module, dims_declared_in: str | None = "PTQConfig") -> None:
        super().__init__()
        self.program = program
        self.dims_declared_in = dims_declared_in  # where an input size it refuses is said to be declared (None: a
        # file read back, which PTQ, QAT or the pipeline may have written)

    def forward(self, *args: torch.Tensor) -> object:
        try:
            return self.program(*args)
        except (AssertionError, RuntimeError) as error:  # torch.export's guard: "Guard failed: x.size()[1] == 5"
            said = str(error)
            graph = getattr(self.program, "graph", None)
            names = [node.name for node in graph.nodes if node.op == "placeholder"] if graph is not None else []
            guarded = re.search(r"Guard failed: (\w+)\.size\(\)", said)
            if guarded and guarded[1] in names:  # the guard names forward's argument: the hint gives its index
                said = said.replace(guarded[0], f"Guard failed: input_{names.index(guarded[1])}.size()", 1)
            hint = fixed_size_hint(said, self.dims_declared_in)
            if hint is None:
                raise
            shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]
            raise ValueError(f"inputs of shapes {shapes} ({error}): {hint}.") from None

    def train(self, mode: bool = True) -> ExportedInference:
        self.training = mode
        return self


def load_program(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Load an archive written by :func:`save_program`: the runnable module and its metadata."""
    metadata = read_metadata(path)
    if metadata.get("recipe") is not None:
        from .pt2e import PT2EBackend

        PT2EBackend().check_available()  # imports torchao, registering the ops its int8 programs call
    extra = {OUTPUTS_FILE: ""}
    with open(path, "rb") as file:  # (as saved: any file name, a `model.int8` too, without torch's warning)
        module: nn.Module = ExportedInference(torch.export.load(file, extra_files=extra).module(), None)
    if extra[OUTPUTS_FILE]:
        module = RebuiltOutputs(module, json.loads(extra[OUTPUTS_FILE]))
    return module, metadata
