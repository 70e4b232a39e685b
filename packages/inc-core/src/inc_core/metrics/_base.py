"""Metric: the streaming base class every metric derives from."""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar

from inc_core.errors import EvaluationError

__all__ = ["Metric"]


class Metric(abc.ABC):
    """A metric accumulated over batches.

    Call :meth:`update` once per batch (or once with everything), then :meth:`result` for the
    value over every sample seen since construction or the last :meth:`reset`. An ``eval_fn``
    for :func:`inc_core.autotune` typically runs the model over a dataset, feeds each batch's
    outputs and labels to a metric and returns ``metric.result()``; pass the metric's
    ``higher_is_better`` to :class:`inc_core.TuningConfig`.

    ``update`` checks a batch completely before it changes any state, so a batch that raises
    leaves the metric as it was.

    Subclasses implement ``_update`` (check and accumulate one batch, return its number of
    samples), ``_compute`` (the value over the accumulated state) and ``_reset`` (clear that
    state), and set ``higher_is_better``.

    Attributes:
        higher_is_better: ``True`` when a larger result is better (accuracy, F1), ``False``
            when smaller is better (errors, losses).
    """

    higher_is_better: ClassVar[bool] = True

    def __init__(self) -> None:
        self._num_samples = 0
        self._reset()

    @property
    def num_samples(self) -> int:
        """Number of samples seen since construction or the last :meth:`reset`."""
        return self._num_samples

    def update(self, preds: Any, labels: Any) -> None:
        """Add one batch.

        Args:
            preds: the model's outputs for the batch (see the subclass for the accepted shapes).
                Numpy arrays, nested lists and CPU framework tensors are accepted.
            labels: the matching ground truth, one label per prediction.

        Raises:
            DatasetError: the batch has the wrong shape, dtype or values, or preds and labels
                hold different numbers of samples.
            EvaluationError: the predictions hold NaN or Inf.
        """
        self._num_samples += self._update(preds, labels)

    def result(self) -> float:
        """The metric over every sample seen so far.

        Raises:
            EvaluationError: no sample has been seen, or the value is not a finite number.
        """
        self._require_samples()
        value = float(self._compute())
        if not math.isfinite(value):
            raise EvaluationError(f"{self._name}: the result is {value}, not a finite number; check the predictions.")
        return value

    def reset(self) -> None:
        """Forget every sample seen, keeping the metric's settings."""
        self._num_samples = 0
        self._reset()

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in self._params().items())
        return f"{self._name}({params})"

    @property
    def _name(self) -> str:
        return type(self).__name__

    def _params(self) -> dict[str, Any]:
        """Constructor settings, for ``repr``."""
        return {}

    def _require_samples(self) -> None:
        if self._num_samples == 0:
            raise EvaluationError(
                f"{self._name}: no samples seen; call update() first with at least one batch of predictions and labels."
            )

    @abc.abstractmethod
    def _update(self, preds: Any, labels: Any) -> int:
        """Check one batch, accumulate it and return its number of samples."""

    @abc.abstractmethod
    def _compute(self) -> float:
        """The value over the accumulated state (called only after at least one sample)."""

    @abc.abstractmethod
    def _reset(self) -> None:
        """Clear the accumulated state."""
