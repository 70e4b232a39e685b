"""Classification metrics: top-k accuracy, F1 and the Matthews correlation coefficient."""

from __future__ import annotations

from typing import Any

import numpy as np

from inc_core._checks import check_choice, check_int
from inc_core.errors import ConfigError, DatasetError
from inc_core.metrics._base import Metric
from inc_core.metrics._inputs import (
    check_class_range,
    check_finite_labels,
    check_finite_preds,
    check_same_samples,
    class_ids,
    to_array,
)

__all__ = ["TopK", "F1", "MCC", "F1_AVERAGES"]

F1_AVERAGES = ("binary", "macro", "micro")


class TopK(Metric):
    """Top-k accuracy: the fraction of samples whose true class is among the k highest scores.

    ``preds`` are scores of shape (N, C) (logits or probabilities), or predicted class ids of
    shape (N,) when ``k == 1``. ``labels`` are class ids of shape (N,) or one-hot rows of shape
    (N, C). Ties between scores are broken towards the lower class index, so ``TopK(k=1)`` is
    exactly the accuracy of ``preds.argmax(axis=1)``.

    Args:
        k: how many of the highest-scoring classes count as a hit (>= 1).
    """

    higher_is_better = True

    def __init__(self, *, k: int = 1) -> None:
        check_int("TopK", "k", k, minimum=1)
        self.k = k
        super().__init__()

    def _params(self) -> dict[str, Any]:
        return {"k": self.k}

    def _reset(self) -> None:
        self._hits = 0

    def _update(self, preds: Any, labels: Any) -> int:
        owner = self._name
        p = to_array(preds, owner=owner, name="preds")
        y = to_array(labels, owner=owner, name="labels")
        n = check_same_samples(owner, p, y)
        check_finite_preds(owner, p)
        check_finite_labels(owner, y)
        if p.ndim == 1 or (p.ndim == 2 and p.shape[1] == 1):
            if self.k != 1:
                raise DatasetError(
                    f"{owner}(k={self.k}): preds of shape {p.shape} are class ids, which only support k=1; "
                    "pass the scores of shape (N, C) for top-k accuracy."
                )
            pred_ids = class_ids(p, owner=owner, name="preds")
            true_ids = class_ids(y, owner=owner, name="labels")
            hits = int(np.count_nonzero(pred_ids == true_ids))
        elif p.ndim == 2:
            num_classes = p.shape[1]
            if self.k > num_classes:
                raise DatasetError(
                    f"{owner}(k={self.k}): preds have only {num_classes} classes (shape {p.shape}); "
                    f"choose k <= {num_classes}."
                )
            if y.ndim == 2 and y.shape[1] not in (1, num_classes):
                raise DatasetError(
                    f"{owner}: one-hot labels of shape {y.shape} do not match preds with {num_classes} classes "
                    f"(shape {p.shape}); give class ids of shape (N,) or one-hot rows of width {num_classes}."
                )
            true_ids = class_ids(y, owner=owner, name="labels")
            check_class_range(owner, "labels", true_ids, num_classes)
            true_scores = p[np.arange(n), true_ids][:, None]
            columns = np.arange(num_classes)[None, :]
            # The rank of the true class: classes scoring higher, plus equal scores at a lower index.
            ahead = (p > true_scores) | ((p == true_scores) & (columns < true_ids[:, None]))
            hits = int(np.count_nonzero(ahead.sum(axis=1) < self.k))
        else:
            raise DatasetError(
                f"{owner}: preds of shape {p.shape} are neither scores (N, C) nor class ids (N,); reshape them."
            )
        self._hits += hits
        return n

    def _compute(self) -> float:
        return self._hits / self._num_samples


class _ConfusionCounts:
    """Sparse confusion counts (true class, predicted class) -> samples, for any integer class ids."""

    def __init__(self) -> None:
        self.counts: dict[tuple[int, int], int] = {}
        self.classes: set[int] = set()

    def add(self, true_ids: np.ndarray, pred_ids: np.ndarray) -> None:
        if true_ids.size == 0:
            return
        pairs, counts = np.unique(np.stack([true_ids, pred_ids], axis=1), axis=0, return_counts=True)
        for (t, p), c in zip(pairs.tolist(), counts.tolist()):
            self.counts[(t, p)] = self.counts.get((t, p), 0) + c
            self.classes.update((t, p))

    def matrix(self) -> tuple[np.ndarray, list[int]]:
        """Dense float64 matrix (rows: true, columns: predicted) over the classes seen, sorted."""
        classes = sorted(self.classes)
        index = {c: i for i, c in enumerate(classes)}
        matrix = np.zeros((len(classes), len(classes)), dtype=np.float64)
        for (t, p), c in self.counts.items():
            matrix[index[t], index[p]] += c
        return matrix, classes


def _class_pair(owner: str, preds: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = to_array(preds, owner=owner, name="preds")
    y = to_array(labels, owner=owner, name="labels")
    check_same_samples(owner, p, y)
    check_finite_preds(owner, p)
    check_finite_labels(owner, y)
    return class_ids(y, owner=owner, name="labels"), class_ids(p, owner=owner, name="preds")


class F1(Metric):
    """F1 score (harmonic mean of precision and recall), like ``sklearn.metrics.f1_score``.

    ``preds`` are predicted class ids of shape (N,) or scores of shape (N, C) (their argmax is
    the prediction); ``labels`` are class ids of shape (N,) or one-hot rows of shape (N, C).
    Class ids may be any integers. An undefined F1 (a class with no true and no predicted
    sample) counts as 0, as scikit-learn does by default.

    Args:
        average: ``"binary"``: the F1 of class ``pos_label`` (at most two classes may occur);
            ``"macro"``: the unweighted mean of per-class F1 over every class seen in labels
            or preds; ``"micro"``: F1 of the pooled counts (equal to accuracy for single-label data).
        pos_label: the positive class for ``average="binary"``.
    """

    higher_is_better = True

    def __init__(self, *, average: str = "binary", pos_label: int = 1) -> None:
        check_choice("F1", "average", average, F1_AVERAGES)
        if isinstance(pos_label, bool) or not isinstance(pos_label, (int, np.integer)):
            raise ConfigError(f"F1: pos_label must be an int class id, got {pos_label!r}.")
        self.average = average
        self.pos_label = int(pos_label)
        super().__init__()

    def _params(self) -> dict[str, Any]:
        return {"average": self.average, "pos_label": self.pos_label}

    def _reset(self) -> None:
        self._counts = _ConfusionCounts()

    def _update(self, preds: Any, labels: Any) -> int:
        true_ids, pred_ids = _class_pair(self._name, preds, labels)
        if self.average == "binary":
            seen = self._counts.classes | set(np.unique(true_ids).tolist()) | set(np.unique(pred_ids).tolist())
            if len(seen) > 2:
                raise DatasetError(
                    f"{self._name}: average='binary' needs at most two classes, but labels and preds hold "
                    f"{sorted(seen)}; use average='macro' or 'micro' for multiclass data."
                )
            if len(seen) == 2 and self.pos_label not in seen:
                raise DatasetError(
                    f"{self._name}: pos_label={self.pos_label} is not one of the classes seen, {sorted(seen)}; "
                    "set pos_label to the positive class."
                )
        self._counts.add(true_ids, pred_ids)
        return int(true_ids.shape[0])

    def _compute(self) -> float:
        matrix, classes = self._counts.matrix()
        tp = np.diag(matrix)
        fp = matrix.sum(axis=0) - tp
        fn = matrix.sum(axis=1) - tp
        if self.average == "micro":
            return _f1(float(tp.sum()), float(fp.sum()), float(fn.sum()))
        if self.average == "binary":
            if self.pos_label not in classes:
                return 0.0
            i = classes.index(self.pos_label)
            return _f1(float(tp[i]), float(fp[i]), float(fn[i]))
        return float(np.mean([_f1(float(a), float(b), float(c)) for a, b, c in zip(tp, fp, fn)]))


def _f1(tp: float, fp: float, fn: float) -> float:
    denominator = 2.0 * tp + fp + fn
    return 2.0 * tp / denominator if denominator else 0.0


class MCC(Metric):
    """Matthews correlation coefficient, binary or multiclass, like ``sklearn.metrics.matthews_corrcoef``.

    ``preds`` are predicted class ids of shape (N,) or scores of shape (N, C) (their argmax is
    the prediction); ``labels`` are class ids of shape (N,) or one-hot rows of shape (N, C).
    The result lies in [-1, 1]; it is 0 when it is undefined (all labels or all predictions
    of one class), as in scikit-learn.
    """

    higher_is_better = True

    def _reset(self) -> None:
        self._counts = _ConfusionCounts()

    def _update(self, preds: Any, labels: Any) -> int:
        true_ids, pred_ids = _class_pair(self._name, preds, labels)
        self._counts.add(true_ids, pred_ids)
        return int(true_ids.shape[0])

    def _compute(self) -> float:
        matrix, _ = self._counts.matrix()
        true_sum = matrix.sum(axis=1)
        pred_sum = matrix.sum(axis=0)
        correct = float(np.trace(matrix))
        total = float(matrix.sum())
        cov_true_pred = correct * total - float(true_sum @ pred_sum)
        cov_pred = total * total - float(pred_sum @ pred_sum)
        cov_true = total * total - float(true_sum @ true_sum)
        if cov_pred * cov_true == 0.0:
            return 0.0
        return cov_true_pred / float(np.sqrt(cov_true * cov_pred))
