"""BF16 mixed precision on the PT2E path: ops kept out of INT8 run in BF16 instead of FP32.

``QuantConfig(bf16=inc.LayerFilter(...))`` (or ``TuningConfig(fallback_precision="bf16")``) names conv/linear
ops that leave INT8. They are kept out of the quantizer exactly like ``exclude``d ops, then the converted
graph is rewritten so that each one reads a BF16 copy of its input, a BF16 weight and bias stored in the
model (half the FP32 size), and hands a float32 output to its neighbours: the rest of the graph (INT8 and
FP32 ops) sees the same dtypes as before. Inductor lowers those BF16 conv/linear ops to oneDNN BF16 kernels
(AVX512-BF16 or AMX-BF16), and ``torch.export`` keeps them, with their BF16 constants, in the ``.pt2`` file.

The IPEX backend makes the same rewrite on its traced TorchScript graph (:mod:`inc_torch.ptq._bf16_script`).

A per-op rewrite is used rather than ``torch.autocast``: autocast regions are traced away by ``torch.export``
(the casts they imply are not attached to ops named by a config), and what a saved program runs must be
visible in its graph.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from inc_core._layer_filter import LayerFilter
from inc_core._quant_config import QuantConfig
from inc_core.backend import Op
from inc_torch._module_stack import module_path
from inc_torch.ptq import _dynamic
from inc_torch.ptq._compiled import CompiledQuantizedModule, drop_unread_state
from inc_torch.ptq._ops import LOOKUP_NAMES

__all__ = ["BF16_FLAGS", "bf16_ops", "bf16_unavailable", "int8_view", "bf16_names", "run_in_bf16"]

# CPU flags (Linux /proc/cpuinfo names) of the instructions oneDNN's BF16 kernels run on natively.
# Without them oneDNN emulates BF16 with FP32 arithmetic: slower than plain FP32, so it is refused.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# aten ops a conv/linear module of ``inc.describe`` becomes in the exported graph.
_WEIGHTED = frozenset({"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "linear", "convolution"})


def _cpu_flags() -> frozenset[str]:
    return _dynamic.cpu_flags()


def _onednn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_bf16_missing() -> str | None:
    """Why this CPU cannot run BF16 kernels at speed (a sentence), or None when it can."""
    looked_for = ", ".join(sorted(BF16_FLAGS))
    flags = _cpu_flags()
    if flags and BF16_FLAGS.isdisjoint(flags):
        return (
            f"this CPU has no BF16 instructions (looked for the CPU flags {looked_for} in /proc/cpuinfo; without "
            "them oneDNN emulates BF16 in FP32, slower than FP32 itself)"
        )
    if not _onednn_bf16():
        return (
            "torch's oneDNN reports no BF16 support on this CPU (torch.ops.mkldnn._is_mkldnn_bf16_supported() is "
            f"False; BF16 needs one of the CPU flags {looked_for})"
        )
    return None


def bf16_unavailable(backend: str, fmt: str, approach: str) -> str | None:
    """Why the ops of a config cannot run in BF16 on ``backend``/``fmt``/``approach`` here, or None.

    The static PT2E graph (torch backend) and the traced IPEX graph (``backend="ipex"``) have BF16 ops: FX
    graphs are torch.ao INT8 modules around FP32 ones, and dynamic quantization swaps Linear layers without a
    graph to rewrite.
    """
    if approach != "static":
        return (
            f"approach={approach!r} has no BF16 ops (BF16 mixed precision runs with approach='static' on the "
            "torch backend's format='pt2e', its default, and on backend='ipex')"
        )
    if (backend, fmt) not in (("torch", "pt2e"), ("ipex", "torchscript")):
        return (
            f"format={fmt!r} of the {backend} backend has no BF16 ops (BF16 mixed precision runs on the torch "
            "backend's format='pt2e', its default, and on backend='ipex': use backend='torch', format='pt2e')"
        )
    return cpu_bf16_missing()


def bf16_names(config: QuantConfig, ops: tuple[Op, ...]) -> tuple[str, ...]:
    """The ops of ``ops`` that run in BF16 under ``config`` (in ``bf16`` and not in ``exclude``), in model order.

    Embedding tables are left out: a lookup computes nothing to run in BF16, so one that ``bf16`` matches stays FP32
    (kept out of INT8 as asked).
    """
    return tuple(
        op.name for op in ops
        if config.precision(op.name, op.op_type) == "bf16" and op.op_type not in LOOKUP_NAMES
    )


def int8_view(config: QuantConfig) -> QuantConfig:
    """``config`` as the INT8 quantizer sees it: BF16 ops are kept out of INT8 like excluded ones."""
    if not config.bf16:
        return config
    return dataclasses.replace(config, exclude=config.exclude.union(config.bf16), bf16=LayerFilter())


def _aten_name(node: torch.fx.Node) -> str:
    return str(getattr(node.target, "__name__", node.target)).split(".")[0]


def _attr(graph_module: torch.fx.GraphModule, target: str) -> Any:
    value: Any = graph_module
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def _float_value(node: torch.fx.Node) -> bool:
    value = node.meta.get("val")
    if value is None and node.op == "call_function" and "dequantize" in str(node.target):
        # convert_pt2e's dequantize nodes carry no fake value: one feeds an op that an INT8 pool's output reaches
        return node.kwargs.get("out_dtype") in (None, torch.float32)
    return isinstance(value, torch.Tensor) and value.dtype == torch.float32


def _with_val(node: torch.fx.Node, source: torch.fx.Node, dtype: torch.dtype) -> None:
    """Give a new node the fake value of ``source`` in ``dtype`` (shapes stay readable to graph passes)."""
    value = source.meta.get("val")
    if isinstance(value, torch.Tensor):
        try:
            node.meta["val"] = value.to(dtype)
        except Exception:  # a value fake-tensor mode cannot convert only costs the metadata
            node.meta.pop("val", None)
    for key in ("nn_module_stack", "stack_trace"):
        if key in source.meta:
            node.meta[key] = source.meta[key]


class _Rewriter:
    """Casts around the chosen ops, sharing one BF16 cast per tensor and one BF16 copy per constant."""

    def __init__(self, graph_module: torch.fx.GraphModule) -> None:
        self.gm = graph_module
        self.graph = graph_module.graph
        self.casts: dict[torch.fx.Node, torch.fx.Node] = {}  # fp32 node -> its bf16 version
        self.constants: dict[str, str] = {}  # fp32 attribute -> bf16 attribute
        self.to_float: dict[torch.fx.Node, torch.fx.Node] = {}  # fp32 output cast -> the bf16 node it reads

    def bf16_input(self, value: Any) -> Any:
        if not isinstance(value, torch.fx.Node):
            return value
        if value in self.to_float:  # a neighbouring BF16 op's output: bf16 -> fp32 -> bf16 is exact, skip both
            return self.to_float[value]
        if value.op == "get_attr":
            tensor = _attr(self.gm, str(value.target))
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                return self._constant(value, tensor)
            return value
        if not _float_value(value):
            return value
        if value not in self.casts:
            with self.graph.inserting_after(value):
                cast = self.graph.call_function(torch.ops.aten._to_copy.default, (value,), {"dtype": torch.bfloat16})
            _with_val(cast, value, torch.bfloat16)
            self.casts[value] = cast
        return self.casts[value]

    def _constant(self, node: torch.fx.Node, tensor: torch.Tensor) -> torch.fx.Node:
        source = str(node.target)
        if source not in self.constants:
            name = f"_bf16_{source.replace('.', '_')}"
            while hasattr(self.gm, name):
                name += "_"
            self.gm.register_buffer(name, tensor.detach().to(torch.bfloat16))
            self.constants[source] = name
        with self.graph.inserting_after(node):
            replacement = self.graph.get_attr(self.constants[source])
        _with_val(replacement, node, torch.bfloat16)
        return replacement

    def rewrite(self, node: torch.fx.Node) -> None:
        before = [a for a in node.args if isinstance(a, torch.fx.Node)]
        node.args = tuple(self.bf16_input(a) for a in node.args)
        for old in before:  # the FP32 weight/bias reads the BF16 copies replaced (drop_unread_state drops the tensors)
            if old.op == "get_attr" and not old.users:
                self.graph.erase_node(old)
        original = node.meta.get("val")
        out_dtype = original.dtype if isinstance(original, torch.Tensor) else torch.float32
        if isinstance(original, torch.Tensor):
            _with_val(node, node, torch.bfloat16)
        with self.graph.inserting_after(node):
            back = self.graph.call_function(torch.ops.aten._to_copy.default, (node,), {"dtype": out_dtype})
        node.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)
        if isinstance(original, torch.Tensor):
            back.meta["val"] = original
        self.to_float[back] = node


def run_in_bf16(model: CompiledQuantizedModule, names: tuple[str, ...]) -> CompiledQuantizedModule:
    """Rewrite the converted graph of ``model`` (in place) so that the conv/linear ops of ``names`` run in BF16.

    Each op's float inputs are cast to BF16 (its weight and bias become BF16 constants of the model, the FP32
    ones are dropped) and its output is cast back to the dtype it had. Returns ``model``.

    Raises:
        UnsupportedModelError: an op of ``names`` has no conv/linear node left in FP32 in the graph.
    """
    from inc_core.errors import UnsupportedModelError

    if not names:
        return model
    graph_module = model.graph_module
    wanted = set(names)
    rewriter = _Rewriter(graph_module)
    found: set[str] = set()
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or _aten_name(node) not in _WEIGHTED:
            continue
        path = module_path(node)
        if path in wanted and len(node.args) > 1 and _float_value(node.args[0]):
            rewriter.rewrite(node)
            found.add(path)
    missing = sorted(wanted - found)
    if missing:
        raise UnsupportedModelError(
            f"BF16 was asked for {missing}, but the exported graph has no FP32 conv/linear op from those modules "
            "(their forward does not call a Linear/Conv op on a float input). Keep them in FP32 with exclude= instead."
        )
    graph_module.graph.lint()
    graph_module.recompile()
    drop_unread_state(graph_module)  # the FP32 weights the BF16 copies replaced
    return model


def _bf16_weight(graph_module: torch.fx.GraphModule, node: Any) -> bool:
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "get_attr":
        value = _attr(graph_module, str(node.target))
        return isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16


def bf16_ops(model: nn.Module) -> list[str]:
    """Names of the conv/linear ops of a PT2E model that run in BF16 (a BF16 weight), named by their module.

    Works on what ``inc.quantize``/``inc.autotune`` return on the PT2E and IPEX paths and on their files read
    back by ``inc.load``; any other model (FX, dynamic) has none.
    """
    if isinstance(model, torch.jit.ScriptModule):
        from inc_torch.ptq._bf16_script import script_bf16_ops

        return script_bf16_ops(model)
    if isinstance(model, CompiledQuantizedModule):
        graph_module = model.graph_module
    elif isinstance(model, torch.fx.GraphModule):
        graph_module = model
    else:
        return []
    names = [
        module_path(node) or node.name
        for node in graph_module.graph.nodes
        if node.op == "call_function"
        and _aten_name(node) in _WEIGHTED
        and len(node.args) > 1
        and _bf16_weight(graph_module, node.args[1])
    ]
    return list(dict.fromkeys(names))
