"""Which modules of a model are quantizable, per approach and format, and the options each supports."""

from __future__ import annotations

from torch import nn

from inc_core._quant_config import CALIBRATIONS, GRANULARITIES, SCHEMES, QuantConfig
from inc_core.backend import Op, TuningSpace
from inc_core.errors import ConfigError

__all__ = ["STATIC_TYPES", "DYNAMIC_TYPES", "quantizable_ops", "tuning_space", "check_supported"]

# Module types whose weights and input activations become INT8, per static format. The x86 PT2E
# quantizer recognises conv1d/conv2d/linear; the FX x86 backend config also covers conv3d.
STATIC_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "pt2e": (nn.Conv1d, nn.Conv2d, nn.Linear),
    "fx": (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear),
    # IPEX's static flow (traced TorchScript) covers the same module types as FX.
    "torchscript": (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear),
}
# Dynamic quantization swaps these for torch.ao's dynamically quantized modules.
DYNAMIC_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell)
# Recurrent layers are quantized per tensor by torch.ao's dynamic kernels.
_PER_TENSOR_ONLY = (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell)
# x86 INT8 kernels (oneDNN/FBGEMM) take unsigned 8-bit activations.
ACTIVATION_DTYPES = ("uint8",)


def _types(config: QuantConfig, fmt: str) -> tuple[type[nn.Module], ...]:
    return DYNAMIC_TYPES if config.approach == "dynamic" else STATIC_TYPES[fmt]


def quantizable_ops(model: nn.Module, config: QuantConfig, fmt: str) -> tuple[Op, ...]:
    """Leaf modules the given approach/format can quantize, in definition order, named as in ``named_modules``."""
    types = _types(config, fmt)
    ops = []
    for name, module in model.named_modules():
        # exact type match: subclasses (e.g. NonDynamicallyQuantizableLinear inside MultiheadAttention)
        # are not swapped by torch.ao, so they are not offered either.
        if name and type(module) in types:
            ops.append(Op(name=name, op_type=type(module).__name__))
    return tuple(ops)


def tuning_space(model: nn.Module, config: QuantConfig, fmt: str) -> TuningSpace:
    """The ops and, per op type, the settings the torch paths support."""
    ops = quantizable_ops(model, config, fmt)
    options: dict[str, dict[str, tuple[str, ...]]] = {}
    for op_type in dict.fromkeys(op.op_type for op in ops):
        if config.approach == "dynamic":
            per_tensor = op_type in {t.__name__ for t in _PER_TENSOR_ONLY}
            options[op_type] = {"granularity": ("per_tensor",) if per_tensor else GRANULARITIES}
        else:
            options[op_type] = {
                "calibration": CALIBRATIONS,
                "granularity": GRANULARITIES,
                "scheme": SCHEMES,
                "activation_dtype": ACTIVATION_DTYPES,
            }
    return TuningSpace(ops, options)


def check_supported(config: QuantConfig, ops: tuple[Op, ...]) -> None:
    """Reject settings the x86 kernels cannot run, before any work starts.

    Raises:
        ConfigError: ``activation_dtype="int8"`` for a static op (x86 INT8 kernels take uint8 activations).
    """
    if config.approach != "static":
        return
    for op in ops:
        dtype = config.setting(op.name, op.op_type, "activation_dtype")
        if dtype not in ACTIVATION_DTYPES:
            raise ConfigError(
                f"QuantConfig: activation_dtype={dtype!r} for {op.name!r} ({op.op_type}) is not supported by the "
                f"torch backend; x86 INT8 kernels take {', '.join(map(repr, ACTIVATION_DTYPES))} activations. "
                "Use activation_dtype='uint8' (scheme='sym' gives a symmetric range with zero point 128)."
            )
