"""Configuration numbers given as other real numbers (numpy's ``float32(0.9)``, ``int64(100)``: what a sweep over
``np.linspace`` or a value read from an array gives) taken as the Python numbers they stand for."""

from __future__ import annotations

import dataclasses
import numbers


def python_numbers_(config: object) -> None:
    """Turn the real-number fields of a (frozen) dataclass that are not Python's own ``int``/``float`` (numpy's
    ``float64``, a ``float`` subclass, too) into them, in place, so that its checks (``isinstance(x, int)``) and what
    it saves (checkpoints, JSON) see one kind. Booleans (numpy's too, which are not numbers) stay as they are: the
    checks refuse them where a number is due."""
    for spec in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, spec.name)
        if isinstance(value, numbers.Real) and type(value) not in (bool, int, float):  # numpy's float64 is a float
            object.__setattr__(config, spec.name, as_python_number(value))


def is_bool(value: object) -> bool:
    """A bool, or numpy's (a flag read from a config or an array)."""
    return isinstance(value, bool) or (type(value).__name__ in ("bool", "bool_") and type(value).__module__ == "numpy")


def as_python_number(value: object) -> object:
    """`value` as Python's ``int``/``float`` where it is another real number (numpy's ``int64(3)``, ``float32(0.2)``:
    0.2, the number it prints as, not float32's 0.20000000298..., which a resume given 0.2 would not match); anything
    else (booleans, numpy's too, strings, callables) as it is, for the caller's checks to judge."""
    exact = exact_python_number(value)
    if exact is value or not isinstance(exact, float):  # (not another real number, or an integer)
        return exact
    try:
        printed = float(str(value))
    except ValueError:  # (a Fraction prints as 1/3)
        return exact
    return printed if type(value)(printed) == value else exact


def exact_python_number(value: object) -> object:
    """A real number as Python's ``int``/``float`` of exactly its value (numpy's ``float32(0.3)`` as
    0.30000001192...: a value used as it was, saved where weights-only loading reads it); anything else as it is."""
    if isinstance(value, numbers.Real) and type(value) not in (bool, int, float):
        return int(value) if isinstance(value, numbers.Integral) else float(value)
    return value
