"""Dynamic INT8: Linear and recurrent layers swapped for torch.ao's dynamically quantized modules."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inc_core._quant_config import QuantConfig
from inc_core.backend import Op
from inc_torch._compat import quiet
from inc_torch._settings import plan

__all__ = ["dynamic_qconfig", "full_range_activations", "has_vnni", "quantize_dynamic", "quantize_one"]

# CPU flags of the int8 dot-product instructions that accumulate u8 x s8 products straight into int32.
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
# torch.ao's dynamic Linear quantizes activations to 7 bits from serialization version 4 on; earlier
# versions call the kernel with its default, full 8-bit range.
_FULL_RANGE_VERSION = 3


@functools.cache
def has_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has VNNI int8 dot products (AVX512-VNNI, AVX-VNNI or AMX-INT8).

    Read from the ``flags`` line of ``/proc/cpuinfo``; False where that file is missing or unreadable
    (not Linux), which keeps the conservative 7-bit activations.
    """
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return not _VNNI_FLAGS.isdisjoint(value.split())
    return False


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
    for module in model.modules():
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear) and module._packed_params.dtype == torch.qint8:
            module.version = _FULL_RANGE_VERSION
    return model


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
        quantized = torch.ao.quantization.quantize_dynamic(work, spec, dtype=torch.qint8, inplace=True)
    return full_range_activations(quantized) if has_vnni() else quantized


def quantize_one(module: nn.Module, granularity: str) -> nn.Module:
    """A dynamically quantized copy of a single layer (for per-op error measurement)."""
    holder = nn.Module()
    holder.add_module("layer", copy.deepcopy(module))
    gran = granularity if isinstance(module, nn.Linear) else "per_tensor"
    with quiet():
        torch.ao.quantization.quantize_dynamic(holder, {"layer": dynamic_qconfig(gran)}, dtype=torch.qint8, inplace=True)
    if has_vnni():
        full_range_activations(holder)
    layer: nn.Module = holder.get_submodule("layer")
    return layer
