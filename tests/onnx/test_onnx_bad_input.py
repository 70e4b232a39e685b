"""Each bad input raises the documented IncError subclass, says what to fix, and writes nothing."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_testmodels as models
import pytest
from conftest import sha256
from onnx import TensorProto, helper, numpy_helper

import inc_core as inc
from inc_core.errors import (
    BackendNotFoundError,
    CalibrationError,
    ConfigError,
    DatasetError,
    EvaluationError,
    ModelLoadError,
    SaveError,
    UnsupportedModelError,
)
from inc_core.tuning import autotune


@pytest.fixture
def small_calib(digits):
    return inc.Dataset(digits[0][:32], batch_size=16)


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_corrupt_file(tmp_path, cnn, small_calib):
    good = cnn.SerializeToString()
    path = _write(tmp_path, "truncated.onnx", good[: len(good) // 2])
    with pytest.raises(ModelLoadError, match="is not an ONNX model.*complete"):
        inc.quantize(path, inc.QuantConfig(), dataset=small_calib)
    with pytest.raises(ModelLoadError, match="truncated.onnx"):
        inc.load(path)


@pytest.mark.parametrize("data", [b"name,value\n1,2\n", b"", b"\x00" * 64], ids=["csv", "empty", "zeros"])
def test_non_onnx_file(tmp_path, data, small_calib):
    path = _write(tmp_path, "model.onnx", data)
    with pytest.raises(ModelLoadError, match="not an ONNX model"):
        inc.quantize(path, inc.QuantConfig(), dataset=small_calib)


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="No ONNX model file at"):
        inc.describe(tmp_path / "absent.onnx")


def test_not_a_model_object():
    with pytest.raises(BackendNotFoundError, match="does not accept"):
        inc.describe({"weights": [1, 2]}, backend="onnx")


def test_model_that_fails_the_onnx_checker(cnn):
    broken = onnx.ModelProto()
    broken.CopyFrom(cnn)
    broken.graph.node[1].input[0] = "no_such_tensor"
    with pytest.raises(ModelLoadError, match="not a valid ONNX model.*no_such_tensor"):
        inc.describe(broken)


def test_model_onnx_runtime_cannot_load(tmp_path):
    node = helper.make_node("FancyOp", ["x"], ["y"], name="custom", domain="com.example")
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "custom.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(ModelLoadError, match="ONNX Runtime .* cannot load .*custom.onnx.*FancyOp"):
        inc.quantize(path, inc.QuantConfig(approach="dynamic"))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (np.zeros((8, 65), np.float32), r"shape \(8, 65\).*axis 1: expected 64, got 65"),
        (np.zeros((8, 8, 8), np.float32), "rank 3.*expects rank 2"),
        (np.zeros((8, 64), np.int64), "dtype int64.*expects float32.*astype"),
        (np.array([["a"] * 64] * 4), "dtype <U1"),
        ({"image": np.zeros((8, 64), np.float32)}, r"Unknown: \['image'\]; missing: \['pixels'\]"),
        ((np.zeros((8, 64), np.float32), np.zeros((8, 64), np.float32)), "2 positional arrays for a model with 1 inputs"),
        ((np.zeros((8, 64), np.float32), np.zeros(8, np.int64)), re.escape("inc.Dataset(loader, labels=True)")),
    ],
    ids=["width", "rank", "dtype", "strings", "name", "arity", "labels"],
)
def test_calibration_data_that_does_not_fit(cnn, data, message):
    with pytest.raises(DatasetError, match=message):
        inc.quantize(cnn, inc.QuantConfig(), dataset=inc.Dataset([data]))


def test_float64_data_is_cast_not_rejected(cnn, digits):
    q = inc.quantize(cnn, inc.QuantConfig(calib_samples=16), dataset=inc.Dataset(digits[0][:16].astype(np.float64)))
    assert "QuantizeLinear" in models.op_types(q)


def test_empty_dataset(cnn):
    with pytest.raises(DatasetError, match="no samples"):
        inc.quantize(cnn, inc.QuantConfig(), dataset=inc.Dataset(lambda: iter(())))


@pytest.mark.parametrize(("value", "kind"), [(np.nan, "NaN"), (np.inf, "Inf")])
def test_non_finite_inputs(cnn, digits, value, kind):
    batch = digits[0][:8].copy()
    batch[3, 10] = value
    with pytest.raises(CalibrationError, match=f"'pixels' holds {kind} at calibration batch 1"):
        inc.quantize(cnn, inc.QuantConfig(), dataset=inc.Dataset([digits[0][:8], batch]))


def test_non_finite_activation_inside_the_model(digits):
    # log(x) of a zero pixel is -inf: the data is fine, the model's numerics are not
    weight = numpy_helper.from_array(np.ones((64, 10), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Log", ["pixels"], ["logp"], name="log"), helper.make_node("MatMul", ["logp", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(CalibrationError, match="'logp' holds Inf.*numerics"):
        inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset(digits[0][:8]))


def test_eval_fn_raising_or_returning_nan(cnn, small_calib):
    def raises(model):
        raise ValueError("labels file not found")

    with pytest.raises(EvaluationError, match="labels file not found"):
        autotune(cnn, inc.TuningConfig(max_trials=2), eval_fn=raises, dataset=small_calib)
    calls = {"n": 0}

    def nan_for_int8(model):
        calls["n"] += 1
        return 0.9 if calls["n"] == 1 else math.nan

    with pytest.raises(EvaluationError, match="(?i)nan"):
        autotune(cnn, inc.TuningConfig(max_trials=2), eval_fn=nan_for_int8, dataset=small_calib)


def test_output_in_missing_directory(cnn, small_calib, tmp_path):
    q = inc.quantize(cnn, inc.QuantConfig(calib_samples=16), dataset=small_calib)
    target = tmp_path / "nope" / "model.int8.onnx"
    with pytest.raises(SaveError, match="does not exist"):
        inc.save(q, target)
    assert list(tmp_path.iterdir()) == []


def test_cli_errors_leave_no_output(cnn_file, tmp_path):
    before = sha256(cnn_file)
    bad = tmp_path / "calib.npz"
    np.savez(bad, pixels=np.zeros((4, 65), np.float32))
    out = tmp_path / "out.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "inc_core.cli", "quantize", str(cnn_file), "-o", str(out), "--calib", str(bad)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "expected 64, got 65" in proc.stderr + proc.stdout
    assert not out.exists() and sha256(cnn_file) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "cnn.onnx"]


def test_a_tensor_orts_qdq_quantizer_lacks_parameters_for_is_blamed_on_its_reader(cnn, small_calib, monkeypatch):
    """ORT's QDQ quantizer checks parameters after its loop over the nodes, when its frames hold the last op
    (the Gemm head); the error names the op that reads the unobserved tensor."""
    from inc_onnx import _backend

    observe = _backend.tensors_to_observe
    monkeypatch.setattr(_backend, "tensors_to_observe", lambda *a, **k: [t for t in observe(*a, **k) if t != "r1"])

    with pytest.raises(UnsupportedModelError, match=r"failed on op 'conv2' \(Conv\).*param r1.*names=\('conv2',\)"):
        inc.quantize(cnn, inc.QuantConfig(), dataset=small_calib)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (inc.QuantConfig(exclude=inc.LayerFilter(types=("Conv", "Gemm"))), "keeps every one of the 3 quantizable ops"),
        (inc.QuantConfig(exclude=inc.LayerFilter(names=("conv9",))), "conv9"),
        (inc.QuantConfig(overrides={"fc9": {"granularity": "per_tensor"}}), "fc9"),
    ],
)
def test_a_selection_that_cannot_quantize_is_refused_before_the_calibration_pass(monkeypatch, small_calib, config, match) -> None:
    """`inc quantize --exclude-type ...` excluding every op ran the whole calibration pass before refusing."""
    import inc_onnx._backend

    def no_pass(*args, **kwargs):
        raise AssertionError("the calibration pass ran")

    monkeypatch.setattr(inc_onnx._backend, "collect", no_pass)
    with pytest.raises(ConfigError, match=match):
        inc.quantize(models.cnn(), config, dataset=small_calib)
