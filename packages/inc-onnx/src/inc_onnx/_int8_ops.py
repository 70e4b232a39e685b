"""Which nodes of a quantized ONNX model compute on 8-bit data, counted from the graph itself.

This is what the result reports, rather than what was asked for: ORT's quantizers skip ops they
cannot handle (an activation x activation MatMul in dynamic mode, a Reshape of an integer tensor)
without a word, so the number of quantizable ops says little about the INT8 model.
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from inc_onnx.ptq._describe import PASS_THROUGH, op_types_for

__all__ = ["FLOAT_ON_ORT", "float_qdq_ops", "int8_op_counts", "int8_ops", "runtime_graph"]

# Nodes that convert between float and 8-bit: they surround INT8 kernels but are not ops of the model.
_CONVERSIONS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
# Integer kernels ORT's QOperator and dynamic quantizers write (besides every QLinear* op).
_INTEGER_KERNELS = frozenset({
    "ConvInteger", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat",
    "QAttention", "QEmbedLayerNormalization", "QGemm",
})
# QDQ: the op types inc hands ORT's QDQ quantizer; ORT runs a DequantizeLinear -> op -> QuantizeLinear group
# of these as one INT8 kernel (or moves the 8-bit data through, for reshapes and pooling).
_QDQ_TYPES = frozenset({*op_types_for("static", "qdq"), *op_types_for("static", "qoperator")})
# Ops that move or select 8-bit data as it is (their output keeps the input's type and parameters).
_DATA_MOVEMENT = frozenset({
    "ArgMax", "Concat", "Flatten", "Gather", "GatherElements", "Identity", "MaxPool", "Pad", "Reshape", "Resize",
    "Slice", "Split", "Squeeze", "Transpose", "Unsqueeze",
})
_EIGHT_BIT = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
# Ops ORT's CPU provider runs in float even between DequantizeLinear and QuantizeLinear: it has no INT8 kernel for
# them (OpenVINO has one for ConvTranspose; for ORT inc quantizes them as sub-pixel Conv).
FLOAT_ON_ORT = frozenset({"ConvTranspose"})


def float_qdq_ops(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The QDQ groups ORT runs in float: ops of :data:`FLOAT_ON_ORT` reading a dequantized input and weight."""
    dequantized = {node.output[0] for node in model.graph.node if node.op_type == "DequantizeLinear" and node.output}
    return [
        node for node in model.graph.node
        if node.op_type in FLOAT_ON_ORT and node.domain in ("", "ai.onnx") and len(node.input) > 1
        and node.input[0] in dequantized and node.input[1] in dequantized
    ]


def int8_ops(model: onnx.ModelProto, *, qdq: bool = True) -> list[str]:
    """Names of the nodes of ``model`` that compute on 8-bit data, in graph order.

    A node counts when it is an integer kernel (``QLinear*``, ``MatMulInteger``, ``QGemm``, ...), when it
    gathers rows of a quantized table (an 8-bit embedding), or, in QDQ form, when it is an op ORT fuses
    into an INT8 kernel and its first input comes from a DequantizeLinear. Ops that only move 8-bit
    values (a Reshape or MaxPool between QLinear ops) are exact and do not count, as in ``describe`` (``qdq=False`` drops that rule, for a graph ORT has already fused).
    Quantize/DequantizeLinear themselves never count.
    """
    eight_bit = {init.name for init in model.graph.initializer if init.data_type in _EIGHT_BIT}
    tables = set(eight_bit)
    producers = {out: node for node in model.graph.node for out in node.output}
    names = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DynamicQuantizeLinear") and node.output:
            eight_bit.add(node.output[0])
        if node.op_type in _CONVERSIONS or not node.input:
            continue
        kernel = node.op_type.startswith("QLinear") or node.op_type in _INTEGER_KERNELS
        moves = node.op_type in _DATA_MOVEMENT and node.input[0] in eight_bit
        # Moving 8-bit values is exact and does not count; gathering rows of a quantized table does.
        table = node.op_type in ("Gather", "GatherElements") and node.input[0] in tables
        first = producers.get(node.input[0])
        in_qdq = (
            qdq and node.op_type in _QDQ_TYPES and node.op_type not in PASS_THROUGH and not node.domain
            and first is not None and first.op_type == "DequantizeLinear"
        )
        if in_qdq and node.op_type in ("Gather", "GatherElements"):
            in_qdq = first.input[0] in tables
        if moves or node.op_type.startswith("QLinear") or _qgemm_writes_8bit(node):
            eight_bit.update(node.output[:1])
        if kernel or table or in_qdq:
            names.append(node.name or f"{node.op_type}@{len(names)}")
    return names


def _qgemm_writes_8bit(node: onnx.NodeProto) -> bool:
    # QGemm quantizes its output only when given the output's scale (input 7).
    return node.op_type == "QGemm" and len(node.input) > 7 and bool(node.input[7])


def int8_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Per op type, how many nodes run INT8 kernels when ONNX Runtime runs ``model``.

    Counted on the graph ORT executes (:func:`runtime_graph`): a QDQ group ORT cannot fuse runs in
    float, so it must not count. Where ORT cannot write that graph, the given one is counted.
    """
    graph = runtime_graph(model)
    if graph is None:
        graph, qdq = model, True
    else:
        qdq = False
    wanted = set(int8_ops(graph, qdq=qdq))
    return dict(collections.Counter(node.op_type for node in graph.graph.node if node.name in wanted))


def runtime_graph(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """``model`` after ORT's graph optimizations up to the extended level (QDQ fusion), or None if ORT fails."""
    if model.ByteSize() >= 2**31 - 1:
        return None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="inc-onnx-count-") as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            return onnx.load_model(options.optimized_model_filepath)
        except Exception:  # noqa: BLE001 - counting falls back to the given graph; loading is checked elsewhere
            return None
