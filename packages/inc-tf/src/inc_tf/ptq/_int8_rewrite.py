"""The int8 rewrite of a frozen float graph into TensorFlow's own oneDNN INT8 kernels.

Each unit (see ``_int8_units``) becomes:

* Conv2D: ``QuantizeV2`` of its input (quint8 after a Relu, else symmetric qint8), then
  ``_FusedQuantizedConv2D`` with ``fused_ops=[BiasAdd, (Relu,) Requantize]`` (per-channel int8 weights,
  float bias, the calibrated output range frozen in), then ``Dequantize``. A depthwise conv is the same
  with ``_FusedQuantizedDepthwiseConv2D``; a Relu6 is the fused Relu with the output range capped at 6.
* MatMul: ``QuantizeV2`` of its input to quint8, then ``QuantizedMatMulWithBiasAndReluAndRequantize``
  (+ ``Dequantize``) when an int8 kernel reads its Relu output, else ``QuantizedMatMulWithBiasAndDequantize``
  (+ a float Relu) (per-tensor int8 weights). A signed
  input is shifted by its calibrated minimum first and the shift folded into the bias, so it is still
  read as unsigned 8-bit (the kernels' own MIN_FIRST compensation is wrong with a float bias in TF 2.21).

A residual ``Relu(Add(conv, summand))`` whose conv reads an unsigned input is one fused-sum kernel. TF's
kernel takes an unsigned summand only, so a signed one (a ResNet's downsampling 1x1 conv + BN) is fused
shifted: the kernel reads ``summand - low`` (``low`` its calibrated minimum) as quint8 and the conv's bias
gets ``+ low``, so the sum is unchanged. A conv whose output only that Add reads writes the shifted tensor
itself (``- low`` folded into its bias); any other summand is shifted by a float ``Sub`` before it is quantized.

The float output of a unit keeps the name of the op it replaces, so every other node is copied
unchanged. A unit that reads another unit's requantized output at the same range takes the int8
tensor directly, so conv -> conv chains stay in int8 with no Dequantize/QuantizeV2 in between.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from inc_tf.ptq._int8_units import Unit, consumers, tensor_name

__all__ = ["UnitSettings", "probe_name", "rewrite_int8"]

# DataType enum values (tensorflow/core/framework/types.proto)
_FLOAT, _QINT8, _QUINT8 = 1, 11, 12
_TINY = 1e-6  # a range never collapses to a point (a dead channel or an all-zero tensor)


@dataclass(frozen=True)
class UnitSettings:
    """How one unit is quantized in a trial: its ranges and weight granularity.

    ``output_range`` is the unit's final output's; ``core_output_range`` and ``summand_range`` are those of
    the tensor before a residual Add and of the Add's other input (``None`` without a summand).
    """

    input_range: tuple[float, float]
    output_range: tuple[float, float]
    per_channel: bool
    core_output_range: tuple[float, float] | None = None
    summand_range: tuple[float, float] | None = None


def _fuses_sum(unit: Unit, s: UnitSettings) -> bool:
    """Whether the residual Add goes into the conv kernel: TF's fused sum kernel takes an unsigned input (a
    signed summand is shifted to unsigned, see the module docstring)."""
    return bool(unit.summand and s.summand_range is not None and s.input_range[0] >= 0.0)


@dataclass(frozen=True)
class _QTensor:
    ref: str
    min_ref: str
    max_ref: str
    dtype: int
    bounds: tuple[float, float]


class _Builder:
    def __init__(self, graph_def: Any) -> None:
        from tensorflow.core.framework import graph_pb2

        self.graph = graph_pb2.GraphDef()
        self.graph.versions.CopyFrom(graph_def.versions)
        self.graph.library.CopyFrom(graph_def.library)

    def const(self, name: str, value: Any, dtype: Any = None) -> str:
        from tensorflow.python.framework import tensor_util

        proto = tensor_util.make_tensor_proto(value, dtype=dtype)
        node = self.graph.node.add(name=name, op="Const")
        node.attr["dtype"].type = proto.dtype
        node.attr["value"].tensor.CopyFrom(proto)
        return name

    def node(self, name: str, op: str, inputs: list[str], **attrs: Any) -> Any:
        node = self.graph.node.add(name=name, op=op)
        node.input.extend(inputs)
        for key, value in attrs.items():
            attr = node.attr[key]
            if isinstance(value, bool):
                attr.b = value
            elif isinstance(value, str):
                attr.s = value.encode()
            elif isinstance(value, _Types):
                attr.list.type.extend(value)
            elif isinstance(value, list) and value and isinstance(value[0], str):
                attr.list.s.extend(v.encode() for v in value)
            elif isinstance(value, list):
                attr.list.i.extend(value)
            elif isinstance(value, int):
                attr.type = value
            elif isinstance(value, float):
                attr.f = value
            else:  # pragma: no cover - programming error
                raise TypeError(f"attribute {key}={value!r}")
        return node


class _Types(tuple):  # a list(type) attribute, told apart from list(int)
    pass


def _quantized_weights(weight: np.ndarray, per_channel: bool, depthwise: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 weights and their limits: one per output channel (a depthwise conv's are its last two axes)."""
    axes = tuple(range(weight.ndim - (2 if depthwise else 1)))
    limit = np.abs(weight).max(axis=axes).reshape(-1) if per_channel else np.abs(weight).max(keepdims=False)
    if per_channel and depthwise:
        limit = limit.reshape(weight.shape[-2:])  # broadcasts over the filter's last two axes
    limit = np.maximum(np.asarray(limit, dtype=np.float32), _TINY)
    q = np.clip(np.rint(weight / limit * 127.0), -127, 127).astype(np.int8)
    return q, limit.reshape(-1).astype(np.float32) if per_channel else limit.astype(np.float32)


def _signed_bounds(low: float, high: float) -> tuple[float, float]:
    m = max(abs(low), abs(high), _TINY)
    return -m, m


def rewrite_int8(
    graph_def: Any, units: list[Unit], settings: dict[str, UnitSettings], outputs: tuple[str, ...],
    *, keep: tuple[str, ...] = (), probe: bool = False,
) -> tuple[Any, dict[str, str]]:
    """``graph_def`` with every unit in ``settings`` running on int8 kernels; the rest is copied as it is.

    ``keep`` names nodes to keep though no output needs them (per-op error measurement reads each unit's
    float output, which int8 -> int8 chains otherwise leave unused and drop). ``probe`` builds the graph
    per-op errors are measured on: each unit reads its float input (and summand) from its own placeholder,
    :func:`probe_name` of the tensor, never from another unit's int8 output, so feeding the float graph's
    values there measures each unit's own error, not the sum of the units upstream.

    Returns:
        The new graph, and the name of each int8 kernel node mapped to the unit it computes.
    """
    from tensorflow.python.framework import dtypes, tensor_shape

    chosen = [u for u in units if u.name in settings]
    fusing: set[str] = set()
    claimed: set[str] = set()
    for u in chosen:  # two convs feeding one Add may both qualify: the first one takes it
        if _fuses_sum(u, settings[u.name]) and u.output_node not in claimed:
            fusing.add(u.name)
            claimed.add(u.output_node)
    replaced = {name for u in chosen for name in (u.nodes if u.name in fusing else u.core_nodes or u.nodes)}
    # Signed summands: a producer unit whose output only the residual Add reads writes it shifted to unsigned.
    # Its output is where the rewrite ends it: before the Add when the Add is another conv's to fuse (both
    # convs of a downsampling block reach the Add; the one that fuses it reads the other's output).
    by_output = {u.core_output if u.summand else u.output: u for u in chosen if u.name not in fusing}
    readers = consumers(graph_def)
    pinned = {tensor_name(o).split(":")[0] for o in outputs} | set(keep)
    shifted_by: dict[str, tuple[float, float]] = {}  # producer unit -> the summand range it is shifted by
    for u in chosen:
        summand_range = settings[u.name].summand_range
        if u.name not in fusing or summand_range is None or summand_range[0] >= 0.0 or probe:
            continue
        producer = by_output.get(u.summand or "")
        # a conv (a MatMul's float-output kernel has no quint8 output to write the shifted tensor to) without a
        # Relu of its own (the rewrite drops it from one that ends before another conv's Add)
        if producer is None or producer.op == "MatMul" or (producer.relu and not producer.summand):
            continue
        node = producer.core_output.split(":")[0]
        if len(readers.get(node, [])) == 1 and node not in pinned:
            shifted_by[producer.name] = summand_range
    # A MaxPool reading a unit's int8 output runs on it too (QuantizedMaxPool keeps the range): no round trip.
    effective = {u.output if u.name in fusing or not u.summand else u.core_output for u in chosen}
    pools: dict[str, list[Any]] = {}
    for node in graph_def.node:
        if (
            node.op == "MaxPool" and node.attr["data_format"].s in (b"", b"NHWC") and node.attr["T"].type == _FLOAT
            and tensor_name(node.input[0]) in effective
        ):
            pools.setdefault(tensor_name(node.input[0]), []).append(node)
            replaced.add(node.name)
    # Tensors an int8 kernel reads: a unit whose output none of them reads has no use for an 8-bit output.
    int8_read = {t for u in chosen for t in (u.input, u.summand) if t} | set(pools)
    build = _Builder(graph_def)
    for node in graph_def.node:
        if node.name not in replaced:
            build.graph.node.add().CopyFrom(node)
    produced: dict[str, _QTensor] = {}  # a unit's float output -> its requantized int8 tensor
    produced_shifted: dict[str, _QTensor] = {}  # a summand -> its producer's int8 output of (summand - low)
    quantized_inputs: dict[tuple[str, int, tuple[float, float]], _QTensor] = {}
    shifted_inputs: dict[tuple[str, float], str] = {}  # (float tensor, low) -> that tensor minus low
    kernels: dict[str, str] = {}

    placeholders: set[str] = set()
    shapes = _tensor_shapes(graph_def, [t for u in chosen for t in (u.input, u.summand) if t]) if probe else {}

    def probe_input(tensor: str, summand: bool = False) -> str:
        name = probe_name(tensor, summand=summand)
        if name not in placeholders:
            node = build.node(name, "Placeholder", [], dtype=_FLOAT)
            # oneDNN's int8 kernels are set up for the input's rank: give the placeholder the tensor's shape
            node.attr["shape"].shape.CopyFrom(shapes.get(tensor, tensor_shape.TensorShape(None)).as_proto())
            placeholders.add(name)
        return f"{name}:0"

    for unit in _in_order(chosen):
        s = settings[unit.name]
        fused_sum = unit.name in fusing
        if unit.summand and not fused_sum:
            # The residual Add and its Relu stay float; the unit ends before them.
            unit = Unit(unit.name, unit.op, unit.input, unit.core_output.split(":")[0], unit.core_nodes,
                        unit.weight, unit.bias, False, unit.attrs)
            s = UnitSettings(s.input_range, s.core_output_range or s.output_range, s.per_channel)
        base = f"{unit.name}/inc_int8"
        low, high = s.input_range
        bias = unit.bias.astype(np.float64)
        source = probe_input(unit.input) if probe else unit.input
        q_weight, limit = _quantized_weights(
            unit.weight, s.per_channel and unit.op != "MatMul", depthwise=unit.op == "DepthwiseConv2dNative"
        )
        if unit.op == "MatMul":
            if low < 0.0:
                # x @ W == (x - low) @ W + low * colsum(W): read the shifted input as unsigned. The kernel
                # multiplies by the int8 weights, so the shift is undone with *their* column sums: with the
                # float weights' sums, each column keeps low * (its rounding error summed over the inputs), a
                # constant offset as large as the signal on a wide layer (a BERT's 1536-input FFN).
                # One Sub per tensor and range: the query, key and value projections read the same LayerNorm
                # output, so they share the shifted tensor and its QuantizeV2 (fewer nodes for grappler too).
                key = (source, float(low))
                if key not in shifted_inputs:
                    shift = build.const(f"{base}/shift", np.float32(low))
                    shifted_inputs[key] = build.node(f"{base}/shifted", "Sub", [source, shift], T=_FLOAT).name + ":0"
                source = shifted_inputs[key]
                dequantized = q_weight.astype(np.float64) * (limit.astype(np.float64) / 127.0)
                bias = bias + low * dequantized.sum(axis=0)
                want = (_QUINT8, (0.0, max(high - low, _TINY)))
            else:
                want = (_QUINT8, (0.0, max(high, _TINY)))
        else:
            want = (_QUINT8, (0.0, max(high, _TINY))) if low >= 0.0 else (_QINT8, _signed_bounds(low, high))
        def quantized(tensor: str, want: tuple[int, tuple[float, float]], qname: str) -> _QTensor:
            """``tensor`` in int8: a producer's requantized output at the same range, else one QuantizeV2 per range."""
            ready = None if probe else produced.get(tensor)
            if ready is not None and ready.dtype == want[0]:
                return ready  # the producer requantized this very tensor to a calibrated range: read it as it is
            key = (tensor, want[0], want[1])
            if key not in quantized_inputs:
                lo_ref = build.const(f"{qname}/min", np.float32(want[1][0]))
                hi_ref = build.const(f"{qname}/max", np.float32(want[1][1]))
                # ensure_minimum_range: TF widens any range below 0.01 (its default) to 0.01, so inputs a few
                # 1e-4 wide kept ~8 levels and ~1e-6 wide ones became zero; the calibrated range is used as it is.
                build.node(
                    qname, "QuantizeV2", [tensor, lo_ref, hi_ref], T=want[0], mode="SCALED", round_mode="HALF_TO_EVEN",
                    ensure_minimum_range=0.0,
                )
                quantized_inputs[key] = _QTensor(f"{qname}:0", f"{qname}:1", f"{qname}:2", want[0], want[1])
            return quantized_inputs[key]

        qin = quantized(source, want, f"{base}/quantize")
        out_low, out_high = s.output_range
        summand_low, summand_high = s.summand_range or (0.0, 0.0)
        summand_shift = shifted_by.get(unit.name)
        if summand_shift is not None:
            # writes (output - low) as unsigned for the fused-sum kernel that reads it as its summand
            bias = bias - summand_shift[0]
            out_type, out_bounds = _QUINT8, (0.0, max(summand_shift[1] - summand_shift[0], _TINY))
        elif unit.relu:
            # a Relu6 is the kernel's Relu with the requantized output saturating at 6
            out_type, out_bounds = _QUINT8, (0.0, max(min(out_high, 6.0) if unit.relu6 else out_high, _TINY))
        else:
            out_type, out_bounds = _QINT8, _signed_bounds(out_low, out_high)
        if fused_sum and summand_low < 0.0:
            bias = bias + summand_low  # the kernel adds (summand - low): the bias adds low back
        w_ref = build.const(f"{base}/weight", q_weight, dtype=dtypes.qint8)
        wmin = build.const(f"{base}/weight_min", -limit)
        wmax = build.const(f"{base}/weight_max", limit)
        b_ref = build.const(f"{base}/bias", bias.astype(np.float32))
        omin = build.const(f"{base}/output_min", np.float32(out_bounds[0]))
        omax = build.const(f"{base}/output_max", np.float32(out_bounds[1]))
        inputs = [qin.ref, w_ref, b_ref, qin.min_ref, qin.max_ref, wmin, wmax, omin, omax]
        if fused_sum:
            summand = unit.summand or ""  # set: _fuses_sum
            summand_source = probe_input(summand, summand=True) if probe else summand
            if summand_low >= 0.0:
                qsum = quantized(summand_source, (_QUINT8, (0.0, max(summand_high, _TINY))), f"{base}/quantize_summand")
            elif summand in produced_shifted:
                qsum = produced_shifted[summand]
            else:
                low_ref = build.const(f"{base}/summand_low", np.float32(summand_low))
                shifted = build.node(f"{base}/shift_summand", "Sub", [summand_source, low_ref], T=_FLOAT).name
                qsum = quantized(
                    f"{shifted}:0", (_QUINT8, (0.0, max(summand_high - summand_low, _TINY))), f"{base}/quantize_summand"
                )
            kernel = build.node(
                f"{base}/conv_sum", "QuantizedConv2DWithBiasSumAndReluAndRequantize",
                [*inputs, qsum.ref, qsum.min_ref, qsum.max_ref],
                Tinput=_QUINT8, Tfilter=_QINT8, Tbias=_FLOAT, Tsummand=_QUINT8, out_type=_QUINT8,
                strides=unit.attrs["strides"], padding=unit.attrs["padding"],
            ).name
            kernels[kernel] = unit.name
        elif unit.op in ("Conv2D", "DepthwiseConv2dNative"):
            fused = ["BiasAdd", "Relu", "Requantize"] if unit.relu else ["BiasAdd", "Requantize"]
            kernel_op = "_FusedQuantizedConv2D" if unit.op == "Conv2D" else "_FusedQuantizedDepthwiseConv2D"
            build.node(
                f"{base}/conv", kernel_op, inputs,
                Thost_inputs=_Types((qin.dtype, _QINT8) + (_FLOAT,) * 7), Thost_outputs=_Types((out_type, _FLOAT, _FLOAT)),
                Tdevice_inputs=_Types(()), Tdevice_outputs=_Types(()), Tinput=qin.dtype, Tfilter=_QINT8, Tbias=_FLOAT,
                Tsummand=out_type, out_type=out_type, strides=unit.attrs["strides"], padding=unit.attrs["padding"],
                data_format="NHWC", fused_ops=fused, is_filter_const=True, is_bias_const=True,
            )
            kernel = f"{base}/conv"
            kernels[kernel] = unit.name
        elif unit.relu and unit.output in int8_read:
            kernel = build.node(
                f"{base}/matmul", "QuantizedMatMulWithBiasAndReluAndRequantize", inputs,
                T1=_QUINT8, T2=_QINT8, Tbias=_FLOAT, Toutput=_QUINT8, transpose_a=False, transpose_b=False,
                input_quant_mode="SCALED",
            ).name
            kernels[kernel] = unit.name
        else:
            # A float output. With a Relu that only float ops read, the Relu runs in float after the kernel: a
            # requantized output would lose what its calibrated range cannot resolve, even when the layer
            # reading it was kept in float.
            kernel = f"{base}/matmul" if unit.relu else unit.output_node
            build.node(
                kernel, "QuantizedMatMulWithBiasAndDequantize", inputs,
                T1=_QUINT8, T2=_QINT8, Tbias=_FLOAT, Toutput=_FLOAT, transpose_a=False, transpose_b=False,
                input_quant_mode="SCALED",
            )
            kernels[kernel] = unit.name
            if unit.relu:
                build.node(unit.output_node, "Relu6" if unit.relu6 else "Relu", [f"{kernel}:0"], T=_FLOAT)
            continue
        if summand_shift is not None:
            # the float output (kept for whatever else asks for it) adds the shift back
            build.node(f"{base}/dequantize", "Dequantize", [f"{kernel}:0", f"{kernel}:1", f"{kernel}:2"], T=out_type, mode="SCALED")
            low_ref = build.const(f"{base}/output_low", np.float32(summand_shift[0]))
            build.node(unit.output_node, "AddV2", [f"{base}/dequantize:0", low_ref], T=_FLOAT)
            produced_shifted[unit.output] = _QTensor(f"{kernel}:0", f"{kernel}:1", f"{kernel}:2", out_type, out_bounds)
            continue
        build.node(unit.output_node, "Dequantize", [f"{kernel}:0", f"{kernel}:1", f"{kernel}:2"], T=out_type, mode="SCALED")
        produced[unit.output] = _QTensor(f"{kernel}:0", f"{kernel}:1", f"{kernel}:2", out_type, out_bounds)
        for pool in pools.get(unit.output, []):
            qpool = f"{pool.name}/inc_int8"
            build.node(
                qpool, "QuantizedMaxPool", [f"{kernel}:0", f"{kernel}:1", f"{kernel}:2"], T=out_type,
                ksize=list(pool.attr["ksize"].list.i), strides=list(pool.attr["strides"].list.i),
                padding=pool.attr["padding"].s.decode(),
            )
            build.node(pool.name, "Dequantize", [f"{qpool}:0", f"{qpool}:1", f"{qpool}:2"], T=out_type, mode="SCALED")
            produced[f"{pool.name}:0"] = _QTensor(f"{qpool}:0", f"{qpool}:1", f"{qpool}:2", out_type, out_bounds)
    from tensorflow.python.framework.graph_util_impl import extract_sub_graph

    # Drop what no output needs any more (the float weights the rewrite replaced).
    needed = [tensor_name(o).split(":")[0] for o in outputs] + [n for n in keep if n not in outputs]
    return extract_sub_graph(build.graph, needed), kernels


def _tensor_shapes(graph_def: Any, tensors: list[str]) -> dict[str, Any]:
    """The static shapes TF infers for ``tensors`` of ``graph_def`` (batch dimension unknown)."""
    import tensorflow as tf

    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(graph_def, name="")
        return {t: graph.get_tensor_by_name(t).shape for t in dict.fromkeys(tensors)}


def probe_name(tensor: str, *, summand: bool = False) -> str:
    """The placeholder a probe graph (``rewrite_int8(..., probe=True)``) reads float ``tensor`` from.

    A summand gets its own placeholder (and QuantizeV2): TF's fused-sum conv writes its output into the
    summand's buffer, which must not be another kernel's input (shared, it crashed TF 2.21's oneDNN kernels).
    """
    return "inc_probe/" + tensor.replace(":", "_") + ("/summand" if summand else "")


def _in_order(units: list[Unit]) -> list[Unit]:
    """Producers before consumers, so a consumer sees its producer's int8 output (graph order already is)."""
    outputs = {t: u for u in units for t in (u.output, u.core_output)}
    done: set[str] = set()
    ordered: list[Unit] = []

    def visit(unit: Unit) -> None:
        if unit.name in done:
            return
        done.add(unit.name)
        for tensor in (unit.input, unit.summand):
            producer = outputs.get(tensor or "")
            if producer is not None:
                visit(producer)
        ordered.append(unit)

    for unit in units:
        visit(unit)
    return ordered
