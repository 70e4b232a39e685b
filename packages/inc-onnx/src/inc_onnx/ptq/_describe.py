"""Which nodes of a prepared graph each quantization mode can quantize, and what may be tuned per op type."""

from __future__ import annotations

import onnx
from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry, QLinearOpsRegistry

from inc_core import QuantConfig
from inc_core.backend import Op, TuningSpace
from inc_core.errors import UnsupportedModelError
from inc_onnx.ptq._conv_transpose import layer_type
from inc_onnx.ptq._masks import analyse_masks

__all__ = ["FORMATS", "PASS_THROUGH", "WEIGHTED_OPS", "describe_prepared", "nothing_to_quantize", "op_types_for", "weight_axis"]

FORMATS = ("qdq", "qoperator")
# Op types whose second input is a weight that can be quantized per output channel.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_CALIBRATIONS = ("minmax", "kl", "percentile", "mse")
# Op types that move or select 8-bit values without computing new ones (exact in INT8; see describe).
PASS_THROUGH = frozenset({
    "ArgMax", "Flatten", "MaxPool", "Reshape", "Slice", "Split", "Squeeze", "TopK", "Transpose", "Unsqueeze",
})
# Per-channel affine normalizations that ORT's QDQ quantizer would wrap but no CPU kernel runs in INT8: QDQ only rounds
# their input and their per-channel scale and shift to 8 bits with one scale each, then runs them in float. A
# BatchNormalization left standalone (not folded into a Conv) is typically the first layer of a tabular model,
# standardising raw features whose scales differ by orders of magnitude: QDQ took breast-cancer's MLP from accuracy
# 0.953 to 0.784. Their outputs are quantized for the ops that read them, as for any float op.
FLOAT_NORMALIZATIONS = frozenset({"BatchNormalization", "InstanceNormalization"})
_STATIC_OPS = tuple(sorted((set(QLinearOpsRegistry) | set(QDQRegistry)) - FLOAT_NORMALIZATIONS))


def op_types_for(approach: str, fmt: str) -> tuple[str, ...]:
    """The op types ORT's quantizer handles in this mode (the same defaults quantize_static uses)."""
    if approach == "dynamic":
        # ORT's dynamic quantizer rewrites Gemm as MatMul + Add, then quantizes the MatMul.
        return (*IntegerOpsRegistry, "Gemm")  # what ORT is told; describe lists the nodes it really rewrites
    if fmt == "qoperator":
        return tuple(QLinearOpsRegistry)
    return _STATIC_OPS


def describe_prepared(model: onnx.ModelProto, config: QuantConfig, fmt: str, *, exact_ops: bool = False) -> TuningSpace:
    """The quantizable ops of ``model`` in graph order and the settings tunable per op type.

    A node counts when its type is one ORT quantizes in this mode and it reads at least one float
    tensor (integer-only nodes, e.g. shape arithmetic, have nothing to quantize). Ops that only move
    values (Reshape, Transpose, MaxPool, ...) or clamp them (Relu, Clip) are not listed: they run on
    whatever type their neighbours give them, and ORT folds a clamp into the QuantizeLinear after it,
    so they are exact in INT8 and excluding them would change nothing. ``exact_ops=True`` lists them
    too (static modes), as the quantizer needs them. In dynamic mode exactly the nodes ORT's dynamic
    quantizer rewrites are listed. Static modes never list the nodes that build or apply attention
    masks (see :mod:`inc_onnx.ptq._masks`): they stay in float.
    """
    quantizable = set(op_types_for(config.approach, fmt))
    floats = _float_names(model)
    if config.approach == "dynamic":
        ops = _dynamic_ops(model, floats)
    else:
        constants = {init.name for init in model.graph.initializer}
        float_only = analyse_masks(model).float_only
        ops = tuple(
            Op(name=node.name, op_type=layer_type(node))
            for node in model.graph.node
            if node.op_type in quantizable
            and not node.domain
            and node.name not in float_only
            and any(i in floats for i in node.input if i)
            and (exact_ops or not _is_exact_in_int8(node, constants))
        )
    options: dict[str, dict[str, tuple[str, ...]]] = {}
    for op_type in dict.fromkeys(op.op_type for op in ops):
        options[op_type] = _options(op_type, config.approach, fmt)
    return TuningSpace(ops, {k: v for k, v in options.items() if v})


def _is_exact_in_int8(node: onnx.NodeProto, constants: set[str]) -> bool:
    """True for an op that only moves, selects or clamps values: in INT8 it is exact.

    ORT runs such an op on 8-bit data whenever the ops around it are quantized (its QDQ propagation
    moves a QuantizeLinear across a Reshape, and fuses a Relu into the QuantizeLinear after it, even
    where inc left them in float), and excluding it changes no number, so it is neither listed nor
    excludable. A Gather of a constant table is different: the table itself is quantized.
    """
    if node.op_type in ("Gather", "GatherElements"):
        return not node.input or node.input[0] not in constants
    return node.op_type in PASS_THROUGH or node.op_type in ("Relu", "Clip")


def _dynamic_ops(model: onnx.ModelProto, floats: set[str]) -> tuple[Op, ...]:
    """The nodes ORT's dynamic quantizer really rewrites (with ``MatMulConstBOnly``, as inc runs it).

    A MatMul/Gemm/Conv counts only with a constant weight and a float activation: an activation x
    activation product (attention scores) stays in float. A Gather counts when it reads a constant
    table (an embedding). The Transpose and Attention-style ops ORT also lists quantize only next to
    these, so they are not listed on their own.
    """
    constants = {init.name for init in model.graph.initializer}
    float_constants = constants & floats
    ops = []
    for node in model.graph.node:
        if node.domain or len(node.input) < 2:
            continue
        data, weight = node.input[0], node.input[1]
        if node.op_type in ("MatMul", "Gemm", "Conv"):
            keep = weight in float_constants and data in floats and data not in constants
            if node.op_type == "Gemm":
                # ORT turns a Gemm into MatMul + Add (then quantizes the MatMul) only in its plain form.
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                keep = keep and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        elif node.op_type == "Gather":
            keep = data in float_constants
        elif node.op_type == "LSTM":
            keep = weight in float_constants and len(node.input) > 2 and node.input[2] in float_constants
        else:
            keep = False
        if keep:
            ops.append(Op(name=node.name, op_type=layer_type(node)))
    return tuple(ops)


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


def nothing_to_quantize(model: onnx.ModelProto, approach: str, fmt: str) -> UnsupportedModelError:
    """The error for a model with no op that ORT quantizes in this mode: what was looked for, what is there."""
    looked_for = sorted(op_types_for(approach, fmt))
    present = list(dict.fromkeys(f"{n.op_type} ({n.domain})" if n.domain else n.op_type for n in model.graph.node))
    mode = "dynamic" if approach == "dynamic" else f"static {fmt}"
    trees = [t for t in present if "TreeEnsemble" in t]
    ml_ops = [t for t in present if "ai.onnx.ml" in t and t not in trees]
    why = ""
    if trees:
        why = (
            f" Tree ensembles ({', '.join(trees)}) compare features against thresholds; they have no matrix "
            "product or convolution for an INT8 kernel, and ONNX Runtime has none for them."
        )
    elif ml_ops:
        why = (
            f" {', '.join(ml_ops)} are ai.onnx.ml operators, which ONNX Runtime runs in float only and its "
            "quantizers do not rewrite."
        )
    if approach == "dynamic":
        # ORT is told more op types, but rewrites only these on their own (see _dynamic_ops).
        wanted = "MatMul/Gemm/Conv with a constant weight, Gather of a constant table, LSTM"
        way_out = " approach='static' (with calibration data) covers more op types."
    else:
        wanted = ", ".join(looked_for)
        way_out = ""
    return UnsupportedModelError(
        f"Nothing to quantize: the model has no op that inc quantizes in {mode} mode. Looked for "
        f"{wanted}; the model holds {', '.join(present)}.{why}{way_out} Keep the model in FP32, "
        "or, for a scikit-learn model, convert one built on matrix products (e.g. MLPClassifier) to quantize it."
    )
