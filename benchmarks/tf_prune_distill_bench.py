"""Evidence for training-loop compression on Keras 3: pruning in model.fit and the Distiller, on real data.

The Keras counterpart of ``prune_distill_bench.py`` (same digits split, same recipes): a CNN pruned to 70%
with ``inc_tf.PruningCallback`` (magnitude and snip-momentum), 2:4, then int8 LiteRT with the zeros
counted in the int8 weights; and a small student trained alone and with ``inc_tf.Distiller`` over seeds, and
a CNN student at a quarter of the teacher's widths on 150 samples, also taught the teacher's hidden layers
through learned projections (``layer_projection="linear"``).

    nox -s bench_tf_compress [-- --seeds 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import inc_core as inc  # noqa: E402
import inc_tf  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _compress_report import FEW, NARROW, NARROW_STUDENT, distill_markdown, distill_rows, narrow_study_configs  # noqa: E402
from _machine import cpu_flags, cpu_name, timing_lock  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BATCH = 50
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    data = load_digits()
    x, y = (data.images / 16.0).astype(np.float32)[..., None], data.target.astype(np.int64)
    x_fit, x_test, y_fit, y_test = train_test_split(x, y, test_size=400, random_state=0, stratify=y)
    return x_fit, y_fit, x_test, y_test


def cnn(seed: int = 0, widths: tuple[int, int, int] = (32, 64, 128)) -> keras.Model:
    keras.utils.set_random_seed(seed)  # the weights are created here, with the model
    c1, c2, hidden = widths
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(c1, 3, padding="same", name="conv1"), keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(c2, 3, padding="same", activation="relu", name="conv2"), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(), keras.layers.Dense(hidden, activation="relu", name="fc1"), keras.layers.Dense(10, name="fc2"),
    ])


def student_net(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(24, activation="relu"),
                             keras.layers.Dense(10)])


def fit(model: keras.Model, lr: float, data: tuple, epochs: int, *, seed: int, callbacks: list | None = None) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=LOSS)
    model.fit(data[0], data[1], batch_size=BATCH, epochs=epochs, callbacks=callbacks or [], verbose=0)
    return model


def accuracy(model: Any, data: tuple) -> float:
    logits = model.predict(data[2], verbose=0) if isinstance(model, keras.Model) else model(data[2])
    return float(np.mean(np.argmax(logits, axis=1) == data[3]))


def copy_of(model: keras.Model) -> keras.Model:
    keras.utils.set_random_seed(0)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def int8_zero_count(q: Any, sparse: keras.Model) -> tuple[int, int]:
    """(zeros in the sparse float kernels, zeros in the int8 constants of the .tflite)."""
    zeros = sum(int(np.sum(keras.ops.convert_to_numpy(w) == 0)) for layer in sparse.layers
                for w in ([layer.kernel] if hasattr(layer, "kernel") else []))
    interp = q.interpreter(threads=1)
    int8 = 0
    for detail in interp.get_tensor_details():
        if np.dtype(detail["dtype"]) == np.int8 and len(detail["shape"]) >= 2:
            try:
                int8 += int(np.sum(interp.get_tensor(detail["index"]) == 0))
            except ValueError:  # activations: not readable
                continue
    return zeros, int8


def pruning(rows: list[dict[str, Any]]) -> None:
    data = digits_split()
    steps = -(-len(data[0]) // BATCH)
    base = fit(cnn(), 3e-3, data, 10, seed=0)
    dense = fit(copy_of(base), 5e-4, data, 6, seed=1)
    dense_acc = accuracy(dense, data)
    rows.append({"study": "cnn", "variant": "dense (fine-tuned the same epochs)", "accuracy": dense_acc, "sparsity": 0.0})
    ramp = {"schedule": "iterative", "start_step": 0, "end_step": 3 * steps, "frequency": steps // 2}
    sparse = None
    variants = [
        ("70% unstructured, magnitude", inc.PruneConfig(target_sparsity=0.7, **ramp)),
        ("70% unstructured, snip_momentum", inc.PruneConfig(target_sparsity=0.7, criterion="snip_momentum", **ramp)),
        ("2:4 (conv1 dense: 9 inputs)", inc.PruneConfig(pattern="2:4", exclude=inc.LayerFilter(names=("conv1",)), **ramp)),
    ]
    for name, config in variants:
        start = time.perf_counter()
        model = fit(copy_of(base), 5e-4, data, 6, seed=1, callbacks=[inc_tf.PruningCallback(config)])
        stripped = inc_tf.strip(model)
        acc = accuracy(stripped, data)
        rows.append({"study": "cnn", "variant": name, "accuracy": acc, "vs_dense": (acc - dense_acc) / dense_acc,
                     "sparsity": inc_tf.sparsity_report(stripped).overall, "train_s": time.perf_counter() - start})
        if sparse is None:
            sparse = stripped
    assert sparse is not None
    q = inc.quantize(sparse, inc.QuantConfig(), dataset=inc.Dataset(data[0][:256], batch_size=32))
    zeros, int8_zeros = int8_zero_count(q, sparse)
    acc = accuracy(q, data)
    rows.append({"study": "cnn", "variant": "70% magnitude, then PTQ (int8 LiteRT)", "accuracy": acc,
                 "vs_dense": (acc - dense_acc) / dense_acc, "sparsity": inc_tf.sparsity_report(sparse).overall,
                 "zeros_fp32": zeros, "zeros_int8": int8_zeros})


def distillation(rows: list[dict[str, Any]], seeds: int) -> None:
    data = digits_split()
    # Batch norm needs the low-learning-rate epochs to settle: without them the teacher scores ~0.92.
    teacher = fit(fit(cnn(), 3e-3, data, 10, seed=0), 5e-4, data, 6, seed=1)
    rows.append({"study": "distill", "variant": "teacher (CNN)", "accuracy": accuracy(teacher, data)})
    results: dict[str, list[float]] = {"alone": [], "distilled": []}
    for seed in range(seeds):
        alone = fit(student_net(100 + seed), 3e-3, data, 15, seed=seed)
        results["alone"].append(accuracy(alone, data))
        student = student_net(100 + seed)
        distiller = inc_tf.Distiller(student, teacher, inc.DistillConfig(temperature=4.0, loss_weights=(0.5, 0.5)))
        distiller.compile(optimizer=keras.optimizers.Adam(3e-3))
        distiller.fit(data[0], data[1], batch_size=BATCH, epochs=15, verbose=0)
        results["distilled"].append(accuracy(student, data))
    rows.extend(distill_rows(results))
    few = (data[0][:FEW], data[1][:FEW], data[2], data[3])
    configs = narrow_study_configs()
    narrow: dict[str, list[float]] = {variant: [] for variant in configs}
    for seed in range(seeds):
        for variant, config in configs.items():
            if config is None:
                narrow[variant].append(accuracy(fit(cnn(100 + seed, NARROW), 3e-3, few, 40, seed=seed), few))
                continue
            student = cnn(100 + seed, NARROW)
            distiller = inc_tf.Distiller(student, teacher, config)
            distiller.compile(optimizer=keras.optimizers.Adam(3e-3))
            keras.utils.set_random_seed(seed)
            distiller.fit(few[0], few[1], batch_size=BATCH, epochs=40, verbose=0)
            narrow[variant].append(accuracy(student, few))
    rows.extend(distill_rows(narrow, student=NARROW_STUDENT))


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Training-loop compression on Keras 3: pruning callback and Distiller",
        "",
        f"{meta['date']}, commit {meta['commit']}, {meta['cpu']} ({', '.join(meta['cpu_flags'])}), TensorFlow {meta['tf']}, "
        f"Keras {meta['keras']}. Command: `{meta['command']}`. Same digits split and recipes as `prune_distill.md` (PyTorch).",
        "",
        "## Pruning a CNN on digits in model.fit (400-sample stratified test split)",
        "",
        "| variant | test accuracy | vs dense | sparsity | zeros: float kernels / int8 constants |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in (r for r in rows if r["study"] == "cnn"):
        vs = f"{r['vs_dense']:+.2%}" if "vs_dense" in r else ""
        zeros = f"{r['zeros_fp32']:,} / {r['zeros_int8']:,}" if "zeros_fp32" in r else ""
        lines.append(f"| {r['variant']} | {r['accuracy']:.4f} | {vs} | {r['sparsity']:.2%} | {zeros} |")
    lines += ["", "The int8 count can exceed the float count: weights that round to 0 in int8 are zeros too.", "",
              "## Distillation on digits (inc_tf.Distiller)", "", *distill_markdown(rows)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "tf_prune_distill"))
    args = parser.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(2)
    rows: list[dict[str, Any]] = []
    for name, run in (("cnn", lambda: pruning(rows)), ("distill", lambda: distillation(rows, args.seeds))):
        start = time.perf_counter()
        run()
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    meta = {"date": datetime.date.today().isoformat(), "commit": commit or "unknown", "cpu": cpu_name(),
            "cpu_flags": cpu_flags(), "tf": tf.__version__, "keras": keras.__version__,
            "command": f"nox -s bench_tf_compress -- --seeds {args.seeds}"}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    text = markdown(meta, rows)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    with timing_lock():  # one benchmark times at a time (an outer flock on the same file counts)
        main()
