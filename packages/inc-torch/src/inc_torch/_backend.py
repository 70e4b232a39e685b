"""TorchBackend: the inc backend for ``torch.nn.Module`` models (PT2E and FX static INT8, dynamic INT8)."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from inc_core._dataset import Dataset
from inc_core._quant_config import QuantConfig
from inc_core.backend import Backend, Op, TuningSpace
from inc_core.errors import CalibrationError, ConfigError, UnsupportedModelError
from inc_torch._calibration import TorchCalibration, calibrate, model_signature
from inc_torch._compiled import CompiledQuantizedModule
from inc_torch._dynamic import quantize_dynamic
from inc_torch._inputs import float_dtype, to_inputs
from inc_torch._ops import check_supported, quantizable_ops, tuning_space
from inc_torch._serialize import load_model, save_model

__all__ = ["TorchBackend", "make_runner"]

_SUFFIXES = (".pt", ".pt2")


def _check_model(model: Any) -> nn.Module:
    if isinstance(model, (torch.jit.ScriptModule, CompiledQuantizedModule)) or (
        isinstance(model, torch.fx.GraphModule)
        and any("quantize" in str(n.target) for n in model.graph.nodes if n.op == "call_function")
    ):
        raise UnsupportedModelError(
            f"The model is a {type(model).__name__}, already scripted or quantized; pass the FP32 torch.nn.Module."
        )
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"The torch backend quantizes torch.nn.Module models, got {type(model).__name__}.")
    return model


def make_runner(model: Any, inputs: Any, threads: int | None) -> Callable[[], Any]:
    """One-inference callable: inputs converted once, threads set, autograd off."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"runner: threads must be an int >= 1 or None, got {threads!r}.")
        torch.set_num_threads(threads)
    dtype = float_dtype(model) if isinstance(model, nn.Module) else torch.float32
    args, kwargs = to_inputs(inputs, dtype)

    def run() -> Any:
        with torch.no_grad():
            return model(*args, **kwargs)

    return run


class TorchBackend(Backend):
    """Quantizes ``torch.nn.Module`` models for x86 CPUs.

    Formats (``QuantConfig.format``): ``"pt2e"`` (default: torch.export + torchao's X86InductorQuantizer,
    run through inductor) and ``"fx"`` (torch.ao FX graph mode, x86 quantized modules). Dynamic
    quantization swaps Linear/LSTM/GRU layers without tracing, whatever the format.
    """

    name: ClassVar[str] = "torch"
    package: ClassVar[str] = "inc-torch"
    formats: ClassVar[tuple[str, ...]] = ("pt2e", "fx")

    def accepts(self, model: Any) -> bool:
        if isinstance(model, (str, Path)):
            return Path(model).suffix.lower() in _SUFFIXES
        return isinstance(model, nn.Module)

    def _ops(self, model: nn.Module, config: QuantConfig) -> tuple[str, tuple[Op, ...]]:
        fmt = self.check_format(config.format)
        ops = quantizable_ops(model, config, fmt)
        config.exclude.select(ops)  # unknown names/patterns/types -> ConfigError before any work
        check_supported(config, ops)
        return fmt, ops

    def describe(self, model: Any, config: QuantConfig) -> TuningSpace:
        return tuning_space(_check_model(model), config, self.check_format(config.format))

    def calibrate(self, model: Any, dataset: Dataset, config: QuantConfig) -> TorchCalibration:
        fmt, _ = self._ops(_check_model(model), config)
        return calibrate(model, dataset, config, fmt)

    def quantize(self, model: Any, config: QuantConfig, *, calibration: Any | None, inplace: bool = False) -> nn.Module:
        model = _check_model(model)
        fmt, ops = self._ops(model, config)
        if config.approach == "dynamic":
            return quantize_dynamic(model, config, ops, inplace=inplace)
        if not isinstance(calibration, TorchCalibration):
            raise CalibrationError(
                "Static quantization needs calibration statistics: call inc.quantize(model, config, dataset=...) "
                f"or pass the result of TorchBackend.calibrate(); got {type(calibration).__name__}."
            )
        if calibration.format != fmt:
            raise ConfigError(
                f"The calibration was collected for format={calibration.format!r} but the config asks for "
                f"format={fmt!r}; calibrate again with the same format."
            )
        if calibration.signature != model_signature(model):
            raise CalibrationError("The calibration was collected on a different model (its parameters differ).")
        if fmt == "pt2e":
            from inc_torch._pt2e import quantize_pt2e

            return quantize_pt2e(config, ops, calibration)
        from inc_torch._fx import quantize_fx

        return quantize_fx(model, config, ops, calibration, inplace=inplace)

    def op_errors(self, model: Any, config: QuantConfig, *, calibration: Any | None, dataset: Dataset) -> dict[str, float]:
        from inc_torch._op_errors import op_errors

        model = _check_model(model)
        _, ops = self._ops(model, config)
        return op_errors(model, config, ops, calibration, dataset)

    def save(self, model: Any, path: Path) -> None:
        save_model(model, Path(path))

    def load(self, path: Path) -> Any:
        return load_model(Path(path))

    def file_suffix(self, model: Any) -> str:
        # PT2E models are saved as a torch.export ExportedProgram, everything else as TorchScript.
        return ".pt2" if isinstance(model, CompiledQuantizedModule) else ".pt"

    def runner(self, model: Any, inputs: Any, *, threads: int | None = None) -> Callable[[], Any]:
        return make_runner(model, inputs, threads)

    def version(self) -> str:
        parts = [f"inc-torch {_version('inc-torch')}", f"torch {torch.__version__}"]
        ao = _version("torchao")
        if ao != "not installed":
            parts.append(f"torchao {ao}")
        return ", ".join(parts)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
