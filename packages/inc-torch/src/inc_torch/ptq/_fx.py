"""Static INT8 through torch.ao's FX graph mode with the x86 backend (FBGEMM/oneDNN quantized modules)."""

from __future__ import annotations

import copy
import functools
import logging
import weakref
from typing import Any

import torch
from torch import nn

from inc_core._quant_config import QuantConfig
from inc_core.backend import Op
from inc_torch._compat import quiet
from inc_torch._parametrized import fold_parametrizations
from inc_torch.ptq._calibration import TorchCalibration, load_statistics
from inc_torch.ptq._capture import fx_prepare, positional
from inc_torch.ptq._conv1d import FBGEMM_DEPTHWISE_GROUPS, is_depthwise_conv1d
from inc_torch.ptq._dynamic import lookup_qconfig, tied_lookups
from inc_torch.ptq._fx_ops import FxOp, apply_fx_settings, fx_ops
from inc_torch.ptq._grouped_conv import miscomputed_grouped_convs
from inc_torch.ptq._kept_float import KeptFloat, keep_float
from inc_torch.ptq._lookups import contiguous_lookups
from inc_torch.ptq._observers import FxActivationObserver, FxWeightObserver
from inc_torch.ptq._ops import lookup_kept_in_float
from inc_torch.ptq._settings import OpSettings, plan
from inc_torch.ptq._weight_readers import weights_read_without_calls

__all__ = [
    "base_mapping", "integer_ops", "onednn_depthwise_conv1d", "op_table", "qconfig", "qconfig_mapping", "quantize_fx",
    "EXAMPLE_ATTR",
]

log = logging.getLogger("inc")

# Attribute holding the example inputs on returned models, used to save them.
EXAMPLE_ATTR = "_inc_example_inputs"

# Ops the default x86 mapping quantizes with a histogram observer but that describe() does not list;
# they stay FP32 so that every INT8 op is one the tuning strategies can see and fall back. Embedding
# lookups are FP32 by type too, and quantized by name where describe lists them (``lookup`` ops): the QAT
# mapping would swap them for torch.ao's QAT Embedding, which refuses any weight qscheme but float_qparams
# (an AssertionError in prepare_qat_fx for every model with an nn.Embedding).
_UNLISTED = (
    nn.Embedding,
    nn.EmbeddingBag,
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


def base_mapping(settings: OpSettings, *, qat_qconfig: Any = None) -> Any:
    """The x86 QConfigMapping with inc's global qconfig (or ``qat_qconfig``), unlisted op kinds in FP32."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping, get_default_qconfig_mapping

    with quiet():
        mapping = get_default_qat_qconfig_mapping("x86") if qat_qconfig is not None else get_default_qconfig_mapping("x86")
    mapping.set_global(qat_qconfig if qat_qconfig is not None else qconfig(settings))
    for kind in _UNLISTED:
        mapping.set_object_type(kind, None)
    return mapping


# model -> (its module structure, its op table): tracing once serves describe, calibrate and every trial.
_TABLES: weakref.WeakKeyDictionary[nn.Module, tuple[Any, dict[str, FxOp]]] = weakref.WeakKeyDictionary()


def op_table(model: nn.Module) -> dict[str, FxOp]:
    """Name -> op, for every op the x86 FX flow quantizes in ``model`` (see :mod:`inc_torch.ptq._fx_ops`)."""
    structure = (type(model).forward, tuple((name, type(m)) for name, m in model.named_modules()))
    cached = _TABLES.get(model)
    if cached is not None and cached[0] == structure:
        return cached[1]
    ops = fx_ops(model, base_mapping(OpSettings.of(QuantConfig(format="fx"))))
    lookups = tuple(entry.op.name for entry in ops if entry.role == "lookup")
    kept = {**lookup_kept_in_float(model, lookups), **weights_read_without_calls(model, lookups)}
    table = {entry.op.name: entry for entry in ops if entry.op.name not in kept}
    _TABLES[model] = (structure, table)
    return table


def integer_ops(table: dict[str, FxOp], integer: frozenset[str]) -> list[str]:
    """The ops of ``table`` that make or read integer tensors in calibration (``ids + 1`` before a lookup, a hash
    of indices): nothing there is an activation to quantize. Lookups read indices by design and are not listed."""
    return [
        name for name, entry in table.items()
        if entry.role != "lookup" and (entry.node in integer or any(read in integer for read in entry.reads))
    ]


def qconfig_mapping(
    config: QuantConfig, ops: tuple[Op, ...], table: dict[str, FxOp], *, float_only: tuple[str, ...] = ()
) -> Any:
    """The x86 QConfigMapping with inc observers, per-op overrides and FP32 fallbacks.

    Fixed-range ops (sigmoid, hardsigmoid) keep torch.ao's fixed qparams and shared ops their input's
    range; their only setting is being excluded. ``float_only``: ops kept FP32 whatever the config says.
    """
    default, per_op = plan(config, ops)
    per_op.update({name: None for name in float_only})
    # lookups are FP32 by type in the base mapping: each one quantized is set by name
    chosen: dict[str, Any] = {op.name: lookup_qconfig() for op in ops if table[op.name].role == "lookup"}
    for name, settings in per_op.items():
        if settings is None:
            chosen[name] = None
        elif table[name].role in ("weighted", "activation"):
            chosen[name] = qconfig(settings)
    return apply_fx_settings(base_mapping(default), table, chosen)




def onednn_depthwise_conv1d(model: nn.Module, table: dict[str, FxOp], *, log_them: bool = True) -> list[str]:
    """Depthwise Conv1d layers that torch's x86 engine would run on oneDNN (few groups): kept FP32 on FX.

    torch.ao's INT8 depthwise conv1d on oneDNN stalls on some shapes with 2 threads (see
    :func:`~inc_torch.ptq._conv1d.is_depthwise_conv1d`; measured on an AMD EPYC with VNNI, 1 thread and FBGEMM's
    kernel fine). PT2E keeps every depthwise Conv1d FP32 alike. Neither lists them among the ops it quantizes;
    ``log_them`` says so in the log when a model is quantized.
    """
    found = []
    for name in table:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if is_depthwise_conv1d(module) and module.groups <= FBGEMM_DEPTHWISE_GROUPS:
            found.append(name)
    if found and log_them:
        log.info(
            "%d depthwise Conv1d layer(s) stay FP32 on format='fx' (torch's oneDNN INT8 depthwise conv1d can stall "
            "with several threads; those of more than %d channels run on FBGEMM, in INT8): %s",
            len(found), FBGEMM_DEPTHWISE_GROUPS, ", ".join(found[:5]),
        )
    return found


def reduce_depthwise_weights(prepared: torch.fx.GraphModule) -> list[str]:
    """7-bit weights for the convs that run on FBGEMM's depthwise kernels; returns their names.

    Those kernels add pairs of u8 x s8 products in int16 (``vpmaddubsw``), which saturates with 8-bit
    activations and full-range int8 weights: on torchvision's MobileNetV2 15 of 17 depthwise convs were off
    by up to 100 quantization steps, and the FX output cosine fell below plain torch.ao's (whose x86
    observers reduce every activation to 7 bits instead). One bit less on these weights (9 per channel,
    per-channel scales) keeps every activation at 8 bits and measured better than 7-bit activations there.
    Changes the qconfig that ``convert_fx`` builds the weight observers from.
    """
    reduced = []
    for name, module in prepared.named_modules():
        conv = module[0] if isinstance(module, nn.Sequential) and len(module) else module  # fused conv(+bn)(+relu)
        qconfig = getattr(module, "qconfig", None)
        if not isinstance(conv, nn.modules.conv._ConvNd) or conv.groups <= FBGEMM_DEPTHWISE_GROUPS or qconfig is None:
            continue
        per_channel = bool(getattr(qconfig.weight(), "per_channel", True))
        module.qconfig = qconfig._replace(weight=FxWeightObserver.with_args(per_channel=per_channel, reduce_range=True))
        reduced.append(name)
    return reduced


def quantize_fx(
    model: nn.Module, config: QuantConfig, ops: tuple[Op, ...], calibration: TorchCalibration, *, inplace: bool
) -> torch.fx.GraphModule:
    """Prepare (trace + fuse + observers), fill observers from ``calibration``, convert to quantized modules."""
    from torch.ao.quantization.quantize_fx import convert_fx

    work = fold_parametrizations((model if inplace else copy.deepcopy(model)).eval())
    table = op_table(model)
    integer = tuple(integer_ops(table, calibration.integer))
    if integer:
        log.info("%d op(s) compute on integer tensors and stay FP32: %s", len(integer), ", ".join(integer[:5]))
    float_only = (*integer, *onednn_depthwise_conv1d(work, table), *miscomputed_grouped_convs(work, table))
    mapping = qconfig_mapping(config, ops, table, float_only=float_only)
    default, per_op = plan(config, ops)
    per_op.update({name: None for name in float_only})
    for name, settings in per_op.items():
        if settings is None and table[name].kind == "module" and table[name].role not in ("weighted", "lookup"):
            keep_float(work, name)
    for scope in calibration.kept_float:  # modules FX cannot quantize, found (and calibrated as opaque) by calibrate
        keep_float(work, scope)
    prepared = fx_prepare(work, mapping, positional(work, calibration.example), leaves=(KeptFloat,))
    reduce_depthwise_weights(prepared)
    load_statistics(prepared, calibration)
    lookups = [name for name in table if table[name].role == "lookup" and per_op.get(name, default) is not None]
    tied = tied_lookups(work, lookups)  # before conversion: the float modules still share their weight
    with quiet():
        converted = convert_fx(prepared)
    contiguous_lookups(converted)
    for first, *others in tied:  # one quantized table, not a copy per lookup
        for name in others:
            converted.set_submodule(name, converted.get_submodule(first))
    setattr(converted, EXAMPLE_ATTR, calibration.example)
    return converted
