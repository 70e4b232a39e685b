"""Keep a model's inputs unchanged by an INT8 Linear whose output is added to them.

torch 2.13's inductor fuses ``linear -> add`` of a quantized Linear into oneDNN's qlinear with a ``sum`` post-op,
which accumulates into the other summand's buffer in place. Its check (``_qlinear_binary_can_be_inplace``) lets
that buffer be a graph input: in a residual ``x + down(...)`` of the model's own input followed by a float op
(SmoothQuant's input multiply in front of the next Linear, or any other), each call overwrote the caller's
tensor ``x`` with the sum (torchao's own PT2E flow alike; a PT2E SmoothQuant decoder block's inputs and its
calibration batches changed by up to 0.94). A ``clone`` in the graph does not help: inductor removes it as a
no-op. So the compiled model is given copies of such a model's input tensors (one copy per call).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["copy_tensor_inputs", "sums_inputs_with_linears"]

_aten = torch.ops.aten
_ADDS = (_aten.add.Tensor, _aten.add_.Tensor)


def sums_inputs_with_linears(graph_module: torch.fx.GraphModule) -> bool:
    """Whether an add of the graph sums a graph input with a Linear's output (what inductor may sum in place)."""
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target not in _ADDS or len(node.args) < 2:
            continue
        left, right = node.args[0], node.args[1]
        for summand, other in ((left, right), (right, left)):
            if (
                isinstance(summand, torch.fx.Node) and summand.op == "placeholder"
                and isinstance(other, torch.fx.Node) and other.target is _aten.linear.default
            ):
                return True
    return False


def copy_tensor_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's arguments with each tensor (nested ones too) replaced by a copy."""

    def copy(value: Any) -> Any:
        return value.clone() if isinstance(value, torch.Tensor) else value

    return torch.utils._pytree.tree_map(copy, (args, kwargs))
