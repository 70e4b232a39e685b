"""Knowledge distillation in your own PyTorch loop: a small MLP student learns from a CNN teacher.

Trains a CNN teacher on scikit-learn's digits, then the same small student twice from the same seed: once
on the labels alone and once with ``inc_torch.DistillationLoss`` (KL on temperature-softened teacher
outputs plus cross-entropy), and prints both students' test accuracy.

    python examples/torch_distill_digits.py [--temperature 4] [--epochs 10]
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


def teacher_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def student_net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def fit(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, loss_fn) -> nn.Module:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt)).split(50):
            optimizer.zero_grad()
            loss_fn(model(xt[idx]), xt[idx], yt[idx]).backward()
            optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    digits = load_digits()
    x, y = (digits.images / 16.0).astype(np.float32)[:, None], digits.target.astype(np.int64)
    x_fit, x_test, y_fit, y_test = train_test_split(x, y, test_size=400, random_state=0, stratify=y)

    def labels_only(logits, inputs, labels):
        return nn.functional.cross_entropy(logits, labels)

    torch.manual_seed(0)
    teacher = fit(teacher_net(), x_fit, y_fit, 8, labels_only)
    print(f"teacher (CNN) test accuracy: {accuracy(teacher, x_test, y_test):.4f}")

    torch.manual_seed(1)
    alone = fit(student_net(), x_fit, y_fit, args.epochs, labels_only)
    torch.manual_seed(1)
    kd = inc_torch.DistillationLoss(teacher, inc.DistillConfig(temperature=args.temperature, loss_weights=(0.3, 0.7)))
    distilled = fit(student_net(), x_fit, y_fit, args.epochs, kd)  # loss = kd(student_logits, inputs, labels)
    print(f"student alone: {accuracy(alone, x_test, y_test):.4f}; "
          f"student distilled: {accuracy(distilled, x_test, y_test):.4f}")


if __name__ == "__main__":
    main()
