"""Sparsity patterns and the 2-D view of a weight that structured patterns work on.

Weights use the output-first layout of PyTorch: ``(out, in)`` for a dense layer, ``(out, in, *kernel)``
for a convolution. Structured patterns see a weight as the matrix ``(out, prod(kernel) * in)`` in which
the input channels are the innermost (fastest) dimension: the convolution is moved to ``(out, *kernel, in)``
before flattening. That is the reduction dimension of the implicit GEMM that sparse kernels run, so an
``N:M`` group of ``M`` consecutive columns holds ``M`` input channels at one kernel position (whenever
``M`` divides ``in``), which is what 2:4 sparse tensor cores accelerate. Keras kernels are input-first
(``(in, out)``, ``(kh, kw, in, out)``); move them to this layout first, e.g. ``np.transpose(k, (3, 2, 0, 1))``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np

from inc_core._checks import check_choice, check_int
from inc_core._prune_config import PATTERN_HELP
from inc_core.errors import ConfigError

__all__ = [
    "Unstructured",
    "Block",
    "NOfM",
    "Channel",
    "Pattern",
    "CHANNEL_NORMS",
    "parse_pattern",
    "as_matrix",
    "from_matrix",
    "check_shape",
]

CHANNEL_NORMS = ("l2", "l1")
_PATTERN_RE = re.compile(r"(unstructured)|(channel)|(\d+)x(\d+)|(\d+):(\d+)")


@dataclass(frozen=True, kw_only=True)
class Unstructured:
    """Any element may be pruned; the lowest-scored elements of the whole tensor go first."""

    def __str__(self) -> str:
        return "unstructured"


@dataclass(frozen=True, kw_only=True)
class Block:
    """Blocks of ``rows`` x ``cols`` elements of the 2-D view (rows: output channels) pruned as one.

    Args:
        rows: block height, along the output dimension.
        cols: block width, along the (flattened) input dimension.
    """

    rows: int
    cols: int

    def __post_init__(self) -> None:
        check_int("Block", "rows", self.rows, minimum=1)
        check_int("Block", "cols", self.cols, minimum=1)

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"


@dataclass(frozen=True, kw_only=True)
class NOfM:
    """``n`` of every ``m`` consecutive elements along the input dimension are kept.

    Args:
        n: elements kept per group.
        m: group size; ``0 < n < m``.
    """

    n: int
    m: int

    def __post_init__(self) -> None:
        check_int("NOfM", "n", self.n, minimum=1)
        check_int("NOfM", "m", self.m, minimum=2)
        if self.n >= self.m:
            raise ConfigError(
                f"NOfM: needs n < m (n kept of every m), got n={self.n}, m={self.m}; e.g. NOfM(n=2, m=4)."
            )

    @property
    def implied_sparsity(self) -> float:
        """Sparsity of a tensor in which every group is ``n``-of-``m``: ``1 - n/m``."""
        return (self.m - self.n) / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


@dataclass(frozen=True, kw_only=True)
class Channel:
    """Whole output channels (rows of the 2-D view) pruned, lowest norm of their scores first.

    Args:
        norm: ``"l2"`` or ``"l1"`` norm of a row's scores.
    """

    norm: str = "l2"

    def __post_init__(self) -> None:
        check_choice("Channel", "norm", self.norm, CHANNEL_NORMS)

    def __str__(self) -> str:
        return "channel"


Pattern: TypeAlias = Unstructured | Block | NOfM | Channel
_PATTERN_TYPES = (Unstructured, Block, NOfM, Channel)


def parse_pattern(pattern: str | Pattern) -> Pattern:
    """Parse a pattern string of :class:`~inc_core.PruneConfig` (a pattern object is returned as is).

    Args:
        pattern: :data:`~inc_core._prune_config.PATTERN_HELP`.

    Returns:
        :class:`Unstructured`, :class:`Block`, :class:`NOfM` or :class:`Channel` (L2 norm).

    Raises:
        ConfigError: for anything else, listing the accepted forms.
    """
    if isinstance(pattern, _PATTERN_TYPES):
        return pattern
    match = _PATTERN_RE.fullmatch(pattern) if isinstance(pattern, str) else None
    if match is None:
        raise ConfigError(f"Sparsity pattern {pattern!r} is not supported; use {PATTERN_HELP}.")
    if match.group(1):
        return Unstructured()
    if match.group(2):
        return Channel()
    try:
        if match.group(3) is not None:
            return Block(rows=int(match.group(3)), cols=int(match.group(4)))
        return NOfM(n=int(match.group(5)), m=int(match.group(6)))
    except ConfigError as exc:
        raise ConfigError(f"Sparsity pattern {pattern!r} is invalid: {exc} Use {PATTERN_HELP}.") from exc


def as_matrix(array: np.ndarray) -> np.ndarray:
    """The 2-D view ``(out, prod(kernel) * in)`` of an output-first weight (see the module docstring).

    A rank-2 array is returned unchanged; a rank-k array ``(out, in, *kernel)`` becomes
    ``moveaxis(array, 1, -1).reshape(out, -1)``.

    Raises:
        ConfigError: for an array of rank < 2 (structured patterns need an output and an input axis).
    """
    if array.ndim < 2:
        raise ConfigError(
            f"Structured sparsity needs a weight of rank >= 2 laid out (out, in, *kernel), got shape {array.shape}; "
            "use pattern 'unstructured' for it, or leave it dense."
        )
    if array.ndim == 2:
        return array
    return np.moveaxis(array, 1, -1).reshape(array.shape[0], -1)


def from_matrix(matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`as_matrix`: the ``(out, in, *kernel)`` array of the given shape."""
    if len(shape) <= 2:
        return matrix.reshape(shape)
    moved = (shape[0], *shape[2:], shape[1])
    return np.moveaxis(matrix.reshape(moved), -1, 1)


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    cols = 1
    for size in shape[1:]:
        cols *= size
    return shape[0], cols


def check_shape(pattern: str | Pattern, shape: tuple[int, ...]) -> Pattern:
    """Check that ``pattern`` can be applied to a weight of ``shape``; plugins call it before training.

    Returns:
        The parsed pattern.

    Raises:
        ConfigError: naming the shape, its 2-D view and the sizes that must divide it.
    """
    parsed = parse_pattern(pattern)
    shape = tuple(int(s) for s in shape)
    if isinstance(parsed, Unstructured):
        return parsed
    if len(shape) < 2:
        raise ConfigError(
            f"Pattern '{parsed}' needs a weight of rank >= 2 laid out (out, in, *kernel), got shape {shape}; "
            "use pattern 'unstructured' for it, or leave the layer dense."
        )
    rows, cols = _matrix_shape(shape)
    view = f"weight of shape {shape} (2-D view {(rows, cols)}, out x in)"
    if isinstance(parsed, Block) and (rows % parsed.rows or cols % parsed.cols):
        raise ConfigError(
            f"Block pattern '{parsed}' does not tile a {view}: {parsed.rows} must divide {rows} and "
            f"{parsed.cols} must divide {cols}. Pick a block that divides both, or leave the layer dense."
        )
    if isinstance(parsed, NOfM) and cols % parsed.m:
        raise ConfigError(
            f"N:M pattern '{parsed}' needs the input dimension of a {view} to be a multiple of {parsed.m}, "
            f"got {cols}. Leave the layer dense (exclude it) or choose M dividing {cols}."
        )
    return parsed
