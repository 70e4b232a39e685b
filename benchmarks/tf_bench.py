"""TensorFlow / Keras 3 INT8 benchmark: TF FP32 vs inc's LiteRT int8 vs the peers a TF user would pick.

Convnets at 224x224, batch 1 (``keras.applications`` ResNet50 and MobileNetV2 with ``weights=None``, and a
ResNet-18-shaped Keras net): TF FP32 (a ``tf.function`` of the Keras model), LiteRT FP32, inc's LiteRT int8
(``inc.quantize``, ranges from inc's observers), the TF converter's default full-integer output (the same
calibration samples as its representative dataset) and Keras 3's ``model.quantize("int8")`` run by TF.
Every model of a row is timed side by side with the others in alternating blocks of calls, so load from
other processes falls on each alike; throughput = batch / median latency. Accuracy: a digits CNN trained
here on scikit-learn's digits (top-1 of FP32, inc int8 and the converter's int8 on the held-out split); for
the random-weight convnets (batch-norm statistics taken from one batch, as after training), the smallest
per-sample cosine of int8 vs FP32 logits.

    python benchmarks/tf_bench.py [--iterations 60] [--models resnet18 resnet50 mobilenetv2]

Results go to benchmarks/results/tf.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import inc_core as inc  # noqa: E402
import inc_tf  # noqa: E402
from inc_tf._convert import float_flatbuffer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_flags, cpu_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("resnet18", "resnet50", "mobilenetv2")
COLUMNS = ("tf_fp32", "litert_fp32", "inc", "converter", "keras_int8")
CALIB_SAMPLES = 16
THREADS = len(os.sched_getaffinity(0))


def resnet18(shape: tuple[int, int, int] = (224, 224, 3), classes: int = 1000) -> keras.Model:
    """ResNet-18 (basic blocks 2-2-2-2) in Keras, random weights."""
    def conv_bn(x: Any, filters: int, k: int, stride: int, relu: bool) -> Any:
        x = keras.layers.Conv2D(filters, k, strides=stride, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        return keras.layers.ReLU()(x) if relu else x

    inputs = keras.Input(shape)
    x = conv_bn(inputs, 64, 7, 2, True)
    x = keras.layers.MaxPooling2D(3, 2, padding="same")(x)
    for stage, filters in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            shortcut = conv_bn(x, filters, 1, stride, False) if stride != 1 or x.shape[-1] != filters else x
            y = conv_bn(x, filters, 3, stride, True)
            y = conv_bn(y, filters, 3, 1, False)
            x = keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(classes)(x), name="resnet18")


def make_model(name: str) -> keras.Model:
    keras.utils.set_random_seed(0)
    if name == "resnet18":
        model = resnet18()
    elif name == "resnet50":
        model = keras.applications.ResNet50(weights=None, classifier_activation=None)
    elif name == "mobilenetv2":
        model = keras.applications.MobileNetV2(weights=None, classifier_activation=None)
    else:
        raise SystemExit(f"unknown model {name!r}; choose from {MODELS}")
    return settle_batchnorm(model)


def settle_batchnorm(model: keras.Model) -> keras.Model:
    """Batch-norm statistics from one batch of inputs, as after training.

    With random weights and the initial statistics (mean 0, variance 1), activations shrink layer after
    layer (MobileNetV2's logits come out near 1e-11), which makes int8 timing and fidelity meaningless.
    """
    layers = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    model(np.random.default_rng(1).normal(size=(8, 224, 224, 3)).astype(np.float32), training=True)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    return model


def converter_int8(model: keras.Model, samples: np.ndarray) -> bytes:
    """The TF converter's default full-integer quantization (int8 inside, float input/output)."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([samples[i : i + 1]] for i in range(len(samples)))
    return bytes(converter.convert())


def keras_int8(model: keras.Model) -> keras.Model | str:
    """Keras 3's own int8 (on a clone): returns the reason when Keras refuses the model."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    try:
        clone.quantize("int8")
    except Exception as exc:  # noqa: BLE001 - the reason is what the table reports
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return clone


def runner(model: Any, x: np.ndarray) -> Any:
    if isinstance(model, keras.Model):
        fn = tf.function(lambda t: model(t, training=False))
        tensor = tf.constant(x)
        return lambda: fn(tensor)
    run = model.signature_runner(threads=THREADS)
    feeds = model.feeds(x)
    return lambda: run(**feeds)


def outputs(model: Any, x: np.ndarray) -> np.ndarray:
    if isinstance(model, keras.Model):
        return np.asarray(model(x, training=False))
    return np.concatenate([model(x[i : i + 1]) for i in range(len(x))])


def side_by_side(models: dict[str, Any], x: np.ndarray, iterations: int) -> dict[str, dict[str, float]]:
    """Blocks of consecutive calls per model, in reversed order every other round; batch / median latency."""
    runners = {name: runner(m, x) for name, m in models.items()}
    for run in runners.values():
        for _ in range(3):
            run()
    # Short blocks, many rounds: load from other processes comes and goes in bursts longer than a block.
    block = 2
    latencies: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for round_ in range(-(-iterations // block)):
        for name in order if round_ % 2 == 0 else reversed(order):
            # TF's and LiteRT's worker threads spin for a while after a call and would steal the cores
            # from the next model: let them go idle, then one untimed call settles this model's pool.
            time.sleep(0.2)
            runners[name]()
            for _ in range(block):
                start = time.perf_counter()
                runners[name]()
                latencies[name].append(time.perf_counter() - start)
    return {
        name: {"samples_per_s": len(x) / float(np.median(v)), "p50_ms": float(np.median(v)) * 1e3}
        for name, v in latencies.items()
    }


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.min(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def bench_convnet(name: str, iterations: int) -> dict[str, Any]:
    model = make_model(name)
    rng = np.random.default_rng(0)
    calib = rng.normal(size=(CALIB_SAMPLES, 224, 224, 3)).astype(np.float32)
    check = rng.normal(size=(4, 224, 224, 3)).astype(np.float32)
    start = time.perf_counter()
    ours = inc.quantize(model, inc.QuantConfig(calib_samples=CALIB_SAMPLES), dataset=inc.Dataset(calib, batch_size=4))
    inc_seconds = time.perf_counter() - start
    models: dict[str, Any] = {
        "tf_fp32": model,
        "litert_fp32": inc_tf.LiteRTModel(content=float_flatbuffer(model)),
        "inc": ours,
        "converter": inc_tf.LiteRTModel(content=converter_int8(model, calib)),
    }
    keras_q = keras_int8(model)
    notes = {}
    if isinstance(keras_q, str):
        notes["keras_int8"] = keras_q
    else:
        models["keras_int8"] = keras_q
    reference = outputs(model, check)
    cosines = {k: min_cosine(reference, outputs(m, check)) for k, m in models.items() if k != "tf_fp32"}
    timed = side_by_side(models, check[:1], iterations)
    return {"model": name, "input": "1x224x224x3", "timed": timed, "min_cosine": cosines, "notes": notes,
            "inc_quantize_s": inc_seconds}


def bench_digits() -> dict[str, Any]:
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
    ours = inc.quantize(model, inc.QuantConfig(calib_samples=256), dataset=inc.Dataset(x_train[:256], batch_size=32))
    theirs = inc_tf.LiteRTModel(content=converter_int8(model, x_train[:256]))

    def top1(m: Any) -> float:
        return float(np.mean(np.argmax(outputs(m, x_test), 1) == y_test))

    return {"fp32": top1(model), "inc": top1(ours), "converter": top1(theirs)}


def write(rows: list[dict[str, Any]], digits: dict[str, float], meta: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tf.json").write_text(json.dumps({"meta": meta, "rows": rows, "digits_top1": digits}, indent=2) + "\n")
    lines = [
        "# TensorFlow / Keras 3 INT8 benchmark (LiteRT)",
        "",
        f"CPU: {meta['cpu']} ({meta['threads']} threads; {', '.join(meta['flags'])}); tensorflow {meta['tensorflow']}, "
        f"keras {meta['keras']}, ai-edge-litert {meta['litert']}, inc-tf {meta['inc_tf']}.",
        "TF FP32: tf.function of the Keras model. LiteRT FP32: the converter's float .tflite (XNNPACK). INT8 inc: "
        "inc.quantize with the default QuantConfig (LiteRT int8, ranges from inc's minmax observers). INT8 converter: "
        "TFLiteConverter with Optimize.DEFAULT and the same representative samples. Keras int8: model.quantize('int8') "
        f"run by TF. Calibration: {CALIB_SAMPLES} random-normal images (random-weight models). Batch 1; models of a "
        "row timed side by side in alternating blocks; throughput = 1 / median latency.",
        "",
        "| model | TF FP32 /s | LiteRT FP32 /s | INT8 inc /s | INT8 converter /s | Keras int8 /s | inc / TF FP32 | inc / converter | min logit cosine (inc / converter / keras) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        t = row["timed"]
        speed = {k: t[k]["samples_per_s"] if k in t else None for k in COLUMNS}
        cos = row["min_cosine"]

        def f(v: float | None, spec: str = ".1f") -> str:
            return "n/a" if v is None else format(v, spec)

        lines.append(
            f"| {row['model']} ({row['input']}) | {f(speed['tf_fp32'])} | {f(speed['litert_fp32'])} | {f(speed['inc'])} | "
            f"{f(speed['converter'])} | {f(speed['keras_int8'])} | {speed['inc'] / speed['tf_fp32']:.2f}x | "
            f"{speed['inc'] / speed['converter']:.2f} | {f(cos.get('inc'), '.4f')} / {f(cos.get('converter'), '.4f')} / "
            f"{f(cos.get('keras_int8'), '.4f')} |"
        )
    for row in rows:
        for column, note in row["notes"].items():
            lines.append(f"\n{row['model']}: {column} not measured ({note}).")
    lines += [
        "",
        "Keras int8: Keras 3's `model.quantize('int8')` quantizes Dense/EinsumDense/Embedding layers only (it warns that "
        "Conv2D has no `quantize`), so on these convnets only the classifier runs int8 and the rest stays TF FP32.",
        "LiteRT is inc-tf's only int8 target today (no TF SavedModel int8 yet), hence its default.",
        "",
        f"Digits CNN trained here (held-out top-1): FP32 {digits['fp32']:.4f}, inc int8 {digits['inc']:.4f}, "
        f"converter int8 {digits['converter']:.4f}.",
        "",
        f"Measured {meta['date']}." + (f" {meta['note']}" if meta.get("note") else ""),
    ]
    (RESULTS / "tf.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--render-only", action="store_true", help="rewrite tf.md from the committed tf.json")
    args = parser.parse_args()
    if args.render_only:
        saved = json.loads((RESULTS / "tf.json").read_text())
        write(saved["rows"], saved["digits_top1"], saved["meta"])
        return
    from importlib.metadata import version

    meta = {
        "cpu": cpu_name(), "flags": cpu_flags(), "threads": THREADS, "python": platform.python_version(),
        "tensorflow": tf.__version__, "keras": keras.__version__, "litert": version("ai-edge-litert"),
        "inc_tf": inc_tf.__version__, "date": time.strftime("%Y-%m-%d"), "iterations": args.iterations,
        "load_average_at_start": os.getloadavg()[0],
    }
    rows = []
    for name in args.models:
        print(f"benchmarking {name} ...", flush=True)
        rows.append(bench_convnet(name, args.iterations))
        print(json.dumps(rows[-1]["timed"]), rows[-1]["min_cosine"], flush=True)
    digits = bench_digits()
    meta["load_average_at_end"] = os.getloadavg()[0]
    if max(meta["load_average_at_start"], meta["load_average_at_end"]) > 1.5 * THREADS:
        meta["note"] = (
            f"The machine was shared (1-minute load average {meta['load_average_at_start']:.1f} at the start, "
            f"{meta['load_average_at_end']:.1f} at the end, on {THREADS} cores): absolute figures are low and noisy."
        )
    write(rows, digits, meta)
    print((RESULTS / "tf.md").read_text())


if __name__ == "__main__":
    main()
