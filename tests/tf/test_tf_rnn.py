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


# --- masked sequences ----------------------------------------------------------------------------------


@functools.cache
def _pixel_tokens() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each digit pooled to 4x4 and read as 16 tokens (its rounded intensity, 0..16); 0 is padding to the LSTM."""
    x_train, x_test, y_train, y_test = models.digits()

    def tokens(x: np.ndarray) -> np.ndarray:
        pooled = x.reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4))
        return np.rint(pooled * 16).astype(np.int32).reshape(-1, 16)

    return tokens(x_train), tokens(x_test), y_train, y_test


@functools.cache
def _masked_lstm() -> keras.Model:
    keras.utils.set_random_seed(0)
    ids = keras.Input((16,), dtype="int32", name="ids")
    h = keras.layers.Embedding(17, 16, mask_zero=True, name="embed")(ids)
    h = keras.layers.LSTM(32, name="rnn")(h)
    model = keras.Model(ids, keras.layers.Dense(10, name="logits")(h), name="masked_lstm")
    x_train, _, y_train, _ = _pixel_tokens()
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=8, batch_size=32, verbose=0)
    return model


def test_a_masked_lstm_runs_in_int8_and_keeps_its_predictions() -> None:
    """The initial state, and its product with the recurrent kernel, are zero on every calibration sample."""
    model = _masked_lstm()
    x_train, x_test, _, _ = _pixel_tokens()
    q = inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset(x_train[:128], batch_size=32))
    assert inc.resolve_backend(q).int8_op_counts(q).get("FULLY_CONNECTED") == 2 * 16 + 1
    fp32, int8 = model.predict(x_test, verbose=0), q(x_test)
    assert float(np.mean(fp32.argmax(1) == int8.argmax(1))) >= 0.97


def test_a_litert_model_that_does_not_run_is_an_error_not_a_result(monkeypatch) -> None:
    """The check behind the test above: with empty ranges written as they are (what inc did before), XNNPACK
    refuses the model at its first run; quantize says so instead of returning it."""
    import inc_tf._flatbuffer as flatbuffer

    written = flatbuffer.with_ranges

    def empty_ranges_kept(content: bytes, ranges: dict, *, unranged: tuple = ()) -> bytes:
        model = flatbuffer._model(written(content, ranges, unranged=unranged))
        for index, (low, high) in ranges.items():
            if max(high, 0.0) - min(low, 0.0) <= 0.0:
                model.subgraphs[0].tensors[index].quantization.max = np.array([0.0], dtype=np.float32)
        from tensorflow.lite.tools import flatbuffer_utils

        return bytes(flatbuffer_utils.convert_object_to_bytearray(model))

    monkeypatch.setattr(flatbuffer, "with_ranges", empty_ranges_kept)
    x_train = _pixel_tokens()[0]
    with pytest.raises(UnsupportedModelError, match=r"LiteRT INT8 model does not run on the first calibration batch.*XNNPACK"):
        inc.quantize(_masked_lstm(), inc.QuantConfig(), dataset=inc.Dataset(x_train[:128], batch_size=32))


def test_dynamic_quantize_runs_the_model_on_the_data_it_is_given() -> None:
    from inc_core.errors import DatasetError

    model = _trained("lstm")
    x_test = _rows()[1]
    q = inc.quantize(model, inc.QuantConfig(approach="dynamic"), dataset=inc.Dataset(x_test[:32]))
    assert q(x_test[:4]).shape == (4, 10)
    with pytest.raises(DatasetError, match=r"first batch.*shape"):  # rows of 4 steps: not what the model reads
        inc.quantize(model, inc.QuantConfig(approach="dynamic"), dataset=inc.Dataset(x_test[:32, :4]))
