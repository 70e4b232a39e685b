"""Per-layer output error of the int8 model against the float one (what the ``mse`` strategy ranks).

LiteRT target: each layer's output tensor in the int8 and the float flatbuffer. SavedModel target: each
int8 unit's float output, which keeps the name of the op it replaced in the rewritten graph.
"""

from __future__ import annotations

import numpy as np

from inc_core import Dataset, QuantConfig
from inc_tf._frozen import check_batch, graph_function
from inc_tf._keras_model import KerasGraph, as_input_list
from inc_tf._litert import Invoker, LiteRTModel, interpreter
from inc_tf._savedmodel import TFSavedModel
from inc_tf.ptq._calibrate import TfCalibration
from inc_tf.ptq._quantize import describe_graph, layers_of_op
from inc_tf.ptq._savedmodel_quantize import GraphPlan, as_input_arrays, describe_plan

__all__ = ["layer_output_errors", "unit_output_errors"]

_SAMPLES = 32


def _tensors(content: bytes) -> tuple[Invoker, dict[str, dict]]:
    interp = interpreter(content, threads=None, preserve_all_tensors=True)
    return Invoker(interp), {d["name"]: d for d in interp.get_tensor_details()}


def _value(invoker: Invoker, detail: dict) -> np.ndarray:
    value = invoker.interp.get_tensor(detail["index"])
    scale, zero = detail["quantization"]
    if value.dtype in (np.int8, np.uint8, np.int16) and scale:
        return (value.astype(np.float64) - zero) * scale
    return value.astype(np.float64)


def layer_output_errors(
    graph: KerasGraph, config: QuantConfig, calibration: TfCalibration, quantized: LiteRTModel, dataset: Dataset
) -> dict[str, float]:
    """Mean squared error of each quantizable layer's output, int8 vs float, on up to 32 samples.

    Both flatbuffers name an op's output after the same TF scopes, so each layer's output is found
    in both by name; int8 tensors are dequantized with their own scale and zero point.
    """
    wanted = {graph.layer_names.index(op.name) for op in describe_graph(graph, config.approach).ops}
    outputs: dict[int, str] = {}
    # Named from the float model: a layer's int8 output keeps that name, or (a model output) the name
    # goes to the DEQUANTIZE that follows it, which holds the same values in float.
    for record in calibration.records:
        for layer in layers_of_op(graph, record) & wanted:
            for name in record.output_names:
                outputs.setdefault(layer, name)
    float_run, float_tensors = _tensors(calibration.calibrated)
    int8_run, int8_tensors = _tensors(quantized.content)
    sums = {layer: 0.0 for layer in outputs if outputs[layer] in float_tensors and outputs[layer] in int8_tensors}
    batches = 0
    for index, batch in enumerate(dataset.inputs(limit=_SAMPLES)):
        arrays = as_input_list(batch, graph, where=f"error batch {index}")
        float_run(**dict(zip(float_run.input_names, arrays)))
        int8_run(**dict(zip(int8_run.input_names, arrays)))
        for layer in sums:
            name = outputs[layer]
            diff = _value(float_run, float_tensors[name]) - _value(int8_run, int8_tensors[name])
            sums[layer] += float(np.mean(diff * diff))
        batches += 1
    return {graph.layer_names[layer]: total / max(batches, 1) for layer, total in sums.items()}


def unit_output_errors(plan: GraphPlan, config: QuantConfig, quantized: TFSavedModel, dataset: Dataset) -> dict[str, float]:
    """Mean squared error of each int8 op's float output, rewritten graph vs float graph, on up to 32 samples.

    An op kept in float (``exclude``) has no error entry, as on the LiteRT target; an op of two units (a
    custom layer with two matmuls) gets the mean of their errors.
    """
    import tensorflow as tf

    excluded = set(config.exclude.select(describe_plan(plan).ops)) if config.exclude else set()
    present = {node.name for node in quantized.graph_def.node}
    units = [u for u in plan.units if plan.op_names[u.name] not in excluded and u.output.split(":")[0] in present]
    watched = tuple(dict.fromkeys(u.output for u in units))
    if not watched:
        return {}
    frozen = plan.frozen
    float_run = graph_function(frozen.graph_def, frozen.input_tensors, watched)
    int8_run = graph_function(quantized.graph_def, quantized.input_tensors, watched)
    sums = dict.fromkeys(watched, 0.0)
    batches = 0
    for index, batch in enumerate(dataset.inputs(limit=_SAMPLES)):
        arrays = [tf.constant(a) for a in check_batch(as_input_arrays(batch, frozen), frozen, where=f"error batch {index}")]
        reference, measured = (_as_tuple(run(*arrays)) for run in (float_run, int8_run))
        for name, a, b in zip(watched, reference, measured):
            diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
            sums[name] += float(np.mean(diff * diff))
        batches += 1
    per_op: dict[str, list[float]] = {}
    for unit in units:
        per_op.setdefault(plan.op_names[unit.name], []).append(sums[unit.output] / max(batches, 1))
    return {name: float(np.mean(values)) for name, values in per_op.items()}


def _as_tuple(values: object) -> tuple:
    return tuple(values) if isinstance(values, (list, tuple)) else (values,)
