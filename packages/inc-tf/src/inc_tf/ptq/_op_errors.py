"""Per-layer output error of the int8 model against the float one (what the ``mse`` strategy ranks).

LiteRT target: each layer's output tensor in the int8 and the float flatbuffer. SavedModel target: each
int8 unit alone, fed the float graph's values (see :func:`unit_output_errors`).
"""

from __future__ import annotations

import numpy as np

from inc_core import Dataset, QuantConfig
from inc_tf._frozen import check_batch, graph_function
from inc_tf._keras_model import KerasGraph, as_input_list, feeds_by_name
from inc_tf._litert import Invoker, LiteRTModel, interpreter
from inc_tf._savedmodel import TFSavedModel
from inc_tf.ptq._calibrate import TfCalibration
from inc_tf.ptq._int8_rewrite import probe_name
from inc_tf.ptq._int8_units import Unit
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
        float_run(**feeds_by_name(float_run.input_names, graph, arrays))
        int8_run(**feeds_by_name(int8_run.input_names, graph, arrays))
        for layer in sums:
            name = outputs[layer]
            diff = _value(float_run, float_tensors[name]) - _value(int8_run, int8_tensors[name])
            sums[layer] += float(np.mean(diff * diff))
        batches += 1
    return {graph.layer_names[layer]: total / max(batches, 1) for layer, total in sums.items()}


def unit_output_errors(plan: GraphPlan, config: QuantConfig, probe: TFSavedModel, dataset: Dataset) -> dict[str, float]:
    """Relative output error of each int8 op on its own, on up to 32 samples.

    ``probe`` is the config's graph built with ``quantize_plan(..., probe=True)``: each int8 unit reads its
    float input (and residual summand) from a placeholder, which is fed the float graph's value of that
    tensor, so an op's error is its own, not the sum of the ops upstream (as on the ONNX and torch backends).
    The error is the mean squared difference of the unit's float output, int8 vs float graph, divided by the
    mean square of the float output: comparable across layers of very different scales. An op kept in float
    (``exclude``) has no entry; an op of two units (a custom layer with two matmuls) gets their mean.
    """
    import tensorflow as tf

    excluded = set(config.exclude.select(describe_plan(plan).ops)) if config.exclude else set()
    present = {node.name for node in probe.graph_def.node}
    units = [u for u in plan.units if plan.op_names[u.name] not in excluded and u.output.split(":")[0] in present]
    if not units:
        return {}
    # placeholder -> the float tensor it is fed (a summand has a placeholder of its own)
    feeds = {probe_name(u.input): u.input for u in units}
    feeds.update({probe_name(u.summand, summand=True): u.summand for u in units if u.summand})
    feeds = {placeholder: tensor for placeholder, tensor in feeds.items() if placeholder in present}
    fed = tuple(dict.fromkeys(feeds.values()))
    measured_at = {u.name: _own_output(u, present) for u in units}
    outputs = tuple(dict.fromkeys(measured_at.values()))
    frozen = plan.frozen
    fetched = tuple(dict.fromkeys(fed + outputs))  # one unit's output is often the next one's input
    float_run = graph_function(frozen.graph_def, frozen.input_tensors, fetched)
    probe_run = graph_function(probe.graph_def, (*probe.input_tensors, *(f"{p}:0" for p in feeds)), outputs)
    squared = dict.fromkeys(outputs, 0.0)
    energy = dict.fromkeys(outputs, 0.0)
    for index, batch in enumerate(dataset.inputs(limit=_SAMPLES)):
        arrays = [tf.constant(a) for a in check_batch(as_input_arrays(batch, frozen), frozen, where=f"error batch {index}")]
        reference = dict(zip(fetched, _as_tuple(float_run(*arrays))))
        measured = _as_tuple(probe_run(*arrays, *(reference[t] for t in feeds.values())))
        for name, value in zip(outputs, measured):
            ref = np.asarray(reference[name], dtype=np.float64)
            diff = ref - np.asarray(value, dtype=np.float64)
            squared[name] += float(np.mean(diff * diff))
            energy[name] += float(np.mean(ref * ref))
    per_op: dict[str, list[float]] = {}
    for unit in units:
        relative = squared[measured_at[unit.name]] / max(energy[measured_at[unit.name]], 1e-12)
        per_op.setdefault(plan.op_names[unit.name], []).append(relative)
    return {name: float(np.mean(values)) for name, values in per_op.items()}


def _own_output(unit: Unit, present: set[str]) -> str:
    """The tensor that holds only ``unit``'s own error: before a residual Add the rewrite left in float (the Add
    reads the summand from upstream int8 ops), else the unit's output."""
    core = unit.core_output
    if unit.summand and core != unit.output and core.split(":")[0] in present:
        return core
    return unit.output


def _as_tuple(values: object) -> tuple:
    return tuple(values) if isinstance(values, (list, tuple)) else (values,)
