"""LayerFilter: which ops/layers a config leaves out (kept in FP32 or left dense)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from inc_core._checks import check_str_tuple
from inc_core._serde import SerializableConfig
from inc_core.errors import ConfigError

__all__ = ["LayerFilter"]


@dataclass(frozen=True, kw_only=True)
class LayerFilter(SerializableConfig):
    """Selects ops by exact name, regular expression (full match on the name) or op type.

    Args:
        names: exact op/layer names, as the backend reports them (``inc.describe(model)``).
        patterns: regular expressions, each matched with ``re.fullmatch`` against op names.
        types: op types (``"Conv"``, ``"MatMul"``, ``"Linear"``, ...), as the backend reports them.
        validate: when true, a name or pattern that matches no op of the model is an error
            (a typo would otherwise silently quantize the layer you meant to keep).
    """

    names: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    validate: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", check_str_tuple("LayerFilter", "names", self.names))
        object.__setattr__(self, "patterns", check_str_tuple("LayerFilter", "patterns", self.patterns))
        object.__setattr__(self, "types", check_str_tuple("LayerFilter", "types", self.types))
        if not isinstance(self.validate, bool):
            raise ConfigError(f"LayerFilter: validate must be a bool, got {self.validate!r}.")
        for pattern in self.patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"LayerFilter: pattern {pattern!r} is not a valid regular expression ({exc}).") from exc

    def __bool__(self) -> bool:
        return bool(self.names or self.patterns or self.types)

    def matches(self, name: str, op_type: str) -> bool:
        """True when the op is selected by a name, a pattern or its type."""
        if name in self.names or op_type in self.types:
            return True
        return any(re.fullmatch(p, name) for p in self.patterns)

    def select(self, ops: Iterable[Any]) -> list[str]:
        """Names of the ops (objects with ``name`` and ``op_type``) this filter selects.

        Raises:
            ConfigError: with ``validate=True``, for a name, pattern or type that matches nothing;
                the message lists close names so a typo is easy to fix.
        """
        op_list = list(ops)
        all_names = [op.name for op in op_list]
        all_types = sorted({op.op_type for op in op_list})
        if self.validate:
            missing = [n for n in self.names if n not in all_names]
            if missing:
                hints = {m: difflib.get_close_matches(m, all_names, n=3) for m in missing}
                close = f"Close names: {hints}." if any(hints.values()) else f"Its op names look like {all_names[:5]}."
                raise ConfigError(
                    f"LayerFilter: name(s) {missing} match no op of the model. {close} inc.describe(model) (or "
                    f"`inc describe MODEL`) lists all {len(all_names)}; use those names, or pass validate=False."
                )
            dead = [p for p in self.patterns if not any(re.fullmatch(p, n) for n in all_names)]
            if dead:
                raise ConfigError(
                    f"LayerFilter: pattern(s) {dead} match no op name (patterns are full-match regular "
                    f"expressions; e.g. {all_names[:3]}). Fix the pattern or pass validate=False."
                )
            bad_types = [t for t in self.types if t not in all_types]
            if bad_types:
                raise ConfigError(
                    f"LayerFilter: type(s) {bad_types} match no op; the model's op types are {all_types}."
                )
        return [op.name for op in op_list if self.matches(op.name, op.op_type)]

    def union(self, other: LayerFilter) -> LayerFilter:
        """A filter selecting what either filter selects (used to add fallbacks to a config)."""

        def merge(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(dict.fromkeys(a + b))

        return LayerFilter(
            names=merge(self.names, other.names),
            patterns=merge(self.patterns, other.patterns),
            types=merge(self.types, other.types),
            validate=self.validate and other.validate,
        )
