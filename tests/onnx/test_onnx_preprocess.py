"""Graph preparation on models ONNX Runtime's symbolic shape inference gives up on.

The model adds position embeddings sliced to the sequence length, as BERT-style exporters write it:
symbolic inference cannot tell that the slice's length equals the input's ``seq`` dimension.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_testmodels as models
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

import inc_core as inc
import inc_onnx
from inc_onnx import _preprocess
from inc_onnx._preprocess import prepare

HIDDEN = 32


@pytest.fixture(autouse=True)
def _fresh_preparation():
    """Preparation is cached by model content; each test here must see it run."""
    _preprocess._cache.clear()
    yield
    _preprocess._cache.clear()


def _positions_model() -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    inits = [
        # large enough that ORT's partial result keeps it in an external data file
        numpy_helper.from_array(rng.normal(0, 1, (64, HIDDEN)).astype(np.float32), "positions"),
        numpy_helper.from_array(rng.normal(0, 0.2, (HIDDEN, HIDDEN)).astype(np.float32), "proj.weight"),
        numpy_helper.from_array(np.array(1, np.int64), "seq_axis"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
    ]
    nodes = [
        helper.make_node("Shape", ["x"], ["x_shape"], name="shape"),
        helper.make_node("Gather", ["x_shape", "seq_axis"], ["seq_len"], name="seq_len"),
        helper.make_node("Unsqueeze", ["seq_len", "zero"], ["end"], name="end"),
        helper.make_node("Slice", ["positions", "zero", "end", "zero"], ["pos"], name="slice_positions"),
        helper.make_node("Add", ["x", "pos"], ["h"], name="add_positions"),
        helper.make_node("MatMul", ["h", "proj.weight"], ["y"], name="proj"),
    ]
    dims = ["batch", "seq", HIDDEN]
    graph = helper.make_graph(
        nodes, "positions",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="inc-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _x() -> np.ndarray:
    return np.random.default_rng(2).normal(0, 1, (2, 9, HIDDEN)).astype(np.float32)


def test_ort_symbolic_inference_gives_up_and_leaves_files(tmp_path, monkeypatch):
    """What the preparation must cope with (if ORT stops doing this, the tests below lose their point)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match="Incomplete symbolic shape inference"):
        SymbolicShapeInference.infer_shapes(_positions_model())
    left = sorted(os.listdir(tmp_path))
    assert "sym_shape_infer_temp.onnx" in left and any(name.endswith(".data") for name in left)


@pytest.mark.parametrize("approach", ["dynamic", "static"])
def test_model_symbolic_inference_gives_up_on_quantizes_and_leaves_no_files(tmp_path, monkeypatch, approach):
    monkeypatch.chdir(tmp_path)
    fp32 = _positions_model()
    dataset = inc.Dataset(np.random.default_rng(4).normal(0, 1, (8, 9, HIDDEN)).astype(np.float32), batch_size=4)
    q = inc.quantize(fp32, inc.QuantConfig(approach=approach, calib_samples=8), dataset=dataset)
    assert os.listdir(tmp_path) == []
    assert {"MatMulInteger", "DequantizeLinear"} & {node.op_type for node in q.graph.node}
    ref = inc_onnx.create_session(fp32, threads=1).run(None, {"x": _x()})[0]
    got = inc_onnx.create_session(q, threads=1).run(None, {"x": _x()})[0]
    assert float(np.sqrt(np.mean((got - ref) ** 2))) < 0.05 * float(np.sqrt(np.mean(ref**2)))


def test_preparation_keeps_every_weight_in_the_graph(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = _positions_model()
    before = model.SerializeToString()
    prepared = prepare(model)
    assert model.SerializeToString() == before, "the caller's proto is never modified"
    weights = {init.name: init for init in prepared.model.graph.initializer}
    assert all(init.data_location == TensorProto.DEFAULT and not init.external_data for init in weights.values())
    np.testing.assert_array_equal(
        numpy_helper.to_array(weights["proj.weight"]), numpy_helper.to_array(model.graph.initializer[1])
    )
    assert os.listdir(tmp_path) == []


def test_unrelated_files_in_the_directory_are_kept(tmp_path, monkeypatch):
    """Only what ORT writes during preparation is removed: its partial model and the data file it references."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.data").write_text("kept")
    (tmp_path / "model.onnx").write_bytes(_positions_model().SerializeToString())
    prepare(str(tmp_path / "model.onnx"))
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "notes.data"]
    assert (tmp_path / "notes.data").read_text() == "kept"


@pytest.mark.parametrize("opset", [11, 12])
@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_a_model_older_than_opset_13_gets_per_channel_int8_that_loads(cnn, digits, opset, fmt):
    """torch.onnx.export(..., opset_version=11) graphs: ORT's QDQ quantizer wrote per-channel DequantizeLinear
    (an opset-13 attribute) into them and the INT8 model did not load ("Unrecognized attribute: axis"), as ORT's
    own quantize_static does; inc quantizes the graph raised to opset 13 by ONNX's version converter."""
    x_train, x_test, _, y_test = digits
    old = onnx.ModelProto()
    old.CopyFrom(cnn)
    old.opset_import[0].version = opset
    onnx.checker.check_model(old)
    given = old.SerializeToString()

    q = inc.quantize(old, inc.QuantConfig(format=fmt), dataset=inc.Dataset(x_train[:128], batch_size=32))

    assert inc.get_backend("onnx").int8_op_counts(q).get("QLinearConv") == 2
    assert [op.name for op in inc.describe(old).ops] == ["conv1", "conv2", "fc"]
    assert models.accuracy(q, x_test, y_test) >= models.accuracy(cnn, x_test, y_test) - 0.01
    assert old.SerializeToString() == given
