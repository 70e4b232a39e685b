"""ONNX models computing in float16, bfloat16 or float64 are quantized from their float32 version, keeping the
model's input/output types.

Models exported for GPUs are often stored in float16 (``onnxconverter_common.float16``, ``model.half()``
before export), and skl2onnx writes a float64 graph when given float64 data (scikit-learn's default dtype:
``to_onnx(pipeline, X[:1])``). ORT's quantizers are written for float32 graphs: on a float16 one the QDQ
quantizer puts a Cast between each DequantizeLinear and its op, so no INT8 kernel is fused (the convolutions
and products run in float16), the QOperator quantizer fails on the first Conv, and the dynamic one finds no
float32 weight; on a float64 one nothing is quantized at all. Upcasting 16-bit values is exact, and rounding
float64 values to float32 changes them far less than INT8 does; the INT8 model's graph inputs and outputs keep
their types through Casts at the boundary, so it is fed and read exactly as the user's model was.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["as_float32_graph"]

log = logging.getLogger("inc")

# Every float type that is not float32: 16-bit ones convert exactly, float64 rounds to the nearest float32.
_OTHER_FLOATS = frozenset({onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE})
_FLOAT = onnx.TensorProto.FLOAT
# Integer attributes that name an element type (Cast's "to", the generators' "dtype").
_TYPE_ATTRIBUTES = frozenset({"to", "dtype"})
# The attribute holding a constant tensor (Constant's value, ConstantOfShape's fill value). Other tensor attributes
# (ai.onnx.ml's ``*_as_tensor`` tree parameters) keep their type: those operators take float32 inputs as they are.
_TENSOR_ATTRIBUTE = "value"


def as_float32_graph(proto: onnx.ModelProto) -> bool:
    """Rewrite ``proto`` in place to compute in float32 where it computed in float16, bfloat16 or float64.

    Initializers, constants, Casts and type annotations go to float32, in subgraphs too; each such graph input
    is cast to float32 where it enters, each such output cast back where it leaves. Casts left converting
    float32 to float32 are removed, so no QDQ pair is split by one. Returns whether anything changed.
    """
    found = _other_float_types(proto.graph)
    if not found:
        return False
    graph = proto.graph
    # The original type of each such graph input and output, recorded before the graph is retyped.
    boundary = {
        value.name: value.type.tensor_type.elem_type
        for value in (*graph.input, *graph.output)
        if value.type.tensor_type.elem_type in _OTHER_FLOATS
    }
    _retype_graph(graph)
    _cast_inputs(graph, boundary)
    _cast_outputs(graph, boundary)
    _drop_float_to_float_casts(proto)
    names = ", ".join(_type_name(t) for t in sorted(found))
    log.info(
        "the model computes in %s; inc quantizes its float32 version and keeps the types of its inputs and "
        "outputs, so ops left out of INT8 run in float32", names,
    )
    return True


def _other_float_types(graph: onnx.GraphProto) -> set[int]:
    """The float types other than float32 that ``graph`` (or a subgraph) computes in."""
    found = {v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    found.update(init.data_type for init in graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.name in _TYPE_ATTRIBUTES and attr.type == onnx.AttributeProto.INT:
                found.add(attr.i)
            if attr.name == _TENSOR_ATTRIBUTE and attr.type == onnx.AttributeProto.TENSOR:
                found.add(attr.t.data_type)
            for sub in _subgraphs(attr):
                found |= _other_float_types(sub)
    return found & _OTHER_FLOATS


def _subgraphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == onnx.AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


def _as_float32(tensor: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)


def _retype_graph(graph: onnx.GraphProto) -> None:
    """Every float16/bfloat16/float64 tensor, type and Cast target of ``graph`` (and its subgraphs) to float32.

    The top graph's inputs and outputs are retyped here as well; :func:`_cast_inputs` and
    :func:`_cast_outputs` then put the original types back at the boundary.
    """
    for index, init in enumerate(graph.initializer):
        if init.data_type in _OTHER_FLOATS:
            graph.initializer[index].CopyFrom(_as_float32(init))
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type in _OTHER_FLOATS:
            value.type.tensor_type.elem_type = _FLOAT
    for node in graph.node:
        for attr in node.attribute:
            if attr.name in _TYPE_ATTRIBUTES and attr.type == onnx.AttributeProto.INT and attr.i in _OTHER_FLOATS:
                attr.i = _FLOAT
            elif attr.name == _TENSOR_ATTRIBUTE and attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in _OTHER_FLOATS:
                attr.t.CopyFrom(_as_float32(attr.t))
            for sub in _subgraphs(attr):
                _retype_graph(sub)


def _unique(graph: onnx.GraphProto, base: str) -> str:
    taken = {
        *(v.name for v in (*graph.input, *graph.output, *graph.value_info)),
        *(init.name for init in graph.initializer),
        *(name for node in graph.node for name in (*node.input, *node.output, node.name)),
    }
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Point every reader of tensor ``old`` (in subgraphs too, which see outer names) at ``new``."""
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                _rename_uses(sub, old, new)


def _cast_inputs(graph: onnx.GraphProto, boundary: dict[str, int]) -> None:
    """A float16/bfloat16/float64 graph input keeps its type and enters the float32 graph through a Cast."""
    initializers = {init.name for init in graph.initializer}
    casts = []
    for value in graph.input:
        original = boundary.get(value.name)
        if original is None or value.name in initializers:
            continue
        upcast = _unique(graph, f"{value.name}_float32")
        _rename_uses(graph, value.name, upcast)
        value.type.tensor_type.elem_type = original
        casts.append(onnx.helper.make_node("Cast", [value.name], [upcast], name=_unique(graph, f"{value.name}_to_float32"), to=_FLOAT))
    for cast in reversed(casts):
        graph.node.insert(0, cast)


def _cast_outputs(graph: onnx.GraphProto, boundary: dict[str, int]) -> None:
    """A float16/bfloat16/float64 graph output is computed in float32 and cast back to its type as it leaves."""
    inputs = {value.name for value in graph.input}
    for value in graph.output:
        original = boundary.get(value.name)
        if original is None or value.name in inputs:
            continue  # an input passed straight through keeps its own type already
        computed = _unique(graph, f"{value.name}_float32")
        for node in graph.node:
            for index, name in enumerate(node.output):
                if name == value.name:
                    node.output[index] = computed
        _rename_uses(graph, value.name, computed)
        for info in graph.value_info:
            if info.name == value.name:
                info.name = computed
        value.type.tensor_type.elem_type = original
        graph.node.append(
            onnx.helper.make_node("Cast", [computed], [value.name], name=_unique(graph, f"{value.name}_to_{_type_name(original)}"), to=original)
        )


def _type_name(elem_type: int) -> str:
    return onnx.TensorProto.DataType.Name(elem_type).lower()


def _drop_float_to_float_casts(proto: onnx.ModelProto) -> None:
    """Remove Casts to float32 of tensors that are float32 now (they split QDQ groups), outside subgraphs."""
    graph = proto.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(proto).graph
    except Exception as exc:  # onnx raises InferenceError and others; ORT's optimizer removes such Casts too
        log.info("ONNX shape inference failed on the float32 upcast (%s); its Casts stay", exc)
        return
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.input, *inferred.value_info, *inferred.output)}
    types.update({init.name: init.data_type for init in graph.initializer})
    outputs = {value.name for value in graph.output}
    for node in list(graph.node):
        if node.op_type != "Cast" or node.domain or node.output[0] in outputs:
            continue
        target = next((attr.i for attr in node.attribute if attr.name == "to"), None)
        if target != _FLOAT or types.get(node.input[0]) != _FLOAT:
            continue
        _rename_uses(graph, node.output[0], node.input[0])
        graph.node.remove(node)
