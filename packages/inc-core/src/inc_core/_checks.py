"""Small validators shared by the configs; each raises ConfigError naming the valid choices."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from inc_core.errors import ConfigError


def check_choice(owner: str, name: str, value: Any, choices: Iterable[str]) -> None:
    options = tuple(choices)
    if value not in options:
        raise ConfigError(
            f"{owner}: {name}={value!r} is not supported; choose one of {', '.join(map(repr, options))}."
        )


def check_int(owner: str, name: str, value: Any, *, minimum: int | None = None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{owner}: {name} must be an int, got {value!r} ({type(value).__name__}).")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{owner}: {name} must be >= {minimum}, got {value}.")


def check_float(
    owner: str,
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_min: bool = False,
    exclusive_max: bool = False,
    allow_none: bool = False,
) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{owner}: {name} must be a finite number, got {value!r}.")
    if minimum is not None and (value <= minimum if exclusive_min else value < minimum):
        bound = ">" if exclusive_min else ">="
        raise ConfigError(f"{owner}: {name} must be {bound} {minimum}, got {value}.")
    if maximum is not None and (value >= maximum if exclusive_max else value > maximum):
        bound = "<" if exclusive_max else "<="
        raise ConfigError(f"{owner}: {name} must be {bound} {maximum}, got {value}.")


def check_str_tuple(owner: str, name: str, value: Any) -> tuple[str, ...]:
    """Accept a list/tuple of strings (JSON gives lists) and return it as a tuple."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{owner}: {name} must be a tuple of strings, got {value!r}.")
    for item in value:
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{owner}: {name} must hold non-empty strings, got {item!r}.")
    return tuple(value)
