"""Calibration batches of token models checked against the model's own limits.

Each backend finds the limits in its own way (an ONNX graph's Gather tables, a transformers config); the
checks and their messages are one definition here, so every backend says the same thing about the same data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from inc_core.errors import DatasetError


def check_token_ids(values: npt.NDArray[Any], *, name: str, rows: int, table: str, where: str) -> None:
    """Raise DatasetError when an id in ``values`` falls outside ``0..rows - 1``.

    ``table`` says what the ids index, e.g. "the model's table 'embeddings.word_embeddings.weight' of 30522 rows".
    """
    if values.size == 0:
        return
    low, high = int(values.min()), int(values.max())
    if low >= 0 and high < rows:
        return
    bad = low if low < 0 else high
    raise DatasetError(
        f"{where}: input {name!r} holds id {bad}, outside {table} (ids 0..{rows - 1}). Tokenize with the model's "
        "own tokenizer (its vocabulary matches the table), or map unknown tokens to its unk id."
    )


def check_sequence_length(length: int, *, name: str, limit: int, table: str, where: str) -> None:
    """Raise DatasetError when sequences of ``length`` tokens exceed the ``limit`` positions of ``table``."""
    if length <= limit:
        return
    raise DatasetError(
        f"{where}: input {name!r} has sequences of {length} tokens, but {table} allows at most {limit}. Truncate "
        f"the data to {limit} tokens (e.g. tokenizer(..., truncation=True, max_length={limit}))."
    )


def check_no_empty_samples(mask: npt.NDArray[Any], *, name: str, where: str) -> None:
    """Raise DatasetError naming the samples whose attention ``mask`` is all zeros (padding only)."""
    if mask.ndim < 2 or mask.size == 0:
        return
    empty = np.flatnonzero(~mask.reshape(mask.shape[0], -1).astype(bool).any(axis=1))
    if empty.size:
        raise DatasetError(
            f"{where}: sample(s) {empty.tolist()[:5]} of input {name!r} are all padding (every mask value 0): "
            "such a sample has no token, so every attention score is masked and there is nothing to "
            "calibrate on. Drop empty sequences from the data."
        )
