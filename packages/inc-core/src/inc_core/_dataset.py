"""Dataset: calibration and evaluation samples, as batches of model inputs with optional labels."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np

from inc_core.errors import DatasetError

__all__ = ["Dataset", "Batch", "LABELS_HINT"]

# For a batch holding one value more than the model takes: a DataLoader over a labelled dataset (torch's, Keras'
# tf.data pipelines, INC 2.x's calibration dataloaders) yields (inputs, labels), and the labels are not an input.
LABELS_HINT = (
    "If the last value is the label, as a DataLoader over a labelled dataset yields it, pass "
    "inc.Dataset(loader, labels=True) so that only the inputs reach the model."
)

# One batch of model inputs: an array (single-input model), a tuple of arrays (positional inputs)
# or a mapping input name -> array. Plugins convert it to their framework's tensors.
Batch = np.ndarray | tuple[Any, ...] | Mapping[str, Any]


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, Mapping):
        first = next(iter(inputs.values()), None)
        return _batch_size(first) if first is not None else 0
    if isinstance(inputs, (tuple, list)):
        return _batch_size(inputs[0]) if inputs else 0
    shape = getattr(inputs, "shape", None)
    return int(shape[0]) if shape else 1


class Dataset:
    """Samples for calibration or evaluation.

    Args:
        source: one of
            - a numpy array: the samples along axis 0 (a single-input model);
            - a mapping ``input name -> array`` with the samples along axis 0 (named inputs);
            - a path to an ``.npz`` file (input name -> array, like the mapping);
            - an iterable of ready-made batches, or a zero-argument callable returning a fresh
              iterable (so the data can be read more than once). A batch is an array, a tuple of
              arrays or a mapping; an item ``(batch, label)`` carries a label when ``labels=True``.
        labels: for array/mapping/npz sources, an array of labels aligned with axis 0; for an
            iterable source, ``True`` when each item is a ``(batch, label)`` pair.
        batch_size: samples per batch for array/mapping/npz sources.
        transform: applied to each batch of inputs before it is yielded.

    Iterating yields ``(inputs, label)`` pairs (``label`` is ``None`` without labels).
    """

    def __init__(
        self,
        source: Any,
        *,
        labels: Any = None,
        batch_size: int = 1,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DatasetError(f"Dataset: batch_size must be an int >= 1, got {batch_size!r}.")
        if transform is not None and not callable(transform):
            raise DatasetError(f"Dataset: transform must be callable, got {type(transform).__name__}.")
        self.batch_size = batch_size
        self.transform = transform
        self._arrays: np.ndarray | dict[str, np.ndarray] | None = None
        self._iterable: Any = None
        self._labels: np.ndarray | None = None
        self._paired = False
        if isinstance(source, Dataset):
            raise DatasetError("Dataset: source is already a Dataset; pass it directly instead of wrapping it.")
        if isinstance(source, (str, Path)):
            source = self._read_npz(Path(source))
        if isinstance(source, np.ndarray):
            self._arrays = source
        elif isinstance(source, Mapping):
            self._arrays = {str(k): _as_array(v, f"input {k!r}") for k, v in source.items()}
            if not self._arrays:
                raise DatasetError("Dataset: the input mapping is empty; give at least one input name -> array.")
            sizes = {k: v.shape[0] if v.ndim else None for k, v in self._arrays.items()}
            if None in sizes.values() or len(set(sizes.values())) != 1:
                raise DatasetError(
                    f"Dataset: every input needs the same number of samples along axis 0, got {sizes}."
                )
        elif callable(source) or isinstance(source, Iterable):
            self._iterable = source
            # Identity checks: ``labels`` may be an array, whose ``==`` is elementwise and has no truth value.
            if not (labels is None or labels is True or labels is False):
                raise DatasetError(
                    f"Dataset: for an iterable source, labels must be True (each item is a (batch, label) pair) or "
                    f"None, got a {type(labels).__name__}. An iterable carries its labels in its items: yield "
                    "(batch, label) pairs and pass labels=True, or give the inputs as an array to pair them with "
                    "an array of labels."
                )
            self._paired = bool(labels)
            labels = None
        else:
            raise DatasetError(
                f"Dataset: cannot read samples from a {type(source).__name__}; give a numpy array, a mapping "
                "input name -> array, an .npz path, or an iterable of batches."
            )
        if labels is not None:
            self._labels = _as_array(labels, "labels")
            if self._labels.shape[:1] != (self.num_samples,):
                raise DatasetError(
                    f"Dataset: {self._labels.shape[0] if self._labels.ndim else 0} labels for "
                    f"{self.num_samples} samples; give one label per sample."
                )
        if self._arrays is not None and self.num_samples == 0:
            raise DatasetError("Dataset: the source holds no samples; calibration and evaluation need at least one.")

    @staticmethod
    def _read_npz(path: Path) -> dict[str, np.ndarray]:
        if not path.is_file():
            raise DatasetError(f"Dataset: no file at {str(path)!r}; give an .npz file of input name -> array.")
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except Exception as exc:  # numpy raises several types for a bad archive
            raise DatasetError(f"Dataset: {str(path)!r} is not a readable .npz archive ({exc}).") from exc

    @property
    def num_samples(self) -> int | None:
        """Number of samples, when known without iterating (array/mapping sources)."""
        if isinstance(self._arrays, np.ndarray):
            return int(self._arrays.shape[0]) if self._arrays.ndim else 0
        if isinstance(self._arrays, dict):
            return int(next(iter(self._arrays.values())).shape[0])
        return None

    @property
    def has_labels(self) -> bool:
        return self._labels is not None or self._paired

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        if self._arrays is not None:
            yield from self._iter_arrays()
            return
        items = self._iterable() if callable(self._iterable) else self._iterable
        for item in items:
            if self._paired:
                if not isinstance(item, (tuple, list)) or len(item) != 2:
                    raise DatasetError(f"Dataset: labels=True expects (batch, label) items, got {type(item).__name__}.")
                inputs, label = item
            else:
                inputs, label = item, None
            yield (self.transform(inputs) if self.transform else inputs), label

    def _iter_arrays(self) -> Iterator[tuple[Any, Any]]:
        n = self.num_samples or 0
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            if isinstance(self._arrays, dict):
                inputs: Any = {k: v[start:stop] for k, v in self._arrays.items()}
            else:
                inputs = cast(np.ndarray, self._arrays)[start:stop]
            label = self._labels[start:stop] if self._labels is not None else None
            yield (self.transform(inputs) if self.transform else inputs), label

    def inputs(self, limit: int | None = None) -> Iterator[Any]:
        """The input batches alone, stopping once ``limit`` samples have been yielded.

        The batch that crosses ``limit`` is cut to it when all its arrays hold samples along their first
        dimension (the same size there). A ready-made batch whose arrays differ there (an EmbeddingBag's flat
        indices and offsets next to dense features, a scalar argument) cannot be cut without breaking it,
        so it is yielded whole.

        Raises:
            DatasetError: when the dataset yields no batch at all.
        """
        seen = 0
        for inputs, _ in self:
            if limit is not None and seen >= limit:
                break
            size = _batch_size(inputs)
            if limit is not None and seen + size > limit and _cuttable(inputs):
                inputs = _truncate(inputs, limit - seen)
                size = limit - seen
            seen += size
            yield inputs
        if seen == 0:
            raise DatasetError("Dataset: no samples were produced; calibration needs at least one batch.")

    def __repr__(self) -> str:
        size = self.num_samples
        return f"Dataset(samples={size if size is not None else '?'}, batch_size={self.batch_size}, labels={self.has_labels})"


def _as_array(value: Any, what: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # numpy < 1.24 reads a ragged list as an object array and only warns; newer numpy raises.
            # Raise on both, so a ragged list gets the same error whatever numpy is installed.
            warnings.filterwarnings("error", message=".*ragged nested sequences.*")
            array = np.asarray(value)
    except Exception as exc:  # ragged nested lists, objects numpy cannot convert
        raise DatasetError(
            f"Dataset: {what} ({type(value).__name__}) cannot be read as an array ({exc}); give a numpy array "
            "(or a list of equal-length rows)."
        ) from exc
    if array.dtype == object:
        raise DatasetError(
            f"Dataset: {what} ({type(value).__name__}) is not a numeric array (numpy read it as objects); "
            "give a numpy array of numbers (or a list of equal-length rows)."
        )
    return array


def _leaves(inputs: Any) -> Iterator[Any]:
    if isinstance(inputs, Mapping):
        for value in inputs.values():
            yield from _leaves(value)
    elif isinstance(inputs, (tuple, list)):
        for value in inputs:
            yield from _leaves(value)
    else:
        yield inputs


def _cuttable(inputs: Any) -> bool:
    sizes = {shape[0] if (shape := getattr(leaf, "shape", None)) else None for leaf in _leaves(inputs)}
    return len(sizes) == 1 and None not in sizes


def _truncate(inputs: Any, n: int) -> Any:
    if isinstance(inputs, Mapping):
        return {k: _truncate(v, n) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_truncate(v, n) for v in inputs)
    return inputs[:n]
