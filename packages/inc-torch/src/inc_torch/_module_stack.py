"""The module an exported graph's node was called in, as ``torch.export`` records it (``nn_module_stack``)."""

from __future__ import annotations

import torch

__all__ = ["module_path"]


def module_path(node: torch.fx.Node) -> str | None:
    """The dotted path of the innermost module ``node`` was called in; ``None`` for the top-level forward.

    Every pass that names a graph node after its layer (op listing, calibration, BF16, SmoothQuant, embedding
    tables) reads it here, so a node is called by one name everywhere.
    """
    stack = node.meta.get("nn_module_stack")
    path = str(list(stack.values())[-1][0]) if stack else ""
    return path or None
