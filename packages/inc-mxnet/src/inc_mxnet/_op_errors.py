"""Per-layer output error of a quantization config, for the ``mse`` tuning strategy.

Each quantized layer's output is read in the INT8 graph itself (oneDNN's real kernels): a quantized
node yields (int8/uint8 data, min, max), dequantized here as MXNet does (symmetric, zero point 0).
The error of a layer is the mean squared difference of its output, INT8 vs the fused FP32 graph,
divided by the mean square of the FP32 output, so layers of very different scales compare.
"""

from __future__ import annotations

from typing import Any

import mxnet as mx
import numpy as np

from inc_core import Dataset, QuantConfig
from inc_core.errors import DatasetError
from inc_mxnet._blocks import symbol_block, to_ndarrays
from inc_mxnet._collect import MxnetCalibration
from inc_mxnet._graph import Layer, Prepared
from inc_mxnet._quantize import quantize_prepared

__all__ = ["op_output_errors"]


def _quantized_outputs(symbol: mx.sym.Symbol, layers: tuple[Layer, ...]) -> dict[str, list[str]]:
    """Per layer, the INT8 graph's output names of its quantized node: [data, min, max], or [fp32 data]."""
    names = symbol.get_internals().list_outputs()
    out: dict[str, list[str]] = {}
    for layer in layers:
        prefix = f"quantized_{layer.node}_"
        found = [n for n in names if n.startswith(prefix)]
        if len(found) in (1, 3):
            out[layer.name] = found
    return out


def _dequantize(data: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    levels = 127.0 if data.dtype == np.int8 else 255.0
    scale = max(abs(float(low.ravel()[0])), abs(float(high.ravel()[0]))) / levels
    return data.astype(np.float64) * scale


def op_output_errors(
    prepared: Prepared, config: QuantConfig, calibration: MxnetCalibration | None, dataset: Dataset
) -> dict[str, float]:
    """Relative output MSE per quantized layer (0.0 for layers the config keeps in FP32)."""
    quantized = quantize_prepared(prepared, config, calibration)
    qsym = quantized._cached_graph[1]
    watched = _quantized_outputs(qsym, prepared.layers)
    q_internals = qsym.get_internals()
    q_names = [n for names in watched.values() for n in names]
    params = {name: p.data(mx.cpu()) for name, p in quantized.collect_params().items()}
    int8 = symbol_block(mx.sym.Group([q_internals[n] for n in q_names]), prepared.inputs, params)
    f_internals = prepared.fused.get_internals()
    f_names = [prepared.layer(name).output for name in watched]
    fp32 = symbol_block(mx.sym.Group([f_internals[n] for n in f_names]), prepared.inputs, prepared.params)
    diff = dict.fromkeys(watched, 0.0)
    norm = dict.fromkeys(watched, 0.0)
    for index, batch in enumerate(dataset.inputs(limit=config.calib_samples)):
        arrays = to_ndarrays(batch, prepared.inputs, where=f"op-error batch {index}")
        try:
            q_values = dict(zip(q_names, (o.asnumpy() for o in _as_list(int8(*arrays)))))
            f_values = [o.asnumpy() for o in _as_list(fp32(*arrays))]
        except mx.base.MXNetError as exc:
            raise DatasetError(f"op-error batch {index}: MXNet could not run the block on it: {str(exc).splitlines()[0]}") from exc
        for (name, names), reference in zip(watched.items(), f_values):
            got = q_values[names[0]]
            if len(names) == 3:
                got = _dequantize(got, q_values[names[1]], q_values[names[2]])
            diff[name] += float(np.sum((got.astype(np.float64) - reference) ** 2))
            norm[name] += float(np.sum(reference.astype(np.float64) ** 2))
    errors = {name: diff[name] / norm[name] if norm[name] > 0 else 0.0 for name in watched}
    return {layer.name: errors.get(layer.name, 0.0) for layer in prepared.layers}


def _as_list(outputs: Any) -> list[Any]:
    return [outputs] if isinstance(outputs, mx.nd.NDArray) else list(outputs)
