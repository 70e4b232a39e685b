"""Small edits of a captured (exported, not yet prepared) graph, shared by the PT2E layer rewrites
(:mod:`inc_torch.ptq._conv1d`, :mod:`inc_torch.ptq._conv_transpose`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["STALE_META", "attribute", "layer_name", "set_attribute"]

# Metadata that would describe the replaced op wrongly on the nodes that replace it (shapes, the source partition).
STALE_META = ("val", "tensor_meta", "source_fn_stack", "example_value")


def layer_name(node: torch.fx.Node) -> str:
    """The module path of the layer that called ``node`` (its name in ``inc.describe``), else the node's name."""
    stack = node.meta.get("nn_module_stack")
    return str(list(stack.values())[-1][0]) if stack else node.name


def attribute(graph_module: torch.fx.GraphModule, target: str) -> Any:
    """The tensor a ``get_attr`` node with this target reads."""
    value: Any = graph_module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def set_attribute(graph_module: torch.fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Replace the tensor at ``target``, a parameter staying a parameter (with its ``requires_grad``)."""
    owner, _, name = target.rpartition(".")
    module = graph_module.get_submodule(owner) if owner else graph_module
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        delattr(module, name)
        module.register_parameter(name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(module, name, value)
