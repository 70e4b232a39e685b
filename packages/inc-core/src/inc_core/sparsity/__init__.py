"""Sparsity math: patterns, masks, pruning criteria and schedules, in numpy.

This is the single definition of which weights a :class:`~inc_core.PruneConfig` prunes and when.
Framework plugins either convert their tensors to numpy and call it, or reimplement it with
tensors and test against it.

Layout: weights are output-first (PyTorch's ``(out, in)`` and ``(out, in, *kernel)``); structured
patterns see them as the 2-D matrix :func:`as_matrix` returns, ``(out, prod(kernel) * in)`` with the
input channels innermost. Masks are boolean, ``True`` = kept.

Example:
    >>> import numpy as np
    >>> from inc_core import sparsity
    >>> w = np.array([[0.1, -0.9, 0.3, 0.05]])
    >>> sparsity.compute_mask(w, "2:4", 0.5)
    array([[False,  True,  True, False]])
"""

from inc_core.sparsity._criteria import (
    Criterion,
    MagnitudeCriterion,
    PatternLockCriterion,
    SnipCriterion,
    SnipMomentumCriterion,
    make_criterion,
)
from inc_core.sparsity._masks import compute_mask, compute_masks, sparsity_of
from inc_core.sparsity._patterns import (
    CHANNEL_NORMS,
    Block,
    Channel,
    NOfM,
    Pattern,
    Unstructured,
    as_matrix,
    check_shape,
    from_matrix,
    parse_pattern,
)
from inc_core.sparsity._pruner import Pruner
from inc_core.sparsity._report import LayerSparsity, SparsityReport
from inc_core.sparsity._schedule import Schedule, should_update, sparsity_at
from inc_core.sparsity._select import select_layers

__all__ = [
    "CHANNEL_NORMS",
    "Block",
    "Channel",
    "Criterion",
    "LayerSparsity",
    "MagnitudeCriterion",
    "NOfM",
    "Pattern",
    "PatternLockCriterion",
    "Pruner",
    "Schedule",
    "SnipCriterion",
    "SnipMomentumCriterion",
    "SparsityReport",
    "Unstructured",
    "as_matrix",
    "check_shape",
    "compute_mask",
    "compute_masks",
    "from_matrix",
    "make_criterion",
    "parse_pattern",
    "select_layers",
    "should_update",
    "sparsity_at",
    "sparsity_of",
]
