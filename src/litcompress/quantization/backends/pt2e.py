"""torchao PT2E backend: ``torch.export`` + ``X86InductorQuantizer`` (+ optional ``torch.compile``).

reduce_range is chosen from the CPU: without VNNI the int8 kernels need 7-bit activations
to avoid saturating 16-bit intermediate sums (measured ~5x larger error otherwise).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from litcompress._inputs import copied

from ..config import Recipe
from ..outputs import RebuiltOutputs, tensor_leaves_of, untraceable_structure
from . import Backend, BackendUnavailableError, ExportError, Inputs, cpu_has_vnni, nonfloat_input_error
from .exported import ExportedInference, FixedDimError, export_program, save_program


def _drop_unused_tensors(graph_module: torch.fx.GraphModule) -> None:
    """convert_pt2e leaves the fp32 weights as unused attributes: drop them so the artefact is int8."""
    used = {node.target for node in graph_module.graph.nodes if node.op == "get_attr"}
    for name, _ in list(graph_module.named_parameters()) + list(graph_module.named_buffers()):
        if name not in used:
            parent, _, leaf = name.rpartition(".")
            delattr(graph_module.get_submodule(parent) if parent else graph_module, leaf)


_BATCH_NORM = "aten.batch_norm.default"


def _attribute(graph_module: torch.fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, leaf = target.rpartition(".")
    return getattr(graph_module.get_submodule(owner) if owner else graph_module, leaf)


def _fold_standalone_batch_norms_(graph_module: torch.fx.GraphModule) -> int:
    """Write each eval-mode batch norm that ``prepare_pt2e`` left in the graph as ``x * scale + shift``; returns how
    many.

    ``prepare_pt2e`` folds a batch norm into the conv or Linear before it; one after an addition or a concatenation
    (pre-activation ResNets, DenseNet-BC) stays. ``convert_pt2e`` then looks for QAT conv-bn patterns whenever a
    batch norm is in the graph, exporting some hundred pattern graphs: 12-25 s per candidate even for a tiny model.
    In eval mode a batch norm is that affine map (running statistics, fixed), never quantized, so nothing else
    changes.
    """
    graph, folded = graph_module.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or str(node.target) != _BATCH_NORM:
            continue
        x, weight, bias, mean, var, training, _momentum, eps = node.args[:8]
        if training or not all(isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in (mean, var)):
            continue  # batch statistics: not an affine map
        try:
            mean_t, var_t, weight_t, bias_t = (
                None if not isinstance(arg, torch.fx.Node) else _attribute(graph_module, arg.target)
                for arg in (mean, var, weight, bias))
        except AttributeError:
            continue
        out = node.meta.get("val")  # the input may be an observer, which export did not trace
        if not isinstance(out, torch.Tensor) or out.dim() < 2:
            continue
        ndim = out.dim()
        with torch.no_grad():
            scale = torch.rsqrt(var_t.detach().float() + eps)
            if weight_t is not None:
                scale = scale * weight_t.detach()
            shift = -mean_t.detach() * scale
            if bias_t is not None:
                shift = shift + bias_t.detach()
        shape = (-1,) + (1,) * (ndim - 2)
        names = []
        for kind, tensor in (("scale", scale), ("shift", shift)):
            name = f"_litcompress_bn_{kind}_{folded}"
            graph_module.register_buffer(name, tensor.reshape(shape).contiguous())
            names.append(name)
        with graph.inserting_before(node):
            scale_node, shift_node = (graph.get_attr(name) for name in names)
            scaled = graph.call_function(torch.ops.aten.mul.Tensor, (x, scale_node))
            shifted = graph.call_function(torch.ops.aten.add.Tensor, (scaled, shift_node))
        for new in (scaled, shifted):
            new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "val")})
        node.replace_all_uses_with(shifted)
        # the quantizer's annotations name their inputs by node (an observer may sit between): convert_pt2e looks a
        # dynamic Linear's qparams up by the batch norm's node, and failed without it ("No chose qparams node")
        for other in graph.nodes:
            qspecs = getattr(other.meta.get("quantization_annotation"), "input_qspec_map", None)
            if qspecs and node in qspecs:
                other.meta["quantization_annotation"].input_qspec_map = {
                    shifted if key is node else key: spec for key, spec in qspecs.items()}
        graph.erase_node(node)
        folded += 1
    if folded:
        graph.eliminate_dead_code()
        graph_module.recompile()
    return folded


def check_cpp_compiler(where: str) -> None:
    """``torch.compile``'s inductor needs a C++ compiler: missing, it failed at the first compiled call (after a fit,
    a calibration, or in each candidate of a search), in inductor's words. `where`: the call that asked for it."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch: its compile says so itself
        return
    try:
        get_cpp_compiler()
    except Exception as error:  # torch._inductor.exc.InvalidCxxCompiler
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(f"{where}: torch.compile's inductor needs a working C++ compiler, and none was found "
                         f"({type(error).__name__}: {first_line}). Install one (g++), point the CXX variable at it, "
                         "or use compile=False (the saved file is the same).") from None


class CompiledInference(ExportedInference):
    """A converted PT2E graph run through ``torch.compile`` with inductor's freezing.

    Freezing lets inductor prepack the int8 weights into its fused x86 kernels. It is set with
    ``torch._inductor.config.patch`` around each call (recompiles for new shapes need it too) and
    the call runs in inference mode: on torch 2.13 the weight-prepack ops have no fake kernel, so
    compiling under plain ``no_grad`` (or with ``options={"freezing": True}``) fails.

    Shapes are static: each new input shape compiles anew, up to torch's recompile limit
    (``torch._dynamo.config.recompile_limit``, 8 by default); shapes beyond it run the graph's reference int8 ops,
    as uncompiled. Feed it fixed shapes (pad a last, smaller batch).
    """

    def __init__(self, program: nn.Module) -> None:
        super().__init__(program)
        # Static shapes: inductor's int8 conv lowering asserts wrong strides with a symbolic batch. Not a registered
        # sub-module: it wraps `program`, whose tensors the state dict (and the size reported) then held twice.
        object.__setattr__(self, "_compiled", torch.compile(program, dynamic=False))

    def __getstate__(self) -> dict:
        # a copy compiles its own program: deepcopy of the compiled wrapper gave back the plain graph it wraps (the
        # copy ran uncompiled, as slow as the reference ops)
        state = dict(super().__getstate__())
        state.pop("_compiled", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        object.__setattr__(self, "_compiled", torch.compile(self.program, dynamic=False))

    def forward(self, *inputs: torch.Tensor):
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True), torch.inference_mode():
            output = self._compiled(*inputs)
        # out of inference mode, every tensor of the outputs (a dict's too): in-place ops and autograd refused them
        if isinstance(output, torch.Tensor):  # (the common case, timed: no tree walk)
            return output.clone()
        return pytree.tree_map_only(torch.Tensor, torch.Tensor.clone, output)


class PT2EBackend(Backend):
    """Static (Conv2d + Linear) and dynamic (Linear) int8 via torchao's PT2E flow."""

    name = "pt2e"
    approaches = ("dynamic", "static")
    artifact_suffix = ".pt2"
    takes_torchscript = False  # (torch.export traces eager modules: it refuses a ScriptModule)
    compile = False

    def quantizable_layers(self, model: nn.Module, approach: str) -> list[str]:
        # dynamic: Linear layers only; static: and Conv2d (see quantize). An nn.MultiheadAttention reads its
        # out_proj's weight itself (no call of the layer), which the quantizer leaves fp32: named, a fallback "kept"
        # it fp32 to no effect
        types = (nn.Linear,) if approach == "dynamic" else (nn.Linear, nn.Conv2d)
        read = {f"{outer}.{inner}" if outer else inner for outer, module in model.named_modules()
                if isinstance(module, nn.MultiheadAttention) for inner, _ in module.named_modules() if inner}
        return [name for name, module in model.named_modules() if isinstance(module, types) and name not in read]

    def check_available(self) -> None:
        try:
            with warnings.catch_warnings():  # torchao's import emits torch.jit deprecation warnings
                warnings.simplefilter("ignore", DeprecationWarning)
                from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # noqa: F401
                from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer  # noqa
        except ImportError as exc:
            raise BackendUnavailableError(
                f"pt2e backend needs torchao with torchao.quantization.pt2e ({exc}); "
                "install torchao>=0.12 or drop 'pt2e' from backends."
            ) from exc

    def configure(self, config) -> None:
        super().configure(config)
        self.compile = config.compile

    def recipes(self, approach: str) -> list[Recipe]:
        reduce_range = not cpu_has_vnni()
        calibration = "histogram" if approach == "static" else "minmax"
        return [Recipe(self.name, approach, per_channel=True, calibration=calibration, reduce_range=reduce_range)]

    def quantize(self, model: nn.Module, recipe: Recipe, example_inputs: Inputs,
                 calibration: Sequence[Inputs]) -> nn.Module:
        if recipe.approach not in self.approaches:
            raise ValueError(f"pt2e backend does not support approach {recipe.approach!r}.")
        return self._quantize(model, recipe, example_inputs, calibration)

    def _quantize(self, model: nn.Module, recipe: Recipe, example_inputs: Inputs,
                  calibration: Sequence[Inputs]) -> nn.Module:
        with warnings.catch_warnings():
            # Expected notes, e.g. "The input of maxpool2d is not quantized, skip annotate".
            warnings.filterwarnings("ignore", message=".*skip annotate.*")
            warnings.simplefilter("ignore", DeprecationWarning)
            return self._quantize_unfiltered(model, recipe, example_inputs, calibration)

    def _quantize_unfiltered(self, model: nn.Module, recipe: Recipe, example_inputs: Inputs,
                             calibration: Sequence[Inputs]) -> nn.Module:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

        quantizer = xiq.X86InductorQuantizer()
        config = xiq.get_default_x86_inductor_quantization_config(is_dynamic=recipe.approach == "dynamic",
                                                                  reduce_range=recipe.reduce_range)
        if recipe.approach == "dynamic":
            # Linear layers only, as the other backends' dynamic int8 and as the search's fp32 fallback knows them
            # (a global config quantized convolutions too, which no fallback could then return to fp32)
            quantizer.set_module_type_qconfig(nn.Linear, config)
        else:
            quantizer.set_global(config)
            # X86InductorQuantizer leaves a Conv1d fp32 unless a ReLU follows it (a Conv3d always): no Conv1d is
            # quantized, so that every int8 layer is one the search knows (and can return to fp32)
            quantizer.set_function_type_qconfig(torch.nn.functional.conv1d, None)
        for name in recipe.fp32_layers:
            quantizer.set_module_name_qconfig(name, None)
        inputs = tuple(example_inputs)  # (export_program doubles a batch of 1 itself)
        structure = untraceable_structure(model, inputs)  # a dataclass output: exported flat, rebuilt below
        if structure is not None:
            model = tensor_leaves_of(model, inputs)
        try:
            graph = export_program(model.eval(), inputs, self.dynamic_dims).module()
        except FixedDimError as exc:
            raise ExportError(f"pt2e: {exc}") from exc
        except Exception as exc:
            raise ExportError(f"pt2e: torch.export failed: {type(exc).__name__}: {exc}") from exc
        with torch.no_grad():
            prepared = prepare_pt2e(graph, quantizer)
            _fold_standalone_batch_norms_(prepared)
            try:
                # dynamic: one call on the inputs it was exported on (calibration batches may hold more inputs,
                # which only a static candidate, calibrated through its graph, is refused for)
                for batch in (calibration if recipe.approach == "static" else [inputs]):
                    prepared(*copied(batch))
                converted = convert_pt2e(prepared)
            except (RuntimeError, NotImplementedError) as exc:
                # a bool mask or ids read by an int8 op: its observer fails alike at every knob ("linspace_cpu" not
                # implemented for 'Bool'), so said once, and the backend left
                said = nonfloat_input_error(exc, inputs, f"pt2e {recipe.approach}")
                if said is None:
                    raise
                raise said from exc
        _drop_unused_tensors(converted)
        if self.compile:
            result: nn.Module = CompiledInference(converted)
            result(*copied(example_inputs))  # pay the compile cost here, not inside eval/latency
        else:
            result = ExportedInference(converted)
        return result if structure is None else RebuiltOutputs(result, structure)

    def timed_form(self, quantized: nn.Module, example_inputs: Inputs) -> nn.Module:
        """The program its file holds, loaded (the converted graph in memory ran 1.25x faster on a small MLP); a
        compiled candidate (``compile=True``) as it is: what a compiled load of its file runs."""
        if self.compile:
            return quantized
        from .exported import loaded_as_its_file

        return loaded_as_its_file(lambda file: self.save(quantized, file, "{}", example_inputs,
                                                         dynamic_dims=self.dynamic_dims))

    def save(self, quantized: nn.Module, path: str, metadata: str, example_inputs: Inputs, *,
             dynamic_dims=None) -> None:
        structure = None
        if isinstance(quantized, RebuiltOutputs):  # a flat program and the structure its output is rebuilt to
            structure, quantized = quantized.structure, quantized.model
        module = quantized.program if isinstance(quantized, ExportedInference) else quantized
        # already an eval-mode export
        save_program(module, path, metadata, example_inputs, eval_mode=False, dynamic_dims=dynamic_dims,
                     outputs=structure)
