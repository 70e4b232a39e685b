"""ConvTranspose as its sub-pixel convolution, the form ONNX Runtime's CPU provider runs in INT8.

ORT's CPU provider has no INT8 transposed convolution: a QDQ ``ConvTranspose`` runs in float between a
DequantizeLinear and a QuantizeLinear, and a model made only of them (a DCGAN generator) gets no INT8 op at all.
A transposed convolution with stride ``s`` is ``s`` (per spatial axis) ordinary convolutions, one per output phase,
over the same input: :func:`conv_transpose_as_conv` writes each one that the preparation can rewrite exactly as

    Conv (output channels: group, phase, channel; kernel ceil(k / s) per phase, taps flipped)
      -> Reshape -> Transpose -> Reshape (interleave the phases) -> Slice (crop the padding)

which ORT quantizes like any Conv (QLinearConv) with the interleave on 8-bit data. The Conv keeps the
ConvTranspose's name, so ``inc.describe`` lists it and ``exclude=`` takes it under the name and type in the user's
model; its ``doc_string`` records the original attributes, from which :func:`restore_conv_transpose` puts the
ConvTranspose back for a layer that stays float (its float form is the user's, and ORT's float ConvTranspose is the
faster one there).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from inc_onnx._repair import free_name

__all__ = ["SUBPIXEL_DOC", "conv_transpose_as_conv", "layer_type", "restore_conv_transpose"]

log = logging.getLogger("inc")

# The doc_string of a sub-pixel Conv: this prefix, then the ConvTranspose's attributes and output as JSON.
SUBPIXEL_DOC = "inc: sub-pixel form of ConvTranspose "
_INT64_MAX = np.iinfo(np.int64).max
# Activations ORT folds into the QuantizeLinear after a Conv: one right after a ConvTranspose moves before the
# interleave (they commute), so the INT8 Conv writes the activated values and no requantization follows the crop.
_FOLDED_ACTIVATIONS = ("Relu", "Clip")


@dataclass(frozen=True)
class _Geometry:
    """One transposed convolution's shape parameters, per spatial axis."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]
    output_padding: tuple[int, ...]
    group: int

    @property
    def taps(self) -> tuple[int, ...]:
        """Kernel size of each phase: ceil(k / s)."""
        return tuple(math.ceil(k / s) for k, s in zip(self.kernel, self.strides, strict=True))

    def conv_pads(self) -> tuple[list[int], list[int]]:
        """The sub-pixel Conv's padding at each axis's start and end (see :func:`_crops`)."""
        begin, end = [], []
        for k, s, q, pb, pe, op in zip(
            self.kernel, self.strides, self.taps, self.pads_begin, self.pads_end, self.output_padding, strict=True
        ):
            # Row m of phase r is output position m * s + r of the unpadded transposed convolution, and the first
            # row a padding of P rows gives is m = q - 1 - P: start at the row holding position pb (or earlier).
            begin.append(q - 1 - min(pb // s, q - 1))
            # Rows past the input's end compute on zeros, i.e. the bias alone, as the output padding does.
            end.append(max((k - 1 - pe + op) // s, 0))
        return begin, end

    def crops(self) -> tuple[list[int], list[int]]:
        """Positions to drop at each axis's start and end of the interleaved output."""
        begin_pads, end_pads = self.conv_pads()
        begin, end = [], []
        for k, s, q, pb, pe, op, cb, ce in zip(
            self.kernel, self.strides, self.taps, self.pads_begin, self.pads_end, self.output_padding,
            begin_pads, end_pads, strict=True,
        ):
            begin.append(pb - (q - 1 - cb) * s)
            end.append((1 + ce) * s - k + pe - op)
        return begin, end


def subpixel_weight(weight: np.ndarray, strides: tuple[int, ...], group: int) -> np.ndarray:
    """The Conv weight ``[group * prod(s) * out/group, in/group, ceil(k/s)...]`` of a ConvTranspose weight
    ``[in, out/group, k...]``: output channel ``(g, r..., c)`` computes phase ``r`` of channel ``c`` of group
    ``g``; tap ``j`` of a phase sits at position ``ceil(k/s) - 1 - j`` (a correlation)."""
    cin, coutg, *kernel = weight.shape
    d = len(kernel)
    taps = [math.ceil(k / s) for k, s in zip(kernel, strides, strict=True)]
    padded = np.pad(weight, [(0, 0), (0, 0), *((0, q * s - k) for q, s, k in zip(taps, strides, kernel, strict=True))])
    # kernel tap t = j * s + r: [g, in/g, out/g, J_1, s_1, ..., J_d, s_d]
    split = [group, cin // group, coutg]
    for q, s in zip(taps, strides, strict=True):
        split += [q, s]
    phased = np.flip(padded.reshape(split), axis=tuple(3 + 2 * i for i in range(d)))
    # -> [g, s_1..s_d, out/g, in/g, J_1..J_d]: group-major output channels, as Conv's groups read them
    order = [0, *(4 + 2 * i for i in range(d)), 2, 1, *(3 + 2 * i for i in range(d))]
    return np.ascontiguousarray(phased.transpose(order)).reshape(group * math.prod(strides) * coutg, cin // group, *taps)


def transposed_weight(weight: np.ndarray, geometry: _Geometry) -> np.ndarray:
    """The inverse of :func:`subpixel_weight`: the ConvTranspose weight ``[in, out/group, k...]`` again."""
    strides, group, d = geometry.strides, geometry.group, len(geometry.strides)
    cing, taps = weight.shape[1], weight.shape[2:]
    coutg = weight.shape[0] // (group * math.prod(strides))
    phased = weight.reshape(group, *strides, coutg, cing, *taps)  # [g, s.., out/g, in/g, J..]
    # -> [g, in/g, out/g, J_1, s_1, ..., J_d, s_d]
    order = [0, 2 + d, 1 + d]
    for i in range(d):
        order += [3 + d + i, 1 + i]
    unphased = np.flip(phased.transpose(order), axis=tuple(3 + 2 * i for i in range(d)))
    full = unphased.reshape(group * cing, coutg, *(q * s for q, s in zip(taps, strides, strict=True)))
    return np.ascontiguousarray(full[(slice(None), slice(None), *(slice(0, k) for k in geometry.kernel))])


def layer_type(node: onnx.NodeProto) -> str:
    """The op type the user's model had for ``node``: ``ConvTranspose`` for a sub-pixel Conv."""
    return "ConvTranspose" if node.op_type == "Conv" and node.doc_string.startswith(SUBPIXEL_DOC) else node.op_type


def conv_transpose_as_conv(model: onnx.ModelProto) -> list[str]:
    """Rewrite (in place) each ConvTranspose that has an exact sub-pixel form; returns their names.

    Kept as they are, with a log line saying why: dilated ones, those given ``output_shape`` (their padding depends
    on the input size), and those whose weight or bias is not a constant of their own.
    """
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {v.name for v in graph.output}
    shapes = _known_shapes(graph)
    read_by = {name: len(nodes) for name, nodes in readers.items()}
    rewritten: list[str] = []
    moved: set[str] = set()
    new_nodes = []
    for node in graph.node:
        if node.name in moved:
            continue
        if node.op_type != "ConvTranspose" or node.domain not in ("", "ai.onnx"):
            new_nodes.append(node)
            continue
        geometry, why = _geometry(node, initializers, read_by)
        if geometry is None:
            log.info("ConvTranspose %s stays a float op (ONNX Runtime has no INT8 kernel for it): %s", node.name, why)
            new_nodes.append(node)
            continue
        after = readers.get(node.output[0], [])
        activation = None
        if len(after) == 1 and after[0].op_type in _FOLDED_ACTIVATIONS and not after[0].domain and node.output[0] not in outputs:
            activation = after[0]
        nodes = _subpixel_nodes(node, geometry, graph, initializers, shapes, activation)
        if activation is not None and any(n.name == activation.name for n in nodes):
            moved.add(activation.name)
        new_nodes.extend(nodes)
        rewritten.append(node.name)
    if rewritten:
        del graph.node[:]
        graph.node.extend(new_nodes)
        log.info(
            "%d ConvTranspose layer(s) run as sub-pixel convolutions, which ONNX Runtime quantizes: %s",
            len(rewritten), ", ".join(rewritten),
        )
    return rewritten


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _geometry(
    node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto], readers: dict[str, int]
) -> tuple[_Geometry | None, str]:
    attrs = _attributes(node)
    if len(node.input) < 2 or node.input[1] not in initializers:
        return None, "its weight is not a constant"
    weight = initializers[node.input[1]]
    if weight.data_type != onnx.TensorProto.FLOAT or len(weight.dims) < 3:
        return None, "its weight is not a float32 tensor with spatial axes"
    d = len(weight.dims) - 2
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and bias not in initializers:
        return None, "its bias is not a constant"
    if readers.get(node.input[1], 0) > 1 or (bias is not None and readers.get(bias, 0) > 1):
        return None, "another op reads its weight or bias"
    if any(v != 1 for v in attrs.get("dilations", [1] * d)):
        return None, "it is dilated (its phases would need dilated taps of unequal lengths)"
    if "output_shape" in attrs:
        return None, "its output_shape attribute makes its padding depend on the input size"
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    kernel = tuple(int(k) for k in weight.dims[2:])
    declared = attrs.get("kernel_shape")
    if declared is not None and tuple(declared) != kernel:
        return None, "its kernel_shape differs from its weight's"
    strides = tuple(int(s) for s in attrs.get("strides", [1] * d))
    output_padding = [int(p) for p in attrs.get("output_padding", [0] * d)]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        # output = input * stride, so the padding is k - s + output_padding whatever the input size; the odd one
        # goes at the end for SAME_UPPER, at the start for SAME_LOWER (ONNX's ConvTranspose definition)
        totals = [k - s + p for k, s, p in zip(kernel, strides, output_padding, strict=True)]
        small = [t // 2 for t in totals]
        large = [t - t // 2 for t in totals]
        pads = [*small, *large] if auto_pad == "SAME_UPPER" else [*large, *small]
    elif auto_pad in ("NOTSET", "VALID"):
        pads = [0] * (2 * d) if auto_pad == "VALID" else [int(p) for p in attrs.get("pads", [0] * (2 * d))]
    else:
        return None, f"its auto_pad={auto_pad} is not one ONNX defines"
    if any(p < 0 for p in pads) or any(p < 0 for p in output_padding):
        return None, "it has negative padding"
    geometry = _Geometry(
        kernel=kernel,
        strides=strides,
        pads_begin=tuple(int(p) for p in pads[:d]),
        pads_end=tuple(int(p) for p in pads[d:]),
        output_padding=tuple(int(p) for p in output_padding),
        group=int(attrs.get("group", 1)),
    )
    return geometry, ""


def _known_shapes(graph: onnx.GraphProto) -> dict[str, list[int | None]]:
    shapes: dict[str, list[int | None]] = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        t = value.type.tensor_type
        if t.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return shapes


def _subpixel_nodes(
    node: onnx.NodeProto,
    geometry: _Geometry,
    graph: onnx.GraphProto,
    initializers: dict[str, onnx.TensorProto],
    shapes: dict[str, list[int | None]],
    activation: onnx.NodeProto | None,
) -> list[onnx.NodeProto]:
    """The sub-pixel nodes replacing ``node`` (and the ``activation`` reading it, moved right after the Conv); their
    weights go into ``graph``, and the old ones out of it."""
    name, prefix = node.name, f"{node.name}/subpixel"
    d, group, strides = len(geometry.kernel), geometry.group, geometry.strides
    phases = math.prod(strides)
    weight = numpy_helper.to_array(initializers[node.input[1]])
    coutg = weight.shape[1]
    cout = coutg * group
    new_inits = [numpy_helper.from_array(subpixel_weight(weight, strides, group).astype(np.float32), f"{prefix}/weight")]
    conv_inputs = [node.input[0], f"{prefix}/weight"]
    if len(node.input) > 2 and node.input[2]:
        bias = numpy_helper.to_array(initializers[node.input[2]]).reshape(group, 1, coutg)
        tiled = np.broadcast_to(bias, (group, phases, coutg)).reshape(-1).astype(np.float32)
        new_inits.append(numpy_helper.from_array(tiled, f"{prefix}/bias"))
        conv_inputs.append(f"{prefix}/bias")
    for old in node.input[1:]:
        if old in initializers:
            graph.initializer.remove(initializers.pop(old))
            # exporters that list weights as graph inputs too (keep_initializers_as_inputs): an input left without
            # its initializer would become one the caller must feed
            for value in [v for v in graph.input if v.name == old]:
                graph.input.remove(value)
    graph.initializer.extend(new_inits)

    pads_begin, pads_end = geometry.conv_pads()
    crop_begin, crop_end = geometry.crops()
    record = {
        "kernel_shape": list(geometry.kernel), "strides": list(strides), "pads": [*geometry.pads_begin, *geometry.pads_end],
        "output_padding": list(geometry.output_padding), "group": group, "output": node.output[0],
    }
    interleaved = phases > 1
    cropped = any(crop_begin) or any(crop_end)
    final = node.output[0]
    if activation is not None and (interleaved or cropped):
        record["activation"] = [activation.name, activation.output[0]]
        final = activation.output[0]
    else:
        activation = None
    conv_out = f"{prefix}/conv" if interleaved or cropped else final
    conv = helper.make_node(
        "Conv", conv_inputs, [conv_out], name=name, kernel_shape=list(geometry.taps), pads=[*pads_begin, *pads_end],
        strides=[1] * d, dilations=[1] * d, group=group, doc_string=SUBPIXEL_DOC + json.dumps(record, sort_keys=True),
    )
    x_shape = shapes.get(node.input[0])
    known = x_shape is not None and len(x_shape) == d + 2
    batch = x_shape[0] if x_shape is not None and known else None
    rows: list[int | None] = [None] * d
    if x_shape is not None and known:
        rows = [
            None if h is None else h + b + e - q + 1
            for h, b, e, q in zip(x_shape[2:], pads_begin, pads_end, geometry.taps, strict=True)
        ]
    chain = _Chain(prefix, graph, batch)
    chain.values.append(_float_value(conv_out, [batch, group * phases * coutg, *rows]))
    source = conv_out
    if activation is not None:
        activated = onnx.NodeProto()
        activated.CopyFrom(activation)
        activated.input[0], activated.output[0] = conv_out, f"{prefix}/activated"
        chain.nodes.append(activated)
        chain.values.append(_float_value(activated.output[0], [batch, group * phases * coutg, *rows]))
        source = activated.output[0]
    if interleaved:
        _interleave(chain, source, geometry, cout, rows)
        full = [None if r is None else r * s for r, s in zip(rows, strides, strict=True)]
        if cropped:
            kept = [None if f is None else f - b - e for f, b, e in zip(full, crop_begin, crop_end, strict=True)]
            chain.slice(crop_begin, crop_end, first_axis=1, dims=[*kept, cout])
        # back to channels first; ORT cancels it against the channels-last Transpose it puts before the next Conv
        chain.transpose([0, d + 1, *range(1, d + 1)], output=final)
    elif cropped:
        chain.current = source
        chain.slice(crop_begin, crop_end, first_axis=2, dims=[], output=final)
    known_values = {v.name for v in graph.value_info}
    graph.value_info.extend(v for v in chain.values if v.name not in known_values)
    return [conv, *chain.nodes]


class _Chain:
    """The float nodes after a sub-pixel Conv, each reading the one before; names under ``prefix``."""

    def __init__(self, prefix: str, graph: onnx.GraphProto, batch: int | None) -> None:
        self.prefix, self.graph, self.batch = prefix, graph, batch
        self.nodes: list[onnx.NodeProto] = []
        self.values: list[onnx.ValueInfoProto] = []
        self.current = ""

    def constant(self, name: str, values: Iterable[int]) -> str:
        self.graph.initializer.append(numpy_helper.from_array(np.array(list(values), np.int64), f"{self.prefix}/{name}"))
        return f"{self.prefix}/{name}"

    def add(self, op_type: str, inputs: list[str], name: str, *, output: str | None = None, **attrs: object) -> str:
        out = output or f"{self.prefix}/{name}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{self.prefix}/{name}", **attrs))
        return out

    def step(self, op_type: str, inputs: list[str], name: str, dims: list[int | None] | None, *,
             output: str | None = None, **attrs: object) -> None:
        """A node reading the current tensor (and ``inputs``), whose float output becomes the current one."""
        self.current = self.add(op_type, [self.current, *inputs], name, output=output, **attrs)
        if dims is not None and output is None:
            self.values.append(_float_value(self.current, [self.batch, *dims]))

    def transpose(self, perm: list[int], *, name: str | None = None, dims: list[int | None] | None = None,
                  output: str | None = None) -> None:
        self.step("Transpose", [], name or f"transpose_{len(self.nodes)}", dims, output=output, perm=perm)

    def slice(self, begin: list[int], end: list[int], *, first_axis: int, dims: list[int | None],
              output: str | None = None) -> None:
        starts = self.constant("crop_starts", begin)
        ends = self.constant("crop_ends", [-e if e else _INT64_MAX for e in end])
        axes = self.constant("crop_axes", range(first_axis, first_axis + len(begin)))
        self.step("Slice", [starts, ends, axes], "crop", dims or None, output=output)


def _interleave(chain: _Chain, conv_out: str, geometry: _Geometry, cout: int, rows: list[int | None]) -> None:
    """[N, g * phases * out/g, Q...] -> [N, Q_1 * s_1, ..., out] (channels last), phase r of row m at m * s + r.

    The interleave runs channels last, the layout ORT's QLinearConv computes in: the Transpose into it cancels
    against the one ORT puts after the Conv, and each phase's channels are one contiguous run to copy.
    """
    strides, group = geometry.strides, geometry.group
    d, coutg = len(strides), cout // group
    chain.current = conv_out
    chain.transpose([0, *range(2, d + 2), 1], name="channels_last", dims=[*rows, group * math.prod(strides) * coutg])
    if all(r is not None for r in rows):
        phased_shape = chain.constant("phased_shape", [0, *(r for r in rows if r is not None), group, *strides, coutg])
        full_shape = chain.constant("full_shape", [0, *(r * s for r, s in zip(rows, strides, strict=True) if r is not None), cout])
    else:  # a spatial size known only at run time: the shapes are computed from the Conv's output
        found, keep_batch = chain.add("Shape", [conv_out], "rows", start=2), chain.constant("keep_batch", [0])
        phased_shape = chain.add(
            "Concat", [keep_batch, found, chain.constant("phases", [group, *strides, coutg])],
            "phased_shape", axis=0,
        )
        full_rows = chain.add("Mul", [found, chain.constant("strides", strides)], "full_rows")
        full_shape = chain.add(
            "Concat", [keep_batch, full_rows, chain.constant("channels", [cout])], "full_shape", axis=0
        )
    # [N, Q_1..Q_d, g, s_1..s_d, out/g] -> [N, Q_1, s_1, ..., Q_d, s_d, g, out/g]
    perm = [0, *(x for i in range(d) for x in (1 + i, 2 + d + i)), 1 + d, 2 + 2 * d]
    chain.step("Reshape", [phased_shape], "phased", [*rows, group, *strides, coutg])
    chain.transpose(perm, name="phases_inside", dims=[*(x for r, s in zip(rows, strides, strict=True) for x in (r, s)), group, coutg])
    full = [None if r is None else r * s for r, s in zip(rows, strides, strict=True)]
    chain.step("Reshape", [full_shape], "interleaved", [*full, cout])


def _float_value(name: str, dims: Iterable[int | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [d if d is not None else None for d in dims])


def restore_conv_transpose(model: onnx.ModelProto, names: Iterable[str]) -> list[str]:
    """Put back (in place) the ConvTranspose of each named sub-pixel Conv; returns the names restored.

    Its weight is computed from the Conv's current weight (exactly: taps are only moved), so whatever edited the
    Conv's weight since (SmoothQuant's rescaling) carries over.
    """
    wanted = set(names)
    graph = model.graph
    convs = {n.name: n for n in graph.node if n.name in wanted and layer_type(n) == "ConvTranspose" and n.op_type == "Conv"}
    if not convs:
        return []
    initializers = {init.name: init for init in graph.initializer}
    kept, restored = [], []
    chain_prefixes = tuple(f"{name}/subpixel/" for name in convs)
    activations = {}
    for conv in convs.values():
        record = json.loads(conv.doc_string[len(SUBPIXEL_DOC):])
        if "activation" in record:
            activation, activated = record["activation"]
            activations[activation] = (record["output"], activated)
    for node in graph.node:
        if node.name in convs:
            kept.append(_original(node, graph, initializers))
            restored.append(node.name)
        elif node.name in activations:  # the moved Relu/Clip reads the ConvTranspose again
            node.input[0], node.output[0] = activations[node.name]
            kept.append(node)
        elif not node.name.startswith(chain_prefixes):
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    read = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name.startswith(chain_prefixes) and i.name not in read]:
        graph.initializer.remove(init)
    dropped = [v for v in graph.value_info if v.name.startswith(chain_prefixes)]
    for value in dropped:
        graph.value_info.remove(value)
    return restored


def _original(conv: onnx.NodeProto, graph: onnx.GraphProto, initializers: dict[str, onnx.TensorProto]) -> onnx.NodeProto:
    record = json.loads(conv.doc_string[len(SUBPIXEL_DOC):])
    d = len(record["strides"])
    geometry = _Geometry(
        kernel=tuple(record["kernel_shape"]), strides=tuple(record["strides"]), pads_begin=tuple(record["pads"][:d]),
        pads_end=tuple(record["pads"][d:]), output_padding=tuple(record["output_padding"]), group=record["group"],
    )
    weight = transposed_weight(numpy_helper.to_array(initializers[conv.input[1]]), geometry)
    taken = set(initializers) | {name for node in graph.node for name in (*node.input, *node.output)}
    weight_name = free_name(f"{conv.name}/weight", taken)
    graph.initializer.append(numpy_helper.from_array(weight.astype(np.float32), weight_name))
    inputs = [conv.input[0], weight_name]
    if len(conv.input) > 2 and conv.input[2]:
        coutg = weight.shape[1]
        tiled = numpy_helper.to_array(initializers[conv.input[2]]).reshape(geometry.group, -1, coutg)
        bias_name = free_name(f"{conv.name}/bias", taken)
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(tiled[:, 0]).reshape(-1), bias_name))
        inputs.append(bias_name)
    return helper.make_node(
        "ConvTranspose", inputs, [record["output"]], name=conv.name, kernel_shape=record["kernel_shape"],
        strides=record["strides"], pads=record["pads"], output_padding=record["output_padding"], group=record["group"],
    )

