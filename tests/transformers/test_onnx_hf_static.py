"""Static INT8 of Hugging Face transformer graphs on ONNX Runtime (QDQ and QOperator) through inc.autotune.

Attention masks hold -inf (``Where(mask, 0, -inf)``) and T5's relative-position buckets take the log of
zero: these are graph features, kept in float, while every activation a quantized op reads is
calibrated. The goal is the mean-pooled sentence embedding's cosine against FP32.
"""

from __future__ import annotations

from pathlib import Path

import hf_models as hf
import numpy as np
import onnx
import pytest

import inc_core as inc
from inc_core.errors import CalibrationError

GOAL = 0.99
# Kernels ORT runs in INT8 for a quantized MatMul/Gemm, in either format (after its QDQ fusions).
INT8_MATMULS = ("QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "QGemm", "DynamicQuantizeMatMul")


def _fixed_settings(base: inc.QuantConfig) -> dict[str, tuple[str, ...]]:
    """Search only which ops stay FP32 (the mse strategy ranks them by measured error)."""
    return {key: (str(getattr(base, key)),) for key in ("calibration", "granularity", "scheme", "activation_dtype")}


def _tune(path: Path, calib: list, scored: list, fmt: str, max_trials: int) -> tuple[inc.TuningResult, np.ndarray]:
    reference = hf.onnx_embeddings(path, scored)

    def fidelity(model: onnx.ModelProto) -> float:
        return float(hf.cosine_rows(reference, hf.onnx_embeddings(model, scored)).mean())

    base = inc.QuantConfig(format=fmt)
    tuning = inc.TuningConfig(
        base=base, strategy="mse", tolerable_loss=1.0 - GOAL, loss_type="absolute", max_trials=max_trials,
        search_space=_fixed_settings(base),
    )
    return inc.autotune(str(path), tuning, eval_fn=fidelity, dataset=inc.Dataset(calib)), reference


def _int8_matmuls(model: onnx.ModelProto) -> int:
    counts = inc.get_backend("onnx").int8_op_counts(model)
    return sum(counts.get(kind, 0) for kind in INT8_MATMULS)


def _pairs_without_int8_reader(model: onnx.ModelProto) -> list[str]:
    """Activations quantized (QuantizeLinear -> DequantizeLinear) that no INT8 kernel reads: a reader runs an
    integer kernel when it is a MatMul/Gemm/Conv, or a QDQ group whose every output goes to QuantizeLinear."""
    producers = {out: node for node in model.graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def int8_reader(node: onnx.NodeProto) -> bool:
        return node.op_type in ("MatMul", "Gemm", "Conv") or all(
            readers.get(out) and all(r.op_type == "QuantizeLinear" for r in readers[out]) for out in node.output
        )

    return [
        dq.input[0]
        for dq in model.graph.node
        if dq.op_type == "DequantizeLinear"
        and getattr(producers.get(dq.input[0]), "op_type", None) == "QuantizeLinear"
        and not any(int8_reader(r) for r in readers.get(dq.output[0], []))
    ]


def _check_save_load(model: onnx.ModelProto, tmp_path: Path, scored: list) -> None:
    path = tmp_path / "int8.onnx"
    inc.save(model, path)
    loaded = inc.load(path)
    np.testing.assert_allclose(hf.onnx_embeddings(loaded, scored), hf.onnx_embeddings(model, scored), rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
@pytest.mark.parametrize("kind", ["bert", "gpt2", "t5_encoder"])
def test_small_transformer_tunes_to_cosine_goal(onnx_small_export, tmp_path, kind, fmt):
    path = onnx_small_export(kind)
    calib, scored = hf.onnx_token_batches(6, seed=1), hf.onnx_token_batches(6, seed=2)
    result, _ = _tune(path, calib, scored, fmt, max_trials=8)
    assert result.met and result.score >= GOAL, [(t.change, t.score) for t in result.trials]
    assert _int8_matmuls(result.model) >= 4, inc.get_backend("onnx").int8_op_counts(result.model)
    # The masked scores stay in float: each Softmax is a float Softmax reading a float tensor.
    producers = {o: n.op_type for n in result.model.graph.node for o in n.output}
    softmaxes = [n for n in result.model.graph.node if n.op_type == "Softmax"]
    assert softmaxes and all(producers.get(n.input[0]) != "DequantizeLinear" for n in softmaxes)
    _check_save_load(result.model, tmp_path, scored)


@pytest.mark.parametrize("kind", ["distilbert", "roberta", "deberta_v2"])
def test_more_encoders_quantize_statically(onnx_small_export, kind):
    path = onnx_small_export(kind)
    calib, scored = hf.onnx_token_batches(4, seed=1), hf.onnx_token_batches(4, seed=2)
    model = inc.quantize(str(path), inc.QuantConfig(), dataset=inc.Dataset(calib))
    cosine = hf.cosine_rows(hf.onnx_embeddings(path, scored), hf.onnx_embeddings(model, scored))
    # every projection and FFN matmul of the 2 layers runs in INT8 (DeBERTa-v2 multiplies its embeddings by the
    # padding mask; that product once counted as mask arithmetic and kept the whole encoder in float)
    assert cosine.mean() >= GOAL and _int8_matmuls(model) >= 12, inc.get_backend("onnx").int8_op_counts(model)


def test_dynamo_export_with_fixed_shapes_quantizes_to_a_model_ort_loads(tmp_path):
    # torch.onnx's dynamo exporter with fixed shapes: ORT's optimizer (run by preparation and again when the
    # INT8 model loads) fused linear layers twice under one generated initializer name, and the INT8 model of
    # DistilBERT did not load (an UnsupportedModelError where a model was due).
    path = hf.export_onnx_fixed_shape(hf.onnx_small_model("distilbert"), tmp_path / "distilbert_fixed.onnx")
    calib, scored = hf.onnx_token_batches(4, seed=1), hf.onnx_token_batches(4, seed=2)
    model = inc.quantize(str(path), inc.QuantConfig(), dataset=inc.Dataset(calib))
    cosine = hf.cosine_rows(hf.onnx_embeddings(path, scored), hf.onnx_embeddings(model, scored))
    assert cosine.mean() >= GOAL and _int8_matmuls(model) >= 12, inc.get_backend("onnx").int8_op_counts(model)


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_minilm_tunes_to_cosine_goal_on_real_sentences(onnx_minilm_export, tmp_path, fmt):
    path, tokenizer = onnx_minilm_export
    # Calibrate on the first 16 sentences, score on the other 24.
    calib = hf.onnx_sentence_batches(tokenizer, hf.SENTENCES[:16])
    scored = hf.onnx_sentence_batches(tokenizer, hf.SENTENCES[16:])
    result, _ = _tune(path, calib, scored, fmt, max_trials=12)
    assert result.met and result.score >= GOAL, [(t.change, t.score) for t in result.trials]
    if fmt == "qoperator":
        # Plain static QOperator misses the goal (about 0.86: each QLinearMatMul rounds its output, and the
        # residual stream and feed-forward outputs hold outliers); the fallback ranked by measured op error
        # reaches it. QDQ keeps a pair only where an INT8 kernel reads it (the residual stream and the
        # MatMul outputs before their float bias stay exact) and starts near the goal (0.988 on AMD EPYC).
        assert result.trials[0].score < GOAL
    else:
        assert _pairs_without_int8_reader(result.model) == []
    # On AMD EPYC 23 (QOperator) and most (QDQ) of the 48 MatMuls stay INT8; a CPU whose INT8 kernels round
    # differently may need a further doubling step of the fallback, which still keeps 6.
    assert _int8_matmuls(result.model) >= 6, inc.get_backend("onnx").int8_op_counts(result.model)
    _check_save_load(result.model, tmp_path, scored)


def _log_then_matmul() -> onnx.ModelProto:
    """x -> Log -> MatMul(W): a real activation that holds -inf wherever x holds 0."""
    helper = onnx.helper
    weight = onnx.numpy_helper.from_array(np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4), "w")
    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["logx"], name="log"), helper.make_node("MatMul", ["logx", "w"], ["y"], name="mm")],
        "log_matmul",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 4])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_quantized_activation_holding_inf_still_stops_calibration():
    data = np.abs(np.random.default_rng(0).normal(size=(8, 4))).astype(np.float32) + 0.1
    data[3, 2] = 0.0
    with pytest.raises(CalibrationError, match=r"Activation 'logx' holds Inf at calibration batch 0"):
        inc.quantize(_log_then_matmul(), inc.QuantConfig(), dataset=inc.Dataset(data, batch_size=8))
