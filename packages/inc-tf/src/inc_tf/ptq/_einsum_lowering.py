"""Einsums and batch matmuls with constant weights (MultiHeadAttention's projections) as Reshape + MatMul + Reshape.

TF 2.21 has no quantized Einsum or BatchMatMul kernel, but an einsum that contracts the trailing axes of
its input with the leading axes of a constant weight (``abc,cde->abde``: the query/key/value projections;
``abcd,cde->abe``: the output projection), or a ``BatchMatMulV2`` of a (batch, ..., k) input by a constant
(k, n) matrix (what Keras' TF backend makes of those einsums), is a plain 2-D MatMul on the flattened
input. Written that way in the float graph, the SavedModel target finds it as a MatMul unit and runs it on the int8 MatMul
kernels; with the unit left float it computes the same as the einsum. Einsums between two activations
(attention scores) and other equations are left as they are.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from inc_tf.ptq._int8_units import ConstantFolder, tensor_name

__all__ = ["lower_einsums"]

_FLOAT, _INT32 = 1, 3


def _split(equation: str, weight_rank: int) -> tuple[int, int] | None:
    """(prefix length of the input, contracted axes) when ``equation`` is ``P C, C O -> P O``; else None."""
    if "..." in equation or "->" not in equation or equation.count(",") != 1:
        return None
    inputs, output = equation.replace(" ", "").split("->")
    x, w = inputs.split(",")
    if len(w) != weight_rank or len(set(x)) != len(x) or len(set(w)) != len(w):
        return None
    contracted = [c for c in x if c in w and c not in output]
    k = len(contracted)
    if k == 0 or x[len(x) - k :] != "".join(contracted) or w[:k] != "".join(contracted):
        return None
    prefix, rest = x[: len(x) - k], w[k:]
    if output != prefix + rest or set(prefix) & set(rest):
        return None
    return len(prefix), k


def lower_einsums(graph_def: Any) -> tuple[Any, int]:
    """``graph_def`` with each lowerable einsum or batch matmul replaced, and how many were.

    The final Reshape takes the replaced node's name, so its consumers are unchanged.
    """
    from tensorflow.core.framework import graph_pb2
    from tensorflow.python.framework import tensor_util

    folder = ConstantFolder(graph_def)
    # node -> its input, the 2-D weight, where the input's kept leading dimensions end, the weight's free dimensions
    plans: dict[str, tuple[str, np.ndarray, int, np.ndarray]] = {}
    for node in graph_def.node:
        data = [i for i in node.input if not i.startswith("^")]
        if node.op not in ("Einsum", "BatchMatMulV2") or len(data) != 2 or node.attr["T"].type != _FLOAT:
            continue
        if folder.is_constant(data[0]) or not folder.is_constant(data[1]):
            continue
        weight = folder.values([data[1]])[tensor_name(data[1])]
        if node.op == "BatchMatMulV2":
            if node.attr["adj_x"].b or weight.ndim != 2:
                continue
            matrix = weight.T if node.attr["adj_y"].b else weight
            plans[node.name] = (data[0], matrix, -1, np.asarray(matrix.shape[1:], dtype=np.int32))
            continue
        split = _split(node.attr["equation"].s.decode(), weight.ndim)
        if split is None or split[0] == 0:
            continue
        prefix, k = split
        matrix = weight.reshape(int(np.prod(weight.shape[:k])), -1)
        plans[node.name] = (data[0], matrix, prefix, np.asarray(weight.shape[k:], dtype=np.int32))
    if not plans:
        return graph_def, 0
    out = graph_pb2.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)

    def add(name: str, op: str, inputs: list[str], **types: int) -> Any:
        node = out.node.add(name=name, op=op)
        node.input.extend(inputs)
        for key, value in types.items():
            node.attr[key].type = value
        return node

    def const(name: str, value: np.ndarray) -> str:
        proto = tensor_util.make_tensor_proto(value)
        node = add(name, "Const", [], dtype=proto.dtype)
        node.attr["value"].tensor.CopyFrom(proto)
        return name

    # Projections reading one tensor (a layer's query, key and value) share its flattened view and leading
    # dimensions: one Reshape for all three, so the int8 rewrite quantizes it once, and fewer nodes to optimize.
    flattened: dict[tuple[str, int], str] = {}
    leading: dict[tuple[str, int], str] = {}
    lowered = 0
    for node in graph_def.node:
        if node.name not in plans:
            out.node.add().CopyFrom(node)
            continue
        source, matrix, prefix, free_dims = plans[node.name]
        base = f"{node.name}/lowered"
        rows = int(matrix.shape[0])
        if (source, rows) not in flattened:
            flattened[(source, rows)] = add(
                f"{base}/flatten", "Reshape", [source, const(f"{base}/flat_shape", np.asarray([-1, rows], np.int32))],
                T=_FLOAT, Tshape=_INT32,
            ).name
        flat = flattened[(source, rows)]
        product = add(f"{base}/matmul", "MatMul", [flat, const(f"{base}/weight", matrix.astype(np.float32))], T=_FLOAT)
        product.attr["transpose_a"].b = False
        product.attr["transpose_b"].b = False
        # the output shape: the input's leading (batch, sequence...) dimensions, then the weight's free ones
        if (source, prefix) not in leading:
            shape = add(f"{base}/input_shape", "Shape", [source], T=_FLOAT, out_type=_INT32).name
            leading[(source, prefix)] = add(f"{base}/lead", "StridedSlice", [
                shape, const(f"{base}/begin", np.asarray([0], np.int32)), const(f"{base}/end", np.asarray([prefix], np.int32)),
                const(f"{base}/step", np.asarray([1], np.int32)),
            ], T=_INT32, Index=_INT32).name
        lead = leading[(source, prefix)]
        dims = const(f"{base}/out_dims", free_dims)
        concat = add(f"{base}/out_shape", "ConcatV2", [lead, dims, const(f"{base}/axis", np.asarray(0, np.int32))],
                     T=_INT32, Tidx=_INT32)
        concat.attr["N"].i = 2
        add(node.name, "Reshape", [f"{product.name}:0", f"{concat.name}:0"], T=_FLOAT, Tshape=_INT32)
        lowered += 1
    return out, lowered
