"""Modules the FX path runs in float as opaque calls: excluded activations, and code FX cannot quantize."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

__all__ = ["KeptFloat", "keep_float", "keyword_weight_scopes", "warn_kept_float"]

log = logging.getLogger("inc_torch.ptq")


class KeptFloat(nn.Module):
    """Holds an excluded activation or pooling module as an opaque call, so that it runs in FP32.

    torch.ao's lowering turns dequantize -> Hardswish/ReLU/pool -> quantize into the op on the
    quantized tensor even when the module's qconfig is None (its consumer asks for a quantized
    input); a branch that also reads the module's output in FP32 then fails. Opaque, it matches no
    pattern and gets float inputs.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


# The functional ops whose weight torch.ao's FX patterns find by position (args[1]).
_WEIGHTED_FUNCTIONS = frozenset({
    torch.nn.functional.linear, torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d,
})


def keyword_weight_scopes(prepared: torch.fx.GraphModule) -> list[str]:
    """The modules whose code calls ``F.linear``/``F.conv*`` with ``weight=`` by keyword (timm's BEiT attention:
    ``F.linear(x, weight=self.qkv.weight, bias=qkv_bias)``).

    torch.ao's FX patterns take such a call for a quantizable op and observe its weight at ``args[1]``, which is not
    there: the weight observer sees nothing and convert fails (torch.ao's own flow asserts "Dequantize index 1
    exceeded reference node's arg length 1"). Held opaque (:func:`keep_float`), the module runs in float.
    """
    attrs = prepared.meta.get("_observed_graph_module_attrs")
    scopes = getattr(attrs, "node_name_to_scope", None) or {}
    found: list[str] = []
    for node in prepared.graph.nodes:
        if node.op == "call_function" and node.target in _WEIGHTED_FUNCTIONS and len(node.args) < 2 and "weight" in node.kwargs:
            scope = scopes.get(node.name, ("", None))[0]
            if scope and scope not in found:
                found.append(scope)
    # the outermost only: a module inside one held opaque is held with it
    return [s for s in found if not any(s.startswith(f"{outer}.") for outer in found)]


def keep_float(model: nn.Module, name: str) -> None:
    """Replace the submodule ``name`` of ``model`` by a :class:`KeptFloat` holding it."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, KeptFloat(getattr(parent, child)))


def warn_kept_float(scopes: tuple[str, ...] | list[str]) -> None:
    """Say which modules FX runs in FP32 because of :func:`keyword_weight_scopes`, and the path that does not."""
    log.warning(
        "FX keeps %s in FP32: %s F.linear/F.conv with the weight passed by keyword (weight=...), which "
        "torch.ao's FX patterns cannot see. format='pt2e' quantizes them.",
        ", ".join(repr(s) for s in scopes), "it calls" if len(scopes) == 1 else "they call",
    )
