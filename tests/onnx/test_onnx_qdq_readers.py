"""Static QDQ keeps a QuantizeLinear/DequantizeLinear pair only where an INT8 kernel reads it.

The graph is a transformer block's shape on the digits features: a linear layer with a float bias Add, a
residual Add, a LayerNormalization (float in ORT's quantizers), and a second linear layer whose input is
the LayerNormalization's output, which the residual path reads too. ORT's QDQ quantizer would round the
first layer's output to 8 bits before the float bias Add and hand the rounded LayerNormalization output to
the residual Add as well; neither has an INT8 reader.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_testmodels as models
from onnx import TensorProto, helper, numpy_helper

import inc_core as inc

FEATURES = 64
# Ops whose ORT kernels read dequantized inputs directly (MatMulIntegerToFloat, QGemm, ...).
INT8_READERS = ("MatMul", "Gemm", "Conv")


def _block() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def init(name: str, shape: tuple[int, ...], scale: float) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, scale, size=shape).astype(np.float32), name)

    nodes = [
        helper.make_node("MatMul", ["pixels", "w1"], ["h"], name="dense1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="dense1_bias"),
        helper.make_node("Add", ["hb", "pixels"], ["res1"], name="residual1"),
        helper.make_node("LayerNormalization", ["res1", "gamma", "beta"], ["ln"], name="norm", axis=-1),
        helper.make_node("MatMul", ["ln", "w2"], ["g"], name="dense2"),
        helper.make_node("Add", ["g", "b2"], ["gb"], name="dense2_bias"),
        helper.make_node("Add", ["gb", "ln"], ["y"], name="residual2"),
    ]
    inits = [
        init("w1", (FEATURES, FEATURES), 0.2), init("b1", (FEATURES,), 0.1),
        numpy_helper.from_array(np.ones(FEATURES, np.float32), "gamma"), numpy_helper.from_array(np.zeros(FEATURES, np.float32), "beta"),
        init("w2", (FEATURES, FEATURES), 0.15), init("b2", (FEATURES,), 0.1),
    ]
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", FEATURES])], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)])
    model.ir_version = 8
    return model


def _pairs_without_int8_reader(model: onnx.ModelProto) -> list[str]:
    """Activations quantized (Q -> DQ) although no reader of the DequantizeLinear runs an INT8 kernel."""
    producers = {out: node for node in model.graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def int8_reader(node: onnx.NodeProto) -> bool:
        # Either an integer-kernel op, or a QDQ group: every output goes to QuantizeLinear only.
        return node.op_type in INT8_READERS or all(
            readers.get(out) and all(r.op_type == "QuantizeLinear" for r in readers[out]) for out in node.output
        )

    return [
        dq.input[0]
        for dq in model.graph.node
        if dq.op_type == "DequantizeLinear"
        and getattr(producers.get(dq.input[0]), "op_type", None) == "QuantizeLinear"
        and not any(int8_reader(r) for r in readers.get(dq.output[0], []))
    ]


def _float_readers_of_dequantized(model: onnx.ModelProto) -> list[str]:
    """Float ops (no INT8 kernel) that read a dequantized activation instead of the exact tensor."""
    producers = {out: node for node in model.graph.node for out in node.output}
    return [
        f"{node.name} <- {name}"
        for node in model.graph.node
        if node.op_type in ("LayerNormalization",) or node.name.startswith("residual") or node.name.endswith("_bias")
        for name in node.input
        if getattr(producers.get(name), "op_type", None) == "DequantizeLinear"
        and getattr(producers.get(producers[name].input[0]), "op_type", None) == "QuantizeLinear"
    ]


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return models.run(model, x)


def test_static_qdq_quantizes_only_what_int8_kernels_read(digits):
    x_train, x_test, _, _ = digits
    fp32 = _block()
    int8 = inc.quantize(fp32, inc.QuantConfig(format="qdq"), dataset=inc.Dataset(x_train[:256], batch_size=32))
    assert _pairs_without_int8_reader(int8) == []
    assert _float_readers_of_dequantized(int8) == []
    # Both linear layers still run INT8 kernels (ORT fuses MatMul + bias Add of a 2-D input into a QGemm
    # with float output).
    counts = inc.get_backend("onnx").int8_op_counts(int8)
    assert sum(counts.get(k, 0) for k in ("MatMulIntegerToFloat", "QLinearMatMul", "QGemm")) == 2, counts
    assert sum(n.op_type == "QuantizeLinear" for n in int8.graph.node) == 2  # the two MatMul inputs, nothing else
    # Only the MatMul inputs and weights are rounded: the outputs stay close to FP32.
    ref, got = _run(fp32, x_test), _run(int8, x_test)
    cosine = np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert cosine.min() >= 0.999, cosine.min()


def test_a_tensor_between_two_linear_layers_stays_quantized_and_the_output_does_not(digits):
    """x -> linear -> linear: the hidden tensor feeds an INT8 kernel and keeps its pair; the model output has none."""
    x_train, x_test, _, _ = digits
    fp32 = _block()
    graph = fp32.graph
    kept = [n for n in graph.node if n.name in ("dense1", "dense1_bias", "dense2", "dense2_bias")]
    kept[2].input[0] = "hb"  # dense2 reads the first layer's output directly
    kept[3].output[0] = "y"
    del graph.node[:]
    graph.node.extend(kept)
    int8 = inc.quantize(fp32, inc.QuantConfig(format="qdq"), dataset=inc.Dataset(x_train[:256], batch_size=32))
    assert _pairs_without_int8_reader(int8) == []
    producers = {out: node for node in int8.graph.node for out in node.output}
    quantized = sorted(n.input[0] for n in int8.graph.node if n.op_type == "QuantizeLinear")
    assert quantized == ["hb", "pixels"], quantized
    # The model output comes from the second layer itself, not from a DequantizeLinear.
    assert producers["y"].op_type in ("Gemm", "Add", "MatMul"), producers["y"].op_type
    counts = inc.get_backend("onnx").int8_op_counts(int8)
    assert sum(counts.get(k, 0) for k in ("MatMulIntegerToFloat", "QLinearMatMul", "QGemm")) == 2, counts
    ref, got = _run(fp32, x_test), _run(int8, x_test)
    cosine = np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert cosine.min() >= 0.999, cosine.min()


def test_a_conv_read_only_by_float_ops_keeps_its_output_pair_and_runs_int8(digits):
    """ORT has no Conv kernel with float output: dropping the pair after a Conv would leave it in float."""
    x_train, x_test, _, _ = digits
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Reshape", ["pixels", "image_shape"], ["image"], name="to_image"),
        helper.make_node("Conv", ["image", "kernel", "kernel_bias"], ["features"], name="conv", strides=[2, 2], kernel_shape=[2, 2]),
        helper.make_node("Softplus", ["features"], ["y"], name="head"),
    ]
    inits = [
        numpy_helper.from_array(np.array([-1, 1, 8, 8], np.int64), "image_shape"),
        numpy_helper.from_array(rng.normal(0, 0.2, size=(4, 1, 2, 2)).astype(np.float32), "kernel"),
        numpy_helper.from_array(rng.normal(0, 0.1, size=(4,)).astype(np.float32), "kernel_bias"),
    ]
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 4, 4])], initializer=inits,
    )
    fp32 = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)])
    fp32.ir_version = 8
    int8 = inc.quantize(fp32, inc.QuantConfig(format="qdq"), dataset=inc.Dataset(x_train[:256], batch_size=32))
    counts = inc.get_backend("onnx").int8_op_counts(int8)
    assert counts.get("QLinearConv", 0) == 1, counts
    ref, got = _run(fp32, x_test), _run(int8, x_test)
    ref, got = ref.reshape(len(ref), -1), got.reshape(len(got), -1)
    cosine = np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert cosine.min() >= 0.99, cosine.min()


def _attention() -> onnx.ModelProto:
    """Digits rows as 8 tokens of 8 features: scores = (x Wq)(x Wk)^T, Softmax, context = probs x."""
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Reshape", ["pixels", "tokens_shape"], ["tokens"], name="to_tokens"),
        helper.make_node("MatMul", ["tokens", "wq"], ["q"], name="query"),
        helper.make_node("MatMul", ["tokens", "wk"], ["k"], name="key"),
        helper.make_node("Transpose", ["k"], ["kt"], name="key_t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
        helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "tokens"], ["y"], name="context"),
    ]
    inits = [
        numpy_helper.from_array(np.array([-1, 8, 8], np.int64), "tokens_shape"),
        numpy_helper.from_array(rng.normal(0, 0.05, size=(8, 8)).astype(np.float32), "wq"),
        numpy_helper.from_array(rng.normal(0, 0.05, size=(8, 8)).astype(np.float32), "wk"),
    ]
    graph = helper.make_graph(
        nodes, "attention", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 8])], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)])
    model.ir_version = 8
    return model


def test_an_excluded_softmax_reads_the_exact_scores_and_is_not_fused_back_into_int8(digits):
    x_train, x_test, _, _ = digits
    fp32 = _attention()
    data = inc.Dataset(x_train[:256], batch_size=32)
    assert "softmax" in inc.describe(fp32, inc.QuantConfig(format="qdq")).names
    onnx_backend = inc.get_backend("onnx")
    plain = inc.quantize(fp32, inc.QuantConfig(format="qdq"), dataset=data)
    assert onnx_backend.int8_op_counts(plain).get("QLinearSoftmax", 0) == 1  # what exclusion has to undo
    kept = inc.quantize(fp32, inc.QuantConfig(format="qdq", exclude=inc.LayerFilter(names=("softmax",))), dataset=data)
    producers = {out: node for node in kept.graph.node for out in node.output}
    softmax = next(n for n in kept.graph.node if n.name == "softmax")
    assert producers[softmax.input[0]].op_type == "MatMul"  # the exact scores, no DequantizeLinear in between
    counts = onnx_backend.int8_op_counts(kept)
    assert counts.get("QLinearSoftmax", 0) == 0, counts
    assert sum(counts.get(k, 0) for k in ("MatMulIntegerToFloat", "QLinearMatMul")) >= 1, counts
    ref, got = _run(fp32, x_test), _run(kept, x_test)
    ref, got = ref.reshape(len(ref), -1), got.reshape(len(got), -1)
    cosine = np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert cosine.min() >= 0.99, cosine.min()


def test_a_relu_folded_into_its_quantize_pair_still_applies_when_a_float_op_reads_it(digits):
    """ResNet's last block: Add -> Relu -> global average pool. ORT's quantizer drops the Relu (the uint8
    QuantizeLinear after it clips at zero anyway); the pair that does its work must stay for the float reader."""
    x_train, x_test, _, _ = digits
    rng = np.random.default_rng(3)
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Reshape", ["pixels", "image_shape"], ["image"], name="to_image"),
        helper.make_node("Conv", ["image", "k1", "b1"], ["f1"], name="conv1", **conv),
        helper.make_node("Conv", ["image", "k2", "b2"], ["f2"], name="conv2", **conv),
        helper.make_node("Add", ["f1", "f2"], ["sum"], name="residual"),
        helper.make_node("Relu", ["sum"], ["act"], name="relu"),
        helper.make_node("ReduceMean", ["act"], ["y"], name="pool", axes=[2, 3], keepdims=0),
    ]
    inits = [
        numpy_helper.from_array(np.array([-1, 1, 8, 8], np.int64), "image_shape"),
        numpy_helper.from_array(rng.normal(0, 0.3, size=(8, 1, 3, 3)).astype(np.float32), "k1"),
        numpy_helper.from_array(np.full(8, -0.3, np.float32), "b1"),  # about half of the sums are negative
        numpy_helper.from_array(rng.normal(0, 0.3, size=(8, 1, 3, 3)).astype(np.float32), "k2"),
        numpy_helper.from_array(np.full(8, -0.3, np.float32), "b2"),
    ]
    graph = helper.make_graph(
        nodes, "resnet_tail", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], initializer=inits,
    )
    fp32 = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    fp32.ir_version = 8
    int8 = inc.quantize(fp32, inc.QuantConfig(format="qdq"), dataset=inc.Dataset(x_train[:256], batch_size=32))
    assert "Relu" not in {n.op_type for n in int8.graph.node}  # what ORT's quantizer did: the pair clips instead
    pool = next(n for n in int8.graph.node if n.name == "pool")
    producers = {out: node for node in int8.graph.node for out in node.output}
    assert producers[pool.input[0]].op_type == "DequantizeLinear"
    assert inc.get_backend("onnx").int8_op_counts(int8).get("QLinearConv", 0) == 2
    ref, got = _run(fp32, x_test), _run(int8, x_test)
    assert got.min() >= 0.0, got.min()  # a mean of Relu outputs
    cosine = np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert cosine.min() >= 0.99, cosine.min()


def test_op_errors_of_a_qoperator_config_count_the_uint8_output_of_a_residual_add(digits):
    """QOperator runs the residual Add as QLinearAdd, writing uint8 that the float LayerNormalization reads;
    static QDQ leaves that Add in float. The mse strategy's ranking has to see the difference."""
    x_train, _, _, _ = digits
    backend = inc.get_backend("onnx")
    data = inc.Dataset(x_train[:256], batch_size=32)
    qoperator = backend.op_errors(_block(), inc.QuantConfig(format="qoperator"), calibration=None, dataset=data)
    qdq = backend.op_errors(_block(), inc.QuantConfig(format="qdq"), calibration=None, dataset=data)
    assert set(qoperator) == set(inc.describe(_block(), inc.QuantConfig(format="qoperator")).names)
    assert qoperator["residual1"] > 1e-6, qoperator
    assert qdq["residual1"] == 0.0, qdq  # read by a float op only: no pair, no rounding
