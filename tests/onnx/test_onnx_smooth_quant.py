"""SmoothQuant on the ONNX backend: exact rescaling in FP32, closer INT8, tried by the tuner.

The model is a transformer-like block on the digits images (each image as 4 tokens of 16 pixels):
LayerNormalization whose gamma makes three channels 50x larger than the others (the activation
outliers SmoothQuant is for), two MatMuls reading it (one shared scale, folded into gamma/beta),
Add, Relu, and an output MatMul + bias whose input comes from the Relu (nothing to fold into: a
Mul is inserted), plus a residual-like ReduceMean of the LayerNorm output (not smoothed: it gets
the unscaled values back through a Mul). The outlier channels' weights are small, as in trained transformers, so every
channel matters to the output.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_testmodels as models
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import inc_core as inc
from inc_core.errors import CalibrationError
from inc_onnx import OnnxBackend
from inc_onnx._preprocess import prepare
from inc_onnx.ptq._quantize import METADATA_KEY

OUTLIERS = [2, 7, 12]
SQ = inc.SmoothQuant(alpha=0.5)


def _outlier_block() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    gamma = np.ones(16, np.float32)
    gamma[OUTLIERS] = 50.0
    beta = rng.normal(scale=0.1, size=16).astype(np.float32)
    wq, wv = (rng.normal(scale=0.3, size=(16, 32)).astype(np.float32) for _ in range(2))
    wq[OUTLIERS] /= 50.0
    wv[OUTLIERS] /= 50.0
    wo = rng.normal(scale=0.3, size=(32, 10)).astype(np.float32)
    inits = [
        numpy_helper.from_array(a, n)
        for n, a in (("gamma", gamma), ("beta", beta), ("wq", wq), ("wv", wv), ("wo", wo), ("bo", np.zeros(10, np.float32)))
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["tokens", "gamma", "beta"], ["ln"], name="ln", axis=-1),
        helper.make_node("MatMul", ["ln", "wq"], ["q"], name="query"),
        helper.make_node("MatMul", ["ln", "wv"], ["v"], name="value"),
        helper.make_node("Add", ["q", "v"], ["qv"], name="add"),
        helper.make_node("Relu", ["qv"], ["act"], name="relu"),
        helper.make_node("MatMul", ["act", "wo"], ["o"], name="out"),
        helper.make_node("Add", ["o", "bo"], ["ob"], name="out_bias"),
        helper.make_node("ReduceMean", ["ln"], ["skip"], name="skip", axes=[-1], keepdims=1),
        helper.make_node("Add", ["ob", "skip"], ["logits"], name="residual"),
    ]
    graph = helper.make_graph(
        nodes,
        "outlier_block",
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["n", 4, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4, 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)], producer_name="inc-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _tokens(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(-1, 4, 16), dtype=np.float32)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"tokens": x})[0]


def _error(model: onnx.ModelProto, quantized: onnx.ModelProto, x: np.ndarray) -> float:
    """Relative mean squared error of the INT8 outputs against FP32."""
    ref = _run(model, x)
    return float(np.mean((_run(quantized, x) - ref) ** 2) / np.mean(ref**2))


@pytest.fixture(scope="module")
def data() -> tuple[inc.Dataset, np.ndarray]:
    x_train, x_test, _, _ = models.digits()
    return inc.Dataset(_tokens(x_train[:200]), batch_size=50), _tokens(x_test)


def test_rescaled_fp32_graph_computes_what_the_original_does(data: tuple[inc.Dataset, np.ndarray]) -> None:
    model = _outlier_block()
    given = model.SerializeToString()
    calibration = OnnxBackend().calibrate(model, data[0], inc.QuantConfig(smooth_quant=SQ))
    smoothed = calibration.prepared.model
    assert calibration.folded == ("ln",)  # query and value share one scale, in gamma/beta
    # the ReduceMean reads the LayerNorm output times s; the Relu has nothing to fold into
    assert calibration.inserted == ("ln_smooth_quant_restore", "out_smooth_quant_mul")
    gamma = {i.name: numpy_helper.to_array(i) for i in smoothed.graph.initializer}["gamma"]
    assert gamma[OUTLIERS].max() < 10.0 < 50.0  # the outliers moved out of the activation
    x = data[1]
    np.testing.assert_allclose(_run(smoothed, x), _run(model, x), rtol=1e-4, atol=1e-4)
    assert _run(model, x).shape == (len(x), 4, 10)
    assert model.SerializeToString() == given  # the user's model untouched


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_smooth_quant_brings_static_int8_closer_to_fp32(fmt: str, data: tuple[inc.Dataset, np.ndarray]) -> None:
    model = _outlier_block()
    calib, x = data
    plain = inc.quantize(model, inc.QuantConfig(format=fmt), dataset=calib)
    smooth = inc.quantize(model, inc.QuantConfig(format=fmt, smooth_quant=SQ), dataset=calib)
    before, after = _error(model, plain, x), _error(model, smooth, x)
    # The outliers set the LayerNorm output's int8 step 50x too coarse for the other channels; with the
    # scales migrated, the error drops several-fold (a margin INT8 rounding on any x86 CPU does not close).
    assert after < 0.3 * before, (before, after)
    counts = OnnxBackend().int8_op_counts(smooth)
    assert sum(counts.values()) >= 3, counts  # query, value and out still run INT8 kernels
    muls = [n for n in smooth.graph.node if n.name in ("out_smooth_quant_mul", "ln_smooth_quant_restore")]
    assert [n.op_type for n in muls] == ["Mul", "Mul"]  # the inserted Muls stay FP32
    record = json.loads({p.key: p.value for p in smooth.metadata_props}[METADATA_KEY])
    assert inc.QuantConfig.from_dict({k: v for k, v in record.items() if k != "format"}).smooth_quant == SQ
    assert record["exclude"]["names"] == []  # the stamp is the user's recipe


def test_calibration_of_another_smooth_quant_setting_is_refused(data: tuple[inc.Dataset, np.ndarray]) -> None:
    model = _outlier_block()
    backend = OnnxBackend()
    smoothed = backend.calibrate(model, data[0], inc.QuantConfig(smooth_quant=SQ))
    with pytest.raises(CalibrationError, match=r"collected with smooth_quant=SmoothQuant\(alpha=0.5\) but the config asks for smooth_quant=None"):
        backend.quantize(model, inc.QuantConfig(), calibration=smoothed)
    plain = backend.calibrate(model, data[0], inc.QuantConfig())
    with pytest.raises(CalibrationError, match="collected with smooth_quant=None"):
        backend.quantize(model, inc.QuantConfig(smooth_quant=inc.SmoothQuant(alpha=0.5)), calibration=plain)


def test_a_graph_without_constant_weight_matmuls_is_refused_clearly() -> None:
    x_train, _, _, _ = models.digits()
    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 1, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["features"], name="conv")],
        "conv_only",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", 4, 6, 6])],
        initializer=[weight],
    )
    conv = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)])
    conv.ir_version = 8
    images = inc.Dataset(x_train[:20].reshape(-1, 1, 8, 8), batch_size=10)
    with pytest.raises(CalibrationError, match="SmoothQuant found no MatMul or Gemm with a constant 2-D weight"):
        inc.quantize(conv, inc.QuantConfig(smooth_quant=SQ), dataset=images)


def test_tuner_tries_smooth_quant_when_the_base_misses_the_goal(data: tuple[inc.Dataset, np.ndarray]) -> None:
    model = _outlier_block()
    calib, x = data
    plain = _error(model, inc.quantize(model, inc.QuantConfig(), dataset=calib), x)

    def fidelity(candidate: onnx.ModelProto) -> float:
        return 1.0 - _error(model, candidate, x)

    # The goal: half the base config's error (SmoothQuant gets well below that, see above).
    config = inc.TuningConfig(smooth_quant_alphas=(0.5,), tolerable_loss=0.5 * plain, loss_type="absolute", max_trials=4)
    result = inc.autotune(model, config, eval_fn=fidelity, dataset=calib)
    assert [t.change for t in result.trials] == ["base", "smooth_quant(alpha=0.5)"], [t.change for t in result.trials]
    assert result.met and result.config.smooth_quant == SQ
    assert sum(OnnxBackend().int8_op_counts(result.model).values()) >= 3
    prepared_twice = prepare(model)
    assert prepared_twice.model.graph.node[0].op_type == "LayerNormalization"  # the cached preparation untouched
