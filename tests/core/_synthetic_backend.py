"""A synthetic backend for the tuning tests: the score of a config is known in closed form.

The "model" only lists ops; "quantizing" returns an object that carries the config, and
:func:`score` computes what an evaluation would return from that config:

    score = base_score - global_penalty - sum over quantized ops of
            OP_PENALTY                               (every quantized op costs a little)
          + sensitive[name]                          (ops that need FP32)
          + needs_kl[op_type] if calibration != kl   (op types whose ranges need the KL method)
          + PER_TENSOR_PENALTY if granularity is per_tensor

so every strategy's walk through the space can be worked out by hand in the tests.

``SyntheticModel.fails`` makes the backend's quantizer raise for some configs, as a framework's
quantizer does on an op it cannot handle: it returns the exception to raise, or ``None``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inc_core import Backend, Dataset, Op, QuantConfig, TuningConfig, TuningSpace, register_backend

OP_PENALTY = 0.001
PER_TENSOR_PENALTY = 0.004

# Per op type, the settings tuning may change and their choices.
OPTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "Conv": {"calibration": ("minmax", "kl", "percentile"), "granularity": ("per_channel", "per_tensor")},
    "MatMul": {"calibration": ("minmax", "kl"), "scheme": ("asym", "sym")},
}


@dataclass
class SyntheticModel:
    """ops: (name, op type) in execution order."""

    ops: tuple[tuple[str, str], ...] = (("conv1", "Conv"), ("conv2", "Conv"), ("fc1", "MatMul"), ("fc2", "MatMul"))
    sensitive: dict[str, float] = field(default_factory=lambda: {"conv2": 0.03, "fc2": 0.02})
    needs_kl: dict[str, float] = field(default_factory=lambda: {"MatMul": 0.02})
    base_score: float = 1.0
    global_penalty: float = 0.0
    calls: Counter[str] = field(default_factory=Counter)
    fails: Callable[[QuantConfig], BaseException | None] | None = None
    calibrate_error: BaseException | None = None


@dataclass
class QuantizedSynthetic:
    source: SyntheticModel
    config: QuantConfig
    calibration: Any


def quantized_ops(model: SyntheticModel, config: QuantConfig) -> list[tuple[str, str]]:
    return [(n, t) for n, t in model.ops if not config.exclude.matches(n, t)]


def op_penalty(model: SyntheticModel, config: QuantConfig, name: str, op_type: str) -> float:
    penalty = OP_PENALTY + model.sensitive.get(name, 0.0)
    if op_type in model.needs_kl and config.setting(name, op_type, "calibration") != "kl":
        penalty += model.needs_kl[op_type]
    if config.setting(name, op_type, "granularity") == "per_tensor":
        penalty += PER_TENSOR_PENALTY
    return penalty


def score(model: Any) -> float:
    """What an evaluation of ``model`` returns (the FP32 model scores ``base_score``)."""
    if isinstance(model, SyntheticModel):
        return model.base_score
    src, cfg = model.source, model.config
    return src.base_score - src.global_penalty - sum(op_penalty(src, cfg, n, t) for n, t in quantized_ops(src, cfg))


class PlainSyntheticBackend(Backend):
    """The synthetic backend without per-op errors (the mse strategy must refuse it)."""

    name = "synthetic_plain"
    package = "inc-synthetic"

    def accepts(self, model: Any) -> bool:
        return isinstance(model, (SyntheticModel, QuantizedSynthetic))

    def describe(self, model: Any, config: QuantConfig) -> TuningSpace:
        ops = tuple(Op(n, t) for n, t in model.ops)
        types = {t for _, t in model.ops}
        return TuningSpace(ops, {t: dict(o) for t, o in OPTIONS.items() if t in types})

    def calibrate(self, model: Any, dataset: Dataset, config: QuantConfig) -> Any:
        model.calls["calibrate"] += 1
        if model.calibrate_error is not None:
            raise model.calibrate_error
        samples = sum(len(batch) for batch in dataset.inputs(config.calib_samples))
        return {"samples": samples}

    def quantize(self, model: Any, config: QuantConfig, *, calibration: Any | None, inplace: bool = False) -> Any:
        model.calls["quantize"] += 1
        if config.approach == "static" and calibration is None:
            raise AssertionError("static quantization without calibration")
        failure = model.fails(config) if model.fails is not None else None
        if failure is not None:
            model.calls["failed"] += 1
            raise failure
        return QuantizedSynthetic(model, config, calibration)

    def save(self, model: Any, path: Path) -> None:
        path.write_text(model.config.to_json(), encoding="utf-8")

    def load(self, path: Path) -> Any:
        return QuantConfig.from_json(path.read_text(encoding="utf-8"))

    def runner(self, model: Any, inputs: Any, *, threads: int | None = None) -> Any:
        return lambda: score(model)


class SyntheticBackend(PlainSyntheticBackend):
    """Reports each quantized op's penalty as its output error."""

    name = "synthetic"

    def op_errors(self, model: Any, config: QuantConfig, *, calibration: Any | None, dataset: Dataset) -> dict[str, float]:
        model.calls["op_errors"] += 1
        failure = model.fails(config) if model.fails is not None else None
        if failure is not None:
            raise failure
        return {n: op_penalty(model, config, n, t) for n, t in quantized_ops(model, config)}


def register() -> None:
    register_backend("synthetic", SyntheticBackend)
    register_backend("synthetic_plain", PlainSyntheticBackend)
    # The key resolve_backend derives from the model's type (its top-level module).
    register_backend(SyntheticModel.__module__.split(".")[0], SyntheticBackend)


def calib_data() -> Dataset:
    return Dataset(np.zeros((4, 3), dtype=np.float32))


def resume_config(history: str | None) -> TuningConfig:
    """The tuning run the resume test interrupts (in a child process) and finishes (in the test)."""
    return TuningConfig(strategy="basic", tolerable_loss=0.01, max_trials=50, history=history)


def history_trials(path: Path) -> list[dict[str, Any]]:
    return list(json.loads(path.read_text(encoding="utf-8"))["trials"])


def per_channel_conv2_fails(config: QuantConfig) -> BaseException | None:
    """What a framework quantizer does on an op it cannot handle per channel (conv2, like a MatMul with a bias Add)."""
    if not config.exclude.matches("conv2", "Conv") and config.setting("conv2", "Conv", "granularity") == "per_channel":
        return ValueError("The truth value of an array with more than one element is ambiguous. Use a.any() or a.all()")
    return None
