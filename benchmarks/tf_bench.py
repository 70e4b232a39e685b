"""TensorFlow / Keras 3 INT8 benchmark: inc's int8 targets vs TF FP32 and the peers a TF user would pick.

Models: ResNet-18/50- and MobileNetV2-shaped Keras convnets (224x224, random weights, batch 1 and 16) and
all-MiniLM-L6-v2 ported to Keras layers with its real weights (128 real tokens a window, batch 1 and 16).
Columns, each built from the same Keras model and the same calibration samples:

- TF FP32: a ``tf.function`` of the Keras model; LiteRT FP32: the converter's float .tflite (XNNPACK).
- inc LiteRT int8: ``inc.quantize`` with the default QuantConfig (ranges from inc's observers).
- inc SavedModel int8: inc's TF SavedModel running TF's oneDNN int8 kernels, when inc-tf provides it.
- Peers on LiteRT: the TF converter's default full-integer output; ai-edge-quantizer's static int8 recipe.
- Peers on TF: Keras 3's ``model.quantize("int8")``; neural-compressor-tf 3.10's default static config.

Every model of a row is timed side by side with the others, in blocks of back-to-back calls whose order is
reversed every other round, so load from other processes falls on each alike; throughput = batch /
median latency. Fidelity: the smallest per-sample cosine of each int8 model's output vs FP32. Accuracy:
a digits CNN trained here on scikit-learn's digits, held-out top-1 of FP32 and of every int8 path.

    python benchmarks/tf_bench.py [--iterations 48] [--iterations-batched 9] [--models ...] [--batches 1 16]

Results go to benchmarks/results/tf.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import inc_tf  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tf_peers as peers  # noqa: E402
from _machine import cpu_flags, cpu_name, timing_lock  # noqa: E402
from _tf_models import CONVNETS, MINILM, SEQ_LEN, make_convnet, minilm, minilm_windows  # noqa: E402
from _tf_report import COLUMNS, INT8_COLUMNS, write  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = (*CONVNETS, MINILM)
CALIB_SAMPLES = 16
#: the LiteRT paths' approach per model: a BERT's usual int8 on LiteRT is dynamic range (int8 weights and
#: activations quantized per call), as the ONNX benchmark does for MiniLM; the convnets are static.
LITERT_APPROACH = {MINILM: "dynamic"}
THREADS = len(os.sched_getaffinity(0))
#: peers whose artifacts are files, built once per model and calibration and reused by later runs
CACHED = {"litert_fp32", "converter", "aeq", "nctf"}


def fingerprint(model: keras.Model, calib: np.ndarray) -> str:
    """What a cached peer artifact was built from: the weights, the calibration samples, the tools' versions."""
    from importlib.metadata import version

    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    digest.update(np.ascontiguousarray(calib).tobytes())
    for package in ("tensorflow-cpu", "keras", "ai-edge-litert", "ai-edge-quantizer", "neural-compressor-tf"):
        digest.update(version(package).encode())
    return digest.hexdigest()[:16]


def build(
    model: keras.Model, calib: np.ndarray, cache: Path | None = None, approach: str = "static"
) -> tuple[dict[str, Any], dict[str, str], dict[str, float]]:
    """Every column's model (or the reason it is missing) and the seconds each INT8 path took to build.

    ``approach`` applies to the LiteRT paths (inc, converter, ai-edge-quantizer); the TF graph paths are static.
    """
    builders = {
        "tf_fp32": lambda: model,
        "litert_fp32": lambda: peers.LiteRT(peers.litert_fp32(model).content, THREADS),
        "inc_litert": lambda: peers.LiteRT(peers.inc_litert_int8(model, calib, approach).content, THREADS),
        "inc_savedmodel": lambda: peers.inc_savedmodel_int8(model, calib),
        "converter": lambda: peers.LiteRT(peers.converter_int8(model, calib, approach).content, THREADS),
        "aeq": lambda: _litert_or_reason(peers.ai_edge_quantizer_int8(model, calib, approach)),
        "keras_int8": lambda: peers.keras_int8(model),
        "nctf": lambda: peers.neural_compressor_tf_int8(model, calib),
    }
    models, notes, seconds = {}, {}, {}
    key = f"{approach}-{fingerprint(model, calib)}" if cache else ""
    for column, make in builders.items():
        start = time.perf_counter()
        path = cache / f"{column}-{key}" if cache and column in CACHED else None
        cached = path is not None and path.exists()
        try:
            built = peers.load_artifact(path, THREADS) if path and cached else make()
            if path and not path.exists():
                peers.save_artifact(built, path)
        except Exception as exc:  # noqa: BLE001 - inc's own paths failing is a result too, reported as such
            built = peers.reason(exc)
        seconds[column] = time.perf_counter() - start
        if isinstance(built, str):
            notes[column] = built
            print(f"  {column}: not measured ({built})", flush=True)
        else:
            models[column] = built
            print(f"  {column}: {'loaded' if cached else 'built'} in {seconds[column]:.1f} s", flush=True)
    return models, notes, seconds


def _litert_or_reason(model: Any) -> Any:
    return model if isinstance(model, str) else peers.LiteRT(model.content, THREADS)


def runner(model: Any, x: np.ndarray) -> Any:
    if isinstance(model, keras.Model):
        fn = tf.function(lambda t: model(t, training=False))
        tensor = tf.constant(x)
        return lambda: fn(tensor)
    if isinstance(model, peers.GraphModel | peers.SavedModel):
        tensor = tf.constant(x)
        return lambda: model.fn(tensor)
    return lambda: model(x)


def outputs(model: Any, x: np.ndarray) -> np.ndarray:
    if isinstance(model, keras.Model):
        return np.asarray(model(x, training=False))
    return np.asarray(model(x))


# (timed, untimed) calls of one block: at batch 1, and above
BLOCK_AT_BATCH_1, BLOCK_BATCHED = (8, 2), (3, 1)


def side_by_side(models: dict[str, Any], x: np.ndarray, iterations: int) -> dict[str, dict[str, float]]:
    """Blocks of back-to-back calls per model, in reversed order every other round; batch / median latency.

    Steady state, as ``inc.benchmark`` measures it: a block of 8 timed calls at batch 1 (3 above) after untimed
    ones. Blocks of 2 calls after a pause (this benchmark's first method) timed each model half cold: at batch 1
    the LiteRT int8 models then ran at half their back-to-back rate (ResNet-18 150/s against 300/s, where TF FP32
    moved from 51/s to 59/s), which said more about the pause than about the model.
    """
    runners = {name: runner(m, x) for name, m in models.items()}
    for run in runners.values():
        for _ in range(2):
            run()
    block, warm = BLOCK_AT_BATCH_1 if len(x) == 1 else BLOCK_BATCHED
    latencies: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for round_ in range(-(-iterations // block)):
        for name in order if round_ % 2 == 0 else reversed(order):
            # TF's and LiteRT's worker threads spin for a while after a call and would steal the cores from
            # the next model: let them go idle, then untimed calls settle this model's pool and caches.
            time.sleep(0.2)
            for _ in range(warm):
                runners[name]()
            for _ in range(block):
                start = time.perf_counter()
                runners[name]()
                latencies[name].append(time.perf_counter() - start)
    return {
        name: {"samples_per_s": len(x) / float(np.median(v)), "p50_ms": float(np.median(v)) * 1e3, "calls": len(v)}
        for name, v in latencies.items()
    }


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.min(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def prepare(name: str, batches: list[int], cache: Path | None) -> dict[str, Any]:
    """One model's columns built, checked against FP32 and ready to time (no lock held: no timing here)."""
    print(f"building {name} ...", flush=True)
    rng = np.random.default_rng(0)
    if name == MINILM:
        model = minilm()
        windows = minilm_windows(CALIB_SAMPLES + max(batches))
        calib, check, shape = windows[:CALIB_SAMPLES], windows[CALIB_SAMPLES:], f"{SEQ_LEN} tokens"
    else:
        model = make_convnet(name)
        calib = rng.normal(size=(CALIB_SAMPLES, 224, 224, 3)).astype(np.float32)
        check, shape = rng.normal(size=(max(batches), 224, 224, 3)).astype(np.float32), "224x224x3"
    approach = LITERT_APPROACH.get(name, "static")
    models, notes, seconds = build(model, calib, cache, approach)
    reference = outputs(model, check[:8])
    cosines = {}
    for column, m in models.items():
        if column != "tf_fp32":
            try:
                cosines[column] = min_cosine(reference, outputs(m, check[:8]))
            except Exception as exc:  # noqa: BLE001 - a model that builds but cannot run is reported
                notes[column] = f"runs no batch of 8: {peers.reason(exc)}"
    for column in set(notes) & set(models):
        del models[column]
    print(f"  min cosine vs FP32: {json.dumps({k: round(v, 4) for k, v in cosines.items()})}", flush=True)
    return {"name": name, "models": models, "check": check, "shape": shape, "approach": approach,
            "cosines": cosines, "notes": notes, "seconds": seconds}


def time_prepared(prepared: dict[str, Any], batches: list[int], iterations: int, iterations_batched: int) -> list[dict[str, Any]]:
    rows = []
    for batch in batches:
        print(f"timing {prepared['name']} at batch {batch} ...", flush=True)
        x = prepared["check"][:batch]
        timed = side_by_side(prepared["models"], x, iterations if batch == 1 else iterations_batched)
        rows.append({
            "model": prepared["name"], "input": f"{batch}x{prepared['shape']}", "batch": batch,
            "litert_approach": prepared["approach"], "timed": timed, "min_cosine": prepared["cosines"],
            "notes": prepared["notes"], "build_s": prepared["seconds"],
        })
        print("  " + json.dumps({k: round(v["samples_per_s"], 2) for k, v in timed.items()}), flush=True)
    return rows


def digits_model() -> tuple[keras.Model, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(h)
    h = keras.layers.Flatten()(keras.layers.MaxPooling2D()(h))
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Dense(64, activation="relu")(h)))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=12, batch_size=32, verbose=0)
    return model, x_train, x_test, y_test


def bench_digits() -> dict[str, Any]:
    """Held-out top-1 of the digits CNN for FP32 and every int8 path (calibrated on 256 training images)."""
    print("digits accuracy ...", flush=True)
    model, x_train, x_test, y_test = digits_model()
    models, notes, _ = build(model, x_train[:256])
    top1: dict[str, float] = {}
    for column, m in models.items():
        if column in ("tf_fp32", *INT8_COLUMNS):
            predicted = np.concatenate([outputs(m, x_test[i : i + 50]) for i in range(0, len(x_test), 50)])
            top1[column] = float(np.mean(np.argmax(predicted, 1) == y_test))
    return {"top1": top1, "notes": notes, "test_samples": len(x_test)}


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "benchmarks", "packages/inc-tf", "packages/inc-core", ":(exclude)benchmarks/results"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" (with uncommitted changes under benchmarks/ or packages/)" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=48, help="timed calls per model at batch 1 (blocks of 8)")
    parser.add_argument("--iterations-batched", type=int, default=9, help="timed calls per model at batch > 1 (blocks of 3)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument(
        "--cache", type=Path, default=None,
        help="keep the peers' artifacts here (keyed by weights, calibration and versions) and reuse them in later runs",
    )
    parser.add_argument(
        "--no-timing", metavar="REASON", default="",
        help="build, check fidelity and digits accuracy, time nothing (the reason goes into the results)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where tf.json and tf.md go")
    parser.add_argument("--render-only", action="store_true", help="rewrite tf.md from the committed tf.json")
    args = parser.parse_args()
    if args.render_only:
        saved = json.loads((args.results / "tf.json").read_text())
        write(args.results, saved["rows"], saved["digits"], saved["meta"])
        return
    from importlib.metadata import version

    meta = {
        "cpu": cpu_name(), "flags": cpu_flags(), "threads": THREADS, "python": platform.python_version(),
        "commit": git_commit(), "tensorflow": tf.__version__, "keras": keras.__version__,
        "litert": version("ai-edge-litert"), "ai_edge_quantizer": version("ai-edge-quantizer"),
        "neural_compressor_tf": version("neural-compressor-tf"), "inc_tf": inc_tf.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "iterations": args.iterations,
        "iterations_batched": args.iterations_batched, "calib_samples": CALIB_SAMPLES, "columns": list(COLUMNS),
        "blocks": "blocks of {} timed calls at batch 1 after {} untimed ones, of {} after {} at batch 16".format(
            *BLOCK_AT_BATCH_1, *BLOCK_BATCHED),
        "load_average_at_start": os.getloadavg()[0], "peer_cache": bool(args.cache),
    }
    # Everything is built first and timed afterwards under one hold of the lock: the ratios of a table
    # then come from one stretch of time, and the lock is not held through minutes of conversion.
    prepared = [prepare(name, args.batches, args.cache) for name in args.models]
    digits = bench_digits()
    rows = []
    if args.no_timing:
        # Fidelity and accuracy only: what a run can still establish while the benchmarks' lock is taken.
        meta["timing"] = args.no_timing
        for item in prepared:
            rows += [{"model": item["name"], "input": f"{b}x{item['shape']}", "batch": b, "litert_approach": item["approach"],
                      "timed": {}, "min_cosine": item["cosines"], "notes": item["notes"], "build_s": item["seconds"]}
                     for b in args.batches]
    else:
        with timing_lock():
            meta["load_average_at_start"] = os.getloadavg()[0]
            meta["timing_started"] = time.strftime("%H:%M:%S UTC", time.gmtime())
            for item in prepared:
                rows += time_prepared(item, args.batches, args.iterations, args.iterations_batched)
    meta["load_average_at_end"] = os.getloadavg()[0]
    write(args.results, rows, digits, meta)
    print((args.results / "tf.md").read_text())


if __name__ == "__main__":
    main()
