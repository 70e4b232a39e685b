"""Per-op output error of a quantization config, for the ``mse`` tuning strategy.

Static configs are measured on their QDQ form: it has the same scales and zero points as the
QOperator form (for a QOperator config, with every pair ORT's quantizer writes), and keeps every
original node, so each op's output can be read in both graphs (in the INT8 graph after its
QuantizeLinear/DequantizeLinear pair, i.e. as the next op sees it). Every
QuantizeLinear of the INT8 graph is fed the FP32 graph's value of its tensor, so each op's error is
its own, not the sum of the ops upstream. The error of an op is the mean squared difference of
its output, INT8 graph vs FP32 graph, divided by the mean square of the FP32 output: comparable
across ops of very different scales.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort

from inc_core import Dataset, QuantConfig
from inc_core.errors import DatasetError, UnsupportedModelError
from inc_onnx._feeds import to_feeds
from inc_onnx._preprocess import Prepared
from inc_onnx.ptq._collect import OnnxCalibration
from inc_onnx.ptq._describe import describe_prepared
from inc_onnx.ptq._quantize import quantize_prepared

__all__ = ["op_output_errors"]


def op_output_errors(
    prepared: Prepared, config: QuantConfig, fmt: str, calibration: OnnxCalibration | None, dataset: Dataset
) -> dict[str, float]:
    """Relative output MSE per quantizable op (ops whose output cannot be matched are left out)."""
    # A QOperator model quantizes every tensor its QLinear ops read or write (a residual Add's output, read by
    # a float LayerNormalization, is a QLinearAdd's uint8 output): its QDQ twin keeps all of ORT's pairs.
    keep_every_pair = fmt == "qoperator"
    space = describe_prepared(prepared.model, config, fmt)  # the ops of the format asked for
    if config.approach == "static":
        fmt = "qdq"
        config = dataclasses.replace(config, format="qdq")
    quantized = quantize_prepared(prepared, config, fmt, calibration, keep_every_qdq_pair=keep_every_pair)
    nodes = {node.name: node for node in prepared.model.graph.node}
    produced = {o for node in quantized.graph.node for o in node.output}
    watched: dict[str, str] = {}
    for op in space.ops:
        tensor = _comparable_output(prepared.model, nodes[op.name], produced)
        if tensor is not None and tensor in prepared.float_tensors:
            watched[op.name] = tensor
    if not watched:
        return {}
    if config.approach == "static":
        # Each op against its FP32 twin on the same (dequantized) inputs: the error it adds itself.
        pairs = _local_references(quantized, prepared.model, watched)
        fp32_outputs: list[str] = []
        isolated: dict[str, str] = {}
    else:
        seen_as = _dequantized_names(quantized)
        isolated = _isolate(quantized, prepared.float_tensors)
        pairs = {op: (seen_as.get(t, t), t) for op, t in watched.items()}
        fp32_outputs = list(dict.fromkeys([*watched.values(), *isolated]))
    int8_outputs = list(dict.fromkeys(name for pair in pairs.values() for name in (pair if not fp32_outputs else pair[:1])))
    reference = _session(prepared.model, fp32_outputs) if fp32_outputs else None
    candidate = _session(quantized, int8_outputs)
    sq_err = dict.fromkeys(pairs, 0.0)
    sq_ref = dict.fromkeys(pairs, 0.0)
    count = 0
    for index, batch in enumerate(dataset.inputs(limit=config.calib_samples)):
        feeds = to_feeds(batch, prepared.inputs, where=f"op-error batch {index}")
        try:
            fp32 = dict(zip(fp32_outputs, reference.run(fp32_outputs, feeds))) if reference is not None else {}
            q_feeds = {**feeds, **{fed: fp32[t] for t, fed in isolated.items()}}
            values = {**fp32, **dict(zip(int8_outputs, candidate.run(int8_outputs, q_feeds)))}
        except Exception as exc:  # ORT's pybind errors carry the reason in their text only
            raise DatasetError(f"op-error batch {index}: ONNX Runtime could not run the model on it: {exc}") from exc
        for op, (got_name, ref_name) in pairs.items():
            ref64 = np.asarray(values[ref_name], dtype=np.float64)
            sq_err[op] += float(np.sum((np.asarray(values[got_name], dtype=np.float64) - ref64) ** 2))
            sq_ref[op] += float(np.sum(ref64**2))
        count += 1
    if count == 0:
        raise DatasetError("op errors: the dataset produced no batch; give at least one sample.")
    return {op: sq_err[op] / max(sq_ref[op], 1e-30) for op in pairs}


def _local_references(
    quantized: onnx.ModelProto, fp32: onnx.ModelProto, watched: dict[str, str]
) -> dict[str, tuple[str, str]]:
    """Add to the QDQ graph an FP32 twin of each watched op, reading the same dequantized activations.

    The twin uses the FP32 weights and bias and repeats the Relu/Clip ORT folded into the op, so the
    difference between the op's dequantized output and its twin's is the error the op adds (weight and
    output quantization), not what it inherits from the ops upstream, and not its input's quantization,
    which belongs to the producer and stays when the op alone falls back. Returns op -> (INT8 tensor,
    twin tensor).
    """
    q_nodes = {node.name: node for node in quantized.graph.node}
    fp32_nodes = {node.name: node for node in fp32.graph.node}
    fp32_inits = {init.name: init for init in fp32.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in fp32.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    seen_as = _dequantized_names(quantized)
    added: set[str] = set()
    pairs: dict[str, tuple[str, str]] = {}

    def fp32_constant(name: str) -> str:
        twin = f"{name}::fp32"
        if twin not in added:
            copy = onnx.TensorProto()
            copy.CopyFrom(fp32_inits[name])
            copy.name = twin
            quantized.graph.initializer.append(copy)
            added.add(twin)
        return twin

    for op, tensor in watched.items():
        q_node, f_node = q_nodes.get(op), fp32_nodes[op]
        if q_node is None or len(q_node.input) != len(f_node.input) or not f_node.output:
            continue
        chain = [f_node]
        while chain[-1].output[0] != tensor:
            chain.append(readers[chain[-1].output[0]][0])  # the Relu/Clip ORT folded (see _comparable_output)
        previous = None
        for index, node in enumerate(chain):
            twin = onnx.NodeProto()
            twin.CopyFrom(node)
            twin.name = f"{node.name}::twin"
            sources = q_node.input if index == 0 else node.input
            del twin.input[:]
            for position, (given, original) in enumerate(zip(sources, node.input)):
                if index > 0 and position == 0:
                    twin.input.append(previous or "")
                elif original in fp32_inits:
                    twin.input.append(fp32_constant(original))
                else:
                    twin.input.append(given)
            del twin.output[:]
            twin.output.extend(f"{out}::twin" for out in node.output)
            previous = twin.output[0]
            quantized.graph.node.append(twin)
        pairs[op] = (seen_as.get(tensor, tensor), f"{tensor}::twin")
    return pairs


def _isolate(quantized: onnx.ModelProto, float_tensors: frozenset[str]) -> dict[str, str]:
    """Feed every QuantizeLinear of an activation from the FP32 graph instead of the INT8 one (in place).

    Each op then reads the quantized form of its FP32 inputs, so its error is its own (input, weight and
    output quantization) and not the sum of every op upstream, which would rank the last op worst
    whatever it does. Returns FP32 tensor -> the new graph input that carries it.
    """
    initializers = {init.name for init in quantized.graph.initializer}
    fed: dict[str, str] = {}
    for node in quantized.graph.node:
        if node.op_type != "QuantizeLinear" or not node.input:
            continue
        tensor = node.input[0]
        if tensor in initializers or tensor not in float_tensors:
            continue
        if tensor not in fed:
            fed[tensor] = f"{tensor}::fp32"
            quantized.graph.input.append(onnx.helper.make_tensor_value_info(fed[tensor], onnx.TensorProto.FLOAT, None))
        node.input[0] = fed[tensor]
    return fed


def _dequantized_names(model: onnx.ModelProto) -> dict[str, str]:
    """Float tensor -> the output of its QuantizeLinear -> DequantizeLinear pair: the value the next op reads.

    Where ORT folded a Relu into its producer, the producer's raw output is clamped only by that pair,
    so the pair's output is what matches the FP32 activation.
    """
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    out = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            dq = [r for r in readers.get(node.output[0], []) if r.op_type == "DequantizeLinear"]
            if dq:
                out[node.input[0]] = dq[0].output[0]
    return out


def _comparable_output(model: onnx.ModelProto, node: onnx.NodeProto, produced: set[str]) -> str | None:
    """The op's output, or, where ORT folded a following Relu/Clip into the op, that activation's output."""
    if not node.output:
        return None
    tensor = node.output[0]
    while tensor not in produced:
        readers = [n for n in model.graph.node if tensor in n.input]
        if len(readers) != 1 or readers[0].op_type not in ("Relu", "Clip"):
            return None
        tensor = readers[0].output[0]
    return tensor


def _session(model: onnx.ModelProto, outputs: list[str]) -> ort.InferenceSession:
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    present = {o.name for o in augmented.graph.output}
    for name in outputs:
        if name not in present:
            augmented.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(augmented.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's pybind errors carry the reason in their text only
        text = (str(exc).strip() or type(exc).__name__).splitlines()[0][:400]
        raise UnsupportedModelError(
            f"op errors: ONNX Runtime could not load the model with op outputs added as graph outputs: {text}. "
            "Use a tuning strategy that needs no per-op errors (strategy='basic')."
        ) from exc
