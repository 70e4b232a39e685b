"""Turning a batch of predictions and labels into checked numpy arrays."""

from __future__ import annotations

from typing import Any

import numpy as np

from inc_core.errors import DatasetError, EvaluationError


def to_array(value: Any, *, owner: str, name: str) -> np.ndarray:
    """A numeric array (at least 1-D) from numpy data, nested lists or a CPU framework tensor."""
    if isinstance(value, np.ndarray):
        array = value
    else:
        try:
            # Duck-typed so the core never imports a framework: MXNet NDArrays copy out with
            # asnumpy(); torch tensors must leave autograd and the device before numpy sees them.
            if callable(getattr(value, "asnumpy", None)):
                value = value.asnumpy()
            else:
                if callable(getattr(value, "detach", None)):
                    value = value.detach()
                if callable(getattr(value, "cpu", None)):
                    value = value.cpu()
            array = np.asarray(value)
        except (TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise DatasetError(
                f"{owner}: cannot read {name} as an array ({exc}); give a numpy array, a (nested) list of "
                "numbers or a CPU tensor of a numpy-compatible dtype (cast bfloat16 to float32)."
            ) from exc
    if array.dtype != np.bool_ and not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise DatasetError(
            f"{owner}: {name} must hold real numbers, got dtype {array.dtype} of shape {array.shape}; "
            "give a numeric array with one row per sample."
        )
    return np.atleast_1d(array)


def check_same_samples(owner: str, preds: np.ndarray, labels: np.ndarray) -> int:
    """Number of samples in the batch; preds and labels must agree on it (axis 0)."""
    if preds.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{owner}: preds hold {preds.shape[0]} samples (shape {preds.shape}) but labels hold "
            f"{labels.shape[0]} (shape {labels.shape}); give one label per prediction, along axis 0."
        )
    return int(preds.shape[0])


def check_finite_preds(owner: str, preds: np.ndarray) -> None:
    """Non-finite model outputs are a model failure, not a data error."""
    if np.issubdtype(preds.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(preds)))
        if bad:
            raise EvaluationError(
                f"{owner}: preds hold {bad} NaN or Inf values out of {preds.size}; the model's outputs are not "
                "finite, so the metric is undefined."
            )


def check_finite_labels(owner: str, labels: np.ndarray) -> None:
    if np.issubdtype(labels.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(labels)))
        if bad:
            raise DatasetError(
                f"{owner}: labels hold {bad} NaN or Inf values out of {labels.size}; remove or fix those samples."
            )


def class_ids(array: np.ndarray, *, owner: str, name: str) -> np.ndarray:
    """Class ids (int64, shape (N,)) from ids of shape (N,) or (N, 1), or scores / one-hot of shape (N, C).

    Rows of width C >= 2 become the index of their largest entry (the first one on ties, like
    ``numpy.argmax``). Callers check finiteness first.
    """
    if array.ndim == 2 and array.shape[1] >= 2:
        return np.argmax(array, axis=1).astype(np.int64)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise DatasetError(
            f"{owner}: {name} of shape {array.shape} are neither class ids of shape (N,) nor scores or one-hot "
            "rows of shape (N, C); reshape them to one of those."
        )
    if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer):
        return array.astype(np.int64)
    integral = np.isfinite(array) & (array == np.round(array))
    if not bool(np.all(integral)):
        example = array[~integral][0].item()
        raise DatasetError(
            f"{owner}: {name} hold non-integer values such as {example!r}, but 1-D {name} must be class ids; "
            "pass (N, C) scores instead, or threshold probabilities first, e.g. (p > 0.5).astype(int)."
        )
    return array.astype(np.int64)


def check_class_range(owner: str, name: str, ids: np.ndarray, num_classes: int) -> None:
    """Class ids that index score columns must lie in [0, num_classes)."""
    outside = (ids < 0) | (ids >= num_classes)
    if bool(np.any(outside)):
        raise DatasetError(
            f"{owner}: {name} hold class id {int(ids[outside][0])}, outside [0, {num_classes}) for preds with "
            f"{num_classes} score columns; class ids must index the columns of preds."
        )


def paired_values(owner: str, preds: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Float64 preds and labels of shape (N, M), from arrays of the same shape up to size-1 axes."""
    p = to_array(preds, owner=owner, name="preds")
    y = to_array(labels, owner=owner, name="labels")
    check_same_samples(owner, p, y)

    def core(shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape[:1] + tuple(d for d in shape[1:] if d != 1)

    if core(p.shape) != core(y.shape):
        raise DatasetError(
            f"{owner}: preds of shape {p.shape} do not match labels of shape {y.shape}; give one label per "
            "predicted value (the same shape, up to axes of size 1)."
        )
    check_finite_preds(owner, p)
    check_finite_labels(owner, y)
    width = int(np.prod(core(p.shape)[1:], dtype=np.int64))
    n = p.shape[0]
    if width == 0 and n:
        raise DatasetError(f"{owner}: preds of shape {p.shape} hold no values per sample; give at least one.")
    return p.reshape(n, width).astype(np.float64), y.reshape(n, width).astype(np.float64)
