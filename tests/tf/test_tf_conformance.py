"""The backend conformance checks every inc plugin passes, on a trained digits CNN (Keras -> LiteRT int8)."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tf_testmodels as models

import inc_core as inc
from inc_core.testing import BackendConformance
from inc_tf import LiteRTModel


class TestTfConformance(BackendConformance):
    backend_name = "tf"
    model_suffix = ".tflite"
    min_cosine = 0.999
    min_dynamic_cosine = 0.999

    def make_model(self) -> keras.Model:
        return models.cnn()

    def make_dataset(self) -> inc.Dataset:
        return inc.Dataset(models.digits()[0][:64], batch_size=16)

    def make_wrong_shape_dataset(self) -> inc.Dataset:
        return inc.Dataset(np.zeros((8, 65), dtype=np.float32), batch_size=4)

    def fingerprint(self, model: keras.Model) -> Any:
        return models.fingerprint(model)

    def run(self, model: Any, inputs: Any) -> np.ndarray:
        if isinstance(model, keras.Model):
            return np.asarray(model(inputs, training=False))
        return model(inputs)

    def int8_ops(self, quantized: LiteRTModel) -> list[str]:
        return quantized.int8_layers()

    def is_quantized(self, quantized: LiteRTModel, op_name: str) -> bool:
        return op_name in quantized.int8_layers()
