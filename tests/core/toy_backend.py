"""A small but real backend for the core's own tests: a numpy MLP with an int8 x uint8 -> int32 kernel.

It exercises the whole SPI the way a framework plugin does (calibrate once with the core's observers,
quantize with fallback and overrides, save/load, runner) without any framework installed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inc_core import Backend, Dataset, Op, QuantConfig, TuningSpace, register_backend
from inc_core.calibration import HistogramObserver, QParams, compute_qparams, quantize, weight_qparams
from inc_core.errors import DatasetError, ModelLoadError, UnsupportedModelError

SUFFIX = ".npmlp"


@dataclass
class NumpyMLP:
    """Dense layers with ReLU between them; ``weights[i]`` has shape (out, in)."""

    weights: list[np.ndarray]
    biases: list[np.ndarray]

    @property
    def names(self) -> list[str]:
        return [f"fc{i}" for i in range(len(self.weights))]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)[-1]

    def forward(self, x: np.ndarray) -> list[np.ndarray]:
        """Every layer's input, then the final output."""
        x = np.asarray(x, dtype=np.float32)
        seen = []
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if x.ndim != 2 or x.shape[1] != w.shape[1]:
                raise DatasetError(f"NumpyMLP: layer fc{i} expects inputs of shape (batch, {w.shape[1]}), got {x.shape}.")
            seen.append(x)
            x = x @ w.T + b
            if i < len(self.weights) - 1:
                x = np.maximum(x, 0)
        return [*seen, x]


@dataclass
class QuantizedLayer:
    weight_q: np.ndarray  # int8 (out, in)
    weight_qp: QParams
    bias: np.ndarray
    act_qp: QParams | None  # None: dynamic (range from each batch)
    act_dtype: str
    act_scheme: str


@dataclass
class QuantizedMLP:
    layers: list[QuantizedLayer | tuple[np.ndarray, np.ndarray]]  # a tuple = FP32 fallback
    meta: dict[str, Any] = field(default_factory=dict)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        for i, layer in enumerate(self.layers):
            if isinstance(layer, tuple):
                x = x @ layer[0].T + layer[1]
            else:
                x = _int8_dense(x, layer)
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0)
        return x


def _int8_dense(x: np.ndarray, layer: QuantizedLayer) -> np.ndarray:
    act_qp = layer.act_qp
    if act_qp is None:
        act_qp = compute_qparams(float(x.min()), float(x.max()), dtype=layer.act_dtype, scheme=layer.act_scheme)
    xq = quantize(x, act_qp).astype(np.int32) - np.asarray(act_qp.zero_point, dtype=np.int32)
    acc = xq @ layer.weight_q.astype(np.int32).T  # the int32 accumulation an INT8 kernel does
    scale = np.asarray(act_qp.scale, dtype=np.float32) * np.asarray(layer.weight_qp.scale, dtype=np.float32).reshape(-1)
    return acc.astype(np.float32) * scale + layer.bias


class ToyBackend(Backend):
    name = "toy"
    package = "inc-core (tests)"
    formats = ("int8",)

    def accepts(self, model: Any) -> bool:
        return isinstance(model, (NumpyMLP, QuantizedMLP)) or str(model).endswith(SUFFIX)

    def describe(self, model: Any, config: QuantConfig) -> TuningSpace:
        if not isinstance(model, NumpyMLP):
            raise UnsupportedModelError(f"ToyBackend quantizes a NumpyMLP, got {type(model).__name__}.")
        options = {"Dense": {"calibration": ("minmax", "kl", "percentile", "mse"), "scheme": ("asym", "sym")}}
        return TuningSpace(tuple(Op(n, "Dense") for n in model.names), options)

    def calibrate(self, model: NumpyMLP, dataset: Dataset, config: QuantConfig) -> dict[str, HistogramObserver]:
        observers = {name: HistogramObserver() for name in model.names}
        for batch in dataset.inputs(limit=config.calib_samples):
            for name, x in zip(model.names, model.forward(batch)):
                observers[name].update(x)
        return observers

    def quantize(self, model: Any, config: QuantConfig, *, calibration: Any, inplace: bool = False) -> QuantizedMLP:
        self.check_format(config.format)
        space = self.describe(model, config)
        fallback = set(config.exclude.select(space.ops))
        layers: list[QuantizedLayer | tuple[np.ndarray, np.ndarray]] = []
        for name, w, b in zip(model.names, model.weights, model.biases):
            if name in fallback:
                layers.append((w.copy(), b.copy()))
                continue
            axis = 0 if config.granularity == "per_channel" else None
            wqp = weight_qparams(w, axis=axis, dtype="int8")
            wq = quantize(w, wqp)
            scheme = config.setting(name, "Dense", "scheme")
            dtype = config.setting(name, "Dense", "activation_dtype")
            act_qp = None
            if config.approach == "static":
                method = config.setting(name, "Dense", "calibration")
                lo, hi = calibration[name].range(method, percentile=config.percentile, dtype=dtype, scheme=scheme)
                act_qp = compute_qparams(lo, hi, dtype=dtype, scheme=scheme)
            layers.append(QuantizedLayer(wq.astype(np.int8), wqp, b.copy(), act_qp, dtype, scheme))
        return QuantizedMLP(layers, {"config": config.to_dict()})

    def op_errors(self, model: Any, config: QuantConfig, *, calibration: Any, dataset: Dataset) -> dict[str, float]:
        quantized = self.quantize(model, config, calibration=calibration)
        errors = dict.fromkeys(model.names, 0.0)
        for batch in dataset.inputs(limit=config.calib_samples):
            for i, name in enumerate(model.names):
                single = QuantizedMLP([layer if j == i else (model.weights[j], model.biases[j]) for j, layer in enumerate(quantized.layers)])
                errors[name] += float(np.mean((single(batch) - model(batch)) ** 2))
        return errors

    def save(self, model: Any, path: Path) -> None:
        arrays: dict[str, np.ndarray] = {}
        kinds = []
        for i, layer in enumerate(model.layers):
            if isinstance(layer, tuple):
                kinds.append({"kind": "fp32"})
                arrays[f"w{i}"], arrays[f"b{i}"] = layer
            else:
                kinds.append({"kind": "int8", "act": None if layer.act_qp is None else layer.act_qp.to_dict(),
                              "wqp": layer.weight_qp.to_dict(), "act_dtype": layer.act_dtype, "act_scheme": layer.act_scheme})
                arrays[f"w{i}"], arrays[f"b{i}"] = layer.weight_q, layer.bias
        with open(path, "wb") as fh:
            np.savez(fh, header=np.frombuffer(json.dumps(kinds).encode(), dtype=np.uint8), **arrays)

    def load(self, path: Path) -> QuantizedMLP:
        try:
            data = np.load(path, allow_pickle=False)
            kinds = json.loads(bytes(data["header"]).decode())
        except Exception as exc:
            raise ModelLoadError(f"{str(path)!r} is not a saved toy model ({exc}).") from exc
        layers: list[QuantizedLayer | tuple[np.ndarray, np.ndarray]] = []
        for i, kind in enumerate(kinds):
            w, b = data[f"w{i}"], data[f"b{i}"]
            if kind["kind"] == "fp32":
                layers.append((w, b))
            else:
                act = None if kind["act"] is None else QParams.from_dict(kind["act"])
                layers.append(QuantizedLayer(w, QParams.from_dict(kind["wqp"]), b, act, kind["act_dtype"], kind["act_scheme"]))
        return QuantizedMLP(layers)

    def file_suffix(self, model: Any) -> str:
        return SUFFIX

    def runner(self, model: Any, inputs: Any, *, threads: int | None = None) -> Any:
        return lambda: model(inputs)


def train_digits_mlp(hidden: int = 32, seed: int = 0) -> tuple[NumpyMLP, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train a 64-hidden-10 MLP on scikit-learn's digits with plain numpy SGD; returns model and splits."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]
    w0 = rng.normal(0, np.sqrt(2 / 64), (hidden, 64)).astype(np.float32)
    w1 = rng.normal(0, np.sqrt(2 / hidden), (10, hidden)).astype(np.float32)
    b0, b1 = np.zeros(hidden, np.float32), np.zeros(10, np.float32)
    onehot = np.eye(10, dtype=np.float32)[y_train]
    for _ in range(60):
        for start in range(0, len(x_train), 32):
            xb, yb = x_train[start:start + 32], onehot[start:start + 32]
            h = np.maximum(xb @ w0.T + b0, 0)
            logits = h @ w1.T + b1
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            g = (p - yb) / len(xb)
            gh = (g @ w1) * (h > 0)
            w1 -= 0.5 * g.T @ h
            b1 -= 0.5 * g.sum(0)
            w0 -= 0.5 * gh.T @ xb
            b0 -= 0.5 * gh.sum(0)
    return NumpyMLP([w0, w1], [b0, b1]), x_train, y_train, x_test, y_test


def accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float((np.argmax(model(x), axis=1) == y).mean())


def register() -> None:
    register_backend(__name__.split(".")[0], ToyBackend)
    register_backend(SUFFIX.lstrip("."), ToyBackend)
    register_backend("toy", ToyBackend)
