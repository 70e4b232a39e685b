"""Keras preprocessing layers inside the model: a tabular classifier on scikit-learn's breast-cancer data.

The model standardises its 30 features with an adapted ``Normalization`` (their scales run from 0.001 to 4,000),
buckets one feature with an adapted ``Discretization`` and one-hot encodes it, and one-hot encodes an integer
size class with ``CategoryEncoding``. Each is what a Keras user puts in a model they ship; each had a way to make
the INT8 model silently wrong, and the lookup layers (``StringLookup``, ``TextVectorization``...) get an error that
says how to quantize the rest.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

import inc_core as inc
import inc_tf
from inc_core.errors import DatasetError, UnsupportedModelError

SIZES = np.array(["small", "medium", "large", "huge"])
# inc-tf's INT8 outputs: LiteRT static and dynamic range, and the SavedModel target
EVERY_TARGET = pytest.mark.parametrize(
    "config",
    [inc.QuantConfig(), inc.QuantConfig(approach="dynamic"), inc.QuantConfig(format="savedmodel")],
    ids=["litert_static", "litert_dynamic", "savedmodel"],
)


@functools.cache
def _data() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(train inputs, test inputs, train labels, test labels); ``size`` is the mean-radius quartile as an integer."""
    x, y = load_breast_cancer(return_X_y=True)
    x = x.astype(np.float32)
    size = np.digitize(x[:, 0], np.quantile(x[:, 0], [0.25, 0.5, 0.75])).astype(np.int32)[:, None]
    x_train, x_test, s_train, s_test, y_train, y_test = train_test_split(x, size, y, test_size=0.3, random_state=0, stratify=y)
    return {"features": x_train, "size": s_train}, {"features": x_test, "size": s_test}, y_train, y_test


def _fit(model: keras.Model, inputs: dict[str, np.ndarray], labels: np.ndarray) -> keras.Model:
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(inputs, labels, epochs=30, batch_size=32, verbose=0)
    return model


@functools.cache
def _tabular() -> keras.Model:
    keras.utils.set_random_seed(0)
    train, _, y_train, _ = _data()
    norm = keras.layers.Normalization(name="standardise")
    norm.adapt(train["features"])
    area = keras.layers.Discretization(num_bins=5, name="area_bins")
    area.adapt(train["features"][:, 3:4])
    features = keras.Input((30,), name="features")
    size = keras.Input((1,), dtype="int32", name="size")
    h = keras.layers.concatenate([
        norm(features),
        keras.layers.CategoryEncoding(5, output_mode="one_hot", name="area_onehot")(area(features[:, 3:4])),
        keras.layers.CategoryEncoding(4, output_mode="one_hot", name="size_onehot")(size),
    ])
    h = keras.layers.Dense(64, activation="relu", name="hidden")(h)
    model = keras.Model([features, size], keras.layers.Dense(2, name="logits")(h), name="breast_cancer")
    return _fit(model, train, y_train)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)))


def _outputs(model: object, inputs: dict[str, np.ndarray]) -> np.ndarray:
    if isinstance(model, keras.Model):
        feeds = {k: tf.constant(v) for k, v in inputs.items()}
        return np.asarray(model(feeds if len(feeds) > 1 else next(iter(feeds.values())), training=False))
    return np.asarray(model(inputs))


def _calibration() -> inc.Dataset:
    train, _, _, _ = _data()
    return inc.Dataset({k: v[:256] for k, v in train.items()}, batch_size=32)


@EVERY_TARGET
def test_int8_model_standardises_and_one_hot_encodes_like_the_keras_model(config: inc.QuantConfig) -> None:
    # inc converts a renamed copy of the model: set_weights left the copy's Normalization with mean 0 and variance 1
    # (cosine 0.28 on a digits CNN); LiteRT's INT8 ONE_HOT read every off position as 0.5, and the category codes
    # crossed an int8 reshape on their way to it, 3 coming back as 2 (cosine 0.37-0.47 on one-hot inputs).
    model = _tabular()
    _, test, _, y_test = _data()
    fp32 = _outputs(model, test)
    quantized = inc.quantize(model, config, dataset=_calibration())
    outputs = _outputs(quantized, test)
    assert _cosine(fp32, outputs) >= 0.995
    assert np.mean(outputs.argmax(1) == y_test) >= np.mean(fp32.argmax(1) == y_test) - 0.02


def test_strip_and_qat_copies_keep_the_adapted_statistics() -> None:
    model = _tabular()
    train, test, y_train, y_test = _data()
    fp32 = _outputs(model, test)
    np.testing.assert_allclose(_outputs(inc_tf.strip(model), test), fp32, rtol=1e-5, atol=1e-5)
    qat = inc_tf.prepare_qat(model, inc.QATConfig())
    assert _cosine(_outputs(qat, test), fp32) >= 0.99  # fake quant only, before any training
    qat.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(train, y_train, epochs=1, batch_size=32, verbose=0)
    converted = _outputs(inc_tf.convert(qat, dataset=_calibration()), test)
    assert np.mean(converted.argmax(1) == y_test) >= np.mean(fp32.argmax(1) == y_test) - 0.03


@functools.cache
def _batch_norm_first() -> keras.Model:
    """A tabular net that standardises its raw features with BatchNormalization (a common Keras idiom)."""
    keras.utils.set_random_seed(0)
    train, _, y_train, _ = _data()
    features = keras.Input((30,), name="features")
    h = keras.layers.BatchNormalization(name="standardise")(features)
    h = keras.layers.Dense(64, activation="relu", name="hidden")(h)
    model = keras.Model(features, keras.layers.Dense(2, name="logits")(h), name="bn_first")
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(train["features"], y_train, epochs=60, batch_size=32, verbose=0)
    return model


@EVERY_TARGET
def test_batch_norm_on_raw_features_is_not_folded_into_int8_weights(config: inc.QuantConfig) -> None:
    # the converter folded the layer's scale into the Dense's weights per input column (int8 per output channel
    # rounded most columns away) and its offset into the bias, leaving the int8 input uncentred: cosine 0.32-0.34,
    # accuracy 0.965 -> 0.626 on LiteRT, static and dynamic alike
    model = _batch_norm_first()
    train, test, _, y_test = _data()
    fp32 = _outputs(model, {"features": test["features"]})
    quantized = inc.quantize(model, config, dataset=inc.Dataset(train["features"][:256], batch_size=32))
    outputs = np.asarray(quantized(test["features"]))
    # measured on AMD EPYC: LiteRT static 0.9939 (the standardised features' outliers widen the int8 range),
    # dynamic 0.99999, SavedModel 0.99993; accuracy 0.959-0.965 against 0.965
    assert _cosine(fp32, outputs) >= 0.98
    assert np.mean(outputs.argmax(1) == y_test) >= np.mean(fp32.argmax(1) == y_test) - 0.02


def test_qat_leaves_raw_features_unrounded_before_their_batch_norm() -> None:
    # prepare_qat fake-quantized the model input per tensor in front of the BatchNormalization: two epochs of
    # QAT took the model from accuracy 0.965 to 0.696, and the INT8 model (which reads them in float) disagreed
    # with it (cosine 0.31)
    model = _batch_norm_first()
    train, test, y_train, y_test = _data()
    qat = inc_tf.prepare_qat(model, inc.QATConfig())
    qat.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(train["features"], y_train, epochs=2, batch_size=32, verbose=0, callbacks=[inc_tf.QATCallback()])
    trained = _outputs(qat, {"features": test["features"]})
    fp32 = _outputs(model, {"features": test["features"]})
    assert np.mean(trained.argmax(1) == y_test) >= np.mean(fp32.argmax(1) == y_test) - 0.02
    int8 = np.asarray(inc_tf.convert(qat, dataset=inc.Dataset(train["features"][:256], batch_size=32))(test["features"]))
    assert _cosine(trained, int8) >= 0.99


def _standardised_but(raw: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Train and test features as a scikit-learn pipeline hands them over: standardised, but for the ``raw`` ones."""
    train, test, _, _ = _data()
    mean, std = train["features"].mean(0), train["features"].std(0)
    mean[raw], std[raw] = 0.0, 1.0
    return (train["features"] - mean) / std, (test["features"] - mean) / std


@functools.cache
def _bucketed_area() -> keras.Model:
    """Buckets the raw ``area`` (up to 2,500) itself; the one feature vector is sliced into area and the rest."""
    keras.utils.set_random_seed(0)
    x_train, _ = _standardised_but([3])
    area = keras.layers.Discretization(num_bins=8, name="area_bins")
    area.adapt(x_train[:, 3:4])
    features = keras.Input((30,), name="features")
    h = keras.layers.concatenate([
        keras.layers.CategoryEncoding(8, output_mode="one_hot", name="area_onehot")(area(features[:, 3:4])),
        keras.layers.Dense(64, activation="relu", name="scaled")(
            keras.layers.concatenate([features[:, :3], features[:, 4:]])
        ),
    ])
    model = keras.Model(features, keras.layers.Dense(2, name="logits")(h), name="bucketed_area")
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, _data()[2], epochs=30, batch_size=32, verbose=0)
    return model


@functools.cache
def _raw_amount_first(parts: str) -> keras.Model:
    """Scales the raw ``worst area`` (up to 4,300, moved to the front) itself; the rest come standardised. The
    feature vector is taken apart by slicing (``parts="slice"``) or ``keras.ops.split``."""
    keras.utils.set_random_seed(0)
    x_train = _amount_first()[0]
    features = keras.Input((30,), name="features")
    raw, rest = (features[:, :1], features[:, 1:]) if parts == "slice" else keras.ops.split(features, [1], axis=1)
    amount = keras.layers.Dense(8, name="amount")(raw / 1000.0)
    scaled = keras.layers.Dense(64, activation="relu", name="scaled")(rest)
    model = keras.Model(features, keras.layers.Dense(2, name="logits")(keras.layers.concatenate([amount, scaled])))
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, _data()[2], epochs=30, batch_size=32, verbose=0)
    return model


def _amount_first() -> tuple[np.ndarray, np.ndarray]:
    order = [23, *(i for i in range(30) if i != 23)]
    return tuple(x[:, order] for x in _standardised_but([23]))  # type: ignore[return-value]


@EVERY_TARGET
@pytest.mark.parametrize("parts", ["slice", "split"])
def test_raw_amount_sliced_from_standardised_features_keeps_its_own_range(config: inc.QuantConfig, parts: str) -> None:
    # the LiteRT quantizer makes every slice of an input share the input's scale and took the standardised part's
    # range for all: every worst area read as at most 5 (cosine 0.38, accuracy 0.993 -> 0.714 on this model);
    # the input is now quantized once per slice, each with its own range. One SPLIT's outputs shared a scale
    # just the same (a split of a model input is sliced in the converter's float model now)
    x_train, x_test = _amount_first()
    y_test = _data()[3]
    model = _raw_amount_first(parts)
    fp32 = np.asarray(model(x_test))
    outputs = np.asarray(inc.quantize(model, config, dataset=inc.Dataset(x_train[:256], batch_size=32))(x_test))
    assert _cosine(fp32, outputs) >= 0.995
    assert np.mean(outputs.argmax(1) == y_test) >= np.mean(fp32.argmax(1) == y_test) - 0.02


@EVERY_TARGET
def test_bucketed_raw_feature_sliced_from_standardised_ones_keeps_its_buckets(config: inc.QuantConfig) -> None:
    # the area's slice shared the standardised slices' scale (-2.7 to 7.9): every area read as at most 7.9, one
    # bucket for every sample; given a range of its own, the slice came through a requantize from that clipped
    # tensor, and an int8 slice on a step of 10 still moved areas across bucket boundaries
    x_train, x_test = _standardised_but([3])
    model = _bucketed_area()
    calibration = inc.Dataset(x_train[:256], batch_size=32)
    fp32 = np.asarray(model(x_test))
    outputs = np.asarray(inc.quantize(model, config, dataset=calibration)(x_test))
    assert _cosine(fp32, outputs) >= 0.995
    # what the classifier's last layer reads: the area's one-hot bucket, then the scaled features' hidden units
    encoder = keras.Model(model.input, model.get_layer("logits").input)
    reference = np.asarray(encoder(x_test))
    encoded = np.asarray(inc.quantize(encoder, config, dataset=calibration)(x_test))
    assert len(set(reference[:, :8].argmax(1))) >= 6  # the test data spans the buckets
    np.testing.assert_array_equal(encoded[:, :8].argmax(1), reference[:, :8].argmax(1))
    assert _cosine(reference[:, 8:], encoded[:, 8:]) >= 0.99


@functools.cache
def _with_string_lookup() -> keras.Model:
    keras.utils.set_random_seed(0)
    train, _, y_train, _ = _data()
    lookup = keras.layers.StringLookup(output_mode="one_hot", name="size_lookup")
    lookup.adapt(SIZES)
    norm = keras.layers.Normalization(name="standardise")
    norm.adapt(train["features"])
    features = keras.Input((30,), name="features")
    size = keras.Input((1,), dtype="string", name="size")
    h = keras.layers.concatenate([norm(features), lookup(size)])
    model = keras.Model([features, size], keras.layers.Dense(2, name="logits")(keras.layers.Dense(64, name="hidden")(h)))
    return _fit(model, {"features": train["features"], "size": tf.constant(SIZES[train["size"]])}, y_train)


@pytest.mark.parametrize("step", ["litert", "savedmodel", "prepare_qat"])
def test_lookup_layer_is_refused_with_the_way_to_quantize_the_rest(step: str) -> None:
    # LiteRT failed with "'tf.HashTableV2' op is neither a custom op nor a flex op ... Subclassed models must be
    # traceable"; the SavedModel target froze the graph without the table and failed at its first run.
    model = _with_string_lookup()
    train, _, _, _ = _data()
    data = inc.Dataset({"features": train["features"][:64], "size": SIZES[train["size"][:64]]}, batch_size=32)
    with pytest.raises(UnsupportedModelError, match=r"'size_lookup' \(StringLookup\).*dataset\.map\(layer\)"):
        if step == "prepare_qat":
            inc_tf.prepare_qat(model, inc.QATConfig())
        else:
            inc.quantize(model, inc.QuantConfig(format="tflite" if step == "litert" else "savedmodel"), dataset=data)
    # The way out the message gives: the model after the lookup, fed the lookup's output.
    rest = keras.Model([model.get_layer("features").output, model.get_layer("size_lookup").output], model.output)
    lookup = model.get_layer("size_lookup")
    _, test, _, _ = _data()
    test_inputs = [test["features"], np.asarray(lookup(tf.constant(SIZES[test["size"]])))]
    calib = [train["features"][:256], np.asarray(lookup(tf.constant(SIZES[train["size"][:256]])))]
    quantized = inc.quantize(rest, inc.QuantConfig(), dataset=inc.Dataset([tuple(a[i : i + 32] for a in calib) for i in range(0, 256, 32)]))
    expected = np.asarray(model([tf.constant(test["features"]), tf.constant(SIZES[test["size"]])], training=False))
    assert _cosine(np.asarray(quantized(test_inputs)), expected) >= 0.99


def test_tf_op_outside_litert_builtins_is_named_with_its_layer() -> None:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4), name="matrices")
    h = keras.layers.Lambda(lambda t: tf.expand_dims(tf.linalg.det(t), -1), name="determinant")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="logits")(keras.layers.Dense(64, name="hidden")(h)))
    data = inc.Dataset(np.random.default_rng(0).normal(size=(64, 4, 4)).astype(np.float32), batch_size=32)
    with pytest.raises(UnsupportedModelError, match=r"uses TF op MatrixDeterminant \(in layer 'determinant'\).*format='savedmodel'"):
        inc.quantize(model, inc.QuantConfig(), dataset=data)


def test_the_float_model_with_a_lookup_still_benchmarks_and_checks_its_string_input() -> None:
    # only quantizing is refused; numbers for the string input are named as such (the input was typed float32)
    model = _with_string_lookup()
    _, test, _, _ = _data()
    result = inc.benchmark(model, {"features": test["features"][:8], "size": SIZES[test["size"][:8]]}, iterations=3, warmup=1)
    assert result.throughput > 0
    with pytest.raises(DatasetError, match=r"input 1 has dtype float32; the model's input takes strings"):
        inc.benchmark(model, {"features": test["features"][:8], "size": test["size"][:8].astype(np.float32)}, iterations=3)
