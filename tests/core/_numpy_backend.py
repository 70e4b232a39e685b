"""A framework-free backend for the benchmark and CLI tests: a chain of numpy matmul layers.

Quantization is small but real: weights become symmetric int8 with one scale per output channel
(or per tensor), activations are fake-quantized to asymmetric uint8 with ranges from calibration
(static) or from each batch (dynamic). Models are saved with ``numpy.savez``.

The module lives at the top level of ``tests/core`` so benchmark instance processes can import it
by its ``module:qualname`` path.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inc_core import Backend, Dataset, Op, QuantConfig, TuningSpace, register_backend
from inc_core._registry import unregister_backend
from inc_core.errors import ModelLoadError, SaveError

KEY = "npmat"
SUFFIX = f".{KEY}"
MODULE_KEY = __name__.split(".")[0]


@dataclass
class Dense:
    name: str
    weight: np.ndarray  # float32 (in, out); for a quantized layer, the dequantized weight
    bias: np.ndarray
    weight_q: np.ndarray | None = None  # int8 (in, out)
    weight_scale: np.ndarray | None = None  # float32 (out,) or (1,)
    act_qparams: tuple[float, int] | None = None  # static: (scale, zero point) of the uint8 input
    dynamic: bool = False

    @property
    def quantized(self) -> bool:
        return self.weight_q is not None


def _fake_quant_uint8(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    q = np.clip(np.rint(x / scale) + zero_point, 0, 255)
    return ((q - zero_point) * scale).astype(np.float32)


def uint8_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric uint8 (scale, zero point) for the range [lo, hi], widened to hold 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    return float(scale), int(np.clip(np.rint(-lo / scale), 0, 255))


class MatMulModel:
    """Dense layers with ReLU between them; counts its calls so tests can check iteration counts."""

    def __init__(self, layers: list[Dense]) -> None:
        self.layers = layers
        self.calls = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        return self.forward(x)[-1]

    def forward(self, x: np.ndarray) -> list[np.ndarray]:
        """Every layer's input, then the output."""
        x = np.asarray(x, dtype=np.float32)
        seen = []
        for i, layer in enumerate(self.layers):
            seen.append(x)
            if layer.act_qparams is not None:
                x = _fake_quant_uint8(x, *layer.act_qparams)
            elif layer.dynamic:
                x = _fake_quant_uint8(x, *uint8_qparams(float(x.min()), float(x.max())))
            x = x @ layer.weight + layer.bias
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0.0)
        return [*seen, x]


def make_model(sizes: tuple[int, ...] = (8, 16, 4), seed: int = 0) -> MatMulModel:
    rng = np.random.default_rng(seed)
    layers = [
        Dense(
            name=f"fc{i}",
            weight=rng.normal(0.0, 0.5, size=(n_in, n_out)).astype(np.float32),
            bias=rng.normal(0.0, 0.1, size=n_out).astype(np.float32),
        )
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]))
    ]
    return MatMulModel(layers)


def _single_array(inputs: Any) -> np.ndarray:
    if isinstance(inputs, Mapping):
        (value,) = inputs.values()
        return np.asarray(value)
    if isinstance(inputs, tuple):
        return np.asarray(inputs[0])
    return np.asarray(inputs)


class NumpyBackend(Backend):
    name = KEY
    package = "inc-core (tests)"
    formats = ("int8",)

    def __init__(self) -> None:
        self.runner_threads: list[int | None] = []

    def accepts(self, model: Any) -> bool:
        return isinstance(model, MatMulModel) or str(model).endswith(SUFFIX)

    def describe(self, model: Any, config: QuantConfig) -> TuningSpace:
        ops = tuple(Op(layer.name, "MatMul") for layer in model.layers)
        return TuningSpace(ops, {"MatMul": {"granularity": ("per_channel", "per_tensor")}})

    def calibrate(self, model: Any, dataset: Dataset, config: QuantConfig) -> Any:
        ranges: dict[str, tuple[float, float]] = {}
        for batch in dataset.inputs(limit=config.calib_samples):
            for layer, seen in zip(model.layers, model.forward(_single_array(batch))):
                lo, hi = ranges.get(layer.name, (np.inf, -np.inf))
                ranges[layer.name] = (min(lo, float(seen.min())), max(hi, float(seen.max())))
        return ranges

    def quantize(self, model: Any, config: QuantConfig, *, calibration: Any | None, inplace: bool = False) -> Any:
        out = model if inplace else copy.deepcopy(model)
        out.calls = 0
        excluded = set(config.exclude.select(self.describe(model, config).ops))
        for layer in out.layers:
            if layer.name in excluded:
                continue
            w = layer.weight
            per_channel = config.setting(layer.name, "MatMul", "granularity") == "per_channel"
            amax = np.abs(w).max(axis=0) if per_channel else np.abs(w).max().reshape(1)
            scale = (np.where(amax > 0, amax, 1.0) / 127.0).astype(np.float32)
            layer.weight_q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
            layer.weight_scale = scale
            layer.weight = layer.weight_q.astype(np.float32) * scale
            if config.approach == "static":
                layer.act_qparams = uint8_qparams(*calibration[layer.name])
            else:
                layer.dynamic = True
        return out

    def save(self, model: Any, path: Path) -> None:
        arrays: dict[str, np.ndarray] = {"names": np.array([layer.name for layer in model.layers])}
        for i, layer in enumerate(model.layers):
            arrays[f"bias{i}"] = layer.bias
            if layer.quantized:
                arrays[f"weight_q{i}"] = layer.weight_q
                arrays[f"weight_scale{i}"] = layer.weight_scale
                if layer.act_qparams is not None:
                    arrays[f"act{i}"] = np.array(layer.act_qparams, dtype=np.float64)
            else:
                arrays[f"weight{i}"] = layer.weight
        with open(path, "wb") as handle:  # a handle, so numpy does not append ".npz" to the name
            np.savez(handle, **arrays)

    def load(self, path: Path) -> Any:
        try:
            with np.load(path, allow_pickle=False) as data:
                layers = []
                for i, name in enumerate(data["names"]):
                    if f"weight_q{i}" in data.files:
                        act = data[f"act{i}"] if f"act{i}" in data.files else None
                        q, scale = data[f"weight_q{i}"], data[f"weight_scale{i}"]
                        layers.append(
                            Dense(
                                name=str(name),
                                weight=q.astype(np.float32) * scale,
                                bias=data[f"bias{i}"],
                                weight_q=q,
                                weight_scale=scale,
                                act_qparams=(float(act[0]), int(act[1])) if act is not None else None,
                                dynamic=act is None,
                            )
                        )
                    else:
                        layers.append(Dense(name=str(name), weight=data[f"weight{i}"], bias=data[f"bias{i}"]))
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"npmat: cannot read a model from {str(path)!r} ({exc}).") from exc
        return MatMulModel(layers)

    def runner(self, model: Any, inputs: Any, *, threads: int | None = None) -> Callable[[], Any]:
        self.runner_threads.append(threads)
        x = _single_array(inputs)
        return lambda: model(x)

    def version(self) -> str:
        return f"numpy {np.__version__}"


def register() -> None:
    """Register under the file suffix and under this module's top-level name (what the type resolves to)."""
    register_backend(KEY, NumpyBackend)
    register_backend(MODULE_KEY, NumpyBackend)


def unregister() -> None:
    unregister_backend(KEY)
    unregister_backend(MODULE_KEY)


class BrokenLoadBackend(NumpyBackend):
    """Fails in instance processes the way a corrupt model file does (an inc error)."""

    def load(self, path: Path) -> Any:
        raise ModelLoadError(f"npmat: {path.name} is corrupt on purpose")


class BrokenRunnerBackend(NumpyBackend):
    """Fails in instance processes with a plain exception (a bug in a plugin)."""

    def runner(self, model: Any, inputs: Any, *, threads: int | None = None) -> Callable[[], Any]:
        raise ValueError("runner failed on purpose")


class OptionBackend(NumpyBackend):
    """A backend configured by a constructor option that instance processes must receive through ``options()``."""

    def __init__(self, *, refuse_runs: bool = False) -> None:
        super().__init__()
        self.refuse_runs = refuse_runs

    def options(self) -> dict[str, Any]:
        return {"refuse_runs": self.refuse_runs}

    def runner(self, model: Any, inputs: Any, *, threads: int | None = None) -> Callable[[], Any]:
        if self.refuse_runs:
            raise ModelLoadError("npmat: this backend was configured with refuse_runs=True")
        return super().runner(model, inputs, threads=threads)


class SuffixPerKindBackend(NumpyBackend):
    """Writes quantized models as ``.npq`` and FP32 ones as ``.npf`` and refuses any other name, as the torch
    backend does with ``.pt2``/``.pt``: neither suffix is the backend's key."""

    def file_suffix(self, model: Any) -> str:
        return ".npq" if any(layer.quantized for layer in model.layers) else ".npf"

    def save(self, model: Any, path: Path) -> None:
        if path.suffix != self.file_suffix(model):
            raise SaveError(f"npmat: name the file '*{self.file_suffix(model)}', got {path.name!r}")
        super().save(model, path)

    def load(self, path: Path) -> Any:
        if path.suffix not in (".npq", ".npf"):
            raise ModelLoadError(f"npmat: cannot tell the format of {path.name!r}")
        return super().load(path)


class BadSuffixBackend(NumpyBackend):
    """A plugin bug: a file suffix that is not one."""

    def file_suffix(self, model: Any) -> str:
        return "../model"


class PerChannelFailsBackend(NumpyBackend):
    """A quantizer that cannot handle per-channel weights, as ORT's QDQ quantizer fails on a per-channel
    MatMul with a bias Add: per-channel configs are failed trials, per-tensor ones work."""

    def quantize(self, model: Any, config: QuantConfig, *, calibration: Any | None, inplace: bool = False) -> Any:
        excluded = set(config.exclude.select(self.describe(model, config).ops))
        for layer in model.layers:
            if layer.name not in excluded and config.setting(layer.name, "MatMul", "granularity") == "per_channel":
                raise ValueError("The truth value of an array with more than one element is ambiguous")
        return super().quantize(model, config, calibration=calibration, inplace=inplace)


class AlwaysFailsBackend(NumpyBackend):
    """A quantizer that fails on every config."""

    def quantize(self, model: Any, config: QuantConfig, *, calibration: Any | None, inplace: bool = False) -> Any:
        raise RuntimeError("Failed to find proper ai.onnx domain")
