"""Recurrent graphs as torch exports them: the LSTM's zero initial state is shaped at run time from the batch size.

Both exporters build that state from the input's Shape (torch.onnx's TorchScript path with ConstantOfShape, the
dynamo path by Expanding a scalar zero and Slicing it; tf2onnx, for a Keras ``Bidirectional(LSTM)``, Expands a
zero to [batch, hidden] and Concats one copy per direction). Such a fill is neither signal nor mask: taken for
mask arithmetic, it had kept the LSTM's output and everything after it (the classifier) out of static INT8, and
``inc.quantize`` reported nothing to quantize; the Concat building it was listed as quantizable, and ORT's QDQ
quantizer failed on its unobserved inputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_testmodels as models
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import inc_core as inc

STEPS, FEATURES, HIDDEN = 8, 8, 16


def _recurrent(initial_state: str) -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def init(name: str, array: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(array), name)

    directions = 2 if initial_state == "concat_per_direction" else 1
    inits = [
        init("W", rng.normal(0, 0.4, (directions, 4 * HIDDEN, FEATURES)).astype(np.float32)),
        init("R", rng.normal(0, 0.3, (directions, 4 * HIDDEN, HIDDEN)).astype(np.float32)),
        init("B", rng.normal(0, 0.1, (directions, 8 * HIDDEN)).astype(np.float32)),
        init("head_w", rng.normal(0, 0.5, (10, HIDDEN)).astype(np.float32)),
        init("head_b", rng.normal(0, 0.1, (10,)).astype(np.float32)),
        init("zero_index", np.array(0, np.int64)), init("one", np.array([1], np.int64)),
        init("hidden", np.array([HIDDEN], np.int64)), init("scalar_zero", np.array(0.0, np.float32)),
        init("start", np.array([0], np.int64)),
    ]
    nodes = [
        helper.make_node("Transpose", ["rows"], ["time_major"], perm=[1, 0, 2], name="to_time_major"),
        helper.make_node("Shape", ["rows"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "zero_index"], ["batch"], axis=0, name="batch"),
        helper.make_node("Unsqueeze", ["batch", "start"], ["batch1"], name="batch1"),
        helper.make_node("Concat", ["one", "batch1", "hidden"], ["state_shape"], axis=0, name="state_shape"),
    ]
    if initial_state == "constant_of_shape":  # torch.onnx.export(..., dynamo=False)
        nodes.append(helper.make_node("ConstantOfShape", ["state_shape"], ["h0"], name="zeros"))
    elif initial_state == "concat_per_direction":  # tf2onnx, Keras Bidirectional(LSTM)
        nodes += [
            helper.make_node("Concat", ["batch1", "hidden"], ["row_shape"], axis=0, name="row_shape"),
            helper.make_node("Expand", ["scalar_zero", "row_shape"], ["zeros"], name="zeros"),
            helper.make_node("Unsqueeze", ["zeros", "start"], ["direction_state"], name="direction_state"),
            helper.make_node("Concat", ["direction_state", "direction_state"], ["h0"], axis=0, name="both_directions"),
        ]
    else:  # torch.onnx.export(..., dynamo=True): a scalar zero expanded, then sliced per layer
        nodes += [
            helper.make_node("Expand", ["scalar_zero", "state_shape"], ["zeros"], name="zeros"),
            helper.make_node("Slice", ["zeros", "start", "one", "start"], ["h0"], name="layer0_state"),
        ]
    nodes += [
        helper.make_node(
            "LSTM", ["time_major", "W", "R", "B", "", "h0", "h0"], ["Y"], hidden_size=HIDDEN, name="lstm",
            direction="bidirectional" if directions == 2 else "forward",
        ),
        helper.make_node("ReduceMean", ["Y"], ["pooled"], axes=[0, 1], keepdims=0, name="mean"),
        helper.make_node("Gemm", ["pooled", "head_w", "head_b"], ["logits"], transB=1, name="head"),
    ]
    graph = helper.make_graph(
        nodes, "row_lstm", [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["batch", STEPS, FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, rows: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"rows": rows})[0]


@pytest.mark.parametrize("initial_state", ["constant_of_shape", "expand_and_slice", "concat_per_direction"])
@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_the_classifier_after_an_lstm_with_a_run_time_zero_state_runs_int8(digits, initial_state, fmt):
    model = _recurrent(initial_state)
    rows = digits[0].reshape(-1, STEPS, FEATURES)
    assert [(op.name, op.op_type) for op in inc.describe(model).ops] == [("head", "Gemm")]
    q = inc.quantize(model, inc.QuantConfig(format=fmt), dataset=inc.Dataset(rows[:128], batch_size=32))
    assert inc.resolve_backend(q).int8_op_counts(q) == {"QGemm": 1}
    reference, got = _run(model, digits[1].reshape(-1, STEPS, FEATURES)), _run(q, digits[1].reshape(-1, STEPS, FEATURES))
    cosine = float(np.sum(reference * got) / np.linalg.norm(reference) / np.linalg.norm(got))
    assert cosine > 0.999, cosine


def test_dynamic_quantizes_the_lstm_and_the_classifier(digits):
    model = _recurrent("expand_and_slice")
    q = inc.quantize(model, inc.QuantConfig(approach="dynamic"))
    assert inc.resolve_backend(q).int8_op_counts(q) == {"DynamicQuantizeLSTM": 1, "DynamicQuantizeMatMul": 1}
