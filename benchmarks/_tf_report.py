"""tf.md from the TF benchmark's rows: the throughput table, the ratios the goals name, and a verdict per goal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLUMNS = ("tf_fp32", "litert_fp32", "inc_litert", "inc_savedmodel", "converter", "aeq", "keras_int8", "nctf")
HEADINGS = {
    "tf_fp32": "TF FP32", "litert_fp32": "LiteRT FP32", "inc_litert": "**inc LiteRT int8**",
    "inc_savedmodel": "**inc SavedModel int8**", "converter": "TF converter int8", "aeq": "ai-edge-quantizer int8",
    "keras_int8": "Keras quantize int8", "nctf": "neural-compressor-tf int8",
}
INT8_COLUMNS = ("inc_litert", "inc_savedmodel", "converter", "aeq", "keras_int8", "nctf")
#: inc's int8 targets and the peers producing the same kind of artifact for the same runtime
TARGET_PEERS = {"inc_litert": ("converter", "aeq"), "inc_savedmodel": ("nctf", "keras_int8")}
CONVNET_SPEEDUP = 3.0
ACCURACY_DROP = 0.01


def _speed(row: dict[str, Any], column: str) -> float | None:
    timed = row["timed"].get(column)
    return None if timed is None else timed["samples_per_s"]


def verdicts(rows: list[dict[str, Any]], digits: dict[str, Any]) -> list[tuple[str, str]]:
    """(goal, "met" or "missed: reason") for every goal, from the measured figures alone."""
    out = []
    for target, target_peers in TARGET_PEERS.items():
        label = HEADINGS[target].strip("*")
        if not any(_speed(r, target) for r in rows):
            note = next((r["notes"][target] for r in rows if target in r["notes"]), "no timing in this run")
            out.append((f"{label} at least as fast as the best peer ({', '.join(HEADINGS[p] for p in target_peers)})",
                        f"missed: not measured ({note})"))
            out.append((f"{label} >= {CONVNET_SPEEDUP:.0f}x TF FP32 on the convnets at batch 1", "missed: not measured"))
            continue
        slower = []
        for row in rows:
            ours = _speed(row, target)
            best = max((s for p in target_peers if (s := _speed(row, p))), default=None)
            if ours is None:
                slower.append(f"{row['model']} b{row['batch']} not measured")
            elif best is not None and ours < best:
                slower.append(f"{row['model']} b{row['batch']} {ours / best:.2f}x")
        out.append((f"{label} at least as fast as the best peer ({', '.join(HEADINGS[p] for p in target_peers)})",
                    "met" if not slower else "missed: " + ", ".join(slower)))
        short = []
        for row in rows:
            if row["model"] != "minilm" and row["batch"] == 1:
                ours, fp32 = _speed(row, target), _speed(row, "tf_fp32")
                if ours is None or fp32 is None or ours < CONVNET_SPEEDUP * fp32:
                    short.append(f"{row['model']} {'n/a' if ours is None or fp32 is None else f'{ours / fp32:.2f}x'}")
        out.append((f"{label} >= {CONVNET_SPEEDUP:.0f}x TF FP32 on the convnets at batch 1",
                    "met" if not short else "missed: " + ", ".join(short)))
    top1 = digits["top1"]
    fp32 = top1.get("tf_fp32")
    for column in INT8_COLUMNS:
        label = HEADINGS[column].strip("*")
        if column not in top1 or fp32 is None:
            out.append((f"digits top-1 of {label} within 1% of FP32",
                        f"missed: not measured ({digits['notes'].get(column, 'no model')})"))
            continue
        drop = fp32 - top1[column]
        out.append((f"digits top-1 of {label} within 1% of FP32",
                    "met" if drop <= ACCURACY_DROP else f"missed: {top1[column]:.4f} vs FP32 {fp32:.4f} ({-drop:+.2%})"))
    return out


def write(results: Path, rows: list[dict[str, Any]], digits: dict[str, Any], meta: dict[str, Any]) -> None:
    results.mkdir(exist_ok=True)
    goals = verdicts(rows, digits)
    if meta.get("timing"):
        goals = [(g, f"missed: not measured ({meta['timing']})" if "fast" in g or "FP32 on" in g else v) for g, v in goals]
    payload = {"meta": meta, "rows": rows, "digits": digits, "verdicts": [{"goal": g, "verdict": v} for g, v in goals]}
    (results / "tf.json").write_text(json.dumps(payload, indent=2) + "\n")

    def f(v: float | None, spec: str = ".1f") -> str:
        return "n/a" if v is None else format(v, spec)

    def run_text(run: dict[str, Any]) -> str:
        return (
            f"Commit measured: {run['commit']}. Run of {run['date']}, "
            + (f"no timing: {run['timing']}" if run.get("timing") else f"timing from {run.get('timing_started', '?')}")
            + f"; 1-minute load average {run['load_average_at_start']:.1f} at the start and "
            f"{run['load_average_at_end']:.1f} at the end."
            + (" The peers' artifacts came from a cache of an earlier build of the same weights, calibration samples "
               "and tool versions." if run.get("peer_cache") else "")
            + (f" {run['note']}" if run.get("note") else "")
        )

    # Rows merged from several runs (meta["runs"], each row's "run" its index) name each run; a row's models
    # were all timed side by side in one run, rows of different runs are not.
    runs = meta.get("runs")
    provenance = (
        [f"**{', '.join(run['models'])}** rows: {run_text(run)}" for run in runs] if runs else [run_text(meta)]
    )
    lines = [
        "# TensorFlow / Keras 3 INT8 benchmark",
        "",
        f"CPU: {meta['cpu']} ({meta['threads']} threads; {', '.join(meta['flags'])}). "
        f"tensorflow {meta['tensorflow']}, keras {meta['keras']}, ai-edge-litert {meta['litert']}, ai-edge-quantizer "
        f"{meta['ai_edge_quantizer']}, neural-compressor-tf {meta['neural_compressor_tf']}, inc-tf {meta['inc_tf']}, "
        f"on {meta['threads']} cores (a machine shared with other work: absolute figures are low and noisy, "
        "the ratios within a row are what the side-by-side timing is for"
        + ("; rows of different runs are not comparable with each other" if runs else "") + ").",
        "",
        *[line for text in provenance for line in (f"- {text}" if runs else text, "")],
        *([f"{meta['merge_note']}", ""] if meta.get("merge_note") else []),
        "Throughput in samples/s (batch / median latency; models of a row timed side by side in alternating blocks"
        + (f" of back-to-back calls ({meta['blocks']})" if meta.get("blocks") else "") + ", "
        f"{meta['iterations']} timed calls each at batch 1, {meta['iterations_batched']} at batch 16). "
        "Convnets: random weights, batch-norm statistics from one batch, calibrated on "
        f"{meta['calib_samples']} random-normal images. minilm: all-MiniLM-L6-v2 in Keras layers with its real weights "
        f"(mean-pooled embedding), calibrated on {meta['calib_samples']} windows of real text.",
        "",
        "| model (input) | " + " | ".join(HEADINGS[c] for c in COLUMNS) + " | inc LiteRT / TF FP32 | inc LiteRT / best LiteRT peer | inc SavedModel / best TF peer |",
        "|---|" + "---:|" * (len(COLUMNS) + 3),
    ]
    for row in rows:
        speed = {c: _speed(row, c) for c in COLUMNS}

        def ratio(a: str, others: tuple[str, ...], speed: dict[str, float | None] = speed) -> str:
            best = max((s for o in others if (s := speed[o])), default=None)
            return "n/a" if speed[a] is None or best is None else f"{speed[a] / best:.2f}x"

        lines.append(
            f"| {row['model']} ({row['input']}) | " + " | ".join(f(speed[c]) for c in COLUMNS)
            + f" | {ratio('inc_litert', ('tf_fp32',))} | {ratio('inc_litert', TARGET_PEERS['inc_litert'])}"
            + f" | {ratio('inc_savedmodel', TARGET_PEERS['inc_savedmodel'])} |"
        )
    lines += ["", "Fidelity: smallest per-sample cosine of each int8 model's output vs TF FP32 (8 inputs).", "",
              "| model | " + " | ".join(HEADINGS[c] for c in INT8_COLUMNS) + " |", "|---|" + "---:|" * len(INT8_COLUMNS)]
    for row in rows:
        if row["batch"] == min(r["batch"] for r in rows if r["model"] == row["model"]):
            lines.append(f"| {row['model']} | " + " | ".join(f(row["min_cosine"].get(c), ".4f") for c in INT8_COLUMNS) + " |")
    top1 = digits["top1"]
    lines += [
        "",
        f"Accuracy: a digits CNN trained here on scikit-learn's digits, held-out top-1 ({digits['test_samples']} images): "
        + ", ".join(f"{HEADINGS[c].strip('*')} {top1[c]:.4f}" for c in ("tf_fp32", *INT8_COLUMNS) if c in top1) + ".",
        "",
        "## Goals",
        "",
    ]
    lines += [f"- {goal}: **{verdict}**" for goal, verdict in goals]
    missing = {}
    for row in rows:
        for column, note in row["notes"].items():
            missing.setdefault((column, note), []).append(row["model"])
    if missing:
        lines += ["", "## Not measured", ""]
        lines += [f"- {HEADINGS[c].strip('*')} on {', '.join(sorted(set(m)))}: {note}" for (c, note), m in missing.items()]
    lines += [
        "",
        "## What the columns are",
        "",
        "- TF FP32: a `tf.function` of the Keras model (oneDNN float kernels). LiteRT FP32: the converter's float "
        ".tflite on XNNPACK.",
        "- inc LiteRT int8: `inc.quantize(model, inc.QuantConfig(format='tflite'))`, ranges from inc's minmax "
        "observers, run by the ai-edge-litert interpreter. inc SavedModel int8: `inc.quantize(model, "
        "inc.QuantConfig(format='savedmodel'))`, written with `inc.save` and loaded back with `tf.saved_model.load` "
        "(TF's oneDNN int8 kernels), timed through its `serving_default` signature.",
        "- TF converter int8: `TFLiteConverter` with `Optimize.DEFAULT` and the same representative samples. "
        "ai-edge-quantizer int8: its `static_wi8_ai8` recipe on the float .tflite (it also quantizes the model's "
        "input and output, so the float batch is quantized inside the timed call).",
        "- inc LiteRT int8 and TF converter int8 are the same kind of flatbuffer (inc hands the converter its ranges): "
        "on the convnets the same ops (QUANTIZE, CONV_2D, ADD, MAX_POOL_2D, MEAN, FULLY_CONNECTED, DEQUANTIZE), all "
        "delegated to XNNPACK, differing only in scales. Timed alone against each other, 300 back-to-back calls each, "
        "they ran within 2% (ResNet-18 3.34 vs 3.32 ms, MobileNetV2 0.99 vs 0.98 ms): their ratio in the table is "
        "a measure of the timing's noise more than of either model.",
        "- minilm: the three LiteRT int8 paths use dynamic-range int8 there (inc `approach='dynamic'`, the converter "
        "without representative data, ai-edge-quantizer's `dynamic_wi8_afp32`), a BERT's usual int8 on LiteRT (the "
        "ONNX benchmark does the same); the TF graph paths (inc SavedModel, neural-compressor-tf) are static, "
        "Keras quantize is its own per-call int8.",
        "- Keras quantize int8: Keras 3's `model.quantize('int8')`, run by TF; it quantizes Dense, EinsumDense and "
        "Embedding layers only (not Conv2D), so on the convnets only the classifier runs int8.",
        "- neural-compressor-tf int8: INC 3.10's `quantize_model` with the default `StaticQuantConfig` on the model "
        "exported as a SavedModel (its graph path, rewriting to TF's QuantizeV2/_QuantizedConv2D/_QuantizedMatMul "
        "ops; its Keras path wraps float kernels in quantize/dequantize pairs and is int8 only under Intel Extension "
        "for TensorFlow), run as the returned frozen graph.",
        "- The peers of each inc target are the tools producing the same kind of artifact for the same runtime: "
        "LiteRT (converter, ai-edge-quantizer) and TF (neural-compressor-tf, Keras quantize).",
    ]
    (results / "tf.md").write_text("\n".join(lines) + "\n")
