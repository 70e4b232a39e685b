"""A TensorFlow SavedModel in, an INT8 SavedModel on TF's own oneDNN kernels out, tuned for accuracy.

Trains a small conv net on scikit-learn's digits with Keras, exports it as a SavedModel directory
(``model.export``), lets ``inc.autotune`` find an INT8 recipe for the SavedModel target within 1% (absolute)
of FP32 accuracy, writes the INT8 SavedModel, serves it back with plain ``tf.saved_model.load`` and prints
FP32 vs INT8 accuracy, the int8 ops in the served graph, and batch-1 throughput (TF FP32 vs TF INT8).

    python examples/tf_savedmodel_int8_digits.py [--out build/tf_savedmodel]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import inc_core as inc  # noqa: E402


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


def served_logits(path: Path, x: np.ndarray) -> np.ndarray:
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    return next(iter(serve(tf.constant(x)).values())).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/tf_savedmodel"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    keras.utils.set_random_seed(0)
    model = build()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=12, batch_size=32, verbose=0)
    exported = args.out / "fp32_savedmodel"
    shutil.rmtree(exported, ignore_errors=True)
    model.export(str(exported), verbose=False)  # what a TF user hands over: a SavedModel directory

    fp32_model = inc.load(exported)  # an inc_tf.TFSavedModel: callable on numpy, as eval_fn needs for the baseline
    x_val, y_val = x_train[-300:], y_train[-300:]
    result = inc.autotune(
        fp32_model,
        inc.TuningConfig(base=inc.QuantConfig(format="savedmodel"), tolerable_loss=0.01, loss_type="absolute",
                         max_trials=10, history=None),
        eval_fn=lambda m: float(np.mean(np.argmax(m(x_val), axis=1) == y_val)),
        dataset=inc.Dataset(x_train[:256], batch_size=32),
    )
    int8_path = args.out / "digits.int8.savedmodel"
    shutil.rmtree(int8_path, ignore_errors=True)
    inc.save(result.model, int8_path)

    fp32_acc = float(np.mean(np.argmax(served_logits(exported, x_test), axis=1) == y_test))
    int8_acc = float(np.mean(np.argmax(served_logits(int8_path, x_test), axis=1) == y_test))
    print(f"met: {result.met} after {len(result.trials)} trial(s); config: {result.config.calibration}, "
          f"FP32 layers: {list(result.config.exclude.names) or 'none'}")
    print(f"test accuracy: FP32 {fp32_acc:.4f}, INT8 {int8_acc:.4f} (served by tf.saved_model.load)")
    print(f"int8 kernels: {inc.get_backend('tf').int8_op_counts(result.model)}")
    one = x_test[:1]
    fp32 = inc.benchmark(exported, one, warmup=10, iterations=200)
    int8 = inc.benchmark(int8_path, one, warmup=10, iterations=200)
    print(f"batch-1 throughput: TF FP32 {fp32.throughput:.0f}/s, TF INT8 {int8.throughput:.0f}/s")


if __name__ == "__main__":
    main()
