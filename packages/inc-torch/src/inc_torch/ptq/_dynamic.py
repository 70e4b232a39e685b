"""Dynamic INT8: Linear and recurrent layers swapped for torch.ao's dynamically quantized modules, embedding
tables for its quantized lookups (8 bits per row).

The activation range of the dynamic Linear layers is a choice (``DYNAMIC_ACTIVATIONS``) made once when a
model is quantized: ``"full_range"`` (8-bit activations, needs int8 dot products that accumulate in int32:
AVX512-VNNI, AVX-VNNI or AMX-INT8), ``"reduce_range"`` (7-bit activations, correct on every x86 CPU), or
``"auto"`` (full range where the quantizing CPU has VNNI/AMX). The choice lives in the modules themselves,
so it travels with a saved TorchScript model; :func:`activation_range` reads it back and
:func:`use_reduced_range` switches a loaded model to 7 bits on a CPU that cannot run 8.
"""

from __future__ import annotations

import collections
import copy
import functools
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inc_core._quant_config import QuantConfig
from inc_core.backend import Op
from inc_core.errors import ConfigError
from inc_torch._compat import quiet
from inc_torch._hf import CONV1D_AS_LINEAR_ATTR, CONV1D_TYPE, is_hf_conv1d, linearize_conv1d
from inc_torch._parametrized import fold_parametrizations
from inc_torch.ptq._lookups import contiguous_lookups
from inc_torch.ptq._ops import LOOKUP_NAMES, LOOKUP_TYPES
from inc_torch.ptq._settings import plan
from inc_torch.ptq._weight_readers import keep_to_module_path

__all__ = [
    "DYNAMIC_ACTIVATIONS",
    "activation_range",
    "check_dynamic_activations",
    "cpu_flags",
    "dynamic_qconfig",
    "full_range_activations",
    "has_vnni",
    "lookup_qconfig",
    "tied_lookups",
    "quantize_dynamic",
    "quantize_one",
    "resolve_activation_range",
    "use_reduced_range",
]

log = logging.getLogger("inc")

DYNAMIC_ACTIVATIONS = ("auto", "full_range", "reduce_range")
# CPU flags of the int8 dot-product instructions that accumulate u8 x s8 products straight into int32.
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
# torch.ao's dynamic Linear quantizes activations to 7 bits from serialization version 4 on; earlier
# versions call the kernel with its default, full 8-bit range.
_FULL_RANGE_VERSION = 3
_REDUCED_RANGE_VERSION = 4


def _read_flags(cpuinfo: Path) -> frozenset[str]:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The ``flags`` of this CPU from ``/proc/cpuinfo`` (empty where it cannot be read, e.g. not Linux)."""
    return _read_flags(Path("/proc/cpuinfo"))


def has_vnni(cpuinfo: Path | None = None) -> bool:
    """Whether this CPU (or the one ``cpuinfo`` describes) has VNNI int8 dot products (AVX512-VNNI, AVX-VNNI, AMX-INT8).

    False where the flags cannot be read, which keeps the conservative 7-bit activations.
    """
    flags = cpu_flags() if cpuinfo is None else _read_flags(cpuinfo)
    return not VNNI_FLAGS.isdisjoint(flags)


def check_dynamic_activations(value: Any) -> str:
    """Validate a ``dynamic_activations`` setting.

    Raises:
        ConfigError: not one of :data:`DYNAMIC_ACTIVATIONS`.
    """
    if not isinstance(value, str) or value not in DYNAMIC_ACTIVATIONS:
        raise ConfigError(
            f"TorchBackend: dynamic_activations must be one of {', '.join(map(repr, DYNAMIC_ACTIVATIONS))}, got {value!r}. "
            "'reduce_range' (7-bit activations) runs correctly on every x86 CPU; 'full_range' (8-bit) needs "
            "AVX512-VNNI, AVX-VNNI or AMX-INT8 where the model runs; 'auto' picks full_range on such a CPU."
        )
    return value


def resolve_activation_range(choice: str) -> str:
    """``"full_range"`` or ``"reduce_range"`` for a ``dynamic_activations`` setting on this CPU.

    Raises:
        ConfigError: ``"full_range"`` asked on a CPU without VNNI/AMX, where the model returned would
            overflow its int16 accumulation.
    """
    choice = check_dynamic_activations(choice)
    if choice == "auto":
        return "full_range" if has_vnni() else "reduce_range"
    if choice == "full_range" and not has_vnni():
        raise ConfigError(
            "dynamic_activations='full_range' needs int8 dot products that accumulate in int32 (CPU flags "
            f"{', '.join(sorted(VNNI_FLAGS))}); this CPU has none of them, so the 8-bit activations of the model "
            "would overflow here. Use dynamic_activations='reduce_range' (or 'auto'), or quantize on the CPU "
            "the model will run on."
        )
    return choice


def _dynamic_linears(model: nn.Module) -> list[nn.Module]:
    """The qint8 dynamic Linear layers of an eager or TorchScript model."""
    found = []
    for module in model.modules():
        if isinstance(module, torch.jit.ScriptModule):
            qualified = module._c._type().qualified_name()
            if ".quantized.dynamic." in qualified and qualified.endswith(".Linear") and hasattr(module, "version"):
                found.append(module)
        elif isinstance(module, torch.ao.nn.quantized.dynamic.Linear) and module._packed_params.dtype == torch.qint8:
            found.append(module)
    return found


def activation_range(model: nn.Module) -> str | None:
    """``"full_range"`` when a dynamic Linear of ``model`` quantizes activations to 8 bits, ``"reduce_range"``
    when they all use 7 bits, ``None`` when the model has no dynamic Linear."""
    layers = _dynamic_linears(model)
    if not layers:
        return None
    return "full_range" if any(int(m.version) < _REDUCED_RANGE_VERSION for m in layers) else "reduce_range"


def full_range_activations(model: nn.Module) -> nn.Module:
    """Make every qint8 dynamic Linear of ``model`` quantize its activations to the full u8 range.

    torch.ao's dynamic Linear passes ``reduce_range=True`` to ``quantized::linear_dynamic``, so its
    activations get 7 bits: without VNNI the x86 kernels add pairs of u8 x s8 products in saturating
    int16 (vpmaddubsw), and 255 * 127 * 2 would overflow. VNNI (vpdpbusd) and AMX accumulate in int32,
    so the eighth bit is free there and halves the activation rounding error (all-MiniLM-L6-v2
    embeddings: cosine to FP32 from 0.979 to 0.993). The layers keep their type (TorchScript saving,
    ``quantized_ops`` and isinstance checks see the stock module): the module's own pre-version-4 branch
    calls the kernel with its default, full range. Loading a version-4 ``state_dict`` into a layer
    resets it to 7 bits. Changes ``model`` in place and returns it.
    """
    for module in _dynamic_linears(model):
        module.version = _FULL_RANGE_VERSION
    return model


def use_reduced_range(model: nn.Module) -> int:
    """Switch every full-range dynamic Linear of ``model`` (eager or TorchScript) to 7-bit activations.

    Returns:
        How many layers were switched.
    """
    switched = 0
    for module in _dynamic_linears(model):
        if int(module.version) < _REDUCED_RANGE_VERSION:
            module.version = _REDUCED_RANGE_VERSION
            switched += 1
    return switched


def dynamic_qconfig(granularity: str) -> Any:
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

    return per_channel_dynamic_qconfig if granularity == "per_channel" else default_dynamic_qconfig


def lookup_qconfig() -> Any:
    """The qconfig of an embedding table: 8 bits per row with a float scale and offset (the only one torch.ao's
    quantized lookups take)."""
    from torch.ao.quantization import float_qparams_weight_only_qconfig

    return float_qparams_weight_only_qconfig


def _spec(config: QuantConfig, ops: tuple[Op, ...]) -> dict[str, Any]:
    default, per_op = plan(config, ops)
    spec: dict[str, Any] = {}
    for op in ops:
        settings = per_op.get(op.name, default)
        if settings is None:
            continue
        if op.op_type in LOOKUP_NAMES:
            spec[op.name] = lookup_qconfig()
            continue
        # recurrent kernels take per-tensor weights only
        granularity = settings.granularity if op.op_type in ("Linear", CONV1D_TYPE) else "per_tensor"
        spec[op.name] = dynamic_qconfig(granularity)
    return spec


def quantize_dynamic(
    model: nn.Module, config: QuantConfig, ops: tuple[Op, ...], *, inplace: bool, activations: str = "auto"
) -> nn.Module:
    """Weights to int8 ahead of time; activations quantized per batch at run time. No tracing needed.

    Args:
        activations: one of :data:`DYNAMIC_ACTIVATIONS`, the activation range of the dynamic Linear layers.

    Raises:
        ConfigError: ``activations="full_range"`` on a CPU without VNNI/AMX.
    """
    chosen = resolve_activation_range(activations)
    work = fold_parametrizations((model if inplace else copy.deepcopy(model)).eval())
    spec = _spec(config, ops)
    # HF Conv1D layers become the nn.Linear they compute, which torch.ao's dynamic Linear replaces.
    swapped = linearize_conv1d(work, tuple(name for name in spec))
    tied = tied_lookups(work, spec)
    with quiet():
        quantized = torch.ao.quantization.quantize_dynamic(work, spec, dtype=torch.qint8, inplace=True)
    contiguous_lookups(quantized)
    for first, *others in tied:
        for name in others:
            quantized.set_submodule(name, quantized.get_submodule(first))
    if swapped:
        setattr(quantized, CONV1D_AS_LINEAR_ATTR, tuple(swapped))
    keep_to_module_path(quantized)
    _log_layers_kept(model, ops)
    if chosen == "full_range":
        full_range_activations(quantized)
    if _dynamic_linears(quantized):
        log.info("dynamic Linear activations: %s (dynamic_activations=%r)", chosen, activations)
    return quantized


def tied_lookups(model: nn.Module, names: Any) -> list[list[str]]:
    """Groups of the lookups ``names`` that share one weight (T5's ``shared``, ``encoder.embed_tokens`` and
    ``decoder.embed_tokens``): torch.ao would quantize a copy for each, so they get one quantized table again."""
    by_weight: dict[int, list[str]] = collections.defaultdict(list)
    for name in names:
        module = model.get_submodule(name)
        if type(module) in LOOKUP_TYPES:
            by_weight[id(module.weight)].append(name)
    groups = []
    for names in by_weight.values():
        kinds = {type(model.get_submodule(name)) for name in names}
        if len(names) > 1 and len(kinds) == 1:
            groups.append(names)
    return groups


def _log_layers_kept(model: nn.Module, ops: tuple[Op, ...]) -> None:
    from inc_torch.ptq._ops import DYNAMIC_TYPES, kept_in_float

    listed = {op.name for op in ops}
    candidates = tuple(
        name for name, module in model.named_modules() if name and name not in listed and type(module) in DYNAMIC_TYPES
    )
    by_reason: collections.defaultdict[str, list[str]] = collections.defaultdict(list)
    for name, reason in kept_in_float(model, candidates).items():
        by_reason[reason].append(name)
    for reason, names in by_reason.items():
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        log.info("%d layer(s) stay FP32 (%s): each %s", len(names), shown, reason)


def quantize_one(module: nn.Module, granularity: str, activations: str = "auto") -> nn.Module:
    """A dynamically quantized copy of a single layer (for per-op error measurement)."""
    holder = nn.Module()
    holder.add_module("layer", copy.deepcopy(module))
    if is_hf_conv1d(module):
        linearize_conv1d(holder)
    gran = granularity if isinstance(holder.layer, nn.Linear) else "per_tensor"
    with quiet():
        torch.ao.quantization.quantize_dynamic(holder, {"layer": dynamic_qconfig(gran)}, dtype=torch.qint8, inplace=True)
    if resolve_activation_range(activations) == "full_range":
        full_range_activations(holder)
    layer: nn.Module = holder.get_submodule("layer")
    return layer
