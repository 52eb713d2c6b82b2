"""Attention heads: rank, prune (mask) and remove the heads of ``nn.MultiheadAttention``.

A head of an attention with packed projections (``in_proj_weight``: the query, key and value rows of every head,
``out_proj``: one block of columns per head) adds ``out_proj[:, head] @ (softmax(q k^T) v)`` to the output. When its
value rows and value bias are zero, it adds exactly nothing, whatever its query and key: removing it changes no
output. Pruning a head zeroes its query, key and value rows (and biases); :func:`remove_zero_heads_` replaces each
attention that has such heads with a :class:`HeadPrunedAttention` holding the others, which computes what
``nn.MultiheadAttention`` computes (same arguments and masks) with ``heads x head_dim`` inner channels instead of
``embed_dim``: fewer projection rows, fewer ``out_proj`` columns, less attention work.

``nn.MultiheadAttention`` cannot hold fewer heads than its width allows, hence the replacement module. Attention
layers with ``add_bias_kv``, ``add_zero_attn`` or separate key/value widths are left alone (said in the report).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .engine import apply_mask_, check_fraction, check_module_names, effective_tensor, is_excluded
from .schedules import block_multiple, check_channel_multiple, kept_multiple, structured_pruned_count

__all__ = ["HeadPrunedAttention", "HeadShrink", "attention_head_norms", "prunable_attentions", "prune_heads_",
           "remove_zero_heads_", "zero_heads"]


def decode_kept_heads(state: Tensor) -> tuple[int, tuple[int, ...]]:
    """``(original_heads, kept_heads)`` from a :class:`HeadPrunedAttention`'s ``_extra_state``."""
    values = [int(v) for v in state.flatten().tolist()]
    return values[0], tuple(values[1:])


class HeadPrunedAttention(nn.Module):
    """Multi-head attention with `num_heads` heads of `head_dim` channels on an `embed_dim`-wide stream: what
    ``nn.MultiheadAttention`` computes (same ``forward`` arguments, masks and outputs) when its inner width,
    ``num_heads * head_dim``, may be smaller than `embed_dim`. Built by :func:`remove_zero_heads_`.

    `original_heads` is the head count of the attention it replaces: a 3-D ``attn_mask`` (one ``(L, S)`` mask per
    batch item and original head) is read for the kept heads, `kept_heads`.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, bias: bool = True, dropout: float = 0.0,
                 batch_first: bool = False, original_heads: int | None = None,
                 kept_heads: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if num_heads < 1 or head_dim < 1:
            raise ValueError(f"HeadPrunedAttention needs num_heads >= 1 and head_dim >= 1, got {num_heads}, "
                             f"{head_dim}.")
        inner = num_heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.original_heads = original_heads if original_heads is not None else num_heads
        self.kept_heads = tuple(kept_heads) if kept_heads is not None else tuple(range(num_heads))
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        # Read by nn.TransformerEncoderLayer / DecoderLayer to choose their fused fast path, which assumes torch's
        # own attention: these values turn it off (the layer then calls this module).
        self._qkv_same_embed_dim = False
        self.in_proj_weight = None
        self.in_proj_bias = None

    def get_extra_state(self) -> Tensor:
        """Which heads of the original attention it kept, ``[original_heads, *kept_heads]``: in its ``state_dict``
        (as ``_extra_state``; a tensor, which exporters that read the state dict take as they take weights), so
        that :func:`~litcompress.pruning.narrow.load_shrunk_state_dict` can rebuild it in a model built with torch's
        attention."""
        return torch.tensor([self.original_heads, *self.kept_heads], dtype=torch.int64)

    def set_extra_state(self, state: Tensor) -> None:
        original_heads, kept = decode_kept_heads(state)
        if len(kept) != self.num_heads:
            raise ValueError(f"HeadPrunedAttention: the state keeps heads {list(kept)}, but this module has "
                             f"{self.num_heads} head(s).")
        self.original_heads, self.kept_heads = original_heads, kept

    @property
    def kdim(self) -> int:
        return self.embed_dim

    @property
    def vdim(self) -> int:
        return self.embed_dim

    def _heads_mask(self, attn_mask: Tensor, batch: int) -> Tensor:
        """A 3-D mask ``(batch * original_heads, L, S)`` for the kept heads: ``(batch, heads, L, S)``."""
        mask = attn_mask.reshape(batch, self.original_heads, *attn_mask.shape[-2:])
        if self.num_heads != self.original_heads:
            mask = mask[:, list(self.kept_heads)]
        return mask

    def _on_torchs_fast_path(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None) -> bool:
        """Whether torch's attention, as it was, would run a call without an attn_mask on its fused inference path
        (which does not read ``is_causal``), by the conditions of torch's ``MultiheadAttention.forward``: batched
        self-attention in eval mode, batch first, an even head count, no float padding mask, no autocast, and no
        gradient asked for (grad off, or nothing that requires it)."""
        if (key_padding_mask is not None and key_padding_mask.is_floating_point()) or \
                not torch.backends.mha.get_fastpath_enabled():
            return False
        if query.dim() != 3 or query is not key or key is not value or query.dtype != self.q_proj.weight.dtype:
            return False
        if self.q_proj.bias is None:  # (torch's fused call needs the projections' biases)
            return False
        if self.training or self.original_heads % 2 or not self.batch_first or torch.is_autocast_enabled():
            return False
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, *self.parameters())))

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if is_causal and attn_mask is None:  # is_causal is a hint about the mask, not one: as torch's attention,
            # ignored where torch's fused inference path would take the call, refused (in torch's words) elsewhere
            if not self._on_torchs_fast_path(query, key, value, key_padding_mask):
                raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                                   "module method `generate_square_subsequent_mask` to create this mask.")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self.batch_first and not unbatched:  # work in (batch, length, embed)
            q_in, k_in, v_in = query, key, value
        else:
            q_in, k_in, v_in = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, target, source = q_in.shape[0], q_in.shape[1], k_in.shape[1]

        def heads(x: Tensor, length: int) -> Tensor:
            return x.reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        q = heads(self.q_proj(q_in), target)
        k = heads(self.k_proj(k_in), source)
        v = heads(self.v_proj(v_in), source)

        mask = _additive_mask(attn_mask, q.dtype)
        if mask is not None:
            mask = self._heads_mask(mask, batch) if mask.dim() == 3 else mask  # (L, S) broadcasts
        if key_padding_mask is not None:
            padding = _additive_mask(key_padding_mask, q.dtype).reshape(batch, 1, 1, source)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0

        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / self.head_dim ** 0.5)
            if mask is not None:
                scores = scores + mask
            # the weights returned are those attended with, after dropout (as torch's)
            weights = F.dropout(scores.softmax(dim=-1), dropout, training=self.training)
            attended = weights @ v
        else:
            weights = None
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.out_proj(attended.transpose(1, 2).reshape(batch, target, self.num_heads * self.head_dim))
        if not (self.batch_first and not unbatched):
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if unbatched:
                weights = weights.squeeze(0)
        return out, weights


def _additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """nn.MultiheadAttention's masks as additive float masks: True (bool) means "may not attend"."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _why_not(attention: nn.MultiheadAttention) -> str | None:
    """Why this attention's heads cannot be pruned or removed, or None."""
    if not attention._qkv_same_embed_dim:
        return "its keys and values have their own widths (kdim/vdim)"
    if attention.bias_k is not None:
        return "it adds learned key/value biases (add_bias_kv)"
    if attention.add_zero_attn:
        return "it adds a zero attention slot (add_zero_attn)"
    return None


def _head_rows(attention: nn.MultiheadAttention, head: int) -> list[int]:
    """The rows of ``in_proj_weight`` (query, key, value) that belong to `head`."""
    embed, width = attention.embed_dim, attention.head_dim
    return [part * embed + head * width + i for part in range(3) for i in range(width)]


def attention_head_norms(attention: nn.MultiheadAttention) -> Tensor:
    """Each head's importance: the L2 norm of its query, key and value rows and its ``out_proj`` columns."""
    # effective values: a pruned `module.<name>` is the tensor of the last forward, older than the last optimizer step
    with torch.no_grad():
        weight = effective_tensor(attention, "in_proj_weight")
        embed, heads, width = attention.embed_dim, attention.num_heads, attention.head_dim
        rows = weight.reshape(3, heads, width, embed).pow(2).sum(dim=(0, 2, 3))
        columns = effective_tensor(attention.out_proj, "weight").reshape(embed, heads, width).pow(2).sum(dim=(0, 2))
        return (rows + columns).sqrt()


def zero_heads(attention: nn.MultiheadAttention) -> Tensor:
    """A bool per head: True when its value rows and value bias are all zero (it adds nothing to the output)."""
    with torch.no_grad():
        embed, heads, width = attention.embed_dim, attention.num_heads, attention.head_dim
        # with kdim/vdim the values have a projection of their own, (embed, vdim)
        values = (effective_tensor(attention, "in_proj_weight")[2 * embed:] if attention._qkv_same_embed_dim
                  else effective_tensor(attention, "v_proj_weight"))
        zero = (values.reshape(heads, -1) == 0).all(dim=1)
        if attention.in_proj_bias is not None:
            zero &= (effective_tensor(attention, "in_proj_bias")[2 * embed:].reshape(heads, width) == 0).all(dim=1)
        return zero


def _attentions(model: nn.Module) -> list[tuple[str, nn.MultiheadAttention]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)]


def prunable_attentions(model: nn.Module, exclude: tuple[str, ...] = ()) -> list[str]:
    """The names of `model`'s attentions whose heads :func:`prune_heads_` prunes (outside `exclude`, modules named
    there and the modules inside them)."""
    return [name for name, attention in _attentions(model)
            if not is_excluded(name, exclude) and _why_not(attention) is None]


def heads_to_prune(heads: int, fraction: float, heads_multiple: int | None = None) -> int:
    """How many of an attention's `heads` a round at `fraction` masks (before those already zero): the rounded
    count, never every head; with `heads_multiple` (:func:`heads_multiple`), fewer, so that the heads kept are a
    multiple of it (at least that many, or all)."""
    return structured_pruned_count(heads, fraction, heads_multiple)


def heads_multiple(keep_multiple_of: int | None, head_dim: int) -> int | None:
    """The multiple of heads an attention keeps so that its projections keep a multiple of `keep_multiple_of`
    channels (``head_dim`` each): 8-wide heads keep an even count for a multiple of 16."""
    return block_multiple(keep_multiple_of, head_dim)  # (the same arithmetic as equal blocks of channels)


def smallest_fraction_pruning_one(size: int, count: Callable[[int, float], int]) -> float | None:
    """The smallest fraction (in steps of 0.001) for which ``count(size, fraction)`` prunes one; None if none below
    1 does (a layer of one head or unit, a `keep_multiple_of` of its size)."""
    return next((i / 1000 for i in range(1, 1000) if count(size, i / 1000) > 0), None)


def none_pruned_message(owner: str, final: float, what: str, none: dict[str, int],
                        count: Callable[[int, float], int] | Mapping[str, Callable[[int, float], int]],
                        keep_multiple_of: int | None = None) -> str:
    """Says that `final` prunes none of `what` in the layers `none` ({name: size}), and what would: `count` is how
    many a fraction prunes of a size, or that per layer name (attentions of other head widths keep other multiples)."""
    counts = {name: count[name] if isinstance(count, Mapping) else count for name in none}
    listed = ", ".join(f"{name} ({size})" for name, size in list(none.items())[:4]) + (" ..." if len(none) > 4 else "")
    never = [name for name, size in none.items() if smallest_fraction_pruning_one(size, counts[name]) is None]
    could = [smallest_fraction_pruning_one(size, counts[name]) for name, size in none.items() if name not in never]
    advice = []
    if could:
        advice.append(f"{max(could):.3g} or more prunes one in each"
                      + (" of the others" if never else ""))
    if never:
        kept = f", a multiple of keep_multiple_of={keep_multiple_of}" if keep_multiple_of else ""
        advice.append(f"no fraction below 1 prunes any in {', '.join(never[:4])} (each keeps at least one{kept}: "
                      "`exclude` them)")
    return f"{owner}: {final:g} {what} prunes none in {listed}; {'; '.join(advice)}."


def prune_heads_(model: nn.Module, fraction: float, *, exclude: tuple[str, ...] = (),
                 keep_multiple_of: int | None = None) -> dict[str, int]:
    """Mask the ``round(fraction * num_heads)`` heads with the smallest :func:`attention_head_norms` in each
    ``nn.MultiheadAttention`` of `model` (at least one head stays): their query, key and value rows and biases,
    through ``torch.nn.utils.prune`` masks on ``in_proj_weight`` / ``in_proj_bias``. Heads already masked (or zero)
    stay masked, whatever the fraction, so growing fractions along a schedule prune a growing set. Returns the masked
    head count per attention. Attentions named in `exclude`, or whose heads cannot be removed (see the module
    docstring), are left. With `keep_multiple_of`, fewer heads, so that the heads kept hold a multiple of that many
    channels (as :func:`~litcompress.pruning.shrink` keeps them).
    """
    fraction = check_fraction(fraction, "prune_heads_", "fraction", "each attention's heads")
    keep_multiple_of = check_channel_multiple(keep_multiple_of, "prune_heads_")
    exclude = check_module_names(model, exclude, "prune_heads_", "exclude")  # a string excluded nothing
    masked: dict[str, int] = {}
    modules = dict(model.named_modules())
    for name in prunable_attentions(model, exclude):
        attention = modules[name]
        heads, zero = attention.num_heads, zero_heads(attention)
        # never fewer than are zero already: a smaller fraction does not bring masked heads back
        count = min(max(heads_to_prune(heads, fraction, heads_multiple(keep_multiple_of, attention.head_dim)),
                        int(zero.sum())), heads - 1)  # one head always stays
        norms = attention_head_norms(attention)
        norms[zero] = -1.0  # pruned earlier (or dead): first out
        order = torch.argsort(norms, stable=True)
        pruned = order[:count].tolist()
        weight_mask = torch.ones_like(attention.in_proj_weight, dtype=torch.bool)
        for head in pruned:
            weight_mask[_head_rows(attention, head)] = False
        # combined with the tensor's mask: another pruner's zeros in it (ModelPruning on in_proj_weight) stay
        apply_mask_(attention, "in_proj_weight", weight_mask.to(attention.in_proj_weight.dtype))
        if attention.in_proj_bias is not None:
            bias_mask = weight_mask[:, 0].to(attention.in_proj_bias.dtype)
            apply_mask_(attention, "in_proj_bias", bias_mask)
        masked[name] = count
    return masked


@dataclass(frozen=True)
class HeadShrink:
    """One attention that lost heads."""

    name: str
    heads_before: int
    heads_after: int
    head_dim: int

    @property
    def removed(self) -> int:
        return self.heads_before - self.heads_after


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, leaf = name.rpartition(".")
    return (model.get_submodule(owner) if owner else model), leaf


def _replace_everywhere_(model: nn.Module, module: nn.Module, replacement: nn.Module) -> list[nn.Module]:
    """Put `replacement` under every name `module` has in `model` (a module registered twice stays shared: replaced
    at one name only, the model held both and grew); returns the parents it was replaced in."""
    paths = [name for name, sub in model.named_modules(remove_duplicate=False) if sub is module]
    parents = []
    for path in paths:
        parent, leaf = _parent(model, path)
        setattr(parent, leaf, replacement)
        parents.append(parent)
    return parents


def _replace_attention_(model: nn.Module, attention: nn.Module, replacement: nn.Module) -> list[str]:
    """:func:`_replace_everywhere_` for an attention; a TransformerEncoder holding it leaves its nested-tensor path,
    which reads torch's attention weights directly. Returns the encoders that took that path before."""
    left = []
    for parent in _replace_everywhere_(model, attention, replacement):
        if isinstance(parent, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer):
            left += disable_nested_tensor_(model, parent)
    return left


def remove_zero_heads_(model: nn.Module, keep_multiple_of: int | None = None
                       ) -> tuple[list[HeadShrink], list[tuple[str, str]]]:
    """Replace, in place, each ``nn.MultiheadAttention`` of `model` that has heads adding nothing (:func:`zero_heads`)
    with a :class:`HeadPrunedAttention` of its other heads (at least one); outputs are unchanged. Returns what was
    removed and, for attentions with zero heads that had to stay, why. A masked attention is read through its masks
    (the replacement holds the effective weights, no masks). The replacement's attention weights
    (``need_weights=True``) average its kept heads only. With `keep_multiple_of`, zero heads stay where needed so
    that the projections keep a multiple of that many channels (all heads, where none does).
    """
    keep_multiple_of = check_channel_multiple(keep_multiple_of, "remove_zero_heads_")
    removed: list[HeadShrink] = []
    kept: list[tuple[str, str]] = []
    nested: list[str] = []  # encoders that leave torch's nested-tensor path
    for name, attention in _attentions(model):
        zero = zero_heads(attention)
        if not bool(zero.any()):
            continue
        reason = _why_not(attention)
        if reason is not None:
            kept.append((name, f"its zero heads stay: {reason}"))
            continue
        keep = (~zero).nonzero().flatten().tolist() or [0]  # an attention with no head left keeps one (it adds 0)
        if len(keep) == attention.num_heads:  # (its one head, zero: nothing to remove)
            continue
        wanted = kept_multiple(attention.num_heads, len(keep), heads_multiple(keep_multiple_of, attention.head_dim))
        if wanted == attention.num_heads:
            kept.append((name, f"keeping a multiple of {keep_multiple_of} channels ({attention.head_dim} per head) "
                               "leaves none of its zero heads to remove"))
            continue
        spare = [head for head in zero.nonzero().flatten().tolist() if head not in keep]  # (zero heads add nothing)
        if wanted > len(keep):  # (counting the one an attention with no head left keeps)
            kept.append((name, f"{wanted - int((~zero).sum())} of its zero heads stay: keeping a multiple of "
                               f"{keep_multiple_of} channels ({attention.head_dim} per head)"))
        keep = sorted(keep + spare[:wanted - len(keep)])
        nested += _replace_attention_(model, attention, _without_heads(attention, keep))
        removed.append(HeadShrink(name, attention.num_heads, len(keep), attention.head_dim))
    if nested:
        warnings.warn(NESTED_TENSOR_NOTE.format(encoders=", ".join(sorted(set(nested)))), UserWarning, stacklevel=3)
    return removed, kept


def rewrite_attentions_(model: nn.Module) -> nn.Module:
    """Replace, in place, each ``nn.MultiheadAttention`` of `model` that can be with a :class:`HeadPrunedAttention` of
    all its heads: the same outputs, computed from plain Linear layers and shapes read at run time (torch's attention
    leaves exporters that trace it the example's sequence length). Returns `model`, or the replacement when `model`
    itself is such an attention."""
    if isinstance(model, nn.MultiheadAttention):
        return model if _why_not(model) is not None else _without_heads(model, list(range(model.num_heads)))
    for name, attention in _attentions(model):
        if _why_not(attention) is not None:
            continue
        _replace_attention_(model, attention, _without_heads(attention, list(range(attention.num_heads))))
    return model


def _without_heads(attention: nn.MultiheadAttention, keep: list[int]) -> HeadPrunedAttention:
    embed, width = attention.embed_dim, attention.head_dim
    # Through the masks: a masked attention's weights are refreshed only by its next forward, so after an optimizer
    # step they are one step old.
    weight = effective_tensor(attention, "in_proj_weight").detach()
    bias = effective_tensor(attention, "in_proj_bias").detach() if attention.in_proj_bias is not None else None
    module = HeadPrunedAttention(embed, len(keep), width, bias=bias is not None, dropout=attention.dropout,
                                 batch_first=attention.batch_first, original_heads=attention.num_heads,
                                 kept_heads=tuple(keep)).to(device=weight.device, dtype=weight.dtype)
    columns = torch.tensor([head * width + i for head in keep for i in range(width)], device=weight.device)
    with torch.no_grad():
        for part, projection in enumerate((module.q_proj, module.k_proj, module.v_proj)):
            projection.weight.copy_(weight[part * embed:(part + 1) * embed][columns])
            if bias is not None:
                projection.bias.copy_(bias[part * embed:(part + 1) * embed][columns])
        module.out_proj.weight.copy_(effective_tensor(attention.out_proj, "weight").detach()[:, columns])
        if bias is not None:
            module.out_proj.bias.copy_(effective_tensor(attention.out_proj, "bias").detach())
    module.train(attention.training)
    return module


#: Said when shrink takes an encoder off torch's nested-tensor path: its outputs at padded positions change.
NESTED_TENSOR_NOTE = (
    "shrink: the TransformerEncoder(s) {encoders} took torch's nested-tensor fast path, which in eval mode without "
    "gradients and with a src_key_padding_mask outputs zeros at the padded positions; with their attentions' heads "
    "removed they take the regular path, whose outputs there are not zero (those at the real positions are the same). "
    "A readout over padded positions (a plain sum or mean over the sequence) changes: mask them out, or build the "
    "encoder with enable_nested_tensor=False, under which the model as given computes the same as the shrunk one.")


def disable_nested_tensor_(model: nn.Module, layer: nn.Module) -> list[str]:
    """A TransformerEncoder whose layers' attention was replaced must not take its nested-tensor fast path, which
    reads torch's attention weights directly. Returns the names of those that could take it before."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoder) and any(child is layer for child in module.layers):
            if module.use_nested_tensor:
                names.append(name or type(module).__name__)
            module.use_nested_tensor = False
    return names
