"""PruneConfig: a sparsity target, its pattern, criterion and schedule."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from inc_core._checks import check_choice, check_float, check_int
from inc_core._layer_filter import LayerFilter
from inc_core._serde import SerializableConfig
from inc_core.errors import ConfigError

__all__ = ["PruneConfig", "CRITERIA", "SCHEDULES", "RAMPS", "PATTERN_HELP"]

CRITERIA = ("magnitude", "snip", "snip_momentum", "pattern_lock")
SCHEDULES = ("oneshot", "iterative")
RAMPS = ("cubic", "polynomial", "exponential", "cosine", "linear")
PATTERN_HELP = "'unstructured', 'channel', a block 'NxM' (e.g. '4x1') or an N-of-M group 'N:M' (e.g. '2:4')"
_PATTERN_RE = re.compile(r"unstructured|channel|(\d+)x(\d+)|(\d+):(\d+)")


def _check_pattern(value: Any) -> None:
    match = _PATTERN_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f"PruneConfig: pattern={value!r} is not supported; use {PATTERN_HELP}.")
    if match.group(1) is not None and (int(match.group(1)) < 1 or int(match.group(2)) < 1):
        raise ConfigError(f"PruneConfig: block pattern {value!r} needs sizes >= 1, e.g. '4x1'.")
    if match.group(3) is not None:
        n, m = int(match.group(3)), int(match.group(4))
        if not 0 < n < m:
            raise ConfigError(f"PruneConfig: N:M pattern {value!r} needs 0 < N < M (N kept of every M), e.g. '2:4'.")


@dataclass(frozen=True, kw_only=True)
class PruneConfig(SerializableConfig):
    """Pruning recipe.

    Args:
        target_sparsity: fraction of weights zero at ``end_step`` (for ``N:M`` it is implied: 1 - N/M).
        pattern: :data:`PATTERN_HELP`.
        criterion: ``"magnitude"`` (|w|), ``"snip"`` (|w*g|), ``"snip_momentum"`` (|w*g| averaged over
            steps) or ``"pattern_lock"`` (keep the zeros the model already has, prune nothing new).
        schedule: ``"oneshot"`` (prune to target at ``start_step``) or ``"iterative"`` (ramp from
            ``initial_sparsity`` to target between ``start_step`` and ``end_step`` every ``frequency`` steps).
        ramp: shape of the iterative ramp: ``"cubic"``, ``"polynomial"``, ``"exponential"``, ``"cosine"``, ``"linear"``.
        start_step, end_step, frequency: in optimizer steps.
        initial_sparsity: sparsity at ``start_step`` for the iterative schedule.
        momentum: decay of the running score for ``"snip_momentum"``.
        include_types: layer types pruned (backend type names, e.g. ``"Linear"``, ``"Conv2d"``, ``"Dense"``);
            empty: every layer with a weight matrix or kernel.
        exclude: layers left dense.
    """

    target_sparsity: float = 0.7
    pattern: str = "unstructured"
    criterion: str = "magnitude"
    schedule: str = "iterative"
    ramp: str = "cubic"
    start_step: int = 0
    end_step: int = 1000
    frequency: int = 100
    initial_sparsity: float = 0.0
    momentum: float = 0.9
    include_types: tuple[str, ...] = ()
    exclude: LayerFilter = field(default_factory=LayerFilter)

    def __post_init__(self) -> None:
        owner = "PruneConfig"
        check_float(owner, "target_sparsity", self.target_sparsity, minimum=0.0, maximum=1.0, exclusive_max=True)
        _check_pattern(self.pattern)
        check_choice(owner, "criterion", self.criterion, CRITERIA)
        check_choice(owner, "schedule", self.schedule, SCHEDULES)
        check_choice(owner, "ramp", self.ramp, RAMPS)
        check_int(owner, "start_step", self.start_step, minimum=0)
        check_int(owner, "end_step", self.end_step, minimum=0)
        check_int(owner, "frequency", self.frequency, minimum=1)
        if self.schedule == "iterative" and self.end_step <= self.start_step:
            raise ConfigError(
                f"{owner}: end_step ({self.end_step}) must be after start_step ({self.start_step}) "
                "for the iterative schedule; use schedule='oneshot' to prune at one step."
            )
        check_float(owner, "initial_sparsity", self.initial_sparsity, minimum=0.0, maximum=self.target_sparsity)
        check_float(owner, "momentum", self.momentum, minimum=0.0, maximum=1.0, exclusive_max=True)
        if isinstance(self.include_types, list):
            object.__setattr__(self, "include_types", tuple(self.include_types))
        if not isinstance(self.include_types, tuple) or not all(isinstance(t, str) for t in self.include_types):
            raise ConfigError(f"{owner}: include_types must be a tuple of type names, got {self.include_types!r}.")
        if not isinstance(self.exclude, LayerFilter):
            raise ConfigError(f"{owner}: exclude must be an inc.LayerFilter, got {type(self.exclude).__name__}.")
