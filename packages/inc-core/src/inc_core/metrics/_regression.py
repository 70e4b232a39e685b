"""Regression errors: MAE, MSE and RMSE."""

from __future__ import annotations

import abc
import math
from typing import Any

import numpy as np

from inc_core.metrics._base import Metric
from inc_core.metrics._inputs import paired_values

__all__ = ["MAE", "MSE", "RMSE"]


class _MeanError(Metric):
    """Mean of an elementwise error over every predicted value seen.

    ``preds`` and ``labels`` have the same shape, up to axes of size 1 ((N,) and (N, 1) match);
    for multi-output predictions every value counts once (for MAE and MSE that equals
    scikit-learn's ``multioutput="uniform_average"``).
    """

    higher_is_better = False

    def _reset(self) -> None:
        self._total = 0.0
        self._count = 0

    @abc.abstractmethod
    def _error(self, diff: np.ndarray) -> np.ndarray:
        """Elementwise error of ``preds - labels``."""

    def _update(self, preds: Any, labels: Any) -> int:
        p, y = paired_values(self._name, preds, labels)
        self._total += float(np.sum(self._error(p - y)))
        self._count += p.size
        return int(p.shape[0])

    def _compute(self) -> float:
        return self._total / self._count


class MAE(_MeanError):
    """Mean absolute error, like ``sklearn.metrics.mean_absolute_error``."""

    def _error(self, diff: np.ndarray) -> np.ndarray:
        return np.abs(diff)


class MSE(_MeanError):
    """Mean squared error, like ``sklearn.metrics.mean_squared_error``."""

    def _error(self, diff: np.ndarray) -> np.ndarray:
        return np.square(diff)


class RMSE(_MeanError):
    """Root mean squared error, like ``sklearn.metrics.root_mean_squared_error``.

    For multi-output predictions this is the root of the MSE over every value, not the mean of
    per-output roots that scikit-learn's ``multioutput="uniform_average"`` gives.
    """

    def _error(self, diff: np.ndarray) -> np.ndarray:
        return np.square(diff)

    def _compute(self) -> float:
        return math.sqrt(super()._compute())
