"""Load the weights of a shrunk model into a model built at its original widths.

`shrink` narrows layers in place: a ``Linear(64, 48)`` becomes ``Linear(64, 31)``, a depthwise conv loses filters
and groups, a bias folded into a bias-less consumer appears, an ``nn.LSTM(16, 64)`` becomes ``nn.LSTM(16, 32)``, an
``nn.MultiheadAttention`` with zero heads becomes a :class:`~litcompress.pruning.heads.HeadPrunedAttention`. Its
``state_dict`` then no longer fits the model's constructor, so ``model.load_state_dict`` (and Lightning's
``load_from_checkpoint``) fail with size mismatches.
:func:`narrow_to_state_dict_` resizes a freshly built model's layers to the shapes a state dict holds, the way
`shrink` resized them; :func:`load_shrunk_state_dict` does that and loads the weights.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from litcompress.pruning.heads import HeadPrunedAttention, decode_kept_heads, disable_nested_tensor_
from litcompress.pruning.parametrizations import parametrized_tensors
from litcompress.pruning.recurrent import RECURRENT_LAYERS

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BATCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def load_shrunk_state_dict(model: nn.Module, state_dict: Mapping[str, Any], *, strict: bool = True) -> nn.Module:
    """Load the ``state_dict`` of a model that :func:`~litcompress.pruning.shrink.shrink` narrowed into `model`, a
    model of the same class built at its original widths: its layers are narrowed in place to the state's shapes
    first (:func:`narrow_to_state_dict_`). Returns `model`, which then computes what the shrunk model did. A state
    written while pruning on with masks (``<name>_orig``/``<name>_mask``, a shrunk model fine-tuned under
    ``ModelPruning(make_pruning_permanent=False)``) is loaded with its masks re-created
    (:func:`~litcompress.pruning.engine.load_pruned_state_dict`); sparse (CSR) weights, a
    :func:`~litcompress.pruning.sparsify`'d model's, as the dense tensors they stand for."""
    from litcompress.pruning.engine import check_loading_arguments, strided_state_dict

    check_loading_arguments(model, state_dict, "load_shrunk_state_dict", strict=strict)
    state_dict = strided_state_dict(keyed_as_compiled_parts(model, state_dict), model)
    narrow_to_state_dict_(model, state_dict)
    if any(key.endswith("_orig") and f"{key[:-5]}_mask" in state_dict for key in state_dict):
        from litcompress.pruning.engine import load_pruned_state_dict

        return load_pruned_state_dict(model, state_dict, strict=strict)
    model.load_state_dict(state_dict, strict=strict)
    return model


def narrow_to_state_dict_(model: nn.Module, state_dict: Mapping[str, Any]) -> list[str]:
    """Resize, in place, the layers of `model` whose tensors in `state_dict` are narrower, as `shrink` resized them:
    Linear layers and convs (grouped, depthwise and transposed ones too, and a bias that folding gave a bias-less
    layer), BatchNorms, PReLUs, embeddings (their dims) and LSTM/GRU/RNN layers (hidden units and inputs); and
    replace each ``nn.MultiheadAttention`` the state dict holds as a :class:`HeadPrunedAttention` with one. New
    tensors are left uninitialised for ``load_state_dict`` to fill. Returns the names of the modules changed; a
    layer of another kind whose shapes differ is left to ``load_state_dict`` to report. A state written while
    pruning with masks (``<name>_orig``/``<name>_mask``) is read alike.

    A training run resumed from a checkpoint of a shrunk model (``trainer.fit(model, ckpt_path=...)``) needs this
    on the fresh model before ``fit``, so that its optimizer is built for the narrow parameters.
    """
    state_dict = keyed_as_compiled_parts(model, state_dict)
    _narrow_(model, state_dict, apply=False)  # every check first: a state that does not fit changes nothing
    return _narrow_(model, state_dict, apply=True)


def keyed_as_compiled_parts(model: nn.Module, state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """`state_dict` with the keys of `model`'s ``torch.compile``'d parts (``body._orig_mod.0.weight``) where it holds
    them as their eager modules' (``body.0.weight``): what `shrink` returns, an eager copy, for a model that compiles
    a part (or is compiled); keys already so (or a model with nothing compiled) are left as they are."""
    from litcompress.pruning.engine import eager_name, is_compiled

    # every name a compiled part has (one shared under two attributes is in the state dict under both)
    names = [name for name, module in model.named_modules(remove_duplicate=False) if is_compiled(module)]
    if not names:
        return state_dict
    prefixes = []  # (eager prefix, the model's), longest first: nested compiled parts before their holders
    for name in names:
        eager = eager_name(name)
        prefixes.append((f"{eager}." if eager else "", f"{name}._orig_mod." if name else "_orig_mod."))
    prefixes.sort(key=lambda pair: len(pair[0]), reverse=True)

    def renamed(key: str) -> str:
        if "_orig_mod" in key.split("."):  # keyed so already
            return key
        eager, given = next(((e, g) for e, g in prefixes if key.startswith(e)), (None, None))
        return key if eager is None else given + key[len(eager):]

    state = OrderedDict((renamed(key), value) for key, value in state_dict.items())
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:  # the modules' versions, by module name (a batch norm's tells how to read its state)
        state._metadata = OrderedDict(((renamed(f"{name}.") if name else renamed("")).rstrip("."), info)
                                      for name, info in metadata.items())
    return state


def _narrow_(model: nn.Module, state_dict: Mapping[str, Any], *, apply: bool) -> list[str]:
    """The modules to resize (with `apply`, resized); raises where the state does not fit."""
    changed = _replace_attentions_(model, state_dict, apply=apply)
    replaced = tuple(f"{name}." for name in changed)  # a dry run still has torch's attention there
    # a replaced attention's output projection reads fewer heads; checked in the dry run, before anything changed
    reads_fewer = bool(changed) or apply
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, RECURRENT_LAYERS):
            if not reads_fewer:
                reads_fewer = _recurrent_reads_fewer(module, state_dict, prefix)
            if _resize_recurrent_(module, state_dict, prefix, name, apply) and name not in changed:
                changed.append(name)
            continue
        # a tensor the fresh layer computes (weight_norm, spectral_norm) that the state holds as a plain one, without
        # the parametrization's own keys (those of a folded layer: the pipeline's shrunk_state_dict.pt)
        plain = [tensor for path, _, tensor in parametrized_tensors(module) if path == ""
                 and isinstance(state_dict.get(prefix + tensor), Tensor)
                 and not any(key.startswith((f"{prefix}{tensor}_", f"{prefix}parametrizations.{tensor}."))
                             for key in state_dict)]
        if plain:
            raise ValueError(f"{name or type(module).__name__}: its {', '.join(plain)} is computed by a "
                             "parametrization (weight_norm, spectral_norm), where the state holds a plain tensor: "
                             "call litcompress.pruning.fold_parametrizations_(model) on the fresh model first, then "
                             "load.")
        weight = _tensor(state_dict, prefix + "weight")
        if isinstance(module, _BATCH_NORM) and weight is None:  # no affine parameters: its statistics tell the width
            weight = state_dict.get(prefix + "running_mean")
        if not isinstance(weight, Tensor) or isinstance(module, HeadPrunedAttention) or prefix.startswith(replaced):
            continue
        if is_lazy(getattr(module, "weight", None)):  # never called: torch's loading gives it the state's shapes
            continue
        if isinstance(module, nn.Linear):
            resized = _resize_linear_(module, weight, name, apply)
        elif isinstance(module, (*_CONV, *_TRANSPOSED)):
            resized = _resize_conv_(module, weight, name, apply)
        elif isinstance(module, _BATCH_NORM):
            resized = _resize_batch_norm_(module, weight, name, apply)
        elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and weight.dim() == 2 \
                and weight.shape != module.weight.shape:
            _check_narrower(name, weight.shape, module.weight.shape)
            if weight.shape[0] != module.num_embeddings:
                raise ValueError(f"{name}: the state dict's embedding holds {weight.shape[0]} rows, the layer "
                                 f"{module.num_embeddings}: shrink only removes an embedding's dims, not its rows.")
            if apply:
                module.weight = _like(module.weight, weight.shape)
                module.embedding_dim = int(weight.shape[1])
            resized = True
        elif isinstance(module, nn.PReLU) and weight.dim() == 1 and weight.numel() != module.num_parameters:
            _check_narrower(name, weight.shape, module.weight.shape)
            if apply:
                module.weight = _like(module.weight, weight.shape)
                module.num_parameters = weight.numel()
            resized = True
        else:
            continue
        if isinstance(module, (nn.Linear, *_CONV, *_TRANSPOSED)):
            reads_fewer = reads_fewer or _reads_fewer_inputs(module, weight)
            resized |= _resize_bias_(module, _tensor(state_dict, prefix + "bias"), weight, name, apply)
        if resized and name not in changed:
            changed.append(name)
    narrowed = [] if reads_fewer else [name for name in changed
                                       if _narrowed(model.get_submodule(name), state_dict, name)]
    if narrowed:
        raise ValueError(
            f"{', '.join(repr(name) for name in narrowed)}: the state dict's tensors are narrower than this model's "
            "in their outputs only, and no layer of the state reads fewer inputs. shrink removes a layer's output "
            "channels together with the inputs that read them (and never the model's outputs), so this is not a "
            "shrunk state of this model: is the model built with other widths than the one saved, or with another "
            "head?")
    return changed


def _narrowed(module: nn.Module, state_dict: Mapping[str, Any], name: str) -> bool:
    """Whether the state holds `module`'s weight (or statistics) with fewer channels: not a bias the folding added."""
    prefix = f"{name}." if name else ""
    weight = _tensor(state_dict, prefix + "weight")
    if weight is None and isinstance(module, _BATCH_NORM):
        weight = state_dict.get(prefix + "running_mean")
    current = getattr(module, "weight", None)
    return not (isinstance(weight, Tensor) and isinstance(current, Tensor)) or weight.shape != current.shape


def _reads_fewer_inputs(module: nn.Module, weight: Tensor) -> bool:
    """Whether `weight`, the state's, gives a Linear or conv layer fewer inputs than `module` has."""
    if weight.dim() != module.weight.dim():
        return False
    if isinstance(module, nn.Linear):
        return int(weight.shape[1]) < module.in_features
    if isinstance(module, _TRANSPOSED):  # (in, out / groups, *kernel)
        return int(weight.shape[0]) < module.in_channels
    depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
    if depthwise and int(weight.shape[1]) == 1:  # its channels go with its groups: it reads fewer too
        return int(weight.shape[0]) < module.in_channels
    return int(weight.shape[1]) * module.groups < module.in_channels


def _recurrent_reads_fewer(module: nn.RNNBase, state_dict: Mapping[str, Any], prefix: str) -> bool:
    """Whether the state gives a recurrent layer fewer inputs or hidden units (its recurrent weights read those)."""
    inputs = _tensor(state_dict, prefix + "weight_ih_l0")
    # the hidden units are read by the recurrent weights, or by the projection (weight_hr: proj_size x hidden_size)
    recurrent = _tensor(state_dict, prefix + ("weight_hr_l0" if getattr(module, "proj_size", 0) else "weight_hh_l0"))
    return (isinstance(inputs, Tensor) and inputs.dim() == 2 and int(inputs.shape[1]) < module.input_size) or (
        isinstance(recurrent, Tensor) and recurrent.dim() == 2 and int(recurrent.shape[1]) < module.hidden_size)


def _tensor(state_dict: Mapping[str, Any], key: str) -> Any:
    """``state_dict[key]``, or the ``<key>_orig`` of a state written while pruning with masks."""
    return state_dict.get(key, state_dict.get(key + "_orig"))


def _like(old: Tensor | None, shape: torch.Size, reference: Tensor | None = None) -> nn.Parameter:
    """An uninitialised parameter of `shape` with the dtype, device and ``requires_grad`` of `old` (or of
    `reference`, for a tensor the layer did not have)."""
    source = old if old is not None else reference
    return nn.Parameter(torch.empty(shape, dtype=source.dtype, device=source.device), source.requires_grad)


def _check_narrower(name: str, shape: torch.Size, built: torch.Size, kernel_dims: int = 0) -> None:
    """shrink only removes channels: a wider tensor, or another kernel size, is not a shrunk state of this model."""
    kernels_differ = kernel_dims and shape[-kernel_dims:] != built[-kernel_dims:]
    if kernels_differ or any(new > old for new, old in zip(shape, built)):
        raise ValueError(f"{name or 'the model'}: the state dict's tensor of shape {tuple(shape)} does not fit in the "
                         f"layer's {tuple(built)}: shrink only removes channels, so this is not a shrunk state of "
                         "this model (one built with other widths?).")


def _resize_linear_(module: nn.Linear, weight: Tensor, name: str, apply: bool) -> bool:
    if weight.dim() != 2 or weight.shape == module.weight.shape:
        return False
    _check_narrower(name, weight.shape, module.weight.shape)
    if not apply:
        return True
    module.out_features, module.in_features = int(weight.shape[0]), int(weight.shape[1])
    module.weight = _like(module.weight, weight.shape)
    return True


def _resize_conv_(module: nn.Module, weight: Tensor, name: str, apply: bool) -> bool:
    """A conv's weight is (out, in / groups, *kernel), a transposed conv's (in, out / groups, *kernel)."""
    if weight.dim() != module.weight.dim() or weight.shape == module.weight.shape:
        return False
    _check_narrower(name, weight.shape, module.weight.shape, kernel_dims=weight.dim() - 2)
    rows, per_group = int(weight.shape[0]), int(weight.shape[1])
    transposed = isinstance(module, _TRANSPOSED)
    depthwise = not transposed and module.groups > 1 and module.groups == module.in_channels == module.out_channels
    if not (depthwise and per_group == 1) and rows % module.groups:
        raise ValueError(f"{name}: a weight of shape {tuple(weight.shape)} does not fit its {module.groups} groups "
                         "(shrink keeps a grouped conv's groups and narrows each alike).")
    if not apply:
        return True
    if depthwise and per_group == 1:  # shrink removes a depthwise conv's channels with its groups
        module.groups = module.in_channels = module.out_channels = rows
    elif transposed:
        module.in_channels, module.out_channels = rows, per_group * module.groups
    else:
        module.out_channels, module.in_channels = rows, per_group * module.groups
    module.weight = _like(module.weight, weight.shape)
    return True


def _resize_batch_norm_(module: nn.Module, weight: Tensor, name: str, apply: bool) -> bool:
    features = int(weight.shape[0]) if weight.dim() == 1 else module.num_features
    if features == module.num_features:
        return False
    _check_narrower(name, weight.shape, torch.Size([module.num_features]))
    if not apply:
        return True
    for tensor_name in ("weight", "bias"):
        if getattr(module, tensor_name) is not None:
            setattr(module, tensor_name, _like(getattr(module, tensor_name), torch.Size([features])))
    for buffer_name in ("running_mean", "running_var"):
        buffer = getattr(module, buffer_name)
        if buffer is not None:
            setattr(module, buffer_name, torch.empty(features, dtype=buffer.dtype, device=buffer.device))
    module.num_features = features
    return True


def _resize_recurrent_(module: nn.RNNBase, state_dict: Mapping[str, Any], prefix: str, name: str,
                       apply: bool) -> bool:
    """An LSTM/GRU/RNN with the state's hidden units (shrink removes units from every layer alike) and input
    features (a producer before it lost channels)."""
    projected = bool(getattr(module, "proj_size", 0))
    # the units are the recurrent weights' columns, or the projection's (weight_hr: proj_size x hidden_size)
    recurrent = _tensor(state_dict, prefix + ("weight_hr_l0" if projected else "weight_hh_l0"))
    inputs = _tensor(state_dict, prefix + "weight_ih_l0")
    if not (isinstance(recurrent, Tensor) and isinstance(inputs, Tensor) and recurrent.dim() == inputs.dim() == 2):
        return False
    hidden, input_size = int(recurrent.shape[1]), int(inputs.shape[1])
    if (hidden, input_size) == (module.hidden_size, module.input_size):
        return False
    if hidden > module.hidden_size or input_size > module.input_size:
        raise ValueError(f"{name or 'the model'}: the state dict's layer has {hidden} hidden units and {input_size} "
                         f"inputs, more than this layer's {module.hidden_size} and {module.input_size}: shrink only "
                         "removes them, so this is not a shrunk state of this model.")
    if not apply:
        return True
    old_hidden = module.hidden_size
    for tensor_name in module._flat_weights_names:
        old = getattr(module, tensor_name)
        if tensor_name.startswith("weight_hr"):  # (proj_size, hidden)
            shape = [old.shape[0], hidden]
        else:  # gate blocks of rows; a projected layer's recurrent and later input weights read its projection
            shape = [size // old_hidden * hidden if i == 0 else size for i, size in enumerate(old.shape)]
            if tensor_name.startswith("weight_hh") and not projected:
                shape[1] = hidden
            elif tensor_name.startswith("weight_ih_l0"):
                shape[1] = input_size
            elif tensor_name.startswith("weight_ih") and not projected:
                shape[1] = shape[1] // old_hidden * hidden
        setattr(module, tensor_name, _like(old, torch.Size(shape)))
    module.hidden_size, module.input_size = hidden, input_size
    module._init_flat_weights()
    return True


def _resize_bias_(module: nn.Module, bias: Any, weight: Tensor, name: str, apply: bool) -> bool:
    """A bias of the state's length; one created where folding gave a bias-less layer a bias. A bias that is not
    one value per output of the state's weight is refused (the layer took any, and failed at its first forward)."""
    if not isinstance(bias, Tensor):
        return False
    outputs = int(weight.shape[1]) * module.groups if isinstance(module, _TRANSPOSED) else int(weight.shape[0])
    if tuple(bias.shape) != (outputs,):
        raise ValueError(f"{name or type(module).__name__}: the state dict's bias has shape {tuple(bias.shape)}, and "
                         f"its weight of shape {tuple(weight.shape)} gives the layer {outputs} outputs: a bias holds "
                         "one value per output, so this is not a state of this model.")
    if module.bias is not None and module.bias.shape == bias.shape:
        return False
    if apply:
        module.bias = _like(module.bias, bias.shape, reference=module.weight)
    return True


def _replace_attentions_(model: nn.Module, state_dict: Mapping[str, Any], *, apply: bool) -> list[str]:
    """Put a :class:`HeadPrunedAttention` where `state_dict` holds one (its projections and heads) and `model` has
    torch's attention (without `apply`, only name them)."""
    replaced = []
    made: dict[int, nn.Module] = {}  # an attention shared under several names: one replacement, put at each
    for name, module in list(model.named_modules(remove_duplicate=False)):
        prefix = f"{name}." if name else ""
        if apply and id(module) in made:
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, leaf, made[id(module)])
            if isinstance(parent, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer):
                disable_nested_tensor_(model, parent)
            replaced.append(name)
            continue
        # a state written while pruning on with masks holds `q_proj.weight_orig` (and its mask) instead
        q_weight = next((prefix + f"q_proj.weight{suffix}" for suffix in ("", "_orig")
                         if prefix + f"q_proj.weight{suffix}" in state_dict), None)
        # torch's attention, or one a first load (or shrink) made a HeadPrunedAttention, which a narrower state
        # narrows again (its projections resized alone, it kept its head count: it failed at the first forward)
        if not isinstance(module, (nn.MultiheadAttention, HeadPrunedAttention)) or q_weight is None:
            continue
        if not name:
            raise ValueError("narrow_to_state_dict_: the model itself is an nn.MultiheadAttention that the state "
                             "dict holds as a HeadPrunedAttention; build the model around it (or load the "
                             "HeadPrunedAttention's state into one built with its heads).")
        inner = int(state_dict[q_weight].shape[0])
        head_dim = module.head_dim
        original_heads, kept_heads = getattr(module, "original_heads", module.num_heads), None
        if isinstance(state_dict.get(prefix + "_extra_state"), Tensor):
            saved_heads, kept_heads = decode_kept_heads(state_dict[prefix + "_extra_state"])
            if saved_heads != original_heads:  # (its heads are of another width: "this module has 1 head(s)")
                raise ValueError(f"{name}: the state dict's attention was shrunk from one of {saved_heads} heads, "
                                 f"and this model's has {original_heads}: not a shrunk state of this model (build "
                                 f"it with {saved_heads} heads).")
        if isinstance(module, HeadPrunedAttention) and inner == module.num_heads * head_dim:
            continue  # as narrow already: its kept heads load with its state
        if inner > module.num_heads * head_dim or inner % head_dim:
            raise ValueError(f"{name}: the state dict's attention has {inner} inner channels, which are not heads of "
                             f"{head_dim} of this attention's {module.num_heads}: not a shrunk state of this model.")
        if not apply:
            replaced.append(name)
            continue
        replacement = HeadPrunedAttention(
            module.embed_dim, inner // head_dim, head_dim,
            bias=prefix + "q_proj.bias" in state_dict or prefix + "q_proj.bias_orig" in state_dict,
            dropout=module.dropout, batch_first=module.batch_first, original_heads=original_heads,
            kept_heads=kept_heads,
        ).to(device=module.out_proj.weight.device, dtype=module.out_proj.weight.dtype)
        replacement.train(module.training)
        made[id(module)] = replacement
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, replacement)
        if isinstance(parent, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer):
            disable_nested_tensor_(model, parent)
        replaced.append(name)
    return replaced
