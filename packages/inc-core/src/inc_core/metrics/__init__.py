"""Streaming evaluation metrics, for the ``eval_fn`` that accuracy-driven tuning calls.

Every metric follows one protocol: ``update(preds, labels)`` once per batch, ``result()`` for
the value over every sample seen, ``reset()`` to start over, and a ``higher_is_better`` class
attribute to pass on to :class:`inc_core.TuningConfig`::

    metric = inc.metrics.TopK(k=1)
    def eval_fn(model):
        metric.reset()
        for inputs, labels in dataset:
            metric.update(model(inputs), labels)
        return metric.result()

Inputs may be numpy arrays, nested lists, or CPU framework tensors. Results match
scikit-learn / scipy on the same data. Subclass :class:`Metric` for a metric of your own.
"""

from __future__ import annotations

from inc_core.metrics._base import Metric
from inc_core.metrics._classification import F1, MCC, TopK
from inc_core.metrics._loss import Loss
from inc_core.metrics._ranking import ROCAUC, PearsonSpearman
from inc_core.metrics._regression import MAE, MSE, RMSE
from inc_core.metrics._squad import SquadF1, normalize_answer

__all__ = [
    "F1",
    "MAE",
    "MCC",
    "MSE",
    "RMSE",
    "ROCAUC",
    "Loss",
    "Metric",
    "PearsonSpearman",
    "SquadF1",
    "TopK",
    "normalize_answer",
]
