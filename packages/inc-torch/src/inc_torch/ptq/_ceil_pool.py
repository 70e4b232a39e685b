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


def _pair(raw: Any, default: list[int]) -> list[int] | None:
    if raw is None or (isinstance(raw, (list, tuple)) and len(raw) == 0):
        return default
    values = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not all(isinstance(v, int) for v in values):
        return None
    return [int(v) for v in values]


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


def _extra_padding(pool: torch.fx.Node, size: list[int]) -> list[int] | None:
    """Rows/columns to add at the bottom/right so that ``ceil_mode=False`` gives the ``ceil_mode=True`` size."""
    args = list(pool.args) + [None] * (6 - len(pool.args))
    kernel = _pair(pool.kwargs.get("kernel_size", args[1]), [1, 1])
    if kernel is None:
        return None
    stride = _pair(pool.kwargs.get("stride", args[2]), kernel)
    padding = _pair(pool.kwargs.get("padding", args[3]), [0, 0])
    dilation = _pair(pool.kwargs.get("dilation", args[4]), [1, 1])
    if stride is None or padding is None or dilation is None:
        return None
    extra = []
    for i in range(2):
        span = size[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1
        ceil_out = -(-span // stride[i]) + 1
        if (ceil_out - 1) * stride[i] >= size[i] + padding[i]:
            ceil_out -= 1  # PyTorch's rule: the last window must start inside the input or the left padding
        needed = (ceil_out - 1) * stride[i] + dilation[i] * (kernel[i] - 1) + 1 - (size[i] + 2 * padding[i])
        extra.append(max(needed, 0))
    return extra


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
        args = list(pool.args) + [None] * (6 - len(pool.args))
        if not pool.kwargs.get("ceil_mode", args[5]):
            continue
        dequantize = pool.args[0]
        if not isinstance(dequantize, torch.fx.Node) or not _is_dequantize(dequantize):
            continue
        size = _spatial_size(dequantize)
        extra = None if size is None else _extra_padding(pool, size)
        if extra is None:
            continue
        quantized, quant_min = dequantize.args[0], dequantize.args[3]
        with graph.inserting_before(pool):
            padded = graph.call_function(
                torch.ops.aten.constant_pad_nd.default, (quantized, [0, extra[1], 0, extra[0]], quant_min)
            )
            fresh = graph.call_function(dequantize.target, (padded, *dequantize.args[1:]), dict(dequantize.kwargs))
        fresh.meta.update({k: v for k, v in dequantize.meta.items() if k != "val"})
        new_args = [fresh, *pool.args[1:]]
        if "ceil_mode" in pool.kwargs:
            pool.kwargs = {**pool.kwargs, "ceil_mode": False}
        else:
            new_args = (new_args + [None] * (6 - len(new_args)))[:6]
            new_args[2] = new_args[2] if new_args[2] is not None else []
            new_args[3] = new_args[3] if new_args[3] is not None else [0, 0]
            new_args[4] = new_args[4] if new_args[4] is not None else [1, 1]
            new_args[5] = False
        pool.args = tuple(new_args)
        rewritten += 1
    if rewritten:
        graph.eliminate_dead_code()
        graph.lint()
        graph_module.recompile()
    return rewritten
