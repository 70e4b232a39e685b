"""Accuracy-driven post-training INT8 for a PyTorch CNN, end to end.

Trains a small CNN on scikit-learn's digits, lets ``inc.autotune`` find an INT8 config on the PT2E path
(torch.export + torchao's X86InductorQuantizer, compiled by inductor) that stays within 1% (relative) of
FP32 accuracy on a validation split, prints FP32 vs INT8 test accuracy and their throughput ratio, and
saves the INT8 model as a torch.export program.

    python examples/torch_ptq_digits.py [--out build/torch_ptq] [--epochs 8]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import inc_core as inc
import inc_torch


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> nn.Module:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt)).split(32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/torch_ptq", help="directory for the INT8 model and the tuning report")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs of the FP32 model")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuning.json").unlink(missing_ok=True)  # a fresh model each run: an old history would resume its trials
    torch.manual_seed(0)

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8) in [0, 1]
    y = digits.target.astype(np.int64)
    # Validation and test splits of equal size: the INT8 model is compiled once per input shape.
    x_fit, x_rest, y_fit, y_rest = train_test_split(x, y, test_size=720, random_state=0, stratify=y)
    x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, test_size=360, random_state=0, stratify=y_rest)
    print(f"training a CNN on {len(x_fit)} digits for {args.epochs} epochs ...")
    model = train(DigitsCNN(), x_fit, y_fit, args.epochs)

    result = inc.autotune(
        model,  # left unchanged: autotune returns a new model
        inc.TuningConfig(base=inc.QuantConfig(calib_samples=256), tolerable_loss=0.01, max_trials=10,
                         history=str(out / "tuning.json")),
        eval_fn=lambda m: accuracy(m, x_val, y_val),  # tuning sees the validation split only
        dataset=inc.Dataset(x_fit[:256], batch_size=32),
    )
    int8 = result.model  # an inc_torch.CompiledQuantizedModule: inductor compiles it on the first call
    print(f"tuning: {len(result.trials)} trial(s), goal {'met' if result.met else 'NOT met'}; "
          f"validation FP32 {result.baseline:.4f}, INT8 {result.score:.4f}; chosen: {result.trial.change}")
    print(f"INT8 ops: {', '.join(inc_torch.quantized_ops(int8))}")

    fp32_acc, int8_acc = accuracy(model, x_test, y_test), accuracy(int8, x_test, y_test)
    fp32_speed = inc.benchmark(model, x_test, warmup=5, iterations=50).throughput
    int8_speed = inc.benchmark(int8, x_test, warmup=5, iterations=50).throughput
    print(f"test accuracy: FP32 {fp32_acc:.4f}, INT8 {int8_acc:.4f} (relative loss {(fp32_acc - int8_acc) / fp32_acc:+.2%})")
    print(f"throughput (batch {len(x_test)}): FP32 eager {fp32_speed:,.0f}, INT8 {int8_speed:,.0f} samples/s "
          f"-> INT8/FP32 {int8_speed / fp32_speed:.2f}x")

    path = inc.save(int8, out / "digits_cnn.int8.pt2")  # a torch.export ExportedProgram; inc.load(path) reads it
    report = result.report(out / "tuning_report.md")
    print(f"saved {path}; tuning report {report}")


if __name__ == "__main__":
    main()
