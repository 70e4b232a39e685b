"""Sparsity schedules: how sparse the weights should be at each optimizer step.

``oneshot`` prunes to the target at ``start_step``. ``iterative`` follows Zhu & Gupta (2017, "To prune,
or not to prune"): nothing is pruned before ``start_step``; at ``start_step`` the sparsity is
``initial_sparsity``; it then rises along a ramp, changing only at the update steps
``start_step + k * frequency``, and is exactly the target from ``end_step`` on (``end_step`` is an update
step even when it is off the ``frequency`` grid). With ``p = (t - start_step) / (end_step - start_step)``
for the latest update step ``t``, ``s_i`` the initial and ``s_f`` the target sparsity, the ramps are:

- ``cubic``: ``s_f + (s_i - s_f) * (1 - p)**3`` (the formula of the paper)
- ``polynomial``: ``s_f + (s_i - s_f) * (1 - p)**2``
- ``linear``: ``s_i + (s_f - s_i) * p``
- ``cosine``: ``s_i + (s_f - s_i) * (1 - cos(pi * p)) / 2``
- ``exponential``: ``1 - (1 - s_i) * ((1 - s_f) / (1 - s_i))**p``: the density decays geometrically,
  so each update prunes the same fraction of the weights still alive.

All are non-decreasing in the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from inc_core._checks import check_choice, check_float, check_int
from inc_core._prune_config import RAMPS, SCHEDULES, PruneConfig
from inc_core.errors import ConfigError
from inc_core.sparsity._patterns import NOfM, parse_pattern

__all__ = ["Schedule", "sparsity_at", "should_update"]


def _progress(ramp: str, p: float) -> float:
    """Fraction of the way from the initial to the target sparsity, for ``p`` in [0, 1]."""
    if ramp == "cubic":
        return 1.0 - (1.0 - p) ** 3
    if ramp == "polynomial":
        return 1.0 - (1.0 - p) ** 2
    if ramp == "cosine":
        return (1.0 - math.cos(math.pi * p)) / 2.0
    return p  # linear


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """Sparsity as a function of the optimizer step.

    Args:
        target_sparsity: sparsity from ``end_step`` on (from ``start_step`` on for ``oneshot``), in [0, 1).
        kind: ``"oneshot"`` or ``"iterative"``.
        ramp: ``"cubic"``, ``"polynomial"``, ``"exponential"``, ``"cosine"`` or ``"linear"`` (see the module).
        start_step: first step that prunes.
        end_step: step at which the iterative ramp reaches the target (unused by ``oneshot``).
        frequency: steps between iterative updates.
        initial_sparsity: iterative sparsity at ``start_step``, in [0, target_sparsity].
    """

    target_sparsity: float
    kind: str = "iterative"
    ramp: str = "cubic"
    start_step: int = 0
    end_step: int = 1000
    frequency: int = 100
    initial_sparsity: float = 0.0

    def __post_init__(self) -> None:
        owner = "Schedule"
        check_float(owner, "target_sparsity", self.target_sparsity, minimum=0.0, maximum=1.0, exclusive_max=True)
        check_choice(owner, "kind", self.kind, SCHEDULES)
        check_choice(owner, "ramp", self.ramp, RAMPS)
        check_int(owner, "start_step", self.start_step, minimum=0)
        check_int(owner, "end_step", self.end_step, minimum=0)
        check_int(owner, "frequency", self.frequency, minimum=1)
        if self.kind == "iterative" and self.end_step <= self.start_step:
            raise ConfigError(
                f"{owner}: end_step ({self.end_step}) must be after start_step ({self.start_step}) "
                "for the iterative schedule; use kind='oneshot' to prune at one step."
            )
        check_float(owner, "initial_sparsity", self.initial_sparsity, minimum=0.0, maximum=self.target_sparsity)

    @classmethod
    def from_config(cls, config: PruneConfig) -> Schedule:
        """The schedule of a :class:`~inc_core.PruneConfig`.

        For an ``N:M`` pattern the target is the implied ``1 - N/M`` (``config.target_sparsity`` is
        ignored) and the iterative ramp makes a growing fraction of the groups N:M.

        Raises:
            ConfigError: when ``config`` is not a PruneConfig, or its ``initial_sparsity`` exceeds the
                sparsity an ``N:M`` pattern implies.
        """
        if not isinstance(config, PruneConfig):
            raise ConfigError(f"Schedule.from_config: expected an inc.PruneConfig, got {type(config).__name__}.")
        target = config.target_sparsity
        pattern = parse_pattern(config.pattern)
        if isinstance(pattern, NOfM):
            target = pattern.implied_sparsity
            if config.initial_sparsity > target:
                raise ConfigError(
                    f"PruneConfig: initial_sparsity={config.initial_sparsity} exceeds the sparsity {target:g} that "
                    f"pattern '{pattern}' implies; use initial_sparsity <= {target:g}."
                )
        return cls(
            target_sparsity=target,
            kind=config.schedule,
            ramp=config.ramp,
            start_step=config.start_step,
            end_step=config.end_step,
            frequency=config.frequency,
            initial_sparsity=config.initial_sparsity,
        )

    @property
    def last_update_step(self) -> int:
        """The last step at which the mask changes (``start_step`` for oneshot, ``end_step`` for iterative)."""
        return self.start_step if self.kind == "oneshot" else self.end_step

    def should_update(self, step: int) -> bool:
        """True at the steps where the mask is recomputed; masks hold in between.

        Raises:
            ConfigError: for a negative or non-integer step.
        """
        check_int("Schedule", "step", step, minimum=0)
        if self.kind == "oneshot":
            return step == self.start_step
        if step < self.start_step or step > self.end_step:
            return False
        return step == self.end_step or (step - self.start_step) % self.frequency == 0

    def sparsity_at(self, step: int) -> float:
        """Sparsity the masks should have at ``step`` (0.0 before ``start_step``).

        Raises:
            ConfigError: for a negative or non-integer step.
        """
        check_int("Schedule", "step", step, minimum=0)
        if step < self.start_step:
            return 0.0
        if self.kind == "oneshot" or step >= self.end_step:
            return float(self.target_sparsity)
        initial, target = float(self.initial_sparsity), float(self.target_sparsity)
        last = self.start_step + (step - self.start_step) // self.frequency * self.frequency
        p = (last - self.start_step) / (self.end_step - self.start_step)
        if self.ramp == "exponential":
            value = 1.0 - (1.0 - initial) * math.pow((1.0 - target) / (1.0 - initial), p)
        else:
            value = initial + (target - initial) * _progress(self.ramp, p)
        # Float rounding must not step outside [initial, target]; min/max keep the ramp monotone.
        return min(max(value, initial), target)


def sparsity_at(step: int, config: PruneConfig) -> float:
    """``Schedule.from_config(config).sparsity_at(step)``."""
    return Schedule.from_config(config).sparsity_at(step)


def should_update(step: int, config: PruneConfig) -> bool:
    """``Schedule.from_config(config).should_update(step)``."""
    return Schedule.from_config(config).should_update(step)
