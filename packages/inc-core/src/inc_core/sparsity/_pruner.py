"""A numpy pruning loop: the reference that the framework pruning hooks follow."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

from inc_core._prune_config import PruneConfig
from inc_core.errors import ConfigError
from inc_core.sparsity._criteria import Criterion, make_criterion
from inc_core.sparsity._patterns import check_shape, parse_pattern
from inc_core.sparsity._schedule import Schedule

__all__ = ["Pruner"]


def _check_every_shape(pattern: object, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise one ConfigError naming every layer the pattern does not fit, with the exclusion that skips them.

    Real networks rarely fit a block or N:M pattern everywhere (a stem conv reads 3 channels, a classifier
    has 10 outputs, a depthwise conv has one input channel): the user needs the whole list, not one layer
    per attempt.
    """
    misfits: list[tuple[str, tuple[int, ...], ConfigError]] = []
    for name, shape in shapes.items():
        try:
            check_shape(str(pattern), shape)
        except ConfigError as exc:
            misfits.append((name, shape, exc))
    if not misfits:
        return
    names = tuple(name for name, _, _ in misfits)
    way_out = f"To leave {'it' if len(names) == 1 else 'them'} dense: PruneConfig(exclude=inc.LayerFilter(names={names!r}))."
    first_name, _, first_error = misfits[0]
    if len(misfits) == 1:
        raise ConfigError(f"Layer {first_name!r}: {first_error} {way_out}") from first_error
    listed = ", ".join(f"{name!r} {shape}" for name, shape, _ in misfits)
    raise ConfigError(
        f"Pattern '{pattern}' does not fit {len(misfits)} of the {len(shapes)} layers to prune. "
        f"Layer {first_name!r}: {first_error} Every layer it does not fit (name, weight shape): {listed}. {way_out}"
    ) from first_error


class Pruner:
    """Masks for a set of named weights, following one :class:`~inc_core.PruneConfig`.

    Each tensor gets its own criterion and reaches the scheduled sparsity on its own. Call
    :meth:`step` after every optimizer step with the updated weights (and their gradients for the
    ``snip`` criteria); when it returns masks, multiply the weights by them, and keep doing so after
    every later optimizer step so pruned weights stay zero. With ``pattern_lock`` the masks are the
    zeros the weights have at the first :meth:`step`, whatever the schedule.

    Args:
        config: the pruning recipe.
        shapes: name -> shape of every weight to prune, output-first (``(out, in, *kernel)``).

    Raises:
        ConfigError: when the pattern does not fit a weight's shape (the message names the layer),
            or the config is inconsistent (e.g. ``initial_sparsity`` above what ``N:M`` implies).
    """

    def __init__(self, config: PruneConfig, shapes: Mapping[str, Sequence[int]]) -> None:
        if not isinstance(config, PruneConfig):
            raise ConfigError(f"Pruner: expected an inc.PruneConfig, got {type(config).__name__}.")
        self.config = config
        self.schedule = Schedule.from_config(config)
        self.pattern = parse_pattern(config.pattern)
        self.shapes = {name: tuple(int(s) for s in shape) for name, shape in shapes.items()}
        if not self.shapes:
            raise ConfigError("Pruner: no weights to prune (shapes is empty); check include_types and exclude.")
        self.criteria: dict[str, Criterion] = {name: make_criterion(config) for name in self.shapes}
        self._lock = config.criterion == "pattern_lock"
        if not self._lock:  # pattern_lock keeps whatever pattern the weights have
            _check_every_shape(self.pattern, self.shapes)
        self._masks: dict[str, np.ndarray] = {}

    @property
    def masks(self) -> dict[str, np.ndarray]:
        """The latest masks (empty before the first update)."""
        return dict(self._masks)

    def needs_data(self, step: int) -> bool:
        """Whether :meth:`step` reads the weights at ``step``; when False, ``step`` may be skipped.

        Plugins use it to avoid copying tensors to numpy at steps where nothing happens.
        """
        if self._lock:
            return not self._masks
        if next(iter(self.criteria.values())).every_step and step <= self.schedule.last_update_step:
            return True
        return self.schedule.should_update(step)

    def step(
        self, step: int, weights: Mapping[str, ArrayLike], grads: Mapping[str, ArrayLike] | None = None
    ) -> dict[str, np.ndarray] | None:
        """Update the criteria and, at the schedule's update steps, return new masks (``True`` = kept).

        Args:
            step: optimizer step count (the first step is 0).
            weights: name -> current weight, for every name given at construction.
            grads: name -> gradient of that weight; needed by ``snip`` and ``snip_momentum``.

        Returns:
            name -> mask when the masks changed at this step, else None (keep applying the last ones).

        Raises:
            ConfigError: for missing or extra weights, a missing gradient, or a changed shape.
        """
        if not self.needs_data(step):
            return None
        if set(weights) != set(self.shapes):
            missing = sorted(set(self.shapes) - set(weights))
            extra = sorted(set(weights) - set(self.shapes))
            raise ConfigError(
                f"Pruner.step: weights must hold exactly the layers given at construction; missing {missing}, "
                f"unexpected {extra}."
            )
        for name, criterion in self.criteria.items():
            grad = None if grads is None else grads.get(name)
            try:
                criterion.update(weights[name], grad)
            except ConfigError as exc:
                raise ConfigError(f"Layer {name!r}: {exc}") from exc
        if self._lock:
            self._masks = {name: c.mask(self.pattern, 0.0) for name, c in self.criteria.items()}
            return self.masks
        if not self.schedule.should_update(step):
            return None
        sparsity = self.schedule.sparsity_at(step)
        self._masks = {name: c.mask(self.pattern, sparsity) for name, c in self.criteria.items()}
        return self.masks
