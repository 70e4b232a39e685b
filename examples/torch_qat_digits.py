"""Quantization-aware training of a PyTorch CNN in your own training loop.

Trains a small CNN on scikit-learn's digits in FP32, then ``inc_torch.prepare_qat`` inserts fake
quantization, the same training function fine-tunes it (your optimizer, loss and loop, unchanged), and
``inc_torch.convert`` turns it into an INT8 model (PT2E: compiled by inductor into oneDNN INT8 kernels).
Prints FP32 vs QAT-INT8 test accuracy.

    python examples/torch_qat_digits.py [--epochs 6] [--qat-epochs 3] [--format pt2e|fx]
"""

from __future__ import annotations

import argparse

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


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float) -> nn.Module:
    """A plain training loop; it serves the FP32 model and the QAT model alike."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt)).split(32):
            optimizer.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="FP32 training epochs")
    parser.add_argument("--qat-epochs", type=int, default=3, help="quantization-aware fine-tuning epochs")
    parser.add_argument("--format", choices=("pt2e", "fx"), default="pt2e", help="QAT graph format")
    args = parser.parse_args()
    torch.manual_seed(0)

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8) in [0, 1]
    y = digits.target.astype(np.int64)
    x_fit, x_test, y_fit, y_test = train_test_split(x, y, test_size=360, random_state=0, stratify=y)
    print(f"training a CNN on {len(x_fit)} digits for {args.epochs} epochs ...")
    model = train(DigitsCNN(), x_fit, y_fit, args.epochs, lr=5e-3)
    fp32_acc = accuracy(model, x_test, y_test)

    # Steps are training forward passes (45 per epoch here): batch-norm statistics freeze after ~1.5 epochs,
    # activation and weight ranges after 2, so the last epoch fine-tunes against fixed quantization.
    config = inc.QATConfig(format=args.format, freeze_bn_step=70, freeze_observer_step=90)
    qat_model = inc_torch.prepare_qat(model, config, torch.from_numpy(x_fit[:32]))  # `model` stays FP32
    print(f"quantization-aware fine-tuning ({args.format}) for {args.qat_epochs} epochs ...")
    train(qat_model, x_fit, y_fit, args.qat_epochs, lr=5e-4)  # the same loop, optimizer and loss
    int8 = inc_torch.convert(qat_model)
    int8_acc = accuracy(int8, x_test, y_test)

    print(f"INT8 ops: {', '.join(inc_torch.quantized_ops(int8))}")
    print(f"test accuracy: FP32 {fp32_acc:.4f}, QAT INT8 {int8_acc:.4f} "
          f"(relative loss {(fp32_acc - int8_acc) / fp32_acc:+.2%})")


if __name__ == "__main__":
    main()
