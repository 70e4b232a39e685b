"""Per-op output error of the INT8 version of each op against FP32, for the ``mse`` tuning strategy.

Each op is measured alone on the FP32 model's real inputs to it: static ops recompute their output from
fake-quantized input and weight (inc-core's qparams from the calibration histograms, torch's fake-quant
kernels, which round like the INT8 kernels); dynamic ops run torch.ao's dynamically quantized layer; embedding
tables look up rows rounded to 8 bits per row.
Errors do not compound through the network, so they rank the ops by their own sensitivity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from inc_core._dataset import Dataset
from inc_core._quant_config import QuantConfig
from inc_core.backend import Op
from inc_core.calibration import compute_qparams, weight_qparams
from inc_core.errors import CalibrationError, DatasetError
from inc_torch._exported import hf_conv1d_call, is_exported_graph
from inc_torch._exported import module_path as _module_path
from inc_torch._hf import linearize_conv1d
from inc_torch._inputs import float_dtype, to_inputs
from inc_torch.ptq._calibration import TorchCalibration
from inc_torch.ptq._capture import eval_copy
from inc_torch.ptq._conv_transpose import subpixel_weight, transposed_weight
from inc_torch.ptq._dynamic import quantize_one
from inc_torch.ptq._ops import LOOKUP_TYPES
from inc_torch.ptq._settings import OpSettings, plan

__all__ = ["op_errors"]

# Ops measured one by one: the weighted layers static paths quantize, the layers dynamic paths swap.
_MEASURED = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear, nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell, *LOOKUP_TYPES,
)


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _fake_weight(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    qp = weight_qparams(weight.detach().float().cpu().numpy(), axis=0 if per_channel else None)
    scale = torch.from_numpy(qp.scale.reshape(-1).copy())
    if per_channel:
        zero = torch.zeros(scale.shape, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight.float(), scale, zero, 0, -128, 127).to(weight.dtype)
    return torch.fake_quantize_per_tensor_affine(weight.float(), float(scale[0]), 0, -128, 127).to(weight.dtype)


def _fake_transposed_weight(module: nn.Module, per_channel: bool) -> torch.Tensor:
    """A transposed convolution's weight as PT2E runs it: quantized per output channel of its sub-pixel conv2d
    (one scale per output channel and phase, see :mod:`inc_torch.ptq._conv_transpose`)."""
    return _fake_transposed(module.weight, tuple(module.stride), module.groups, per_channel)  # type: ignore[arg-type]


def _fake_transposed(weight: torch.Tensor, stride: tuple[int, ...], groups: int, per_channel: bool) -> torch.Tensor:
    one_d = weight.dim() == 3
    work = weight.detach().float()
    work = work.unsqueeze(2) if one_d else work
    pair = (1, int(stride[0])) if one_d else (int(stride[0]), int(stride[1]))
    kernel = (int(work.shape[2]), int(work.shape[3]))
    phased = _fake_weight(subpixel_weight(work, pair, groups), per_channel)
    restored = transposed_weight(phased, pair, groups, kernel)
    return (restored.squeeze(2) if one_d else restored).to(weight.dtype)


def _lookup_simulator(module: nn.Module) -> Callable[..., Any]:
    """The lookup computed from its table rounded to 8 bits per row, as every path stores it (torch.ao's
    float_qparams on FX/dynamic, :mod:`inc_torch.ptq._pt2e_tables` on PT2E), through the layer's own forward:
    every bag mode, and a subclass's own arithmetic (a scaled word embedding), as the quantized model computes."""
    from inc_torch.ptq._pt2e_tables import rows_8bit

    codes, scale, low = rows_8bit(module.weight)  # type: ignore[arg-type]
    rounded = nn.Parameter(codes.to(scale.dtype) * scale + low, requires_grad=False)

    def simulate(*args: Any, **kwargs: Any) -> Any:
        original = module._parameters["weight"]
        module._parameters["weight"] = rounded
        try:
            return module.forward(*args, **kwargs)  # forward itself: the measuring hook does not run again
        finally:
            module._parameters["weight"] = original

    return simulate


def _static_simulator(module: nn.Module, settings: OpSettings, calibration: TorchCalibration, name: str) -> Callable[..., Any] | None:
    key = calibration.op_inputs.get(name)
    histogram = calibration.histograms.get(key) if key else None
    if histogram is None:
        return None  # the op never ran on the calibration data: it contributes no error
    lo, hi = histogram.range(settings.calibration, percentile=settings.percentile, dtype="uint8", scheme=settings.scheme)
    qp = compute_qparams(lo, hi, dtype="uint8", scheme=settings.scheme)
    scale, zero = float(qp.scale), int(qp.zero_point)
    per_channel = settings.granularity == "per_channel"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        weight = _fake_transposed_weight(module, per_channel)
    else:
        weight = _fake_weight(module.weight, per_channel)  # type: ignore[arg-type]

    def simulate(x: torch.Tensor) -> torch.Tensor:
        xq = torch.fake_quantize_per_tensor_affine(x.float(), scale, zero, 0, 255).to(x.dtype)
        if isinstance(module, nn.Linear):
            return F.linear(xq, weight, module.bias)
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            transposed = F.conv_transpose1d if isinstance(module, nn.ConvTranspose1d) else F.conv_transpose2d
            return transposed(  # type: ignore[operator]
                xq, weight, module.bias, module.stride, module.padding, module.output_padding, module.groups, module.dilation
            )
        return module._conv_forward(xq, weight, module.bias)  # type: ignore[operator]

    return simulate


def op_errors(
    model: nn.Module,
    config: QuantConfig,
    ops: tuple[Op, ...],
    calibration: TorchCalibration | None,
    dataset: Dataset,
    *,
    activations: str = "auto",
) -> dict[str, float]:
    """Mean squared error of each quantized op's output vs FP32, over up to ``config.calib_samples`` samples.

    ``activations`` is the backend's ``dynamic_activations`` setting, so that dynamic ops are measured
    with the activation range the quantized model will use.

    Raises:
        CalibrationError: static config without a calibration.
        DatasetError: no data, or data the model cannot take.
    """
    if config.approach == "static" and calibration is None:
        raise CalibrationError("op_errors for a static config needs the calibration from calibrate().")
    work = eval_copy(model)
    if is_exported_graph(work):
        return _program_op_errors(work, config, ops, calibration, dataset)
    linearize_conv1d(work)  # HF Conv1D is measured as the Linear the quantized model runs
    modules = dict(work.named_modules())
    default, per_op = plan(config, ops)
    sums = {op.name: 0.0 for op in ops}
    counts = {op.name: 0 for op in ops}
    handles = []
    for op in ops:
        settings = per_op.get(op.name, default)
        if settings is None:
            continue  # kept in FP32: no quantization error
        module = modules.get(op.name)
        if not isinstance(module, _MEASURED):
            continue  # activations, add/mul, pooling (FX): no weight, rounding only; measured through their consumers
        quantized: Callable[..., Any] | None
        # an embedding table is quantized alike by both approaches (weights only), and called with all its arguments
        lookup = isinstance(module, LOOKUP_TYPES)
        whole_call = config.approach == "dynamic" or lookup
        if lookup:
            quantized = _lookup_simulator(module)
        elif whole_call:
            quantized = quantize_one(module, settings.granularity, activations)
        elif calibration is not None:
            quantized = _static_simulator(module, settings, calibration, op.name)
        else:
            quantized = None
        if quantized is None:
            continue

        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, *, name: str = op.name,
                 fn: Callable[..., Any] = quantized, whole_call: bool = whole_call) -> None:
            reference = _first_tensor(output)
            approx = _first_tensor(fn(*args, **kwargs) if whole_call else fn(args[0]))
            if reference is None or approx is None:
                return
            sums[name] += float(((approx.float() - reference.float()) ** 2).sum())
            counts[name] += reference.numel()

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    dtype = float_dtype(work)
    try:
        for index, batch in enumerate(dataset.inputs(limit=config.calib_samples)):
            args, kwargs = to_inputs(batch, dtype)
            try:
                with torch.no_grad():
                    work(*args, **kwargs)
            except Exception as exc:
                raise DatasetError(f"op_errors: batch {index} does not fit the model: {type(exc).__name__}: {exc}") from exc
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / counts[name] if counts[name] else 0.0) for name in sums}


# aten ops of a program's measured ops: (weight argument position, transposed); lookups read their table first.
_PROGRAM_WEIGHTED = {
    torch.ops.aten.conv1d.default: False,
    torch.ops.aten.conv2d.default: False,
    torch.ops.aten.linear.default: False,
    torch.ops.aten.conv_transpose1d.default: True,
    torch.ops.aten.conv_transpose2d.input: True,
}
_PROGRAM_LOOKUPS = (torch.ops.aten.embedding.default, torch.ops.aten.embedding_bag.padding_idx)
_CT_STRIDE, _CT_GROUPS = 3, 6  # argument positions of aten.conv_transpose{1,2}d


class _ProgramMeasure(torch.fx.Interpreter):
    """Runs a torch.export program in FP32 and, at each listed op, also computes that op from quantized inputs."""

    def __init__(self, graph_module: torch.fx.GraphModule, settings: dict[str, OpSettings], calibration: TorchCalibration) -> None:
        super().__init__(graph_module)
        self.settings = settings
        self.calibration = calibration
        self.sums = dict.fromkeys(settings, 0.0)
        self.counts = dict.fromkeys(settings, 0)

    def _activation(self, name: str, settings: OpSettings) -> tuple[float, int] | None:
        key = self.calibration.op_inputs.get(name)
        histogram = self.calibration.histograms.get(key) if key else None
        if histogram is None:
            return None
        lo, hi = histogram.range(settings.calibration, percentile=settings.percentile, dtype="uint8", scheme=settings.scheme)
        qp = compute_qparams(lo, hi, dtype="uint8", scheme=settings.scheme)
        return float(qp.scale), int(qp.zero_point)

    def run_node(self, n: torch.fx.Node) -> Any:
        output = super().run_node(n)
        name = _module_path(n) if n.op == "call_function" else None
        settings = self.settings.get(name) if name else None
        if settings is None or name is None or not isinstance(output, torch.Tensor):
            return output
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if n.target in _PROGRAM_LOOKUPS:
            from inc_torch.ptq._pt2e_tables import rows_8bit

            codes, scale, low = rows_8bit(args[0])
            approx = n.target(codes.to(scale.dtype) * scale + low, *args[1:], **kwargs)
        elif hf_conv1d_call(self.module, n):  # a transformers Conv1D: addmm(bias, x, weight [in, out])
            activation = self._activation(name, settings)
            if activation is None:
                return output
            x = args[1]
            xq = torch.fake_quantize_per_tensor_affine(x.float(), activation[0], activation[1], 0, 255).to(x.dtype)
            wq = _fake_weight(args[2].t(), settings.granularity == "per_channel").t()
            approx = n.target(args[0], xq, wq, *args[3:], **kwargs)
        elif n.target in _PROGRAM_WEIGHTED:
            activation = self._activation(name, settings)
            if activation is None:
                return output  # never ran on the calibration data: it contributes no error
            x, weight = args[0], args[1]
            xq = torch.fake_quantize_per_tensor_affine(x.float(), activation[0], activation[1], 0, 255).to(x.dtype)
            per_channel = settings.granularity == "per_channel"
            if _PROGRAM_WEIGHTED[n.target]:
                stride = args[_CT_STRIDE] if len(args) > _CT_STRIDE else (1,) * (weight.dim() - 2)
                groups = int(args[_CT_GROUPS]) if len(args) > _CT_GROUPS else 1
                wq = _fake_transposed(weight, tuple(stride), groups, per_channel)
            else:
                wq = _fake_weight(weight, per_channel)
            approx = n.target(xq, wq, *args[2:], **kwargs)
        else:
            return output
        approx = _first_tensor(approx)
        if approx is not None:
            self.sums[name] += float(((approx.float() - output.float()) ** 2).sum())
            self.counts[name] += output.numel()
        return output


def _program_op_errors(
    work: torch.fx.GraphModule, config: QuantConfig, ops: tuple[Op, ...], calibration: TorchCalibration | None, dataset: Dataset
) -> dict[str, float]:
    """:func:`op_errors` for a torch.export program (see :mod:`inc_torch._exported`): ops are graph nodes named by
    the module that called them, measured with an interpreter instead of module hooks."""
    if calibration is None:
        raise CalibrationError("op_errors for a static config needs the calibration from calibrate().")
    default, per_op = plan(config, ops)
    settings = {op.name: s for op in ops if (s := per_op.get(op.name, default)) is not None}
    measure = _ProgramMeasure(work, settings, calibration)
    dtype = float_dtype(work)
    spec = getattr(work, "_in_spec", None)
    for index, batch in enumerate(dataset.inputs(limit=config.calib_samples)):
        args, kwargs = to_inputs(batch, dtype)
        try:
            # the graph's placeholders take the inputs flattened as export saw them (keywords in its order)
            flat = torch.fx._pytree.tree_flatten_spec((args, kwargs), spec) if spec is not None else [*args, *kwargs.values()]
            with torch.no_grad():
                measure.run(*flat, enable_io_processing=False)
        except Exception as exc:
            raise DatasetError(f"op_errors: batch {index} does not fit the model: {type(exc).__name__}: {exc}") from exc
    names = [op.name for op in ops]
    return {name: (measure.sums.get(name, 0.0) / measure.counts[name] if measure.counts.get(name) else 0.0) for name in names}
