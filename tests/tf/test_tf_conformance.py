"""The backend conformance checks every inc plugin passes, on a trained digits CNN (Keras -> LiteRT int8, and
its SavedModel export -> the SavedModel INT8 target)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_testmodels as models

import inc_core as inc
from inc_core.testing import BackendConformance
from inc_tf import LiteRTModel, TFSavedModel


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


class TestTfSavedModelConformance(BackendConformance):
    """The same checks on the SavedModel INT8 target, with a SavedModel directory (``model.export``) as input."""

    backend_name = "tf"
    model_suffix = ".savedmodel"
    supports_dynamic = False
    min_cosine = 0.999
    min_dynamic_cosine = 0.999

    @pytest.fixture(autouse=True)
    def _export_dir(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._source = _exported_cnn(tmp_path_factory)

    def make_model(self) -> Path:
        return self._source

    def make_dataset(self) -> inc.Dataset:
        return inc.Dataset(models.digits()[0][:64], batch_size=16)

    def make_wrong_shape_dataset(self) -> inc.Dataset:
        return inc.Dataset(np.zeros((8, 65), dtype=np.float32), batch_size=4)

    def fingerprint(self, model: Path) -> Any:
        return sorted((str(p.relative_to(model)), p.read_bytes()) for p in model.rglob("*") if p.is_file())

    def run(self, model: Any, inputs: Any) -> np.ndarray:
        if isinstance(model, Path):
            serve = tf.saved_model.load(str(model)).signatures["serving_default"]
            return next(iter(serve(tf.constant(inputs)).values())).numpy()
        return model(inputs)

    def int8_ops(self, quantized: TFSavedModel) -> list[str]:
        return quantized.int8_layers()

    def is_quantized(self, quantized: TFSavedModel, op_name: str) -> bool:
        return op_name in quantized.int8_layers()


_EXPORTED: dict[str, Path] = {}


def _exported_cnn(factory: pytest.TempPathFactory) -> Path:
    """The trained digits CNN written once per session as a SavedModel directory by Keras' own model.export."""
    if "cnn" not in _EXPORTED:
        path = factory.mktemp("savedmodel") / "digits_cnn"
        models.cnn().export(str(path), verbose=False)
        _EXPORTED["cnn"] = path
    return _EXPORTED["cnn"]
