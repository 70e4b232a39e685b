"""Checks every INT8 model passes before it is returned: ORT loads it, runs it, and it holds INT8 ops.

ORT's quantizers can write a model that ORT itself refuses (a tensor of the wrong type fed to a
QLinear op) or quietly leave every op in float. Either would otherwise reach the user as a
successful result; here each becomes an :class:`~inc_core.errors.IncError` naming the op.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from inc_core.errors import UnsupportedModelError
from inc_onnx._int8_ops import float_qdq_ops, int8_op_counts
from inc_onnx.runtime._session import session_options

__all__ = ["check_has_int8_ops", "check_runs", "failed_quantizer_node"]

_NODE_IN_MESSAGE = re.compile(r"[Nn]ode \(([^)]+)\)|[Nn]ode[: ]+'?([\w./:-]+)'?")


def check_runs(model: onnx.ModelProto, mode: str, sample: Mapping[str, np.ndarray] | None) -> None:
    """Load ``model`` the way users run it (inc's session options) and, given a batch, run it once.

    Raises:
        UnsupportedModelError: ORT rejects the model or fails running it, naming the node ORT names.
    """
    try:
        session = ort.InferenceSession(model.SerializeToString(), session_options(threads=1), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's pybind errors (InvalidGraph, Fail, ...) carry the reason in their text
        raise UnsupportedModelError(_message(model, mode, "does not load in", exc)) from exc
    if sample is None:
        return
    try:
        session.run(None, dict(sample))
    except Exception as exc:  # same as above
        raise UnsupportedModelError(_message(model, mode, "loads but fails to run a calibration batch in", exc)) from exc


def check_has_int8_ops(
    model: onnx.ModelProto, mode: str, selected: list[str], *, qdq_conv_transpose: bool = False
) -> dict[str, int]:
    """Per op type, the INT8 ops ORT runs in ``model``; at least one, or UnsupportedModelError.

    ``qdq_conv_transpose``: the model is made for OpenVINO, which runs a ConvTranspose between DequantizeLinear
    and QuantizeLinear in INT8 (ORT runs it in float): those count too.
    """
    counts = int8_op_counts(model)
    if not counts and qdq_conv_transpose:
        quantized = float_qdq_ops(model)
        if quantized:
            return {"ConvTranspose": len(quantized)}
    if not counts:
        shown = ", ".join(selected[:8]) + (f" and {len(selected) - 8} more" if len(selected) > 8 else "")
        if mode.startswith("dynamic"):
            way_out = (
                "In dynamic mode only MatMul/Gemm with a constant weight, Conv and Gather of a constant table are "
                "quantized; try approach='static' (with a calibration dataset) or format='qoperator'."
            )
        elif any(n.op_type == "ConvTranspose" for n in model.graph.node):
            way_out = (
                "ONNX Runtime's CPU provider has no INT8 ConvTranspose; inc runs one as its sub-pixel Conv unless it "
                "is dilated, its padding depends on the input size, or its weight is not a constant of its own (the "
                "'inc' log at INFO says which). OpenVINO runs them in INT8: "
                "inc.quantize(..., backend=OnnxBackend(runtime='openvino'))."
            )
        else:
            way_out = (
                "ORT leaves such ops in float when no INT8 kernel reads their output. Check which ops "
                "inc.describe(model, config) lists: a MatMul or Conv missing there is kept in float, e.g. as "
                "attention-mask arithmetic; approach='dynamic' quantizes every MatMul/Gemm with a constant weight."
            )
        raise UnsupportedModelError(
            f"{mode}: ONNX Runtime's quantizer left every selected op in float ({shown}); the output would hold no "
            f"INT8 op. {way_out}"
        )
    return counts


def failed_quantizer_node(exc: BaseException) -> onnx.NodeProto | None:
    """The node ORT's quantizer was working on when it raised (read from the traceback's frames)."""
    tb: Any = exc.__traceback__
    found = None
    while tb is not None:
        local = tb.tb_frame.f_locals
        candidate = local.get("node")
        if not isinstance(candidate, onnx.NodeProto):
            owner = local.get("self")
            candidate = getattr(owner, "node", None)
        if isinstance(candidate, onnx.NodeProto):
            found = candidate
        tb = tb.tb_next
    return found


def _message(model: onnx.ModelProto, mode: str, what: str, exc: BaseException) -> str:
    text = (str(exc).strip() or type(exc).__name__).splitlines()[0][:400]
    match = _NODE_IN_MESSAGE.search(text)
    node_name = next((g for g in match.groups() if g), None) if match else None
    nodes = {node.name: node for node in model.graph.node}
    where = ""
    if node_name and node_name in nodes:
        node = nodes[node_name]
        source = node_name.removesuffix("_quant")
        where = (
            f" The node at fault is {node_name!r} ({node.op_type}), made from the op {source!r}: keep it in FP32 with "
            f"exclude=inc.LayerFilter(names=({source!r},)),"
        )
    else:
        where = " Find the op ORT names above in inc.describe(model) and keep it in FP32 with exclude=,"
    return (
        f"The {mode} INT8 model written by ONNX Runtime's quantizer {what} ONNX Runtime {ort.__version__}: {text}."
        f"{where} or choose another format (format='qdq' / 'qoperator') or approach='dynamic'."
    )
