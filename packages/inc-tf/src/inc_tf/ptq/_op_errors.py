"""Per-layer output error of the int8 LiteRT model against the float one (what the ``mse`` strategy ranks)."""

from __future__ import annotations

import numpy as np

from inc_core import Dataset, QuantConfig
from inc_tf._keras_model import KerasGraph, as_input_list
from inc_tf._litert import Invoker, LiteRTModel, interpreter
from inc_tf.ptq._calibrate import TfCalibration
from inc_tf.ptq._quantize import describe_graph, layers_of_op

__all__ = ["layer_output_errors"]

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
