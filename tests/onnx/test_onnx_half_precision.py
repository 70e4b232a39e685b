"""Float16 ONNX models (as exported for GPUs) quantize to INT8 kernels and keep their input/output types.

The models are made float16 the way users do it, with onnxconverter-common's ``convert_float_to_float16``:
with ``keep_io_types=False`` the whole graph, inputs and outputs included, is float16; with ``True`` the graph
is float16 behind float32 inputs and outputs (a Cast at each end).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_testmodels as models
import onnxruntime as ort
import pytest
from conftest import sha256
from onnxconverter_common import float16

import inc_core as inc

CONFIGS = {
    "qdq": inc.QuantConfig(),
    "qoperator": inc.QuantConfig(format="qoperator"),
    "dynamic": inc.QuantConfig(approach="dynamic"),
}
# What carries the cnn's two convolutions and its Gemm head in each INT8 form (as ONNX Runtime runs it).
CONV_KERNELS = {"qdq": "QLinearConv", "qoperator": "QLinearConv", "dynamic": "ConvInteger"}


def _half(keep_io_types: bool) -> onnx.ModelProto:
    return float16.convert_float_to_float16(models.cnn(), keep_io_types=keep_io_types)


def _io_types(model: onnx.ModelProto) -> list[int]:
    return [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)]


def _logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixels": x})[0]


@pytest.mark.parametrize("keep_io_types", [False, True], ids=["float16_io", "float32_io"])
@pytest.mark.parametrize("form", sorted(CONFIGS))
def test_float16_model_gets_int8_kernels_and_keeps_its_io_types(
    form: str, keep_io_types: bool, digits: tuple[np.ndarray, ...], tmp_path: Path
) -> None:
    x_train, x_test, _, y_test = digits
    half = _half(keep_io_types)
    io_dtype = np.float32 if keep_io_types else np.float16
    path = tmp_path / "cnn16.onnx"
    onnx.save_model(half, str(path))
    before = sha256(path)

    quantized = inc.quantize(path, CONFIGS[form], dataset=inc.Dataset({"pixels": x_train[:256].astype(io_dtype)}, batch_size=32))

    # Before, QDQ put a Cast between each DequantizeLinear and its Conv/Gemm (no INT8 kernel fused: 0 convs),
    # QOperator failed on the first Conv and dynamic found nothing to quantize.
    counts = inc.get_backend("onnx").int8_op_counts(quantized)
    assert counts.get(CONV_KERNELS[form]) == 2, counts
    assert counts.get("QGemm", 0) + counts.get("DynamicQuantizeMatMul", 0) + counts.get("MatMulInteger", 0) == 1, counts
    # The INT8 model is fed and read like the user's model.
    assert _io_types(quantized) == _io_types(half)
    saved = tmp_path / "cnn16.int8.onnx"
    inc.save(quantized, saved)
    logits = _logits(onnx.load(str(saved)), x_test.astype(io_dtype))
    assert logits.dtype == io_dtype
    reference = _logits(half, x_test.astype(io_dtype))
    int8_accuracy = float(np.mean(logits.argmax(axis=1) == y_test))
    half_accuracy = float(np.mean(reference.argmax(axis=1) == y_test))
    assert half_accuracy > 0.9
    assert int8_accuracy >= half_accuracy - 0.01, (int8_accuracy, half_accuracy)
    assert sha256(path) == before, "the user's model file was modified"


def test_float16_model_lists_its_convolutions_and_leaves_the_given_proto_alone() -> None:
    half = _half(keep_io_types=False)
    given = half.SerializeToString()

    names = {(op.name, op.op_type) for op in inc.describe(half, inc.QuantConfig(approach="dynamic")).ops}

    assert {("conv1", "Conv"), ("conv2", "Conv"), ("fc", "Gemm")} <= names
    assert half.SerializeToString() == given


def test_float16_model_excluding_a_conv_keeps_it_float(digits: tuple[np.ndarray, ...]) -> None:
    x_train = digits[0]
    half = _half(keep_io_types=False)
    config = inc.QuantConfig(exclude=inc.LayerFilter(names=("conv2",)))

    quantized = inc.quantize(half, config, dataset=inc.Dataset({"pixels": x_train[:128].astype(np.float16)}, batch_size=32))

    counts = inc.get_backend("onnx").int8_op_counts(quantized)
    assert counts.get("QLinearConv") == 1, counts
    conv2 = next(n for n in quantized.graph.node if n.name == "conv2")
    assert conv2.op_type == "Conv"
