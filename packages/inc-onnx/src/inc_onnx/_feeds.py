"""Turn a dataset batch (array, tuple or mapping) into ORT feeds, checking names, dtypes and shapes first."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from inc_core._dataset import LABELS_HINT
from inc_core.errors import DatasetError
from inc_onnx._preprocess import InputSpec

__all__ = ["to_feeds"]


def to_feeds(batch: Any, specs: Sequence[InputSpec], *, where: str = "calibration batch") -> dict[str, np.ndarray]:
    """Map one batch onto the model's inputs.

    A single array feeds a single-input model, a tuple feeds inputs in graph order, a mapping feeds
    inputs by name. Arrays of the same kind as the input (float to float, integer to integer) are cast
    to the input's dtype; anything else is an error, as is a rank or fixed dimension that differs.

    Raises:
        DatasetError: naming the input, what was given and what the model expects.
    """
    expected = ", ".join(spec.describe() for spec in specs)
    if isinstance(batch, Mapping):
        given = {str(k): v for k, v in batch.items()}
        names = [s.name for s in specs]
        unknown = sorted(set(given) - set(names))
        missing = [n for n in names if n not in given]
        if unknown or missing:
            raise DatasetError(
                f"{where}: input names do not match the model. Unknown: {unknown or 'none'}; missing: "
                f"{missing or 'none'}. The model's inputs are {expected}; key the data by these names."
            )
        arrays = [given[s.name] for s in specs]
    elif isinstance(batch, (tuple, list)):
        if len(batch) != len(specs):
            raise DatasetError(
                f"{where}: {len(batch)} positional arrays for a model with {len(specs)} inputs ({expected}). "
                "Give one array per input, in this order, or a mapping input name -> array."
                + (f" {LABELS_HINT}" if len(batch) == len(specs) + 1 else "")
            )
        arrays = list(batch)
    else:
        if len(specs) != 1:
            raise DatasetError(
                f"{where}: a single array was given but the model has {len(specs)} inputs ({expected}); give a "
                "mapping input name -> array (or an .npz file with these names)."
            )
        arrays = [batch]
    return {spec.name: _check(spec, value, where) for spec, value in zip(specs, arrays)}


def _check(spec: InputSpec, value: Any, where: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except Exception as exc:  # numpy raises several types for ragged or odd objects
        raise DatasetError(f"{where}: input {spec.name!r} could not be made an array ({exc}).") from exc
    if array.dtype != spec.dtype:
        # An ONNX string input holds Python strings (dtype object); numpy makes str arrays of fixed width
        # (dtype '<U5') from a list of strings, which ORT also takes: the same text, so converted.
        text = spec.dtype.kind == "O" and array.dtype.kind in "US"
        if not text and (array.dtype.kind != spec.dtype.kind or array.dtype.kind not in "fiub"):
            target = "object" if spec.dtype.kind == "O" else f"np.{spec.dtype.name}"
            raise DatasetError(
                f"{where}: input {spec.name!r} has dtype {array.dtype}, but the model expects {spec.dtype} "
                f"({spec.describe()}). Convert the data, e.g. array.astype({target})."
            )
        array = array.astype(spec.dtype)
    if spec.shape is not None:
        if array.ndim != len(spec.shape):
            raise DatasetError(
                f"{where}: input {spec.name!r} has shape {array.shape} (rank {array.ndim}), but the model "
                f"expects rank {len(spec.shape)} ({spec.describe()}). Batches include the batch axis."
            )
        bad = [
            (axis, dim, got)
            for axis, (dim, got) in enumerate(zip(spec.shape, array.shape))
            if isinstance(dim, int) and dim > 0 and dim != got
        ]
        if bad:
            detail = "; ".join(f"axis {a}: expected {d}, got {g}" for a, d, g in bad)
            raise DatasetError(
                f"{where}: input {spec.name!r} has shape {array.shape}, but the model expects {spec.describe()} "
                f"({detail})."
            )
    return np.ascontiguousarray(array)
