"""ConvTranspose in INT8 on ONNX Runtime: each one quantized as its sub-pixel Conv (inc_onnx.ptq._conv_transpose)."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_testmodels as models
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import inc_core as inc
import inc_onnx
from inc_core.errors import CalibrationError, UnsupportedModelError
from inc_onnx import OnnxBackend
from inc_onnx._int8_ops import float_qdq_ops
from inc_onnx.ptq._conv_transpose import conv_transpose_as_conv, restore_conv_transpose

RNG = np.random.default_rng(0)


def _single(
    cin: int, cout: int, kernel: tuple[int, ...], strides: tuple[int, ...], pads: tuple[int, ...],
    output_padding: tuple[int, ...], group: int, *, size: tuple[int, ...], dynamic: bool = False,
    bias: bool = True, activation: str | None = None,
) -> onnx.ModelProto:
    """One ConvTranspose (and an activation reading it) on input ``x`` [N, cin, *size]."""
    inits = [numpy_helper.from_array(RNG.standard_normal((cin, cout // group, *kernel)).astype(np.float32), "W")]
    inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(RNG.standard_normal(cout).astype(np.float32), "B"))
        inputs.append("B")
    out = "t" if activation else "y"
    nodes = [helper.make_node(
        "ConvTranspose", inputs, [out], name="ct", kernel_shape=list(kernel), strides=list(strides), pads=list(pads),
        output_padding=list(output_padding), group=group,
    )]
    if activation == "Relu":
        nodes.append(helper.make_node("Relu", [out], ["y"], name="act"))
    elif activation == "Clip":
        inits += [numpy_helper.from_array(np.array(v, np.float32), n) for v, n in ((0.0, "lo"), (1.5, "hi"))]
        nodes.append(helper.make_node("Clip", [out, "lo", "hi"], ["y"], name="act"))
    dims = ["N", cin, *(f"s{i}" for i in range(len(size)))] if dynamic else ["N", cin, *size]
    graph = helper.make_graph(
        nodes, "ct", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def _run(model: onnx.ModelProto, x: np.ndarray, name: str = "x") -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {name: x})[0]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


CONFIGS = {
    "unet-k2s2": ((4, 6, (2, 2), (2, 2), (0, 0, 0, 0), (0, 0), 1), {}),
    "dcgan-k4s2p1": ((4, 6, (4, 4), (2, 2), (1, 1, 1, 1), (0, 0), 1), {}),
    "k3s2-output-padding": ((4, 6, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1), {}),
    "grouped-unequal-strides": ((4, 6, (3, 5), (2, 3), (0, 1, 2, 0), (1, 2), 2), {"bias": False}),
    "stride-over-kernel-depthwise": ((4, 4, (2, 2), (3, 3), (0, 0, 0, 0), (0, 0), 4), {}),
    "stride-1": ((4, 6, (3, 3), (1, 1), (1, 1, 1, 1), (0, 0), 1), {}),
    "pads-past-a-phase": ((4, 6, (7, 7), (2, 2), (6, 6, 6, 6), (1, 0), 1), {}),
    "1d-hifigan-k8s4p2": ((4, 6, (8,), (4,), (2, 2), (0,), 1), {}),
    "1d-grouped-output-padding": ((4, 6, (5,), (3,), (0, 4), (2,), 2), {}),
    "3d": ((2, 4, (2, 3, 2), (2, 2, 1), (0, 1, 0, 0, 0, 1), (1, 0, 0), 1), {}),
    "relu-moved": ((4, 6, (4, 4), (2, 2), (1, 1, 1, 1), (0, 0), 1), {"activation": "Relu"}),
    "clip-moved": ((4, 6, (3, 3), (2, 2), (0, 0, 0, 0), (0, 0), 1), {"activation": "Clip"}),
}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static-size", "dynamic-size"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_subpixel_form_computes_the_transposed_convolution_and_restores_bit_for_bit(name, dynamic):
    args, extra = CONFIGS[name]
    size = (5, 7, 4)[: len(args[2])]
    model = _single(*args, size=size, dynamic=dynamic, **extra)
    x = RNG.standard_normal((2, args[0], *size)).astype(np.float32)
    rewritten = _copy(model)
    assert conv_transpose_as_conv(rewritten) == ["ct"]
    onnx.checker.check_model(rewritten)
    assert "ConvTranspose" not in [n.op_type for n in rewritten.graph.node]
    expected = _run(model, x)
    got = _run(rewritten, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

    restore_conv_transpose(rewritten, ["ct"])
    onnx.checker.check_model(rewritten)
    assert [(n.op_type, n.name) for n in rewritten.graph.node] == [(n.op_type, n.name) for n in model.graph.node]
    weights = {i.name: numpy_helper.to_array(i) for i in rewritten.graph.initializer}
    original = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_array_equal(weights[rewritten.graph.node[0].input[1]], original["W"])
    np.testing.assert_array_equal(_run(rewritten, x), expected)


def test_an_activation_after_it_runs_on_the_int8_conv_output():
    model = _single(4, 6, (4, 4), (2, 2), (1, 1, 1, 1), (0, 0), 1, size=(5, 7), activation="Relu")
    conv_transpose_as_conv(model)
    ops = [n.op_type for n in model.graph.node]
    # right after the Conv, so ORT folds it into the QLinearConv's output: no requantization after the crop
    assert ops[:2] == ["Conv", "Relu"] and ops.count("Relu") == 1


def test_decoder_int8_within_one_percent_with_every_convolution_int8(digits):
    x_train, x_test, _, y_test = digits
    model = models.decoder()
    given = model.SerializeToString()
    fp32 = models.accuracy(model, x_test, y_test)
    assert fp32 > 0.95
    space = inc.describe(model)
    assert [(op.name, op.op_type) for op in space.ops if op.op_type == "ConvTranspose"] == [
        ("up", "ConvTranspose"), ("up2", "ConvTranspose"),
    ]
    q = inc.quantize(model, inc.QuantConfig(calib_samples=256), dataset=inc.Dataset(x_train[:256], batch_size=32))
    assert model.SerializeToString() == given, "the user's model must not change"
    int8 = models.accuracy(q, x_test, y_test)
    assert int8 >= fp32 - 0.01, f"FP32 {fp32:.4f} vs INT8 {int8:.4f}"
    assert "ConvTranspose" not in models.op_types(q)
    # enc, down and both up-samplings run ORT's INT8 convolution
    assert OnnxBackend().int8_op_counts(q)["QLinearConv"] == 4
    subpixel = {n.name: n for n in q.graph.node if n.op_type == "Conv"}
    assert subpixel["up"].doc_string.startswith("inc: sub-pixel form of ConvTranspose")


def test_qoperator_format_runs_them_as_qlinearconv(digits):
    x_train, x_test, _, y_test = digits
    model = models.decoder()
    fp32 = models.accuracy(model, x_test, y_test)
    q = inc.quantize(model, inc.QuantConfig(format="qoperator", calib_samples=256), dataset=inc.Dataset(x_train[:256], batch_size=32))
    assert models.op_types(q).count("QLinearConv") == 4
    assert models.accuracy(q, x_test, y_test) >= fp32 - 0.01


@pytest.mark.parametrize("exclude", [
    inc.LayerFilter(types=("ConvTranspose",)), inc.LayerFilter(names=("up", "up2")),
], ids=["by-type", "by-name"])
def test_an_excluded_one_is_the_users_conv_transpose_again(digits, exclude):
    x_train, x_test, _, y_test = digits
    model = models.decoder()
    fp32 = models.accuracy(model, x_test, y_test)
    q = inc.quantize(model, inc.QuantConfig(exclude=exclude, calib_samples=256), dataset=inc.Dataset(x_train[:256], batch_size=32))
    transposed = [n for n in q.graph.node if n.op_type == "ConvTranspose"]
    assert [n.name for n in transposed] == ["up", "up2"]
    weights = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    given = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node, name in zip(transposed, ("up.weight", "up2.weight"), strict=True):
        np.testing.assert_array_equal(weights[node.input[1]], given[name])
    assert not any("subpixel" in n.name for n in q.graph.node)
    assert OnnxBackend().int8_op_counts(q)["QLinearConv"] == 2
    assert models.accuracy(q, x_test, y_test) >= fp32 - 0.01


def _generator(*, dilated: bool = False) -> onnx.ModelProto:
    """A DCGAN-style generator: three ConvTranspose (+ Relu) from a latent [N, 16, 1, 1] to [N, 3, 16, 16]."""
    rng = np.random.default_rng(4)
    layers = [(16, 32, 4, 1, 0), (32, 16, 4, 2, 1), (16, 3, 4, 2, 1)]
    inits, nodes, current = [], [], "z"
    for i, (cin, cout, k, s, p) in enumerate(layers):
        inits.append(numpy_helper.from_array((rng.standard_normal((cin, cout, k, k)) / np.sqrt(cin)).astype(np.float32), f"g{i}.weight"))
        attrs = {"kernel_shape": [k, k], "strides": [s, s], "pads": [p] * 4}
        if dilated and i == 1:
            attrs["dilations"] = [2, 2]
        out = f"g{i}" if i < 2 else "image"
        nodes.append(helper.make_node("ConvTranspose", [current, f"g{i}.weight"], [out], name=f"g{i}", **attrs))
        if i < 2:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            current = f"r{i}"
    graph = helper.make_graph(
        nodes, "generator", [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 16, 1, 1])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, None, None])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_a_model_made_only_of_conv_transposes_is_quantized():
    # ORT left every QDQ ConvTranspose in float, and inc refused the model ("no INT8 op")
    model = _generator()
    z = np.random.default_rng(5).standard_normal((64, 16, 1, 1)).astype(np.float32)
    q = inc.quantize(model, inc.QuantConfig(calib_samples=48), dataset=inc.Dataset(z[:48], batch_size=8))
    assert OnnxBackend().int8_op_counts(q)["QLinearConv"] == 3
    assert _cosine(_run(q, z[48:], "z"), _run(model, z[48:], "z")) > 0.99


def test_one_without_an_exact_subpixel_form_stays_float_and_says_why(caplog):
    model = _generator(dilated=True)
    z = np.random.default_rng(5).standard_normal((48, 16, 1, 1)).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="inc"):
        q = inc.quantize(model, inc.QuantConfig(calib_samples=48), dataset=inc.Dataset(z, batch_size=8))
    assert "ConvTranspose g1 stays a float op" in caplog.text and "dilated" in caplog.text
    assert [n.name for n in q.graph.node if n.op_type == "ConvTranspose"] == ["g1"]
    assert OnnxBackend().int8_op_counts(q)["QLinearConv"] == 2


def test_shared_weight_stays_float():
    model = _single(4, 4, (2, 2), (2, 2), (0, 0, 0, 0), (0, 0), 1, size=(5, 7))
    model.graph.node.append(helper.make_node("ConvTranspose", ["y", "W"], ["y2"], name="ct2", kernel_shape=[2, 2], strides=[2, 2]))
    model.graph.output[0].name = "y2"
    assert conv_transpose_as_conv(model) == []


def test_openvino_runtime_quantizes_the_conv_transpose_itself(digits):
    # OpenVINO has an INT8 ConvTranspose of its own, faster than the sub-pixel form on it
    x_train, _, _, _ = digits
    q = inc.quantize(
        models.decoder(), inc.QuantConfig(calib_samples=64), dataset=inc.Dataset(x_train[:64], batch_size=32),
        backend=OnnxBackend(runtime="openvino"),
    )
    producers = {out: n for n in q.graph.node for out in n.output}
    transposed = [n for n in q.graph.node if n.op_type == "ConvTranspose"]
    assert [n.name for n in transposed] == ["up", "up2"]
    assert all(producers[n.input[0]].op_type == "DequantizeLinear" for n in transposed)


def test_a_dilated_only_generator_is_refused_naming_the_way_out():
    model = _generator(dilated=True)
    del model.graph.node[:]
    model.graph.node.append(helper.make_node(
        "ConvTranspose", ["z", "g1.weight"], ["image"], name="g1", kernel_shape=[4, 4], strides=[2, 2], dilations=[2, 2],
    ))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 32
    del model.graph.initializer[0]
    del model.graph.initializer[1]
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 16
    z = np.random.default_rng(5).standard_normal((16, 32, 1, 1)).astype(np.float32)
    with pytest.raises(UnsupportedModelError, match=r"no INT8 ConvTranspose.*dilated.*runtime='openvino'"):
        inc.quantize(model, inc.QuantConfig(calib_samples=16), dataset=inc.Dataset(z, batch_size=8))
    # for OpenVINO the same file holds INT8 ConvTranspose (QDQ), which it runs
    q = inc.quantize(model, inc.QuantConfig(calib_samples=16), dataset=inc.Dataset(z, batch_size=8), backend=OnnxBackend(runtime="openvino"))
    producers = {out: n.op_type for n in q.graph.node for out in n.output}
    node = next(n for n in q.graph.node if n.op_type == "ConvTranspose")
    assert producers[node.input[0]] == producers[node.input[1]] == "DequantizeLinear"


def test_dynamic_quantization_lists_them_as_conv_transpose_and_excludes_them(digits):
    x_train, x_test, _, y_test = digits
    model = models.decoder()
    config = inc.QuantConfig(approach="dynamic")
    assert [op.name for op in inc.describe(model, config).ops if op.op_type == "ConvTranspose"] == ["up", "up2"]
    q = inc.quantize(model, inc.QuantConfig(approach="dynamic", exclude=inc.LayerFilter(types=("ConvTranspose",))))
    assert [n.name for n in q.graph.node if n.op_type == "ConvTranspose"] == ["up", "up2"]
    assert models.op_types(q).count("ConvInteger") == 2


def test_inc_sessions_run_a_qdq_conv_transpose_file_right():
    # A file with QDQ ConvTranspose (made for OpenVINO) on ORT: with ORT's QDQ clean-up on, ORT folded each ReLU after
    # a ConvTranspose into the QuantizeLinear and then dropped that pair: the generator's output cosine was 0.69.
    model = _generator()
    z = np.random.default_rng(5).standard_normal((64, 16, 1, 1)).astype(np.float32)
    data = inc.Dataset(z[:48], batch_size=8)
    for_openvino = inc.quantize(model, inc.QuantConfig(calib_samples=48), dataset=data, backend=OnnxBackend(runtime="openvino"))
    assert float_qdq_ops(for_openvino)
    session = inc_onnx.create_session(for_openvino, runtime="ort")
    assert _cosine(session.run(None, {"z": z[48:]})[0], _run(model, z[48:], "z")) > 0.99
    for_ort = inc.quantize(model, inc.QuantConfig(calib_samples=48), dataset=data)
    assert not float_qdq_ops(for_ort)


def test_a_calibration_of_the_other_form_is_refused_saying_so(digits):
    x_train = digits[0]
    data, config = inc.Dataset(x_train[:64], batch_size=32), inc.QuantConfig(calib_samples=64)
    for_openvino = OnnxBackend(runtime="openvino").calibrate(models.decoder(), data, config)
    with pytest.raises(CalibrationError, match="another form of this model"):
        OnnxBackend(runtime="ort").quantize(models.decoder(), config, calibration=for_openvino)
    # without a ConvTranspose both forms are one: a calibration serves either backend
    cnn = models.cnn()
    statistics = OnnxBackend(runtime="openvino").calibrate(cnn, data, config)
    assert "QLinearConv" in OnnxBackend().int8_op_counts(OnnxBackend(runtime="ort").quantize(cnn, config, calibration=statistics))


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize(("kernel", "stride", "output_padding"), [(3, 2, 0), (4, 2, 0), (5, 3, 1), (3, 1, 0)])
def test_auto_pad_is_rewritten_as_onnx_runtime_pads_it(auto_pad, kernel, stride, output_padding):
    # Keras' Conv2DTranspose(padding="same") exports as auto_pad=SAME_UPPER; its padding k - s + output_padding
    # does not depend on the input size (output = input * stride), odd ones split as ORT splits them
    weight = numpy_helper.from_array(RNG.standard_normal((3, 4, kernel, kernel)).astype(np.float32), "W")
    node = helper.make_node(
        "ConvTranspose", ["x", "W"], ["y"], name="ct", strides=[stride, stride], auto_pad=auto_pad,
        output_padding=[output_padding] * 2,
    )
    graph = helper.make_graph(
        [node], "ct", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = RNG.standard_normal((2, 3, 5, 6)).astype(np.float32)
    rewritten = _copy(model)
    assert conv_transpose_as_conv(rewritten) == ["ct"]
    expected = _run(model, x)
    got = _run(rewritten, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_weights_listed_as_graph_inputs_too_are_replaced_there_as_well(digits):
    # torch.onnx.export(..., keep_initializers_as_inputs=True) lists every weight as a graph input with a default
    model = models.decoder()
    inits = {init.name: init for init in model.graph.initializer}
    for name in ("up.weight", "up.bias", "up2.weight"):
        model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(inits[name].dims)))
    x_train, x_test, _, y_test = digits
    q = inc.quantize(model, inc.QuantConfig(calib_samples=64), dataset=inc.Dataset(x_train[:64], batch_size=32))
    assert [i.name for i in q.graph.input] == ["pixels"]
    assert models.accuracy(q, x_test, y_test) >= models.accuracy(model, x_test, y_test) - 0.01
