"""``torch.export`` archives (``.pt2``) with litcompress's metadata inside: the format of the torchao backends and
of unquantized (fp32) models.

TorchScript (``torch.jit.trace``/``save``) is deprecated in torch 2.13; an exported program is its replacement.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
import zipfile

import torch
from torch import nn

from . import Inputs

METADATA_FILE = "litcompress.json"


def export_inputs(example_inputs: Inputs) -> Inputs:
    """Example inputs fit to export: a batch of 1 becomes 2 (torch.export specialises a size-1 dimension, a batch of
    2 keeps it dynamic)."""
    return tuple(torch.cat([t, t]) if t.dim() > 0 and t.shape[0] == 1 else t for t in example_inputs)


def batch_dynamic_shapes(inputs: Inputs) -> tuple:
    """A dynamic first (batch) dimension for every tensor input."""
    from torch.export import Dim

    return tuple({0: Dim.AUTO} if t.dim() > 0 else None for t in inputs)


def save_program(module: nn.Module, path: str | os.PathLike, metadata: str, example_inputs: Inputs, *,
                 eval_mode: bool = True) -> None:
    """Export a copy of `module` (with a dynamic batch dimension) and save it to `path` with `metadata` inside.

    `eval_mode=False` exports the module in the mode it is in: a graph that was itself exported refuses ``eval()``.
    """
    inputs = export_inputs(example_inputs)
    module = copy.deepcopy(module)
    if eval_mode:
        module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, inputs, dynamic_shapes=batch_dynamic_shapes(inputs))
    program.example_inputs = None  # else the archive carries the example batch (as large as a small model)
    torch.export.save(program, os.fspath(path), extra_files={METADATA_FILE: metadata})


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

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def forward(self, *args: torch.Tensor) -> object:
        return self.program(*args)

    def train(self, mode: bool = True) -> ExportedInference:
        self.training = mode
        return self


def load_program(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Load an archive written by :func:`save_program`: the runnable module and its metadata."""
    metadata = read_metadata(path)
    if metadata.get("recipe") is not None:
        from .pt2e import PT2EBackend

        PT2EBackend().check_available()  # imports torchao, registering the ops its int8 programs call
    return ExportedInference(torch.export.load(os.fspath(path)).module()), metadata
