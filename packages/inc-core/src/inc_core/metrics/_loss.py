"""Loss: mean cross-entropy of predicted scores against class labels."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

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

__all__ = ["Loss"]

_log = logging.getLogger("inc")

# Probabilities are clipped here before the log so a confidently wrong sample costs a large but
# finite loss (about 34.5), as scikit-learn's log_loss has long done.
_EPS = 1e-15


class Loss(Metric):
    """Mean cross-entropy (log loss) of the model's scores against the labels, per sample.

    The natural-log cross-entropy of ``torch.nn.CrossEntropyLoss`` / Keras
    ``SparseCategoricalCrossentropy`` / ``sklearn.metrics.log_loss``, averaged over every sample
    seen. To track some other loss, average it in your own ``eval_fn``.

    ``preds`` are scores of shape (N, C), or of shape (N,) for binary classification (the score
    of class 1). ``labels`` are class ids of shape (N,) or target distributions of shape (N, C)
    (one-hot or soft targets; the loss is then ``-sum(target * log p)`` per sample).

    Args:
        from_logits: ``True`` (default): preds are raw logits, turned into probabilities by a
            softmax (a sigmoid for shape (N,)). ``False``: preds are probabilities already;
            each row must sum to 1 (values in [0, 1] for shape (N,)); they are clipped to
            [1e-15, 1 - 1e-15] before the log.
    """

    higher_is_better = False

    def __init__(self, *, from_logits: bool = True) -> None:
        if not isinstance(from_logits, bool):
            raise ConfigError(f"Loss: from_logits must be a bool, got {from_logits!r}.")
        self.from_logits = from_logits
        self._warned = False
        super().__init__()

    def _params(self) -> dict[str, Any]:
        return {"from_logits": self.from_logits}

    def _reset(self) -> None:
        self._total = 0.0

    def _update(self, preds: Any, labels: Any) -> int:
        owner = self._name
        p = to_array(preds, owner=owner, name="preds").astype(np.float64)
        y = to_array(labels, owner=owner, name="labels")
        n = check_same_samples(owner, p, y)
        check_finite_preds(owner, p)
        check_finite_labels(owner, y)
        if p.ndim == 2 and p.shape[1] == 1:
            p = p[:, 0]
        if p.ndim == 1:
            log_probs = self._binary_log_probs(p)
        elif p.ndim == 2:
            log_probs = self._log_probs(p)
        else:
            raise DatasetError(
                f"{owner}: preds of shape {p.shape} are not scores of shape (N, C) or (N,); reshape them."
            )
        num_classes = log_probs.shape[1]
        if y.ndim == 2 and y.shape[1] == num_classes and num_classes > 1:
            targets = y.astype(np.float64)
            if bool(np.any(targets < 0)):
                raise DatasetError(
                    f"{owner}: target distributions in labels must be >= 0, got {float(targets.min()):.6g}."
                )
            # 0 * log(p) is 0 even where p underflowed, so mask instead of multiplying.
            per_sample = -np.where(targets > 0, targets * log_probs, 0.0).sum(axis=1)
        else:
            ids = class_ids(y, owner=owner, name="labels")
            check_class_range(owner, "labels", ids, num_classes)
            per_sample = -log_probs[np.arange(n), ids]
        self._total += float(per_sample.sum())
        return n

    def _binary_log_probs(self, p: np.ndarray) -> np.ndarray:
        """(N, 2) log-probabilities of classes 0 and 1 from the score of class 1."""
        if self.from_logits:
            # log(sigmoid(z)) = -log(1 + exp(-z)), computed without overflow.
            return np.stack([-np.logaddexp(0.0, p), -np.logaddexp(0.0, -p)], axis=1)
        if bool(np.any((p < 0) | (p > 1))):
            raise DatasetError(
                f"{self._name}(from_logits=False): preds of shape {p.shape} must be probabilities in [0, 1], got "
                f"values in [{float(p.min()):.6g}, {float(p.max()):.6g}]; pass from_logits=True for raw logits."
            )
        p = np.clip(p, _EPS, 1.0 - _EPS)
        return np.log(np.stack([1.0 - p, p], axis=1))

    def _log_probs(self, p: np.ndarray) -> np.ndarray:
        if self.from_logits:
            if not self._warned and p.size and bool(np.all(p >= 0)) and np.allclose(p.sum(axis=1), 1.0):
                self._warned = True
                _log.warning(
                    "Loss: preds look like probabilities (rows in [0, 1] summing to 1) but from_logits=True "
                    "applies a softmax to them; use Loss(from_logits=False) for probabilities."
                )
            shifted = p - p.max(axis=1, keepdims=True)
            return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        sums = p.sum(axis=1)
        if bool(np.any((p < 0) | (p > 1))) or not np.allclose(sums, 1.0, rtol=0.0, atol=1e-4):
            raise DatasetError(
                f"{self._name}(from_logits=False): each row of preds must be probabilities summing to 1, got values "
                f"in [{float(p.min()):.6g}, {float(p.max()):.6g}] and row sums in [{float(sums.min()):.6g}, {float(sums.max()):.6g}]; pass from_logits=True "
                "for raw logits."
            )
        return np.log(np.clip(p, _EPS, 1.0 - _EPS))

    def _compute(self) -> float:
        return self._total / self._num_samples
