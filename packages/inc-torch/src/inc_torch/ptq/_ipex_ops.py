"""Which conv/linear ops of an IPEX TorchScript model run INT8, named after their modules.

Freezing inlines every module call and folds each weight into a constant, so the frozen graph no longer
says which module an op came from. Before freezing, each INT8 conv/linear reads its weight through
``GetAttr chain -> quantize_per_channel/per_tensor -> dequantize``; the dequantized weight is named here
after its module (``inc_int8_weight_<path>``). Named values keep their names through freezing and
``torch.jit.save``/``load`` (the same way the BF16 input casts of :mod:`inc_torch.ptq._bf16_script` are
found again), so :func:`script_int8_ops` can list a frozen or reloaded model's INT8 ops.
"""

from __future__ import annotations

from typing import Any

import torch

from inc_torch.ptq._bf16_script import WEIGHTED_OPS, module_debug_name, module_of, named_module

__all__ = ["dequantized", "name_int8_ops", "script_int8_ops"]

_QUANTIZE = frozenset({"aten::quantize_per_channel", "aten::quantize_per_tensor"})
_PREFIX = "inc_int8_weight_"


def _skip_aliases(value: Any) -> Any:
    # IPEX 2.8's traced graphs put an aten::alias between a dequantize and the op reading it.
    while value.node().kind() == "aten::alias":
        value = value.node().input()
    return value


def dequantized(value: Any) -> bool:
    """Whether ``value`` comes from an ``aten::dequantize`` (through IPEX's aliases)."""
    return bool(_skip_aliases(value).node().kind() == "aten::dequantize")


def name_int8_ops(traced: torch.jit.ScriptModule) -> None:
    """Name the dequantized weight of each INT8 conv/linear of ``traced`` (not yet frozen) after its module."""
    graph = traced.graph
    torch._C._jit_pass_inline(graph)  # calls into submodules become their ops, each reading its GetAttr chain
    for node in graph.nodes():
        if node.kind() not in WEIGHTED_OPS or not dequantized(node.inputsAt(0)):
            continue  # an FP32 op (excluded, or kept in float by IPEX) reads a float input
        weight = _skip_aliases(node.inputsAt(1))
        if weight.node().kind() != "aten::dequantize" or weight.node().input().node().kind() not in _QUANTIZE:
            continue
        module_path = module_of(weight.node().input().node().inputsAt(0))
        if module_path is not None:
            weight.setDebugName(module_debug_name(module_path, _PREFIX))


def script_int8_ops(model: torch.jit.ScriptModule) -> list[str]:
    """Module paths of the INT8 conv/linear ops named by :func:`name_int8_ops`, in graph order."""
    try:
        graph = model.graph
    except (AttributeError, RuntimeError):
        return []
    names = [
        named_module(_skip_aliases(node.inputsAt(1)), _PREFIX)
        for node in graph.nodes()
        if node.kind() in WEIGHTED_OPS and len(list(node.inputs())) > 1 and dequantized(node.inputsAt(0))
    ]
    return list(dict.fromkeys(name for name in names if name is not None))
