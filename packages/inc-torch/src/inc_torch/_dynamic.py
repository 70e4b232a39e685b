"""Dynamic INT8: Linear and recurrent layers swapped for torch.ao's dynamically quantized modules."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from inc_core._quant_config import QuantConfig
from inc_core.backend import Op
from inc_torch._compat import quiet
from inc_torch._settings import plan

__all__ = ["dynamic_qconfig", "quantize_dynamic", "quantize_one"]


def dynamic_qconfig(granularity: str) -> Any:
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

    return per_channel_dynamic_qconfig if granularity == "per_channel" else default_dynamic_qconfig


def _spec(config: QuantConfig, ops: tuple[Op, ...]) -> dict[str, Any]:
    default, per_op = plan(config, ops)
    spec: dict[str, Any] = {}
    for op in ops:
        settings = per_op.get(op.name, default)
        if settings is None:
            continue
        # recurrent kernels take per-tensor weights only
        granularity = settings.granularity if op.op_type in ("Linear",) else "per_tensor"
        spec[op.name] = dynamic_qconfig(granularity)
    return spec


def quantize_dynamic(model: nn.Module, config: QuantConfig, ops: tuple[Op, ...], *, inplace: bool) -> nn.Module:
    """Weights to int8 ahead of time; activations quantized per batch at run time. No tracing needed."""
    work = model if inplace else copy.deepcopy(model)
    work.eval()
    spec = _spec(config, ops)
    with quiet():
        return torch.ao.quantization.quantize_dynamic(work, spec, dtype=torch.qint8, inplace=True)


def quantize_one(module: nn.Module, granularity: str) -> nn.Module:
    """A dynamically quantized copy of a single layer (for per-op error measurement)."""
    holder = nn.Module()
    holder.add_module("layer", copy.deepcopy(module))
    gran = granularity if isinstance(module, nn.Linear) else "per_tensor"
    with quiet():
        torch.ao.quantization.quantize_dynamic(holder, {"layer": dynamic_qconfig(gran)}, dtype=torch.qint8, inplace=True)
    layer: nn.Module = holder.get_submodule("layer")
    return layer
