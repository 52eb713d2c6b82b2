"""Inputs handed to a user's model: copies, so that a forward that writes into its inputs changes neither the
caller's tensors nor what the next of the library's calls sees."""

from __future__ import annotations

from typing import TypeVar

import torch
from torch.utils import _pytree as pytree

T = TypeVar("T")


def copied(inputs: T) -> T:
    """`inputs` with every tensor in it cloned (inside tuples, lists, dicts and named tuples too). A forward that
    writes into its input (an in-place first ReLU, ``x.mul_(2)``) filled the caller's example batch with inf over
    the library's repeated calls, and made its checks compare calls on different inputs."""
    return pytree.tree_map_only(torch.Tensor, torch.Tensor.clone, inputs)


def written_into(used: object, original: object) -> bool:
    """Whether a call changed `used`, a :func:`copied` of `original`: the forward writes into its inputs (a tensor
    holding NaN counts as changed: calls then take a copy each, which costs only time outside a timer)."""
    pairs = zip(pytree.tree_leaves(used), pytree.tree_leaves(original))
    return any(isinstance(a, torch.Tensor) and not torch.equal(a, b) for a, b in pairs)
