"""Keras layers beyond Dense/Conv2D that LiteRT runs in INT8 are listed by describe and reached by exclude; QAT of a
model holding them keeps its accuracy once converted.

A sequence model on digits rows (8 steps of 8 pixels): causal Conv1D, SeparableConv1D, DepthwiseConv1D,
GroupNormalization, TimeDistributed(Dense), dot-product Attention, Flatten, Dense.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest
import tf_testmodels as models

import inc_core as inc
import inc_tf

LISTED = [
    ("causal", "Conv1D"), ("separable", "SeparableConv1D"), ("depthwise", "DepthwiseConv1D"),
    ("per_step", "TimeDistributed"), ("attention", "Attention"), ("logits", "Dense"),
]


@functools.cache
def _rows() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x_train, x_test, y_train, y_test = models.digits()
    return x_train.reshape(-1, 8, 8), x_test.reshape(-1, 8, 8), y_train, y_test


def _sequence_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    rows = keras.Input((8, 8), name="rows")
    h = keras.layers.Conv1D(16, 3, padding="causal", activation="relu", name="causal")(rows)
    h = keras.layers.SeparableConv1D(16, 3, padding="same", name="separable")(h)
    h = keras.layers.DepthwiseConv1D(3, padding="same", name="depthwise")(h)
    h = keras.layers.GroupNormalization(4, name="norm")(h)
    h = keras.layers.TimeDistributed(keras.layers.Dense(16, activation="relu", name="step"), name="per_step")(h)
    h = keras.layers.Add(name="residual")([keras.layers.Attention(name="attention")([h, h]), h])
    model = keras.Model(rows, keras.layers.Dense(10, name="logits")(keras.layers.Flatten(name="flat")(h)))
    x_train, _, y_train, _ = _rows()
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=8, batch_size=32, verbose=0)
    return model


@functools.cache
def _trained() -> keras.Model:
    return _sequence_model()


def _int8_ops(model: keras.Model, exclude: tuple[str, ...] = ()) -> dict[str, int]:
    config = inc.QuantConfig(exclude=inc.LayerFilter(names=exclude)) if exclude else inc.QuantConfig()
    q = inc.quantize(model, config, dataset=inc.Dataset(_rows()[0][:128], batch_size=32))
    return inc.resolve_backend(q).int8_op_counts(q)


def test_describe_lists_every_layer_litert_runs_in_int8() -> None:
    assert [(op.name, op.op_type) for op in inc.describe(_trained()).ops] == LISTED


@pytest.mark.parametrize(
    ("name", "op", "count"),
    [("separable", "DEPTHWISE_CONV_2D", 1), ("depthwise", "DEPTHWISE_CONV_2D", 1), ("per_step", "FULLY_CONNECTED", 8),  # TimeDistributed: one per step
     ("attention", "BATCH_MATMUL", 2)],
)
def test_excluding_a_layer_takes_its_int8_ops_out(name: str, op: str, count: int) -> None:
    model = _trained()
    assert _int8_ops(model).get(op, 0) - _int8_ops(model, (name,)).get(op, 0) == count


@keras.saving.register_keras_serializable(package="inc_tests")
class FeedForward(keras.layers.Layer):
    """A user's block holding Dense layers (what keras_hub's TransformerEncoder and most custom blocks are)."""

    def __init__(self, units: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.units = units
        self.expand = keras.layers.Dense(4 * units, activation="relu", name="expand")
        self.project = keras.layers.Dense(units, name="project")

    def call(self, x: object) -> object:
        return x + self.project(self.expand(x))

    def get_config(self) -> dict[str, object]:
        return {**super().get_config(), "units": self.units}


@functools.cache
def _with_block() -> keras.Model:
    keras.utils.set_random_seed(0)
    rows = keras.Input((8, 8), name="rows")
    h = FeedForward(16, name="block")(keras.layers.Dense(16, name="embed")(rows))
    model = keras.Model(rows, keras.layers.Dense(10, name="logits")(keras.layers.Flatten()(h)))
    x_train, _, y_train, _ = _rows()
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=4, batch_size=32, verbose=0)
    return model


@pytest.mark.parametrize("approach", ["static", "dynamic"])
def test_a_custom_layer_holding_dense_layers_is_listed_and_quantized(approach: str) -> None:
    # describe listed only built-in layer types, so dynamic quantization of a model whose weights sit in custom
    # blocks (keras_hub's transformers) answered "Nothing to quantize ... its largest weight holds 64000"
    model = _with_block()
    x_train, x_test, _, y_test = _rows()
    config = inc.QuantConfig(approach=approach)
    listed = [(op.name, op.op_type) for op in inc.describe(model, config).ops]
    assert ("block", "FeedForward") in listed
    quantized = inc.quantize(model, config, dataset=inc.Dataset(x_train[:128], batch_size=32))
    assert models.accuracy(quantized, x_test, y_test) >= models.accuracy(model, x_test, y_test) - 0.02
    if approach == "dynamic":  # int8 weights: the block's two Dense layers and the logits (embed is under 1,024)
        assert inc.resolve_backend(quantized).int8_op_counts(quantized) == {"FULLY_CONNECTED": 3}
    else:
        excluded = inc.QuantConfig(exclude=inc.LayerFilter(names=("block",)))
        kept = inc.quantize(model, excluded, dataset=inc.Dataset(x_train[:128], batch_size=32))
        backend = inc.resolve_backend(quantized)
        # the block's two Dense layers run as FULLY_CONNECTED ops (one per step of the sequence or batched)
        assert backend.int8_op_counts(quantized)["FULLY_CONNECTED"] - backend.int8_op_counts(kept)["FULLY_CONNECTED"] == 2


def test_shape_ops_reading_int8_tensors_are_not_counted_as_int8_ops() -> None:
    # a Reshape to a batch-free target is converted to SHAPE + STRIDED_SLICE + PACK + RESHAPE: SHAPE reads only
    # the int8 tensor's dimensions and computes nothing in int8
    rows = keras.Input((8, 8))
    h = keras.layers.Reshape((4, 16))(keras.layers.Dense(8)(rows))
    model = keras.Model(rows, keras.layers.Dense(10)(keras.layers.Flatten()(h)))
    counts = _int8_ops(model)
    assert "SHAPE" not in counts and counts["FULLY_CONNECTED"] == 2 and counts["RESHAPE"] >= 1, counts


def _int8_rounded(kernel: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Symmetric int8 per output channel (one scale per slice over ``axes``), as LiteRT quantizes a kernel."""
    scale = np.maximum(np.abs(kernel).max(axis=axes, keepdims=True), 1e-8) / 127
    return np.clip(np.round(kernel / scale), -127, 127) * scale


def _with_rounded_kernels(model: keras.Model, kernels: dict[str, tuple[int, ...]]) -> keras.Model:
    """A copy of ``model`` whose variables at the ``kernels`` paths hold their int8-rounded values."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    paths = [v.path for v in model.weights]  # the copy's auto-named sublayers get other names, in the same order
    for path, axes in kernels.items():
        variable = copy.weights[paths.index(path)]
        variable.assign(_int8_rounded(variable.numpy(), axes))
    return copy


@pytest.mark.parametrize(
    ("build", "kernels"),
    [
        # every convolution kind and the Dense inside TimeDistributed; the depthwise kernels (k, in, multiplier)
        # get one scale per input x multiplier output channel
        (_trained, {"causal/kernel": (0, 1), "separable/depthwise_kernel": (0,), "separable/pointwise_kernel": (0, 1),
                    "depthwise/kernel": (0,), "per_step/step/kernel": (0,), "logits/kernel": (0,)}),
        # the two Dense layers inside a user's block
        (_with_block, {"embed/kernel": (0,), "block/expand/kernel": (0,), "block/project/kernel": (0,), "logits/kernel": (0,)}),
    ],
    ids=["convolutions", "custom_block"],
)
def test_qat_trains_on_the_int8_kernels_of_every_layer_kind(build, kernels) -> None:
    # prepare_qat fake-quantized Dense and Conv2D kernels only: depthwise, separable, 1-D convolutions and the
    # layers inside a user's block (keras_hub's transformer blocks) trained in float and met int8 at convert
    model = build()
    x = _rows()[1][:64]
    qat = inc_tf.prepare_qat(model, inc.QATConfig())  # activation fake quant waits for the first training step
    rounded = _with_rounded_kernels(model, kernels)
    assert set(kernels) <= {v.path for v in model.weights}
    np.testing.assert_allclose(np.asarray(qat(x, training=False)), np.asarray(rounded(x, training=False)), rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.asarray(model(x, training=False)), np.asarray(rounded(x, training=False)), rtol=1e-4, atol=1e-5)


def test_qat_of_the_sequence_model_converts_without_losing_what_it_learned() -> None:
    """Layers LiteRT runs as several ops keep calibrated ranges inside: only their output takes the learned range
    (GroupNormalization's statistics had taken its output's range and cost the INT8 model ~10 points)."""
    x_train, x_test, y_train, y_test = _rows()
    qat = inc_tf.prepare_qat(_trained(), inc.QATConfig())
    qat.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x_train, y_train, epochs=1, batch_size=32, verbose=0, callbacks=[inc_tf.QATCallback()])
    trained = models.accuracy(qat, x_test, y_test)
    converted = models.accuracy(inc_tf.convert(qat), x_test, y_test)
    assert converted >= trained - 0.02, (converted, trained)


def test_qat_of_an_attention_layer_fed_the_model_input_as_a_list() -> None:
    keras.utils.set_random_seed(0)
    rows = keras.Input((8, 8), name="rows")
    h = keras.layers.Add(name="residual")([keras.layers.Attention(name="attention")([rows, rows]), rows])
    model = keras.Model(rows, keras.layers.Dense(10, name="logits")(keras.layers.Flatten()(h)))
    x_train, x_test, y_train, y_test = _rows()
    qat = inc_tf.prepare_qat(model, inc.QATConfig())
    qat.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x_train, y_train, epochs=3, batch_size=32, verbose=0, callbacks=[inc_tf.QATCallback()])
    assert models.accuracy(inc_tf.convert(qat), x_test, y_test) >= models.accuracy(qat, x_test, y_test) - 0.02
