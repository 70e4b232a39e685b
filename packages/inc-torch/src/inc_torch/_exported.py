"""FP32 models the user exported with ``torch.export``: an ``ExportedProgram``, its ``.module()``, or a ``.pt2`` file.

torchao's own PT2E flow starts from ``torch.export.export(model, example).module()``, and a deployment
pipeline may keep nothing but that program. Its graph still names every op after the module it came from
(``nn_module_stack``), which is what inc's PT2E path reads in the graphs it exports itself: the program is
quantized on that path, ops listed, excluded and tuned by those module names.

What needs the ``nn.Module`` stays with it: dynamic quantization and FX swap its layers, IPEX prepares them,
SmoothQuant rescales them before export, and QAT trains them; those refuse a program, naming the way out.
"""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Any

import torch

from inc_core.backend import Op
from inc_core.errors import UnsupportedModelError
from inc_torch._module_stack import module_path

__all__ = ["is_exported_graph", "exported_ops", "warn_unnamed", "restore_source_partitions", "hf_conv1d_call", "hf_conv1d_as_linear", "shape_hint", "check_exported_config", "FROM_MODULE"]

log = logging.getLogger("inc")

_aten = torch.ops.aten
# Ops of an exported graph that the PT2E path quantizes, by the layer type inc lists them as (conv1d and the
# transposed convolutions through inc's graph rewrites, see ptq._conv1d and ptq._conv_transpose).
_QUANTIZED = {
    _aten.conv1d.default: "Conv1d",
    _aten.conv2d.default: "Conv2d",
    _aten.conv_transpose1d.default: "ConvTranspose1d",
    _aten.conv_transpose2d.input: "ConvTranspose2d",
    _aten.linear.default: "Linear",
}
_TRANSPOSED = (_aten.conv_transpose1d.default, _aten.conv_transpose2d.input)
_DILATION_ARG = 7
_LOOKUPS = {_aten.embedding.default: "Embedding", _aten.embedding_bag.padding_idx: "EmbeddingBag"}
_BAG_PADDING_ARG = 8

_MODULE_PATHS = {"fx": "format='fx' traces", "torchscript": "backend='ipex' prepares"}
FROM_MODULE = "pass the nn.Module you exported instead (inc exports it itself)"


def is_exported_graph(model: Any) -> bool:
    """Whether ``model`` is a graph of ATen ops, as ``ExportedProgram.module()`` gives (not an FX-traced module)."""
    if not isinstance(model, torch.fx.GraphModule):
        return False
    return any(node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) for node in model.graph.nodes)


def _stored_table(node: torch.fx.Node) -> bool:
    """A lookup of a table stored in the graph, which the PT2E path may keep 8 bits per row (see ptq._pt2e_tables:
    a table that something other than lookups also reads, a tied output projection, stays FP32 there with a log
    line, as for a module)."""
    table = node.args[0] if node.args else None
    if not isinstance(table, torch.fx.Node) or table.op != "get_attr":
        return False
    # the PT2E 8-bit bag cannot leave a padding index out
    return not (node.target is _aten.embedding_bag.padding_idx and len(node.args) > _BAG_PADDING_ARG and node.args[_BAG_PADDING_ARG] is not None)


def _innermost_class(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    cls = list(stack.values())[-1][1]
    return f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else str(cls)


def _attribute(graph_module: torch.fx.GraphModule, node: object) -> torch.Tensor | None:
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    value: Any = graph_module
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    return value if isinstance(value, torch.Tensor) else None


def _depthwise(graph_module: torch.fx.GraphModule, conv1d: torch.fx.Node) -> bool:
    """A conv1d with one input channel per group, as ``ptq._conv1d.is_depthwise_conv1d`` tells of modules."""
    weight = _attribute(graph_module, conv1d.args[1] if len(conv1d.args) > 1 else None)
    groups = conv1d.args[6] if len(conv1d.args) > 6 else 1
    return weight is not None and int(groups) > 1 and int(weight.shape[1]) == 1


def hf_conv1d_call(graph_module: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether ``node`` is the ``addmm(bias, x, weight)`` of a transformers ``Conv1D`` (GPT-2's projections: a Linear
    whose weight is stored ``[in, out]``), with its weight and bias as constants of the graph."""
    if node.op != "call_function" or node.target != _aten.addmm.default or len(node.args) < 3:
        return False
    cls = _innermost_class(node)
    if not (cls.startswith("transformers.") and cls.rpartition(".")[2] == "Conv1D"):
        return False
    weight, bias = _attribute(graph_module, node.args[2]), _attribute(graph_module, node.args[0])
    return weight is not None and weight.dim() == 2 and bias is not None and bias.dim() == 1


def hf_conv1d_as_linear(graph_module: torch.fx.GraphModule) -> None:
    """Rewrite, in place, each transformers ``Conv1D`` call of a program as the ``linear`` it computes (its weight
    transposed once), so that torchao's quantizer sees a Linear, as inc's own export does after swapping the module
    (see :mod:`inc_torch._hf`). A weight another op reads too stays as it is."""
    calls = [node for node in graph_module.graph.nodes if hf_conv1d_call(graph_module, node)]
    weights = {node.args[2] for node in calls}
    for weight_node in weights:
        users = list(weight_node.users)
        if any(user not in calls or user.args[2] is not weight_node or weight_node in (user.args[0], user.args[1]) for user in users):
            continue
        owner, _, attr = str(weight_node.target).rpartition(".")
        module = graph_module.get_submodule(owner) if owner else graph_module
        value = getattr(module, attr)
        setattr(module, attr, torch.nn.Parameter(value.detach().t().contiguous(), requires_grad=False))
        for user in users:
            bias, source, _ = user.args[:3]
            with graph_module.graph.inserting_after(user):
                linear = graph_module.graph.call_function(_aten.linear.default, (source, weight_node, bias))
            linear.meta = dict(user.meta)
            # torchao finds linear patterns by source; the addmm's records name the addmm
            linear.meta["torch_fn"] = (linear.name, "builtin_function_or_method.linear")
            linear.meta["source_fn_stack"] = [(linear.name, torch.nn.functional.linear)]
            user.replace_all_uses_with(linear)
            graph_module.graph.erase_node(user)
    graph_module.graph.lint()
    graph_module.recompile()


# conv2d and linear reach INT8 through torchao's patterns, found by the call they came from (inc rewrites the others).
_MATCHED = {
    _aten.linear.default: ("linear", "Linear", "torch.nn.modules.linear.Linear"),
    _aten.conv2d.default: ("conv2d", "Conv2d", "torch.nn.modules.conv.Conv2d"),
}


def _matched(node: torch.fx.Node) -> bool:
    """Whether torchao's x86 quantizer finds ``node`` as a conv2d/linear call (after :func:`restore_source_partitions`):
    not one inside a function it does not see into (``nn.MultiheadAttention``'s ``multi_head_attention_forward``,
    whose projections stay FP32 from a module too)."""
    function, cls, module = _MATCHED[node.target]
    stack = node.meta.get("source_fn_stack")
    if stack:
        return getattr(stack[-1][1], "__name__", None) in (function, cls)
    called = node.meta.get("torch_fn")
    if called:
        return str(called[1]).rpartition(".")[2] == function
    return _innermost_class(node) == module


def _candidates(graph_module: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, str]]:
    found = []
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        if hf_conv1d_call(graph_module, node):
            found.append((node, "Conv1D"))  # listed as for the module; quantized as the Linear it is
            continue
        if node.target in _TRANSPOSED and len(node.args) > _DILATION_ARG and any(d != 1 for d in node.args[_DILATION_ARG]):
            continue  # a dilated one stays a transposed convolution, in FP32 (see ptq._conv_transpose)
        if node.target is _aten.conv1d.default and _depthwise(graph_module, node):
            continue  # stays FP32: oneDNN's INT8 depthwise conv1d can stall (see ptq._conv1d)
        if node.target in _QUANTIZED and (node.target not in _MATCHED or _matched(node)):
            found.append((node, _QUANTIZED[node.target]))
        elif node.target in _LOOKUPS and _stored_table(node):
            found.append((node, _LOOKUPS[node.target]))
    return found


def warn_unnamed(graph_module: torch.fx.GraphModule) -> None:
    """Log what the program leaves out of the op list: calls made outside any submodule, and its Conv3d layers.

    A module's Conv3d layers get the same warning from ``warn_left_in_float`` (PT2E keeps them FP32: torchao
    has no 3-D conv pattern); here the way out is the module, since FX cannot trace a program.
    """
    outside = [node.name for node, _ in _candidates(graph_module) if module_path(node) is None]
    if outside:
        log.warning(
            "%d op(s) of the program are called outside any submodule (%s): inc lists, excludes and sets ops by the "
            "module that calls them, so these are left to torchao's quantizer; call them from a submodule to set them",
            len(outside), ", ".join(outside[:5]),
        )
    conv3d = [
        module_path(node) or node.name
        for node in graph_module.graph.nodes
        if node.op == "call_function" and node.target is _aten.conv3d.default
    ]
    names = list(dict.fromkeys(conv3d))
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        log.warning(
            "format='pt2e' leaves %d Conv3d layer(s) of the program in FP32: %s. They become INT8 with format='fx' "
            "on the nn.Module the program was exported from (FX cannot trace a program).", len(names), shown,
        )


def _torch_class(qualified: object) -> type | None:
    """The class ``nn_module_stack`` names (a string in a non-strict program), if it is one of torch.nn's."""
    if isinstance(qualified, type):
        return qualified if qualified.__module__.startswith("torch.nn.") else None
    if not isinstance(qualified, str) or not qualified.startswith("torch.nn."):
        return None
    module, _, name = qualified.rpartition(".")
    found = getattr(importlib.import_module(module), name, None)
    return found if isinstance(found, type) else None


@functools.cache
def _quantizer_sources() -> tuple[dict[str, Any], frozenset[Any]]:
    """The functions torchao's x86 quantizer matches patterns by (its equivalent-types table), by name, and all of
    that table's entries."""
    from torchao.quantization.pt2e import graph_utils

    by_name: dict[str, Any] = {"linear": torch.nn.functional.linear}
    known: set[Any] = {torch.nn.functional.linear}
    for group in getattr(graph_utils, "_EQUIVALENT_TYPES", ()):
        names = {item for item in group if isinstance(item, str)}  # matched by name by torchao itself
        known.update(group)
        for item in group:
            if callable(item) and not isinstance(item, type) and getattr(item, "__name__", None) not in names:
                by_name.setdefault(item.__name__, item)
    return by_name, frozenset(known)


def restore_source_partitions(graph_module: torch.fx.GraphModule) -> None:
    """Record, in place, the call each node came from in the form torchao's x86 quantizer matches its patterns by.

    ``torch.export.export``'s default (non-strict) capture records no ``source_fn_stack``, and the quantizer then
    finds its conv-bn-relu patterns by innermost module only: a functional ``F.relu`` inside a block
    (torchvision's GoogLeNet) matched no ReLU, so the relu, and the pools and concatenations after it, stayed FP32
    (57 INT8 convolutions but no INT8 pool or cat, against 13 + 9 from the module); and the two calls of one shared
    ``nn.ReLU`` (ResNet's blocks) became one partition with two outputs, which it refuses ("Input partition has more
    than one output node"). A strict export records ``torch.relu(x)`` as ``torch.relu``, which the quantizer's table
    lacks (it has ``F.relu``): the conv before it was not fused with it, and the pool after it stayed FP32.
    Each call here gets its own source: the table's function of the same name as the one it called (from
    ``source_fn_stack``, or the program's ``torch_fn`` record), or else its torch.nn module, one per run of its nodes.
    """
    by_name, known = _quantizer_sources()
    runs: dict[str, list[list[torch.fx.Node]]] = {}
    previous: str | None = None
    for node in graph_module.graph.nodes:
        path = None
        stack = node.meta.get("source_fn_stack") if node.op == "call_function" else None
        if stack:
            name, function = stack[-1]
            if callable(function) and not isinstance(function, type) and function not in known:
                same = by_name.get(getattr(function, "__name__", ""))
                if same is not None:
                    node.meta["source_fn_stack"] = [*stack[:-1], (name, same)]
        elif node.op == "call_function":
            called = node.meta.get("torch_fn")
            function = by_name.get(str(called[1]).rpartition(".")[2]) if called else None
            if function is not None:
                node.meta["source_fn_stack"] = [(str(called[0]), function)]
            else:
                path = module_path(node)
        if path is not None:
            calls = runs.setdefault(path, [])
            if path != previous:
                calls.append([])
            calls[-1].append(node)
        previous = path
    for path, calls in runs.items():
        cls = _torch_class(list(calls[0][0].meta["nn_module_stack"].values())[-1][1])
        if len(calls) < 2 or cls is None:
            continue
        for index, nodes in enumerate(calls):
            for node in nodes:
                node.meta["source_fn_stack"] = [(f"{path}#{index}", cls)]


def exported_ops(graph_module: torch.fx.GraphModule, *, approach: str, fmt: str) -> tuple[Op, ...]:
    """The ops static PT2E quantizes in an exported graph, named after the module each was called in.

    An op called outside any submodule (a functional call in the top-level forward) has no name ``exclude=`` or
    ``overrides=`` could reach (torchao's quantizer selects by module name): it is not listed (see :func:`warn_unnamed`).

    Raises:
        UnsupportedModelError: dynamic quantization or ``format='fx'``, which work on the module.
    """
    if approach != "static" or fmt != "pt2e":
        path = "dynamic quantization swaps" if approach != "static" else _MODULE_PATHS.get(fmt, f"format={fmt!r} works on")
        raise UnsupportedModelError(
            f"The model is a torch.export program; {path} the layers of an nn.Module, which a program no longer has. "
            f"Quantize the program with the torch backend's static PT2E path (approach='static', format='pt2e'), or {FROM_MODULE}."
        )
    ops: dict[str, Op] = {}
    for node, op_type in _candidates(graph_module):
        if (path := module_path(node)) is not None:
            ops.setdefault(path, Op(name=path, op_type=op_type))
    # In definition order, as inc lists the modules of an nn.Module: the program keeps its parameters in that order.
    order: dict[str, int] = {}
    for name in graph_module.state_dict():
        parts = name.split(".")[:-1]
        for cut in range(1, len(parts) + 1):  # a module computing with its children's weights comes where they do
            order.setdefault(".".join(parts[:cut]), len(order))
    return tuple(sorted(ops.values(), key=lambda op: order.get(op.name, len(order))))


def shape_hint(model: Any, exc: BaseException) -> str:
    """Advice for inputs a program's shape guards refused (it was exported for fixed sizes), else ``""``."""
    if not is_exported_graph(model) or "Guard failed" not in str(exc):
        return ""
    return (
        " The torch.export program checks its input shapes: calibrate with batches of the shapes it was exported for, "
        "or export it with dynamic_shapes (torch.export.Dim) for the dimensions that vary, such as the batch."
    )


def check_exported_config(smooth_quant: Any) -> None:
    """Raises UnsupportedModelError for SmoothQuant, which rescales the module's layers before export."""
    if smooth_quant is not None:
        raise UnsupportedModelError(
            f"The model is a torch.export program; SmoothQuant rescales the layers of the nn.Module before export. "
            f"Leave smooth_quant unset for the program, or {FROM_MODULE}."
        )
