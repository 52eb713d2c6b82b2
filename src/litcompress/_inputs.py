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
