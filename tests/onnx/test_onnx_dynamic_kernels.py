"""Dynamic INT8 on ONNX Runtime: which kernels the saved model runs, and the shapes it carries.

The model is a transformer-style block: a heads split/merge whose Reshape targets come from the
input's own shape (as exporters write them), a projection with bias, a residual Add and a LayerNorm.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import inc_core as inc
import inc_onnx
from inc_onnx._preprocess import prepare

HIDDEN = 32
HEADS = 4


def _block(*, annotate: tuple[str, ...] = ()) -> onnx.ModelProto:
    """The block; ``annotate`` names intermediate tensors given a value_info, as a user's exporter might."""
    rng = np.random.default_rng(7)
    weight = rng.normal(0, 0.2, (HIDDEN, HIDDEN)).astype(np.float32)
    # one column with large weights: per-channel scales keep the others' resolution
    weight[:, 3] *= 8.0
    inits = [
        numpy_helper.from_array(weight, "proj.weight"),
        numpy_helper.from_array(rng.normal(0, 0.1, HIDDEN).astype(np.float32), "proj.bias"),
        numpy_helper.from_array(np.array([0], np.int64), "start"),
        numpy_helper.from_array(np.array([2], np.int64), "stop"),
        numpy_helper.from_array(np.array([HEADS, HIDDEN // HEADS], np.int64), "heads_dims"),
        numpy_helper.from_array(np.array([HIDDEN], np.int64), "hidden_dim"),
        numpy_helper.from_array(np.ones(HIDDEN, np.float32), "ln.weight"),
        numpy_helper.from_array(np.zeros(HIDDEN, np.float32), "ln.bias"),
    ]
    nodes = [
        helper.make_node("Shape", ["x"], ["x_shape"], name="shape"),
        helper.make_node("Slice", ["x_shape", "start", "stop"], ["batch_seq"], name="batch_seq"),
        helper.make_node("Concat", ["batch_seq", "heads_dims"], ["split_shape"], name="split_shape", axis=0),
        helper.make_node("Reshape", ["x", "split_shape"], ["heads"], name="split_heads"),
        helper.make_node("Concat", ["batch_seq", "hidden_dim"], ["merge_shape"], name="merge_shape", axis=0),
        helper.make_node("Reshape", ["heads", "merge_shape"], ["merged"], name="merge_heads"),
        helper.make_node("MatMul", ["merged", "proj.weight"], ["proj"], name="proj"),
        helper.make_node("Add", ["proj", "proj.bias"], ["proj_biased"], name="proj_bias"),
        helper.make_node("Add", ["proj_biased", "x"], ["residual"], name="residual"),
        helper.make_node("LayerNormalization", ["residual", "ln.weight", "ln.bias"], ["y"], name="ln", axis=-1),
    ]
    dims = ["batch", "seq", HIDDEN]
    graph = helper.make_graph(
        nodes, "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
        initializer=inits,
        value_info=[helper.make_tensor_value_info(name, TensorProto.FLOAT, dims) for name in annotate],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="inc-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _x(batch: int = 2, seq: int = 5) -> np.ndarray:
    return np.random.default_rng(3).normal(0, 1, (batch, seq, HIDDEN)).astype(np.float32)


def _saved(model: onnx.ModelProto, tmp_path: Path) -> onnx.ModelProto:
    path = tmp_path / "q.onnx"
    inc.save(model, path)
    return onnx.load_model(str(path))


def _optimized(model: onnx.ModelProto, tmp_path: Path) -> onnx.ModelProto:
    """The graph ONNX Runtime runs with inc's session options (after its fusions)."""
    options = inc_onnx.session_options(threads=1)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load_model(options.optimized_model_filepath)


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _types(model: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in model.graph.node)


def test_saved_dynamic_model_has_int8_per_channel_matmul(tmp_path):
    q = _saved(inc.quantize(_block(), inc.QuantConfig(approach="dynamic")), tmp_path)
    assert _types(q)["MatMulInteger"] == 1 and _types(q)["DynamicQuantizeLinear"] == 1
    node = next(n for n in q.graph.node if n.op_type == "MatMulInteger")
    inits = _inits(q)
    weight, scale = inits[node.input[1]], inits[node.input[1].replace("_quantized", "_scale")]
    assert weight.dtype == np.int8 and weight.shape == (HIDDEN, HIDDEN)
    assert scale.shape == (HIDDEN,), "default dynamic weights are per output channel"
    # symmetric int8: each column's largest magnitude maps to 127, zero points are 0
    assert np.all(np.abs(weight).max(axis=0) == 127)
    assert not inits[node.input[3]].any()
    expected = np.clip(np.rint(numpy_helper.to_array(_block().graph.initializer[0]) / scale), -127, 127)
    np.testing.assert_array_equal(weight, expected)


def test_per_channel_matmul_runs_as_one_fused_int8_kernel(tmp_path):
    q = inc.quantize(_block(), inc.QuantConfig(approach="dynamic"))
    optimized = _optimized(q, tmp_path)
    types = _types(optimized)
    # DynamicQuantizeLinear + MatMulInteger + scale Mul + bias Add become one kernel with a per-column B scale
    assert types["DynamicQuantizeMatMul"] == 1
    assert not {"MatMulInteger", "DynamicQuantizeLinear", "MatMul"} & set(types)
    node = next(n for n in optimized.graph.node if n.op_type == "DynamicQuantizeMatMul")
    inits = _inits(optimized)
    assert inits[node.input[1]].dtype == np.int8
    assert inits[node.input[2]].shape == (HIDDEN,)
    assert node.input[4] == "proj.bias"


def test_fused_kernel_computes_the_integer_product_exactly(tmp_path):
    """ORT's output equals the hand-computed uint8 x int8 product with per-column scales, plus bias."""
    q = inc.quantize(_block(), inc.QuantConfig(approach="dynamic"))
    x = _x()
    inits = _inits(q)
    node = next(n for n in q.graph.node if n.op_type == "MatMulInteger")
    weight, w_scale = inits[node.input[1]].astype(np.int64), inits[node.input[1].replace("_quantized", "_scale")]
    # DynamicQuantizeLinear: the range always holds 0; uint8, round half to even
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    a_scale = np.float32((high - low) / 255.0)
    a_zero = int(np.rint(np.clip(-low / a_scale, 0, 255)))
    qx = np.clip(np.rint(x / a_scale) + a_zero, 0, 255).astype(np.int64)
    acc = (qx - a_zero).reshape(-1, HIDDEN) @ weight
    proj = acc.astype(np.float32) * (a_scale * w_scale) + numpy_helper.to_array(_block().graph.initializer[1])
    residual = proj.reshape(x.shape) + x
    mean = residual.mean(-1, keepdims=True)
    expected = (residual - mean) / np.sqrt(((residual - mean) ** 2).mean(-1, keepdims=True) + 1e-5)
    got = inc_onnx.create_session(q, threads=1).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)


def test_quantized_model_keeps_only_the_users_shape_annotations(tmp_path):
    plain = inc.quantize(_block(), inc.QuantConfig(approach="dynamic"))
    assert len(prepare(_block()).model.graph.value_info) > 0, "preparation infers shapes for the quantizer"
    assert [v.name for v in plain.graph.value_info] == []
    annotated = _saved(inc.quantize(_block(annotate=("heads", "residual")), inc.QuantConfig(approach="dynamic")), tmp_path)
    assert sorted(v.name for v in annotated.graph.value_info) == ["heads", "residual"]
    static = inc.quantize(
        _block(annotate=("heads",)), inc.QuantConfig(calib_samples=8), dataset=inc.Dataset(_x(8, 5), batch_size=4)
    )
    assert [v.name for v in static.graph.value_info] == ["heads"]


def test_residual_layernorm_stays_on_the_vectorized_kernels(tmp_path):
    q = inc.quantize(_block(), inc.QuantConfig(approach="dynamic"))
    types = _types(_optimized(q, tmp_path))
    assert types["LayerNormalization"] == 1 and "SkipLayerNormalization" not in types
    # with the shapes preparation inferred left in, ORT rewrites the residual Add + LayerNormalization
    # into SkipLayerNormalization, whose float CPU kernel is the slow scalar one
    inferred = onnx.ModelProto()
    inferred.CopyFrom(q)
    present = {name for node in q.graph.node for name in (*node.input, *node.output)}
    inferred.graph.value_info.extend(v for v in prepare(_block()).model.graph.value_info if v.name in present)
    assert _types(_optimized(inferred, tmp_path))["SkipLayerNormalization"] == 1


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_dynamic_block_output_tracks_fp32(granularity):
    fp32 = _block()
    x = _x(4, 7)
    ref = inc_onnx.create_session(fp32, threads=1).run(None, {"x": x})[0]
    q = inc.quantize(fp32, inc.QuantConfig(approach="dynamic", granularity=granularity))
    got = inc_onnx.create_session(q, threads=1).run(None, {"x": x})[0]
    error = float(np.sqrt(np.mean((got - ref) ** 2)))
    # the outlier column costs the other columns resolution only when they share one scale
    assert error < (0.02 if granularity == "per_channel" else 0.05)
    if granularity == "per_channel":
        per_tensor = inc.quantize(fp32, inc.QuantConfig(approach="dynamic", granularity="per_tensor"))
        worse = inc_onnx.create_session(per_tensor, threads=1).run(None, {"x": x})[0]
        assert error < 0.5 * float(np.sqrt(np.mean((worse - ref) ** 2)))
