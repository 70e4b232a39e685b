"""Quantize an ONNX model with onnx-neural-compressor, the ONNX Runtime peer in ``benchmarks/onnx_bench.py``.

onnx-neural-compressor 1.0 requires numpy<2, so it lives in a virtual environment of its own and this
script is the whole of its part in the benchmark: it reads an FP32 ``.onnx`` file (and, for static
quantization, an ``.npz`` of calibration batches), writes the INT8 ``.onnx`` file, and writes a JSON
report of the settings it used. It imports nothing from this repository.

Settings (the library's recommendations for x86-64 CPUs, ``docs/quantization.md`` of onnx/neural-compressor):

- ``static``: ``StaticQuantConfig`` with QOperator format (the library's default and its ResNet example's
  default), uint8 activations + int8 weights ("recommended for performance on x86-64 machines with AVX2
  and AVX512"), MinMax calibration, per-channel weights (the first candidate of the library's own tuning
  space, ``StaticQuantConfig.get_config_set_for_tuning``), reduce_range off (the CPU has VNNI);
- ``dynamic``: ``DynamicQuantConfig()`` with its defaults (int8 weights, per-tensor, uint8 activations).

``quantize`` first applies ORT's basic graph optimizations (constant folding, ...) as the library does by default.

    python onnx_neural_compressor_quantize.py static --model fp32.onnx --calib calib.npz --output int8.onnx --report r.json
    python onnx_neural_compressor_quantize.py dynamic --model fp32.onnx --output int8.onnx --report r.json

The ``.npz`` holds one array per model input, shaped ``(batches, batch, ...)``: batch ``i`` feeds
``{name: array[i]}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from onnx_neural_compressor import data_reader
from onnx_neural_compressor.quantization import CalibrationMethod, QuantFormat, QuantType, config, quantize
from onnx_neural_compressor.version import __version__


class _NpzReader(data_reader.CalibrationDataReader):
    """Calibration batches from the .npz written by the benchmark, replayable (the library rewinds)."""

    def __init__(self, path: Path) -> None:
        with np.load(path) as data:
            self._arrays = {name: data[name] for name in data.files}
        counts = {len(a) for a in self._arrays.values()}
        if len(counts) != 1:
            raise ValueError(f"{path}: every input needs the same number of batches, got {counts}")
        self._count = counts.pop()
        self._index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._index >= self._count:
            return None
        self._index += 1
        return {name: array[self._index - 1] for name, array in self._arrays.items()}

    def rewind(self) -> None:
        self._index = 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("approach", choices=["static", "dynamic"])
    parser.add_argument("--model", type=Path, required=True, help="FP32 .onnx file")
    parser.add_argument("--output", type=Path, required=True, help="where the INT8 .onnx file goes")
    parser.add_argument("--calib", type=Path, help=".npz of calibration batches (static only)")
    parser.add_argument("--report", type=Path, required=True, help="JSON file for the settings used")
    args = parser.parse_args()
    settings: dict[str, object]
    if args.approach == "static":
        if args.calib is None:
            parser.error("static quantization needs --calib (an .npz of calibration batches)")
        reader = _NpzReader(args.calib)
        settings = {
            "approach": "static", "quant_format": "QOperator", "activation_type": "QUInt8", "weight_type": "QInt8",
            "per_channel": True, "calibrate_method": "MinMax", "reduce_range": False,
            "calibration_batches": reader._count,
        }
        qconfig: config.BaseConfig = config.StaticQuantConfig(
            calibration_data_reader=reader,
            quant_format=QuantFormat.QOperator,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
            reduce_range=False,
            execution_provider="CPUExecutionProvider",
        )
    else:
        settings = {"approach": "dynamic", "config": "DynamicQuantConfig() defaults", "weight_type": "QInt8",
                    "per_channel": False, "activation_type": "QUInt8 (dynamic)", "reduce_range": False}
        qconfig = config.DynamicQuantConfig(execution_provider="CPUExecutionProvider")
    start = time.perf_counter()
    quantize(str(args.model), str(args.output), qconfig)
    settings["quantize_s"] = time.perf_counter() - start
    # The library's entry points call exit(0) without writing anything when no operator qualifies.
    if not args.output.is_file():
        print(f"onnx-neural-compressor wrote no model to {args.output}", file=sys.stderr)
        return 1
    settings["onnx_neural_compressor"] = __version__
    args.report.write_text(json.dumps(settings, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
