"""The corpus: every architecture through every inc path ends in INT8 kernels at reference fidelity, or in an IncError.

A case passes when inc's INT8 model runs int8 kernels (counted in what actually runs) with a mean output
cosine against FP32 on held-out inputs at or above the floor, or when inc raises an ``IncError`` where the
framework's own flow produces no usable INT8 model either. It fails on any other exception, on a success
with zero int8 kernels, on fidelity below the floor, and on an ``IncError`` where the framework's own
flow does quantize the model (inc giving up on what the framework handles).

The floor: the framework's own flow on the same model and data (plain torch.ao FX, torchao PT2E with
X86InductorQuantizer, torch.ao dynamic, onnxruntime quantize_static/quantize_dynamic) minus MARGIN, and never
below ABSOLUTE_FLOOR unless the framework's own flow is below it too: then inc must be on par with it, and the
table says that no flow reaches ABSOLUTE_FLOOR on that model (a model for accuracy-driven tuning, not a one-shot
recipe). Every case is recorded in the table conftest.py prints and writes.

QAT (``torch_qat_pt2e``, ``torch_qat_fx``): ``inc_torch.prepare_qat``, a short training loop, ``inc_torch.convert``.
Its fidelity is the INT8 model's against the QAT model in eval mode (what the user validated), its reference the
framework's own QAT flow (torchao's prepare_qat_pt2e, torch.ao's prepare_qat_fx) trained by the same loop. The case
also fails when the prepared model with fake quantization off departs from FP32 (the QAT graph must compute the
model it was made from), or when the QAT or the INT8 model gives different outputs on the same inputs in eval mode
(training-mode randomness left in).
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

import corpus_measure as measure
import corpus_models as corpus
import numpy as np
import pytest
import torch

import inc_core as inc
import inc_torch
from inc_core.errors import IncError

MARGIN = 0.02  # inc below the framework's own flow by more than this is a defect
ABSOLUTE_FLOOR = 0.80  # below this mean cosine no INT8 model is usable, whatever the reference does
NO_REFERENCE_FLOOR = 0.90  # the floor where the framework's own flow produced nothing to compare with
QAT_GRAPH_FLOOR = 0.9999  # the QAT graph with fake quantization off against FP32: the same computation

TORCH_PATHS = ("torch_pt2e", "torch_fx", "torch_dynamic")
ONNX_PATHS = ("onnx_qdq", "onnx_qoperator", "onnx_dynamic")
CONFIGS = {
    "torch_pt2e": inc.QuantConfig(format="pt2e"),
    "torch_fx": inc.QuantConfig(format="fx"),
    "torch_dynamic": inc.QuantConfig(approach="dynamic"),
    "onnx_qdq": inc.QuantConfig(format="qdq"),
    "onnx_qoperator": inc.QuantConfig(format="qoperator"),
    "onnx_dynamic": inc.QuantConfig(approach="dynamic"),
}
# QAT on the constructs it changes: batch norms with eps 1e-3, Hardswish and SE (MobileNetV3), attention and
# LayerNorm (ViT). Left out for CI time: ResNet-18 and ConvNeXt-Tiny passed both paths with nothing more to show;
# EfficientNet-B0 (stochastic depth, SiLU; its four QAT runs took ~4 CPU minutes, the slowest rows) found the
# stochastic-depth and dropout defects tests/torch/test_qat.py now reproduces on both paths (its last rows: 0.9267
# PT2E, 0.8626 FX, each above its reference by 0.28-0.36). GoogLeNet is left out because
# its PT2E reference scores another model: torchao's QAT flow computes every batch norm with eps 1e-5 where
# GoogLeNet's have 1e-3, and that model converts with less rounding drift (inc on GoogLeNet with its eps set to 1e-5:
# 0.963, above torchao's 0.955; with 1e-3, 0.936-0.955 over data seeds, 0.004-0.019 below it: too close to the
# margin to fail only on defects). tests/torch/test_qat.py checks the batch-norm eps of QAT exactly.
QAT_MODELS = ("mobilenet_v3_small", "vit_2layer_64px")
QAT_PATHS = ("torch_qat_pt2e", "torch_qat_fx")
for _path in QAT_PATHS:
    CONFIGS[_path] = inc.QATConfig(
        format=_path.rpartition("_")[2], freeze_observer_step=measure.QAT_FREEZE_STEP, freeze_bn_step=measure.QAT_FREEZE_STEP
    )
CASES = [
    (m, p)
    for m in corpus.TORCHVISION_MODELS
    for p in (*TORCH_PATHS, *(QAT_PATHS if m in QAT_MODELS else ()), *ONNX_PATHS)
] + [(m, p) for m in corpus.SKLEARN_MODELS for p in ONNX_PATHS]


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:400]}"


def _floor(reference: dict[str, Any]) -> float:
    if reference.get("cosine") is None or not reference.get("int8_ops"):
        return NO_REFERENCE_FLOOR
    if reference["cosine"] < ABSOLUTE_FLOOR:  # no INT8 flow is usable here: inc must match the framework's own
        return reference["cosine"] - MARGIN
    return max(ABSOLUTE_FLOOR, reference["cosine"] - MARGIN)


def _data(model_name: str) -> tuple[np.ndarray, np.ndarray]:
    if model_name in corpus.SKLEARN_MODELS:
        x, _, x_test, _ = corpus.digits_split()
        return x[:256], x_test[:256]
    return corpus.image_crops(corpus.CALIB_CROPS, seed=0), corpus.image_crops(corpus.HELD_OUT_CROPS, seed=1)


def _torch_case(model_name: str, path: str, calib: np.ndarray, held: np.ndarray) -> tuple[dict[str, Any], Any]:
    """(reference row, a callable running inc) for a torch path."""
    model = corpus.torchvision_model(model_name)
    fp32 = measure.torch_outputs(model, held)
    reference: dict[str, Any] = {}
    try:
        ref_model = measure.reference_torch(path, model, calib)
        reference["cosine"] = measure.cosines(fp32, measure.torch_outputs(ref_model, held))[0]
        reference["int8_ops"] = measure.torch_int8_kernels(ref_model)
    except Exception as exc:  # the framework's own flow failing is a fact to record, not a test failure
        reference["error"] = _short(exc)

    def run_inc() -> tuple[int, tuple[float, float], dict[str, Any]]:
        with measure.counting_inductor_kernels() as compiled_kernels:
            quantized = inc.quantize(model, CONFIGS[path], dataset=inc.Dataset(calib, batch_size=measure.BATCH))
            outputs = measure.torch_outputs(quantized, held)
        # PT2E runs through inductor: count what it compiled. FX and dynamic run torch.ao quantized modules.
        kernels = compiled_kernels() if path == "torch_pt2e" else measure.torch_int8_kernels(quantized)
        return kernels, measure.cosines(fp32, outputs), {}

    return reference, run_inc


def _qat_case(model_name: str, path: str, calib: np.ndarray, held: np.ndarray) -> tuple[dict[str, Any], Any]:
    """(reference row, a callable running inc's QAT) for a QAT path."""
    fmt = CONFIGS[path].format
    model = corpus.torchvision_model(model_name)
    fp32 = measure.torch_outputs(model, held)
    teacher = measure.torch_outputs(model, calib)
    reference: dict[str, Any] = {}
    try:
        ref = measure.reference_qat(fmt, model, calib, teacher, held)
        reference["cosine"] = measure.cosines(ref["qat"][0], ref["int8"])[0]
        reference["int8_ops"] = ref["int8_ops"]
        reference["deterministic"] = bool(np.array_equal(*ref["qat"]))
    except Exception as exc:  # the framework's own flow failing is a fact to record, not a test failure
        reference["error"] = _short(exc)

    def run_inc() -> tuple[int, tuple[float, float], dict[str, Any]]:
        qat = inc_torch.prepare_qat(model, CONFIGS[path], torch.from_numpy(calib[: measure.BATCH]))
        qat.eval()
        with measure.fake_quant_off(qat):
            graph_cosine = measure.cosines(fp32, measure.torch_outputs(qat, held))[1]
        qat.train()
        measure.qat_train(qat, calib, teacher)
        qat.eval()
        trained = measure.torch_outputs(qat, held)
        checks = {
            "qat_graph_min_cosine": round(graph_cosine, 6),
            "qat_deterministic": bool(np.array_equal(trained, measure.torch_outputs(qat, held))),
        }
        with measure.counting_inductor_kernels() as compiled_kernels:
            int8 = inc_torch.convert(qat)
            outputs = measure.torch_outputs(int8, held)
        checks["int8_deterministic"] = bool(np.array_equal(outputs, measure.torch_outputs(int8, held)))
        checks["int8_vs_fp32"] = round(measure.cosines(fp32, outputs)[0], 4)
        # PT2E runs through inductor: count what it compiled. FX runs torch.ao quantized modules.
        kernels = compiled_kernels() if fmt == "pt2e" else measure.torch_int8_kernels(int8)
        return kernels, measure.cosines(trained, outputs), checks

    return reference, run_inc


def _onnx_case(model_name: str, path: str, calib: np.ndarray, held: np.ndarray, tmp: Path) -> tuple[dict[str, Any], Any]:
    import onnx

    model_file = tmp / f"{model_name}.onnx"
    if model_name in corpus.SKLEARN_MODELS:
        onnx.save_model(corpus.sklearn_onnx(model_name), str(model_file))
    else:
        corpus.export_onnx(model_name, model_file)
    input_name = onnx.load(str(model_file), load_external_data=False).graph.input[0].name
    fp32 = measure.onnx_outputs(model_file, {input_name: held})
    reference: dict[str, Any] = {}
    try:
        feeds = [{input_name: calib[i : i + measure.BATCH]} for i in range(0, len(calib), measure.BATCH)]
        ref_file = measure.reference_onnx(path, model_file, feeds, tmp / f"{model_name}.{path}.ref.onnx")
        reference["int8_ops"] = measure.onnx_int8_kernels(ref_file)
        reference["cosine"] = measure.cosines(fp32, measure.onnx_outputs(ref_file, {input_name: held}))[0]
    except Exception as exc:  # the framework's own flow failing is a fact to record, not a test failure
        reference["error"] = _short(exc)

    def run_inc() -> tuple[int, tuple[float, float], dict[str, Any]]:
        quantized = inc.quantize(str(model_file), CONFIGS[path], dataset=inc.Dataset(calib, batch_size=measure.BATCH))
        kernels = measure.onnx_int8_kernels(quantized)
        return kernels, measure.cosines(fp32, measure.onnx_outputs(quantized, {input_name: held})), {}

    return reference, run_inc


@pytest.mark.parametrize(("model_name", "path"), CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_corpus_case(model_name: str, path: str, tmp_path: Path, corpus_rows: list[dict[str, Any]]) -> None:
    calib, held = _data(model_name)
    if path in QAT_PATHS:
        reference, run_inc = _qat_case(model_name, path, calib, held)
    elif path in TORCH_PATHS:
        reference, run_inc = _torch_case(model_name, path, calib, held)
    else:
        reference, run_inc = _onnx_case(model_name, path, calib, held, tmp_path)
    row: dict[str, Any] = {"model": model_name, "path": path, "reference": reference, "floor": round(_floor(reference), 4)}
    corpus_rows.append(row)
    start = time.perf_counter()
    try:
        kernels, (mean_cos, min_cos), checks = run_inc()
    except IncError as exc:
        row.update(outcome="IncError", error=_short(exc), seconds=round(time.perf_counter() - start, 1))
        if reference.get("int8_ops") and (reference.get("cosine") or 0.0) >= row["floor"]:
            row["verdict"] = "FAIL: IncError where the framework's own flow quantizes"
            pytest.fail(f"inc raised {_short(exc)}; the framework's own flow gives {reference}")
        row["verdict"] = "ok (clean IncError)"
        return
    except Exception as exc:
        row.update(outcome="raw exception", error=_short(exc), seconds=round(time.perf_counter() - start, 1))
        row["verdict"] = "FAIL: non-IncError exception"
        pytest.fail(f"a non-IncError escaped inc.quantize: {_short(exc)}\n{traceback.format_exc()}")
    row.update(outcome="int8", int8_ops=kernels, cosine=round(mean_cos, 4), min_cosine=round(min_cos, 4), **checks)
    row["seconds"] = round(time.perf_counter() - start, 1)
    if checks and not checks["qat_graph_min_cosine"] >= QAT_GRAPH_FLOOR:
        row["verdict"] = "FAIL: the QAT graph with fake quantization off departs from FP32"
        pytest.fail(f"prepare_qat's model, fake quantization off, min cosine {checks['qat_graph_min_cosine']} to FP32")
    for which in ("qat", "int8"):
        if checks and not checks[f"{which}_deterministic"]:
            row["verdict"] = f"FAIL: the {which.upper()} model gives different outputs on the same inputs in eval mode"
            pytest.fail(row["verdict"])
    if kernels == 0:
        row["verdict"] = "FAIL: silent success with 0 int8 ops"
        pytest.fail(f"inc.quantize succeeded but the result runs no int8 kernel ({path} on {model_name})")
    if not mean_cos >= row["floor"]:  # also catches NaN
        row["verdict"] = "FAIL: fidelity below floor"
        pytest.fail(f"mean cosine {mean_cos:.4f} < floor {row['floor']:.4f} (reference {reference})")
    if reference.get("cosine") is None or reference["cosine"] >= ABSOLUTE_FLOOR:
        row["verdict"] = "ok"
    elif mean_cos < ABSOLUTE_FLOOR:
        row["verdict"] = f"ok (on par; every flow below {ABSOLUTE_FLOOR})"
    else:
        row["verdict"] = f"ok (the framework's own flow is below {ABSOLUTE_FLOOR})"
