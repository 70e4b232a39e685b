"""PT2E: embedding tables stored 8 bits per row, looked up and dequantized row by row.

torchao's PT2E recipes leave ``aten.embedding`` in float, and a dequantize of a constant table would be folded
back into a float constant by inductor's freezing. Here the lookup itself is rewritten: the table becomes a
uint8 constant with a float scale and minimum per row (as torch.ao's ``float_qparams`` tables on FX and dynamic),
and the graph gathers the requested rows of all three and computes ``rows * scale + minimum``. The gather reads
the indices, so nothing folds: the model holds the 8-bit table, a quarter of the float one, and inductor fuses
the gather and the dequantization into one kernel. An ``EmbeddingBag`` lookup gathers and dequantizes the rows its
bags name, then reduces them with the bag op itself over those rows (indices 0..n-1, the same offsets, mode and
per-sample weights), so every mode computes as before; a bag with a ``padding_idx`` is not rewritten.

A table is rewritten only when every reader of it is such a lookup: a language model whose output projection
reads the same weight (tied embeddings) would otherwise hold both the float table and the 8-bit one.
"""

from __future__ import annotations

from typing import Any

import torch

from inc_torch._module_stack import module_path

__all__ = ["TABLE_PREFIX", "is_table_lookup", "quantize_tables", "rows_8bit"]

# Attribute names of the 8-bit tables (and their scales and minimums) on the converted graph module.
TABLE_PREFIX = "_inc_table_"
_EMBEDDING = torch.ops.aten.embedding.default
_BAG = torch.ops.aten.embedding_bag.padding_idx
_BAG_PADDING_ARG = 8


def _attribute(graph_module: torch.fx.GraphModule, target: str) -> Any:
    value: Any = graph_module
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def rows_8bit(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit codes, scale and minimum per row (asymmetric over each row's range; a constant row gets scale 1)."""
    work = table.detach().float()
    low = work.min(dim=1, keepdim=True).values
    span = work.max(dim=1, keepdim=True).values - low
    scale = torch.where(span > 0, span / 255.0, torch.ones_like(span))
    codes = torch.clamp(torch.round((work - low) / scale), 0, 255).to(torch.uint8)
    return codes, scale.to(table.dtype), low.to(table.dtype)


def is_table_lookup(graph_module: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether ``node`` gathers rows of one of the 8-bit tables :func:`quantize_tables` made."""
    if node.op != "call_function" or node.target is not _EMBEDDING or not node.args:
        return False
    table = node.args[0]
    return (
        isinstance(table, torch.fx.Node) and table.op == "get_attr" and str(table.target).startswith(TABLE_PREFIX)
        and getattr(_attribute(graph_module, str(table.target)), "dtype", None) == torch.uint8
    )


def quantize_tables(graph_module: torch.fx.GraphModule, modules: frozenset[str]) -> tuple[list[str], list[str]]:
    """Rewrite the lookups of the ``nn.Embedding``/``nn.EmbeddingBag`` modules ``modules`` into 8-bit row lookups, in place.

    Returns:
        The module names whose tables became 8-bit, and those whose tables stayed float because something
        other than a lookup reads them.
    """
    graph = graph_module.graph
    by_table: dict[str, list[torch.fx.Node]] = {}  # by attribute: one table may be read through several nodes
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in (_EMBEDDING, _BAG) or module_path(node) not in modules:
            continue
        if node.target is _BAG and len(node.args) > _BAG_PADDING_ARG and node.args[_BAG_PADDING_ARG] is not None:
            continue  # its padding index is left out of each bag: positions 0..n-1 would not say which
        table = node.args[0]
        if isinstance(table, torch.fx.Node) and table.op == "get_attr":
            by_table.setdefault(str(table.target), []).append(node)
    done: list[str] = []
    shared: list[str] = []
    for target, lookups in by_table.items():
        value = _attribute(graph_module, target)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() != 2:
            continue
        reads = [n for n in graph.nodes if n.op == "get_attr" and str(n.target) == target]
        if any(user not in lookups for read in reads for user in read.users):
            # read by more than lookups (an output projection computing with the same weight): the float table
            # stays anyway, and an 8-bit copy beside it would only add memory
            shared.append(module_path(lookups[0]) or target)
            continue
        index = len(done)
        names = {}
        for kind, tensor in zip(("codes", "scale", "low"), rows_8bit(value), strict=True):
            names[kind] = f"{TABLE_PREFIX}{index}_{kind}"
            graph_module.register_buffer(names[kind], tensor)
        for lookup in lookups:
            ids = lookup.args[1]
            with graph.inserting_before(lookup):
                gathered = {kind: graph.call_function(_EMBEDDING, (graph.get_attr(name), ids)) for kind, name in names.items()}
                widened = graph.call_function(torch.ops.aten._to_copy.default, (gathered["codes"],), {"dtype": value.dtype})
                scaled = graph.call_function(torch.ops.aten.mul.Tensor, (widened, gathered["scale"]))
                rows = graph.call_function(torch.ops.aten.add.Tensor, (scaled, gathered["low"]))
                added = [*gathered.values(), widened, scaled, rows]
                if lookup.target is _BAG:
                    # the bag op reduces the gathered rows: row k of ``rows`` is the k-th index of the bags
                    count = graph.call_function(torch.ops.aten.sym_size.int, (ids, 0))
                    dtype = getattr(ids.meta.get("val"), "dtype", torch.int64) if isinstance(ids, torch.fx.Node) else torch.int64
                    positions = graph.call_function(torch.ops.aten.arange.default, (count,), {"dtype": dtype})
                    result = graph.call_function(_BAG, (rows, positions, *lookup.args[2:]))
                    added += [count, positions, result]
                else:
                    result = rows
            for new in added:
                new.meta["nn_module_stack"] = lookup.meta.get("nn_module_stack")
            lookup.replace_all_uses_with(result)
            graph.erase_node(lookup)
        for read in reads:
            graph.erase_node(read)
        owner, _, leaf = target.rpartition(".")
        delattr(graph_module.get_submodule(owner), leaf)  # the float table itself, not only the graph's reads of it
        done.append(module_path(lookups[0]) or target)
    if done:
        graph.lint()
        graph_module.recompile()
    return done, shared
