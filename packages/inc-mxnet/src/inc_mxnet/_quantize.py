"""Build the INT8 SymbolBlock with MXNet's quantization pass, fed with ranges from inc's observers.

MXNet does the graph work: ``quantize_graph`` rewrites the fused FP32 graph (quantize_v2 nodes,
quantized oneDNN conv/fc/pooling ..., int8 weights), ``calib_graph`` writes the thresholds into it,
and a second pass of the oneDNN subgraph backend folds requantize/dequantize into the fused INT8
kernels, exactly as ``quantize_net_v2`` does. What it is given is ours: the per-tensor ranges (from
:class:`~inc_mxnet._collect.MxnetCalibration`, with the method chosen per layer), the layers kept in
FP32, the activation type and the weight granularity.

oneDNN's INT8 activations have no zero point, so the settings map to MXNet's ``quantized_dtype``:
``activation_dtype="int8"`` is ``"int8"``; ``"uint8"`` with ``scheme="asym"`` (the default) is
``"auto"``, uint8 for every tensor calibrated non-negative (after ReLU) and int8 for signed ones,
the nearest MXNet has to an asymmetric range; ``"uint8"`` with ``scheme="sym"`` is plain
``"uint8"``, for graphs whose quantized inputs are all non-negative (negatives are clipped).
``granularity`` is MXNet's ``quantize_granularity``, which reaches the fully connected layers: the
fused INT8 convolution scales its (batch-norm folded) weights per output channel whenever its output
range is calibrated, and per tensor otherwise.
"""

from __future__ import annotations

import logging
from typing import Any

import mxnet as mx
from mxnet.contrib import quantization as mxq

from inc_core import QuantConfig
from inc_core.backend import Op, TuningSpace
from inc_core.errors import CalibrationError, ConfigError, IncError, UnsupportedModelError
from inc_mxnet._blocks import symbol_block
from inc_mxnet._collect import MxnetCalibration
from inc_mxnet._graph import FUSION_BACKEND, Prepared

__all__ = ["CALIBRATIONS", "describe_prepared", "mxnet_dtype", "quantize_prepared"]

log = logging.getLogger("inc")

CALIBRATIONS = ("minmax", "kl", "percentile", "mse")


def describe_prepared(prepared: Prepared) -> TuningSpace:
    """The quantizable layers in graph order; the calibration method is the one per-layer setting.

    The activation type, scheme and weight granularity are one setting for the whole graph in
    MXNet's pass, so they are not offered per op type.
    """
    ops = tuple(Op(name=layer.name, op_type=layer.op_type) for layer in prepared.layers)
    options = {op_type: {"calibration": CALIBRATIONS} for op_type in dict.fromkeys(op.op_type for op in ops)}
    return TuningSpace(ops, options)


def mxnet_dtype(config: QuantConfig) -> str:
    """MXNet's ``quantized_dtype`` for the config (see the module docstring)."""
    if config.activation_dtype == "int8":
        return "int8"
    return "auto" if config.scheme == "asym" else "uint8"


def _check_overrides(config: QuantConfig, space: TuningSpace) -> None:
    names, types = set(space.names), set(space.op_types)
    for key, settings in config.overrides.items():
        if key not in names and key not in types:
            raise ConfigError(
                f"QuantConfig: overrides[{key!r}] names no layer or layer type of the block; the layers are "
                f"{list(space.names)[:10]} and the types {sorted(types)} (see inc.describe(model))."
            )
        other = sorted(set(settings) - {"calibration"})
        if other:
            raise ConfigError(
                f"QuantConfig: overrides[{key!r}] sets {other}; MXNet's quantization pass applies activation_dtype, "
                "scheme and granularity to the whole graph, so only 'calibration' can differ per layer. Set them "
                "on the QuantConfig itself, or use exclude= to keep a layer in FP32."
            )


def _thresholds(
    prepared: Prepared, config: QuantConfig, calibration: MxnetCalibration, tensors: list[str], dtype: str
) -> dict[str, tuple[float, float]]:
    """Per-tensor (min, max) thresholds for the tensors MXNet's pass asks to calibrate."""
    owners = {layer.output: layer for layer in prepared.layers}
    out: dict[str, tuple[float, float]] = {}
    for tensor in tensors:
        if tensor not in calibration.observers:
            raise CalibrationError(
                f"MXNet's quantization pass needs a range for {tensor!r}, which calibration did not observe; "
                "calibrate this block with the same inc-mxnet version (backend.calibrate) and pass that result."
            )
        owner = owners.get(tensor)
        method = config.setting(owner.name, owner.op_type, "calibration") if owner else config.calibration
        # oneDNN int8 is symmetric; uint8 (zero point 0) only ever holds a non-negative tensor.
        signed = calibration.is_signed(tensor) or dtype == "int8"
        qdtype, scheme = ("int8", "sym") if signed else ("uint8", "asym")
        lo, hi = calibration.range(tensor, method, percentile=float(config.percentile), dtype=qdtype, scheme=scheme)
        if hi <= lo:  # a constant tensor: give MXNet a non-empty range around it
            hi = lo + max(abs(lo), 1e-6)
        out[tensor] = (lo, hi)
    return out


def quantize_prepared(prepared: Prepared, config: QuantConfig, calibration: MxnetCalibration | None) -> Any:
    """The INT8 ``gluon.SymbolBlock`` for ``config`` (``prepared`` and the user's block are not touched).

    Raises:
        ConfigError: an exclude or override names no layer, or an override MXNet cannot apply per layer.
        CalibrationError: static quantization without statistics, or statistics of another block.
    """
    space = describe_prepared(prepared)
    excluded = set(config.exclude.select(space.ops))
    _check_overrides(config, space)
    dtype = mxnet_dtype(config)
    # Name the fused node and every op it runs: MXNet's pass matches either.
    excluded_names = sorted({n for layer in prepared.layers if layer.name in excluded for n in (layer.node, *layer.fused)})
    excluded_names += prepared.float_only
    static = config.approach == "static"
    granularity = "channel-wise" if config.granularity == "per_channel" else "tensor-wise"
    if not static and granularity == "channel-wise":
        # MXNet 1.9.1's oneDNN kernels crash on channel-wise weights without calibrated ranges
        # (calib_mode='none'); run-time ranges need tensor-wise weights.
        log.info("dynamic quantization: weights are quantized per tensor (MXNet has no per-channel dynamic kernels)")
        granularity = "tensor-wise"
    if static:
        if calibration is None:
            raise CalibrationError(
                "Static quantization needs calibration statistics; pass dataset= to inc.quantize/inc.autotune "
                "(or use QuantConfig(approach='dynamic'))."
            )
        if calibration.digest != prepared.digest:
            raise CalibrationError(
                "The calibration statistics were collected on a different block (or different parameters) than the "
                "one being quantized; calibrate this block (backend.calibrate(model, ...)) and pass that result."
            )
    try:
        block = _build(prepared, config, calibration if static else None, dtype, excluded_names, granularity)
    except IncError:
        raise
    except Exception as exc:  # MXNet's pass raises MXNetError (C++ checks) or builtins from its Python side
        text = (str(exc).strip() or type(exc).__name__).splitlines()[0][:300]
        raise UnsupportedModelError(
            f"MXNet's quantization pass failed on this block ({config.approach}, quantized_dtype={dtype!r}, "
            f"{granularity} weights): {text}. Keep the layer it names in FP32 with exclude=inc.LayerFilter(names=...) "
            "(layer names: inc.describe(model)), or try another activation_dtype/scheme or granularity."
        ) from exc
    if static and calibration.probe is not None:
        check_runs(block, prepared, calibration.probe, "the first calibration batch")
    log.info("quantized %d of %d layers (%s activations)", len(space.ops) - len(excluded), len(space.ops), dtype)
    return block


def check_runs(block: Any, prepared: Prepared, batch: Any, what: str) -> None:
    """Run the INT8 ``block`` once on ``batch``, as the user will, before it is returned.

    Raises:
        UnsupportedModelError: MXNet cannot build or run the quantized graph.
    """
    from inc_mxnet._blocks import to_ndarrays

    arrays = to_ndarrays(batch, prepared.inputs, where=what)
    try:
        outputs = block(*arrays)
        for output in outputs if isinstance(outputs, (list, tuple)) else [outputs]:
            output.wait_to_read()  # MXNet runs asynchronously: errors surface when a result is read
    except mx.base.MXNetError as exc:
        text = next((ln for ln in str(exc).splitlines() if ln.startswith("MXNetError")), str(exc).splitlines()[0])
        raise UnsupportedModelError(
            f"The INT8 block MXNet's pass built does not run on {what}: {text[:300]}. Keep the layer it names in "
            "FP32 with exclude=inc.LayerFilter(names=...) (layer names: inc.describe(model))."
        ) from exc


def _build(
    prepared: Prepared,
    config: QuantConfig,
    calibration: MxnetCalibration | None,
    dtype: str,
    excluded_names: list[str],
    granularity: str,
) -> Any:
    """MXNet's quantize_graph (+ calib_graph with our ranges) and the post-quantization fusion."""
    static = calibration is not None
    qsym, qargs, aux, collector = mxq.quantize_graph(
        sym=prepared.fused, arg_params=prepared.arg_params, aux_params=prepared.aux_params, ctx=mx.cpu(),
        excluded_sym_names=excluded_names, excluded_op_names=[],
        # 'naive' only makes MXNet return the list of tensors it wants ranges for; the ranges are ours.
        calib_mode="naive" if static else "none", quantized_dtype=dtype, quantize_mode="full",
        quantize_granularity=granularity,
    )
    if calibration is not None:
        collector.min_max_dict = _thresholds(prepared, config, calibration, list(collector.include_layer), dtype)
        qsym, qargs, aux = mxq.calib_graph(
            qsym=qsym, arg_params=prepared.arg_params, aux_params=prepared.aux_params, collector=collector,
            calib_mode="naive", quantized_dtype=dtype, logger=None,
        )
    # The post-quantization fusion: requantize/dequantize folded into the INT8 oneDNN kernels.
    qsym = qsym.get_backend_symbol(FUSION_BACKEND)
    return symbol_block(qsym, prepared.inputs, {**qargs, **aux}, aux=tuple(aux))
