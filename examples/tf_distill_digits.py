"""Distil a conv net into a small MLP with keras fit, against the same MLP trained alone.

Trains a teacher conv net on scikit-learn's digits, then a 64-32-10 student twice from the same
initial weights: once alone, once through ``inc_tf.Distiller`` (KL at temperature 4 plus the task
loss), and prints the test accuracy of all three.

    python examples/tf_distill_digits.py
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


def student() -> keras.Model:
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)]
    )


def main() -> None:
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    keras.utils.set_random_seed(0)
    teacher = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
         keras.layers.MaxPooling2D(), keras.layers.Flatten(), keras.layers.Dense(128, activation="relu"),
         keras.layers.Dense(10)]
    )
    teacher.compile(optimizer=keras.optimizers.Adam(3e-3), loss=loss, metrics=["accuracy"])
    teacher.fit(x_train, y_train, batch_size=50, epochs=12, verbose=0)

    alone = student()
    alone.compile(optimizer=keras.optimizers.Adam(3e-3), loss=loss, metrics=["accuracy"])
    alone.fit(x_train, y_train, batch_size=50, epochs=10, verbose=0)

    distilled = student()
    distiller = inc_tf.Distiller(distilled, teacher, inc.DistillConfig(temperature=4.0, loss_weights=(0.5, 0.5)))
    distiller.compile(optimizer=keras.optimizers.Adam(3e-3), metrics=["accuracy"])
    distiller.fit(x_train, y_train, batch_size=50, epochs=10, verbose=2)

    def accuracy(model: keras.Model) -> float:
        return float(np.mean(np.argmax(model.predict(x_test, verbose=0), axis=1) == y_test))

    print(f"test accuracy: teacher {accuracy(teacher):.4f}, student alone {accuracy(alone):.4f}, "
          f"student distilled {accuracy(distilled):.4f}")


if __name__ == "__main__":
    main()
