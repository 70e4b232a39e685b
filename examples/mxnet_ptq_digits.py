"""Accuracy-driven post-training INT8 for an MXNet Gluon CNN, end to end.

Trains a small Gluon HybridBlock on scikit-learn's digits with ``gluon.Trainer``, lets ``inc.autotune``
find an INT8 config (MXNet's quantization pass on the oneDNN-fused graph, activation ranges from inc's
observers) that stays within 1% (relative) of FP32 accuracy on a validation split, prints FP32 vs INT8
test accuracy and throughput, and saves the INT8 model as MXNet's own export, which plain
``gluon.SymbolBlock.imports`` reads back.

    python examples/mxnet_ptq_digits.py [--out build/mxnet_ptq] [--epochs 12]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from mxnet.gluon import nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import inc_core as inc


def digits_cnn() -> nn.HybridSequential:
    """conv+bn+relu, conv+relu, pool, fc+relu, fc: oneDNN fuses each conv/fc with what follows it."""
    net = nn.HybridSequential(prefix="digits_")
    with net.name_scope():
        net.add(
            nn.Conv2D(16, 3, padding=1, use_bias=False), nn.BatchNorm(), nn.Activation("relu"),
            nn.Conv2D(32, 3, padding=1, activation="relu"), nn.MaxPool2D(2), nn.Flatten(),
            nn.Dense(64, activation="relu"), nn.Dense(10),
        )
    return net


def train(net: gluon.HybridBlock, x: np.ndarray, y: np.ndarray, epochs: int) -> gluon.HybridBlock:
    net.initialize(mx.init.Xavier())
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 3e-3})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    loader = gluon.data.DataLoader(gluon.data.ArrayDataset(x, y.astype(np.float32)), batch_size=32, shuffle=True)
    for _ in range(epochs):
        for xb, yb in loader:
            with autograd.record():
                loss = loss_fn(net(xb), yb)
            loss.backward()
            trainer.step(xb.shape[0])
    return net


def accuracy(model: gluon.Block, x: np.ndarray, y: np.ndarray) -> float:
    return float((model(mx.nd.array(x)).asnumpy().argmax(1) == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/mxnet_ptq", help="directory for the INT8 model and the tuning report")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs of the FP32 model")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuning.json").unlink(missing_ok=True)  # a fresh model each run: an old history would resume its trials
    mx.random.seed(0)

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8) in [0, 1]
    y = digits.target.astype(np.int64)
    x_fit, x_rest, y_fit, y_rest = train_test_split(x, y, test_size=720, random_state=0, stratify=y)
    x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, test_size=360, random_state=0, stratify=y_rest)
    print(f"training a Gluon CNN on {len(x_fit)} digits for {args.epochs} epochs ...")
    model = train(digits_cnn(), x_fit, y_fit, args.epochs)
    print("quantizable layers:", ", ".join(f"{op.name} ({op.op_type})" for op in inc.describe(model).ops))

    result = inc.autotune(
        model,  # left unchanged (not even hybridized): autotune returns a new gluon.SymbolBlock
        inc.TuningConfig(base=inc.QuantConfig(calib_samples=256), tolerable_loss=0.01, max_trials=10,
                         history=str(out / "tuning.json")),
        eval_fn=lambda m: accuracy(m, x_val, y_val),  # tuning sees the validation split only
        dataset=inc.Dataset(x_fit[:256], batch_size=32),
    )
    int8 = result.model
    print(f"tuning: {len(result.trials)} trial(s), goal {'met' if result.met else 'NOT met'}; "
          f"validation FP32 {result.baseline:.4f}, INT8 {result.score:.4f}")

    fp32_acc, int8_acc = accuracy(model, x_test, y_test), accuracy(int8, x_test, y_test)
    # inc.benchmark times both as static graphs (FP32 with oneDNN's FP32 fusion).
    fp32_speed = inc.benchmark(model, x_test, warmup=5, iterations=50).throughput
    int8_speed = inc.benchmark(int8, x_test, warmup=5, iterations=50).throughput
    print(f"test accuracy: FP32 {fp32_acc:.4f}, INT8 {int8_acc:.4f} (relative loss {(fp32_acc - int8_acc) / fp32_acc:+.2%})")
    print(f"throughput (batch {len(x_test)}): FP32 {fp32_speed:,.0f}, INT8 {int8_speed:,.0f} samples/s "
          f"-> INT8/FP32 {int8_speed / fp32_speed:.2f}x")

    path = inc.save(int8, out / "digits_cnn.int8.mxnet")  # digits_cnn.int8-symbol.json + digits_cnn.int8-0000.params
    imported = gluon.SymbolBlock.imports(
        str(path / "digits_cnn.int8-symbol.json"), ["data"], str(path / "digits_cnn.int8-0000.params")
    )
    print(f"saved {path}; read back by gluon.SymbolBlock.imports: test accuracy {accuracy(imported, x_test, y_test):.4f}")
    report = result.report(out / "tuning_report.md")
    print(f"tuning report {report}")


if __name__ == "__main__":
    main()
