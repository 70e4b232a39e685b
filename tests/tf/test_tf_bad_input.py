"""Bad input gets the documented inc error with the fix, and never a partial file."""

from __future__ import annotations

import re

import keras
import numpy as np
import pytest
import tf_testmodels as models

import inc_core as inc
import inc_tf
from inc_core.errors import CalibrationError, DatasetError, EvaluationError, SaveError, UnsupportedModelError
from inc_core.testing import cosine
from inc_core.tuning import autotune


class UntraceableNet(keras.Model):
    """Reads a tensor's value in Python: fine eagerly, impossible to trace into a graph."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = keras.layers.Dense(10)

    def call(self, x):
        scale = float(np.asarray(x).mean())
        return self.dense(keras.ops.reshape(x, (-1, 64))) * scale


class TraceableNet(keras.Model):
    def __init__(self) -> None:
        super().__init__()
        self.flat = keras.layers.Flatten()
        self.hidden = keras.layers.Dense(32, activation="relu")
        self.out = keras.layers.Dense(10)

    def call(self, x):
        return self.out(self.hidden(self.flat(x)))


def test_untraceable_subclassed_model(calib, digits):
    model = UntraceableNet()
    model(digits[0][:2])
    with pytest.raises(UnsupportedModelError, match="trace"):
        inc.quantize(model, inc.QuantConfig(calib_samples=16), dataset=calib)


@pytest.mark.parametrize("how", ["build", "called"])
def test_traceable_subclassed_model_is_quantized(how, calib, digits):
    _, x_test, _, _ = digits
    model = TraceableNet()
    if how == "build":
        model.build((None, 8, 8, 1))
    else:
        model(digits[0][:2])
    q = inc.quantize(model, inc.QuantConfig(calib_samples=32), dataset=calib)
    assert "int8" in set(q.tensor_dtypes().values())
    assert {model.hidden.name, model.out.name} <= set(q.int8_layers())
    reference = np.asarray(model(x_test[:64]))
    assert np.mean(np.argmax(q(x_test[:64]), 1) == np.argmax(reference, 1)) > 0.9


def test_unbuilt_model():
    with pytest.raises(UnsupportedModelError, match="not built"):
        inc.quantize(TraceableNet(), inc.QuantConfig(), dataset=np.zeros((4, 8, 8, 1), np.float32))


def test_non_tensorflow_keras_backend(monkeypatch, calib):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(UnsupportedModelError, match="KERAS_BACKEND=tensorflow"):
        inc.quantize(models.cnn(), inc.QuantConfig(), dataset=calib)


@pytest.mark.parametrize(
    "data",
    [np.zeros((8, 8, 8, 3), np.float32), np.zeros((8, 64), np.float32), np.array([["a"] * 64] * 4).reshape(4, 8, 8, 1)],
    ids=["wrong-channels", "flat", "strings"],
)
def test_wrong_calibration_shape_or_dtype(data):
    with pytest.raises(DatasetError, match="(shape|dtype)"):
        inc.quantize(models.cnn(), inc.QuantConfig(), dataset=inc.Dataset(data, batch_size=4))


def test_a_tf_data_pipeline_of_inputs_and_labels_names_labels_true(digits):
    import tensorflow as tf

    x, y = digits[0][:64], digits[1][:64]
    pipeline = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    with pytest.raises(DatasetError, match=re.escape("inc.Dataset(loader, labels=True)")):
        inc.quantize(models.cnn(), inc.QuantConfig(), dataset=pipeline)
    quantized = inc.quantize(models.cnn(), inc.QuantConfig(), dataset=inc.Dataset(pipeline, labels=True))
    assert quantized(x[:4]).shape == (4, 10)


def test_empty_data():
    with pytest.raises(DatasetError, match="no samples"):
        inc.quantize(models.cnn(), inc.QuantConfig(), dataset=inc.Dataset(np.zeros((0, 8, 8, 1), np.float32)))


def test_inf_in_calibration_data(digits):
    batch = digits[0][:8].copy()
    batch[3, 2, 2, 0] = np.inf
    with pytest.raises(CalibrationError, match="Inf"):
        inc.quantize(models.cnn(), inc.QuantConfig(), dataset=inc.Dataset(batch, batch_size=8))


def test_nan_activation_from_the_model(digits):
    """Finite inputs, but the model itself produces NaN (log of a negative activation)."""
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Flatten()(inputs)
    h = keras.layers.Dense(16, kernel_initializer="ones", bias_initializer=keras.initializers.Constant(-100.0))(h)
    h = keras.layers.Lambda(lambda t: keras.ops.log(t))(h)
    model = keras.Model(inputs, keras.layers.Dense(10)(h))
    with pytest.raises(CalibrationError, match="NaN"):
        inc.quantize(model, inc.QuantConfig(calib_samples=16), dataset=inc.Dataset(digits[0][:16], batch_size=8))


def test_eval_fn_that_raises(calib):
    def broken(candidate):
        raise ZeroDivisionError("no labels")

    with pytest.raises(EvaluationError, match="no labels"):
        autotune(models.cnn(), inc.TuningConfig(max_trials=2), eval_fn=broken, dataset=calib)


def test_unwritable_output_leaves_no_partial_file(tmp_path, calib, monkeypatch):
    q = inc.quantize(models.cnn(), inc.QuantConfig(calib_samples=32), dataset=calib)
    with pytest.raises(SaveError, match="does not exist"):
        inc.save(q, tmp_path / "missing" / "model.tflite")
    (tmp_path / "a_dir.tflite").mkdir()
    with pytest.raises(SaveError, match="directory"):
        inc.save(q, tmp_path / "a_dir.tflite")
    def half_write(self, model, path):
        path.write_bytes(model.content[:100])
        raise OSError("disk full")

    monkeypatch.setattr(inc_tf.TfBackend, "save", half_write)
    with pytest.raises(OSError, match="disk full"):
        inc.save(q, tmp_path / "model.tflite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir.tflite"]


def test_litert_model_saved_without_its_suffix(tmp_path, calib):
    # written as it was named, "model" could not be read back: inc.load found no backend for the file
    quantized = inc.quantize(models.cnn(), inc.QuantConfig(), dataset=calib)
    with pytest.raises(SaveError, match=r"\.tflite file; got .*model'. Use a \.tflite path"):
        inc.save(quantized, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_keras_model_saved_under_a_wrong_suffix(tmp_path):
    with pytest.raises(SaveError, match=r"\.keras"):
        inc.save(models.cnn(), tmp_path / "model.bin", backend="tf")
    assert list(tmp_path.iterdir()) == []


def test_dynamic_with_exclude_is_explained():
    from inc_core.errors import ConfigError

    config = inc.QuantConfig(approach="dynamic", exclude=inc.LayerFilter(names=("fc1",)))
    with pytest.raises(ConfigError, match="static"):
        inc.quantize(models.cnn(), config)


def test_dynamic_quantization_of_a_model_without_a_large_weight_says_nothing_would_change():
    """The TF converter's dynamic-range mode leaves weights under 1024 values in float: such a model came back
    unchanged, with no INT8 op and no word."""
    inputs = keras.Input((8, 8))
    h = keras.layers.Flatten()(keras.layers.Conv1D(8, 3, name="conv")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(h))
    with pytest.raises(UnsupportedModelError, match=r"Nothing to quantize.*at least 1024 values.*'logits'\) holds 480.*approach='static'"):
        inc.quantize(model, inc.QuantConfig(approach="dynamic"))


class _Pairwise(keras.layers.Layer):
    """Products of every pair of steps: ``x[:, None] * x[:, :, None]``, as attention masks are built."""

    def call(self, x):
        return keras.ops.sum(x[:, None, :, :] * x[:, :, None, :], axis=2)


def _pairwise_model(steps: int | None) -> keras.Model:
    keras.utils.set_random_seed(0)
    rows = keras.Input((steps, 8), name="rows")
    return keras.Model(rows, keras.layers.Dense(4)(_Pairwise(name="pairwise")(keras.layers.Dense(8)(rows))))


def test_a_new_axis_on_a_free_length_names_the_fixed_size_way_out():
    # the converter's "'tf.StridedSlice' op is neither a custom op nor a flex op" read as "LiteRT has no
    # StridedSlice", which it has; what it lacks is a new axis on a tensor of unknown size
    x = np.random.default_rng(0).normal(size=(32, 6, 8)).astype(np.float32)
    calib = inc.Dataset(x, batch_size=8)
    with pytest.raises(UnsupportedModelError, match=r"inserts an axis .*not fixed.*\(in layer 'pairwise'\).*keras.Input\(shape="):
        inc.quantize(_pairwise_model(None), inc.QuantConfig(), dataset=calib)
    for model, config in ((_pairwise_model(6), inc.QuantConfig()), (_pairwise_model(None), inc.QuantConfig(format="savedmodel"))):
        assert cosine(np.asarray(model(x)), inc.quantize(model, config, dataset=calib)(x)) >= 0.99


class _ScaleWithoutConfig(keras.layers.Layer):
    """A custom layer whose get_config() leaves out the argument its __init__ requires."""

    def __init__(self, factor, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return {"name": self.name}  # Keras would have recorded factor; this one drops it


def test_qat_of_a_layer_its_config_cannot_rebuild_names_the_layer():
    rows = keras.Input((8,), name="rows")
    model = keras.Model(rows, keras.layers.Dense(4)(_ScaleWithoutConfig(2.0, name="scale")(rows)))
    with pytest.raises(UnsupportedModelError, match=r"layer 'scale' \(_ScaleWithoutConfig\) cannot be rebuilt from its get_config\(\).*every argument"):
        inc_tf.prepare_qat(model, inc.QATConfig())
