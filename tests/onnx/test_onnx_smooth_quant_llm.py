"""SmoothQuant on a decoder-LLM-shaped ONNX graph, as torch.onnx (dynamo) exports Llama, Qwen2 or Mistral.

Digits images as 4 tokens of 16 pixels through: an RMS norm (Pow, ReduceMean, Add, Sqrt, Div, then a Mul by its
weight) whose weight makes three channels 40x larger (the activation outliers SmoothQuant is for), gate and up
projections reading it, ``down(silu(gate(h)) * up(h))`` with a residual, a second RMS norm, and a head. The two
norms' weights are equal and the graph holds them once, read by both Muls, as the exporter writes a freshly
initialised model's norms. Before, a constant read by two nodes was not folded into (a Mul went in front of
each projection instead), nor was a gated product: all-MiniLM-sized Llama exports got 1 fold of 9.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_testmodels as models
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import inc_core as inc
from inc_onnx import OnnxBackend

OUTLIERS = [2, 7, 12]
SQ = inc.SmoothQuant(alpha=0.5)


def _rms_norm(x: str, weight: str, name: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node("Pow", [x, "two"], [f"{name}_sq"], name=f"{name}_pow"),
        helper.make_node("ReduceMean", [f"{name}_sq"], [f"{name}_ms"], name=f"{name}_mean", axes=[-1], keepdims=1),
        helper.make_node("Add", [f"{name}_ms", "eps"], [f"{name}_mse"], name=f"{name}_eps"),
        helper.make_node("Sqrt", [f"{name}_mse"], [f"{name}_rms"], name=f"{name}_sqrt"),
        helper.make_node("Div", [x, f"{name}_rms"], [f"{name}_normed"], name=f"{name}_div"),
        helper.make_node("Mul", [weight, f"{name}_normed"], [name], name=f"{name}_weight"),
    ]


def _gated_block(up: str = "matmul") -> onnx.ModelProto:
    """``up`` is how the up projection is written: ``"matmul"``, ``"matmul_bias"`` (MatMul then Add, an nn.Linear with
    a bias on 3-D tokens) or ``"gemm"`` (Gemm with transB and C, an nn.Linear on 2-D rows: the graph then reads rows)."""
    rng = np.random.default_rng(0)
    norm_weight = np.ones(16, np.float32)
    norm_weight[OUTLIERS] = 40.0
    w_gate, w_up = (rng.normal(scale=0.5, size=(16, 32)).astype(np.float32) for _ in range(2))
    for w in (w_gate, w_up):
        w[OUTLIERS] /= 40.0
    w_up[:, [1, 9]] *= 20.0  # product channels far larger than the rest: down's input has outliers of its own
    w_down = rng.normal(scale=0.3, size=(32, 16)).astype(np.float32)
    w_down[[1, 9]] /= 20.0
    w_head = rng.normal(scale=0.3, size=(16, 10)).astype(np.float32)
    w_head[OUTLIERS] /= 40.0
    b_up = rng.normal(scale=0.1, size=32).astype(np.float32)
    arrays = {
        "norm_weight": norm_weight, "two": np.array(2.0, np.float32), "eps": np.array(1e-6, np.float32),
        "w_gate": w_gate, "w_down": w_down, "w_head": w_head,
    }
    if up == "gemm":
        arrays |= {"w_up_t": np.ascontiguousarray(w_up.T), "b_up": b_up}
        up_nodes = [helper.make_node("Gemm", ["norm1", "w_up_t", "b_up"], ["up_out"], name="up", transB=1)]
    elif up == "matmul_bias":
        arrays |= {"w_up": w_up, "b_up": b_up}
        up_nodes = [helper.make_node("MatMul", ["norm1", "w_up"], ["up_mm"], name="up"),
                    helper.make_node("Add", ["up_mm", "b_up"], ["up_out"], name="up_bias")]
    else:
        arrays["w_up"] = w_up
        up_nodes = [helper.make_node("MatMul", ["norm1", "w_up"], ["up_out"], name="up")]
    shape = ["n", 16] if up == "gemm" else ["n", 4, 16]
    nodes = [
        *_rms_norm("tokens", "norm_weight", "norm1"),
        helper.make_node("MatMul", ["norm1", "w_gate"], ["gate_out"], name="gate"),
        *up_nodes,
        helper.make_node("Sigmoid", ["gate_out"], ["gate_sig"], name="silu_sigmoid"),
        helper.make_node("Mul", ["gate_out", "gate_sig"], ["gate_act"], name="silu"),
        helper.make_node("Mul", ["gate_act", "up_out"], ["gated"], name="gated_product"),
        helper.make_node("MatMul", ["gated", "w_down"], ["down_out"], name="down"),
        helper.make_node("Add", ["tokens", "down_out"], ["residual"], name="residual"),
        *_rms_norm("residual", "norm_weight", "norm2"),
        helper.make_node("MatMul", ["norm2", "w_head"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "gated_block",
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [*shape[:-1], 10])],
        initializer=[numpy_helper.from_array(a, n) for n, a in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)], producer_name="inc-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"tokens": x})[0]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """Calibration and test images as 4 tokens of 16 pixels."""
    x_train, x_test, _, _ = models.digits()
    tokens = lambda x: np.ascontiguousarray(x.reshape(-1, 4, 16), dtype=np.float32)  # noqa: E731
    return tokens(x_train[:200]), tokens(x_test)


@pytest.mark.parametrize("up", ["matmul", "matmul_bias", "gemm"])
def test_scales_fold_into_shared_norm_weights_and_the_up_projection(up: str, data: tuple[np.ndarray, np.ndarray]) -> None:
    model = _gated_block(up)
    given = model.SerializeToString()
    calib, x = data
    if up == "gemm":  # rows of 16 pixels
        calib, x = calib.reshape(-1, 16), x.reshape(-1, 16)
    calibration = OnnxBackend().calibrate(model, inc.Dataset(calib, batch_size=50), inc.QuantConfig(smooth_quant=SQ))
    assert set(calibration.folded) == {"norm1", "gated", "norm2"}
    assert calibration.inserted == ()  # no Mul in front of any projection
    smoothed = calibration.prepared.model
    inits = {i.name: numpy_helper.to_array(i) for i in smoothed.graph.initializer}
    weights = {n.name: next(i for i in n.input if i in inits) for n in smoothed.graph.node if n.name in ("norm1_weight", "norm2_weight")}
    assert len(set(weights.values())) == 2  # each norm now has its own weight: their scales differ
    assert all(inits[w][OUTLIERS].max() < 10.0 for w in weights.values())
    np.testing.assert_allclose(_run(smoothed, x), _run(model, x), rtol=1e-4, atol=1e-4)
    assert model.SerializeToString() == given  # the user's model untouched


def test_smooth_quant_brings_the_gated_block_closer_to_fp32(data: tuple[np.ndarray, np.ndarray]) -> None:
    model = _gated_block()
    calib, x = inc.Dataset(data[0], batch_size=50), data[1]
    ref = _run(model, x)

    def error(quantized: onnx.ModelProto) -> float:
        return float(np.mean((_run(quantized, x) - ref) ** 2) / np.mean(ref**2))

    plain = error(inc.quantize(model, inc.QuantConfig(), dataset=calib))
    smooth = error(inc.quantize(model, inc.QuantConfig(smooth_quant=SQ), dataset=calib))
    assert smooth < 0.3 * plain, (plain, smooth)
