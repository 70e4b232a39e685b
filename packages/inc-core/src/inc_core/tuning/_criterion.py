"""The accuracy criterion: when a trial's score is close enough to the FP32 baseline."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from inc_core.errors import EvaluationError, TuningError

__all__ = ["Criterion", "evaluate"]

T = TypeVar("T")

# Scores are usually accuracies computed in float; a trial that lands on the threshold up to
# rounding noise should pass (1.0 - 0.01 is not exactly 0.99 in every formulation).
_REL_EPS = 1e-12


@dataclass(frozen=True, kw_only=True)
class Criterion:
    """Whether a score meets the goal, and which of two scores is better.

    Args:
        baseline: the FP32 model's score.
        tolerable_loss: how far below (or above, for ``higher_is_better=False``) the baseline a score may be.
        loss_type: ``"relative"`` (a fraction of ``|baseline|``) or ``"absolute"`` (score units).
        higher_is_better: ``True`` for accuracies, ``False`` for losses and error rates.
    """

    baseline: float
    tolerable_loss: float
    loss_type: str = "relative"
    higher_is_better: bool = True

    @property
    def margin(self) -> float:
        """The tolerated distance from the baseline, in score units."""
        if self.loss_type == "relative":
            return self.tolerable_loss * abs(self.baseline)
        return self.tolerable_loss

    @property
    def threshold(self) -> float:
        """The worst score that still meets the goal."""
        if self.higher_is_better:
            return self.baseline - self.margin
        return self.baseline + self.margin

    def met(self, score: float) -> bool:
        """True when ``score`` is within the tolerable loss of the baseline."""
        slack = _REL_EPS * max(1.0, abs(self.threshold))
        if self.higher_is_better:
            return score >= self.threshold - slack
        return score <= self.threshold + slack

    def loss(self, score: float) -> float:
        """How much worse than the baseline ``score`` is (negative: better), relative or absolute as configured."""
        worse = self.baseline - score if self.higher_is_better else score - self.baseline
        if self.loss_type == "relative":
            return worse / abs(self.baseline) if self.baseline else (0.0 if worse == 0 else math.copysign(math.inf, worse))
        return worse

    def better(self, a: float, b: float) -> bool:
        """True when score ``a`` is strictly better than score ``b``."""
        return a > b if self.higher_is_better else a < b

    def best(self, items: Sequence[T], score: Callable[[T], float]) -> T:
        """The item with the best score; the first one on ties (earlier trials win)."""
        if not items:
            raise TuningError("Criterion.best: there is no trial to choose from (it needs at least one scored trial).")
        chosen = items[0]
        for item in items[1:]:
            if self.better(score(item), score(chosen)):
                chosen = item
        return chosen

    def rank(self, items: Sequence[T], score: Callable[[T], float]) -> list[T]:
        """Items sorted best score first; ties keep their given order."""
        sign = -1.0 if self.higher_is_better else 1.0
        return sorted(items, key=lambda item: sign * score(item))


def evaluate(eval_fn: Callable[[Any], Any], model: Any, what: str) -> float:
    """Call the user's ``eval_fn`` and return its result as a finite float.

    Raises:
        EvaluationError: ``eval_fn`` raised (the original exception is chained), or returned
            something that is not a finite real number.
    """
    try:
        value = eval_fn(model)
    except Exception as exc:  # any failure of user code ends the run; it is re-raised, chained, not swallowed
        raise EvaluationError(
            f"eval_fn raised {type(exc).__name__} while evaluating {what}: {exc}. "
            "Fix eval_fn so that it returns a finite number for any model it is given."
        ) from exc
    number = _as_real(value)
    if number is None or not math.isfinite(number):
        raise EvaluationError(
            f"eval_fn returned {value!r} ({type(value).__name__}) for {what}; expected a finite real number "
            "(an accuracy, a loss, ...). Make eval_fn return a float and check it for NaN/inf."
        )
    return number


def _as_real(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    # 0-d arrays and framework scalars (numpy, torch, tf) expose .item().
    item = getattr(value, "item", None)
    if callable(item):
        try:  # a multi-element array refuses .item(), which is what we want
            inner = item()
        except Exception:  # each framework refuses with its own type; the caller reports the value
            return None
        if isinstance(inner, numbers.Real) and not isinstance(inner, bool):
            return float(inner)
    return None
