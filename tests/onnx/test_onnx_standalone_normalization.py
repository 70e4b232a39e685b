"""A BatchNormalization that is not folded into a Conv stays float in static INT8.

The model: what a torch tabular net with ``nn.BatchNorm1d`` as its first layer exports to, BatchNormalization ->
Gemm -> Relu -> Gemm, with the batch-norm statistics of scikit-learn's breast-cancer features (whose scales run
from 0.001 to 4,000) and a scikit-learn MLP trained on the standardised features as its two Gemms. ORT's QDQ
quantizer wrapped the BatchNormalization, rounding the raw features and the per-feature scales to 8 bits with one
scale each, though no CPU kernel runs it in INT8 (accuracy 0.953 -> 0.784).
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

import inc_core as inc


@functools.cache
def _model_and_data() -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_breast_cancer(return_X_y=True)
    x = x.astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    mean, var = x_train.mean(0), x_train.var(0)
    mlp = MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=0)
    mlp.fit((x_train - mean) / np.sqrt(var + 1e-5), y_train)
    (w1, w2), (b1, b2) = mlp.coefs_, mlp.intercepts_
    w2, b2 = np.concatenate([-w2, w2], axis=1), np.concatenate([-b2, b2])  # one logit -> two, as torch would have
    arrays = {
        "bn.scale": np.ones(30), "bn.bias": np.zeros(30), "bn.mean": mean, "bn.var": var,
        "fc1.weight": w1.T, "fc1.bias": b1, "fc2.weight": w2.T, "fc2.bias": b2,
    }
    graph = helper.make_graph(
        [
            helper.make_node("BatchNormalization", ["x", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["std"], name="bn"),
            helper.make_node("Gemm", ["std", "fc1.weight", "fc1.bias"], ["h"], name="fc1", transB=1),
            helper.make_node("Relu", ["h"], ["hr"], name="relu"),
            helper.make_node("Gemm", ["hr", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1),
        ],
        "tabular",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 30])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [None, 2])],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), name) for name, v in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString(), x_train, x_test, y_test


def _logits(model: bytes | onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    raw = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(raw, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_standalone_batch_norm_stays_float_and_accuracy_holds(fmt: str, tmp_path) -> None:
    content, x_train, x_test, y_test = _model_and_data()
    path = tmp_path / "tabular.onnx"
    path.write_bytes(content)
    fp32_accuracy = float(np.mean(_logits(content, x_test).argmax(1) == y_test))
    config = inc.QuantConfig(format=fmt)
    assert [op.op_type for op in inc.describe(str(path), config).ops] == ["Gemm", "Gemm"]
    quantized = inc.quantize(str(path), config, dataset=inc.Dataset(x_train[:256], batch_size=32))
    reads_x = [node.op_type for node in quantized.graph.node if "x" in node.input]
    assert reads_x == ["BatchNormalization"], reads_x  # the raw features are not rounded to 8 bits
    assert inc.get_backend("onnx").int8_op_counts(quantized)  # the Gemms run in INT8
    accuracy = float(np.mean(_logits(quantized, x_test).argmax(1) == y_test))
    assert fp32_accuracy >= 0.94 and accuracy >= fp32_accuracy - 0.01, (fp32_accuracy, accuracy)
