"""The same INT8 ONNX file on ONNX Runtime and on OpenVINO: fidelity, int8 execution, the runtime choice, errors."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnx_testmodels as models
import onnxruntime as ort
import pytest

import inc_core as inc
import inc_onnx
from inc_core.cli import main
from inc_core.errors import BackendNotFoundError, ConfigError, DatasetError
from inc_onnx.runtime import _openvino, _runtime


def _runtime_precisions(session: inc_onnx.OpenVinoSession) -> dict[str, set[str]]:
    """Per layer type of OpenVINO's executed graph, the precisions its nodes run in."""
    found: dict[str, set[str]] = {}
    for op in session.compiled_model.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" in info and "runtimePrecision" in info:
            found.setdefault(info["layerType"].astype(str), set()).add(info["runtimePrecision"].astype(str))
    return found


@pytest.mark.parametrize("fixture", ["int8_cnn", "int8_mlp"])
def test_same_int8_file_gives_the_same_outputs_on_both_runtimes(fixture, digits, request, tmp_path):
    model: onnx.ModelProto = request.getfixturevalue(fixture)
    path = tmp_path / "model.int8.onnx"
    onnx.save_model(model, str(path))
    before = path.read_bytes()
    x, y = digits[1], digits[3]
    on_ort = inc_onnx.create_session(path, runtime="ort", threads=1)
    on_ov = inc_onnx.create_session(path, runtime="openvino", threads=1)
    assert isinstance(on_ort, ort.InferenceSession) and isinstance(on_ov, inc_onnx.OpenVinoSession)
    assert [i.name for i in on_ov.get_inputs()] == [i.name for i in on_ort.get_inputs()] == ["pixels"]
    assert on_ov.get_inputs()[0].type == "tensor(float)" and on_ov.get_inputs()[0].shape == [None, 64]
    assert [o.name for o in on_ov.get_outputs()] == ["logits"]
    ref = on_ort.run(None, {"pixels": x})[0]
    got = on_ov.run(["logits"], {"pixels": x})[0]
    assert got.shape == ref.shape == (len(x), 10) and got.dtype == np.float32
    # Both run the same int8 kernels on the same scales; rounding of requantized values may differ by a
    # step here and there (more so between VNNI and AMX), far below the gap between classes.
    scale = float(np.max(np.abs(ref)))
    assert float(np.max(np.abs(got - ref))) < 0.1 * scale
    assert float(np.mean(np.abs(got - ref))) < 0.01 * scale
    assert np.mean(np.argmax(got, 1) == np.argmax(ref, 1)) >= 0.98
    acc_ort, acc_ov = float(np.mean(np.argmax(ref, 1) == y)), float(np.mean(np.argmax(got, 1) == y))
    assert acc_ov > 0.9 and abs(acc_ov - acc_ort) <= 0.01
    assert path.read_bytes() == before  # the standard ONNX file is read as it is, never rewritten


def test_openvino_runs_the_convolutions_and_matmuls_in_int8(int8_cnn, int8_mlp):
    cnn = _runtime_precisions(inc_onnx.create_session(int8_cnn, runtime="openvino", threads=1))
    mlp = _runtime_precisions(inc_onnx.create_session(int8_mlp, runtime="openvino", threads=1))
    int8 = {"u8", "i8"}
    assert cnn.get("Convolution", set()) and cnn["Convolution"] <= int8, cnn
    assert cnn.get("FullyConnected", set()) & int8, cnn  # the Gemm head
    assert mlp.get("FullyConnected", set()) and mlp["FullyConnected"] <= int8, mlp


def test_f32_precision_keeps_float_ops_out_of_bf16(int8_cnn, digits):
    # Without the hint OpenVINO runs float ops in bf16 on CPUs with AVX512-BF16 or AMX.
    session = inc_onnx.create_session(int8_cnn, runtime="openvino", threads=1)
    assert session.properties["INFERENCE_PRECISION_HINT"] == "f32"
    precisions = set().union(*_runtime_precisions(session).values())
    assert "bf16" not in precisions and "f16" not in precisions, precisions
    default = inc_onnx.create_session(int8_cnn, runtime="openvino", threads=1, openvino_precision="default")
    assert "INFERENCE_PRECISION_HINT" not in default.properties
    logits = default.run(None, {"pixels": digits[1]})[0]
    assert np.mean(np.argmax(logits, 1) == digits[3]) > 0.9


def test_auto_measures_both_runtimes_and_records_its_choice(int8_cnn, digits):
    session = inc_onnx.create_session(int8_cnn, runtime="auto", threads=1)
    logits = session.run(None, {"pixels": digits[1]})[0]
    assert np.mean(np.argmax(logits, 1) == digits[3]) > 0.9
    choice = inc_onnx.choose_runtime(int8_cnn, threads=1)
    assert choice.runtime in ("ort", "openvino") and set(choice.latency_ms) == {"ort", "openvino"}
    assert all(v > 0 for v in choice.latency_ms.values())
    assert choice.latency_ms[choice.runtime] == min(choice.latency_ms.values())
    assert choice.threads == 1 and choice.cpu and f"{choice.runtime} " in choice.reason
    # The session auto returned runs on the runtime it chose.
    assert isinstance(session, inc_onnx.OpenVinoSession if choice.runtime == "openvino" else ort.InferenceSession)
    # Measured once: asking again (even through the file's bytes) returns the recorded choice.
    assert inc_onnx.choose_runtime(onnx.load_from_string(int8_cnn.SerializeToString()), threads=1) is choice
    assert choice in _runtime.cached_choices().values()


def test_backend_benchmarks_on_the_named_runtime_and_records_auto(int8_cnn, digits):
    x = digits[1][:8]
    result = inc.benchmark(int8_cnn, x, warmup=2, iterations=5, backend=inc_onnx.OnnxBackend(runtime="openvino"))
    assert result.backend == "onnx" and result.iterations == 5 and result.batch_size == 8
    auto = inc_onnx.OnnxBackend()
    assert auto.runtime == "auto" and auto.options() == {"runtime": "auto", "openvino_precision": "f32"}
    inc.benchmark(int8_cnn, x, warmup=1, iterations=3, cores_per_instance=1, backend=auto)
    assert auto.last_choice is not None and auto.last_choice.runtime in ("ort", "openvino")
    assert "openvino" in auto.version()


def test_cli_bench_takes_the_runtime(int8_cnn, digits, tmp_path, capsys):
    path, inputs = tmp_path / "m.onnx", tmp_path / "x.npz"
    onnx.save_model(int8_cnn, str(path))
    np.savez(inputs, pixels=digits[1][:4])
    rc = main(["bench", str(path), "--inputs", str(inputs), "--runtime", "openvino", "--warmup", "1", "--iterations", "3"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "(onnx backend): batch size 4" in captured.out
    rc = main(["bench", str(path), "--inputs", str(inputs), "--runtime", "tensorrt"])
    err = capsys.readouterr().err
    assert rc == 2 and "runtime='tensorrt' is not one of ['auto', 'ort', 'openvino']" in err


def test_missing_openvino_names_the_extra_and_auto_falls_back_to_ort(int8_cnn, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    _openvino._core.cache_clear()
    monkeypatch.setattr(_runtime, "_choices", {})
    with pytest.raises(BackendNotFoundError, match=r"pip install 'inc-onnx\[openvino\]'") as info:
        inc_onnx.create_session(int8_cnn, runtime="openvino")
    assert isinstance(info.value, ImportError)
    with pytest.raises(BackendNotFoundError, match=r"inc-onnx\[openvino\]"):
        inc.benchmark(int8_cnn, np.zeros((1, 64), np.float32), warmup=0, iterations=1,
                      backend=inc_onnx.OnnxBackend(runtime="openvino"))
    assert isinstance(inc_onnx.create_session(int8_cnn, runtime="auto", threads=1), ort.InferenceSession)
    choice = inc_onnx.choose_runtime(int8_cnn, threads=1)
    assert choice.runtime == "ort" and choice.latency_ms == {} and "not installed" in choice.reason
    _openvino._core.cache_clear()


def test_unknown_runtime_and_bad_options_are_config_errors(int8_cnn):
    with pytest.raises(ConfigError, match=r"runtime='tensorrt' is not one of \['auto', 'ort', 'openvino'\]"):
        inc_onnx.create_session(int8_cnn, runtime="tensorrt")
    with pytest.raises(ConfigError, match=r"runtime='gpu' is not one of"):
        inc_onnx.OnnxBackend(runtime="gpu")
    with pytest.raises(ConfigError, match=r"openvino_precision='fp8' is not one of \['f32', 'bf16', 'default'\]"):
        inc_onnx.create_session(int8_cnn, runtime="openvino", openvino_precision="fp8")
    with pytest.raises(ConfigError, match="OpenVINO does not take"):
        inc_onnx.create_session(int8_cnn, inc_onnx.session_options(), runtime="openvino")


def test_openvino_session_reports_bad_feeds(int8_cnn):
    session = inc_onnx.create_session(int8_cnn, runtime="openvino", threads=1)
    with pytest.raises(DatasetError, match=r"inputs \['image'\] given, but the model's inputs are \['pixels'\]"):
        session.run(None, {"image": np.zeros((1, 64), np.float32)})
    with pytest.raises(DatasetError, match=r"no output named \['probs'\]"):
        session.run(["probs"], {"pixels": np.zeros((1, 64), np.float32)})
    with pytest.raises(DatasetError, match=r"input 'pixels' has shape \[1, 63\], but the model expects \['\?', 64\]"):
        session.run(None, {"pixels": np.zeros((1, 63), np.float32)})
    with pytest.raises(DatasetError, match="OpenVINO could not run the model"):
        session.run(None, {"pixels": np.array([["a"] * 64])})


def test_the_float_model_matches_too(digits):
    fp32 = models.cnn()
    ref = inc_onnx.create_session(fp32, runtime="ort", threads=1).run(None, {"pixels": digits[1]})[0]
    got = inc_onnx.create_session(fp32, runtime="openvino", threads=1).run(None, {"pixels": digits[1]})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3 * float(np.max(np.abs(ref))))
