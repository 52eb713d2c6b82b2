"""TracerWarnings that say something about a traced file, told from those that do not.

Tracing (``torch.jit.trace``, the legacy ONNX exporter) warns on every Python condition it evaluates on a tensor.
Most such conditions in torch's own modules only guard an error (``if hx.size() != expected: raise ...`` in the
RNNs, the shape checks of nn.MultiheadAttention): the trace takes the one path that does not fail, and the file is
right for other inputs. A condition that chooses what to compute is kept as it was taken, which matters.
"""

from __future__ import annotations

import contextlib
import linecache
import warnings
from collections.abc import Iterator

import torch


def guards_an_error(caught: warnings.WarningMessage) -> bool:
    """Whether a warning comes from a condition that only guards an error (``if <check>: raise ...`` or an
    ``assert``). Conditions that choose what to compute (data-dependent branches) are not."""
    line = linecache.getline(caught.filename, caught.lineno).strip()
    if line.startswith("assert "):
        return True
    if not line.startswith("if "):
        return False
    for following in range(caught.lineno + 1, caught.lineno + 4):
        text = linecache.getline(caught.filename, following).strip()
        if text:
            return text.startswith("raise ")
    return False


@contextlib.contextmanager
def tracer_warnings_that_matter() -> Iterator[None]:
    """Within the block, other warnings are ignored and TracerWarnings recorded; after it, those that do not guard an
    error are warned again, where they were raised (a caller recording warnings sees them as before)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", torch.jit.TracerWarning)
        yield
    for warning in caught:
        if issubclass(warning.category, torch.jit.TracerWarning) and not guards_an_error(warning):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
