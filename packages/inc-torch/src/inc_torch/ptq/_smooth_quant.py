"""SmoothQuant for torch modules: rescale Linear inputs and weights on a deep copy before static INT8.

Which ``nn.Linear`` layers read which tensor is read off the captured graph (torch.export for PT2E,
FX symbolic tracing for FX), the way quantization will see the model. Linears reading the same
tensor share one scale (:func:`inc_core.calibration._smooth_quant.smooth_scales`, the max over
their weights); each weight's input columns are multiplied by it. The division of the input:

- folded into the ``nn.LayerNorm`` producing the tensor (weight and bias divided) when the
  Linears are its only readers: the FP32 model computes what it did, at no cost;
- likewise into another normalization module with a per-channel ``weight`` (``nn.RMSNorm``, the
  ``*RMSNorm`` of Llama, Qwen2, Mistral, Gemma, T5's ``T5LayerNorm``): the fold is checked on a probe
  input before it is used (Gemma scales by ``1 + weight``, so its weight takes ``(1 + w) / s - 1``);
- into the rows of the Linear whose output is multiplied into the tensor (the ``up_proj`` of a gated
  MLP, ``down_proj(act(gate_proj(x)) * up_proj(x))``): dividing a factor's channel divides the product's;
- otherwise (a residual branch also reads it, as in post-LayerNorm BERT blocks, or the producer
  is a GELU), with PT2E, by a multiply in front of the Linear (the layer becomes a
  :class:`SmoothedLinear`, which computes ``linear(x * (1/s), W * s, b)``) that stays in FP32
  while the Linear's quantized input is the rescaled one. FX keeps such layers as they are (its
  quantizer matches exact module types).
"""

from __future__ import annotations

import copy
import logging
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from inc_core._dataset import Dataset
from inc_core._quant_config import QuantConfig
from inc_core._smooth_quant_config import SmoothQuant
from inc_core.calibration._smooth_quant import ChannelAbsMax, input_channel_absmax, smooth_scales
from inc_core.errors import CalibrationError, DatasetError
from inc_torch._hf import drop_label_inputs
from inc_torch._inputs import describe_inputs, float_dtype, to_inputs
from inc_torch._module_stack import module_path
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
        folded: modules the scales went into (normalizations, the Linear factor of a gated product).
        wrapped: Linear layers that multiply their input (nothing to fold into).
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
    """Linear layers reading one tensor, and the module producing it that the scales fold into (if any).

    ``fold_kind``: ``"layer_norm"`` (an nn.LayerNorm: weight and bias divided), ``"weight"`` / ``"one_plus_weight"``
    (another normalization, the form found on a probe: ``w / s``, or Gemma's ``1 + w``), ``"rows"`` (the Linear
    whose output is a factor of the input: its weight rows and bias divided).
    """

    linears: list[str]
    fold_into: str | None = None
    fold_kind: str | None = None


def _target_name(node: torch.fx.Node) -> str:
    return getattr(node.target, "__name__", "").split(".")[0]


def _norm_fold_kind(norm: nn.Module, channels: int) -> str | None:
    """How to fold scales into a normalization module, found on a probe input: None where no form is exact.

    A copy of ``norm`` gets random scales folded in each candidate form; the form whose output on a random
    input is the original output divided by the scales, channel by channel, is the one to use.
    """
    weight = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.numel() != channels:
        return None
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape):
        return None
    generator = torch.Generator().manual_seed(0)
    probe = (torch.randn(3, channels, generator=generator) * 2 + 0.5).to(weight.device, weight.dtype)
    scales = (torch.rand(channels, generator=generator) * 3 + 0.25).to(weight.device, weight.dtype)
    try:
        with torch.no_grad():
            expected = norm(probe) / scales
            for kind in ("weight", "one_plus_weight"):
                trial = copy.deepcopy(norm)
                _fold_into_norm(trial, scales, kind)
                got = trial(probe)
                if isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
                    return kind
    except Exception:  # noqa: BLE001 - a module that cannot run on a plain (rows, channels) tensor is not folded into
        return None
    return None


def _fold_into_norm(norm: nn.Module, scales: torch.Tensor, kind: str) -> None:
    weight = norm.weight
    if kind == "one_plus_weight":
        weight.copy_((1 + weight) / scales.to(weight.dtype) - 1)
    else:  # "layer_norm", "weight"
        weight.div_(scales.to(weight.dtype))
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(scales.to(bias.dtype))


def linear_groups(model: nn.Module, graph: torch.fx.GraphModule, fmt: str) -> list[_Group]:
    """The Linear layers of ``graph`` grouped by the tensor they read, with the module to fold their scales into."""
    modules = dict(model.named_modules())

    def module_of(node: torch.fx.Node, kind: str) -> str | None:
        if fmt == "fx":
            name = str(node.target) if node.op == "call_module" else None
        else:
            name = module_path(node) if node.op == "call_function" and _target_name(node) == kind else None
        wanted = nn.Linear if kind == "linear" else nn.LayerNorm
        return name if name is not None and type(modules.get(name)) is wanted else None

    calls: dict[str, int] = {}
    linear_nodes: dict[str, torch.fx.Node] = {}
    linear_of: dict[torch.fx.Node, str] = {}
    norm_nodes: dict[torch.fx.Node, str] = {}
    for node in graph.graph.nodes:
        if (name := module_of(node, "linear")) is not None:
            calls[name] = calls.get(name, 0) + 1
            linear_nodes[name] = node
            linear_of[node] = name
        elif (name := module_of(node, "layer_norm")) is not None:
            calls[name] = calls.get(name, 0) + 1
            norm_nodes[node] = name
    tied = _tied_parameters(model)
    by_input: dict[torch.fx.Node, list[str]] = {}
    for name, node in linear_nodes.items():
        # A layer called twice, or whose weight is another module's too (a language model's head tied to its
        # token embeddings), cannot take one input's scales without changing what the other use computes.
        if calls[name] == 1 and id(modules[name].weight) not in tied and node.args and isinstance(node.args[0], torch.fx.Node):
            by_input.setdefault(node.args[0], []).append(name)
    groups = []
    for source, names in by_input.items():
        readers = {linear_nodes[n] for n in names}
        group = _Group(names)
        if set(source.users) == readers:  # the Linears alone read it: rescaling it changes nothing else
            channels = modules[names[0]].in_features
            norm = norm_nodes.get(source)
            if norm is not None:
                if calls[norm] == 1 and _affine_over(modules[norm], modules[names[0]]) and not _holds_tied(modules[norm], tied):
                    group.fold_into, group.fold_kind = norm, "layer_norm"
            elif (factor := _factor_linear(source, linear_of, calls, channels, modules)) is not None:
                if not _holds_tied(modules[factor], tied):
                    group.fold_into, group.fold_kind = factor, "rows"
            elif (
                (producer := _producing_module(graph, source, fmt)) is not None
                and producer in modules
                and not _holds_tied(modules[producer], tied)
            ):
                kind = _norm_fold_kind(modules[producer], channels)
                if kind is not None:
                    group.fold_into, group.fold_kind = producer, kind
        groups.append(group)
    return groups


def _tied_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters the model holds under more than one name (tied weights)."""
    seen: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        seen[id(parameter)] = seen.get(id(parameter), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def _holds_tied(module: nn.Module, tied: set[int]) -> bool:
    """Whether a weight or bias the fold would divide is another module's too."""
    return any(id(getattr(module, name, None)) in tied for name in ("weight", "bias") if getattr(module, name, None) is not None)


def _producing_module(graph: torch.fx.GraphModule, source: torch.fx.Node, fmt: str) -> str | None:
    """The module whose call outputs ``source``, where the model calls it once (its weight serves no other input)."""
    if fmt == "fx":
        if source.op != "call_module":
            return None
        return str(source.target) if sum(1 for n in graph.graph.nodes if n.op == "call_module" and n.target == source.target) == 1 else None
    module = module_path(source)
    if not module:
        return None
    # torch.export keys each call of a module apart in nn_module_stack ("...@1" for its second call).
    call_keys = set()
    for node in graph.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack and module_path(node) == module:
            call_keys.add(list(stack.keys())[-1])
    return module if len(call_keys) == 1 else None


def _factor_linear(
    source: torch.fx.Node, linear_of: dict[torch.fx.Node, str], calls: dict[str, int], channels: int, modules: dict[str, nn.Module]
) -> str | None:
    """The Linear (called once, read by this product alone) whose output is one factor of ``source``, a product."""
    is_mul = (source.op == "call_function" and source.target in (operator.mul, torch.mul, torch.ops.aten.mul.Tensor))
    if not is_mul or len(source.args) != 2 or not all(isinstance(a, torch.fx.Node) for a in source.args):
        return None
    for arg in source.args:
        name = linear_of.get(arg)  # type: ignore[call-overload]
        if name is not None and calls[name] == 1 and set(arg.users) == {source} and modules[name].out_features == channels:  # type: ignore[union-attr]
            return name
    return None


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
    """A rescaled deep copy of ``model``: (copy, modules folded into, Linears wrapped).

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
    example = drop_label_inputs(model, to_inputs(first, float_dtype(work)))
    graph = _graph(work, example, fmt)
    groups = [g for g in linear_groups(work, graph, fmt) if g.fold_into is not None or fmt == "pt2e"]
    if not groups:
        raise CalibrationError(
            f"SmoothQuant found no nn.Linear layer it can rescale in {type(model).__name__} (format={fmt!r}: "
            + ("no Linear reads a tensor only a normalization or a gated product makes" if fmt == "fx" else "no Linear called once")
            + "); set smooth_quant=None."
        )
    absmax = _input_absmax(work, [n for g in groups for n in g.linears], dataset, config.calib_samples)
    # Every group's scales from the model as it is, before any fold changes a weight another group reads
    # (a gated MLP's up_proj is rescaled by its own group and by the next one's).
    all_scales = []
    for group in groups:
        activation = torch.stack([absmax[n] for n in group.linears]).amax(dim=0).numpy()
        weights = [work.get_submodule(n).weight.detach().float().cpu().numpy() for n in group.linears]
        all_scales.append(smooth_scales(activation, input_channel_absmax(weights, in_axis=1), config.smooth_quant.alpha))
    folded, wrapped = [], []
    with torch.no_grad():
        for group, scales_np in zip(groups, all_scales):
            linears = [work.get_submodule(n) for n in group.linears]
            for lin in linears:
                scales = torch.from_numpy(scales_np).to(lin.weight.device)
                lin.weight.mul_(scales.to(lin.weight.dtype))
            if group.fold_into is not None:
                producer = work.get_submodule(group.fold_into)
                scales = torch.from_numpy(scales_np).to(producer.weight.device)
                if group.fold_kind == "rows":
                    producer.weight.div_(scales.to(producer.weight.dtype)[:, None])
                    if producer.bias is not None:
                        producer.bias.div_(scales.to(producer.bias.dtype))
                else:
                    _fold_into_norm(producer, scales, str(group.fold_kind))
                folded.append(group.fold_into)
                continue
            inverse = torch.from_numpy(1.0 / scales_np)
            for name, lin in zip(group.linears, linears):
                parent, _, leaf = name.rpartition(".")
                setattr(work.get_submodule(parent) if parent else work, leaf, SmoothedLinear.from_linear(lin, inverse))
                wrapped.append(name)
    log.info(
        "SmoothQuant alpha=%s: %d Linear layers rescaled (%d folds into the layer making their input, %d layers with an input multiply)",
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
