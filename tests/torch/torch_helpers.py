"""Small real models for the torch tests: CNN and MLP trained on scikit-learn's digits (seeded)."""

from __future__ import annotations

import copy
import functools

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import inc_core as inc

TRAIN = 1400  # digits has 1797 samples: the rest is the held-out test split


@functools.cache
def digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8) in [0, 1]
    return images, data.target.astype(np.int64)


def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = digits()
    return x[:TRAIN], y[:TRAIN], x[TRAIN:], y[TRAIN:]


class DigitsCNN(nn.Module):
    """conv-bn-relu-pool, conv-relu-pool, linear-relu, linear: every op kind the x86 paths fuse."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class DigitsMLP(nn.Module):
    """A BERT-style stack of Linear layers on flattened digits (the dynamic-quantization target)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class DigitsUNet(nn.Module):
    """A U-Net-shaped classifier: an encoder, a U-Net up-sampling (kernel 2, stride 2) concatenated with the
    encoder's output, a DCGAN-style up-sampling (kernel 4, stride 2, padding 1) + batch norm, a strided conv head."""

    def __init__(self) -> None:
        super().__init__()
        self.e1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)  # 8x8 -> 4x4
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)  # 4x4 -> 8x8, U-Net's
        self.dec = nn.Conv2d(32, 16, 3, padding=1)
        self.up2 = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1, bias=False)  # 8x8 -> 16x16, DCGAN's
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = torch.relu(self.bn1(self.e1(x)))
        x = torch.relu(self.down(skip))
        x = torch.relu(self.dec(torch.cat([self.up(x), skip], 1)))
        x = torch.relu(self.bn2(self.up2(x)))
        return self.fc(torch.relu(self.head(x)).mean((2, 3)))


def train(model: nn.Module, epochs: int, *, lr: float = 3e-3, seed: int = 0) -> nn.Module:
    """Adam + cross-entropy on the training split, in a fixed order."""
    x, y, _, _ = split()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), 50):
            idx = order[start : start + 50]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            optimizer.step()
    return model.eval()


@functools.cache
def _trained(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = DigitsCNN() if kind == "cnn" else DigitsMLP()
    return train(model, 10 if kind == "cnn" else 15, lr=5e-3 if kind == "cnn" else 3e-3)


def trained_cnn() -> nn.Module:
    return copy.deepcopy(_trained("cnn"))


def trained_mlp() -> nn.Module:
    return copy.deepcopy(_trained("mlp"))


@functools.cache
def _trained_unet() -> nn.Module:
    torch.manual_seed(0)
    return train(DigitsUNet(), 10, lr=3e-3, seed=1)


def trained_unet() -> nn.Module:
    return copy.deepcopy(_trained_unet())


def accuracy(model: nn.Module) -> float:
    _, _, x, y = split()
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    return float((logits.argmax(1).numpy() == y).mean())


def calib_data(n: int = 128, batch_size: int = 32) -> inc.Dataset:
    x, _, _, _ = split()
    return inc.Dataset(x[:n], batch_size=batch_size)



def digits_tokens(n_from: int = 0, n_to: int | None = None) -> np.ndarray:
    """Digits images as 4 tokens of 16 pixels (a transformer-shaped input), float32."""
    x, _ = digits()
    return np.ascontiguousarray(x[n_from:n_to].reshape(-1, 4, 16), dtype=np.float32)


def relative_mse(model: nn.Module, quantized: nn.Module, x: torch.Tensor) -> float:
    """Relative mean squared error of the INT8 outputs against FP32."""
    with torch.no_grad():
        ref, out = model(x), quantized(x)
    return float(((out - ref) ** 2).mean() / (ref**2).mean())

def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the state dict, to prove a model was not modified."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def relative_loss(fp32: float, int8: float) -> float:
    return (fp32 - int8) / fp32


def int8_breaking_mlp() -> torch.nn.Module:
    """The digits MLP with one hidden unit scaled up 1000x and fc2's weights reading it scaled down alike.

    The FP32 function is unchanged, but fc2's input now spans a range where a uint8 step is wider than every
    other unit's activations: fc2 cannot run INT8, while BF16 (a relative precision) computes it as FP32 does.
    """
    model = trained_mlp()
    x, _, _, _ = split()
    with torch.no_grad():
        hidden = torch.relu(model.fc1(torch.flatten(torch.from_numpy(x), 1)))
        unit = int(hidden.mean(0).argmax())
        model.fc1.weight[unit] *= 1000.0
        model.fc1.bias[unit] *= 1000.0
        model.fc2.weight[:, unit] /= 1000.0
    return model


def stand_in_bf16_cpu(monkeypatch) -> None:
    """Where this CPU lacks BF16 instructions (inc refuses BF16 there: emulated, it is slower than FP32), make inc's
    CPU check see a CPU that has them, so the BF16 rewrite, its saved form and its fidelity are checked on every
    CPU: oneDNN still runs the BF16 ops it is given, emulated with the same BF16 rounding. The refusal itself is
    tested unpatched (test_torch_bf16.py)."""
    from inc_torch.ptq import _bf16

    if _bf16.cpu_bf16_missing() is not None:
        monkeypatch.setattr(_bf16, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
        monkeypatch.setattr(_bf16, "_onednn_bf16", lambda: True)
