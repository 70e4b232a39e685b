"""Masks from scores: the single numpy definition of which weights a pattern prunes.

Conventions shared by every pattern:

- ``True`` in a mask means kept, ``False`` pruned; a mask has the shape of its scores.
- The importance of an element is ``|score|``: criteria return non-negative scores, and raw
  weights can be passed directly for magnitude pruning.
- Counts are exact: a pattern prunes ``round(sparsity * units)`` units (elements, blocks, rows or
  groups), with Python's ``round`` (half to even).
- Ties are broken by position: among equal scores the unit with the lower index (C order of the
  tensor for elements, of the 2-D view for blocks, rows and groups) is pruned first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from inc_core.errors import ConfigError
from inc_core.sparsity._patterns import (
    Block,
    Channel,
    NOfM,
    Pattern,
    Unstructured,
    as_matrix,
    check_shape,
    from_matrix,
)

__all__ = ["compute_mask", "compute_masks", "sparsity_of"]


def _check_sparsity(sparsity: Any) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.integer, np.floating)):
        raise ConfigError(f"compute_mask: sparsity must be a number in [0, 1], got {sparsity!r}.")
    value = float(sparsity)
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"compute_mask: sparsity must be in [0, 1] (fraction of weights pruned), got {value}.")
    return value


def _importance(scores: ArrayLike) -> np.ndarray:
    raw = np.asarray(scores)
    if not np.issubdtype(raw.dtype, np.number) or np.issubdtype(raw.dtype, np.complexfloating):
        raise ConfigError(f"compute_mask: scores must be real numbers, got an array of dtype {raw.dtype}.")
    # Integers are scored as floats so that |min int| cannot wrap around.
    array: np.ndarray = np.abs(raw if np.issubdtype(raw.dtype, np.floating) else raw.astype(np.float64))
    if np.isnan(array).any():
        raise ConfigError(
            f"compute_mask: scores of shape {array.shape} hold NaN; the weights or gradients they come from "
            "diverged. Check the learning rate or the loss before pruning."
        )
    return array


def _lowest(values: np.ndarray, count: int) -> np.ndarray:
    """Boolean mask of the ``count`` lowest entries of a 1-D array; lower index first among ties.

    Equal to taking the first ``count`` indices of a stable argsort, in linear time: everything
    below the ``count``-th smallest value, then the leftmost entries equal to it.
    """
    chosen = np.zeros(values.shape, dtype=bool)
    if count <= 0:
        return chosen
    if count >= values.size:
        chosen[:] = True
        return chosen
    threshold = np.partition(values, count - 1)[count - 1]
    chosen |= values < threshold
    missing = count - int(np.count_nonzero(chosen))
    chosen[np.flatnonzero(values == threshold)[:missing]] = True
    return chosen


def _unstructured(importance: np.ndarray, sparsity: float) -> np.ndarray:
    flat = importance.reshape(-1)
    return ~_lowest(flat, round(sparsity * flat.size)).reshape(importance.shape)


def _block(matrix: np.ndarray, pattern: Block, sparsity: float) -> np.ndarray:
    rows, cols = matrix.shape
    r, c = pattern.rows, pattern.cols
    # (rows/r, r, cols/c, c): axes 1 and 3 run inside a block.
    blocks = matrix.reshape(rows // r, r, cols // c, c)
    block_scores = blocks.sum(axis=(1, 3), dtype=np.float64).reshape(-1)
    keep_blocks = ~_lowest(block_scores, round(sparsity * block_scores.size))
    grid = keep_blocks.reshape(rows // r, 1, cols // c, 1)
    return np.broadcast_to(grid, blocks.shape).reshape(rows, cols)


def _channel(matrix: np.ndarray, pattern: Channel, sparsity: float) -> np.ndarray:
    values = matrix.astype(np.float64)
    norms = np.sqrt((values * values).sum(axis=1)) if pattern.norm == "l2" else values.sum(axis=1)
    keep_rows = ~_lowest(norms, round(sparsity * matrix.shape[0]))
    return np.broadcast_to(keep_rows[:, None], matrix.shape)


def _n_of_m(matrix: np.ndarray, pattern: NOfM, sparsity: float) -> np.ndarray:
    implied = pattern.implied_sparsity
    # Tolerance: a schedule ending at the implied sparsity may carry float rounding.
    if sparsity > implied + 1e-9:
        raise ConfigError(
            f"compute_mask: pattern '{pattern}' keeps {pattern.n} of every {pattern.m} weights, so sparsity "
            f"cannot exceed {implied:g}; got {sparsity:g}. Use target_sparsity <= {implied:g} "
            f"(it is implied by the pattern) or a pattern with a smaller N/M."
        )
    n, m = pattern.n, pattern.m
    groups = matrix.reshape(-1, m)
    order = np.argsort(groups, axis=1, kind="stable")[:, : m - n]
    # Cost of making a group N:M: the importance it loses. Below the implied sparsity only the
    # cheapest groups are made N:M, so an iterative schedule ramps by the fraction of groups.
    cost = np.take_along_axis(groups, order, axis=1).sum(axis=1, dtype=np.float64)
    fraction = min(sparsity / implied, 1.0)
    chosen = np.flatnonzero(_lowest(cost, round(fraction * groups.shape[0])))
    keep = np.ones(groups.shape, dtype=bool)
    keep[chosen[:, None], order[chosen]] = False
    return keep.reshape(matrix.shape)


def compute_mask(scores: ArrayLike, pattern: str | Pattern, sparsity: float) -> np.ndarray:
    """Mask (``True`` = kept) that prunes the lowest ``|scores|`` of one tensor under ``pattern``.

    Args:
        scores: importance of each weight (same shape as the weight, output-first layout; see
            :mod:`inc_core.sparsity`). Use ``np.abs(weight)`` or a criterion's ``scores()``.
        pattern: a pattern object or string (``"unstructured"``, ``"4x1"``, ``"2:4"``, ``"channel"``).
        sparsity: fraction pruned, in [0, 1]. Per pattern:

            - unstructured: exactly ``round(sparsity * size)`` elements pruned.
            - ``Block(rows, cols)``: blocks of the 2-D view scored by the sum of ``|scores|``;
              ``round(sparsity * n_blocks)`` blocks pruned.
            - ``NOfM(n, m)``: along the input dimension every group of ``m`` consecutive elements
              keeps its ``n`` largest. ``sparsity`` may not exceed ``1 - n/m`` (:class:`ConfigError`);
              below it, only ``round(sparsity / (1 - n/m) * n_groups)`` groups are made N:M,
              those that lose the least importance, the rest stay dense. At ``1 - n/m`` all are.
            - ``Channel(norm)``: ``round(sparsity * out)`` rows of the 2-D view with the lowest
              L2 (or L1) norm of their scores pruned.

    Returns:
        A boolean array of the shape of ``scores``.

    Raises:
        ConfigError: for an unknown pattern, a pattern that does not fit the shape (block not
            dividing, input dimension not a multiple of M, rank < 2 for structured patterns),
            a sparsity out of range, or NaN scores.
    """
    importance = _importance(scores)
    parsed = check_shape(pattern, importance.shape)
    value = _check_sparsity(sparsity)
    if isinstance(parsed, Unstructured):
        return _unstructured(importance, value)
    matrix = as_matrix(importance)
    if isinstance(parsed, Block):
        keep = _block(matrix, parsed, value)
    elif isinstance(parsed, NOfM):
        keep = _n_of_m(matrix, parsed, value)
    else:
        keep = _channel(matrix, parsed, value)
    return np.ascontiguousarray(from_matrix(keep, importance.shape))


def compute_masks(scores: Mapping[str, ArrayLike], pattern: str | Pattern, sparsity: float) -> dict[str, np.ndarray]:
    """:func:`compute_mask` for each named tensor (every tensor reaches ``sparsity`` on its own).

    Raises:
        ConfigError: as :func:`compute_mask`, with the tensor's name in the message.
    """
    masks: dict[str, np.ndarray] = {}
    for name, value in scores.items():
        try:
            masks[name] = compute_mask(value, pattern, sparsity)
        except ConfigError as exc:
            raise ConfigError(f"Layer {name!r}: {exc}") from exc
    return masks


def sparsity_of(array: ArrayLike) -> float:
    """Fraction of exact zeros in ``array`` (of ``False`` for a boolean mask); 0.0 for an empty array."""
    values = np.asarray(array)
    if values.size == 0:
        return 0.0
    return (values.size - int(np.count_nonzero(values))) / values.size
