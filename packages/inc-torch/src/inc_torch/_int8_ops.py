"""How many ops of a quantized torch model compute on INT8 data, per op type, counted from the model itself.

This is what a result reports, rather than what was asked for: torch.ao's and torchao's flows may leave a
selected op in float (no pattern matched it), quantize ops nobody listed, or, for dynamic quantization,
meet layers that are not ``nn.Linear`` at all; only the model says what it holds. Per kind of model:

- PT2E (a :class:`CompiledQuantizedModule`, from ``inc.quantize``, ``inc_torch.convert`` after QAT or
  ``inc.load``): the converted graph holds quantize/dequantize pairs around the ops inductor lowers to
  oneDNN INT8 kernels. A conv/linear/matmul counts when it reads a dequantized activation and an int8
  weight constant; any other op (add, pooling, cat) when every tensor it reads is dequantized and every
  consumer of its output quantizes it again (a float op between a dequantize and a quantize is not an
  INT8 op). Op types are aten's names (``conv2d``, ``linear``).
- FX (torch.ao quantized modules, also after FX QAT): the graph is followed from each ``quantize_per_tensor``
  to each ``dequantize``. The quantized modules count (typed as torch names them: ``QuantizedConvReLU2d``,
  ``QuantizedHardswish``), so do the ``quantized::`` functions (``add``, ``cat``, ``mul``) and every other op
  that runs on a quantized tensor (pooling, ReLU; typed by module class or function name). Ops that only
  move or re-view data (view, flatten, getitem) are exact and are not counted, as ``describe`` lists them.
- dynamic (``DynamicQuantizedLinear``, ``DynamicQuantizedLSTM``...): each dynamically quantized module.
- embedding tables quantized per row (``QuantizedEmbedding``, ``QuantizedEmbeddingBag``; FX and dynamic; PT2E:
  ``embedding``, an ``aten.embedding`` of a uint8 table): each lookup, which reads 8-bit rows though its output is
  float (as LiteRT's GATHER on an int8 table counts).
- TorchScript (a loaded ``.pt`` model, IPEX's frozen model): the scripted quantized modules (typed as
  above), the ``quantized::`` calls of the top-level graph (``add``, ``cat``), and, for graphs in
  quantize/dequantize form (IPEX), the conv/linear ops reading a dequantized input and weight. A scripted
  graph's values carry no dtype, so aten ops running on quantized tensors (pooling) are not seen there.
"""

from __future__ import annotations

import collections
from typing import Any

import torch
from torch import nn

from inc_torch.ptq._compiled import CompiledQuantizedModule
from inc_torch.ptq._lookups import QUANTIZED_LOOKUPS

__all__ = ["int8_op_counts"]

_STATIC_ROOTS = ("torch.ao.nn.quantized.modules", "torch.ao.nn.intrinsic.quantized.modules")
# Where inc's quantized lookups live (scripted modules keep their class's qualified name).
_LOOKUPS_ROOT = "inc_torch.ptq._lookups"
_DYNAMIC_ROOTS = ("torch.ao.nn.quantized.dynamic", "torch.ao.nn.intrinsic.quantized.dynamic")
# Calls that move, select or re-view data, or read a tensor's metadata: exact on 8-bit values, not ops.
_MOVES = frozenset({
    "view", "reshape", "flatten", "transpose", "permute", "contiguous", "squeeze", "unsqueeze", "getitem",
    "chunk", "split", "size", "detach", "expand", "repeat", "narrow", "unflatten", "t", "getattr", "dim",
    "numel", "clone", "to", "type_as", "q_scale", "q_zero_point", "int_repr", "select", "slice", "alias",
})
# Calls that read a tensor's metadata: their result is a Python number or a shape, not data, so the
# arithmetic on it (ShuffleNet's ``channels // groups``) is not an op on quantized values.
_METADATA = frozenset({"size", "dim", "numel", "getattr", "q_scale", "q_zero_point", "stride", "shape"})
_MOVING_MODULES = (nn.Identity, nn.Dropout, nn.Flatten, nn.Unflatten)
_PT2E_QUANTIZE = ("quantize_per_tensor", "quantize_per_channel")
_PT2E_DEQUANTIZE = ("dequantize_per_tensor", "dequantize_per_channel")
_WEIGHTED = frozenset({"conv1d", "conv2d", "conv3d", "linear", "matmul", "bmm", "mm", "addmm", "convolution"})


def int8_op_counts(model: Any) -> dict[str, int] | None:
    """Per op type, the ops of ``model`` that run INT8 kernels (see the module docstring); None for a non-torch model."""
    if isinstance(model, CompiledQuantizedModule):
        return _pt2e(model.graph_module)
    if isinstance(model, torch.jit.ScriptModule):
        return _torchscript(model)
    if not isinstance(model, nn.Module):
        return None
    counts: collections.Counter[str] = collections.Counter()
    if isinstance(model, torch.fx.GraphModule):
        if any(n.op == "call_function" and "quantized_decomposed" in str(n.target) for n in model.graph.nodes):
            return _pt2e(model)
        counts.update(_fx(model))
    else:
        for module in model.modules():
            if _is_static(module):  # eager-mode quantized modules (a model converted outside FX)
                counts[module._get_name()] += 1
    for module in model.modules():
        if type(module).__module__.startswith(_DYNAMIC_ROOTS) and not _is_weight_holder(module):
            counts[module._get_name()] += 1
    return dict(counts)


def _is_weight_holder(module: nn.Module) -> bool:
    # LinearPackedParams / PackedParameter hold a quantized Linear's weight: part of that op, not an op.
    return type(module).__name__.endswith(("PackedParams", "PackedParameter"))


def _is_static(module: nn.Module) -> bool:
    name = type(module).__name__
    if isinstance(module, QUANTIZED_LOOKUPS):
        return True  # inc's subclasses of torch.ao's quantized lookups (inc_torch.ptq._lookups)
    return (
        type(module).__module__.startswith(_STATIC_ROOTS)
        and not _is_weight_holder(module)
        and name not in ("Quantize", "DeQuantize")
        and not type(module).__module__.startswith(_DYNAMIC_ROOTS)
    )


def _callable_name(target: Any) -> str:
    return str(getattr(target, "__name__", target)).split(".")[0].strip("_") or str(target)


def _tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return [n for n in found if n.op != "get_attr"]


# ---------------------------------------------------------------------------------------------- FX
def _fx(graph_module: torch.fx.GraphModule) -> collections.Counter[str]:
    """Follow quantized tensors through the graph; count the ops that read them (and the quantized modules)."""
    counts: collections.Counter[str] = collections.Counter()
    quantized: set[torch.fx.Node] = set()
    for node in graph_module.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        name = _callable_name(node.target) if node.op != "call_module" else ""
        reads_int8 = any(n in quantized for n in _tensor_inputs(node))
        if name in ("quantize_per_tensor", "quantize_per_channel", "quantize_per_tensor_dynamic"):
            quantized.add(node)
            continue
        if name == "dequantize":
            continue
        if node.op == "call_module":
            module = graph_module.get_submodule(str(node.target))
            if type(module).__module__.startswith(_DYNAMIC_ROOTS):
                continue  # float in, float out: counted with the dynamic modules
            if type(module).__name__ == "Quantize":
                quantized.add(node)
            elif _is_static(module):
                counts[module._get_name()] += 1
                quantized.add(node)
            elif reads_int8:
                quantized.add(node)
                if not isinstance(module, _MOVING_MODULES):
                    counts[type(module).__name__] += 1
            continue
        if str(node.target).startswith("quantized.") and "prepack" not in name:
            counts[name] += 1  # torch.ops.quantized.add / cat / mul / conv2d ...
            quantized.add(node)
        elif reads_int8 and name not in _METADATA:
            quantized.add(node)
            if name not in _MOVES:
                counts[name] += 1
    return counts


# ---------------------------------------------------------------------------------------------- PT2E
def _kind(node: object, names: tuple[str, ...]) -> bool:
    return (
        isinstance(node, torch.fx.Node)
        and node.op == "call_function"
        and str(node.target).startswith("quantized_decomposed.")
        and str(node.target).split(".")[1] in names
    )


def _int8_constant(graph_module: torch.fx.GraphModule, node: object) -> bool:
    """``node`` dequantizes an int8 constant (a weight PT2E folded to int8)."""
    if not _kind(node, _PT2E_DEQUANTIZE):
        return False
    source = node.args[0] if node.args else None  # type: ignore[union-attr]
    if not isinstance(source, torch.fx.Node) or source.op != "get_attr":
        return False
    value: object = graph_module
    for part in str(source.target).split("."):
        value = getattr(value, part, None)
    return isinstance(value, torch.Tensor) and value.dtype == torch.int8


def _pt2e(graph_module: torch.fx.GraphModule) -> dict[str, int]:
    from inc_torch.ptq._pt2e_tables import is_table_lookup

    counts: collections.Counter[str] = collections.Counter()
    for node in graph_module.graph.nodes:
        if is_table_lookup(graph_module, node):
            counts["embedding"] += 1  # rows of an 8-bit table (its scale and minimum gathers are not counted)
            continue
        if node.op != "call_function" or str(node.target).startswith("quantized_decomposed."):
            continue
        name = _callable_name(node.target)
        inputs = _tensor_inputs(node)
        if not inputs or name in _MOVES:
            continue
        weights = [n for n in node.args[1:2] if _int8_constant(graph_module, n)]
        activations = [n for n in inputs if n not in weights]
        if name in _WEIGHTED and weights:
            if activations and _kind(activations[0], _PT2E_DEQUANTIZE):
                counts[name] += 1
            continue
        dequantized = all(_kind(n, _PT2E_DEQUANTIZE) for n in activations)
        requantized = bool(node.users) and all(_kind(user, _PT2E_QUANTIZE) for user in node.users)
        if dequantized and requantized:
            counts[name] += 1
    return dict(counts)


# ---------------------------------------------------------------------------------------------- TorchScript
def _torchscript(model: torch.jit.ScriptModule) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for module in model.modules():
        # A scripted quantized module keeps its class's qualified name: typed as torch names it eagerly.
        qualified = module._c._type().qualified_name() if hasattr(module, "_c") else ""
        original = getattr(module, "original_name", "")
        if original.endswith(("PackedParams", "PackedParameter")) or original in ("Quantize", "DeQuantize"):
            continue
        if any(root in qualified for root in _DYNAMIC_ROOTS):
            counts[f"DynamicQuantized{original}"] += 1
        elif any(root in qualified for root in _STATIC_ROOTS):
            counts[f"Quantized{original}"] += 1
        elif _LOOKUPS_ROOT in qualified:
            counts[original] += 1  # inc's lookups are named QuantizedEmbedding(Bag) already
    try:
        graph = model.graph
    except (AttributeError, RuntimeError):
        return dict(counts)
    counts.update(_script_graph_ops(graph))
    return dict(counts)


def _script_nodes(block: Any) -> Any:
    for node in block.nodes():
        yield node
        for inner in node.blocks():
            yield from _script_nodes(inner)


def _script_graph_ops(graph: Any) -> collections.Counter[str]:
    """``quantized::`` calls of the top-level graph, and ops in quantize/dequantize form (IPEX's frozen graphs).

    Calls into submodules are not followed: their quantized modules are counted by type above.
    """
    from inc_torch.ptq._ipex_ops import dequantized  # through IPEX 2.8's aliases after each dequantize

    counts: collections.Counter[str] = collections.Counter()
    for node in _script_nodes(graph):
        namespace, _, op = node.kind().partition("::")
        if namespace == "quantized":
            if "prepack" not in op and "unpack" not in op:
                counts[op] += 1
            continue
        if namespace != "aten" or op.strip("_") in _MOVES or op in ("dequantize", "quantize_per_tensor", "quantize_per_channel"):
            continue
        inputs = [v for v in node.inputs() if v.type().kind() == "TensorType"]
        # Only conv/linear with a dequantized input and weight: what IPEX's passes turn into INT8 kernels for
        # certain. A float op between a dequantize and a quantize runs in float in a scripted FX model.
        if op.strip("_") in _WEIGHTED and len(inputs) > 1 and dequantized(inputs[0]) and dequantized(inputs[1]):
            counts[op.strip("_")] += 1
    return counts
