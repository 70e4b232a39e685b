"""Count the ops of a quantized MXNet graph that compute on 8-bit data, from the graph itself."""

from __future__ import annotations

import collections
import json
from typing import Any

__all__ = ["int8_op_counts"]

# oneDNN's fused subgraph ops compute in INT8 when MXNet's quantization pass marked them so.
_FUSED_PREFIX = "_sg_mkldnn_"
# Quantized ops outside the fused subgraphs (pooling, flatten, concat, elementwise add, ...).
_QUANTIZED_PREFIX = "_contrib_quantized_"


def _is_true(value: Any) -> bool:
    return str(value).lower() == "true"


def int8_op_counts(block: Any) -> dict[str, int]:
    """Per op type (``conv``, ``fully_connected``, ``pooling``, ...), the INT8 ops of ``block``'s graph.

    Type conversions (``quantize_v2``, ``requantize``, ``dequantize``) are not counted: they compute
    nothing. A block whose graph is not built yet (a Gluon block never run or hybridized) has none.
    """
    cached = getattr(block, "_cached_graph", ())
    if not cached:
        return {}
    counts: collections.Counter[str] = collections.Counter()
    for node in json.loads(cached[1].tojson())["nodes"]:
        op = node["op"]
        if op.startswith(_FUSED_PREFIX) and _is_true(node.get("attrs", {}).get("quantized")):
            counts[op[len(_FUSED_PREFIX):]] += 1
        elif op.startswith(_QUANTIZED_PREFIX):
            counts[op[len(_QUANTIZED_PREFIX):]] += 1
    return dict(counts)
