"""Small models and data for the bad-input catalogue (shared with its kill -9 child process)."""

from __future__ import annotations

import copy
import functools
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import inc_core as inc

__all__ = [
    "TinyCNN",
    "TinyMLP",
    "digits",
    "onnx_mlp",
    "score",
    "sha256",
    "state",
    "tuning_case",
    "tuning_config",
]


@functools.cache
def _digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return (load_digits().data / 16.0).astype(np.float32)


def digits(n: int = 64) -> np.ndarray:
    """The first ``n`` scikit-learn digits as (n, 64) float32 in [0, 1]."""
    return _digits()[:n].copy()


def onnx_mlp() -> onnx.ModelProto:
    """x (N, 64) -> fc1 MatMul/Add -> Relu -> fc2 MatMul/Add -> y (N, 10); seeded random weights."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((64, 32)) * 0.2).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal(32) * 0.1).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((32, 10)) * 0.2).astype(np.float32), "w2"),
        numpy_helper.from_array((rng.standard_normal(10) * 0.1).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "b1"], ["h2"], name="fc1_bias"),
        helper.make_node("Relu", ["h2"], ["h3"], name="relu"),
        helper.make_node("MatMul", ["h3", "w2"], ["h4"], name="fc2"),
        helper.make_node("Add", ["h4", "b2"], ["y"], name="fc2_bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


class TinyCNN(nn.Module):
    """conv -> relu -> linear on (N, 1, 8, 8) digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


class TinyMLP(nn.Module):
    """Two Linear layers on (N, 64) digits: the dynamic-quantization target."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@functools.cache
def _seeded(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return (TinyCNN() if kind == "cnn" else TinyMLP()).eval()


def tiny(kind: str) -> nn.Module:
    """A fresh copy of the seeded TinyCNN (``"cnn"``) or TinyMLP (``"mlp"``)."""
    return copy.deepcopy(_seeded(kind))


def images(n: int = 32) -> np.ndarray:
    return digits(n).reshape(n, 1, 8, 8)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- the interrupted tuning run


def _is_quantized(model: Any) -> bool:
    if isinstance(model, onnx.ModelProto):
        return any("Quantize" in n.op_type or "Integer" in n.op_type or n.op_type.startswith("QLinear") for n in model.graph.node)
    # Eager torch.ao quantized modules, or their TorchScript form (a loaded .pt) that keeps the packed int8 weights.
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") or hasattr(m, "_packed_params") for m in model.modules())


def score(model: Any) -> float:
    """1.0 for the FP32 model, 0.5 for any INT8 model: no trial meets the goal, so the run tries them all."""
    return 0.5 if _is_quantized(model) else 1.0


def tuning_case(backend: str) -> tuple[Any, inc.Dataset]:
    if backend == "onnx":
        return onnx_mlp(), inc.Dataset(digits(32), batch_size=8)
    return tiny("mlp"), inc.Dataset(digits(32), batch_size=8)


def tuning_config(backend: str, history: str | None) -> inc.TuningConfig:
    """basic strategy, at most 6 trials; ONNX tunes static QDQ, torch tunes dynamic (no graph capture: fast)."""
    base = inc.QuantConfig() if backend == "onnx" else inc.QuantConfig(approach="dynamic")
    return inc.TuningConfig(base=base, strategy="basic", tolerable_loss=0.01, max_trials=6, history=history)
