"""The conformance template run against the core's numpy test backend, and the toy model's accuracy."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import toy_backend
from toy_backend import NumpyMLP, QuantizedLayer, QuantizedMLP, accuracy, train_digits_mlp

import inc_core as inc
from inc_core.testing import BackendConformance

toy_backend.register()
_TRAINED = train_digits_mlp()


class TestToyConformance(BackendConformance):
    backend_name = "toy"
    model_suffix = ".npmlp"
    min_cosine = 0.999
    min_dynamic_cosine = 0.999

    def make_model(self) -> NumpyMLP:
        model = _TRAINED[0]
        return NumpyMLP([w.copy() for w in model.weights], [b.copy() for b in model.biases])

    def make_dataset(self) -> inc.Dataset:
        return inc.Dataset(_TRAINED[1][:64], batch_size=16)

    def make_eval_batch(self) -> np.ndarray:
        return _TRAINED[3][:64]  # held out: calibration reads training samples

    def make_wrong_shape_dataset(self) -> inc.Dataset:
        return inc.Dataset(np.zeros((8, 63), np.float32))

    def fingerprint(self, model: NumpyMLP) -> str:
        digest = hashlib.sha256()
        for array in (*model.weights, *model.biases):
            digest.update(array.tobytes())
        return digest.hexdigest()

    def run(self, model, inputs) -> np.ndarray:
        return model(inputs)

    def int8_ops(self, quantized: QuantizedMLP) -> list[str]:
        return [f"fc{i}" for i, layer in enumerate(quantized.layers)
                if isinstance(layer, QuantizedLayer) and layer.weight_q.dtype == np.int8]

    def is_quantized(self, quantized: QuantizedMLP, op_name: str) -> bool:
        return op_name in self.int8_ops(quantized)


@pytest.mark.parametrize("calibration", ["minmax", "percentile", "mse"])
def test_int8_toy_model_keeps_accuracy_within_one_percent(calibration):
    model, x_train, _, x_test, y_test = _TRAINED
    fp32 = accuracy(model, x_test, y_test)
    q = inc.quantize(model, inc.QuantConfig(calibration=calibration), dataset=inc.Dataset(x_train, batch_size=32))
    assert fp32 > 0.9
    assert accuracy(q, x_test, y_test) >= fp32 * 0.99


def test_autotune_recovers_from_a_bad_starting_recipe():
    """A 90th-percentile range clips the activations too hard; basic tuning finds a recipe that meets 1%."""
    from inc_core.tuning import autotune

    model, x_train, _, x_test, y_test = _TRAINED
    tuning = inc.TuningConfig(base=inc.QuantConfig(calibration="percentile", percentile=90.0), tolerable_loss=0.01, max_trials=20)
    result = autotune(model, tuning, eval_fn=lambda m: accuracy(m, x_test, y_test),
                      dataset=inc.Dataset(x_train, batch_size=32))
    assert result.met
    assert result.score >= result.baseline * 0.99
    assert result.trials[0].score < result.baseline * 0.99  # the starting recipe did miss the goal
    assert len(result.trials) > 1
