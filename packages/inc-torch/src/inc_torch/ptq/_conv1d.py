"""PT2E Conv1d in INT8, as the 2-D convolution over a height-1 image that it is.

torchao's x86 quantizer annotates ``aten.conv1d`` only in front of a ReLU, and inductor's INT8 conv1d
lowering gives a buffer of the wrong length when a ``group_norm`` reads it (wav2vec2's feature encoder
failed at its first call). Its conv2d path (``onednn.qconv_pointwise``, the one every CNN takes) has neither
problem, so before annotation each ``conv1d`` of the captured graph becomes ``unsqueeze -> conv2d ->
squeeze`` with the weight stored ``[out, in, 1, k]``: the same arithmetic (checked exact in FP32), quantized,
fused and lowered as a 2-D convolution. The ``squeeze`` moves past the batch norm and activation that follow
the convolution (they act per channel or per element), so that conv-bn folding (PTQ and QAT) and the
quantizer's conv + activation patterns see them next to the conv2d, as they would in a CNN.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from inc_torch.ptq._graph_edit import STALE_META, LayerRewrite, attribute, layer_name, set_attribute

__all__ = ["FBGEMM_DEPTHWISE_GROUPS", "conv1d_as_conv2d", "is_depthwise_conv1d"]

# torch's x86 engine runs a quantized conv with more groups than this on FBGEMM's depthwise kernels on every
# CPU (fewer groups go to oneDNN where the CPU has VNNI/AMX; see should_use_onednn_quant in torch).
FBGEMM_DEPTHWISE_GROUPS = 100

_aten = torch.ops.aten
# Ops that act per channel (dim 1) or per element and keep the shape: the same on [N, C, L] and [N, C, 1, L].
_SHAPE_KEEPING = frozenset({
    _aten.batch_norm.default,
    _aten.relu.default, _aten.relu_.default,
    _aten.hardtanh.default, _aten.hardtanh_.default,
    _aten.hardswish.default, _aten.hardswish_.default,
    _aten.silu.default, _aten.silu_.default,
    _aten.gelu.default,
    _aten.leaky_relu.default,
    _aten.sigmoid.default,
    _aten.tanh.default,
})
_CONV1D = (_aten.conv1d.default, _aten.conv1d.padding)


def is_depthwise_conv1d(module: nn.Module) -> bool:
    """A Conv1d with one input channel per group (a channel multiplier or not): oneDNN's INT8 kernel for those
    never returned on some 1-D shapes with 2 threads (kernel 15 over 30 frames at batch 1, kernel 21 over 42 at
    batch 5; other lengths fine), not predictable from the layer, and the length is the user's input."""
    return isinstance(module, nn.Conv1d) and 1 < module.groups == module.in_channels


def _padding(padding: Any, kernel: int, dilation: int) -> tuple[int, int]:
    """Left and right padding of a 1-D convolution (``padding='same'`` pads the odd element on the right)."""
    if not isinstance(padding, str):
        return int(padding[0]), int(padding[0])
    if padding == "valid":
        return 0, 0
    total = dilation * (kernel - 1)
    return total // 2, total - total // 2


def _shape_keeping_chain(conv1d: torch.fx.Node) -> list[torch.fx.Node]:
    """The batch norm / activations that alone read the convolution's output, in order."""
    chain: list[torch.fx.Node] = []
    current = conv1d
    while len(current.users) == 1:
        user = next(iter(current.users))
        if user.op != "call_function" or user.target not in _SHAPE_KEEPING or user.args[0] is not current:
            break
        if any(arg is current for arg in [*user.args[1:], *user.kwargs.values()]):
            break
        chain.append(user)
        current = user
    return chain


def conv1d_as_conv2d(graph_module: torch.fx.GraphModule) -> LayerRewrite:
    """Rewrite, in place, each ``conv1d`` of an exported (not yet prepared) graph as a 2-D convolution.

    A layer stays ``conv1d`` (and FP32 on PT2E) when its weight is computed in the graph (normalised in
    ``forward``) or read by another kind of op too; :attr:`LayerRewrite.kept` says which and why.
    """
    graph = graph_module.graph
    rewritten: list[str] = []
    kept: dict[str, str] = {}
    widened: set[torch.fx.Node] = set()
    # weights every reader of which is a conv1d taking it as its weight (decided before any is rewritten)
    convertible = {
        node.args[1]
        for node in graph.nodes
        if node.op == "call_function" and node.target in _CONV1D and len(node.args) > 1
        and isinstance(node.args[1], torch.fx.Node) and node.args[1].op == "get_attr"
        and all(
            user.target in _CONV1D and user.args[1] is node.args[1] and node.args[1] not in (*user.args[:1], *user.args[2:])
            for user in node.args[1].users
        )
    }
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _CONV1D:
            continue
        name = layer_name(node)
        source, weight_node, bias, stride, padding, dilation, groups = [*node.args, *[None] * (7 - len(node.args))]
        if weight_node not in convertible:
            # a weight normalised in forward, or read by another op: it must stay [out, in, k] for that op
            kept[name] = "its weight is computed in the graph or read by an op other than a Conv1d (format='fx' quantizes it)"
            continue
        weight = attribute(graph_module, str(weight_node.target))
        if int(groups or 1) > 1 and int(weight.shape[1]) == 1:  # depthwise, as is_depthwise_conv1d tells of modules
            kept[name] = "oneDNN's INT8 depthwise convolution can stall on 1-D inputs with several threads" + (
                " (format='fx' quantizes it on FBGEMM's kernel)" if int(groups) > FBGEMM_DEPTHWISE_GROUPS else ""
            )
            continue
        stride, dilation = int((stride or [1])[0]), int((dilation or [1])[0])
        fake = node.meta.get("val")
        if weight_node not in widened:  # a module called twice reads one weight: widened once, for both calls
            widened.add(weight_node)
            weight = weight.detach().unsqueeze(2).clone()
            set_attribute(graph_module, str(weight_node.target), weight)
            fake_mode = getattr(fake, "fake_mode", None)
            if fake_mode is not None:
                weight_node.meta["val"] = fake_mode.from_tensor(weight)
            weight_node.meta.pop("tensor_meta", None)
        left, right = _padding([0] if padding is None else padding, int(weight.shape[-1]), dilation)
        source_fake = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
        meta = {k: v for k, v in node.meta.items() if k not in STALE_META}
        with graph.inserting_before(node):
            wide = graph.call_function(_aten.unsqueeze.default, (source, 2))
            wide.meta = {**meta, "val": source_fake.unsqueeze(2)} if isinstance(source_fake, torch.Tensor) else dict(meta)
            if left != right:  # one side more (padding='same', even kernel): padded apart, with zeros as torch does
                source_fake = wide.meta.get("val")
                wide = graph.call_function(_aten.constant_pad_nd.default, (wide, [left, right]))
                wide.meta = dict(meta)
                if isinstance(source_fake, torch.Tensor):
                    wide.meta["val"] = _aten.constant_pad_nd.default(source_fake, [left, right])
                left = 0
            conv = graph.call_function(
                _aten.conv2d.default, (wide, weight_node, bias, [1, stride], [0, left], [1, dilation], int(groups or 1))
            )
        conv.meta = dict(meta)
        # the x86 quantizer finds convolutions by source partition: this one is a functional conv2d
        conv.meta["source_fn_stack"] = [(conv.name, nn.functional.conv2d)]
        if isinstance(fake, torch.Tensor):
            conv.meta["val"] = fake.unsqueeze(2)
        chain = _shape_keeping_chain(node)
        for link in chain:  # computed on the 4-D output now (same shape, one more dimension)
            for key in ("val", "tensor_meta"):
                link.meta.pop(key, None)
            if isinstance(fake, torch.Tensor):
                link.meta["val"] = fake.unsqueeze(2)
        if chain:
            chain[0].args = (conv, *chain[0].args[1:])
        end = chain[-1] if chain else node  # the node whose readers take [N, C, L]
        last = chain[-1] if chain else conv  # what computes it now, in 4-D
        with graph.inserting_after(last):
            narrow = graph.call_function(_aten.squeeze.dim, (last, 2))
        narrow.meta = {k: v for k, v in end.meta.items() if k not in STALE_META}
        if isinstance(fake, torch.Tensor):
            narrow.meta["val"] = fake
        end.replace_all_uses_with(narrow, delete_user_cb=lambda user, keep=narrow: user is not keep)
        graph.erase_node(node)
        if name not in rewritten:  # a module called twice is one layer
            rewritten.append(name)
    if rewritten:
        graph.lint()
        graph_module.recompile()
    return LayerRewrite("Conv1d", tuple(rewritten), kept)
