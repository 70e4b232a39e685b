"""Prune a Keras 3 model to 70% sparsity inside model.fit, then quantize it to int8 LiteRT.

Trains a 64-256-256-10 MLP on scikit-learn's digits, fine-tunes it for five epochs with
``inc_tf.PruningCallback`` (magnitude, ramping to 70% over two epochs; the progress bar shows the
sparsity), strips the callback state, prints the per-layer sparsity report and the test accuracy of
the dense, pruned and pruned+int8 models. The int8 kernels keep the zeros.

    python examples/tf_prune_digits.py
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import inc_core as inc  # noqa: E402
import inc_tf  # noqa: E402


def accuracy(model: object, x: np.ndarray, y: np.ndarray) -> float:
    logits = model.predict(x, verbose=0) if isinstance(model, keras.Model) else model(x)  # type: ignore[operator]
    return float(np.mean(np.argmax(logits, axis=1) == y))


def main() -> None:
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(256, activation="relu"), keras.layers.Dense(256, activation="relu"),
         keras.layers.Dense(10)]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss=loss, metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=50, epochs=12, verbose=0)
    dense = accuracy(model, x_test, y_test)

    steps_per_epoch = int(np.ceil(len(x_train) / 50))
    config = inc.PruneConfig(target_sparsity=0.7, schedule="iterative", start_step=0, end_step=2 * steps_per_epoch, frequency=9)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=50, epochs=5, callbacks=[inc_tf.PruningCallback(config)], verbose=2)

    pruned = inc_tf.strip(model)
    print(inc_tf.sparsity_report(pruned))
    calib = inc.Dataset(x_train[:128], batch_size=32)
    int8 = inc.quantize(pruned, inc.QuantConfig(), dataset=calib)
    print(f"test accuracy: dense {dense:.4f}, 70% sparse {accuracy(pruned, x_test, y_test):.4f}, "
          f"70% sparse int8 {accuracy(int8, x_test, y_test):.4f}")


if __name__ == "__main__":
    main()
