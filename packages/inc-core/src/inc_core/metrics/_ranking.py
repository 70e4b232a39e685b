"""Rank-based and correlation metrics: ROC AUC, and the mean of Pearson's r and Spearman's rho."""

from __future__ import annotations

from typing import Any

import numpy as np

from inc_core.errors import DatasetError, EvaluationError
from inc_core.metrics._base import Metric
from inc_core.metrics._inputs import (
    check_finite_labels,
    check_finite_preds,
    check_same_samples,
    class_ids,
    paired_values,
    to_array,
)

__all__ = ["ROCAUC", "PearsonSpearman", "average_ranks"]


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array, tied values sharing the mean of their ranks (``scipy.stats.rankdata``)."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts_group = np.concatenate(([True], ordered[1:] != ordered[:-1]))
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.append(starts[1:], values.size)
    # A group at sorted positions starts..ends-1 holds the 1-based ranks starts+1..ends.
    mean_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


class _Collected(Metric):
    """Keeps every (pred, label) pair: these metrics need all samples at once, not running sums."""

    def _reset(self) -> None:
        self._preds: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def _add(self, preds: np.ndarray, labels: np.ndarray) -> int:
        self._preds.append(preds)
        self._labels.append(labels)
        return int(preds.shape[0])

    def _collected(self) -> tuple[np.ndarray, np.ndarray]:
        self._require_samples()
        if len(self._preds) > 1:
            # Concatenate once, so reading several results does not repeat the copy.
            self._preds = [np.concatenate(self._preds)]
            self._labels = [np.concatenate(self._labels)]
        return self._preds[0], self._labels[0]


class ROCAUC(_Collected):
    """Area under the ROC curve for binary classification, like ``sklearn.metrics.roc_auc_score``.

    ``preds`` are scores of the positive class, shape (N,) (probabilities, logits or any score
    where larger means more likely positive), or (N, 2) two-class scores whose column 1 is used.
    ``labels`` are 0/1 (or boolean) of shape (N,), or one-hot rows of shape (N, 2). Tied scores
    count half, exactly as scikit-learn's trapezoidal ROC curve does.

    :meth:`result` raises :class:`~inc_core.errors.DatasetError` while the labels seen hold only
    one class, as ROC AUC is then undefined.
    """

    higher_is_better = True

    def _update(self, preds: Any, labels: Any) -> int:
        owner = self._name
        p = to_array(preds, owner=owner, name="preds")
        y = to_array(labels, owner=owner, name="labels")
        check_same_samples(owner, p, y)
        check_finite_preds(owner, p)
        check_finite_labels(owner, y)
        if p.ndim == 2 and p.shape[1] in (1, 2):
            p = p[:, -1]
        if p.ndim != 1:
            raise DatasetError(
                f"{owner}: preds of shape {p.shape} are not binary scores; give the positive-class scores of "
                "shape (N,) or two-class scores of shape (N, 2)."
            )
        if y.ndim == 2 and y.shape[1] > 2:
            raise DatasetError(
                f"{owner}: labels of shape {y.shape} have {y.shape[1]} classes, but ROC AUC here is binary; give "
                "0/1 labels of shape (N,) or one-hot rows of shape (N, 2)."
            )
        ids = class_ids(y, owner=owner, name="labels")
        if bool(np.any((ids != 0) & (ids != 1))):
            raise DatasetError(
                f"{owner}: labels must be 0 or 1 (binary classification), got {np.unique(ids).tolist()}; map the "
                "positive class to 1 and the rest to 0."
            )
        return self._add(p.astype(np.float64), ids)

    def _compute(self) -> float:
        scores, labels = self._collected()
        positives = int(np.count_nonzero(labels))
        negatives = labels.size - positives
        if positives == 0 or negatives == 0:
            present = 1 if positives else 0
            raise DatasetError(
                f"{self._name}: all {labels.size} labels seen are {present}; ROC AUC is undefined with a single "
                "class, so evaluate on data that holds both positive and negative samples."
            )
        # Mann-Whitney U: the chance a random positive outscores a random negative, ties counting half.
        ranks = average_ranks(scores)
        rank_sum = float(ranks[labels == 1].sum())
        return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    xc = x - x.mean()
    yc = y - y.mean()
    r = float(xc @ yc) / float(np.sqrt((xc @ xc) * (yc @ yc)))
    return max(-1.0, min(1.0, r))


class PearsonSpearman(_Collected):
    """Mean of Pearson's r and Spearman's rho between predictions and labels (the GLUE STS-B score).

    ``preds`` and ``labels`` hold one number per sample, shape (N,) or (N, 1). Spearman's rho
    is Pearson's r of the ranks, tied values sharing their mean rank. Both parts are
    available as :attr:`pearson` and :attr:`spearman`.

    Correlation is undefined when either side is constant: :meth:`result` then raises
    :class:`~inc_core.errors.DatasetError` for constant labels and
    :class:`~inc_core.errors.EvaluationError` for constant predictions.
    """

    higher_is_better = True

    def _update(self, preds: Any, labels: Any) -> int:
        p, y = paired_values(self._name, preds, labels)
        if p.shape[1] != 1:
            raise DatasetError(
                f"{self._name}: expects one value per sample, got {p.shape[1]} per sample; give preds and labels "
                "of shape (N,) or (N, 1)."
            )
        return self._add(p[:, 0], y[:, 0])

    def _checked(self) -> tuple[np.ndarray, np.ndarray]:
        preds, labels = self._collected()
        if labels.min() == labels.max():
            raise DatasetError(
                f"{self._name}: all {labels.size} labels seen equal {float(labels[0]):.6g}; correlation is undefined for "
                "constant labels, so evaluate on data with varying targets."
            )
        if preds.min() == preds.max():
            raise EvaluationError(
                f"{self._name}: all {preds.size} predictions equal {float(preds[0]):.6g}; correlation is undefined for a "
                "constant prediction (the model's output does not vary with its input)."
            )
        return preds, labels

    @property
    def pearson(self) -> float:
        """Pearson's r over every sample seen."""
        preds, labels = self._checked()
        return _pearson(preds, labels)

    @property
    def spearman(self) -> float:
        """Spearman's rho over every sample seen."""
        preds, labels = self._checked()
        return _pearson(average_ranks(preds), average_ranks(labels))

    def _compute(self) -> float:
        return (self.pearson + self.spearman) / 2.0
