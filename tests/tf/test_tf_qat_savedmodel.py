"""QAT converted to the SavedModel int8 target: TF's oneDNN kernels running the ranges fake quant learned."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_testmodels as models

import inc_core as inc
import inc_tf
from inc_core.errors import ConfigError
from inc_tf import TFSavedModel

INT8_KERNELS = ("_FusedQuantizedConv2D", "QuantizedMatMulWithBiasAndReluAndRequantize", "QuantizedMatMulWithBiasAndDequantize")


@pytest.fixture(scope="module")
def trained_qat(digits):
    x_train, _, y_train, _ = digits
    qat = inc_tf.prepare_qat(models.cnn(), inc.QATConfig(freeze_observer_step=60, freeze_bn_step=80))
    qat.compile(keras.optimizers.Adam(5e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x_train, y_train, epochs=3, batch_size=32, verbose=0, callbacks=[inc_tf.QATCallback()])
    return qat


def _loaded_nodes(path) -> list:
    """Every node of the serving signature as tf.saved_model.load returns it, function bodies included."""
    graph_def = tf.saved_model.load(str(path)).signatures["serving_default"].graph.as_graph_def()
    return [*graph_def.node, *(n for f in graph_def.library.function for n in f.node_def)]


def test_savedmodel_target_runs_int8_kernels_with_the_learned_ranges(trained_qat, digits, tmp_path):
    _, x_test, _, y_test = digits
    int8 = inc_tf.convert(trained_qat, format="savedmodel")
    assert isinstance(int8, TFSavedModel)
    assert sorted(int8.int8_layers()) == ["conv1", "conv2", "fc1", "logits"]
    path = inc.save(int8, tmp_path / "qat.savedmodel")

    nodes = _loaded_nodes(path)
    ops = [n.op for n in nodes]
    assert ops.count("QuantizeV2") >= 1
    assert ops.count("_FusedQuantizedConv2D") + ops.count("QuantizedConv2DWithBiasAndReluAndRequantize") >= 2, ops
    assert sum(ops.count(k) for k in INT8_KERNELS if "MatMul" in k) >= 2, ops

    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    (logits,) = serve(tf.constant(x_test)).values()
    served = float(np.mean(np.argmax(logits.numpy(), axis=1) == y_test))
    fake_quant = models.accuracy(trained_qat, x_test, y_test)
    assert served >= fake_quant - 0.01, f"QAT fake quant {fake_quant:.4f} vs SavedModel int8 {served:.4f}"

    # conv1's input is quantized with the range the first wrapper learned, not one observed at conversion.
    consts = {n.name: tf.make_ndarray(n.attr["value"].tensor) for n in nodes if n.op == "Const"}
    # The graph scopes layers by index; the model maps each int8 kernel node back to its Keras layer.
    (kernel,) = [node for node, layer in int8.layer_names.items() if layer == "conv1"]
    unit = kernel.split("/inc_int8/")[0].removeprefix("inc/")
    (quantize,) = [n for n in nodes if n.op == "QuantizeV2" and n.name.endswith(f"{unit}/inc_int8/quantize")]
    low, high = (float(consts[ref.split(":")[0]]) for ref in quantize.input[1:3])
    learned_low, learned_high = trained_qat.get_layer("conv1").learned_input_range()
    assert learned_low == 0.0 and low == 0.0
    assert high == pytest.approx(learned_high, rel=1e-6)
    # ... and its int8 output (BN and ReLU folded in) with relu1's learned range.
    (output_max,) = [v for name, v in consts.items() if name.endswith(f"{unit}/inc_int8/output_max")]
    assert float(output_max) == pytest.approx(trained_qat.get_layer("relu1").learned_range()[1], rel=1e-6)


def test_convert_rejects_an_unknown_format(trained_qat):
    with pytest.raises(ConfigError, match=r"\['tflite', 'savedmodel'\]"):
        inc_tf.convert(trained_qat, format="onnx")
