"""Static INT8 through torch.ao's FX graph mode with the x86 backend (FBGEMM/oneDNN quantized modules)."""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from torch import nn

from inc_core._quant_config import QuantConfig
from inc_core.backend import Op
from inc_torch._calibration import TorchCalibration, load_statistics
from inc_torch._capture import fx_prepare, positional
from inc_torch._compat import quiet
from inc_torch._observers import FxActivationObserver, FxWeightObserver
from inc_torch._settings import OpSettings, plan

__all__ = ["qconfig", "qconfig_mapping", "quantize_fx", "EXAMPLE_ATTR"]

# Attribute holding the example inputs on returned models, used to save them.
EXAMPLE_ATTR = "_inc_example_inputs"

# Ops the default x86 mapping quantizes with a histogram observer but that describe() does not list;
# they stay FP32 so that every INT8 op is one the tuning strategies can see and fall back.
_UNLISTED = (
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.LayerNorm,
    nn.PReLU,
    torch.nn.functional.layer_norm,
    torch.conv_transpose1d,
    torch.conv_transpose2d,
    torch.conv_transpose3d,
)


@functools.cache
def qconfig(settings: OpSettings) -> Any:
    """The torch.ao QConfig for one op's settings."""
    from torch.ao.quantization import QConfig

    return QConfig(
        activation=FxActivationObserver.with_args(
            method=settings.calibration, percentile=settings.percentile, scheme=settings.scheme
        ),
        weight=FxWeightObserver.with_args(per_channel=settings.granularity == "per_channel"),
    )


def qconfig_mapping(config: QuantConfig, ops: tuple[Op, ...]) -> Any:
    """The x86 QConfigMapping with inc observers, per-op overrides and FP32 fallbacks."""
    from torch.ao.quantization import get_default_qconfig_mapping

    default, per_op = plan(config, ops)
    with quiet():
        mapping = get_default_qconfig_mapping("x86")
    mapping.set_global(qconfig(default))
    for kind in _UNLISTED:
        mapping.set_object_type(kind, None)
    for name, settings in per_op.items():
        mapping.set_module_name(name, None if settings is None else qconfig(settings))
    return mapping


def quantize_fx(
    model: nn.Module, config: QuantConfig, ops: tuple[Op, ...], calibration: TorchCalibration, *, inplace: bool
) -> torch.fx.GraphModule:
    """Prepare (trace + fuse + observers), fill observers from ``calibration``, convert to quantized modules."""
    from torch.ao.quantization.quantize_fx import convert_fx

    work = model if inplace else copy.deepcopy(model)
    work.eval()
    prepared = fx_prepare(work, qconfig_mapping(config, ops), positional(work, calibration.example))
    load_statistics(prepared, calibration)
    with quiet():
        converted = convert_fx(prepared)
    setattr(converted, EXAMPLE_ATTR, calibration.example)
    return converted
