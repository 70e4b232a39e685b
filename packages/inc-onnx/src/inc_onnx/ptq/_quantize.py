"""Build the INT8 graph with ONNX Runtime's quantizers, fed with ranges from inc's observers.

ORT's ``QDQQuantizer`` (QDQ format), ``ONNXQuantizer`` in QLinearOps mode (QOperator format) and in
IntegerOps mode (dynamic) do the graph rewriting. What they are given is ours: the activation ranges
(from :class:`~inc_onnx.ptq._collect.OnnxCalibration`, per tensor, with the calibration method, scheme
and dtype chosen per op), the nodes kept in FP32 and per-tensor overrides for mixed settings.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
from onnxruntime.quantization.quant_utils import QuantizationMode, QuantType, update_opset_version

from inc_core import QuantConfig
from inc_core.backend import Op, TuningSpace
from inc_core.calibration import QParams, compute_qparams
from inc_core.errors import CalibrationError, ConfigError, IncError, UnsupportedModelError
from inc_onnx._preprocess import Prepared, same_model
from inc_onnx.ptq._collect import OnnxCalibration
from inc_onnx.ptq._conv_transpose import restore_conv_transpose
from inc_onnx.ptq._describe import WEIGHTED_OPS, describe_prepared, nothing_to_quantize, op_types_for, weight_axis
from inc_onnx.ptq._masks import analyse_masks
from inc_onnx.ptq._qdq_readers import drop_unread_qdq, folded_activations
from inc_onnx.ptq._softmax_scale import calibrate_softmax_outputs
from inc_onnx.ptq._verify import failed_quantizer_node

__all__ = ["METADATA_KEY", "check_selection", "quantize_prepared"]

log = logging.getLogger("inc")

METADATA_KEY = "inc.quant_config"
_QTYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
# ONNX Runtime's quantizer floors activation scales at float32 ``tiny``, not at torch.ao's epsilon: a tensor whose
# whole range is ~1e-6 (an untrained Keras EfficientNet's squeeze-excite outputs, exported by tf2onnx) keeps its
# 255 steps instead of ~17, and the INT8 model follows ORT's own flow (output cosine 0.926 -> 0.937, ORT 0.937).
ORT_MIN_SCALE = float(np.finfo(np.float32).tiny)


def check_selection(config: QuantConfig, space: TuningSpace, fmt: str) -> set[str]:
    """The names ``exclude=`` keeps in FP32, once ``config``'s op selection is known to leave something to quantize.

    Raises:
        ConfigError: an exclude/override names no op, an override is not supported in this mode, or exclude=
            leaves nothing to quantize.
    """
    excluded = set(config.exclude.select(space.ops))
    if len(excluded) == len(space.ops):
        raise ConfigError(
            f"QuantConfig: exclude= keeps every one of the {len(space.ops)} quantizable ops in FP32, so nothing "
            "would be quantized. Exclude fewer ops (inc.describe(model) lists them), or keep the FP32 model."
        )
    _check_overrides(config, space, fmt)
    return excluded


def quantize_prepared(
    prepared: Prepared,
    config: QuantConfig,
    fmt: str,
    calibration: OnnxCalibration | None,
    *,
    keep_every_qdq_pair: bool = False,
) -> onnx.ModelProto:
    """The INT8 model for ``config`` (a new ModelProto; ``prepared`` is not touched).

    ``keep_every_qdq_pair``: static QDQ as ORT's quantizer writes it, a pair on every tensor a quantized op
    reads or writes, i.e. the QOperator model's quantization points (op errors of a QOperator config are
    measured on it); by default pairs no INT8 kernel reads are removed (:mod:`inc_onnx.ptq._qdq_readers`).

    Raises:
        ConfigError: an exclude/override names no op, an override is not supported in this mode, or
            exclude= leaves nothing to quantize.
        CalibrationError: static quantization without statistics, or statistics of another model.
        UnsupportedModelError: the model has no op quantizable in this mode, or ORT's quantizer failed
            on an op (named in the message).
    """
    space = describe_prepared(prepared.model, config, fmt)
    if not space.ops:
        raise nothing_to_quantize(prepared.model, config.approach, fmt)
    excluded = check_selection(config, space, fmt)
    model = prepared.copy()
    # A ConvTranspose kept in float runs as the user's op, not as its sub-pixel form (see ptq._conv_transpose).
    restore_conv_transpose(model, excluded)
    op_types = list(op_types_for(config.approach, fmt))
    mode = "dynamic" if config.approach == "dynamic" else f"static {fmt}"
    try:
        with _ort_root_logging_to_debug():
            quantizer = _quantizer(model, config, fmt, calibration, prepared, space, excluded, op_types)
            quantizer.quantize_model()
            # ORT's quantizers append new nodes out of order; ONNX requires topological order.
            quantizer.model.topological_sort()
    except IncError:
        raise
    except Exception as exc:  # ORT's quantizers raise builtins (ValueError, KeyError, AssertionError, ...)
        quantized = {op.name for op in space.ops} - set(excluded)
        raise _quantizer_failed(exc, mode, config, model=prepared.model, quantized=quantized) from exc
    result: onnx.ModelProto = quantizer.model.model
    if config.approach == "static" and fmt == "qdq" and not keep_every_qdq_pair:
        folded = folded_activations(prepared.model, result)
        removed = drop_unread_qdq(result, float_nodes=frozenset(excluded), folded=folded)
        log.debug("QDQ: %d QuantizeLinear/DequantizeLinear nodes had no INT8 reader and were removed", removed)
    if config.approach == "static" and fmt == "qoperator" and calibration is not None:
        # ORT fixes every QLinearSoftmax output at scale 1/256; calibration knows the real range.
        calibrate_softmax_outputs(result, config, calibration)
    _name_like_qoperator(result, [op.name for op in space.ops if op.op_type == "Gemm"])
    _keep_users_shapes(result, prepared.value_info)
    _stamp(result, config, fmt)
    return result


class _FromOrtQuantizer(logging.Filter):
    """Moves what ORT's quantizers log on the root logger to inc's logger at DEBUG.

    ORT warns on the root logger about every integer tensor its quantizer considers and skips (shape
    arithmetic next to a Reshape), several lines each with a dumped type proto; that is not the user's
    concern, and inc reports what was quantized from the output graph.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if "onnxruntime" in record.pathname and "quantization" in record.pathname and record.levelno < logging.ERROR:
            log.debug("onnxruntime quantizer: %s", record.getMessage().split("\n")[0])
            return False
        return True


@contextlib.contextmanager
def _ort_root_logging_to_debug() -> Iterator[None]:
    root = logging.getLogger()
    quiet = _FromOrtQuantizer()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def _quantizer(
    model: onnx.ModelProto,
    config: QuantConfig,
    fmt: str,
    calibration: OnnxCalibration | None,
    prepared: Prepared,
    space: TuningSpace,
    excluded: set[str],
    op_types: list[str],
) -> Any:
    if config.approach == "dynamic":
        selected = [op for op in space.ops if op.name not in excluded]
        return _dynamic_quantizer(model, config, excluded, op_types, selected)
    if calibration is None:
        raise CalibrationError(
            "Static quantization needs calibration statistics; pass dataset= to inc.quantize/inc.autotune "
            "(or use QuantConfig(approach='dynamic'))."
        )
    if calibration.digest != prepared.digest and same_model(calibration.digest, prepared.digest):
        raise CalibrationError(
            "The calibration statistics were collected on another form of this model: OnnxBackend(runtime='openvino') "
            "keeps each ConvTranspose as it is, the other runtimes quantize it as its sub-pixel Conv. Calibrate with "
            "the backend that quantizes (backend.calibrate(model, ...)) and pass that result."
        )
    if calibration.digest != prepared.digest:
        raise CalibrationError(
            "The calibration statistics were collected on a different model than the one being quantized; "
            "calibrate this model (backend.calibrate(model, ...)) and pass that result."
        )
    # Every node ORT's quantizer touches, including the exact ones describe leaves out (whose tensors
    # still need ranges, and whose Relu/Clip folding decides a producer's parameters).
    every = describe_prepared(model, config, fmt, exact_ops=True).ops
    quantized = [op for op in every if op.name not in excluded]
    # Mask arithmetic is never listed by describe, but ORT is told op types, not nodes: name it here.
    kept_float = sorted(excluded | _mask_nodes(prepared.model, {op.name for op in every} - {op.name for op in space.ops}))
    ranges, tensor_overrides = _static_ranges(model, config, fmt, calibration, quantized)
    activation = _QTYPES[config.activation_dtype]
    extra: dict[str, Any] = {"TensorQuantOverrides": tensor_overrides}
    if _any_symmetric(config):
        # ORT folds Relu/Clip into their producer only for asymmetric activations, whose zero point at
        # the range's low end does the clamping; a symmetric tensor keeps its Relu.
        extra["ActivationSymmetric"] = True
    if _has_matrix_bias(model):
        # ORT's int32-bias scale check indexes a bias per output channel and fails on a 2-D one
        # (preparation flattens [1, N] biases; a full [M, N] one is left as it is).
        extra["QDQDisableWeightAdjustForInt32Bias"] = True
    model = update_opset_version(model, QuantType.QInt8, activation, tensor_quant_overrides=extra.get("TensorQuantOverrides"))
    tensors_range = TensorsData(CalibrationMethod.MinMax, ranges)
    per_channel = config.granularity == "per_channel"
    if fmt == "qdq":
        return QDQQuantizer(
            model, per_channel, False, QuantType.QInt8, activation, tensors_range, [], kept_float, op_types, extra
        )
    return ONNXQuantizer(
        model, per_channel, False, QuantizationMode.QLinearOps, True, QuantType.QInt8, activation,
        tensors_range, [], kept_float, op_types, extra,
    )


def _mask_nodes(model: onnx.ModelProto, exact: set[str]) -> set[str]:
    """The mask nodes, and the data-movement nodes whose outputs only mask nodes read (T5's position bias
    Unsqueeze): quantized, their 8-bit output would have no INT8 reader (ORT's QOperator quantizer then
    leaves the float tensor undefined)."""
    float_only = set(analyse_masks(model).float_only)
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)
    outputs = {o.name for o in model.graph.output}
    for node in reversed(model.graph.node):
        if node.name in exact and node.name not in float_only:
            consumers = [r for out in node.output for r in readers.get(out, [])]
            if consumers and all(r in float_only for r in consumers) and not outputs.intersection(node.output):
                float_only.add(node.name)
    return float_only


def _has_matrix_bias(model: onnx.ModelProto) -> bool:
    dims = {init.name: len(init.dims) for init in model.graph.initializer}
    return any(
        node.op_type == "Gemm" and len(node.input) > 2 and dims.get(node.input[2], 1) > 1 for node in model.graph.node
    )


# ORT's QDQ quantizer checks every tensor's parameters after its loop over the nodes, so the node its frames
# hold then is the graph's last quantized one, not the one reading the tensor; the tensor it names tells.
_MISSING_PARAMS = re.compile(r"Quantization parameters are not specified for param (\S+?)\.? In static mode")
# ORT's QOperator quantizer checks, after rewriting the whole graph, that every tensor read is produced; one that is
# not was the float output of a node it replaced, still read where it did not look (a subgraph): its producer tells.
_UNKNOWN_TENSORS = re.compile(r"unknown initializers/tensors\.?(.*)", re.S)


def _quantizer_failed(
    exc: Exception, mode: str, config: QuantConfig, *, model: onnx.ModelProto, quantized: set[str]
) -> UnsupportedModelError:
    """Name the op ORT's quantizer failed on, what it said, and the ways around it."""
    node = failed_quantizer_node(exc)
    missing = _MISSING_PARAMS.search(str(exc))
    unknown = _UNKNOWN_TENSORS.search(str(exc))
    if missing:
        tensor = missing.group(1)
        node = next(
            (n for n in model.graph.node if n.name in quantized and tensor in (*n.input, *n.output)), node
        )
    elif unknown:
        producers = {out: n for n in model.graph.node for out in n.output}
        dangling = [name for name in re.findall(r"'([^']+)'", unknown.group(1)) if name in producers]
        node = producers[dangling[0]] if dangling else node
    text = (str(exc).strip() or type(exc).__name__).splitlines()[0][:300]
    if node is not None:
        name = node.name.removesuffix("_MatMul") if config.approach == "dynamic" else node.name
        where = f"on op {name!r} ({node.op_type})"
        fix = f"keep it in FP32 with exclude=inc.LayerFilter(names=({name!r},))"
    else:
        where = "on an op it did not name"
        fix = "find the op with inc.describe(model) and keep it in FP32 with exclude="
    others = [
        alt for alt in (
            "granularity='per_tensor'" if config.granularity == "per_channel" else "",
            "format='qdq'" if mode == "static qoperator" else "format='qoperator'" if mode == "static qdq" else "",
            "approach='dynamic'" if config.approach == "static" else "approach='static'",
        ) if alt
    ]
    return UnsupportedModelError(
        f"ONNX Runtime {ort.__version__}'s {mode} quantizer failed {where}: {type(exc).__name__}: {text}. "
        f"To quantize the rest, {fix}, or try {', '.join(others)}."
    )


def _name_like_qoperator(model: onnx.ModelProto, gemms: list[str]) -> None:
    """Name every node, and a dynamic Gemm's integer kernel ``<gemm>_quant`` as QOperator names its QGemm.

    The dynamic quantizer splits a Gemm into ``<gemm>_MatMul`` + ``<gemm>_Add`` and names the kernel
    ``<gemm>_MatMul_quant``; it also adds a few nodes without a name. Names let users (and ORT's error
    messages) point at an op.
    """
    names = {node.name for node in model.graph.node if node.name}
    for gemm in gemms:
        for node in model.graph.node:
            if node.name == f"{gemm}_MatMul_quant" and f"{gemm}_quant" not in names:
                node.name = f"{gemm}_quant"
                names.add(node.name)
    for index, node in enumerate(model.graph.node):
        if not node.name:
            base, k = f"{node.op_type}_{index}", 1
            name = base
            while name in names:
                name, k = f"{base}_{k}", k + 1
            node.name = name
            names.add(name)


def _keep_users_shapes(model: onnx.ModelProto, users: tuple[onnx.ValueInfoProto, ...]) -> None:
    """Carry the shape annotations the user's model came with, not those preparation inferred.

    Preparation annotates every tensor with inferred shapes, which the quantizers need. Left in the
    INT8 model, they change how ONNX Runtime optimizes it at load time compared with the user's model:
    with both inputs of a residual Add known to match, ORT fuses Add + LayerNormalization into
    com.microsoft SkipLayerNormalization, whose float CPU kernel is scalar and several times slower
    than the two ops it replaces (about 9% of a MiniLM encoder's run time at batch 1). ORT infers the
    shapes its kernels need itself when it loads the model.
    """
    used = {name for node in model.graph.node for name in (*node.input, *node.output)}
    del model.graph.value_info[:]
    model.graph.value_info.extend(v for v in users if v.name in used)


def _any_symmetric(config: QuantConfig) -> bool:
    return config.scheme == "sym" or any(s.get("scheme") == "sym" for s in config.overrides.values())


def _dynamic_quantizer(
    model: onnx.ModelProto, config: QuantConfig, excluded: set[str], op_types: list[str], selected: list[Op]
) -> Any:
    if config.activation_dtype != "uint8" or config.scheme != "asym":
        raise ConfigError(
            "QuantConfig: approach='dynamic' in ONNX Runtime computes activation parameters at run time as uint8 "
            f"asymmetric; got activation_dtype={config.activation_dtype!r}, scheme={config.scheme!r}. Use the "
            "defaults (activation_dtype='uint8', scheme='asym') or approach='static'."
        )
    model = update_opset_version(model, QuantType.QInt8)
    # A Gemm reaches the quantizer as "<name>_MatMul" + "<name>_Add"; keep the MatMul of an excluded one in float.
    excluded = excluded | {f"{name}_MatMul" for name in excluded}
    # Exactly the nodes describe lists (ORT would otherwise also try nodes it then leaves in float).
    chosen = [op.name for op in selected] + [f"{op.name}_MatMul" for op in selected if op.op_type == "Gemm"]
    # Only MatMuls with a constant weight: activation x activation products (attention scores) stay
    # in float, as quantize_dynamic does by default.
    extra = {"MatMulConstBOnly": True}
    return ONNXQuantizer(
        model, config.granularity == "per_channel", False, QuantizationMode.IntegerOps, False, QuantType.QInt8,
        QuantType.QUInt8, None, chosen, sorted(excluded), op_types, extra,
    )


def _check_overrides(config: QuantConfig, space: TuningSpace, fmt: str) -> None:
    by_name = {op.name: op.op_type for op in space.ops}
    types = set(by_name.values())
    for key, settings in config.overrides.items():
        op_type = by_name.get(key, key if key in types else None)
        if op_type is None:
            close = difflib.get_close_matches(key, [*by_name, *types], n=3)
            raise ConfigError(
                f"QuantConfig: overrides key {key!r} is neither an op name nor an op type of the model "
                f"(close: {close or 'none'}). Op types: {sorted(types)}; names come from inc.describe(model)."
            )
        allowed = space.options.get(op_type, {})
        for setting, choice in settings.items():
            if setting == "calibration" and config.approach == "dynamic":
                continue  # nothing is calibrated in dynamic mode; the setting is harmless
            if choice not in allowed.get(setting, ()):
                how = (
                    "dynamic quantization tunes only which ops fall back (exclude=)"
                    if config.approach == "dynamic"
                    else f"per-op {setting} needs format='qdq'"
                    if fmt == "qoperator"
                    else f"{op_type} supports {dict(allowed)}"
                )
                raise ConfigError(
                    f"QuantConfig: overrides[{key!r}] sets {setting}={choice!r}, which the onnx backend cannot apply "
                    f"to a {op_type} op in {config.approach} {fmt} mode; {how}."
                )


def _static_ranges(
    model: onnx.ModelProto, config: QuantConfig, fmt: str, calibration: OnnxCalibration, quantized: list[Op]
) -> tuple[dict[str, TensorData], dict[str, list[dict[str, Any]]]]:
    """Per observed tensor: its range, and its scale/zero point as ORT tensor overrides.

    The scale and zero point come from :func:`inc_core.calibration.compute_qparams`, the one definition
    of that math, so ORT only places them in the graph. ORT ties the output of data-movement ops
    (MaxPool, Reshape, Flatten, Transpose, ...) to their input's parameters, so an op's settings reach
    its input only where the producer is not such an op.
    """
    quantized_names = {op.name for op in quantized}
    nodes = {node.name: node for node in model.graph.node}
    # A tensor's settings come from the first quantized node that reads it (that node's input
    # quantization is what the setting is about), else from the quantized node that writes it.
    deciding: dict[str, onnx.NodeProto] = {}
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
        if node.name in quantized_names:
            for name in node.input:
                deciding.setdefault(name, node)
    for node in model.graph.node:
        if node.name in quantized_names:
            for name in node.output:
                deciding.setdefault(name, node)
    params: dict[str, tuple[float, float, QParams]] = {}
    schemes: dict[str, str] = {}
    for tensor in calibration.observers:
        node = deciding.get(tensor)
        name, op_type = (node.name, node.op_type) if node is not None else ("", "")
        dtype = config.setting(name, op_type, "activation_dtype")
        scheme = config.setting(name, op_type, "scheme")
        method = config.setting(name, op_type, "calibration")
        low, high = calibration.range(tensor, method, percentile=config.percentile, dtype=dtype, scheme=scheme)
        params[tensor] = (low, high, compute_qparams(low, high, dtype=dtype, scheme=scheme, min_scale=ORT_MIN_SCALE))
        schemes[tensor] = scheme
    _hold_pad_values(model, quantized_names, params, schemes)
    # A Relu/Clip that ORT folds into its producer leaves the producer writing the activation's output
    # directly, so the input must carry the output's parameters (what ORT's own range adjustment does).
    for node in model.graph.node:
        if (
            node.name in quantized_names
            and node.op_type in ("Relu", "Clip")
            and consumers.get(node.input[0]) == 1
            and node.input[0] in params
            and node.output[0] in params
        ):
            params[node.input[0]] = params[node.output[0]]
    ranges: dict[str, TensorData] = {}
    overrides: dict[str, list[dict[str, Any]]] = {}
    for tensor, (low, high, qp) in params.items():
        ranges[tensor] = TensorData(lowest=np.float32(min(low, 0.0)), highest=np.float32(max(high, 0.0)))
        overrides[tensor] = [
            {
                "quant_type": _QTYPES[qp.dtype],
                "scale": np.asarray(qp.scale, dtype=np.float32),
                "zero_point": np.asarray(qp.zero_point, dtype=qp.np_dtype),
            }
        ]
    if fmt == "qdq":
        overrides.update(_weight_overrides(model, config, quantized, nodes))
    return ranges, overrides


def _hold_pad_values(
    model: onnx.ModelProto, quantized: set[str], params: dict[str, tuple[float, float, QParams]], schemes: dict[str, str]
) -> None:
    """Widen the range of each quantized constant-mode Pad's input and output to hold the value it pads with.

    An INT8 Pad writes its constant in the tensor's scale, and ORT's QOperator quantizer clamps it to that range:
    a Pad of 40.0 after a layer whose outputs end near 3 padded with 3 (output cosine 0.848). Models pad with
    values outside their activations' range on purpose (timm's EfficientViT pads ReLU attention values with ones
    to compute a normaliser).
    """
    initializers = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.name not in quantized or node.op_type != "Pad" or len(node.input) < 3 or node.input[2] not in initializers:
            continue
        if next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant") != "constant":
            continue
        value = float(numpy_helper.to_array(initializers[node.input[2]]).reshape(-1)[0])
        for tensor in (node.input[0], node.output[0]):
            if tensor not in params:
                continue
            low, high, qp = params[tensor]
            if low <= value <= high:
                continue
            low, high = min(low, value), max(high, value)
            params[tensor] = (
                low, high, compute_qparams(low, high, dtype=qp.dtype, scheme=schemes[tensor], min_scale=ORT_MIN_SCALE)
            )


def _weight_overrides(
    model: onnx.ModelProto, config: QuantConfig, quantized: list[Op], nodes: Mapping[str, onnx.NodeProto]
) -> dict[str, list[dict[str, Any]]]:
    """Per-weight granularity where an op's setting differs from the global one."""
    initializers = {init.name: init for init in model.graph.initializer}
    out: dict[str, list[dict[str, Any]]] = {}
    for op in quantized:
        if op.op_type not in WEIGHTED_OPS:
            continue
        granularity = config.setting(op.name, op.op_type, "granularity")
        node = nodes[op.name]
        if granularity == config.granularity or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        weight = node.input[1]
        if granularity == "per_tensor":
            out.setdefault(weight, [{"quant_type": QuantType.QInt8, "symmetric": True}])
        else:
            axis = weight_axis(node) % max(len(initializers[weight].dims), 1)
            out.setdefault(weight, [{"quant_type": QuantType.QInt8, "symmetric": True, "axis": axis}])
    return out


def _stamp(model: onnx.ModelProto, config: QuantConfig, fmt: str) -> None:
    """Record the recipe in the model's metadata, so a saved INT8 model says how it was made."""
    record = dict(config.to_dict())
    record["format"] = fmt if config.approach == "static" else "dynamic"
    for prop in list(model.metadata_props):
        if prop.key == METADATA_KEY:
            model.metadata_props.remove(prop)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(record, sort_keys=True))
