"""Which TracerWarnings are passed on: those of data-dependent branches, not those of conditions guarding errors."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from litcompress.quantization.tracing import guards_an_error, tracer_warnings_that_matter


def test_guards_an_error_tells_shape_checks_from_data_dependent_branches(tmp_path):
    source = tmp_path / "code.py"
    source.write_text("if x.shape != y.shape:\n    raise AssertionError('no')\nassert x.numel() > 0\n"
                      "if h.sum() > 0:\n    h = h * 2\n")

    def caught(line):
        return warnings.WarningMessage("m", torch.jit.TracerWarning, str(source), line)

    assert [guards_an_error(caught(line)) for line in (1, 3, 4)] == [True, True, False]


class Branches(nn.Module):
    """One condition that guards an error and one that chooses what to compute."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:
            raise ValueError("too large")
        if x.mean() > 0:
            return x * 2
        return x


def test_only_the_warnings_of_data_dependent_branches_are_passed_on():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tracer_warnings_that_matter():
            torch.jit.trace(Branches(), (torch.ones(3),), check_trace=False)
            warnings.warn("something else", UserWarning)  # others inside the block are not passed on
    lines = [(w.category, w.lineno) for w in caught]
    branch = Branches.forward.__code__.co_firstlineno + 3  # the `if x.mean() > 0:` line
    assert lines == [(torch.jit.TracerWarning, branch)]
    # and torch's RNN shape checks (if ...: raise), which a bare trace warns about, are not
    for quiet in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with tracer_warnings_that_matter() if quiet else warnings.catch_warnings():
                torch.jit.trace(nn.LSTM(4, 4, batch_first=True), (torch.randn(2, 3, 4),), check_trace=False)
        assert any(issubclass(w.category, torch.jit.TracerWarning) for w in caught) != quiet
