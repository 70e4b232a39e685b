"""The saved INT8 graphs hold real int8 kernels, with the parameters inc's calibration math defines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_testmodels as models
import pytest
from conftest import sha256
from onnx import TensorProto, helper, numpy_helper

import inc_core as inc
import inc_onnx
from inc_core.calibration import compute_qparams
from inc_core.errors import ConfigError


def _nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in model.graph.node}


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if tensor in n.output)


def _weight_dq(model: onnx.ModelProto, op_name: str) -> onnx.NodeProto:
    """The DequantizeLinear feeding an op's weight (input 1) in a QDQ graph."""
    return _producer(model, _nodes(model)[op_name].input[1])


def _saved(model: onnx.ModelProto, tmp_path: Path) -> onnx.ModelProto:
    path = tmp_path / "q.onnx"
    inc.save(model, path)
    loaded = onnx.load_model(str(path))
    onnx.checker.check_model(loaded)
    return loaded


def test_qdq_graph_has_int8_weights_and_uint8_activations(cnn, calib, tmp_path):
    q = _saved(inc.quantize(cnn, inc.QuantConfig(calib_samples=64), dataset=calib), tmp_path)
    inits = _inits(q)
    for op in ("conv1", "conv2", "fc"):
        dq = _weight_dq(q, op)
        assert dq.op_type == "DequantizeLinear"
        weight = inits[dq.input[0]]
        assert weight.dtype == np.int8, f"{op} weight is {weight.dtype}"
        assert np.all(inits[dq.input[2]] == 0), "int8 weights are symmetric"
    # per-channel weights by default: one scale per output channel
    assert inits[_weight_dq(q, "conv2").input[1]].shape == (16,)
    assert inits[_weight_dq(q, "fc").input[1]].shape == (10,)
    # conv biases are int32, as QLinearConv takes them
    assert inits[_producer(q, _nodes(q)["conv1"].input[2]).input[0]].dtype == np.int32
    act_q = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert act_q and all(inits[n.input[2]].dtype == np.uint8 for n in act_q)
    # the ReLUs fold into their convolutions (uint8 with zero point at 0 clamps negatives)
    assert "Relu" not in models.op_types(q)


def test_qoperator_graph_has_qlinear_kernels(cnn, calib, tmp_path):
    q = _saved(inc.quantize(cnn, inc.QuantConfig(format="qoperator", calib_samples=64), dataset=calib), tmp_path)
    types = models.op_types(q)
    assert types.count("QLinearConv") == 2 and "QGemm" in types
    assert "Conv" not in types and "Gemm" not in types
    conv = next(n for n in q.graph.node if n.op_type == "QLinearConv")
    assert _inits(q)[conv.input[3]].dtype == np.int8  # QLinearConv(x, x_scale, x_zp, w, ...)


def _matmul_chain() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.2, (64, 32)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.2, (32, 10)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["pixels", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="act"),
        helper.make_node("MatMul", ["r", "w2"], ["logits"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_qoperator_matmul_becomes_qlinearmatmul(calib, tmp_path):
    q = _saved(inc.quantize(_matmul_chain(), inc.QuantConfig(format="qoperator"), dataset=calib), tmp_path)
    assert models.op_types(q).count("QLinearMatMul") == 2
    assert set(models.int8_initializers(q)) >= {"w1_quantized", "w2_quantized"}


def test_dynamic_graph_has_integer_kernels(mlp, cnn, tmp_path):
    q = _saved(inc.quantize(mlp, inc.QuantConfig(approach="dynamic")), tmp_path)
    types = models.op_types(q)
    assert types.count("MatMulInteger") == 3 and "DynamicQuantizeLinear" in types
    assert all(_inits(q)[name].dtype == np.int8 for name in models.int8_initializers(q))
    assert len(models.int8_initializers(q)) >= 3
    qc = inc.quantize(cnn, inc.QuantConfig(approach="dynamic"))
    assert models.op_types(qc).count("ConvInteger") == 2


def test_dynamic_rejects_static_only_settings(mlp):
    with pytest.raises(ConfigError, match="uint8"):
        inc.quantize(mlp, inc.QuantConfig(approach="dynamic", activation_dtype="int8"))


def test_activation_qparams_are_inc_cores(cnn, calib):
    backend = inc.get_backend("onnx")
    config = inc.QuantConfig(calibration="percentile", percentile=99.9, calib_samples=64)
    calibration = backend.calibrate(cnn, calib, config)
    q = backend.quantize(cnn, config, calibration=calibration)
    inits = _inits(q)
    # conv2 reads r1, the output of relu1; its QuantizeLinear carries inc's parameters for r1's range
    node = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "r1")
    lo, hi = calibration.observers["r1"].range("percentile", percentile=99.9, dtype="uint8", scheme="asym")
    expected = compute_qparams(lo, hi, dtype="uint8", scheme="asym")
    assert inits[node.input[1]] == pytest.approx(float(expected.scale), rel=1e-7)
    assert int(inits[node.input[2]]) == int(expected.zero_point)


def test_activations_of_microscopic_range_keep_their_steps(cnn, calib, digits):
    """conv2's outputs scaled by 1e-7 (and fc's weights by 1e7: the same function) quantize like the original.

    A floor at float32 epsilon (torch.ao's) left those tensors ~4 of their 255 steps; ORT's own quantizer floors
    at float32 tiny, and so does inc's ONNX backend (an untrained Keras EfficientNet via tf2onnx: cosine to FP32
    0.926 with the epsilon floor, 0.937 with ORT's quantize_static and inc now).
    """
    tiny = onnx.ModelProto()
    tiny.CopyFrom(cnn)
    for init in tiny.graph.initializer:
        factor = {"conv2.weight": 1e-7, "conv2.bias": 1e-7, "fc.weight": 1e7}.get(init.name)
        if factor is not None:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
    x_test = digits[1]
    assert np.allclose(models.run(tiny, x_test), models.run(cnn, x_test), rtol=1e-3, atol=1e-3)

    q_tiny = inc.quantize(tiny, inc.QuantConfig(), dataset=calib)
    q_plain = inc.quantize(cnn, inc.QuantConfig(), dataset=calib)

    scale = _inits(q_tiny)[next(n for n in q_tiny.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "r2").input[1]]
    assert 0 < float(scale) < np.finfo(np.float32).eps
    agreement = np.mean(models.run(q_tiny, x_test).argmax(1) == models.run(q_plain, x_test).argmax(1))
    assert agreement >= 0.995, agreement


def test_symmetric_int8_activations(cnn, calib):
    config = inc.QuantConfig(scheme="sym", activation_dtype="int8", granularity="per_tensor", calib_samples=64)
    q = inc.quantize(cnn, config, dataset=calib)
    inits = _inits(q)
    zero_points = [inits[n.input[2]] for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.int8 and int(z) == 0 for z in zero_points)
    assert inits[_weight_dq(q, "conv2").input[1]].shape == ()  # per-tensor weight scale
    assert models.op_types(q).count("Relu") == 2  # a symmetric zero point cannot clamp, so ReLU stays


def test_per_op_overrides_in_qdq(cnn, calib):
    config = inc.QuantConfig(
        calib_samples=64,
        overrides={"conv1": {"granularity": "per_tensor"}, "Gemm": {"activation_dtype": "int8"}},
    )
    q = inc.quantize(cnn, config, dataset=calib)
    inits = _inits(q)
    assert inits[_weight_dq(q, "conv1").input[1]].shape == ()
    assert inits[_weight_dq(q, "conv2").input[1]].shape == (16,)
    # the Gemm's int8 setting would apply to its output, but the model output has no INT8 reader, so it
    # stays float (no QuantizeLinear/DequantizeLinear round trip on the logits); its input comes through
    # MaxPool/Flatten, which pass their input's uint8 parameters through unchanged
    assert _producer(q, "logits").op_type == "Gemm"
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "logits" for n in q.graph.node)
    conv_input = _producer(q, _nodes(q)["conv2"].input[0])
    assert inits[conv_input.input[2]].dtype == np.uint8


def test_overrides_qoperator_cannot_apply_are_rejected(cnn, calib):
    config = inc.QuantConfig(format="qoperator", overrides={"conv1": {"activation_dtype": "int8"}})
    with pytest.raises(ConfigError, match="format='qdq'"):
        inc.quantize(cnn, config, dataset=calib)
    with pytest.raises(ConfigError, match="neither an op name nor an op type.*conv1"):
        inc.quantize(cnn, inc.QuantConfig(overrides={"convv1": {"scheme": "sym"}}), dataset=calib)


def test_exclude_by_type_keeps_convs_in_float(cnn, calib):
    q = inc.quantize(cnn, inc.QuantConfig(exclude=inc.LayerFilter(types=("Conv",))), dataset=calib)
    nodes = _nodes(q)
    assert nodes["conv1"].input[1] == "conv1.weight" and nodes["conv2"].input[1] == "conv2.weight"
    assert _weight_dq(q, "fc").op_type == "DequantizeLinear"


def test_describe_reports_the_models_own_names(mlp, cnn):
    # ORT's preparation fuses MatMul + Add into Gemm; the fused op keeps the user's node name.
    assert [(o.name, o.op_type) for o in inc.describe(mlp).ops if o.op_type == "Gemm"] == [
        ("fc0", "Gemm"), ("fc1", "Gemm"), ("fc2", "Gemm")
    ]
    space = inc.describe(cnn)
    assert [o.name for o in space.ops if o.op_type == "Conv"] == ["conv1", "conv2"]
    assert set(space.options["Conv"]) == {"calibration", "scheme", "activation_dtype", "granularity"}
    assert "Relu" not in space.options and "MaxPool" not in space.options  # exact in INT8: not listed
    qop = inc.describe(cnn, inc.QuantConfig(format="qoperator"))
    assert set(qop.options["Conv"]) == {"calibration", "scheme"}
    dynamic = inc.describe(mlp, inc.QuantConfig(approach="dynamic"))
    assert [o.name for o in dynamic.ops] == ["fc0", "fc1", "fc2"] and dict(dynamic.options) == {}


def test_excluding_a_gemm_in_dynamic_mode(mlp):
    q = inc.quantize(mlp, inc.QuantConfig(approach="dynamic", exclude=inc.LayerFilter(names=("fc2",))))
    assert models.op_types(q).count("MatMulInteger") == 2


def test_input_file_is_never_modified(cnn_file, calib, tmp_path):
    before = sha256(cnn_file)
    q = inc.quantize(str(cnn_file), inc.QuantConfig(calib_samples=32), dataset=calib)
    inc.quantize(cnn_file, inc.QuantConfig(approach="dynamic"))
    inc.save(q, tmp_path / "out.onnx")
    assert sha256(cnn_file) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx", "out.onnx"]


def test_inplace_quantizes_the_given_proto(cnn, calib):
    q = inc.quantize(cnn, inc.QuantConfig(calib_samples=16), dataset=calib, inplace=True)
    assert q is cnn and "DequantizeLinear" in models.op_types(cnn)


def test_model_records_its_recipe(cnn, calib):
    q = inc.quantize(cnn, inc.QuantConfig(calibration="mse", calib_samples=16), dataset=calib)
    meta = {p.key: p.value for p in q.metadata_props}
    record = json.loads(meta[inc_onnx.METADATA_KEY])
    assert record["calibration"] == "mse" and record["format"] == "qdq"
    assert inc.QuantConfig.from_dict({k: v for k, v in record.items() if k != "format"}).calibration == "mse"
