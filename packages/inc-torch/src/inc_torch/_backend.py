"""TorchBackend: the inc backend for ``torch.nn.Module`` models (PT2E and FX static INT8, dynamic INT8)."""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from inc_core._dataset import Dataset
from inc_core._quant_config import QuantConfig
from inc_core.backend import Backend, Op, TuningSpace, array_digest
from inc_core.errors import CalibrationError, ConfigError, UnsupportedModelError
from inc_torch._compat import unwrap_compiled
from inc_torch._exported import check_exported_config, is_exported_graph, warn_unnamed
from inc_torch._failures import check_constructs, check_returned_model, framework_errors
from inc_torch._inputs import float_dtype, to_inputs
from inc_torch._serialize import load_model, save_model
from inc_torch.ptq._calibration import TorchCalibration, calibrate, model_signature
from inc_torch.ptq._compiled import CompiledQuantizedModule
from inc_torch.ptq._dynamic import check_dynamic_activations, quantize_dynamic
from inc_torch.ptq._fx import EXAMPLE_ATTR
from inc_torch.ptq._ops import (
    check_overrides,
    check_something_quantized,
    check_supported,
    quantizable_ops,
    require_int8_ops,
    tuning_space,
)
from inc_torch.ptq._smooth_quant import SmoothedCalibration, calibrate_smoothed, unwrap

log = logging.getLogger("inc")

__all__ = ["TorchBackend", "make_runner"]

_SUFFIXES = (".pt", ".pt2")


def _holds_quantize_ops(graph_module: torch.fx.GraphModule) -> bool:
    return any("quantize" in str(n.target) for n in graph_module.graph.nodes if n.op == "call_function")


def _script_holds_quantize_ops(model: torch.jit.ScriptModule) -> bool:
    """quantized:: kernels (FX, dynamic) or quantize_per_tensor (IPEX) in a TorchScript model's graph."""
    graph = getattr(model, "inlined_graph", None)  # a ScriptModule without forward has none: say "quantized"
    return graph is None or any("quantize" in node.kind() for node in graph.nodes())


# inc reads layer types and names from the nn.Module (and captures it itself); files hold none of that.
_FROM_PYTHON = (
    "inc quantizes a torch model from its nn.Module: build or load it in Python and call "
    "inc.quantize(model, ...) (the inc CLI's torch commands read the INT8 files inc writes, transformers "
    "models saved with inc.save, and FP32 torch.export programs saved as .pt2)."
)


def _raw_bytes(tensor: torch.Tensor) -> Any:
    tensor = tensor.int_repr() if tensor.is_quantized else tensor
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def _check_model(model: Any) -> nn.Module:
    if isinstance(model, (str, Path)):
        # a .pt2 program or a .pt TorchScript file, read as inc.load reads it (an FP32 program is quantized below)
        return _check_model(load_model(Path(model)))
    if (wrapped := unwrap_compiled(model)) is not model:
        # torch.compile(model) wraps the module it was given: quantize that one (its op names, its forward); the
        # INT8 model is compiled on inc's own path (PT2E), or can be compiled again by the caller.
        log.info("the model is torch.compile's wrapper; quantizing the %s it wraps", type(wrapped).__name__)
        return _check_model(wrapped)
    if isinstance(model, torch.export.ExportedProgram):
        # torchao's PT2E flow starts from the program's module too (see inc_torch._exported)
        return _check_model(model.module())
    if isinstance(model, CompiledQuantizedModule) and not _holds_quantize_ops(model.graph_module):
        return _check_model(model.graph_module)  # an FP32 .pt2 file, as inc.load reads it: its program's module
    if isinstance(model, torch.jit.ScriptModule) and not _script_holds_quantize_ops(model):
        raise UnsupportedModelError(f"The model is a TorchScript {type(model).__name__} (torch.jit.script/trace). {_FROM_PYTHON}")
    if isinstance(model, (torch.jit.ScriptModule, CompiledQuantizedModule)) or (
        isinstance(model, torch.fx.GraphModule) and _holds_quantize_ops(model)
    ):
        raise UnsupportedModelError(
            f"The model is a {type(model).__name__}, already quantized; pass the FP32 torch.nn.Module."
        )
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"The torch backend quantizes torch.nn.Module models, got {type(model).__name__}.")
    return model


def _check_precision(model: nn.Module, fmt: str, approach: str) -> None:
    """INT8 quantization starts from FP32 weights: a float16 or float64 model fails deep in torch.ao or inductor
    (with advice, such as another format or excluding the first op, that cannot help).

    PT2E static quantizes a bfloat16 model (its observers and inductor's lowering take it); every other path
    needs the FP32 model.
    """
    dtype = float_dtype(model)
    if dtype not in (torch.float16, torch.bfloat16, torch.float64):
        return
    if dtype == torch.bfloat16 and fmt == "pt2e" and approach == "static":
        return
    name = str(dtype).replace("torch.", "")
    path = "dynamic INT8 quantization" if approach == "dynamic" else f"static INT8 quantization with format={fmt!r}"
    bf16 = (
        "; to keep layers that stay out of INT8 in BF16, use QuantConfig(bf16=inc.LayerFilter(...)) or "
        "TuningConfig(fallback_precision='bf16')" if dtype != torch.float64 else ""
    )
    raise UnsupportedModelError(
        f"{type(model).__name__} holds {name} parameters; {path} starts from "
        f"the FP32 model. Pass model.float() (the INT8 model then takes float32 inputs){bf16}."
    )


def make_runner(model: Any, inputs: Any, threads: int | None) -> Callable[[], Any]:
    """One-inference callable: inputs converted once, autograd off, ``threads`` in effect during each call.

    torch's thread count is process-wide: each call sets it and puts the caller's count back afterwards
    (measured to cost nothing next to a forward), so a benchmark leaves the process as it found it.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"runner: threads must be an int >= 1 or None, got {threads!r}.")
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()  # a program is not callable itself
    dtype = float_dtype(model) if isinstance(model, nn.Module) else torch.float32
    args, kwargs = to_inputs(inputs, dtype)

    def run() -> Any:
        previous = torch.get_num_threads()
        if threads is not None and threads != previous:
            torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                return model(*args, **kwargs)
        finally:
            if torch.get_num_threads() != previous:
                torch.set_num_threads(previous)

    return run


def warn_left_in_float(model: nn.Module, fmt: str, *, label: str, alternatives: dict[str, str]) -> None:
    """Warn of layers ``fmt`` leaves in FP32 that another way quantizes (PT2E: Conv3d; IPEX: Conv1d).

    ``label`` names the path in the message (``"format='pt2e'"``); ``alternatives`` maps the other formats'
    keys in ``STATIC_TYPES`` to how the user asks for them.
    """
    from inc_torch.ptq._ops import LOOKUP_TYPES, STATIC_TYPES

    def handled(module: nn.Module, f: str) -> bool:
        # Embedding tables are left out: FP32 tables cost size, not speed, and FX traces few models that hold them.
        if f == "pt2e" and isinstance(module, nn.modules.conv._ConvTransposeNd) and any(d != 1 for d in module.dilation):
            return False  # PT2E keeps a dilated transposed convolution FP32 (see ptq._conv_transpose)
        return isinstance(module, STATIC_TYPES[f]) and not isinstance(module, LOOKUP_TYPES)

    left = {name: m for name, m in model.named_modules() if not handled(m, fmt) and any(handled(m, f) for f in alternatives)}
    if not left:
        return
    better = [how for f, how in alternatives.items() if all(handled(m, f) for m in left.values())]
    kinds = "/".join(sorted({type(m).__name__ for m in left.values()}))
    names = list(left)
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    log.warning(
        "%s leaves %d %s layer(s) in FP32: %s.%s",
        label, len(names), kinds, shown, f" They become INT8 with {better[0]}." if better else "",
    )


def _step(fmt: str, config: QuantConfig) -> str:
    if config.approach == "dynamic":
        return "Dynamic quantization (torch.ao quantize_dynamic)"
    return {"pt2e": "PT2E quantization (torchao prepare_pt2e/convert_pt2e, format='pt2e')",
            "fx": "FX quantization (torch.ao prepare_fx/convert_fx, format='fx')"}.get(fmt, f"Quantization (format={fmt!r})")


class TorchBackend(Backend):
    """Quantizes ``torch.nn.Module`` models for x86 CPUs.

    Formats (``QuantConfig.format``): ``"pt2e"`` (default: torch.export + torchao's X86InductorQuantizer,
    run through inductor) and ``"fx"`` (torch.ao FX graph mode, x86 quantized modules). Dynamic
    quantization swaps Linear/LSTM/GRU layers without tracing, whatever the format. Embedding tables become 8 bits
    per row on every path but IPEX (see :mod:`inc_torch.ptq._pt2e_tables` and :mod:`inc_torch.ptq._lookups`).

    Every static model is run once on the first calibration batch, the way the user will run it (PT2E:
    compiled by inductor), before it is returned. Failures of torch/torchao calls are raised as
    :class:`~inc_core.errors.UnsupportedModelError` naming the op and the way out.

    Args:
        dynamic_activations: activation range of dynamically quantized Linear layers. ``"reduce_range"``:
            7-bit activations, the same results on every x86 CPU. ``"full_range"``: 8-bit activations, half
            the rounding error, for CPUs with int8 dot products accumulating in int32 (AVX512-VNNI,
            AVX-VNNI, AMX-INT8); refused on a CPU without them. ``"auto"`` (default): full range where the
            quantizing CPU has them. The range is part of the model and of the file :func:`inc.save` writes
            (recorded in its ``inc.json``); :func:`inc.load` of a full-range model on a CPU without
            VNNI/AMX switches it to 7 bits with a warning, since the 8-bit path would overflow there.
            Pass the backend explicitly: ``inc.quantize(model, config, backend=TorchBackend(dynamic_activations="reduce_range"))``.

    Raises:
        ConfigError: ``dynamic_activations`` is not one of the above.
    """

    name: ClassVar[str] = "torch"
    package: ClassVar[str] = "inc-torch"
    formats: ClassVar[tuple[str, ...]] = ("pt2e", "fx")
    supports_smooth_quant: ClassVar[bool] = True
    supports_bf16: ClassVar[bool] = True

    def __init__(self, *, dynamic_activations: str = "auto") -> None:
        self.dynamic_activations = check_dynamic_activations(dynamic_activations)

    def accepts(self, model: Any) -> bool:
        if isinstance(model, (str, Path)):
            return Path(model).suffix.lower() in _SUFFIXES
        return isinstance(model, (nn.Module, torch.export.ExportedProgram))

    def _ops(self, model: nn.Module, config: QuantConfig) -> tuple[str, tuple[Op, ...]]:
        fmt = self.check_format(config.format)
        ops = quantizable_ops(model, config, fmt)
        excluded = set(config.exclude.select(ops))  # unknown names/patterns/types -> ConfigError before any work
        excluded |= set(config.bf16.select(ops))  # BF16 ops leave INT8 as excluded ones do
        check_overrides(config, self.describe(model, config))
        check_supported(config, ops)
        check_something_quantized(config, fmt, ops, excluded)
        if is_exported_graph(model):
            check_exported_config(config.smooth_quant)
        elif config.approach == "static":
            check_constructs(model, fmt, excluded)
        return fmt, ops

    def bf16_unavailable(self, config: QuantConfig) -> str | None:
        """BF16 runs on the PT2E static path, on CPUs with AVX512-BF16 or AMX-BF16 (see :mod:`inc_torch.ptq._bf16`)."""
        from inc_torch.ptq._bf16 import bf16_unavailable

        return bf16_unavailable(self.name, self.check_format(config.format), config.approach)

    def describe(self, model: Any, config: QuantConfig) -> TuningSpace:
        model = _check_model(model)
        fmt = self.check_format(config.format)
        _check_precision(model, fmt, config.approach)
        with framework_errors("Listing the quantizable ops", fmt, model):
            return tuning_space(model, config, fmt)

    def calibrate(self, model: Any, dataset: Dataset, config: QuantConfig) -> TorchCalibration | SmoothedCalibration:
        model = _check_model(model)
        fmt, ops = self._ops(model, config)
        # here: once per quantize or tuning run, not once per trial
        others = {f: f"format={f!r}" for f in self.formats if f != fmt}
        if is_exported_graph(model):
            warn_unnamed(model)
        else:
            warn_left_in_float(model, fmt, label=f"format={fmt!r}", alternatives=others)
        with framework_errors(f"Calibration for {_step(fmt, config)}", fmt, model, frozenset(op.name for op in ops)):
            if config.smooth_quant is not None:
                return calibrate_smoothed(model, dataset, config, fmt)
            return calibrate(model, dataset, config, fmt)

    def quantize(self, model: Any, config: QuantConfig, *, calibration: Any | None, inplace: bool = False) -> nn.Module:
        model = _check_model(model)
        self.check_bf16(config)  # also when called without inc.quantize
        _check_precision(model, self.check_format(config.format), config.approach)
        fmt, ops = self._ops(model, config)
        with framework_errors(_step(fmt, config), "dynamic" if config.approach == "dynamic" else fmt, model, frozenset(op.name for op in ops)):
            return self._quantize(model, config, fmt, ops, calibration, inplace)

    def _quantize(
        self, model: nn.Module, config: QuantConfig, fmt: str, ops: tuple[Op, ...], calibration: Any, inplace: bool
    ) -> nn.Module:
        if config.approach == "dynamic":
            dynamic = quantize_dynamic(model, config, ops, inplace=inplace, activations=self.dynamic_activations)
            require_int8_ops(dynamic, config, fmt)
            return dynamic
        # SmoothQuant: the rescaled copy and its calibration take the place of the user's model.
        model, calibration = unwrap(model, config, calibration)
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
        quantized: nn.Module
        if fmt == "pt2e":
            from inc_torch.ptq._bf16 import bf16_names, int8_view, run_in_bf16
            from inc_torch.ptq._pt2e import quantize_pt2e

            quantized = run_in_bf16(quantize_pt2e(int8_view(config), ops, calibration), bf16_names(config, ops))
        else:
            from inc_torch.ptq._fx import quantize_fx

            quantized = quantize_fx(model, config, ops, calibration, inplace=inplace)
        check_returned_model(
            quantized, calibration.example, fmt, model, frozenset(op.name for op in ops), fp32_graph=calibration.exported
        )
        require_int8_ops(quantized, config, fmt)
        return quantized

    def check_quantized_runs(self, model: Any, quantized: Any, dataset: Dataset) -> None:
        """Run the dynamic INT8 model on the dataset's first batch (see :meth:`Backend.check_quantized_runs`)."""
        from inc_torch._inspect import quantized_ops
        from inc_torch.ptq._capture import check_runs, eval_copy

        batch = next(dataset.inputs(limit=1))  # Dataset.inputs raises DatasetError itself when it holds none
        example = to_inputs(batch, float_dtype(quantized))
        what = "the first batch of the dataset"
        try:
            check_returned_model(quantized, example, "dynamic", model, frozenset(quantized_ops(quantized)), batch=what)
        except UnsupportedModelError:
            if quantized is not model:
                check_runs(eval_copy(model), example, what)  # DatasetError: the batch does not fit the model itself
            raise
        if not example[1]:
            # inc.save traces a model TorchScript cannot compile (a DLRM's list arithmetic) on the batch it ran
            setattr(quantized, EXAMPLE_ATTR, example)

    def op_errors(self, model: Any, config: QuantConfig, *, calibration: Any | None, dataset: Dataset) -> dict[str, float]:
        from inc_torch.ptq._op_errors import op_errors

        model = _check_model(model)
        fmt, ops = self._ops(model, config)
        with framework_errors("Measuring per-op errors", fmt, model, frozenset(op.name for op in ops)):
            if config.approach == "static" and calibration is not None:
                model, calibration = unwrap(model, config, calibration)
            from inc_torch.ptq._bf16 import int8_view

            return op_errors(model, int8_view(config), ops, calibration, dataset, activations=self.dynamic_activations)

    def weights_digest(self, model: Any) -> str | None:
        if not isinstance(model, (nn.Module, torch.export.ExportedProgram)):
            return super().weights_digest(model)
        model = _check_model(model)
        # bytes of every parameter and buffer (bfloat16 has no numpy dtype: hashed as raw bytes)
        return array_digest(
            [(f"{name}|{tensor.dtype}", _raw_bytes(tensor)) for name, tensor in model.state_dict(keep_vars=False).items()
             if isinstance(tensor, torch.Tensor)]
        )

    def int8_op_counts(self, model: Any) -> dict[str, int] | None:
        """Per op type, the ops of a quantized model that compute on INT8 data (see :mod:`inc_torch._int8_ops`)."""
        from inc_torch._int8_ops import int8_op_counts

        return int8_op_counts(model)

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
