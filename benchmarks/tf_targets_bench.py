"""Which inc-tf int8 target is faster on this CPU: TF FP32 vs the SavedModel INT8 target vs LiteRT int8.

A ResNet-18-shaped Keras net (224x224x3, random weights, batch-norm statistics settled on one batch) is
quantized once per target with the same calibration data; each variant is timed in alternating rounds
(so a load spike on a shared machine hits every variant alike) and the best round per variant is kept.
Writes ``results/tf_targets.json`` and ``results/tf_targets.md``; the README's choice of the default
target (``QuantConfig(format="default")``) cites this table.

    flock /tmp/bench.lock .nox/bench_tf/bin/python benchmarks/tf_targets_bench.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import inc_core as inc  # noqa: E402
from inc_core import benchmark_callable  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import _tf_models  # noqa: E402
from _machine import cpu_flags, cpu_name, timing_lock  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def resnet18() -> keras.Model:
    """The benchmark's ResNet-18 (``_tf_models.resnet18``), random weights, batch-norm statistics from one batch."""
    keras.utils.set_random_seed(0)
    model = _tf_models.resnet18()
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in bns:
        layer.momentum = 0.0
    model(np.random.default_rng(1).normal(size=(8, 224, 224, 3)).astype(np.float32), training=True)
    for layer in bns:
        layer.momentum = 0.99
    return model


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=10, help="timed calls per round at batch 1 (fewer batched)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    # The commit measured: read before the run, as the tree may move on while it runs.
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()

    model = resnet18()
    rng = np.random.default_rng(0)
    calib = inc.Dataset(rng.normal(size=(16, 224, 224, 3)).astype(np.float32), batch_size=4)
    variants: dict[str, Any] = {"tf_fp32": model}
    variants["savedmodel_int8"] = inc.quantize(model, inc.QuantConfig(format="savedmodel", calib_samples=16), dataset=calib)
    variants["litert_int8"] = inc.quantize(model, inc.QuantConfig(format="tflite", calib_samples=16), dataset=calib)
    backend = inc.get_backend("tf")
    probe = rng.normal(size=(4, 224, 224, 3)).astype(np.float32)
    reference = np.asarray(model(probe, training=False))
    fidelity = {name: _cosine(reference, np.asarray(m(probe))) for name, m in variants.items() if name != "tf_fp32"}

    rows = []
    for batch in args.batches:
        inputs = rng.normal(size=(batch, 224, 224, 3)).astype(np.float32)
        runners = {name: backend.runner(m, inputs) for name, m in variants.items()}
        iterations = max(2, args.iterations // batch) if batch > 1 else args.iterations
        best = {name: 0.0 for name in runners}
        for _ in range(args.rounds):
            for name, run in runners.items():
                result = benchmark_callable(run, warmup=2, iterations=iterations, batch_size=batch)
                best[name] = max(best[name], result.throughput)
        row = {"batch": batch, **{f"{name}_per_s": round(v, 2) for name, v in best.items()}}
        row["savedmodel_vs_fp32"] = round(best["savedmodel_int8"] / best["tf_fp32"], 2)
        row["litert_vs_fp32"] = round(best["litert_int8"] / best["tf_fp32"], 2)
        row["savedmodel_vs_litert"] = round(best["savedmodel_int8"] / best["litert_int8"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)

    report = {
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "commit": commit,
        "model": "resnet18-shaped Keras net, 224x224x3, random weights",
        "versions": backend.version(),
        "method": f"best of {args.rounds} alternating rounds per variant; samples/s",
        "int8_ops": {"savedmodel_int8": backend.int8_op_counts(variants["savedmodel_int8"])},
        "cosine_vs_fp32": {k: round(v, 5) for k, v in fidelity.items()},
        "rows": rows,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "tf_targets.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# inc-tf int8 targets on a ResNet-18-shaped Keras net",
        "",
        f"CPU: {report['cpu']} ({report['cores']} cores; {', '.join(report['cpu_flags'])}), commit {commit}, "
        f"{report['versions']}. {report['method']}.",
        "",
        "| batch | TF FP32 | SavedModel INT8 | LiteRT int8 | SavedModel / FP32 | LiteRT / FP32 | SavedModel / LiteRT |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['tf_fp32_per_s']} | {r['savedmodel_int8_per_s']} | {r['litert_int8_per_s']} | "
            f"{r['savedmodel_vs_fp32']}x | {r['litert_vs_fp32']}x | {r['savedmodel_vs_litert']}x |"
        )
    lines += ["", f"Output cosine vs FP32 (4 random inputs): {report['cosine_vs_fp32']}", ""]
    (args.results / "tf_targets.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    with timing_lock():  # one benchmark times at a time (an outer flock on the same file counts)
        main()
