"""Per-op settings of a QuantConfig, grouped so that each distinct combination becomes one qconfig."""

from __future__ import annotations

from dataclasses import dataclass

from inc_core._quant_config import QuantConfig
from inc_core.backend import Op

__all__ = ["OpSettings", "plan"]


@dataclass(frozen=True)
class OpSettings:
    """What one op is quantized with."""

    calibration: str
    granularity: str
    scheme: str
    percentile: float

    @classmethod
    def of(cls, config: QuantConfig, op: Op | None = None) -> OpSettings:
        if op is None:
            return cls(config.calibration, config.granularity, config.scheme, float(config.percentile))
        return cls(
            config.setting(op.name, op.op_type, "calibration"),
            config.setting(op.name, op.op_type, "granularity"),
            config.setting(op.name, op.op_type, "scheme"),
            float(config.percentile),
        )


def plan(config: QuantConfig, ops: tuple[Op, ...]) -> tuple[OpSettings, dict[str, OpSettings | None]]:
    """The global settings and, per op that differs from them, its own settings (``None``: kept in FP32).

    Raises:
        ConfigError: ``config.exclude`` names an op the model does not have.
    """
    default = OpSettings.of(config)
    excluded = set(config.exclude.select(ops)) if config.exclude else set()
    per_op: dict[str, OpSettings | None] = {}
    for op in ops:
        if op.name in excluded:
            per_op[op.name] = None
            continue
        own = OpSettings.of(config, op)
        if own != default:
            per_op[op.name] = own
    return default, per_op
