"""SmoothQuant for torch modules: rescale Linear inputs and weights on a deep copy before static INT8.

Which ``nn.Linear`` layers read which tensor is read off the captured graph (torch.export for PT2E,
FX symbolic tracing for FX), the way quantization will see the model. Linears reading the same
tensor share one scale (:func:`inc_core.calibration._smooth_quant.smooth_scales`, the max over
their weights); each weight's input columns are multiplied by it. The division of the input:

- folded into the ``nn.LayerNorm`` producing the tensor (weight and bias divided) when the
  Linears are its only readers: the FP32 model computes what it did, at no cost;
- otherwise (a residual branch also reads it, as in post-LayerNorm BERT blocks, or the producer
  is a GELU), with PT2E, by a multiply in front of the Linear (the layer becomes a
  :class:`SmoothedLinear`, which computes ``linear(x * (1/s), W * s, b)``) that stays in FP32
  while the Linear's quantized input is the rescaled one. FX keeps such layers as they are (its
  quantizer matches exact module types).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from inc_core._dataset import Dataset
from inc_core._quant_config import QuantConfig
from inc_core._smooth_quant_config import SmoothQuant
from inc_core.calibration._smooth_quant import ChannelAbsMax, input_channel_absmax, smooth_scales
from inc_core.errors import CalibrationError, DatasetError
from inc_torch._inputs import describe_inputs, float_dtype, to_inputs
from inc_torch.ptq._calibration import TorchCalibration, calibrate
from inc_torch.ptq._capture import eval_copy, export_graph

__all__ = ["SmoothedCalibration", "SmoothedLinear", "calibrate_smoothed", "smooth_module", "unwrap"]

log = logging.getLogger("inc")


class SmoothedLinear(nn.Linear):
    """An ``nn.Linear`` whose input is multiplied by ``inv_scale`` first (its weight already holds the scale)."""

    inv_scale: torch.Tensor

    @classmethod
    def from_linear(cls, linear: nn.Linear, inv_scale: torch.Tensor) -> SmoothedLinear:
        smoothed = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        smoothed.weight = linear.weight  # the (already scaled) parameters themselves, not copies
        smoothed.bias = linear.bias
        smoothed.register_buffer("inv_scale", inv_scale.to(device=linear.weight.device, dtype=linear.weight.dtype))
        return smoothed.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x * self.inv_scale, self.weight, self.bias)


@dataclass(eq=False)
class SmoothedCalibration:
    """What :meth:`TorchBackend.calibrate` returns for ``QuantConfig(smooth_quant=...)``.

    Attributes:
        smooth_quant: the setting this calibration belongs to.
        model: the rescaled deep copy (what is quantized instead of the user's model).
        calibration: the calibration of the rescaled model.
        folded: LayerNorm modules the scales went into.
        wrapped: Linear layers that multiply their input (no LayerNorm to fold into).
    """

    smooth_quant: SmoothQuant
    model: nn.Module = field(repr=False)
    calibration: TorchCalibration = field(repr=False)
    folded: tuple[str, ...] = ()
    wrapped: tuple[str, ...] = ()

    @property
    def format(self) -> str:
        return self.calibration.format


@dataclass
class _Group:
    """Linear layers reading one tensor, and the LayerNorm it can be folded into (if any)."""

    linears: list[str]
    layer_norm: str | None


def _target_name(node: torch.fx.Node) -> str:
    return getattr(node.target, "__name__", "").split(".")[0]


def _module_path(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    return str(list(stack.values())[-1][0]) if stack else None


def linear_groups(model: nn.Module, graph: torch.fx.GraphModule, fmt: str) -> list[_Group]:
    """The Linear layers of ``graph`` grouped by the tensor they read, with a foldable LayerNorm producer."""
    modules = dict(model.named_modules())

    def module_of(node: torch.fx.Node, kind: str) -> str | None:
        if fmt == "fx":
            name = str(node.target) if node.op == "call_module" else None
        else:
            name = _module_path(node) if node.op == "call_function" and _target_name(node) == kind else None
        wanted = nn.Linear if kind == "linear" else nn.LayerNorm
        return name if name is not None and type(modules.get(name)) is wanted else None

    calls: dict[str, int] = {}
    linear_nodes: dict[str, torch.fx.Node] = {}
    norm_nodes: dict[torch.fx.Node, str] = {}
    for node in graph.graph.nodes:
        if (name := module_of(node, "linear")) is not None:
            calls[name] = calls.get(name, 0) + 1
            linear_nodes[name] = node
        elif (name := module_of(node, "layer_norm")) is not None:
            calls[name] = calls.get(name, 0) + 1
            norm_nodes[node] = name
    by_input: dict[torch.fx.Node, list[str]] = {}
    for name, node in linear_nodes.items():
        if calls[name] == 1 and node.args and isinstance(node.args[0], torch.fx.Node):  # a layer called twice shares its weight
            by_input.setdefault(node.args[0], []).append(name)
    groups = []
    for source, names in by_input.items():
        norm = norm_nodes.get(source)
        readers = {linear_nodes[n] for n in names}
        foldable = (
            norm is not None
            and calls[norm] == 1
            and set(source.users) == readers
            and _affine_over(modules[norm], modules[names[0]])
        )
        groups.append(_Group(names, norm if foldable else None))
    return groups


def _affine_over(norm: nn.Module, linear: nn.Module) -> bool:
    assert isinstance(norm, nn.LayerNorm) and isinstance(linear, nn.Linear)
    return norm.weight is not None and tuple(norm.normalized_shape) == (linear.in_features,)


def _graph(model: nn.Module, example: Any, fmt: str) -> torch.fx.GraphModule:
    # The capture quantization uses: export for PT2E; for FX, plain tracing (Linear, LayerNorm stay leaves).
    return torch.fx.symbolic_trace(model) if fmt == "fx" else export_graph(model, example)


def _input_absmax(model: nn.Module, names: list[str], dataset: Dataset, samples: int) -> dict[str, torch.Tensor]:
    observers = {name: ChannelAbsMax(name) for name in names}
    handles = []
    for name in names:
        def record(module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            x = args[0].detach()
            observers[name].update(x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float().cpu().numpy())

        handles.append(model.get_submodule(name).register_forward_pre_hook(record))
    dtype = float_dtype(model)
    try:
        for index, batch in enumerate(dataset.inputs(limit=samples)):
            inputs = to_inputs(batch, dtype)
            args, kwargs = inputs
            try:
                with torch.no_grad():
                    model(*args, **kwargs)
            except CalibrationError:
                raise
            except Exception as exc:
                raise DatasetError(
                    f"Calibration batch {index} ({describe_inputs(inputs)}) does not fit the model: "
                    f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}."
                ) from exc
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.from_numpy(obs.result()) for name, obs in observers.items()}


def smooth_module(
    model: nn.Module, dataset: Dataset, config: QuantConfig, fmt: str
) -> tuple[nn.Module, list[str], list[str]]:
    """A rescaled deep copy of ``model``: (copy, LayerNorms folded into, Linears wrapped).

    Raises:
        CalibrationError: no Linear layer to smooth.
        DatasetError: a batch the model cannot take.
        UnsupportedModelError: the model cannot be captured for ``fmt``.
    """
    assert config.smooth_quant is not None
    work = eval_copy(model)
    first = next(iter(dataset.inputs(limit=config.calib_samples)), None)
    if first is None:
        raise DatasetError("Calibration data is empty; give at least one batch.")
    example = to_inputs(first, float_dtype(work))
    graph = _graph(work, example, fmt)
    groups = [g for g in linear_groups(work, graph, fmt) if g.layer_norm is not None or fmt == "pt2e"]
    if not groups:
        raise CalibrationError(
            f"SmoothQuant found no nn.Linear layer it can rescale in {type(model).__name__} (format={fmt!r}: "
            + ("no Linear reads a tensor only LayerNorm-produced" if fmt == "fx" else "no Linear called once")
            + "); set smooth_quant=None."
        )
    absmax = _input_absmax(work, [n for g in groups for n in g.linears], dataset, config.calib_samples)
    folded, wrapped = [], []
    with torch.no_grad():
        for group in groups:
            linears = [work.get_submodule(n) for n in group.linears]
            activation = torch.stack([absmax[n] for n in group.linears]).amax(dim=0).numpy()
            weights = [lin.weight.detach().float().cpu().numpy() for lin in linears]
            scales_np = smooth_scales(activation, input_channel_absmax(weights, in_axis=1), config.smooth_quant.alpha)
            for lin in linears:
                scales = torch.from_numpy(scales_np).to(lin.weight.device)
                lin.weight.mul_(scales.to(lin.weight.dtype))
            if group.layer_norm is not None:
                norm = work.get_submodule(group.layer_norm)
                scales = torch.from_numpy(scales_np).to(norm.weight.device)
                norm.weight.div_(scales.to(norm.weight.dtype))
                if norm.bias is not None:
                    norm.bias.div_(scales.to(norm.bias.dtype))
                folded.append(group.layer_norm)
                continue
            inverse = torch.from_numpy(1.0 / scales_np)
            for name, lin in zip(group.linears, linears):
                parent, _, leaf = name.rpartition(".")
                setattr(work.get_submodule(parent) if parent else work, leaf, SmoothedLinear.from_linear(lin, inverse))
                wrapped.append(name)
    log.info(
        "SmoothQuant alpha=%s: %d Linear layers rescaled (%d LayerNorms folded, %d layers with an input multiply)",
        config.smooth_quant.alpha, sum(len(g.linears) for g in groups), len(folded), len(wrapped),
    )
    return work, folded, wrapped


def calibrate_smoothed(model: nn.Module, dataset: Dataset, config: QuantConfig, fmt: str) -> SmoothedCalibration:
    """Rescale a copy of ``model``, then calibrate that copy (the data is read twice)."""
    assert config.smooth_quant is not None
    smoothed, folded, wrapped = smooth_module(model, dataset, config, fmt)
    calibration = calibrate(smoothed, dataset, config, fmt)
    return SmoothedCalibration(config.smooth_quant, smoothed, calibration, tuple(folded), tuple(wrapped))


def unwrap(model: nn.Module, config: QuantConfig, calibration: Any) -> tuple[nn.Module, Any]:
    """The model and calibration to quantize: the rescaled copy and its calibration under SmoothQuant.

    Raises:
        CalibrationError: the calibration belongs to another SmoothQuant setting than the config's.
    """
    given = calibration.smooth_quant if isinstance(calibration, SmoothedCalibration) else None
    if config.smooth_quant != given and calibration is not None:
        raise CalibrationError(
            f"The calibration was collected with smooth_quant={given!r} but the config asks for "
            f"smooth_quant={config.smooth_quant!r}; calibrate again with the config that is quantized "
            "(SmoothQuant rescales the model, so its statistics differ)."
        )
    if isinstance(calibration, SmoothedCalibration):
        return calibration.model, calibration.calibration
    return model, calibration
