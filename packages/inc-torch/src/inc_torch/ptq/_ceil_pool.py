"""INT8 max-pools with ``ceil_mode=True``: made explicit so that inductor computes the pooled size right.

Inductor's INT8 max-pool lowering (torch 2.13, ``_register_quantization_maxpool2d`` in
``torch/_inductor/fx_passes/quantization.py``) matches ``dequantize -> max_pool2d -> quantize`` but binds the
pool's ``ceil_mode`` as the ``offset_dtype`` argument of its low-memory form and runs the pool with
``ceil_mode=False``. Wherever the two modes give different sizes, the compiled model computes a smaller
feature map than the graph it compiled, and returns a silently different output: torchvision's GoogLeNet
at 96x96 (its pools are ``ceil_mode=True``) gives cosine 0.66 to FP32 compiled, 0.96 uncompiled; torchao's
own recipe compiled the same way is as wrong.

The rewrite here changes no number: such a pool reads its int8 input padded at the bottom and right with
the quantized minimum, then pools with ``ceil_mode=False``. The padded rows and columns are exactly the
extra windows ``ceil_mode`` adds; each of those windows starts inside the input (PyTorch's rule for
``ceil_mode``), so it holds a real value, and the padding value, the smallest an int8 tensor of that
quantization can hold, never raises a maximum.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["pad_ceil_mode_pools"]



def _target(node: Any) -> str:
    """``quantized_decomposed::dequantize_per_tensor`` for that op's overloads (the ops register on import)."""
    return str(getattr(node, "target", ""))


def _is_quantize(node: Any) -> bool:
    return _target(node).startswith("quantized_decomposed.quantize_per_tensor.")


def _is_dequantize(node: Any) -> bool:
    return _target(node).startswith("quantized_decomposed.dequantize_per_tensor.")


def _two(raw: Any, default: list[int]) -> list[int] | None:
    """An ``int[2]`` argument as two ints (``[]`` or one value as aten reads them), or None if not static."""
    values = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    values = default if not values else values * 2 if len(values) == 1 else values
    return [int(v) for v in values] if len(values) == 2 and all(isinstance(v, int) for v in values) else None


def _spatial_size(node: Any) -> list[int] | None:
    """The concrete (height, width) of the float tensor a quantize/dequantize chain carries, or None."""
    while isinstance(node, torch.fx.Node):
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.dim() >= 3:
            sizes = list(value.shape[-2:])
            return [int(s) for s in sizes] if all(isinstance(s, int) for s in sizes) else None
        if not (_is_quantize(node) or _is_dequantize(node)) or not node.args:
            return None
        node = node.args[0]
    return None


def _extra_padding(arguments: dict[str, Any], size: list[int], pooled: Any) -> list[int] | None:
    """Rows/columns to add at the bottom/right so that ``ceil_mode=False`` pools to ``pooled``'s size.

    ``pooled`` is the pool's output as export recorded it (``ceil_mode=True``); ``size`` its input's.
    """
    kernel = _two(arguments["kernel_size"], [1, 1])
    if kernel is None or not isinstance(pooled, torch.Tensor):
        return None
    stride = _two(arguments["stride"], kernel)
    padding = _two(arguments["padding"], [0, 0])
    dilation = _two(arguments["dilation"], [1, 1])
    out = [int(s) for s in pooled.shape[-2:] if isinstance(s, int)]
    if stride is None or padding is None or dilation is None or len(out) != 2:
        return None
    return [
        max((out[i] - 1) * stride[i] + dilation[i] * (kernel[i] - 1) + 1 - (size[i] + 2 * padding[i]), 0)
        for i in range(2)
    ]


def pad_ceil_mode_pools(graph_module: torch.fx.GraphModule) -> int:
    """Rewrite each INT8 ``max_pool2d(ceil_mode=True)`` of ``graph_module`` as explained above (in place).

    Returns how many pools were rewritten. A pool on float input is left alone (inductor's float pool is
    right), as is one whose input size is not static (no fixed padding reproduces it).
    """
    graph = graph_module.graph
    rewritten = 0
    for pool in list(graph.nodes):
        if pool.op != "call_function" or pool.target != torch.ops.aten.max_pool2d.default:
            continue
        normalized = pool.normalized_arguments(graph_module, normalize_to_only_use_kwargs=True)
        arguments = dict(normalized.kwargs) if normalized is not None else {}
        if not arguments.get("ceil_mode"):
            continue
        dequantize = pool.args[0]
        if not isinstance(dequantize, torch.fx.Node) or not _is_dequantize(dequantize):
            continue
        size = _spatial_size(dequantize)
        extra = None if size is None else _extra_padding(arguments, size, pool.meta.get("val"))
        if extra is None or extra == [0, 0]:
            continue  # unknown sizes, or ceil_mode changes nothing here (what inductor runs is then right)
        quantized, quant_min = dequantize.args[0], dequantize.args[3]
        with graph.inserting_before(pool):
            padded = graph.call_function(
                torch.ops.aten.constant_pad_nd.default, (quantized, [0, extra[1], 0, extra[0]], quant_min)
            )
            fresh = graph.call_function(dequantize.target, (padded, *dequantize.args[1:]), dict(dequantize.kwargs))
        fresh.meta.update({k: v for k, v in dequantize.meta.items() if k != "val"})
        pool.args = (fresh, arguments["kernel_size"], arguments["stride"], arguments["padding"], arguments["dilation"], False)
        pool.kwargs = {}
        rewritten += 1
    if rewritten:
        graph.eliminate_dead_code()
        graph.lint()
        graph_module.recompile()
    return rewritten
