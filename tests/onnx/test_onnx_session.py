"""inc_onnx.session_options and create_session: ORT settings for INT8 inference."""

from __future__ import annotations

import numpy as np
import onnx_testmodels as models
import onnxruntime as ort
import pytest

import inc_core as inc
import inc_onnx
from inc_core.errors import BackendNotFoundError, ConfigError, ModelLoadError


def test_session_options_for_int8():
    options = inc_onnx.session_options(threads=2)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.get_session_config_entry("session.enable_quant_qdq_cleanup") == "1"
    assert options.get_session_config_entry("session.set_denormal_as_zero") == "1"
    assert inc_onnx.session_options(spinning=False).get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"threads": 0}, "threads"), ({"optimization": "max"}, "optimization"), ({"log_severity": 9}, "log_severity")],
)
def test_session_options_reject_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        inc_onnx.session_options(**kwargs)


def test_create_session_runs_the_int8_model(cnn, digits, cnn_file):
    q = inc.quantize(cnn, inc.QuantConfig(calib_samples=32), dataset=inc.Dataset(digits[0][:32]))
    session = inc_onnx.create_session(q, threads=1)
    logits = session.run(None, {"pixels": digits[1][:20]})[0]
    np.testing.assert_array_equal(np.argmax(logits, 1), np.argmax(models.run(q, digits[1][:20]), 1))
    assert inc_onnx.create_session(cnn_file).get_inputs()[0].name == "pixels"
    with pytest.raises(ConfigError, match="either options"):
        inc_onnx.create_session(cnn, inc_onnx.session_options(), threads=1)


def test_create_session_reports_unloadable_models(tmp_path):
    path = tmp_path / "x.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="not an ONNX model"):
        inc_onnx.create_session(path)


def test_backend_identity():
    backend = inc.get_backend("onnx")
    assert isinstance(backend, inc_onnx.OnnxBackend)
    assert backend.formats == ("qdq", "qoperator") and backend.check_format("default") == "qdq"
    assert "onnxruntime " + ort.__version__ in backend.version()
    assert "onnx" in inc.installed_backends()


def test_openvino_runtime_without_openvino_names_the_extra(cnn, digits):
    try:
        import openvino  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("OpenVINO is installed here; tests/openvino covers it")
    with pytest.raises(BackendNotFoundError, match=r"needs the OpenVINO runtime.*pip install 'inc-onnx\[openvino\]'"):
        inc_onnx.create_session(cnn, runtime="openvino")
    with pytest.raises(BackendNotFoundError, match=r"inc-onnx\[openvino\]"):
        inc.benchmark(cnn, digits[1][:2], warmup=0, iterations=1, backend=inc_onnx.OnnxBackend(runtime="openvino"))
    # "auto", the default, is ONNX Runtime here, without a measurement.
    assert isinstance(inc_onnx.create_session(cnn, threads=1), ort.InferenceSession)
    choice = inc_onnx.choose_runtime(cnn, threads=1)
    assert choice.runtime == "ort" and choice.latency_ms == {} and "not installed" in choice.reason
    with pytest.raises(ConfigError, match=r"runtime='cuda' is not one of \['auto', 'ort', 'openvino'\]"):
        inc_onnx.create_session(cnn, runtime="cuda")
