"""BF16 mixed precision on the ONNX backend: ops kept out of INT8 run in BF16 on OpenVINO, FP32 on ONNX Runtime."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnx_testmodels as models
import pytest
from onnx import numpy_helper

import inc_core as inc
import inc_onnx
from inc_core.errors import ConfigError, ModelLoadError
from inc_onnx.runtime import _bf16, _openvino


@pytest.fixture
def bf16_cpu(monkeypatch):
    """Where this CPU lacks BF16 instructions (inc refuses BF16 there: emulated, it is slower than FP32), stand in
    a CPU whose OpenVINO plugin lists BF16, so the rewrite and its runtime precisions are checked on every CPU:
    OpenVINO still runs the bf16 Converts and ops it is given, emulating them with the same BF16 rounding."""
    if "BF16" not in _bf16._cpu_capabilities():
        monkeypatch.setattr(_bf16, "_cpu_capabilities", lambda: ("FP32", "INT8", "BF16"))


def _runtime_nodes(session: inc_onnx.OpenVinoSession) -> dict[str, tuple[str, str]]:
    """OpenVINO's executed graph: node name -> (layer type, runtime precision)."""
    found = {}
    for op in session.compiled_model.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" in info and "runtimePrecision" in info:
            found[op.get_friendly_name()] = (info["layerType"].astype(str), info["runtimePrecision"].astype(str))
    return found


def _compute_precisions(session: inc_onnx.OpenVinoSession) -> dict[str, str]:
    """Precision of each convolution / fully connected node, keyed by the ONNX op it came from."""
    out = {}
    for name, (layer, precision) in _runtime_nodes(session).items():
        if layer in ("Convolution", "FullyConnected", "MatMul"):
            out[name.split("/")[0]] = precision
    return out


def _quantize(model: onnx.ModelProto, digits, **config) -> onnx.ModelProto:
    return inc.quantize(model, inc.QuantConfig(calib_samples=256, **config), dataset=inc.Dataset(digits[0][:256], batch_size=32))


@pytest.mark.usefixtures("bf16_cpu")
def test_chosen_conv_runs_in_bf16_on_openvino_and_fp32_on_ort(digits, tmp_path):
    fp32 = models.cnn()
    q = _quantize(fp32, digits, bf16=inc.LayerFilter(names=("conv2",)))
    path = tmp_path / "cnn.mixed.onnx"
    onnx.save_model(q, str(path))
    saved = onnx.load(str(path))
    meta = {p.key: p.value for p in saved.metadata_props}
    assert json.loads(meta[_bf16.BF16_OPS_KEY]) == ["conv2"]
    assert json.loads(meta[inc_onnx.METADATA_KEY])["bf16"]["names"] == ["conv2"]
    # The file stays standard ONNX: conv2 is a float Conv reading a float weight, conv1 and fc read int8 weights.
    nodes = {n.name: n for n in saved.graph.node}
    assert nodes["conv2"].op_type == "Conv" and nodes["conv2"].input[1] == "conv2.weight"
    assert "conv1.weight_quantized" in models.int8_initializers(saved)
    assert "conv2.weight" not in models.int8_initializers(saved)

    on_ort = inc_onnx.create_session(path, runtime="ort", threads=1)
    on_ov = inc_onnx.create_session(path, runtime="openvino", threads=1)
    assert on_ov.bf16_ops == ("conv2",)
    precisions = _compute_precisions(on_ov)
    assert precisions["conv2"] == "bf16", precisions
    assert precisions["conv1"] in ("u8", "i8") and precisions["fc"] in ("u8", "i8"), precisions
    # Every other float op keeps f32: only conv2 (and the converts around it) changed precision.
    bf16_nodes = [n for n, (layer, p) in _runtime_nodes(on_ov).items() if p == "bf16" and layer not in ("Convert", "Reorder")]
    assert all(n.startswith(("conv2/", "Convert_")) for n in bf16_nodes), bf16_nodes

    x, y = digits[1], digits[3]
    ref = on_ort.run(None, {"pixels": x})[0]
    got = on_ov.run(None, {"pixels": x})[0]
    scale = float(np.max(np.abs(ref)))
    # BF16 keeps 8 mantissa bits: conv2's outputs move by ~0.4% of their size, less than an INT8 step.
    assert float(np.mean(np.abs(got - ref))) < 0.01 * scale
    assert np.mean(np.argmax(got, 1) == np.argmax(ref, 1)) >= 0.98
    float_acc = models.accuracy(fp32, x, y)
    assert float(np.mean(np.argmax(got, 1) == y)) >= float_acc - 0.02


@pytest.mark.usefixtures("bf16_cpu")
def test_exclude_wins_over_bf16(digits):
    q = _quantize(models.cnn(), digits, bf16=inc.LayerFilter(types=("Conv",)), exclude=inc.LayerFilter(names=("conv2",)))
    assert _bf16.recorded_bf16_ops(q) == ("conv1",)
    session = inc_onnx.create_session(q, runtime="openvino", threads=1)
    precisions = _compute_precisions(session)
    assert precisions["conv1"] == "bf16" and precisions["conv2"] == "f32" and precisions["fc"] in ("u8", "i8"), precisions
    logits = session.run(None, {"pixels": digits[1]})[0]
    assert np.mean(np.argmax(logits, 1) == digits[3]) > 0.9


@pytest.mark.usefixtures("bf16_cpu")
def test_bf16_gemm_between_int8_gemms(digits):
    # The MLP's MatMul + Add layers become Gemm nodes fc0, fc1, fc2 when inc prepares the model.
    q = _quantize(models.mlp(), digits, bf16=inc.LayerFilter(names=("fc1",)))
    session = inc_onnx.create_session(q, runtime="openvino", threads=1, openvino_precision="f32")
    precisions = _compute_precisions(session)
    assert precisions == {"fc0": precisions["fc0"], "fc1": "bf16", "fc2": precisions["fc2"]}, precisions
    assert {precisions["fc0"], precisions["fc2"]} <= {"u8", "i8"}, precisions
    ref = inc_onnx.create_session(q, runtime="ort", threads=1).run(None, {"pixels": digits[1]})[0]
    got = session.run(None, {"pixels": digits[1]})[0]
    assert np.mean(np.argmax(got, 1) == np.argmax(ref, 1)) >= 0.98


def _outlier_mlp() -> tuple[onnx.ModelProto, float]:
    """The digits MLP reading one pixel 1000x larger (its weights 1000x smaller): the same function, but an
    input whose per-tensor INT8 scale is set by that one pixel, so the first layer is useless in INT8 and
    fine in BF16 (8 mantissa bits, whatever the magnitude)."""
    model = models.mlp()
    weight = next(i for i in model.graph.initializer if i.name == "fc0.weight")
    w = numpy_helper.to_array(weight).copy()
    w[36] /= 1000.0
    weight.CopyFrom(numpy_helper.from_array(w, "fc0.weight"))
    return model, 1000.0


def _scaled(x: np.ndarray, factor: float) -> np.ndarray:
    x = x.copy()
    x[:, 36] *= factor
    return x


@pytest.mark.usefixtures("bf16_cpu")
def test_autotune_falls_back_to_bf16_and_reports_each_precision(digits, tmp_path):
    model, factor = _outlier_mlp()
    x_calib, x_eval, y_eval = _scaled(digits[0][:256], factor), _scaled(digits[1], factor), digits[3]

    def accuracy_on_openvino(candidate: onnx.ModelProto) -> float:
        # Evaluated where BF16 runs: ONNX Runtime would run the BF16 ops in FP32.
        logits = inc_onnx.create_session(candidate, runtime="openvino", threads=1).run(None, {"pixels": x_eval})[0]
        return float(np.mean(np.argmax(logits, 1) == y_eval))

    base = inc.QuantConfig(calib_samples=256)
    int8_only = accuracy_on_openvino(inc.quantize(model, base, dataset=inc.Dataset(x_calib, batch_size=32)))
    baseline = accuracy_on_openvino(model)
    assert baseline > 0.9 and int8_only < baseline - 0.1, (baseline, int8_only)
    tuning = inc.TuningConfig(
        base=base, strategy="basic", fallback_precision="bf16", tolerable_loss=0.02, max_trials=8,
        search_space={key: (str(getattr(base, key)),) for key in ("calibration", "granularity", "scheme", "activation_dtype")},
    )
    result = inc.autotune(model, tuning, eval_fn=accuracy_on_openvino, dataset=inc.Dataset(x_calib, batch_size=32))
    assert result.met and result.score >= baseline - 0.02
    assert result.precisions["fc0"] == "bf16", result.precisions
    assert "fp32" not in result.precisions.values() and "int8" in result.precisions.values()
    assert "fc0" in result.config.bf16.names and not result.config.exclude
    assert _bf16.recorded_bf16_ops(result.model) == tuple(n for n, p in result.precisions.items() if p == "bf16")
    report = result.report(tmp_path / "report.md").read_text(encoding="utf-8")
    bf16_row = next(line for line in report.splitlines() if line.startswith("| bf16 |"))
    assert "fc0" in bf16_row


@pytest.mark.usefixtures("bf16_cpu")
def test_bf16_names_matching_no_op_and_every_op_out_of_int8_are_config_errors(digits):
    with pytest.raises(ConfigError, match=r"\['conv_2'\] match no op"):
        _quantize(models.cnn(), digits, bf16=inc.LayerFilter(names=("conv_2",)))
    backend = inc_onnx.OnnxBackend(runtime="openvino")
    config = inc.QuantConfig(bf16=inc.LayerFilter(types=("Conv",)), exclude=inc.LayerFilter(names=("fc",)))
    with pytest.raises(ConfigError, match=r"exclude= and bf16= keep every one of the 3 quantizable ops out of INT8"):
        backend.quantize(models.cnn(), config, calibration=None)


def test_ort_runtime_refuses_bf16_ops(digits):
    config = inc.QuantConfig(calib_samples=64, bf16=inc.LayerFilter(names=("conv2",)))
    with pytest.raises(ConfigError, match=r"runtime='ort'.*no BF16 kernels.*exclude= instead"):
        inc.quantize(models.cnn(), config, dataset=digits[0][:64], backend=inc_onnx.OnnxBackend(runtime="ort"))
    tuning = inc.TuningConfig(fallback_precision="bf16")
    with pytest.raises(ConfigError, match=r"fallback_precision='bf16'.*runtime='ort'"):
        inc.autotune(models.cnn(), tuning, eval_fn=lambda m: 1.0, dataset=digits[0][:64],
                     backend=inc_onnx.OnnxBackend(runtime="ort"))


def test_openvino_lists_bf16_exactly_where_the_cpu_flags_have_it(digits):
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        flags = {word for line in cpuinfo if line.startswith("flags") for word in line.split(":", 1)[1].split()}
    has_bf16 = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert ("BF16" in _bf16._cpu_capabilities()) == has_bf16, (sorted(flags & {"avx512_bf16", "amx_bf16"}), _bf16._cpu_capabilities())
    if not has_bf16:  # e.g. AVX-512 without BF16, or a Xeon whose hypervisor hides AVX512-BF16/AMX: refused for real
        config = inc.QuantConfig(calib_samples=64, bf16=inc.LayerFilter(names=("conv2",)))
        with pytest.raises(ConfigError, match=r"has no BF16 instructions.*without 'BF16'.*exclude= instead"):
            inc.quantize(models.cnn(), config, dataset=digits[0][:64])


def test_missing_openvino_or_bf16_instructions_are_named(digits, monkeypatch):
    config = inc.QuantConfig(calib_samples=64, bf16=inc.LayerFilter(names=("conv2",)))
    monkeypatch.setattr(_bf16, "_cpu_capabilities", lambda: ("FP32", "INT8"))
    with pytest.raises(ConfigError, match=r"no BF16 instructions.*\['FP32', 'INT8'\] without 'BF16'"):
        inc.quantize(models.cnn(), config, dataset=digits[0][:64])
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    _openvino._core.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"OpenVINO, which is not installed.*pip install 'inc-onnx\[openvino\]'"):
            inc.quantize(models.cnn(), config, dataset=digits[0][:64])
    finally:
        _openvino._core.cache_clear()


@pytest.mark.usefixtures("bf16_cpu")
def test_a_file_with_bf16_ops_runs_in_f32_where_bf16_is_missing_and_bad_metadata_is_named(digits, monkeypatch):
    q = _quantize(models.cnn(), digits, bf16=inc.LayerFilter(names=("conv2",)))
    monkeypatch.setattr(_bf16, "_cpu_capabilities", lambda: ("FP32", "INT8"))
    session = inc_onnx.create_session(q, runtime="openvino", threads=1)
    assert session.bf16_ops == () and _compute_precisions(session)["conv2"] == "f32"
    monkeypatch.undo()
    broken = onnx.ModelProto()
    broken.CopyFrom(q)
    next(p for p in broken.metadata_props if p.key == _bf16.BF16_OPS_KEY).value = json.dumps(["conv9"])
    with pytest.raises(ModelLoadError, match=r"lists \['conv9'\], which are not nodes of its graph"):
        inc_onnx.create_session(broken, runtime="openvino", threads=1)


def test_tuner_bf16_fallback_is_offered_only_for_products_by_a_weight():
    # fallback_precision="bf16" moves these into BF16; the lookup, the elementwise ops and the product of two
    # activations (which OpenVINO keeps in f32 anyway) would only gain conversions: they fall back to FP32
    model = models.attention_block()
    backend = inc_onnx.OnnxBackend(runtime="openvino")
    config = inc.QuantConfig()
    listed = {op.name for op in backend.describe(model, config).ops}
    assert {"embed", "scores", "scale_scores", "context"} <= listed, listed
    assert backend.bf16_candidates(model, config) == {"query", "key", "value", "output"}
