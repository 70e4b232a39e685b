"""Which nodes of a prepared graph each quantization mode can quantize, and what may be tuned per op type."""

from __future__ import annotations

import onnx
from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry, QLinearOpsRegistry

from inc_core import QuantConfig
from inc_core.backend import Op, TuningSpace

__all__ = ["FORMATS", "WEIGHTED_OPS", "describe_prepared", "op_types_for", "weight_axis"]

FORMATS = ("qdq", "qoperator")
# Op types whose second input is a weight that can be quantized per output channel.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_CALIBRATIONS = ("minmax", "kl", "percentile", "mse")
_STATIC_OPS = tuple(sorted(set(QLinearOpsRegistry) | set(QDQRegistry)))


def op_types_for(approach: str, fmt: str) -> tuple[str, ...]:
    """The op types ORT's quantizer handles in this mode (the same defaults quantize_static uses)."""
    if approach == "dynamic":
        # ORT's dynamic quantizer rewrites Gemm as MatMul + Add, then quantizes the MatMul.
        return (*IntegerOpsRegistry, "Gemm")
    if fmt == "qoperator":
        return tuple(QLinearOpsRegistry)
    return _STATIC_OPS


def describe_prepared(model: onnx.ModelProto, config: QuantConfig, fmt: str) -> TuningSpace:
    """The quantizable ops of ``model`` in graph order and the settings tunable per op type.

    A node counts when its type is one ORT quantizes in this mode and it reads at least one float
    tensor (integer-only nodes, e.g. shape arithmetic, have nothing to quantize).
    """
    quantizable = set(op_types_for(config.approach, fmt))
    floats = _float_names(model)
    ops = tuple(
        Op(name=node.name, op_type=node.op_type)
        for node in model.graph.node
        if node.op_type in quantizable and not node.domain and any(i in floats for i in node.input if i)
    )
    options: dict[str, dict[str, tuple[str, ...]]] = {}
    for op_type in dict.fromkeys(op.op_type for op in ops):
        options[op_type] = _options(op_type, config.approach, fmt)
    return TuningSpace(ops, {k: v for k, v in options.items() if v})


def _options(op_type: str, approach: str, fmt: str) -> dict[str, tuple[str, ...]]:
    if approach == "dynamic":
        # Activation parameters are computed at run time (uint8, asymmetric); only fallback is tunable.
        return {}
    settings: dict[str, tuple[str, ...]] = {"calibration": _CALIBRATIONS, "scheme": ("asym", "sym")}
    if fmt == "qdq":
        # Per-tensor type and per-weight granularity are expressed as QDQ tensor overrides, which the
        # QOperator quantizer does not read; there they are global settings only.
        settings["activation_dtype"] = ("uint8", "int8")
        if op_type in WEIGHTED_OPS:
            settings["granularity"] = ("per_channel", "per_tensor")
    return settings


def weight_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of a node's weight (input 1), as per-channel quantization needs it."""
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return -1
    return 0


def _float_names(model: onnx.ModelProto) -> set[str]:
    names = {
        v.name
        for v in (*model.graph.input, *model.graph.value_info, *model.graph.output)
        if v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    }
    names.update(
        i.name for i in model.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    )
    return names
