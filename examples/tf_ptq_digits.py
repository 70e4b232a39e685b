"""Accuracy-driven int8 for a Keras 3 model, end to end, on LiteRT.

Trains a small conv net on scikit-learn's digits with Keras, lets ``inc.autotune`` find an int8 recipe
that stays within 1% (relative) of FP32 accuracy, writes the LiteRT ``.tflite`` and the tuning report,
and prints FP32 vs int8 accuracy and batch-1 latency (TF FP32 vs LiteRT int8).

    python examples/tf_ptq_digits.py [--out build/tf_ptq]
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
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


def accuracy(model: object, x: np.ndarray, y: np.ndarray) -> float:
    logits = model.predict(x, verbose=0) if isinstance(model, keras.Model) else model(x)  # type: ignore[operator]
    return float(np.mean(np.argmax(logits, axis=1) == y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/tf_ptq"))
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

    x_val, y_val = x_train[-300:], y_train[-300:]
    result = inc.autotune(
        model,
        inc.TuningConfig(base=inc.QuantConfig(calibration="kl", calib_samples=256), tolerable_loss=0.01,
                         history=str(args.out / "tuning.json")),
        eval_fn=lambda candidate: accuracy(candidate, x_val, y_val),
        dataset=inc.Dataset(x_train[:256], batch_size=32),
    )
    inc.save(result.model, args.out / "digits.int8.tflite")
    result.report(args.out / "tuning.md")
    fp32, int8 = accuracy(model, x_test, y_test), accuracy(result.model, x_test, y_test)
    batch = x_test[:1]
    fp32_speed = inc.benchmark(model, batch, warmup=20, iterations=200)
    int8_speed = inc.benchmark(result.model, batch, warmup=20, iterations=200)
    print(f"accuracy FP32 {fp32:.4f}  int8 {int8:.4f}  (goal met: {result.met}, {len(result.trials)} trial(s))")
    print(f"batch-1 throughput: TF FP32 {fp32_speed.throughput:.0f}/s  LiteRT int8 {int8_speed.throughput:.0f}/s")
    print(f"wrote {args.out / 'digits.int8.tflite'} and {args.out / 'tuning.md'}")


if __name__ == "__main__":
    main()
