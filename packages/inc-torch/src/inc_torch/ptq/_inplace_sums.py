"""Keep inductor from summing an INT8 Linear's output into a graph input or a model constant in place.

torch 2.13's inductor lowers ``linear -> add`` of a quantized Linear to oneDNN's qlinear with a ``sum`` post-op,
which accumulates into the other summand's buffer in place. Its check (``mkldnn_fusion._qlinear_binary_can_be_inplace``)
lets that buffer be one the compiled program does not own (torchao's own PT2E flow alike):

- a graph input: in a residual ``x + down(...)`` of the model's own input followed by a float op, each call
  overwrote the caller's tensor ``x`` with the sum (a PT2E SmoothQuant decoder block's inputs and its
  calibration batches changed by up to 0.94);
- a constant of the model (frozen): a positional table of the projection's output shape added at batch 1 was
  overwritten, so the first call was right and each later one drifted (cosine 0.66 to FP32 by the third).

While inc compiles an INT8 graph (:func:`sums_kept_out_of_place`), that check also refuses inputs and constants;
the sum then becomes oneDNN's out-of-place ``add`` post-op, as for any summand the check already refuses, at no
extra copy. Those compiles add a marker pass to inductor's cache key, so a program compiled without the
correction (inductor's FX graph cache, by an earlier inc or torchao) is not served to them.

The check is private to inductor: on a torch without it, inc falls back to giving the compiled model copies of
its input tensors (:func:`sums_inputs_with_linears`, :func:`copy_tensor_inputs`; a ``clone`` in the graph does not
help, inductor removes it as a no-op) and to refusing a model whose outputs drift between calls
(``_failures.check_repeatable``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch

__all__ = [
    "CACHE_MARK", "cache_mark_settings", "copy_tensor_inputs", "corrects_inplace_sums", "linears_summed_with", "sums_inputs_with_linears",
    "sums_kept_out_of_place",
]

_aten = torch.ops.aten
_ADDS = (_aten.add.Tensor, _aten.add_.Tensor)

# Part of inductor's and inc's AOTI cache keys for programs compiled with the correction; a new value whenever
# the correction changes what is compiled.
CACHE_MARK = "inc-qlinear-sum-out-of-place-1"


@functools.cache  # each compiled call asks (see sums_kept_out_of_place); the import alone costs ~40 us
def _fusion_module() -> Any | None:
    try:
        from torch._inductor.fx_passes import mkldnn_fusion
    except ImportError:
        return None
    return mkldnn_fusion if callable(getattr(mkldnn_fusion, "_qlinear_binary_can_be_inplace", None)) else None


def corrects_inplace_sums() -> bool:
    """Whether this torch's inductor has the check :func:`sums_kept_out_of_place` corrects."""
    return _fusion_module() is not None


def _owned_by_program(buffer: Any) -> bool:
    """False for a graph input or a constant: a buffer the compiled program must not write into."""
    from torch._inductor import ir

    data = getattr(buffer, "data", buffer)
    if isinstance(data, ir.BaseView):
        data = data.unwrap_view()
    if isinstance(data, ir.StorageBox):
        data = data.data
    return not isinstance(data, (ir.InputBuffer, ir.ConstantBuffer))


@functools.cache
def _cache_mark() -> Any:
    """A post-grad pass that changes nothing: its uuid puts :data:`CACHE_MARK` into inductor's cache key."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class CacheMark(CustomGraphPass):
        def __call__(self, graph: torch.fx.graph.Graph) -> None:
            return None

        def uuid(self) -> Any:
            return CACHE_MARK

    return CacheMark()


def _marked(users: Any) -> Any:
    """The post-grad passes to compile with: the user's own, which run first, and the cache mark."""
    if users is None:
        return _cache_mark()
    try:  # a list of passes is understood by the inductors that have this helper
        from torch._inductor.custom_graph_pass import get_custom_graph_passes
    except ImportError:
        # unmarked; torch 2.13 bypasses its FX graph cache for these graphs anyway (prepacked oneDNN weights
        # cannot be pickled), so the mark guards future caching more than today's
        return users
    return [*get_custom_graph_passes(users), _cache_mark()]


def cache_mark_settings() -> dict[str, Any]:
    """Inductor settings that put :data:`CACHE_MARK` into its cache key, for a compile with the correction."""
    if _fusion_module() is None:
        return {}
    import torch._inductor.config as inductor_config

    return {"post_grad_custom_post_pass": _marked(inductor_config.post_grad_custom_post_pass)}


@contextlib.contextmanager
def sums_kept_out_of_place() -> Iterator[None]:
    """Within: inductor fuses an INT8 Linear's sum in place only into buffers its program owns.

    Entered around every call of a compiled INT8 model (dynamo may compile on any call), so it is cheap: one
    attribute swapped in and out. The settings of :func:`cache_mark_settings` go with it. Does nothing where this
    torch lacks the check (see the module's docstring for the fallbacks).
    """
    fusion = _fusion_module()
    if fusion is None:
        yield
        return
    original = fusion._qlinear_binary_can_be_inplace

    def can_be_inplace(other: Any) -> bool:
        return _owned_by_program(other) and bool(original(other))

    fusion._qlinear_binary_can_be_inplace = can_be_inplace
    try:
        yield
    finally:
        fusion._qlinear_binary_can_be_inplace = original


def linears_summed_with(graph_module: torch.fx.GraphModule, summand: str) -> list[torch.fx.Node]:
    """The Linear nodes whose output an add of the graph sums with a node of op ``summand`` ("placeholder": a
    graph input, "get_attr": a tensor of the model): the sums inductor may accumulate into that summand in place."""
    linears = []
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target not in _ADDS or len(node.args) < 2:
            continue
        operands = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
        if any(a.op == summand for a in operands):
            linears += [a for a in operands if a.target is _aten.linear.default]
    return list(dict.fromkeys(linears))


def sums_inputs_with_linears(graph_module: torch.fx.GraphModule) -> bool:
    """Whether an add of the graph sums a graph input with a Linear's output (what inductor may sum in place)."""
    return bool(linears_summed_with(graph_module, "placeholder"))


def copy_tensor_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's arguments with each tensor (nested ones too) replaced by a copy."""

    def copy(value: Any) -> Any:
        return value.clone() if isinstance(value, torch.Tensor) else value

    return torch.utils._pytree.tree_map(copy, (args, kwargs))
