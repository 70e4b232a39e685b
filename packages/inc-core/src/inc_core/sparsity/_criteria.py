"""Pruning criteria: how important each weight of one tensor is.

A criterion belongs to one tensor. The pruning loop calls :meth:`Criterion.update` with the weight
(and its gradient, for the gradient-based criteria) and :meth:`Criterion.mask` at the steps where the
schedule updates the mask.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
from numpy.typing import ArrayLike

from inc_core._checks import check_float
from inc_core._prune_config import CRITERIA, PruneConfig
from inc_core.errors import ConfigError
from inc_core.sparsity._masks import compute_mask
from inc_core.sparsity._patterns import Pattern

__all__ = [
    "Criterion",
    "MagnitudeCriterion",
    "SnipCriterion",
    "SnipMomentumCriterion",
    "PatternLockCriterion",
    "make_criterion",
]


def _as_float(name: str, value: ArrayLike) -> np.ndarray:
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ConfigError(f"Pruning criterion: {name} must hold real numbers, got dtype {array.dtype}.")
    # float16/int inputs are scored in float32 at least, so |w*g| neither overflows nor rounds coarsely.
    return array.astype(np.result_type(array.dtype, np.float32), copy=False)


class Criterion(ABC):
    """Scores the weights of one tensor; higher scores are kept."""

    #: Name used in :class:`~inc_core.PruneConfig` (``criterion=...``).
    name: ClassVar[str]
    #: ``update`` needs the gradient of the weight.
    needs_grad: ClassVar[bool] = False
    #: Scores accumulate over steps, so ``update`` must run at every optimizer step, not only at mask updates.
    every_step: ClassVar[bool] = False

    def __init__(self) -> None:
        self._scores: np.ndarray | None = None

    @abstractmethod
    def update(self, weight: ArrayLike, grad: ArrayLike | None = None) -> None:
        """Fold the current weight (and gradient) into the scores."""

    def scores(self) -> np.ndarray:
        """Current scores, shape of the weight, non-negative.

        Raises:
            ConfigError: before the first :meth:`update`.
        """
        if self._scores is None:
            raise self._no_scores()
        return self._scores

    def _no_scores(self) -> ConfigError:
        hint = " with gradients (after a backward pass)" if self.needs_grad else ""
        return ConfigError(
            f"Pruning criterion {self.name!r} has no scores yet: call update(weight{', grad' * self.needs_grad})"
            f"{hint} before asking for scores or masks."
        )

    def mask(self, pattern: str | Pattern, sparsity: float) -> np.ndarray:
        """Mask (``True`` = kept) of :func:`~inc_core.sparsity.compute_mask` on the current scores."""
        return compute_mask(self.scores(), pattern, sparsity)

    def _check_shape(self, weight: np.ndarray, grad: np.ndarray | None = None) -> None:
        if grad is not None and grad.shape != weight.shape:
            raise ConfigError(
                f"Pruning criterion {self.name!r}: gradient shape {grad.shape} differs from weight shape "
                f"{weight.shape}; pass the gradient of this weight."
            )
        if self._scores is not None and self._scores.shape != weight.shape:
            raise ConfigError(
                f"Pruning criterion {self.name!r}: weight shape {weight.shape} differs from the shape "
                f"{self._scores.shape} it was scored with; use one criterion per tensor."
            )

    def _grad(self, weight: np.ndarray, grad: ArrayLike | None) -> np.ndarray:
        if grad is None:
            raise ConfigError(
                f"Pruning criterion {self.name!r} scores |weight * gradient| and needs gradients, got grad=None. "
                "Run a backward pass before the pruning step, or use criterion='magnitude'."
            )
        array = _as_float("grad", grad)
        self._check_shape(weight, array)
        return array


class MagnitudeCriterion(Criterion):
    """``|w|``: the smallest weights are pruned first."""

    name = "magnitude"

    def update(self, weight: ArrayLike, grad: ArrayLike | None = None) -> None:
        """Score the current weight; ``grad`` is ignored."""
        array = _as_float("weight", weight)
        self._check_shape(array)
        self._scores = np.abs(array)


class SnipCriterion(Criterion):
    """``|w * g|`` at the latest step (SNIP saliency: first-order loss change of removing a weight)."""

    name = "snip"
    needs_grad = True

    def update(self, weight: ArrayLike, grad: ArrayLike | None = None) -> None:
        """Score ``|weight * grad|``.

        Raises:
            ConfigError: when ``grad`` is None or of another shape.
        """
        array = _as_float("weight", weight)
        self._scores = np.abs(array * self._grad(array, grad))


class SnipMomentumCriterion(Criterion):
    """Running average of ``|w * g|``: ``score = momentum * score + (1 - momentum) * |w * g|``.

    Scores start at zero and are updated at every optimizer step, which smooths the noise of
    single-batch gradients.

    Args:
        momentum: decay of the running score, in [0, 1).
    """

    name = "snip_momentum"
    needs_grad = True
    every_step = True

    def __init__(self, momentum: float = 0.9) -> None:
        super().__init__()
        check_float("SnipMomentumCriterion", "momentum", momentum, minimum=0.0, maximum=1.0, exclusive_max=True)
        self.momentum = float(momentum)

    def update(self, weight: ArrayLike, grad: ArrayLike | None = None) -> None:
        """Fold ``|weight * grad|`` of this step into the running score.

        Raises:
            ConfigError: when ``grad`` is None or of another shape.
        """
        array = _as_float("weight", weight)
        saliency = np.abs(array * self._grad(array, grad))
        previous = self._scores if self._scores is not None else np.zeros_like(saliency)
        self._scores = self.momentum * previous + (1.0 - self.momentum) * saliency


class PatternLockCriterion(Criterion):
    """Keeps the zeros the weight has at its first update, and prunes nothing else, ever.

    The mask is captured by the first :meth:`update` (weights that are exactly zero are pruned) and
    :meth:`mask` returns it whatever the pattern and sparsity asked for: fine-tuning an already sparse
    model keeps its sparsity pattern.
    """

    name = "pattern_lock"

    def __init__(self) -> None:
        super().__init__()
        self._locked: np.ndarray | None = None

    def update(self, weight: ArrayLike, grad: ArrayLike | None = None) -> None:
        """Capture the nonzero pattern at the first call; later calls only check the shape."""
        array = np.asarray(weight)
        self._check_shape(array)
        if self._locked is None:
            self._locked = array != 0
            self._scores = self._locked.astype(np.float64)

    def mask(self, pattern: str | Pattern, sparsity: float) -> np.ndarray:
        """The locked mask (``pattern`` and ``sparsity`` are ignored)."""
        if self._locked is None:
            raise self._no_scores()
        return self._locked.copy()


def make_criterion(config: PruneConfig) -> Criterion:
    """A fresh criterion for one tensor, as ``config.criterion`` (and ``config.momentum``) ask.

    Raises:
        ConfigError: when ``config`` is not a :class:`~inc_core.PruneConfig`.
    """
    if not isinstance(config, PruneConfig):
        raise ConfigError(f"make_criterion: expected an inc.PruneConfig, got {type(config).__name__}.")
    if config.criterion == "magnitude":
        return MagnitudeCriterion()
    if config.criterion == "snip":
        return SnipCriterion()
    if config.criterion == "snip_momentum":
        return SnipMomentumCriterion(config.momentum)
    if config.criterion == "pattern_lock":
        return PatternLockCriterion()
    # PruneConfig validates the name, so this only fires if CRITERIA grows without a class here.
    raise ConfigError(f"make_criterion: criterion {config.criterion!r} has no implementation; known: {CRITERIA}.")
