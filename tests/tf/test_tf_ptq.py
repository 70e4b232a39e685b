"""LiteRT int8 from Keras models: int8 tensors in the .tflite, accuracy within 1% after inc.autotune."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tf_testmodels as models

import inc_core as inc
from inc_core.tuning import autotune


def test_sequential_mlp_int8_tensors_and_accuracy(digits, calib):
    _, x_test, _, y_test = digits
    model = models.mlp()
    dense = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [op.name for op in inc.describe(model).ops] == dense and len(dense) == 3
    q = inc.quantize(model, inc.QuantConfig(calibration="percentile", calib_samples=128), dataset=calib)
    dtypes = q.tensor_dtypes()
    assert sum(d == "int8" for d in dtypes.values()) >= 6, dtypes
    assert q.op_names().count("FULLY_CONNECTED") == 3 and "QUANTIZE" in q.op_names()
    # auto-generated names (dense_<n>) map back exactly, though the converter's scopes add suffixes of their own
    assert set(dense) <= set(q.int8_layers())
    fp32, int8 = models.accuracy(model, x_test, y_test), models.accuracy(q, x_test, y_test)
    assert int8 >= fp32 - 0.01, f"FP32 {fp32:.4f} vs INT8 {int8:.4f}"


def test_autotune_within_one_percent_and_round_trips(digits, tmp_path):
    x_train, x_test, y_train, y_test = digits
    model = models.cnn()
    x_val, y_val = x_train[-300:], y_train[-300:]

    def eval_fn(candidate):
        return models.accuracy(candidate, x_val, y_val)

    tuning = inc.TuningConfig(
        base=inc.QuantConfig(calibration="kl", calib_samples=256), tolerable_loss=0.01, max_trials=10,
        history=str(tmp_path / "tuning.json"),
    )
    result = autotune(model, tuning, eval_fn=eval_fn, dataset=inc.Dataset(x_train[:256], batch_size=32))
    assert result.met, [(t.change, t.score) for t in result.trials]
    fp32, int8 = models.accuracy(model, x_test, y_test), models.accuracy(result.model, x_test, y_test)
    assert int8 >= fp32 - 0.01, f"FP32 {fp32:.4f} vs INT8 {int8:.4f}"
    path = inc.save(result.model, tmp_path / "digits.tflite")
    loaded = inc.load(path)
    assert {"conv1", "conv2", "fc1", "logits"} <= set(loaded.int8_layers())
    assert models.accuracy(loaded, x_test, y_test) == int8


def test_symmetric_per_tensor_recipe(digits, calib):
    _, x_test, _, y_test = digits
    model = models.cnn()
    config = inc.QuantConfig(calibration="mse", scheme="sym", granularity="per_tensor", activation_dtype="int8")
    q = inc.quantize(model, config, dataset=calib)
    fp32, int8 = models.accuracy(model, x_test, y_test), models.accuracy(q, x_test, y_test)
    assert int8 >= fp32 - 0.01, f"FP32 {fp32:.4f} vs INT8 {int8:.4f}"


def _activation_zero_points(q) -> list[int]:
    """The zero point of every per-tensor int8 tensor of a LiteRT model (its activations)."""
    details = q.interpreter().get_tensor_details()
    return [
        int(d["quantization_parameters"]["zero_points"][0]) for d in details
        if d["dtype"] == np.int8 and len(d["quantization_parameters"]["zero_points"]) == 1
    ]


def _savedmodel_input_ranges(q) -> list[tuple[float, float]]:
    """(min, max) of every QuantizeV2 of an INT8 SavedModel (what its int8 kernels read)."""
    from tensorflow.python.framework import tensor_util

    consts = {n.name: float(tensor_util.MakeNdarray(n.attr["value"].tensor)) for n in q.graph_def.node if n.op == "Const"
              and n.attr["value"].tensor.tensor_shape.dim == []}
    return [(consts[n.input[1]], consts[n.input[2]]) for n in q.graph_def.node if n.op == "QuantizeV2"]


def test_scheme_sym_centres_every_activation_range(digits, calib):
    # scheme="sym" was handed to the observers, which only search differently for kl/mse; minmax ranges went to
    # both targets as they were, so "sym" changed nothing (autotune spent trials on it; zero points -22, 63)
    model = models.cnn()
    asym = _activation_zero_points(inc.quantize(model, inc.QuantConfig(), dataset=calib))
    sym = _activation_zero_points(inc.quantize(model, inc.QuantConfig(scheme="sym"), dataset=calib))
    assert any(abs(z) > 1 for z in asym) and sym and all(z in (0, -1) for z in sym), (asym, sym)  # [-a, a] on 255 steps
    sm_asym, sm_sym = (
        _savedmodel_input_ranges(inc.quantize(model, inc.QuantConfig(scheme=s, format="savedmodel"), dataset=calib))
        for s in ("asym", "sym")
    )
    # a conv reads a signed input as symmetric qint8 under either scheme; a MatMul reads its input shifted by the
    # range's low end (unsigned, width 2a under "sym"), and a ReLU output stops being read as unsigned [0, a]
    assert sm_sym != sm_asym and all(low == -high for low, high in sm_sym if low < 0), (sm_asym, sm_sym)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])  # .h5: the legacy HDF5 format Keras 3 still loads
def test_keras_file_is_quantized_from_its_path(digits, calib, tmp_path, suffix):
    path = tmp_path / f"cnn{suffix}"
    models.cnn().save(path)
    q = inc.quantize(str(path), inc.QuantConfig(calib_samples=64), dataset=calib)
    assert "conv1" in q.int8_layers()


def test_mse_strategy_ranks_layers_by_their_int8_error(digits, calib):
    x_train, _, _, _ = digits
    backend = inc.get_backend("tf")
    model = models.cnn()
    config = inc.QuantConfig(calib_samples=64)
    errors = backend.op_errors(model, config, calibration=None, dataset=inc.Dataset(x_train[:64], batch_size=16))
    assert set(errors) == {"conv1", "conv2", "fc1", "logits"}
    assert all(value > 0 for value in errors.values()), errors
    model_fp32 = models.cnn()
    result = autotune(
        model_fp32,
        inc.TuningConfig(base=config, strategy="mse", tolerable_loss=0.02, max_trials=3),
        eval_fn=lambda candidate: models.accuracy(candidate, x_train[-300:], digits[2][-300:]),
        dataset=calib,
    )
    assert result.met


def test_cli_quantizes_a_keras_file(tmp_path, capsys):
    from inc_core.cli import main

    source = tmp_path / "mlp.keras"
    models.mlp().save(source)
    calib = tmp_path / "calib.npz"
    np.savez(calib, pixels=models.digits()[0][:64])
    out = tmp_path / "mlp.int8.tflite"
    code = main(["quantize", str(source), "-o", str(out), "--calib", str(calib), "--calib-batch-size", "16"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "3 FULLY_CONNECTED" in printed.out, printed.out
    assert inc.get_backend("tf").int8_op_counts(inc.load(out))["FULLY_CONNECTED"] == 3


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16", "float16", "bfloat16", "float64"])
def test_a_mixed_precision_model_quantizes_every_layer(policy, digits):
    """Layers computing in 16 bits did not convert to LiteRT ("Could not translate MLIR to FlatBuffer"), and the
    SavedModel target left them out of INT8. inc converts the float32 the variables are kept in. With variables in
    16 bits too (a ``float16``/``bfloat16`` policy) or in 64 bits (``float64``), LiteRT named the layers'
    Conv2D/MatMul/BiasAdd as TF ops it lacks and the SavedModel target found no Conv2D or MatMul: inc converts
    their float32 copy."""
    x_train, x_test, _, _ = digits
    model = models.build_mixed_precision_cnn(policy)
    reference = model.predict(x_test, verbose=0).argmax(1)
    calib = inc.Dataset(x_train[:64], batch_size=32)
    for config, kernels in [(inc.QuantConfig(), {"CONV_2D": 1, "FULLY_CONNECTED": 1}),
                            (inc.QuantConfig(format="savedmodel"), {"_FusedQuantizedConv2D": 1, "QuantizedMatMulWithBiasAndDequantize": 1})]:
        q = inc.quantize(model, config, dataset=calib)
        counts = inc.resolve_backend(q).int8_op_counts(q)
        assert all(counts.get(op) == n for op, n in kernels.items()), counts
        assert float(np.mean(np.asarray(q(x_test)).argmax(1) == reference)) >= 0.98
    assert model.get_layer("conv").dtype_policy.name == policy  # the user's model keeps its policy
