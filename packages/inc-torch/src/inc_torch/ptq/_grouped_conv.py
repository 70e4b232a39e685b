"""Grouped convolutions this CPU's oneDNN INT8 kernel computes wrongly: found by running the kernel, kept FP32.

On an Intel Xeon with AMX (torch 2.13's oneDNN), the INT8 kernel of a grouped convolution with few channels per group
and a long kernel returns values unrelated to the convolution (output cosine ~0 to FP32): wav2vec2's positional
convolution (64 channels in 4 groups, kernel 16), and on 1-D shapes 8 channels per group with kernel 16 or 16 with
kernel 8 or 16, while 16 with kernel 9, 32 per group, depthwise and ungrouped ones are right (oneDNN picks its AMX
brgemm convolution with weights in ``aBdeC16c16b4c`` for the wrong ones). PT2E (inductor's ``qconv2d_pointwise``),
FX and torch.ao's and torchao's own flows run the same kernel; the same layers are right on an AMD EPYC. Which shapes
are affected is the kernel's business, not something a rule on the layer could tell, so each distinct grouped-conv
shape is run once through torch's oneDNN INT8 convolution on this CPU against the float computation of the same
quantized values (well under a millisecond each, cached per process), and a shape it gets wrong stays FP32.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from inc_torch._parametrized import plain_type

__all__ = ["is_miscomputed_conv_node", "miscomputed_grouped_convs"]

log = logging.getLogger("inc_torch")

# A kernel right up to INT8 rounding gives ~0.9999 here; the wrong ones gave -0.03..0.04.
_AGREEMENT = 0.99

# (in channels, out channels, kernel h, kernel w, stride, padding, dilation, groups), as conv2d sees them
Key = tuple[int, int, int, int, tuple[int, int], tuple[int, int], tuple[int, int], int]


def _pair(value: Any, one_dim: bool) -> tuple[int, int]:
    values = tuple(int(v) for v in (value if isinstance(value, (tuple, list)) else (value,)))
    if one_dim:
        return (1, values[0]) if len(values) == 1 else (values[0], values[1])
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _module_key(module: nn.Module) -> Key | None:
    """The conv2d shape of a grouped (not depthwise) Conv1d/Conv2d, or None for any other layer."""
    # plain_type: a weight-normed layer (wav2vec2's positional conv) counts as its own class, as in quantizable_ops
    kind = plain_type(module)
    if kind not in (nn.Conv1d, nn.Conv2d) or module.padding_mode != "zeros" or isinstance(module.padding, str):
        return None
    groups, cin = int(module.groups), int(module.in_channels)
    if groups <= 1 or cin // groups <= 1:
        return None
    one_dim = kind is nn.Conv1d
    kernel = _pair(module.kernel_size, one_dim)
    padding = (0, int(module.padding[0])) if one_dim else _pair(module.padding, False)
    return (cin, int(module.out_channels), kernel[0], kernel[1], _pair(module.stride, one_dim), padding,
            _pair(module.dilation, one_dim), groups)


def _node_key(node: torch.fx.Node) -> Key | None:
    """The shape of an ``aten.conv2d`` node of an exported graph (Conv1d layers are conv2d there, see _conv1d)."""
    if node.op != "call_function" or node.target is not torch.ops.aten.conv2d.default or len(node.args) < 2:
        return None
    weight = node.args[1].meta.get("val") if isinstance(node.args[1], torch.fx.Node) else None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        return None
    args = list(node.args) + [None] * (7 - len(node.args))
    stride, padding, dilation, groups = args[3] or 1, args[4] or 0, args[5] or 1, int(args[6] or 1)
    if isinstance(padding, str):
        return None
    cin = int(weight.shape[1]) * groups
    if groups <= 1 or int(weight.shape[1]) <= 1:
        return None
    return (cin, int(weight.shape[0]), int(weight.shape[2]), int(weight.shape[3]), _pair(stride, False),
            _pair(padding, False), _pair(dilation, False), groups)


@functools.cache
def _int8_agreement(key: Key) -> float:
    """Cosine of torch's oneDNN INT8 convolution of shape ``key`` to the float convolution of the same INT8 values."""
    cin, cout, kh, kw, stride, padding, dilation, groups = key
    generator = torch.Generator().manual_seed(0)
    height = 1 if kh == 1 else 2 * (dilation[0] * (kh - 1) + 1)
    width = 1 if kw == 1 else 2 * (dilation[1] * (kw - 1) + 1)
    x = torch.randn(2, cin, height, width, generator=generator)
    weight = torch.randn(cout, cin // groups, kh, kw, generator=generator)
    bias = torch.randn(cout, generator=generator)
    qx = torch.quantize_per_tensor(x, float(x.abs().max()) / 127.5, 128, torch.quint8)
    qweight = torch.quantize_per_channel(
        weight, weight.abs().amax(dim=(1, 2, 3)) / 127, torch.zeros(cout, dtype=torch.long), 0, torch.qint8
    )
    reference = F.conv2d(qx.dequantize(), qweight.dequantize(), bias, stride, padding, dilation, groups)
    low, high = min(float(reference.min()), 0.0), max(float(reference.max()), 0.0)
    span = max(high - low, 1e-6)
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "onednn"
    try:
        conv = torch.ao.nn.quantized.Conv2d(cin, cout, (kh, kw), stride, padding, dilation, groups)
        conv.set_weight_bias(qweight, bias)
        conv.scale, conv.zero_point = span / 255, int(round(-low / span * 255))
        with torch.no_grad():
            out = conv(qx).dequantize()
    except (RuntimeError, ValueError) as exc:
        # A shape torch.ao's module cannot run is left to the path itself, whose errors inc reports per op.
        log.info("could not check torch's oneDNN INT8 kernel on a grouped convolution of key %s: %s", key, exc)
        return 1.0
    finally:
        torch.backends.quantized.engine = engine
    agreement = float(F.cosine_similarity(out.flatten(), reference.flatten(), 0))
    if not agreement >= _AGREEMENT:
        log.warning(
            "torch's oneDNN INT8 kernel on this CPU computes grouped convolutions of %d->%d channels in %d groups with "
            "kernel %dx%d wrongly (cosine %.3f to the same values in float): such layers stay FP32",
            cin, cout, groups, kh, kw, agreement,
        )
    return agreement


def _miscomputed(key: Key | None) -> bool:
    if key is None or "onednn" not in torch.backends.quantized.supported_engines:
        return False
    return not _int8_agreement(key) >= _AGREEMENT


def miscomputed_grouped_convs(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, str]:
    """Of the layers ``names`` (default: all), the grouped convolutions this CPU's INT8 kernel computes wrongly,
    each with the reason (what the log and ``describe`` say)."""
    found = {}
    wanted = None if names is None else set(names)
    for name, module in model.named_modules():
        if (wanted is None or name in wanted) and _miscomputed(_module_key(module)):
            found[name] = (
                f"torch's oneDNN INT8 kernel on this CPU computes a grouped convolution of this shape ({module.groups} "
                "groups) wrongly"
            )
    return found


def is_miscomputed_conv_node(node: torch.fx.Node) -> bool:
    """Whether ``node`` is an ``aten.conv2d`` whose shape this CPU's INT8 kernel computes wrongly."""
    return _miscomputed(_node_key(node))
