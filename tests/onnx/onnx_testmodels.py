"""Small real ONNX models for the tests, trained on scikit-learn's digits and written with onnx.helper."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

OPSET = 17


@functools.cache
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, x_test, y_train, y_test): 8x8 digit images scaled to [0, 1], float32, flat."""
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, data.target, test_size=0.3, random_state=0, stratify=data.target)
    return x_train, x_test, y_train, y_test


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name)


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], inp: onnx.ValueInfoProto, out: onnx.ValueInfoProto) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "digits", [inp], [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="inc-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@functools.cache
def _mlp_bytes() -> bytes:
    x_train, _, y_train, _ = digits()
    clf = MLPClassifier(hidden_layer_sizes=(96, 48), max_iter=400, random_state=0, alpha=1e-3)
    clf.fit(x_train, y_train)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    current = "pixels"
    layers = len(clf.coefs_)
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_)):
        inits += [_init(f"fc{i}.weight", w), _init(f"fc{i}.bias", b)]
        nodes.append(helper.make_node("MatMul", [current, f"fc{i}.weight"], [f"fc{i}.mm"], name=f"fc{i}"))
        last = i == layers - 1
        add_out = "logits" if last else f"fc{i}.out"
        nodes.append(helper.make_node("Add", [f"fc{i}.mm", f"fc{i}.bias"], [add_out], name=f"fc{i}.add"))
        if not last:
            nodes.append(helper.make_node("Relu", [add_out], [f"relu{i}"], name=f"relu{i}"))
            current = f"relu{i}"
    inp = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])
    return _model(nodes, inits, inp, out).SerializeToString()


def mlp() -> onnx.ModelProto:
    """A 64-96-48-10 MLP (MatMul + Add + Relu) trained on digits; input ``pixels`` [batch, 64]."""
    return onnx.load_from_string(_mlp_bytes())


def _conv_features(channels: int, rng: np.random.Generator) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Conv-Relu-Conv-Relu-MaxPool-Flatten on a [batch, 1, 8, 8] image, He-initialized filters."""
    w1 = rng.normal(0, np.sqrt(2 / 9), size=(channels, 1, 3, 3))
    w2 = rng.normal(0, np.sqrt(2 / (9 * channels)), size=(channels, channels, 3, 3))
    inits = [
        _init("conv1.weight", w1), _init("conv1.bias", rng.normal(0, 0.05, channels)),
        _init("conv2.weight", w2), _init("conv2.bias", rng.normal(0, 0.05, channels)),
        numpy_helper.from_array(np.array([-1, 1, 8, 8], dtype=np.int64), "image_shape"),
    ]
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Reshape", ["pixels", "image_shape"], ["image"], name="to_image"),
        helper.make_node("Conv", ["image", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", **conv),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2", **conv),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p2"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["features"], name="flatten"),
    ]
    return nodes, inits


def _with_trained_head(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], features: int) -> bytes:
    """A fixed feature extractor (``pixels`` -> ``features``) with a logistic-regression head (Gemm) fitted on its
    digits features; the serialized model."""
    inp = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])
    feat = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", features])
    extractor = _model(nodes, inits, inp, feat)
    x_train, _, y_train, _ = digits()
    session = ort.InferenceSession(extractor.SerializeToString(), providers=["CPUExecutionProvider"])
    clf = LogisticRegression(max_iter=2000, C=0.5).fit(session.run(None, {"pixels": x_train})[0], y_train)
    inits = [*inits, _init("fc.weight", clf.coef_), _init("fc.bias", clf.intercept_)]
    nodes = [*nodes, helper.make_node("Gemm", ["features", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1)]
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])
    return _model(nodes, inits, inp, out).SerializeToString()


@functools.cache
def _cnn_bytes() -> bytes:
    channels = 16
    return _with_trained_head(*_conv_features(channels, np.random.default_rng(0)), channels * 16)


def cnn() -> onnx.ModelProto:
    """Conv feature extractor + logistic-regression head (Gemm) trained on digits; input ``pixels`` [batch, 64]."""
    return onnx.load_from_string(_cnn_bytes())


def _decoder_features(rng: np.random.Generator) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """A U-Net-shaped extractor on a [batch, 1, 8, 8] image: Conv-Relu, a stride-2 Conv down to 4x4, a U-Net
    up-sampling ConvTranspose (kernel 2, stride 2) concatenated with the first Conv's output, a DCGAN-style
    ConvTranspose (kernel 4, stride 2, padding 1) + Relu up to 16x16, MaxPool, Flatten. He-initialized filters."""

    def he(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return rng.normal(0, np.sqrt(2 / fan_in), size=shape)

    inits = [
        _init("enc.weight", he((16, 1, 3, 3), 9)), _init("enc.bias", rng.normal(0, 0.05, 16)),
        _init("down.weight", he((32, 16, 3, 3), 144)), _init("down.bias", rng.normal(0, 0.05, 32)),
        _init("up.weight", he((32, 16, 2, 2), 32)), _init("up.bias", rng.normal(0, 0.05, 16)),
        _init("up2.weight", he((32, 8, 4, 4), 32 * 4)),
        numpy_helper.from_array(np.array([-1, 1, 8, 8], dtype=np.int64), "image_shape"),
    ]
    node = helper.make_node
    nodes = [
        node("Reshape", ["pixels", "image_shape"], ["image"], name="to_image"),
        node("Conv", ["image", "enc.weight", "enc.bias"], ["e"], name="enc", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        node("Relu", ["e"], ["skip"], name="enc_relu"),
        node("Conv", ["skip", "down.weight", "down.bias"], ["d"], name="down", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        node("Relu", ["d"], ["dr"], name="down_relu"),
        node("ConvTranspose", ["dr", "up.weight", "up.bias"], ["u"], name="up", kernel_shape=[2, 2], strides=[2, 2]),
        node("Concat", ["u", "skip"], ["cat"], name="cat", axis=1),
        node("ConvTranspose", ["cat", "up2.weight"], ["u2"], name="up2", kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1]),
        node("Relu", ["u2"], ["u2r"], name="up2_relu"),
        node("MaxPool", ["u2r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        node("Flatten", ["p"], ["features"], name="flatten"),
    ]
    return nodes, inits


@functools.cache
def _decoder_bytes() -> bytes:
    return _with_trained_head(*_decoder_features(np.random.default_rng(1)), 8 * 8 * 8)


def decoder() -> onnx.ModelProto:
    """:func:`_decoder_features` (two ConvTranspose) + logistic-regression head trained on digits; input ``pixels``."""
    return onnx.load_from_string(_decoder_bytes())


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"pixels": x})[0]
    return float(np.mean(np.argmax(logits, axis=1) == y))


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixels": np.asarray(x, dtype=np.float32)})[0]


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def int8_initializers(model: onnx.ModelProto) -> list[str]:
    return [i.name for i in model.graph.initializer if i.data_type in (TensorProto.INT8, TensorProto.UINT8)]


def attention_block() -> onnx.ModelProto:
    """Token embedding, Q/K/V projections, scores (activation x activation), softmax, context, output projection."""
    rng = np.random.default_rng(9)
    vocab, hidden = 50, 16

    def weight(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.normal(0, 1, shape) / np.sqrt(shape[0])).astype(np.float32), name)

    inits = [weight("embedding", (vocab, hidden)), *(weight(f"w{p}", (hidden, hidden)) for p in "qkvo")]
    inits.append(numpy_helper.from_array(np.array(1 / np.sqrt(hidden), np.float32), "scale"))
    nodes = [
        helper.make_node("Gather", ["embedding", "ids"], ["h"], name="embed"),
        helper.make_node("MatMul", ["h", "wq"], ["q"], name="query"),
        helper.make_node("MatMul", ["h", "wk"], ["k"], name="key"),
        helper.make_node("MatMul", ["h", "wv"], ["v"], name="value"),
        helper.make_node("Transpose", ["k"], ["kt"], name="key_t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
        helper.make_node("Mul", ["s", "scale"], ["ss"], name="scale_scores"),
        helper.make_node("Softmax", ["ss"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["c"], name="context"),
        helper.make_node("MatMul", ["c", "wo"], ["y"], name="output"),
    ]
    graph = helper.make_graph(
        nodes, "attention",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", hidden])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="inc-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def static_encoder_block(batch: int = 2, seq: int = 8, hidden: int = 16) -> onnx.ModelProto:
    """One post-norm encoder layer with fixed input shape, as the dynamo exporter writes a model exported
    without dynamic shapes: LayerNorm, Q/K/V projections with bias Adds, attention, an output projection
    whose bias Add feeds the residual, a second LayerNorm and a feed-forward projection."""
    rng = np.random.default_rng(3)

    def weight(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.normal(0, 1, shape) / np.sqrt(shape[0])).astype(np.float32), name)

    inits = [weight(f"w{p}", (hidden, hidden)) for p in "qkvo"] + [weight(f"b{p}", (hidden,)) for p in "qkvo"]
    inits += [
        weight("w_ffn", (hidden, 4 * hidden)), weight("b_ffn", (4 * hidden,)),
        numpy_helper.from_array(np.ones(hidden, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(hidden, np.float32), "beta"),
        numpy_helper.from_array(np.array(1 / np.sqrt(hidden), np.float32), "scale"),
    ]
    node = helper.make_node
    nodes = [node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1)]
    for p in "qkv":
        nodes += [node("MatMul", ["ln", f"w{p}"], [f"{p}_mm"], name=f"{p}_proj"),
                  node("Add", [f"{p}_mm", f"b{p}"], [p], name=f"{p}_bias")]
    nodes += [
        node("Transpose", ["k"], ["kt"], name="key_t", perm=[0, 2, 1]),
        node("MatMul", ["q", "kt"], ["s"], name="scores"),
        node("Mul", ["s", "scale"], ["ss"], name="scale_scores"),
        node("Softmax", ["ss"], ["p"], name="softmax", axis=-1),
        node("MatMul", ["p", "v"], ["c"], name="context"),
        node("MatMul", ["c", "wo"], ["o_mm"], name="o_proj"),
        node("Add", ["o_mm", "bo"], ["o"], name="o_bias"),
        node("Add", ["ln", "o"], ["r"], name="residual"),
        node("LayerNormalization", ["r", "gamma", "beta"], ["ln2"], name="ln2", axis=-1),
        node("MatMul", ["ln2", "w_ffn"], ["f_mm"], name="ffn"),
        node("Add", ["f_mm", "b_ffn"], ["y"], name="ffn_bias"),
    ]
    graph = helper.make_graph(
        nodes, "encoder_layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, seq, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, seq, 4 * hidden])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="inc-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
