"""QAT recovers accuracy that post-training INT8 quantization loses: a model with rescaled hidden units.

Networks trained without weight decay can carry hidden units whose incoming weights are many times larger
than the rest, balanced by small outgoing weights: ReLU is positively homogeneous, so scaling a unit's
first-layer row (and bias) by ``c`` and its second-layer column by ``1 / c`` leaves the FP32 function
unchanged. Per-tensor INT8 cannot hold both scales: the first layer's weight range is set by the scaled rows
(the other rows round to zero), and the scaled units' outgoing weights are far below the second layer's
quantization step. Post-training quantization keeps that split; QAT trains through it.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn
from torch_helpers import relative_loss, split

import inc_core as inc
import inc_torch

HIDDEN = 64
RESCALED_UNITS = 32
# 200x: below ~100x per-tensor INT8 still resolves both groups and PTQ loses little on digits.
RESCALE = 200.0
QAT_EPOCHS = 60  # about 1700 steps: Adam moves each weight by about its learning rate per step


class DigitsTwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: on batches of 50 through a 64-wide MLP, fanning out costs more than the matmuls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _features() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flattened digits standardised with the training split's statistics.

    The deviation is floored at 0.1 (pixels are in [0, 1]): border pixels that are almost always blank in
    training would otherwise turn a stray test stroke into a huge input.
    """
    x, y, x_test, y_test = split()
    x, x_test = x.reshape(len(x), -1), x_test.reshape(len(x_test), -1)
    mean, deviation = x.mean(0), np.maximum(x.std(0), 0.1)
    return ((x - mean) / deviation).astype(np.float32), y, ((x_test - mean) / deviation).astype(np.float32), y_test


def _accuracy(model: nn.Module) -> float:
    _, _, x, y = _features()
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    return float((logits.argmax(1).numpy() == y).mean())


def _user_loop(model: nn.Module, optimizer: torch.optim.Optimizer, *, epochs: int, seed: int) -> None:
    """The user's loop: mini-batches of 50, cross-entropy, a cosine-decayed learning rate."""
    x, y, _, _ = _features()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * -(-len(xt) // 50))
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), 50):
            idx = order[start : start + 50]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            optimizer.step()
            schedule.step()


@functools.cache
def _trained() -> DigitsTwoLayer:
    torch.manual_seed(0)
    model = DigitsTwoLayer()
    _user_loop(model, torch.optim.Adam(model.parameters(), lr=3e-3), epochs=40, seed=0)
    return model.eval()


def _rescaled(model: DigitsTwoLayer) -> DigitsTwoLayer:
    rescaled = copy.deepcopy(model)
    with torch.no_grad():
        rescaled.fc1.weight[:RESCALED_UNITS] *= RESCALE
        rescaled.fc1.bias[:RESCALED_UNITS] *= RESCALE
        rescaled.fc2.weight[:, :RESCALED_UNITS] /= RESCALE
    return rescaled.eval()


def _optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    return torch.optim.SGD(model.parameters(), lr=3e-3, momentum=0.9, weight_decay=1e-4)


@pytest.mark.parametrize("optimizer_name", ["adam", "sgd"])
@pytest.mark.parametrize("fmt", ["fx", "pt2e"])
def test_qat_recovers_what_per_tensor_ptq_loses(fmt: str, optimizer_name: str) -> None:
    model = _rescaled(_trained())
    x, _, x_test, _ = _features()
    with torch.no_grad():
        torch.testing.assert_close(
            model(torch.from_numpy(x_test)), _trained()(torch.from_numpy(x_test)), rtol=1e-4, atol=1e-4
        )
    fp32 = _accuracy(_trained())
    assert _accuracy(model) == fp32

    ptq = inc.quantize(
        model, inc.QuantConfig(format=fmt, granularity="per_tensor"), dataset=inc.Dataset(x[:256], batch_size=32)
    )
    ptq_accuracy = _accuracy(ptq)
    assert fp32 - ptq_accuracy >= 0.3, (fp32, ptq_accuracy)

    qat_model = inc_torch.prepare_qat(
        model, inc.QATConfig(format=fmt, granularity="per_tensor"), torch.from_numpy(x[:4])
    )
    _user_loop(qat_model, _optimizer(optimizer_name, qat_model), epochs=QAT_EPOCHS, seed=1)
    int8 = inc_torch.convert(qat_model)
    assert inc_torch.quantized_ops(int8) == ["fc1", "fc2"]
    qat_accuracy = _accuracy(int8)
    # 5%, not the 1% of test_qat.py: recovering from the split takes tens of epochs at a training rate, and
    # such a run lands anywhere within about 3% of the starting accuracy on the 397 test digits, in FP32 as
    # with fake quantization (over 14 seeds: FP32 fine-tuning 0.87-0.94, QAT 0.88-0.93 from FP32 0.91-0.92).
    assert relative_loss(fp32, qat_accuracy) <= 0.05, (fp32, ptq_accuracy, qat_accuracy)
    assert qat_accuracy - ptq_accuracy >= 0.3, (ptq_accuracy, qat_accuracy)
