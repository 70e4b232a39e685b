"""Quantization-aware training of a Keras 3 model inside model.fit, converted to int8 LiteRT.

Trains a conv net on scikit-learn's digits in FP32, fine-tunes it with inc's fake quant for three
epochs (ranges and batch norm frozen by ``inc_tf.QATCallback`` part way), converts it to an int8
``.tflite`` with the learned ranges and prints FP32 vs int8 test accuracy.

    python examples/tf_qat_digits.py [--out build/tf_qat]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import inc_core as inc  # noqa: E402
import inc_tf  # noqa: E402


def build() -> keras.Model:
    inputs = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(64, activation="relu")(h)
    return keras.Model(inputs, keras.layers.Dense(10)(h))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/tf_qat"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    keras.utils.set_random_seed(0)
    model = build()
    model.compile("adam", loss, metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=12, batch_size=32, verbose=0)
    fp32 = model.evaluate(x_test, y_test, verbose=0)[1]

    qat = inc_tf.prepare_qat(model, inc.QATConfig(freeze_observer_step=60, freeze_bn_step=80))
    qat.compile(keras.optimizers.Adam(5e-4), loss, metrics=["accuracy"])
    qat.fit(x_train, y_train, epochs=3, batch_size=32, callbacks=[inc_tf.QATCallback()])
    int8 = inc_tf.convert(qat, dataset=x_train[:256])  # ranges QAT does not learn: from training inputs
    inc.save(int8, args.out / "digits.qat.int8.tflite")
    accuracy = float(np.mean(np.argmax(int8(x_test), axis=1) == y_test))
    print(f"test accuracy FP32 {fp32:.4f}  QAT int8 (LiteRT) {accuracy:.4f}")
    print(f"wrote {args.out / 'digits.qat.int8.tflite'}")


if __name__ == "__main__":
    main()
