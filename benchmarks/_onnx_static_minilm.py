"""Static INT8 of all-MiniLM-L6-v2 for ``onnx_bench.py``: the models, and their table.

Two static QDQ models, both calibrated on sentences other than the scored ones:

- ``inc_static``: ``inc.autotune`` from the default QuantConfig (every quantizable op INT8) with the mse
  strategy, to a mean cosine >= 0.99 of mean-pooled embeddings against FP32 on the calibration sentences;
- ``inc_static_linear``: one ``inc.quantize`` that keeps everything but the linear layers in FP32 (the
  MatMuls with a constant weight: query/key/value, attention output, feed-forward), as dynamic
  quantization does, but with activation ranges calibrated ahead of time, so OpenVINO runs them as int8
  kernels (it runs dynamic quantization as float).

Each runs on ONNX Runtime's CPU EP and, the same file, on OpenVINO, in the same side-by-side runs as the
FP32 and dynamic models.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

import inc_core as inc

__all__ = ["STATIC", "linear_layers_only", "static_models", "static_table"]

GOAL = 0.99
# Static columns: on ORT's CPU EP, and the same files on OpenVINO.
STATIC = ("inc_static", "inc_static_linear")


def linear_layers_only(model: onnx.ModelProto) -> inc.QuantConfig:
    """Static QDQ of the MatMuls with a constant weight; every other op (and activation x activation MatMuls) FP32."""
    space = inc.describe(model, inc.QuantConfig(format="qdq"))
    constants = {init.name for init in model.graph.initializer}
    weighted = {n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in constants}
    other_types = tuple(sorted({op.op_type for op in space.ops} - {"MatMul"}))
    attention = tuple(op.name for op in space.ops if op.op_type == "MatMul" and op.name not in weighted)
    return inc.QuantConfig(format="qdq", exclude=inc.LayerFilter(types=other_types, names=attention))


def static_models(
    model: onnx.ModelProto, calibration: list[dict[str, np.ndarray]], embed: Callable[[Any, dict[str, np.ndarray]], np.ndarray]
) -> tuple[dict[str, onnx.ModelProto], dict[str, Any]]:
    """The two static models of the module docstring, and how they were made (trials, seconds, ops in FP32)."""
    reference = [embed(model, b) for b in calibration]

    def fidelity(candidate: onnx.ModelProto) -> float:
        scores = []
        for ref, batch in zip(reference, calibration):
            got = embed(candidate, batch)
            scores.append(np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)))
        return float(np.concatenate(scores).mean())

    base = inc.QuantConfig(format="qdq")
    fixed = {key: (str(getattr(base, key)),) for key in ("calibration", "granularity", "scheme", "activation_dtype")}
    tuning = inc.TuningConfig(
        base=base, strategy="mse", tolerable_loss=1.0 - GOAL, loss_type="absolute", max_trials=12, search_space=fixed,
        history=None,
    )
    start = time.perf_counter()
    tuned = inc.autotune(model, tuning, eval_fn=fidelity, dataset=inc.Dataset(calibration))
    tune_s = time.perf_counter() - start
    linear_config = linear_layers_only(model)
    start = time.perf_counter()
    linear = inc.quantize(model, linear_config, dataset=inc.Dataset(calibration))
    linear_s = time.perf_counter() - start
    info = {
        "inc_static": {
            "how": "inc.autotune(QuantConfig(format='qdq'), strategy='mse', goal mean cosine >= 0.99 on the calibration sentences)",
            "met": tuned.met, "tuning_score": tuned.score, "trials": len(tuned.trials), "seconds": tune_s,
            "ops_fp32": len(tuned.config.exclude.names),
        },
        "inc_static_linear": {
            "how": "inc.quantize(QuantConfig(format='qdq', exclude=every op type but MatMul, and the activation x activation MatMuls))",
            "tuning_score": fidelity(linear), "seconds": linear_s,
        },
    }
    return {"inc_static": tuned.model, "inc_static_linear": linear}, info


def static_table(rows: list[dict[str, Any]], info: dict[str, Any]) -> list[str]:
    """Markdown: FP32, every dynamic path and inc's static INT8 of MiniLM on ORT and OpenVINO, side by side."""
    minilm = [r for r in rows if "inc_static" in r]
    if not minilm:
        return []
    sps = lambda got: (got or {}).get("samples_per_s")  # noqa: E731
    fmt = lambda v, spec=".1f", suffix="": "n/a" if v is None else f"{v:{spec}}{suffix}"  # noqa: E731
    lines = [
        "",
        "## Static INT8 of all-MiniLM-L6-v2 against every dynamic path",
        "",
        "Static QDQ models of inc, calibrated on 8 sentences that are not scored: \"tuned\" = "
        f"{info['inc_static']['how']}: {info['inc_static']['trials']} trial(s), {info['inc_static']['seconds']:.0f} s, "
        f"{info['inc_static']['ops_fp32']} ops in FP32, tuning score {info['inc_static']['tuning_score']:.4f}; "
        f"\"linear layers\" = {info['inc_static_linear']['how']} (score {info['inc_static_linear']['tuning_score']:.4f}, "
        f"{info['inc_static_linear']['seconds']:.0f} s). Timed in the same side-by-side runs as the tables above; "
        "\"best dynamic\" is the fastest of inc, ORT and INC-ORT dynamic on ORT's CPU EP and inc dynamic on OpenVINO. "
        "Accuracy: min per-sample cosine of the 8 scored sentences against FP32.",
        "",
        "| input | FP32 ORT | FP32 OV | best dynamic | static tuned ORT | static tuned OV | static linear ORT "
        "| static linear OV | best static / best dynamic | best static / FP32 ORT | min cosine (tuned / linear) "
        "| int8 matmul layers on OV (tuned / linear) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in minilm:
        dynamic = {k: sps(r.get(k)) for k in ("inc_int8", "ort_int8", "onc_int8", "inc_ov")}
        best_dyn_key = max((k for k, v in dynamic.items() if v), key=lambda k: dynamic[k])
        best_dyn = dynamic[best_dyn_key]
        static = {k: sps(r.get(k)) for k in ("inc_static", "inc_static_ov", "inc_static_linear", "inc_static_linear_ov")}
        best_static = max(v for v in static.values() if v)
        fp32 = sps(r["fp32"])
        label = {"inc_int8": "inc ORT", "ort_int8": "ORT", "onc_int8": "INC-ORT", "inc_ov": "inc OV"}[best_dyn_key]
        lines.append(
            f"| {r['input']} | {fmt(fp32)} | {fmt(sps(r.get('fp32_ov')))} | {fmt(best_dyn)} ({label}) | "
            f"{fmt(static['inc_static'])} | {fmt(static['inc_static_ov'])} | {fmt(static['inc_static_linear'])} | "
            f"{fmt(static['inc_static_linear_ov'])} | {fmt(best_static / best_dyn, '.2f', 'x')} | "
            f"{fmt(best_static / fp32, '.2f', 'x')} | {fmt(r.get('inc_static_min_cosine'), '.4f')} / "
            f"{fmt(r.get('inc_static_linear_min_cosine'), '.4f')} | {r.get('inc_static_ov_int8_layers', 'n/a')} / "
            f"{r.get('inc_static_linear_ov_int8_layers', 'n/a')} |"
        )
    return lines
