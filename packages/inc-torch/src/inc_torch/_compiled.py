"""The INT8 module the PT2E path returns: the converted graph, compiled by inductor on first call."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from inc_torch._compat import quiet
from inc_torch._inputs import Inputs

__all__ = ["CompiledQuantizedModule", "drop_unread_state"]


def drop_unread_state(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Delete the parameters, buffers and submodules that no node of the graph reads.

    ``convert_pt2e`` folds each quantized weight into a new int8 constant (``_frozen_param*``) but leaves
    the FP32 weight it came from on the module. ``torch.export`` lifts every attribute of the module into
    the program, so a saved INT8 model would carry both copies (1.25x the FP32 size instead of 0.25x),
    and the model in memory would keep the FP32 weights alive. Changes ``graph_module`` in place.
    """
    graph = graph_module.graph
    # A tensor is in use when a get_attr reads it or a called submodule (or a get_attr'd subgraph,
    # e.g. a torch.cond branch) owns it.
    used = {str(n.target) for n in graph.nodes if n.op in ("get_attr", "call_module")}

    def in_use(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in used for i in range(1, len(parts) + 1))

    unread = [
        name
        for name, _ in (*graph_module.named_parameters(remove_duplicate=False), *graph_module.named_buffers(remove_duplicate=False))
        if not in_use(name)
    ]
    for name in unread:
        owner_path, _, attr = name.rpartition(".")
        owner = graph_module.get_submodule(owner_path) if owner_path else graph_module
        if hasattr(owner, attr):  # a tensor shared under two names is gone after the first
            delattr(owner, attr)
    graph_module.delete_all_unused_submodules()
    return graph_module


class CompiledQuantizedModule(nn.Module):
    """A PT2E INT8 model that runs through ``torch.compile`` with inductor's freezing passes.

    The converted graph (``graph_module``) holds int8 weights between quantize/dequantize ops; inductor's
    x86 passes fuse those patterns into oneDNN INT8 convolutions and matmuls once weights are frozen
    as constants. Compilation happens on the first call (and again for each new input shape, since
    freezing specializes shapes), under ``torch.no_grad()``: this module is for inference.

    The FP32 weights ``convert_pt2e`` leaves behind, which the graph no longer reads, are removed from
    ``graph_module`` (see :func:`drop_unread_state`): the module, and the file :func:`inc.save` writes,
    hold the int8 weights only.

    Args:
        graph_module: the model ``convert_pt2e`` returned.
        example: example inputs ``(args, kwargs)``, kept so that :func:`inc.save` can export the model.
        inductor: run through inductor (``True``) or run ``graph_module`` as is (reference numerics, slow).

    Attributes:
        graph_module: the converted graph; ``inc_torch.quantized_ops`` and ``torch.export`` read it.
    """

    def __init__(self, graph_module: torch.fx.GraphModule, example: Inputs | None = None, *, inductor: bool = True) -> None:
        super().__init__()
        self.graph_module = drop_unread_state(graph_module)
        self.example = example
        self.inductor = inductor
        # Not a registered submodule: the compiled wrapper shares graph_module's parameters and would
        # otherwise list them twice in state_dict().
        self.__dict__["_compiled"] = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.inductor:
            with torch.no_grad():
                return self.graph_module(*args, **kwargs)
        compiled = self.__dict__["_compiled"]
        if compiled is None:
            # Setting the thread count (to its current value) initializes torch's OpenMP pool before
            # inductor's kernels first run; without it they were measured 10-40x slower on some hosts.
            torch.set_num_threads(torch.get_num_threads())
            # Static shapes per compilation: inductor's weight prepacking for INT8 needs them.
            compiled = torch.compile(self.graph_module, dynamic=False)
            self.__dict__["_compiled"] = compiled
        # Freezing turns weights into constants so the INT8 weight prepack is done once at compile time.
        with torch.no_grad(), torch._inductor.config.patch(freezing=True), quiet():
            return compiled(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> CompiledQuantizedModule:
        import copy

        return CompiledQuantizedModule(copy.deepcopy(self.graph_module, memo), copy.deepcopy(self.example, memo), inductor=self.inductor)

    def extra_repr(self) -> str:
        return f"inductor={self.inductor}"
