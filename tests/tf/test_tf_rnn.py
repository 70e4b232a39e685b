"""Keras recurrent models (LSTM, GRU, SimpleRNN, Bidirectional) through LiteRT INT8: digits rows as 8-step sequences.

Keras 3 runs an RNN as a while loop the LiteRT converter cannot lower with a free batch size; inc unrolls it over
its fixed number of time steps while converting, so every gate MatMul runs in INT8.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest
import tf_testmodels as models

import inc_core as inc
import inc_tf
from inc_core.errors import UnsupportedModelError

STEPS = 8


@functools.cache
def _rows() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x_train, x_test, y_train, y_test = models.digits()
    return x_train.reshape(-1, STEPS, 8), x_test.reshape(-1, STEPS, 8), y_train, y_test


def _recurrent(kind: str, *, steps: int | None = STEPS, stateful: bool = False) -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((steps, 8), batch_size=32 if stateful else None, name="rows")
    if kind == "lstm":
        h = keras.layers.LSTM(32, stateful=stateful, name="rnn")(inputs)
    elif kind == "gru":
        h = keras.layers.GRU(32, name="rnn")(inputs)
    elif kind == "simple":
        h = keras.layers.SimpleRNN(32, name="rnn")(inputs)
    else:  # a bidirectional GRU feeding an LSTM
        h = keras.layers.Bidirectional(keras.layers.GRU(16, return_sequences=True), name="rnn")(inputs)
        h = keras.layers.LSTM(16, name="rnn2")(h)
    model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(h), name=f"digits_{kind}")
    if stateful:
        return model
    x_train, _, y_train, _ = _rows()
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=6, batch_size=32, verbose=0)
    return model


@functools.cache
def _trained(kind: str) -> keras.Model:
    return _recurrent(kind)


def _unroll_flags(model: keras.Model) -> list[bool]:
    return [layer.unroll for layer in model._flatten_layers() if isinstance(layer, keras.layers.RNN)]


@pytest.mark.parametrize("kind", ["lstm", "gru", "simple", "stacked"])
def test_static_int8_runs_every_gate_matmul_in_int8(kind: str) -> None:
    model = _trained(kind)
    x_train, x_test, _, y_test = _rows()
    before = models.fingerprint(model)
    q = inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset(x_train[:128], batch_size=32))
    counts = inc.resolve_backend(q).int8_op_counts(q)
    # one input and one recurrent MatMul per step (two per direction), plus the classifier
    matmuls = {"lstm": 2 * STEPS, "gru": 2 * STEPS, "simple": 2 * STEPS, "stacked": 6 * STEPS}[kind] + 1
    assert counts.get("FULLY_CONNECTED") == matmuls, counts
    fp32 = model.predict(x_test, verbose=0)
    int8 = q(x_test)
    cosine = float(np.sum(fp32 * int8) / np.linalg.norm(fp32) / np.linalg.norm(int8))
    assert cosine > 0.99, cosine
    assert models.accuracy(q, x_test, y_test) >= models.accuracy(model, x_test, y_test) - 0.03
    assert models.fingerprint(model) == before and not any(_unroll_flags(model))


def test_dynamic_int8_takes_the_recurrent_weights_too() -> None:
    model = _trained("lstm")
    _, x_test, _, _ = _rows()
    q = inc.quantize(model, inc.QuantConfig(approach="dynamic"))
    # the gate MatMuls; the converter's dynamic-range mode leaves weights under 1024 values (the classifier) float
    assert inc.resolve_backend(q).int8_op_counts(q) == {"FULLY_CONNECTED": 2 * STEPS}
    fp32 = model.predict(x_test, verbose=0)
    assert np.allclose(q(x_test), fp32, atol=0.05 * np.abs(fp32).max())


def test_describe_lists_the_rnn_layers_and_exclude_keeps_them_float() -> None:
    model = _trained("stacked")
    assert [(op.name, op.op_type) for op in inc.describe(model).ops] == [
        ("rnn", "Bidirectional"), ("rnn2", "LSTM"), ("logits", "Dense")
    ]
    model = _trained("lstm")
    x_train = _rows()[0]
    config = inc.QuantConfig(exclude=inc.LayerFilter(names=("rnn",)))
    q = inc.quantize(model, config, dataset=inc.Dataset(x_train[:128], batch_size=32))
    assert inc.resolve_backend(q).int8_op_counts(q).get("FULLY_CONNECTED") == 1  # the classifier alone


def test_qat_of_an_lstm_converts_to_int8() -> None:
    model = _trained("lstm")
    x_train, x_test, y_train, y_test = _rows()
    qat = inc_tf.prepare_qat(model, inc.QATConfig())
    qat.compile(keras.optimizers.Adam(1e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x_train, y_train, epochs=1, batch_size=32, verbose=0, callbacks=[inc_tf.QATCallback()])
    q = inc_tf.convert(qat)
    assert inc.resolve_backend(q).int8_op_counts(q).get("FULLY_CONNECTED") == 2 * STEPS + 1
    assert models.accuracy(q, x_test, y_test) >= models.accuracy(model, x_test, y_test) - 0.05


def test_sequences_of_unknown_length_are_refused_with_the_way_out() -> None:
    model = _recurrent("lstm", steps=None)
    x_train = _rows()[0]
    with pytest.raises(UnsupportedModelError, match=r"RNN layer 'rnn' reads sequences of unknown length.*fixed length.*format='savedmodel'"):
        inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset(x_train[:64], batch_size=32))
    assert not any(_unroll_flags(model))
    # the way out named in the message works: TF's INT8 kernels for the classifier, the LSTM in float
    q = inc.quantize(model, inc.QuantConfig(format="savedmodel"), dataset=inc.Dataset(x_train[:64], batch_size=32))
    assert inc.resolve_backend(q).int8_op_counts(q) == {"QuantizedMatMulWithBiasAndDequantize": 1}


def test_a_stateful_rnn_is_refused() -> None:
    model = _recurrent("lstm", stateful=True)
    with pytest.raises(UnsupportedModelError, match=r"RNN layer 'rnn' is stateful.*stateful=False"):
        inc.quantize(model, inc.QuantConfig(approach="dynamic"))
