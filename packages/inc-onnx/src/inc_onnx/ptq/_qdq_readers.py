"""Keep a QDQ pair only where an INT8 kernel reads it.

ORT's QDQ quantizer puts a QuantizeLinear/DequantizeLinear pair on every tensor a quantized node reads
or writes, and hands the DequantizeLinear's output to *every* reader of the tensor. Two things follow
that cost speed and fidelity and buy nothing:

- a pair whose readers all run in float (the output of a MatMul read by its float bias Add, the output
  of an Add read by a float LayerNormalization) rounds the tensor to 8 bits and back: ONNX Runtime
  cannot fuse it into any INT8 kernel, runs both ops, and the float reader sees the rounding error;
- a float reader of a tensor that also feeds an INT8 op (the residual Add next to the query/key/value
  MatMuls reading a LayerNormalization's output) gets the rounded copy instead of the exact one.

:func:`drop_unread_qdq` rewires every float reader to the exact tensor and removes pairs that no INT8
reader is left for, repeating until nothing changes (removing an Add's output pair makes the Add a float
op, which in turn frees its input pairs). A node reads INT8 when ONNX Runtime and OpenVINO fuse it with
the DequantizeLinear before it: a Conv/MatMul/Gemm (their integer kernels write float output where no
QuantizeLinear follows), a QuantizeLinear (requantization), or any other node whose every output goes to
QuantizeLinear nodes only (a QDQ group, run as QLinearAdd, an int8 Transpose, ...), or an ArgMax.

One pair is never touched: one that stands in for a Relu or Clip. ORT's quantizer removes a Relu/Clip whose
output range the QuantizeLinear clips to anyway and lets the op before it write the activation's output name
(:func:`folded_activations` finds those tensors); the float tensor there is the value *before* the
activation, so a float reader must keep reading the dequantized one.
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

__all__ = ["INT8_WITH_FLOAT_OUTPUT", "drop_unread_qdq", "folded_activations", "reads_int8"]

# Ops whose integer kernels read dequantized inputs and may write a float output.
INT8_WITH_FLOAT_OUTPUT = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# Of those, the ops whose ONNX Runtime INT8 kernel (QLinearConv) needs its output quantized too: without the
# QuantizeLinear after it, ORT runs the op in float on dequantized inputs, so that pair is always kept.
_NEEDS_QUANTIZED_OUTPUT = frozenset({"Conv", "ConvTranspose"})
# Ops that read 8-bit values as they are: requantization, and ArgMax (ORT drops the DequantizeLinear before
# it, as dequantization keeps the order of values).
_READS_8BIT_AS_IS = frozenset({"QuantizeLinear", "ArgMax"})


def reads_int8(
    node: onnx.NodeProto,
    readers: dict[str, list[onnx.NodeProto]],
    graph_outputs: set[str],
    float_nodes: frozenset[str] = frozenset(),
) -> bool:
    """True when ``node`` consumes its DequantizeLinear inputs in an INT8 kernel (see the module docstring).

    Nodes named in ``float_nodes`` (ops the user keeps in FP32) never do: left between a DequantizeLinear and
    a QuantizeLinear, ONNX Runtime would fuse them into an INT8 kernel anyway (QLinearSoftmax, QLinearAdd).
    """
    if node.domain not in ("", "ai.onnx") or node.name in float_nodes:
        return False
    if node.op_type in INT8_WITH_FLOAT_OUTPUT:
        # Except an op whose output is a model output that a QuantizeLinear reads too: ONNX Runtime fuses it
        # into neither kernel (the 8-bit-output one needs the QuantizeLinear as its only reader, the
        # float-output one no QuantizeLinear at all) and runs it in float on dequantized inputs.
        return not any(
            name in graph_outputs and any(r.op_type == "QuantizeLinear" for r in readers.get(name, []))
            for name in node.output
        )
    if node.op_type in _READS_8BIT_AS_IS:
        return True
    outputs = [name for name in node.output if name]
    return bool(outputs) and all(
        name not in graph_outputs and readers.get(name) and all(r.op_type == "QuantizeLinear" for r in readers[name])
        for name in outputs
    )


def folded_activations(original: onnx.ModelProto, quantized: onnx.ModelProto) -> frozenset[str]:
    """Outputs of Relu/Clip nodes of ``original`` that another op writes in ``quantized`` (the activation was
    folded into the QuantizeLinear after it)."""
    activations = {n.output[0]: n.op_type for n in original.graph.node if n.op_type in ("Relu", "Clip") and n.output}
    return frozenset(
        out for node in quantized.graph.node for out in node.output if out in activations and node.op_type != activations[out]
    )


def drop_unread_qdq(
    model: onnx.ModelProto, *, float_nodes: frozenset[str] = frozenset(), folded: frozenset[str] = frozenset()
) -> int:
    """Rewire float readers of activation QDQ pairs to the float tensor and remove unread pairs (in place).

    ``float_nodes``: names of nodes kept in FP32 (``exclude=``); they read exact tensors, never a DequantizeLinear
    whose float source is at hand, so ONNX Runtime cannot fuse them back into INT8 kernels.
    ``folded``: tensors whose pair also applies a folded Relu/Clip (:func:`folded_activations`); left as they are.

    A DequantizeLinear of a constant that no INT8 reader is left for is replaced by its float values, so
    the float op reads a constant, not a dequantization it would run on every call. Returns how many
    QuantizeLinear/DequantizeLinear nodes were removed.
    """
    graph = model.graph
    graph_outputs = {o.name for o in graph.output}
    initializers = {init.name: init for init in graph.initializer}
    removed = 0
    changed = True
    while changed:
        changed = False
        producers = {out: node for node in graph.node for out in node.output}
        readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                readers.setdefault(name, []).append(node)
        dead: list[onnx.NodeProto] = []
        for dq in graph.node:
            if dq.op_type != "DequantizeLinear":
                continue
            q = producers.get(dq.input[0])
            source = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else None
            if source in folded:
                continue
            if source is not None and _int8_needs_output_pair(producers.get(source), producers):
                continue
            if dq.output[0] in graph_outputs:
                # A model output read through Q/DQ: unless an INT8 op reads it too, the user gets a rounded
                # copy for nothing.
                int8_readers = [
                    r for r in readers.get(dq.output[0], []) if reads_int8(r, readers, graph_outputs, float_nodes)
                ]
                if source is not None and source in producers and source not in graph_outputs:
                    if not int8_readers:
                        _rename_tensor(graph, source, dq.output[0], skip=q)
                        dead.append(dq)
                    else:
                        # INT8 ops read the pair (BERT's pooler reads the last hidden states), but the user's
                        # output is the float tensor itself, not its 8-bit rounding.
                        _output_the_float_tensor(graph, dq, source)
                        changed = True
                continue
            if source is None and dq.input[0] not in initializers:
                continue  # an input that arrives quantized: not ours to change
            float_readers = [
                r for r in readers.get(dq.output[0], []) if not reads_int8(r, readers, graph_outputs, float_nodes)
            ]
            if source is not None:
                for reader in float_readers:
                    _replace_input(reader, dq.output[0], source)
                    changed = True
            if len(float_readers) == len(readers.get(dq.output[0], [])):
                if source is None:
                    if not float_readers:
                        continue
                    _materialize(graph, dq, initializers)
                dead.append(dq)
        for dq in dead:
            graph.node.remove(dq)
            removed += 1
            changed = True
        if dead:
            live = _names_read(graph) | graph_outputs
            for q in [n for n in graph.node if n.op_type == "QuantizeLinear" and n.output[0] not in live]:
                graph.node.remove(q)
                removed += 1
    _drop_unused_initializers(graph)
    return removed


def _int8_needs_output_pair(producer: onnx.NodeProto | None, producers: dict[str, onnx.NodeProto]) -> bool:
    """True for a Conv/ConvTranspose reading a DequantizeLinear: its QLinearConv fusion needs the output pair."""
    if producer is None or producer.op_type not in _NEEDS_QUANTIZED_OUTPUT or producer.domain not in ("", "ai.onnx"):
        return False
    first = producers.get(producer.input[0]) if producer.input else None
    return first is not None and first.op_type == "DequantizeLinear"


def _output_the_float_tensor(graph: onnx.GraphProto, dq: onnx.NodeProto, source: str) -> None:
    """Make the graph output ``dq`` writes the float tensor ``source`` it dequantizes; ``dq``'s readers keep it."""
    output = dq.output[0]
    taken = {name for node in graph.node for name in (*node.input, *node.output)}
    fresh = f"{output}_dequantized"
    while fresh in taken:
        fresh += "_"
    for node in graph.node:
        _replace_input(node, output, fresh)
    dq.output[0] = fresh
    _rename_tensor(graph, source, output, skip=None)


def _rename_tensor(graph: onnx.GraphProto, old: str, new: str, *, skip: onnx.NodeProto | None) -> None:
    """Let the producer of ``old`` write ``new`` (a graph output) and every reader but ``skip`` read it."""
    for node in graph.node:
        if node is skip:
            continue
        _replace_input(node, old, new)
        for index, name in enumerate(node.output):
            if name == old:
                node.output[index] = new


def _replace_input(node: onnx.NodeProto, old: str, new: str) -> None:
    for index, name in enumerate(node.input):
        if name == old:
            node.input[index] = new


def _materialize(graph: onnx.GraphProto, dq: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> None:
    """Replace a DequantizeLinear of constants by a float initializer holding its output."""
    import numpy as np

    values = numpy_helper.to_array(initializers[dq.input[0]]).astype(np.float32)
    scale = numpy_helper.to_array(initializers[dq.input[1]]).astype(np.float32)
    zero = numpy_helper.to_array(initializers[dq.input[2]]).astype(np.float32) if len(dq.input) > 2 and dq.input[2] else 0.0
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    if np.ndim(scale) == 1 and values.ndim > 1:
        shape = [1] * values.ndim
        shape[axis % values.ndim] = -1
        scale = scale.reshape(shape)
        zero = np.reshape(zero, shape) if np.ndim(zero) == 1 else zero
    result = ((values - zero) * scale).astype(np.float32)
    graph.initializer.append(numpy_helper.from_array(result, dq.output[0]))
    initializers[dq.output[0]] = graph.initializer[-1]


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = _names_read(graph) | {o.name for o in graph.output}
    keep = [init for init in graph.initializer if init.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node of ``graph`` or of its subgraphs (If/Loop bodies) reads."""
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:
            for sub in (attribute.g, *attribute.graphs) if attribute.HasField("g") else attribute.graphs:
                names |= _names_read(sub)
    return names
