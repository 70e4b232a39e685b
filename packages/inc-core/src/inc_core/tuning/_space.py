"""The search space the strategies walk: op-type settings and per-op FP32/BF16 fallback around a base config."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from inc_core._layer_filter import LayerFilter
from inc_core._quant_config import QuantConfig
from inc_core._smooth_quant_config import SmoothQuant
from inc_core.backend import Op, TuningSpace
from inc_core.errors import TuningError

__all__ = ["MODEL_WIDE", "SMOOTH_QUANT", "SearchSpace", "Tunable", "Settings", "config_delta", "describe_delta"]

# A point's op-type settings: (op type, setting) -> choice. Missing keys keep the base config's value.
Settings = Mapping[tuple[str, str], str]
# The pseudo op type of settings that apply to the whole model, and its SmoothQuant setting, whose
# choices are "off" or an alpha written as a float ("0.5").
MODEL_WIDE = "model"
SMOOTH_QUANT = "smooth_quant"
OFF = "off"


@dataclass(frozen=True)
class Tunable:
    """One search variable: a setting of one op type and the choices to try (the base value first)."""

    op_type: str
    setting: str
    choices: tuple[str, ...]

    @property
    def key(self) -> tuple[str, str]:
        return (self.op_type, self.setting)

    @property
    def label(self) -> str:
        return f"{self.op_type}.{self.setting}"


class SearchSpace:
    """Turns strategy-level points (settings + fallback set) into full, canonical QuantConfigs.

    Every config the strategies propose is built here, from the base with ``dataclasses.replace``:
    op-type settings become ``overrides`` keyed by op type, fallbacks are added by name to ``exclude``
    (FP32) or to ``bf16`` (with ``fallback_precision="bf16"``). Building configs in one place keeps equal points equal as JSON, which is how trials are
    recognised when a history file is resumed.

    Args:
        base: the user's base config.
        space: the backend's description of the model, already restricted to the user's search space.
        smooth_quant_alphas: SmoothQuant alphas to try model-wide (``TuningConfig.smooth_quant_alphas``);
            they become the first tunable (``model.smooth_quant``, with ``"off"``), so strategies that walk
            the settings try SmoothQuant before per-op-type changes.
        fallback_precision: ``"fp32"`` or ``"bf16"``: what fallback ops run in (``TuningConfig.fallback_precision``).
        bf16_candidates: with ``"bf16"``, the ops that gain from BF16 (``Backend.bf16_candidates``); a
            fallback op outside them goes to FP32. ``None``: every op.
    """

    def __init__(
        self,
        base: QuantConfig,
        space: TuningSpace,
        smooth_quant_alphas: tuple[float, ...] = (),
        *,
        fallback_precision: str = "fp32",
        bf16_candidates: frozenset[str] | None = None,
    ) -> None:
        self.base = base
        self.fallback_precision = fallback_precision
        self.bf16_candidates = bf16_candidates
        self.ops: tuple[Op, ...] = tuple(space.ops)
        self.quantized: tuple[str, ...] = tuple(
            op.name for op in space.ops if base.precision(op.name, op.op_type) == "int8"
        )
        live_types = {op.op_type for op in space.ops if op.name in set(self.quantized)}
        tunables: list[Tunable] = []
        if smooth_quant_alphas:
            current = self.current(MODEL_WIDE, SMOOTH_QUANT)
            choices = tuple(dict.fromkeys((current, OFF, *(repr(float(a)) for a in smooth_quant_alphas))))
            tunables.append(Tunable(MODEL_WIDE, SMOOTH_QUANT, choices))
        for op_type in space.op_types:
            if op_type not in live_types:
                continue  # every op of this type stays FP32: its settings change nothing
            for setting, choices in space.options.get(op_type, {}).items():
                current = self.current(op_type, setting)
                ordered = tuple(dict.fromkeys(((current,) if current in choices else ()) + tuple(choices)))
                if ordered and ordered != (current,):
                    tunables.append(Tunable(op_type, setting, ordered))
        self.tunables: tuple[Tunable, ...] = tuple(tunables)

    @property
    def op_types(self) -> tuple[str, ...]:
        """Op types with at least one tunable setting, in model order."""
        return tuple(dict.fromkeys(t.op_type for t in self.tunables))

    def tunables_of(self, op_type: str) -> tuple[Tunable, ...]:
        return tuple(t for t in self.tunables if t.op_type == op_type)

    def ops_of(self, op_type: str) -> tuple[str, ...]:
        """Names of the quantized ops of one type, in model order."""
        quantized = set(self.quantized)
        return tuple(op.name for op in self.ops if op.op_type == op_type and op.name in quantized)

    @property
    def quantized_types(self) -> tuple[str, ...]:
        """Op types with at least one quantized op, in model order."""
        quantized = set(self.quantized)
        return tuple(dict.fromkeys(op.op_type for op in self.ops if op.name in quantized))

    def current(self, op_type: str, setting: str) -> str:
        """The base config's value of ``setting`` for ``op_type`` (type override, else the global value)."""
        if (op_type, setting) == (MODEL_WIDE, SMOOTH_QUANT):
            return OFF if self.base.smooth_quant is None else repr(self.base.smooth_quant.alpha)
        override = self.base.overrides.get(op_type, {})
        return str(override[setting]) if setting in override else str(getattr(self.base, setting))

    def value(self, settings: Settings, tunable: Tunable) -> str:
        """The value of ``tunable`` at a point."""
        return settings.get(tunable.key, self.current(tunable.op_type, tunable.setting))

    def config(self, settings: Settings | None = None, fallback: Iterable[str] = ()) -> QuantConfig:
        """The full QuantConfig for a point: the base plus ``settings`` plus ``fallback`` ops in FP32 (or BF16).

        Raises:
            ValueError: a fallback name that is not a quantized op (a strategy bug, not user input).
        """
        overrides: dict[str, dict[str, str]] = {k: dict(v) for k, v in self.base.overrides.items()}
        smooth_quant = self.base.smooth_quant
        for (op_type, setting), choice in (settings or {}).items():
            if (op_type, setting) == (MODEL_WIDE, SMOOTH_QUANT):
                if choice != self.current(op_type, setting):
                    smooth_quant = None if choice == OFF else SmoothQuant(alpha=float(choice))
            elif choice != self.current(op_type, setting):
                overrides.setdefault(op_type, {})[setting] = choice
        wanted = set(fallback)
        unknown = wanted - set(self.quantized)
        if unknown:
            raise TuningError(f"SearchSpace.config: fallback names {sorted(unknown)} are not quantized ops of the model.")
        names = tuple(name for name in self.quantized if name in wanted)  # model order: one JSON per set
        exclude, bf16 = self.base.exclude, self.base.bf16
        to_bf16: tuple[str, ...] = ()
        if self.fallback_precision == "bf16":
            to_bf16 = tuple(n for n in names if self.bf16_candidates is None or n in self.bf16_candidates)
        to_fp32 = tuple(n for n in names if n not in to_bf16)
        if to_bf16:
            bf16 = bf16.union(LayerFilter(names=to_bf16))
        if to_fp32:
            exclude = exclude.union(LayerFilter(names=to_fp32))
        return dataclasses.replace(
            self.base, overrides=overrides, exclude=exclude, bf16=bf16, smooth_quant=smooth_quant
        )


def config_delta(base: QuantConfig, config: QuantConfig) -> dict[str, Any]:
    """What ``config`` changes relative to ``base``, as plain JSON (unchanged fields left out).

    Ops added to ``exclude`` or ``bf16`` by name appear under ``"fallback"`` (so strategies count fallbacks
    alike), those added to ``bf16`` also under ``"fallback_bf16"``; changed override entries under
    ``"overrides"`` (a removed entry maps to ``None``); any other changed field under its own name.
    """
    old, new = base.to_dict(), config.to_dict()
    delta: dict[str, Any] = {}
    for key, value in new.items():
        if old.get(key) == value:
            continue
        if key in ("exclude", "bf16"):
            before = old[key]
            added = [n for n in value["names"] if n not in before["names"]]
            if added:
                delta["fallback"] = [*delta.get("fallback", []), *added]
                if key == "bf16":
                    delta["fallback_bf16"] = added
            rest = {k: v for k, v in value.items() if k != "names" and before.get(k) != v}
            removed = [n for n in before["names"] if n not in value["names"]]
            if removed:
                rest["names_removed"] = removed
            if rest:
                delta[key] = rest
        elif key == "overrides":
            changed: dict[str, Any] = {}
            for selector in dict.fromkeys([*old["overrides"], *value]):
                a, b = old["overrides"].get(selector, {}), value.get(selector, {})
                diff = {s: b.get(s) for s in dict.fromkeys([*a, *b]) if a.get(s) != b.get(s)}
                if diff:
                    changed[selector] = diff
            if changed:
                delta["overrides"] = changed
        else:
            delta[key] = value
    return delta


def describe_delta(delta: Mapping[str, Any]) -> str:
    """One readable line for a delta, e.g. ``MatMul.calibration=kl; fp32: conv2, fc2`` (``base`` when empty)."""
    parts: list[str] = []
    for selector, settings in delta.get("overrides", {}).items():
        parts.extend(f"{selector}.{s}={v}" for s, v in settings.items())
    for key, value in delta.items():
        if key == SMOOTH_QUANT:
            parts.append(f"smooth_quant(alpha={value['alpha']:g})" if isinstance(value, Mapping) else "smooth_quant=off")
        elif key not in ("overrides", "fallback", "fallback_bf16", "fallback_precision"):
            parts.append(f"{key}={value}")
    fallback = list(delta.get("fallback", ()))
    # "fallback_precision": "bf16" marks a whole fallback list as BF16 in history files of earlier versions
    in_bf16 = set(fallback if delta.get("fallback_precision") == "bf16" else delta.get("fallback_bf16", ()))
    for precision, names in (("fp32", [n for n in fallback if n not in in_bf16]), ("bf16", [n for n in fallback if n in in_bf16])):
        if names:
            parts.append(f"{precision}: " + ", ".join(names))
    return "; ".join(parts) if parts else "base"
