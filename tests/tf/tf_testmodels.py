"""Small Keras models trained on scikit-learn's digits, shared by the tf tests (trained once per process)."""

from __future__ import annotations

import functools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402


@functools.cache
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, x_test, y_train, y_test): 8x8x1 images scaled to [0, 1], a fixed stratified split."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return x_train, x_test, y_train.astype(np.int64), y_test.astype(np.int64)


def _compile_and_fit(model: keras.Model, epochs: int) -> keras.Model:
    x_train, _, y_train, _ = digits()
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    return model


def build_cnn() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="conv1")(inputs)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    h = keras.layers.ReLU(name="relu1")(h)
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.MaxPooling2D(name="pool")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(64, activation="relu", name="fc1")(h)
    outputs = keras.layers.Dense(10, name="logits")(h)
    return keras.Model(inputs, outputs, name="digits_cnn")


def build_mlp() -> keras.Model:
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10),
        ],
        name="digits_mlp",
    )


def build_mixed_precision_cnn(policy: str) -> keras.Model:
    """conv -> dense digits model built under a 16-bit ``policy`` (its logits layer in float32, as Keras advises);
    the global policy is set back to float32 afterwards (despite the name, ``float64`` is taken too). Mixed policies
    train as they are; a pure ``float16``, ``bfloat16`` or ``float64`` policy (variables in that type) gets the
    weights of the same net trained in float32, since training purely in 16 bits diverges."""

    def build(under: str) -> keras.Model:
        keras.mixed_precision.set_global_policy(under)
        try:
            keras.utils.set_random_seed(0)
            inputs = keras.Input((8, 8, 1))
            h = keras.layers.Flatten()(keras.layers.Conv2D(16, 3, activation="relu", name="conv")(inputs))
            return keras.Model(inputs, keras.layers.Dense(10, dtype="float32", name="logits")(h))
        finally:
            keras.mixed_precision.set_global_policy("float32")

    if policy.startswith("mixed_"):
        return _compile_and_fit(build(policy), epochs=3)
    model = build(policy)
    model.set_weights(_compile_and_fit(build("float32"), epochs=3).get_weights())
    return model


@functools.cache
def cnn() -> keras.Model:
    """A functional conv net (conv+BN+ReLU, conv, pool, two dense layers), ~98% test accuracy."""
    return _compile_and_fit(build_cnn(), epochs=12)


@functools.cache
def mlp() -> keras.Model:
    """A Sequential MLP with auto-named layers (dense, dense_1, dense_2)."""
    return _compile_and_fit(build_mlp(), epochs=20)


def accuracy(model: object, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of a Keras model or a LiteRT model (anything callable on a batch)."""
    if isinstance(model, keras.Model):
        logits = model.predict(x, verbose=0, batch_size=256)
    else:
        logits = model(x)  # type: ignore[operator]
    return float(np.mean(np.argmax(logits, axis=1) == y))


def fingerprint(model: keras.Model) -> tuple[object, ...]:
    return (model.to_json(), tuple(w.tobytes() for w in model.get_weights()))
