"""Small edits of a captured (exported, not yet prepared) graph, shared by the PT2E layer rewrites
(:mod:`inc_torch.ptq._conv1d`, :mod:`inc_torch.ptq._conv_transpose`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["STALE_META", "LayerRewrite", "attribute", "layer_name", "set_attribute"]

log = logging.getLogger("inc")

# Metadata that would describe the replaced op wrongly on the nodes that replace it (shapes, the source partition).
STALE_META = ("val", "tensor_meta", "source_fn_stack", "example_value")


@dataclass(frozen=True)
class LayerRewrite:
    """What a PT2E layer rewrite did: layers rewritten, and layers of its ``kind`` kept FP32 with the reason."""

    kind: str
    rewritten: tuple[str, ...]
    kept: dict[str, str]

    def log(self) -> None:
        """Say which layers stay FP32 on PT2E, and why."""
        for name, reason in self.kept.items():
            log.info("%s %r stays FP32 on format='pt2e': %s", self.kind, name, reason)


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
