"""Prune a PyTorch model to 70% sparsity in your own training loop, then quantize it to INT8 keeping the zeros.

Trains an MLP on scikit-learn's digits, fine-tunes it with ``inc_torch.prepare`` attached to the optimizer
(iterative magnitude pruning on a cubic ramp: the loop itself does not change), removes the hooks with
``inc_torch.convert``, writes the per-layer sparsity report, and quantizes the sparse model with
``inc.quantize`` (FX): the INT8 weights keep every pruned zero.

    python examples/torch_prune_digits.py [--out build/torch_prune] [--sparsity 0.7]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import inc_core as inc
import inc_torch


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, x: np.ndarray, y: np.ndarray, epochs: int) -> nn.Module:
    """An ordinary training loop: pruning happens in the optimizer's step hooks."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt)).split(50):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/torch_prune", help="directory for the sparsity report")
    parser.add_argument("--sparsity", type=float, default=0.7, help="target sparsity of every Linear layer")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    digits = load_digits()
    x, y = (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)
    x_fit, x_test, y_fit, y_test = train_test_split(x, y, test_size=400, random_state=0, stratify=y)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    fit(model, torch.optim.Adam(model.parameters(), lr=2e-3), x_fit, y_fit, 12)
    dense = copy.deepcopy(model)

    steps_per_epoch = -(-len(x_fit) // 50)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    config = inc.PruneConfig(
        target_sparsity=args.sparsity, pattern="unstructured", criterion="magnitude",
        schedule="iterative", ramp="cubic", start_step=0, end_step=3 * steps_per_epoch, frequency=steps_per_epoch // 2,
    )
    inc_torch.prepare(model, config, optimizer=optimizer)  # hooks on optimizer.step(); nothing else changes
    fit(model, optimizer, x_fit, y_fit, 5)
    sparse = inc_torch.convert(model)  # hooks removed, zeros in place: a plain nn.Sequential
    report = inc_torch.sparsity_report(sparse)
    print(report)
    report.save(out / "sparsity.md")

    int8 = inc.quantize(sparse, inc.QuantConfig(format="fx"), dataset=inc.Dataset(x_fit[:256], batch_size=64))
    int8_zeros = sum(int((m.weight().int_repr() == 0).sum()) for m in int8.modules() if isinstance(m, torch.ao.nn.quantized.Linear))
    print(f"test accuracy: dense {accuracy(dense, x_test, y_test):.4f}, {report.overall:.0%} sparse "
          f"{accuracy(sparse, x_test, y_test):.4f}, sparse INT8 {accuracy(int8, x_test, y_test):.4f}")
    print(f"zeros: {sum(layer.zeros for layer in report.layers):,} in the sparse FP32 weights, {int8_zeros:,} in the INT8 weights")
    print(f"report: {out / 'sparsity.md'}")


if __name__ == "__main__":
    main()
