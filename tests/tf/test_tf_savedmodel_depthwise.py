"""The SavedModel int8 target on depthwise convolutions and ReLU6 (MobileNet blocks)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
import tf_testmodels as models

import inc_core as inc
from inc_tf import TFSavedModel


def _loaded_op_counts(path) -> dict[str, int]:
    graph_def = tf.saved_model.load(str(path)).signatures["serving_default"].graph.as_graph_def()
    counts: dict[str, int] = {}
    for node in [*graph_def.node, *(n for f in graph_def.library.function for n in f.node_def)]:
        counts[node.op] = counts.get(node.op, 0) + 1
    return counts


def _mobile_block_cnn() -> keras.Model:
    """conv+BN+ReLU6, a depthwise conv with a channel multiplier +BN+ReLU6, a linear 1x1 projection, trained on digits."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="stem")(inputs)
    h = keras.layers.ReLU(6.0, name="stem_relu")(keras.layers.BatchNormalization(name="stem_bn")(h))
    d = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, use_bias=False, name="depthwise")(h)
    d = keras.layers.ReLU(6.0, name="depthwise_relu")(keras.layers.BatchNormalization(name="depthwise_bn")(d))
    d = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", name="depthwise_s2")(d)
    d = keras.layers.Conv2D(24, 1, use_bias=False, name="project")(keras.layers.ReLU(6.0)(d))
    d = keras.layers.BatchNormalization(name="project_bn")(d)
    h = keras.layers.GlobalAveragePooling2D()(d)
    model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(h), name="mobile_block_cnn")
    x_train, _, y_train, _ = models.digits()
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=20, batch_size=32, verbose=0)
    return model


def test_depthwise_convs_and_relu6_run_in_int8(digits, calib, tmp_path):
    x_test, y_test = digits[1], digits[3]
    model = _mobile_block_cnn()
    q = inc.quantize(model, inc.QuantConfig(format="savedmodel", calib_samples=128), dataset=calib)
    assert sorted(q.int8_layers()) == ["depthwise", "depthwise_s2", "logits", "project", "stem"]
    counts = q.op_counts()
    assert counts.get("_FusedQuantizedDepthwiseConv2D") == 2 and counts.get("_FusedQuantizedConv2D") == 2, counts
    # BN folded into the kernels, every ReLU6 fused (the kernel's Relu with its output range capped at 6)
    assert "DepthwiseConv2dNative" not in counts and "Relu6" not in counts and "FusedBatchNormV3" not in counts, counts
    space = inc.get_backend("tf").describe(model, inc.QuantConfig(format="savedmodel"))
    assert {op.name: op.op_type for op in space.ops}["depthwise"] == "DepthwiseConv2D"
    path = inc.save(q, tmp_path / "mobile.savedmodel")
    assert _loaded_op_counts(path).get("_FusedQuantizedDepthwiseConv2D") == 2
    fp32 = models.accuracy(model, x_test, y_test)
    int8 = models.accuracy(inc.load(path), x_test, y_test)
    assert fp32 > 0.9 and int8 >= fp32 - 0.01, f"int8 {int8:.4f} vs FP32 {fp32:.4f}"


def test_excluding_depthwise_convs_keeps_them_float(calib):
    model = _mobile_block_cnn()
    config = inc.QuantConfig(format="savedmodel", calib_samples=64, exclude=inc.LayerFilter(types=("DepthwiseConv2D",)))
    q = inc.quantize(model, config, dataset=calib)
    counts = q.op_counts()
    assert counts.get("DepthwiseConv2dNative") == 2 and "_FusedQuantizedDepthwiseConv2D" not in counts, counts
    assert sorted(q.int8_layers()) == ["logits", "project", "stem"]


def test_mobilenet_v2_int8_in_the_saved_graph(tmp_path):
    """keras.applications.MobileNetV2 (alpha 0.35, 96x96, random weights, batch-norm statistics from one batch)."""
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(
        input_shape=(96, 96, 3), alpha=0.35, weights=None, classes=10, classifier_activation=None
    )
    norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:  # the initial statistics (mean 0, variance 1) shrink activations layer after layer
        layer.momentum = 0.0
    rng = np.random.default_rng(1)
    model(rng.normal(size=(16, 96, 96, 3)).astype(np.float32), training=True)
    x = rng.normal(size=(40, 96, 96, 3)).astype(np.float32)
    q = inc.quantize(model, inc.QuantConfig(format="savedmodel", calib_samples=32), dataset=inc.Dataset(x[:32], batch_size=8))
    assert isinstance(q, TFSavedModel)
    counts = _loaded_op_counts(inc.save(q, tmp_path / "mobilenet_v2.savedmodel"))
    assert counts.get("_FusedQuantizedDepthwiseConv2D") == 17 and counts.get("_FusedQuantizedConv2D") == 35, counts
    assert "DepthwiseConv2dNative" not in counts and "Conv2D" not in counts and "Relu6" not in counts, counts
    # 52 int8 convs in a row on a net whose weights are random: logits cosine 0.90 measured (AMD EPYC)
    out, ref = q(x[32:]), np.asarray(model(x[32:]))
    cosines = np.sum(out * ref, 1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
    assert cosines.mean() >= 0.8, cosines
