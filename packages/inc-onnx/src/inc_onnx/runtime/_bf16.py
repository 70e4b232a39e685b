"""BF16 mixed precision for ONNX models: recorded in the standard file, run in BF16 by OpenVINO.

How an op chosen by ``QuantConfig(bf16=...)`` travels:

- In the INT8 file it is an ordinary float node (the quantizer leaves it out, as it does ``exclude=``
  ops), and the model's metadata entry :data:`BF16_OPS_KEY` lists it by node name (a JSON list). The
  file stays standard ONNX that every runtime loads; nothing BF16 is written into the graph, because
  ONNX Runtime's CPU provider has BF16 kernels for almost no op (a ``Cast`` to BFLOAT16 before a
  ``MatMul`` or ``Conv`` makes the file unloadable there).
- OpenVINO (``create_session(runtime="openvino")``) reads the list and, in the ``ov.Model`` it built
  from the file, puts ``Convert`` to bf16 on the float inputs of the nodes that came from each listed op
  and a ``Convert`` back to f32 on their outputs. With the default f32 inference precision OpenVINO's
  CPU plugin then runs exactly those ops in bf16 (weights converted once at compile time, the converts
  folded into the kernels' input and output) and keeps every other float op in f32; the INT8 ops stay
  int8. A whole-model ``INFERENCE_PRECISION_HINT=bf16`` could not leave the other float ops in f32.
- ONNX Runtime runs the listed ops in FP32 (logged at INFO): the same file, the FP32-fallback accuracy.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Iterable
from typing import Any

import onnx

from inc_core import LayerFilter, QuantConfig
from inc_core.backend import Op
from inc_core.errors import BackendNotFoundError, ConfigError, ModelLoadError
from inc_onnx.runtime._openvino import INSTALL_HINT, import_openvino

__all__ = [
    "BF16_OPS_KEY", "bf16_compute_ops", "bf16_unavailable", "convert_to_bf16", "int8_config", "recorded_bf16_ops",
    "record_bf16_ops",
]

log = logging.getLogger("inc")

BF16_OPS_KEY = "inc.bf16_ops"
_FLOAT32 = "f32"
# OpenVINO node types that are graph plumbing, never computation to move to bf16.
_NOT_COMPUTE = ("Constant", "Parameter", "Result", "ShapeOf")


def int8_config(config: QuantConfig, ops: Iterable[Op]) -> tuple[QuantConfig, tuple[str, ...]]:
    """What ORT's quantizer is given for ``config``, and the names of the ops that run in BF16.

    BF16 ops are kept out of INT8 like ``exclude=`` ops (by name, in model order); an op both filters
    match is FP32 (``QuantConfig.precision``) and not listed.

    Raises:
        ConfigError: a name in ``config.bf16`` matches no op, or exclude= and bf16= together leave no op in INT8.
    """
    listed = tuple(ops)
    config.bf16.select(listed)  # a name that matches no op is a ConfigError listing the ops
    precisions = {op.name: config.precision(op.name, op.op_type) for op in listed}
    names = tuple(name for name, precision in precisions.items() if precision == "bf16")
    if not names:
        return config, ()
    if listed and "int8" not in precisions.values():
        raise ConfigError(
            f"QuantConfig: exclude= and bf16= keep every one of the {len(listed)} quantizable ops out of INT8 "
            f"({len(names)} in BF16), so nothing would be quantized. Select fewer ops (inc.describe(model) lists them)."
        )
    kept_out = dataclasses.replace(config, exclude=config.exclude.union(LayerFilter(names=names)), bf16=LayerFilter())
    return kept_out, names


# Node types whose BF16 kernels beat FP32 when one input is a weight: OpenVINO runs them on AVX512-BF16/AMX
# tiles. A product of two activations (attention scores) OpenVINO keeps in f32 anyway, and a lookup or an
# elementwise op gains nothing from BF16 but the conversions around it.
_BF16_COMPUTE_TYPES = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def bf16_compute_ops(model: onnx.ModelProto, ops: Iterable[Op]) -> frozenset[str]:
    """The ops of ``ops`` that run faster in BF16 than in FP32: a Conv/Gemm/MatMul with a constant weight."""
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    nodes = {node.name: node for node in model.graph.node}
    return frozenset(
        op.name
        for op in ops
        if op.op_type in _BF16_COMPUTE_TYPES
        and op.name in nodes
        and any(name in constants for name in nodes[op.name].input[:2])
    )


def record_bf16_ops(model: onnx.ModelProto, names: Iterable[str]) -> None:
    """Write (or, with no names, remove) the metadata entry listing the ops that run in BF16."""
    listed = list(names)
    for prop in list(model.metadata_props):
        if prop.key == BF16_OPS_KEY:
            model.metadata_props.remove(prop)
    if listed:
        model.metadata_props.add(key=BF16_OPS_KEY, value=json.dumps(listed))


def recorded_bf16_ops(model: onnx.ModelProto) -> tuple[str, ...]:
    """The node names the model's metadata lists for BF16 (empty for a model without BF16 ops).

    Raises:
        ModelLoadError: the entry is not a JSON list of names, or names a node the graph does not have.
    """
    for prop in model.metadata_props:
        if prop.key != BF16_OPS_KEY:
            continue
        try:
            names = json.loads(prop.value)
        except json.JSONDecodeError as exc:
            names = exc
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ModelLoadError(
                f"The model's metadata entry {BF16_OPS_KEY!r} must be a JSON list of node names, got {prop.value[:200]!r}; "
                "remove the entry (the ops then run in FP32) or quantize the model again with QuantConfig(bf16=...)."
            )
        nodes = {node.name for node in model.graph.node}
        missing = [n for n in names if n not in nodes]
        if missing:
            raise ModelLoadError(
                f"The model's metadata entry {BF16_OPS_KEY!r} lists {missing}, which are not nodes of its graph; the "
                "graph was changed after quantization. Quantize the changed model again, or remove the entry."
            )
        return tuple(names)
    return ()


@functools.cache
def _cpu_capabilities() -> tuple[str, ...]:
    from inc_onnx.runtime._openvino import _core

    return tuple(str(c) for c in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def bf16_unavailable() -> str | None:
    """Why OpenVINO cannot run BF16 ops on this machine (a sentence saying what to change), or None."""
    from inc_onnx.runtime._runtime import cpu_name

    try:
        import_openvino()
    except BackendNotFoundError:
        return (
            "ONNX models run BF16 ops on OpenVINO, which is not installed here (ONNX Runtime's CPU provider has no "
            f"BF16 kernels for them); install it with `{INSTALL_HINT}`"
        )
    capabilities = _cpu_capabilities()
    if "BF16" not in capabilities:
        return (
            f"this CPU ({cpu_name()}) has no BF16 instructions: OpenVINO's CPU plugin lists {list(capabilities)} "
            "without 'BF16' (AVX512-BF16 or AMX-BF16 is needed)"
        )
    return None


def convert_to_bf16(ov_model: Any, names: tuple[str, ...], onnx_nodes: Iterable[str]) -> list[str]:
    """Make the nodes of ``ov_model`` that came from the ONNX nodes ``names`` compute in bf16 (in place).

    OpenVINO's ONNX reader names the nodes it builds for an ONNX node after it: the node itself, or
    ``<name>/<part>`` for the parts of one that becomes several (a Conv or Gemm with bias becomes
    ``<name>/WithoutBiases`` + ``<name>``). A node belongs to the longest ONNX node name that is its
    name or a ``/``-separated prefix of it. Float inputs entering the group get a Convert to bf16, float
    outputs leaving it a Convert back to f32, so the rest of the graph sees the types it had.

    Returns:
        The OpenVINO node names now computing in bf16.

    Raises:
        ModelLoadError: a listed op has no node in OpenVINO's model (its reader named it differently).
    """
    ov = import_openvino()
    import openvino.opset13 as ops

    wanted = set(names)
    known = set(onnx_nodes)
    groups: dict[str, list[Any]] = {}
    for node in ov_model.get_ordered_ops():
        if node.get_type_name() in _NOT_COMPUTE:
            continue
        owner = _owner(node.get_friendly_name(), known)
        if owner in wanted:
            groups.setdefault(owner, []).append(node)
    missing = [n for n in names if n not in groups]
    if missing:
        raise ModelLoadError(
            f"OpenVINO's model of the file has no node for the BF16 ops {missing} (its ONNX reader named them "
            "differently); run the model with openvino_precision='bf16' (every float op in bf16) or in FP32."
        )
    in_group = {node.get_name() for members in groups.values() for node in members}
    to_bf16: dict[tuple[str, int], Any] = {}
    converted: list[str] = []
    for members in groups.values():
        for node in members:
            for port in node.outputs():
                outside = [t for t in port.get_target_inputs() if t.get_node().get_name() not in in_group]
                if outside and port.get_element_type().get_type_name() == _FLOAT32:
                    back = ops.convert(port, ov.Type.f32)
                    for target in outside:
                        target.replace_source_output(back.output(0))
            for target in node.inputs():
                source = target.get_source_output()
                producer = source.get_node()
                if producer.get_name() in in_group or source.get_element_type().get_type_name() != _FLOAT32:
                    continue
                key = (producer.get_name(), source.get_index())
                if key not in to_bf16:
                    to_bf16[key] = ops.convert(source, ov.Type.bf16)
                target.replace_source_output(to_bf16[key].output(0))
            converted.append(node.get_friendly_name())
    ov_model.validate_nodes_and_infer_types()
    return converted


def _owner(friendly: str, known: set[str]) -> str | None:
    """The ONNX node an OpenVINO node was built for: its name, or its longest ``/``-prefix that is one."""
    candidate = friendly
    while True:
        if candidate in known:
            return candidate
        cut = candidate.rfind("/")
        if cut <= 0:
            return None
        candidate = candidate[:cut]
