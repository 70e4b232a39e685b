"""Models with Loop bodies reading outer tensors, as torch exports an EmbeddingBag (DLRM's tables).

ORT's quantizers do not see readers inside a Loop/If body: a tensor that only a body reads, produced by
an op they quantize, was replaced by its INT8 version and the body's reference dangled (QOperator:
"Invalid model with unknown initializers/tensors"). And inc's mask analysis, blind to what a body reads,
took the Loop's output for mask arithmetic, so every op after it (DLRM's interaction and top MLP) was
kept out of INT8 and uncalibrated, where ORT's own ``quantize_static`` quantizes them.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import inc_core as inc
import inc_onnx  # noqa: F401  (registers the backend)

FEATURES, HIDDEN, OUT = 8, 16, 4


def _rows_through_a_loop() -> onnx.ModelProto:
    """x @ w1 * scale, its rows appended to a sequence one by one in a Loop body, stacked, then @ w2."""
    rng = np.random.default_rng(3)
    body = helper.make_graph(
        [
            helper.make_node("Gather", ["scaled", "i"], ["row"], axis=0),  # reads ``scaled`` from the outer scope
            helper.make_node("SequenceInsert", ["rows_in", "row"], ["rows_out"]),
            helper.make_node("Identity", ["cond"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_sequence_value_info("rows_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_sequence_value_info("rows_out", TensorProto.FLOAT, None),
        ],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["hidden"], name="first"),
        helper.make_node("Mul", ["hidden", "scale"], ["scaled"], name="scale_rows"),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["count"], axis=0),
        helper.make_node("SequenceEmpty", [], ["empty"], dtype=TensorProto.FLOAT),
        helper.make_node("Loop", ["count", "true", "empty"], ["rows"], name="loop", body=body),
        helper.make_node("ConcatFromSequence", ["rows"], ["stacked"], axis=0, new_axis=1),
        helper.make_node("MatMul", ["stacked", "w2"], ["y"], name="last"),
    ]
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (FEATURES, HIDDEN)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32), "scale"),
        numpy_helper.from_array(rng.normal(0, 0.5, (HIDDEN, OUT)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(True), "true"),
    ]
    graph = helper.make_graph(
        nodes,
        "rows_through_a_loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUT])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_ops_after_a_loop_are_listed_like_any_other():
    names = [op.name for op in inc.describe(_rows_through_a_loop(), inc.QuantConfig(format="qoperator")).ops]
    assert names == ["first", "scale_rows", "last"]


@pytest.mark.parametrize("fmt", ["qoperator", "qdq"])
def test_a_tensor_only_a_loop_body_reads_stays_readable_and_the_output_close(fmt):
    model = _rows_through_a_loop()
    x = np.random.default_rng(0).normal(0, 1, (64, FEATURES)).astype(np.float32)
    quantized = inc.quantize(model, inc.QuantConfig(format=fmt), dataset=inc.Dataset(x, batch_size=16))
    expected, got = _run(model, x), _run(quantized, x)
    assert np.dot(expected.ravel(), got.ravel()) / np.linalg.norm(expected) / np.linalg.norm(got) > 0.999
    types = [node.op_type for node in quantized.graph.node]
    if fmt == "qoperator":
        assert types.count("QLinearMatMul") == 2 and "QLinearMul" in types, types
    else:
        weights = [i.name for i in quantized.graph.initializer if i.data_type == TensorProto.INT8]
        assert {"w1", "w2"} <= {name.removesuffix("_quantized") for name in weights}, weights


def test_a_dangling_tensor_at_orts_final_check_blames_the_node_that_made_it(monkeypatch):
    # ORT's QOperator quantizer checks that every tensor read is produced only after rewriting the whole graph, so
    # the node its frames hold then is the last one it quantized ('last'), not the one whose replaced output a
    # subgraph still read ('scale_rows', which made 'scaled'). inc's error named the former; the tensor tells.
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer

    def fail(self):
        node = next(n for n in self.model.graph().node if n.name == "last")  # noqa: F841 - what ORT's frames hold
        raise RuntimeError("Invalid model with unknown initializers/tensors.{'scaled'}")

    monkeypatch.setattr(ONNXQuantizer, "quantize_model", fail)
    x = np.random.default_rng(0).normal(0, 1, (16, FEATURES)).astype(np.float32)
    with pytest.raises(inc.errors.UnsupportedModelError, match=r"failed on op 'scale_rows' \(Mul\).*names=\('scale_rows',\)"):
        inc.quantize(_rows_through_a_loop(), inc.QuantConfig(format="qoperator"), dataset=inc.Dataset(x))
