"""Conv + batch-norm folding in PT2E QAT convert, without exporting patterns for conv kinds the model lacks.

torchao's ``convert_pt2e`` folds each QAT conv + batch-norm pair by pattern matching. For every one of four conv
kinds (conv1d, conv2d, conv_transpose1d, conv_transpose2d) it exports 12 match and 12 replacement patterns with
``torch.export`` (strict), about 0.25 s each, whether or not the model holds that kind of conv: on the digits CNN of
the tests (conv2d only) convert took 29 s, 6 s with the three absent kinds skipped. A pattern of one kind can only
match a graph that calls that kind's aten op, so the fold for a kind the graph does not call is skipped: its
cheap graph steps still run, the pattern exports do not. The folded graph is the one torchao builds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["folding_only_present_conv_kinds"]


def _aten_packets() -> dict[Callable[..., Any], Any]:
    aten = torch.ops.aten
    return {
        F.conv1d: aten.conv1d,
        F.conv2d: aten.conv2d,
        F.conv_transpose1d: aten.conv_transpose1d,
        F.conv_transpose2d: aten.conv_transpose2d,
    }


def _calls(graph_module: torch.fx.GraphModule, packet: Any) -> bool:
    return any(getattr(node.target, "overloadpacket", None) is packet for node in graph_module.graph.nodes)


@contextlib.contextmanager
def folding_only_present_conv_kinds() -> Iterator[None]:
    """Within the block, torchao's QAT conv-bn fold skips the conv kinds the graph does not call.

    Where torchao's internals differ from what this expects (another release), nothing is patched and
    ``convert_pt2e`` runs as torchao ships it.
    """
    try:
        from torchao.quantization.pt2e import qat_utils

        original = qat_utils._fold_conv_bn_qat_helper
        duplicate_dequantize = qat_utils._duplicate_dequantize_node
        remove_extra_dequantize = qat_utils._remove_extra_dequantize
    except (ImportError, AttributeError):
        yield
        return
    packets = _aten_packets()

    def fold(m: torch.fx.GraphModule, conv_fn: Callable[..., Any], example_inputs: Any, is_cuda: bool) -> Any:
        packet = packets.get(conv_fn)
        if packet is None or _calls(m, packet):
            return original(m, conv_fn, example_inputs, is_cuda=is_cuda)
        # The helper's own steps around a match that finds nothing, so the graph leaves as it would have.
        m.graph.eliminate_dead_code()
        m.recompile()
        duplicate_dequantize(m)
        m.recompile()
        remove_extra_dequantize(m)
        m.graph.eliminate_dead_code()
        m.recompile()
        return m

    qat_utils._fold_conv_bn_qat_helper = fold
    try:
        yield
    finally:
        qat_utils._fold_conv_bn_qat_helper = original
