"""PT2E ConvTranspose1d/2d in INT8, as the sub-pixel convolution it is.

Neither torchao's x86 quantizer nor inductor has an INT8 transposed convolution, and torch.ao's quantized
``ConvTranspose2d`` (FX) gives wrong outputs on many shapes on both of its engines (measured on torch 2.13:
output cosine 0.04 to 0.54 against the same arithmetic in float for kernel 2 / stride 2, kernel 4 / stride
2, and others; right on a few), so inc quantized them nowhere. A transposed convolution of stride ``s`` is
``s_h * s_w`` ordinary convolutions over the input, one per output phase, each with the kernel taps of its
phase, flipped; stacked as output channels they are one conv2d, whose output interleaved back
(``reshape -> permute -> reshape``) and cropped by the padding is the transposed convolution's output
(checked exact in FP32 on every configuration tested). Before annotation each ``conv_transpose`` of the
captured graph becomes that conv2d, which oneDNN's ``qconv_pointwise`` runs in INT8 (the kernel every CNN
takes). Its multiply-adds are those of the transposed convolution when the kernel is a multiple of the stride
(kernel 2 or 4 with stride 2: U-Net, DCGAN); otherwise the phases' missing taps are zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from inc_torch.ptq._graph_edit import STALE_META, LayerRewrite, attribute, layer_name, set_attribute

__all__ = [
    "conv_transpose_as_conv2d", "restore_conv_transpose", "subpixel_weight", "transposed_weight",
]

_aten = torch.ops.aten
# op -> number of spatial dimensions
_CONV_TRANSPOSE = {_aten.conv_transpose1d.default: 1, _aten.conv_transpose2d.input: 2}
# Node meta: on every node a rewrite adds, the call it computes (layer name, call number); on its conv2d, the
# transposed convolution's own arguments, to restore it where the layer stays FP32.
_PART = "inc_conv_transpose_call"
_ORIGINAL = "inc_conv_transpose"


@dataclass(frozen=True)
class _Original:
    target: Any
    stride: tuple[int, int]
    padding: tuple[int, int]
    output_padding: tuple[int, int]
    groups: int
    kernel: tuple[int, int]


def subpixel_weight(weight: torch.Tensor, stride: tuple[int, int], groups: int) -> torch.Tensor:
    """The conv2d weight ``[out * s_h * s_w, in / groups, J_h, J_w]`` (``J = ceil(k / s)``) of a transposed
    convolution's weight ``[in, out / groups, k_h, k_w]``: output channel ``(g, r_h, r_w, c)`` computes phase
    ``(r_h, r_w)`` of channel ``c`` of group ``g``, with tap ``j`` of the phase at position ``J - 1 - j`` (a
    correlation). Phases outside channels: in the channels-last layout oneDNN writes, each output pixel's
    channels of one phase are one contiguous run, which the interleave copies whole."""
    cin, coutg, kh, kw = weight.shape
    sh, sw = stride
    jh, jw = math.ceil(kh / sh), math.ceil(kw / sw)
    padded = nn.functional.pad(weight, (0, jw * sw - kw, 0, jh * sh - kh))  # taps past the kernel are zeros
    # tap t = j * s + r; per group: [g, in/g, out/g, J_h, s_h, J_w, s_w]
    phased = padded.reshape(groups, cin // groups, coutg, jh, sh, jw, sw).flip(3).flip(5)
    # -> [g, s_h, s_w, out/g, in/g, J_h, J_w]: group-major output channels, as conv2d groups them
    return phased.permute(0, 4, 6, 2, 1, 3, 5).reshape(groups * coutg * sh * sw, cin // groups, jh, jw).contiguous()


def transposed_weight(weight: torch.Tensor, stride: tuple[int, int], groups: int, kernel: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`subpixel_weight`: ``[in, out / groups, k_h, k_w]`` again."""
    sh, sw = stride
    _, cing, jh, jw = weight.shape
    coutg = weight.shape[0] // (groups * sh * sw)
    phased = weight.reshape(groups, sh, sw, coutg, cing, jh, jw).permute(0, 4, 3, 5, 1, 6, 2).flip(3).flip(5)
    return phased.reshape(groups * cing, coutg, jh * sh, jw * sw)[:, :, : kernel[0], : kernel[1]].contiguous()


def _pairs(value: Any, dims: int, default: int) -> tuple[int, int]:
    """A 1-D or 2-D op argument as (height, width); a 1-D op is a height-1 2-D op, whose height takes the
    argument's default (stride and dilation 1, padding and output padding 0: the neutral value of each)."""
    values = [default] * dims if value is None else [int(v) for v in value]
    if len(values) == 1:
        values = values * dims
    return (values[0], values[1]) if dims == 2 else (default, values[0])


def _static(shape: Any) -> tuple[int, ...] | None:
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError):  # a symbolic size (the batch is; a spatial one must not be)
        return None


def conv_transpose_as_conv2d(graph_module: torch.fx.GraphModule) -> LayerRewrite:
    """Rewrite, in place, each ``conv_transpose1d``/``conv_transpose2d`` of an exported (not yet prepared)
    graph as the conv2d of its phases followed by the interleave and crop.

    A layer stays a transposed convolution (FP32 on PT2E) when its weight is computed in the graph or read by
    another op, it is dilated, or its input's spatial size is not fixed in the captured graph;
    :attr:`LayerRewrite.kept` says which and why.
    """
    graph = graph_module.graph
    rewritten: list[str] = []
    kept: dict[str, str] = {}
    shapes: dict[torch.fx.Node, tuple[int, ...]] = {}  # weights (and biases) converted: their shapes before
    calls = 0
    # decided before any is rewritten: a rewritten call reads the weight through a conv2d
    stored = {
        node for node in graph.nodes
        if node.op == "call_function" and node.target in _CONV_TRANSPOSE
        and _only_read_alike(node.args[1], node, 1) and (len(node.args) < 3 or node.args[2] is None or _only_read_alike(node.args[2], node, 2))
    }
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _CONV_TRANSPOSE:
            continue
        dims = _CONV_TRANSPOSE[node.target]
        name = layer_name(node)
        source, weight_node, bias_node, stride, padding, output_padding, groups, dilation = [
            *node.args, *[None] * (8 - len(node.args))
        ]
        stride, padding = _pairs(stride, dims, 1), _pairs(padding, dims, 0)
        output_padding, dilation = _pairs(output_padding, dims, 0), _pairs(dilation, dims, 1)
        groups = int(groups or 1)
        source_fake = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
        fake = node.meta.get("val")
        spatial = _static(source_fake.shape[2:]) if isinstance(source_fake, torch.Tensor) else None
        out_spatial = _static(fake.shape[2:]) if isinstance(fake, torch.Tensor) else None
        reason = None
        if node not in stored:
            reason = "its weight or bias is computed in the graph or read by another op"
        elif dilation != (1, 1):
            reason = "it is dilated"
        elif spatial is None or out_spatial is None:
            reason = "its input's spatial size varies in the captured graph"
        if reason is not None:
            kept[name] = reason
            continue
        if weight_node not in shapes:  # a module called twice reads one weight: converted once
            weight = attribute(graph_module, str(weight_node.target))
            shapes[weight_node] = tuple(int(d) for d in weight.shape)
            wide = weight.detach() if dims == 2 else weight.detach().unsqueeze(2)
            set_attribute(graph_module, str(weight_node.target), subpixel_weight(wide, stride, groups))
            _refresh_fake(weight_node, attribute(graph_module, str(weight_node.target)), fake)
        shape = shapes[weight_node]  # [in, out / groups, *kernel]
        kernel = (shape[2], shape[3]) if dims == 2 else (1, shape[2])
        sh, sw = stride
        if isinstance(bias_node, torch.fx.Node) and bias_node not in shapes:
            shapes[bias_node] = ()  # every output element is one phase's: the bias once per phase
            bias = attribute(graph_module, str(bias_node.target))
            phased_bias = bias.detach().reshape(groups, 1, -1).expand(groups, sh * sw, -1).reshape(-1).contiguous()
            set_attribute(graph_module, str(bias_node.target), phased_bias)
            _refresh_fake(bias_node, attribute(graph_module, str(bias_node.target)), fake)
        height, width = (spatial if dims == 2 else (1, *spatial))
        out_h, out_w = (out_spatial if dims == 2 else (1, *out_spatial))
        (kh, kw), (ph, pw) = kernel, padding
        jh, jw = math.ceil(kh / sh), math.ceil(kw / sw)
        # phase rows q = (o + p) // s for every output row o; the input padded J - 1 before, as far as needed after
        qh, qw = (out_h - 1 + ph) // sh + 1, (out_w - 1 + pw) // sw + 1
        pads = [jw - 1, qw - width, jh - 1, qh - height]  # a negative pad crops (an output padding of 0)
        cout = shape[1] * groups
        meta = {k: v for k, v in node.meta.items() if k not in STALE_META}
        ops: list[tuple[Any, tuple[Any, ...]]] = []
        if dims == 1:
            ops.append((_aten.unsqueeze.default, (2,)))
        symmetric = pads[0] == pads[1] and pads[2] == pads[3]
        if not symmetric:
            ops.append((_aten.constant_pad_nd.default, (pads,)))
        ops.append((_aten.conv2d.default, (weight_node, bias_node, [1, 1], [pads[2], pads[0]] if symmetric else [0, 0], [1, 1], groups)))
        ops.append((_aten.reshape.default, ([-1, groups, sh, sw, cout // groups, qh, qw],)))
        ops.append((_aten.permute.default, ([0, 1, 4, 5, 2, 6, 3],)))
        ops.append((_aten.reshape.default, ([-1, cout, qh * sh, qw * sw],)))
        if ph or qh * sh != out_h:
            ops.append((_aten.slice.Tensor, (2, ph, ph + out_h)))
        if pw or qw * sw != out_w:
            ops.append((_aten.slice.Tensor, (3, pw, pw + out_w)))
        if dims == 1:
            ops.append((_aten.squeeze.dim, (2,)))
        current, current_fake = source, source_fake
        call = (name, calls)
        calls += 1
        with graph.inserting_before(node):
            for target, args in ops:
                current = graph.call_function(target, (current, *args))
                current.meta = {**meta, _PART: call}
                if target is _aten.conv2d.default:
                    current.meta[_ORIGINAL] = _Original(node.target, stride, padding, output_padding, groups, kernel)
                    # the x86 quantizer finds convolutions by source partition: this one is a functional conv2d
                    current.meta["source_fn_stack"] = [(current.name, nn.functional.conv2d)]
                    conv_args = [current_fake, attribute(graph_module, str(weight_node.target)), None, *args[2:]]
                    current_fake = _fake_call(target, conv_args, fake)
                else:
                    current_fake = _fake_call(target, [current_fake, *args], fake)
                if current_fake is not None:
                    current.meta["val"] = current_fake
        node.replace_all_uses_with(current)
        graph.erase_node(node)
        if name not in rewritten:
            rewritten.append(name)
    if rewritten:
        graph.lint()
        graph_module.recompile()
    return LayerRewrite("ConvTranspose", tuple(rewritten), kept)


def restore_conv_transpose(graph_module: torch.fx.GraphModule, names: frozenset[str]) -> None:
    """Undo, in place, :func:`conv_transpose_as_conv2d` for the layers ``names`` (kept FP32 by the user or a
    tuning trial): in FP32 the transposed convolution runs faster than its sub-pixel form (the interleave is a
    copy: the DCGAN generator compiled in FP32 ran 130 against 226 samples/s at batch 1, AMD EPYC, 2 threads)."""
    graph = graph_module.graph
    calls: dict[Any, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        call = node.meta.get(_PART)
        if call is not None and call[0] in names:
            calls.setdefault(call, []).append(node)
    restored: set[torch.fx.Node] = set()
    for parts in calls.values():
        conv = next(part for part in parts if _ORIGINAL in part.meta)
        original: _Original = conv.meta[_ORIGINAL]
        weight_node, bias_node = conv.args[1], conv.args[2]
        one_d = original.target is _aten.conv_transpose1d.default
        if weight_node not in restored:  # a layer called twice: its weight restored once
            restored.add(weight_node)
            weight = transposed_weight(
                attribute(graph_module, str(weight_node.target)).detach(), original.stride, original.groups, original.kernel
            )
            _restore_attribute(graph_module, weight_node, weight.squeeze(2) if one_d else weight, conv)
        if isinstance(bias_node, torch.fx.Node) and bias_node not in restored:
            restored.add(bias_node)
            phases = original.stride[0] * original.stride[1]
            stored = attribute(graph_module, str(bias_node.target)).detach()
            bias = stored.reshape(original.groups, phases, -1)[:, 0].reshape(-1).contiguous()
            _restore_attribute(graph_module, bias_node, bias, conv)
        pick = (lambda pair: [pair[1]]) if one_d else list
        args = (
            parts[0].args[0], weight_node, bias_node, pick(original.stride), pick(original.padding),
            pick(original.output_padding), original.groups, [1] if one_d else [1, 1],
        )
        end = parts[-1]
        with graph.inserting_before(end):
            restored_node = graph.call_function(original.target, args)
        restored_node.meta = {k: v for k, v in end.meta.items() if k not in (_PART, _ORIGINAL)}
        end.replace_all_uses_with(restored_node)
        for part in reversed(parts):
            graph.erase_node(part)
    if calls:
        graph.lint()
        graph_module.recompile()


def _restore_attribute(graph_module: torch.fx.GraphModule, tensor_node: torch.fx.Node, value: torch.Tensor, conv: torch.fx.Node) -> None:
    set_attribute(graph_module, str(tensor_node.target), value)
    _refresh_fake(tensor_node, value, conv.meta.get("val"))


def _only_read_alike(tensor_node: Any, node: torch.fx.Node, position: int) -> bool:
    """True if ``tensor_node`` reads a stored tensor that only transposed convolutions with the stride and groups
    of ``node`` read, each at ``position`` (a module called twice): rewritten once, it serves every call."""
    if not isinstance(tensor_node, torch.fx.Node) or tensor_node.op != "get_attr":
        return False
    for user in tensor_node.users:
        if user.target is not node.target or user.args[position] is not tensor_node:
            return False
        if any(arg is tensor_node for i, arg in enumerate([*user.args, *user.kwargs.values()]) if i != position):
            return False
        if user.args[3:4] != node.args[3:4] or user.args[6:7] != node.args[6:7] or user.kwargs or node.kwargs:
            return False
    return True


def _refresh_fake(tensor_node: torch.fx.Node, value: torch.Tensor, reference: Any) -> None:
    """Give a rewritten ``get_attr`` node the fake tensor of its new value (the quantizer reads shapes)."""
    tensor_node.meta.pop("tensor_meta", None)
    fake_mode = getattr(reference, "fake_mode", None)
    if fake_mode is not None:
        tensor_node.meta["val"] = fake_mode.from_tensor(value)


def _fake_call(target: Any, args: list[Any], reference: Any) -> Any:
    """The op's output as a fake tensor, computed in the graph's fake mode (None where there is none)."""
    fake_mode = getattr(reference, "fake_mode", None)
    if fake_mode is None or not isinstance(args[0], torch.Tensor):
        return None
    with fake_mode:
        converted = [fake_mode.from_tensor(a) if isinstance(a, torch.Tensor) and not isinstance(a, torch._subclasses.FakeTensor) else a for a in args]
        return target(*converted)
