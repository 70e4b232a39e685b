"""Which ops of a converted model run INT8: for tests, reports and users checking a result."""

from __future__ import annotations

import torch
from torch import nn

from inc_torch._module_stack import module_path
from inc_torch.ptq._compiled import CompiledQuantizedModule
from inc_torch.ptq._lookups import QUANTIZED_LOOKUPS

__all__ = ["quantized_ops"]

_WEIGHTED = ("conv1d", "conv2d", "conv3d", "linear")


def _int8_attr(graph_module: torch.fx.GraphModule, node: object) -> bool:
    """True when ``node`` dequantizes an int8 constant (the weight a PT2E INT8 op consumes)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or "dequantize" not in str(node.target):
        return False
    source = node.args[0] if node.args else None
    if not isinstance(source, torch.fx.Node) or source.op != "get_attr":
        return False
    value: object = graph_module
    for part in str(source.target).split("."):
        value = getattr(value, part)
    return isinstance(value, torch.Tensor) and value.dtype == torch.int8


def _pt2e_ops(graph_module: torch.fx.GraphModule) -> list[str]:
    from inc_torch.ptq._pt2e_tables import is_table_lookup

    names: list[str] = []
    for node in graph_module.graph.nodes:
        if is_table_lookup(graph_module, node):  # an embedding table stored 8 bits per row
            names.append(module_path(node) or node.name)
            continue
        if node.op != "call_function" or getattr(node.target, "__name__", "").split(".")[0] not in _WEIGHTED:
            continue
        if len(node.args) > 1 and _int8_attr(graph_module, node.args[1]):
            names.append(module_path(node) or node.name)
    return list(dict.fromkeys(names))


def _fx_functional_ops(graph_module: torch.fx.GraphModule) -> list[str]:
    """FX-converted calls of ``quantized::conv*``/``quantized::linear*`` with packed int8 weights, named after the
    module they were traced from: torch.ao quantizes a conv/linear *call* inside a module FX traces through
    (torchvision's ``Conv3DSimple``, a subclass of ``nn.Conv3d``) as a function, not as a quantized module."""
    names = []
    for node in graph_module.graph.nodes:
        namespace, _, op = str(node.target).partition(".")
        if node.op != "call_function" or namespace != "quantized" or not op.startswith(("conv", "linear")):
            continue
        if "prepack" in op or "unpack" in op:
            continue
        names.append(module_path(node) or node.name)
    return names


_QUANTIZED_ROOTS = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")


def _is_quantized_module(module: nn.Module) -> bool:
    if isinstance(module, torch.jit.ScriptModule):
        # Scripted quantized modules keep their packed int8 weights; the holder of a Linear's packed
        # parameters is not an op itself.
        if getattr(module, "original_name", "") in ("LinearPackedParams", "PackedParameter"):
            return False
        return hasattr(module, "_packed_params") or hasattr(module, "_all_weight_values")
    if isinstance(module, QUANTIZED_LOOKUPS):
        return True  # inc's own lookups subclass torch.ao's (see inc_torch.ptq._lookups)
    if not type(module).__module__.startswith(_QUANTIZED_ROOTS):
        return False
    # Quantize/DeQuantize stubs and packed-parameter holders are not ops with an int8 weight.
    return callable(getattr(module, "weight", None)) or hasattr(module, "_all_weight_values")


def quantized_ops(model: nn.Module) -> list[str]:
    """Names of the ops of ``model`` that run INT8 kernels with int8 weights.

    Works on what the torch backend returns: a PT2E :class:`CompiledQuantizedModule` (conv/linear ops fed
    by an int8 weight through a dequantize node, named by their source module), an FX or dynamically
    quantized module (torch.ao quantized modules), a loaded TorchScript model, and an IPEX model (frozen
    TorchScript whose INT8 ops are named after their modules, see :mod:`inc_torch.ptq._ipex_ops`).
    """
    if isinstance(model, CompiledQuantizedModule):
        return _pt2e_ops(model.graph_module)
    if isinstance(model, torch.fx.GraphModule) and any(
        n.op == "call_function" and "quantized_decomposed" in str(n.target) for n in model.graph.nodes
    ):
        return _pt2e_ops(model)
    modules = [name for name, module in model.named_modules() if name and _is_quantized_module(module)]
    if isinstance(model, torch.fx.GraphModule):
        return list(dict.fromkeys(modules + _fx_functional_ops(model)))
    if isinstance(model, torch.jit.ScriptModule):
        from inc_torch.ptq._ipex_ops import script_int8_ops

        return list(dict.fromkeys(modules + script_int8_ops(model)))  # IPEX's frozen graphs hold no modules
    return modules
