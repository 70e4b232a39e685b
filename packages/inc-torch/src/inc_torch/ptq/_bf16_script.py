"""BF16 mixed precision on the IPEX path: chosen FP32 fallback ops of a traced model run in BF16.

IPEX's converted model calls each leaf Linear/Conv through its own dispatch (module hooks never run, and a
module of another type breaks its op bookkeeping), and its own INT8 + BF16 recipe (tracing under
``torch.autocast``) puts *every* float op in BF16. So the choice is made on the traced TorchScript graph,
before it is frozen: each chosen conv/linear gets its input, weight and bias cast to BF16 and its output
cast back to the dtype it had, the same rewrite :mod:`inc_torch.ptq._bf16` does on PT2E graphs. Freezing
folds the weight casts into BF16 constants (the FP32 weights leave the model), and IPEX's fusion passes
turn the BF16 ops into prepacked oneDNN BF16 kernels (``ipex_prepack::linear_run``/``convolution_run``).

The input cast of each op is named after its module (``inc_bf16_input_<path>``): that name survives
freezing and ``torch.jit.save``/``load``, so :func:`script_bf16_ops` can say which ops run in BF16.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from inc_core.errors import UnsupportedModelError

__all__ = ["WEIGHTED_OPS", "module_debug_name", "module_of", "named_module", "run_script_ops_in_bf16", "script_bf16_ops"]

# Traced forms of conv/linear calls; the weight is their second input.
WEIGHTED_OPS = frozenset({"aten::linear", "aten::_convolution", "aten::conv1d", "aten::conv2d", "aten::conv3d"})
_PREFIX = "inc_bf16_input_"
# torch's ScalarType codes, the form aten::to takes a dtype in.
_DTYPE_CODES = {torch.bfloat16: 15, torch.float32: 6, torch.float16: 5, torch.float64: 7}


def module_debug_name(module_path: str, prefix: str = _PREFIX) -> str:
    """A graph value name carrying ``module_path``: it survives freezing and ``torch.jit.save``/``load``."""
    # Module paths hold dots, and a value name ending in ".<digits>" is read back as a uniquing suffix.
    return prefix + module_path.replace(".", "__")


def named_module(value: Any, prefix: str = _PREFIX) -> str | None:
    """The module path :func:`module_debug_name` put on ``value`` (``None`` for a value it did not name)."""
    name = re.sub(r"\.\d+$", "", value.debugName())
    return name[len(prefix):].replace("__", ".") if name.startswith(prefix) else None


def module_of(value: Any) -> str | None:
    """The module path a traced value reads its tensor from (``encoder.0.fc`` for ``self.encoder.0.fc.weight``)."""
    parts = []
    node = value.node()
    while node.kind() == "prim::GetAttr":
        parts.append(node.s("name"))
        node = node.input().node()
    if node.kind() != "prim::Param" or len(parts) < 2:
        return None
    return ".".join(reversed(parts[1:]))


def _constant(graph: Any, before: Any, value: int | bool | None) -> Any:
    node = graph.create("prim::Constant")
    if value is None:
        node.output().setType(torch._C.NoneType.get())
    elif isinstance(value, bool):
        node.i_("value", int(value))
        node.output().setType(torch._C.BoolType.get())
    else:
        node.i_("value", value)
        node.output().setType(torch._C.IntType.get())
    node.insertBefore(before)
    return node.output()


def _cast(graph: Any, value: Any, dtype: torch.dtype, before: Any) -> Any:
    """An ``aten::to(value, dtype)`` node inserted before ``before``."""
    inputs = [value, _constant(graph, before, _DTYPE_CODES[dtype]), _constant(graph, before, False),
              _constant(graph, before, False), _constant(graph, before, None)]
    node = graph.create("aten::to", inputs, 1)
    node.insertBefore(before)
    kind = value.type()
    known = isinstance(kind, torch._C.TensorType) and kind.dtype() is not None
    node.output().setType(kind.with_dtype(dtype) if known else torch._C.TensorType.get())
    return node


def _rewrite(graph: Any, node: Any, module_path: str) -> None:
    for index in range(min(3, len(list(node.inputs())))):  # input, weight, bias
        value = node.inputsAt(index)
        if not isinstance(value.type(), torch._C.TensorType):
            continue  # no bias (a None constant)
        cast = _cast(graph, value, torch.bfloat16, node)
        node.replaceInput(index, cast.output())
        if index == 0:
            cast.output().setDebugName(module_debug_name(module_path))
    out = node.output()
    kind = out.type()
    known = isinstance(kind, torch._C.TensorType) and kind.dtype() is not None
    back = _cast(graph, out, kind.dtype() if known else torch.float32, node)
    back.moveAfter(node)
    out.replaceAllUsesWith(back.output())
    back.replaceInput(0, out)
    if known:
        out.setType(kind.with_dtype(torch.bfloat16))


def run_script_ops_in_bf16(traced: torch.jit.ScriptModule, names: tuple[str, ...]) -> None:
    """Rewrite the forward graph of ``traced`` (not yet frozen) so the conv/linear ops of ``names`` run in BF16.

    Only ops that read an FP32 weight straight from their module are rewritten: INT8 ops read a dequantized
    weight, and ops kept out of INT8 read the parameter itself.

    Raises:
        UnsupportedModelError: a module of ``names`` has no FP32 conv/linear call in the traced graph.
    """
    if not names:
        return
    graph = traced.graph
    torch._C._jit_pass_inline(graph)  # calls into submodules become their ops, each reading its GetAttr chain
    wanted, found = set(names), set()
    for node in list(graph.nodes()):
        if node.kind() not in WEIGHTED_OPS:
            continue
        module_path = module_of(node.inputsAt(1))
        if module_path in wanted:  # every call of a module called more than once
            _rewrite(graph, node, module_path)
            found.add(module_path)
    missing = sorted(wanted - found)
    if missing:
        raise UnsupportedModelError(
            f"BF16 was asked for {missing}, but the traced IPEX graph has no FP32 conv/linear op reading those "
            "modules' weights (their forward does not call a Linear/Conv op). Keep them in FP32 with exclude= instead."
        )
    torch._C._jit_pass_lint(graph)


def script_bf16_ops(model: torch.jit.ScriptModule) -> list[str]:
    """Names of the ops of an IPEX TorchScript model that run in BF16, in graph order (saved and loaded ones too)."""
    try:
        graph = model.graph
    except (AttributeError, RuntimeError):
        return []
    names = [named_module(node.output()) for node in graph.nodes() if node.kind() == "aten::to"]
    return list(dict.fromkeys(name for name in names if name is not None))
