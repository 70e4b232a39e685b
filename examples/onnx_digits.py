"""Accuracy-driven INT8 for an ONNX model, end to end.

Trains an MLP on scikit-learn's digits, writes it as an ONNX graph, lets ``inc.autotune`` find an
INT8 config that stays within 1% (relative) of FP32 accuracy, and prints one row: INT8 accuracy,
FP32 accuracy, their ratio, INT8 and FP32 throughput, their ratio. The tuning report, the trial
history and both models are written to the output directory.

    python examples/onnx_digits.py [--out build/onnx_demo] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

import inc_core as inc
import inc_onnx


def train(x_train: np.ndarray, y_train: np.ndarray) -> MLPClassifier:
    clf = MLPClassifier(hidden_layer_sizes=(512, 256), alpha=1e-3, max_iter=300, random_state=0)
    return clf.fit(x_train, y_train)


def to_onnx(clf: MLPClassifier) -> onnx.ModelProto:
    """The trained MLP as an ONNX graph: MatMul + Add per layer, Relu between layers."""
    nodes, inits, current = [], [], "pixels"
    last = len(clf.coefs_) - 1
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_)):
        inits += [numpy_helper.from_array(w.astype(np.float32), f"fc{i}.weight"),
                  numpy_helper.from_array(b.astype(np.float32), f"fc{i}.bias")]
        out = "logits" if i == last else f"fc{i}.out"
        nodes += [helper.make_node("MatMul", [current, f"fc{i}.weight"], [f"fc{i}.mm"], name=f"fc{i}"),
                  helper.make_node("Add", [f"fc{i}.mm", f"fc{i}.bias"], [out], name=f"fc{i}.add")]
        if i != last:
            nodes.append(helper.make_node("Relu", [out], [f"relu{i}"], name=f"relu{i}"))
            current = f"relu{i}"
    graph = helper.make_graph(
        nodes, "digits_mlp",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="inc-demo")
    onnx.checker.check_model(model)
    return model


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    session = inc_onnx.create_session(model)
    logits = session.run(None, {"pixels": x})[0]
    return float(np.mean(np.argmax(logits, axis=1) == y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/onnx_demo", help="directory for the models and the tuning report")
    parser.add_argument("--batch-size", type=int, default=256, help="samples per call when measuring throughput")
    parser.add_argument("--iterations", type=int, default=200, help="timed calls per throughput measurement")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # A fresh model each run: an old history would resume trials of the previous model.
    (out / "tuning.json").unlink(missing_ok=True)

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.3, random_state=0, stratify=digits.target)
    x_fit, x_val, y_fit, y_val = train_test_split(x_train, y_train, test_size=0.25, random_state=0, stratify=y_train)
    print(f"training a 64-512-256-10 MLP on {len(x_fit)} digits ...")
    fp32_path = out / "digits_mlp.onnx"
    inc.save(to_onnx(train(x_fit, y_fit)), fp32_path)

    # Tuning scores candidates on a validation split; the test split is only used for the final row.
    tuning = inc.TuningConfig(
        base=inc.QuantConfig(calibration="minmax", calib_samples=256),
        tolerable_loss=0.01,
        max_trials=30,
        history=str(out / "tuning.json"),
    )
    result = inc.autotune(
        str(fp32_path),
        tuning,
        eval_fn=lambda model: accuracy(model, x_val, y_val),
        dataset=inc.Dataset(x_fit[:256], batch_size=32),
    )
    int8_path = out / "digits_mlp.int8.onnx"
    inc.save(result.model, int8_path)
    report = result.report(out / "tuning_report.md")
    fp32_model = onnx.load_model(str(fp32_path))
    fp32_acc, int8_acc = accuracy(fp32_model, x_test, y_test), accuracy(result.model, x_test, y_test)

    batch = np.resize(x_test, (args.batch_size, 64)).astype(np.float32)
    fp32_speed = inc.benchmark(fp32_model, batch, warmup=20, iterations=args.iterations).throughput
    int8_speed = inc.benchmark(result.model, batch, warmup=20, iterations=args.iterations).throughput

    print(f"tuning: {len(result.trials)} trial(s), goal {'met' if result.met else 'NOT met'}; chosen: {result.trial.change}")
    header = ("model", "INT8 acc", "FP32 acc", "acc ratio", "INT8 samples/s", "FP32 samples/s", "speedup")
    row = ("digits MLP (ONNX)", f"{int8_acc:.4f}", f"{fp32_acc:.4f}", f"{int8_acc / fp32_acc:.4f}",
           f"{int8_speed:,.0f}", f"{fp32_speed:,.0f}", f"{int8_speed / fp32_speed:.2f}x")
    widths = [max(len(h), len(c)) for h, c in zip(header, row)]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-|-".join("-" * w for w in widths))
    print(" | ".join(c.ljust(w) for c, w in zip(row, widths)))
    print(f"batch size {args.batch_size}; models in {out}/, tuning report {report}")


if __name__ == "__main__":
    main()
