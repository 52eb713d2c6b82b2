"""Name registry for `torch.nn.utils.prune` methods and the keyword arguments each accepts."""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.utils.prune as torch_prune
from torch import Tensor

#: Pruning functions of `torch.nn.utils.prune` that can be selected by name.
PRUNING_FUNCTIONS = {
    "ln_structured": torch_prune.ln_structured,
    "l1_unstructured": torch_prune.l1_unstructured,
    "random_structured": torch_prune.random_structured,
    "random_unstructured": torch_prune.random_unstructured,
}

#: The `BasePruningMethod` class behind each function name.
PRUNING_METHODS: dict[str, type[torch_prune.BasePruningMethod]] = {
    "ln_structured": torch_prune.LnStructured,
    "l1_unstructured": torch_prune.L1Unstructured,
    "random_structured": torch_prune.RandomStructured,
    "random_unstructured": torch_prune.RandomUnstructured,
}


def is_pruning_method(obj: Any) -> bool:
    """True for a `BasePruningMethod` subclass (the class, not an instance)."""
    return inspect.isclass(obj) and issubclass(obj, torch_prune.BasePruningMethod)


def import_pruning_method(path: str) -> type[torch_prune.BasePruningMethod]:
    """The `BasePruningMethod` subclass an import path names (``mymodule.MyMethod``, as a LightningCLI config gives
    it: LightningCLI passes the path on as a string when it cannot import it); ValueError naming the import's error,
    or what the path names where that is no such class."""
    module_name, _, attribute = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except Exception as error:  # the module's own imports, errors and syntax; ValueError: '.x'
        raise ValueError(f"{path!r} is an import path, and importing it failed: {type(error).__name__}: {error}. "
                         "Give a `BasePruningMethod` subclass your Python path can import, or one of "
                         f"{sorted(PRUNING_METHODS)}.") from error
    if not is_pruning_method(found):
        raise ValueError(f"{path!r} is {found!r}, not a `torch.nn.utils.prune.BasePruningMethod` subclass: give one, "
                         f"or one of {sorted(PRUNING_METHODS)}.")
    return found


def is_import_path(method: object) -> bool:
    """Whether `method` is a string naming a method by its import path rather than a built-in name."""
    return isinstance(method, str) and "." in method and method.lower() not in PRUNING_METHODS


def resolve_method(method: str | type[torch_prune.BasePruningMethod]) -> type[torch_prune.BasePruningMethod]:
    """The `BasePruningMethod` class for a function name, an import path (``mymodule.MyMethod``) or a class."""
    if is_import_path(method):
        return import_pruning_method(method)
    if isinstance(method, str):
        try:
            return PRUNING_METHODS[method.lower()]
        except KeyError:
            raise ValueError(
                f"Unknown pruning method {method!r}: choose one of {sorted(PRUNING_METHODS)} "
                "or pass a `torch.nn.utils.prune.BasePruningMethod` subclass."
            ) from None
    if is_pruning_method(method):
        return method
    if isinstance(method, torch_prune.BasePruningMethod):
        hint = "HINT: pass the class, not an instance."
    elif isinstance(method, numbers.Real) and not isinstance(method, bool):  # prune_model_(model, 0.5)
        hint = "A number is how much to prune, not how: give the method first (e.g. 'l1_unstructured')."
    else:
        hint = f"Choose one of {sorted(PRUNING_METHODS)}."
    raise TypeError(f"method={method!r}: expected a pruning method name or a `BasePruningMethod` subclass. {hint}")


def _parameter_names(fn: Any) -> tuple[set[str], bool]:
    """Named parameters of `fn` and whether it takes ``**kwargs``; (empty, False) when it has no signature."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set(), False
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names - {"self", "cls", "module", "name"}, any(p.kind is p.VAR_KEYWORD for p in params)


def _names_taken(method: type[torch_prune.BasePruningMethod]) -> tuple[set[str], bool]:
    """The keyword names `method` takes, its constructor's and its own ``apply``'s, and whether either takes any."""
    names, takes_any = _parameter_names(method)
    if method.apply.__func__ is not torch_prune.BasePruningMethod.apply.__func__:  # type: ignore[attr-defined]
        apply_names, apply_takes_any = _parameter_names(method.apply)
        names, takes_any = names | apply_names, takes_any or apply_takes_any
    return names, takes_any


def accepted_kwargs(
    method: type[torch_prune.BasePruningMethod], kwargs: Mapping[str, Any], *, via_apply: bool = False
) -> dict[str, Any]:
    """The subset of `kwargs` that `method` takes: its constructor's, or with ``via_apply`` its ``apply``'s.

    Custom methods declare what they need (`amount`, `dim`, `n`, ...); passing them more fails in torch.
    The base ``apply`` forwards its extra kwargs to the constructor.
    """
    names, takes_any = _parameter_names(method)
    if via_apply and method.apply.__func__ is not torch_prune.BasePruningMethod.apply.__func__:
        apply_names, apply_takes_any = _parameter_names(method.apply)
        # (an apply taking **kwargs hands them on to torch's, which takes the scores itself)
        names, takes_any = ((names | apply_names | {"importance_scores"}, takes_any) if apply_takes_any
                            else (apply_names, False))
    elif via_apply:  # torch's own apply takes the scores itself, whatever the constructor takes
        names = names | {"importance_scores"}
    return dict(kwargs) if takes_any else {k: v for k, v in kwargs.items() if k in names}


def required_kwargs(method: type[torch_prune.BasePruningMethod]) -> set[str]:
    """The arguments `method` cannot do without besides ``amount``: the parameters without a default of its
    constructor and of its own ``apply`` (``LnStructured`` needs ``n`` and ``dim``)."""
    functions: list[Any] = [method]
    if method.apply.__func__ is not torch_prune.BasePruningMethod.apply.__func__:  # type: ignore[attr-defined]
        functions.append(method.apply)
    required: set[str] = set()
    for function in functions:
        try:
            params = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):
            continue
        required |= {p.name for p in params
                     if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return required - {"self", "cls", "module", "name", "amount", "importance_scores"}


def takes_amount(method: type[torch_prune.BasePruningMethod]) -> bool:
    """Whether `method` is told how much to prune: its constructor (or its own ``apply``) takes ``amount`` or any
    keyword. A method without one (a fixed threshold) prunes what it decides, whatever a schedule asks."""
    names, takes_any = _names_taken(method)
    return takes_any or "amount" in names


def check_takes_amount(method: type[torch_prune.BasePruningMethod], owner: str) -> None:
    """TypeError when `method` takes no ``amount``: a schedule's target sparsity would be dropped silently."""
    if not takes_amount(method):
        raise TypeError(f"{owner}: {method.__name__} takes no `amount`, so it cannot be brought to a target "
                        "sparsity (the schedule's targets would be ignored); give its __init__ an `amount` "
                        "parameter (a fraction or count of the remaining entries, as torch's methods take), or "
                        "apply it once with torch.nn.utils.prune / litcompress.prune_.")


def check_slices_exist(method: type[torch_prune.BasePruningMethod], ndims: Iterable[tuple[str, int]],
                       owner: str) -> None:
    """ValueError when a structured `method` is to prune a target without slices, a 1-d tensor (a bias, a norm's
    scale): torch refuses it only at the first round. `ndims` holds each target's name and dimensions."""
    if getattr(method, "PRUNING_TYPE", None) != "structured":
        return
    flat = list(dict.fromkeys(name for name, ndim in ndims if ndim < 2))
    if flat:
        raise ValueError(f"{owner}: {method.__name__} prunes whole slices (rows, channels) of multidimensional "
                         f"tensors, but {', '.join(flat[:4])}{' ...' if len(flat) > 4 else ''} has one dimension; "
                         "leave the biases and norm scales out of the targets (name the layers whose weights have "
                         "rows or channels, e.g. the Linear and Conv layers).")


def is_ln_norm(value: object) -> bool:
    """Whether torch's ``ln_structured`` takes `value` as its norm ``n``: a number (0, -inf and negative ones too) or
    'fro' / 'nuc' (whether a tensor's shape suits a matrix norm is for the caller to check, on the model)."""
    return (isinstance(value, str) and value in ("fro", "nuc")) or (
        isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value))


def norm_refusal(tensor: Tensor, norm: object, dim: int) -> str | None:
    """torch's words when it cannot rank `tensor`'s slices along `dim` by the norm `norm` over the other
    dimensions ('fro' and 'nuc' need exactly two of them), else None. Checked on the model, before any round."""
    others = [d for d in range(tensor.dim()) if d != dim % tensor.dim()]
    try:
        torch.norm(tensor.detach(), p=norm, dim=others)
    except (RuntimeError, ValueError) as error:
        return str(error).rstrip(".")
    return None


def check_near_misses(method: type[torch_prune.BasePruningMethod], kwargs: Mapping[str, Any], owner: str) -> None:
    """Refuse a keyword `method` does not take that is a near miss of one it does (``importance_score``, ``dimm``):
    the engine passes a method only the arguments it takes (one call can serve several methods), so the misspelt
    one would be dropped without a word, or the one it stands for found missing inside torch."""
    names, takes_any = _names_taken(method)
    if takes_any:
        return
    known = (names - {"amount"}) | {"importance_scores"}
    for key in kwargs:
        close = [] if key in known else difflib.get_close_matches(key, sorted(known), n=2, cutoff=0.75)
        if close:
            raise TypeError(f"{owner}: {method.__name__} takes no {key!r}: did you mean "
                            f"{' or '.join(map(repr, close))}? (It takes {', '.join(sorted(known))}.)")


def structured_dim(method: type[torch_prune.BasePruningMethod], kwargs: Mapping[str, Any]) -> int | None:
    """The dimension whose slices a structured `method` prunes, given the keyword arguments it will be built with:
    the ``dim`` an instance built with them holds (what torch's pruning container reads), else the default of the
    ``dim`` its constructor (or, through ``**kwargs``, a base class's) takes; None for a method without one."""
    given = accepted_kwargs(method, {k: v for k, v in kwargs.items() if k not in ("importance_scores", "slice_groups")})
    try:
        dim = getattr(method(amount=0.5, **given), "dim", None)
    except Exception:  # noqa: BLE001 - an argument it needs is missing here: read its signature instead
        dim = None
    if dim is None:
        for klass in method.__mro__:
            init = vars(klass).get("__init__")
            if init is None:
                continue
            try:
                parameters = inspect.signature(init).parameters
            except (TypeError, ValueError):
                break
            if "dim" in parameters:
                dim = given.get("dim", parameters["dim"].default)
                break
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
                break  # (no `dim` reaches a base class's constructor)
    return dim if isinstance(dim, numbers.Integral) and not isinstance(dim, bool) else None


def check_countable_slices(method: type[torch_prune.BasePruningMethod], kwargs: Mapping[str, Any],
                           owner: str) -> None:
    """Refuse a structured `method` without a ``dim`` where a sparsity target is reached by counting its slices
    (schedules, ``prune_to_sparsity_``): they were counted along the last dimension whichever it pruned, and its
    targets missed, or emptied, silently."""
    if getattr(method, "PRUNING_TYPE", None) == "structured" and structured_dim(method, kwargs) is None:
        raise TypeError(f"{owner}: {method.__name__} is structured (PRUNING_TYPE = 'structured') but has no `dim`: "
                        "the slices it prunes cannot be counted to reach a sparsity target (and torch's second round "
                        "on a tensor fails without it); give its __init__ a `dim` parameter stored as `self.dim` (the "
                        "dimension whose slices it prunes, e.g. dim=0 for rows).")


def check_method_kwargs(method: type[torch_prune.BasePruningMethod], kwargs: Mapping[str, Any], owner: str, *,
                        ndims: Iterable[int] = (), also: Iterable[str] = (), others_ok: bool = False) -> None:
    """Refuse, before any pruning, arguments `method` would fail on at its first round or would drop silently: a
    name neither its constructor nor its ``apply`` takes (close matches among those and `also`, the caller's own
    keywords; `others_ok`: names for other methods pass, as the engine's functions drop them), a required one
    missing (``LnStructured``'s ``n`` and ``dim``), a ``dim`` outside every tensor's dimensions (`ndims`), a norm
    torch's ``ln_structured`` does not know. ``slice_groups`` (for structured methods) is the engine's and checked
    where its keys are known."""
    names, takes_any = _names_taken(method)
    structured = getattr(method, "PRUNING_TYPE", None) == "structured"
    known = (names - {"amount", "importance_scores"}) | ({"slice_groups"} if structured else set())
    if others_ok and not takes_any:
        kwargs = {k: v for k, v in kwargs.items() if k in known}  # another method's `dim` is not this one's
    unknown = [] if takes_any else [k for k in kwargs if k not in known]
    if unknown:
        candidates = sorted(known | set(also))
        hints = [f"{k!r}: did you mean {' or '.join(map(repr, close))}?" for k in unknown
                 for close in [difflib.get_close_matches(k, candidates, n=2)] if close]
        raise TypeError(f"{owner}: {method.__name__} takes no {', '.join(map(repr, unknown))}"
                        f"{' (' + '; '.join(hints) + ')' if hints else ''}; it takes "
                        f"{', '.join(sorted(known)) or 'no other arguments'}.")
    missing = sorted(required_kwargs(method) - set(kwargs))
    if missing:
        example = {"dim": "dim=0 (output channels)", "n": "n=2 (the L2 norm)"}
        raise TypeError(f"{owner}: {method.__name__} needs {', '.join(map(repr, missing))}: pass "
                        f"{', '.join(example.get(m, f'{m}=...') for m in missing)}.")
    if "dim" in kwargs:
        dim = kwargs["dim"]
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise TypeError(f"{owner}: dim={dim!r}: expected an int (0: output channels, rows).")
        short = sorted({n for n in ndims if not -n <= dim < n})
        if short:
            raise ValueError(f"{owner}: dim={dim} is not a dimension of every tensor pruned (some have "
                             f"{' or '.join(map(str, short))}); 0 prunes output channels (rows).")
    if "n" in kwargs and structured:
        norm = kwargs["n"]
        if not is_ln_norm(norm):
            raise ValueError(f"{owner}: n={norm!r}: expected a number (1, 2, float('inf'), ...) or 'fro' or 'nuc', "
                             "as torch's ln_structured takes.")
