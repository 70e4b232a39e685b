"""The units the SavedModel int8 rewrite quantizes: a Conv2D, depthwise conv or MatMul with constant weights and what follows it.

A unit is a Conv2D or DepthwiseConv2dNative (NHWC) or MatMul node whose weights are constant, plus the chain
of single-consumer ops after it that fold into one oneDNN int8 kernel: BiasAdd, and Add/Sub/Mul by a
per-channel constant (how Keras' BatchNormalization runs at inference) folded into the weights and bias,
then a Relu or Relu6 (MobileNet's; the kernel's Relu with an output range capped at 6 computes it). The
unit's output is the last op of that chain. A Conv2D chain that ends in ``Relu(Add(conv, other))`` (a
residual block) also records ``other`` as its summand, which the rewrite may fuse into the kernel.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ConstantFolder", "Unit", "consumers", "find_units", "tensor_name"]

_SOURCES = ("Placeholder", "PlaceholderWithDefault", "VarHandleOp", "ReadVariableOp")
# never folded: random ops, and loop plumbing (a lowered while loop is a cycle through Merge/NextIteration)
_STATEFUL = (
    "RandomUniform", "RandomStandardNormal", "TruncatedNormal", "RandomUniformInt", "NoOp",
    "Merge", "NextIteration", "Enter", "Exit", "Switch", "LoopCond",
)


def tensor_name(ref: str) -> str:
    """A node input reference (``"a"``, ``"a:1"``) as a tensor name (``"a:0"``, ``"a:1"``)."""
    return ref if ":" in ref else f"{ref}:0"


def _node_of(ref: str) -> str:
    return ref.lstrip("^").split(":")[0]


class ConstantFolder:
    """Which tensors of a frozen graph are constants, and their values (evaluated once, together)."""

    def __init__(self, graph_def: Any) -> None:
        self.nodes = {n.name: n for n in graph_def.node}
        self._graph_def = graph_def
        self._is_const: dict[str, bool] = {}
        self._values: dict[str, np.ndarray] = {}

    def is_constant(self, ref: str) -> bool:
        memo = self._is_const
        stack = [_node_of(ref)]
        while stack:  # iterative: frozen graphs are deeper than Python's recursion limit
            current = stack[-1]
            if current in memo:
                stack.pop()
                continue
            node = self.nodes.get(current)
            if node is None or node.op in _SOURCES or node.op in _STATEFUL:
                memo[current] = False
                stack.pop()
                continue
            deps = [_node_of(i) for i in node.input if not i.startswith("^")]
            missing = [d for d in deps if d not in memo]
            if missing:
                stack.extend(missing)
                continue
            memo[current] = all(memo[d] for d in deps)
            stack.pop()
        return memo[_node_of(ref)]

    def values(self, refs: Iterable[str]) -> dict[str, np.ndarray]:
        """The value of each constant tensor in ``refs`` (keyed by tensor name)."""
        from tensorflow.python.framework import tensor_util

        refs = list(refs)
        wanted = [tensor_name(r) for r in refs if tensor_name(r) not in self._values]
        computed = []
        for name in dict.fromkeys(wanted):
            node = self.nodes[_node_of(name)]
            if node.op == "Const" and name.endswith(":0"):
                self._values[name] = tensor_util.MakeNdarray(node.attr["value"].tensor)
            else:
                computed.append(name)
        if computed:
            from inc_tf._frozen import graph_function

            fn = graph_function(self._constant_subgraph(computed), (), tuple(computed))
            results = fn()
            for name, value in zip(computed, results if isinstance(results, (list, tuple)) else [results]):
                self._values[name] = np.asarray(value)
        return {tensor_name(r): self._values[tensor_name(r)] for r in refs}

    def _constant_subgraph(self, tensors: list[str]) -> Any:
        """Only the nodes ``tensors`` are computed from: importing a whole encoder's graph took ~1 s per call.

        Not TF's ``extract_sub_graph`` (the rewrite's pruning): it follows control inputs too, and would bring back
        the placeholder a constant's control input hangs from, which cannot run unfed.
        """
        from tensorflow.core.framework import graph_pb2

        keep: set[str] = set()
        stack = [_node_of(t) for t in tensors]
        while stack:
            name = stack.pop()
            if name not in keep:
                keep.add(name)
                stack.extend(_node_of(i) for i in self.nodes[name].input if not i.startswith("^"))
        out = graph_pb2.GraphDef()
        out.versions.CopyFrom(self._graph_def.versions)
        out.library.CopyFrom(self._graph_def.library)
        for node in self._graph_def.node:
            if node.name in keep:
                copy = out.node.add()
                copy.CopyFrom(node)
                # a control input may name a node outside the constant subgraph; constants need no ordering
                data_inputs = [i for i in node.input if not i.startswith("^")]
                del copy.input[:]
                copy.input.extend(data_inputs)
        return out


@dataclass(eq=False)
class Unit:
    """One quantizable node with the ops folded into it.

    Attributes:
        name: the Conv2D/DepthwiseConv2dNative/MatMul node's name (what per-layer settings and fallback refer to).
        op: ``"Conv2D"``, ``"DepthwiseConv2dNative"`` or ``"MatMul"``.
        input: the float tensor the unit reads.
        output: the tensor the unit's last folded op writes (output 0 of node ``output_node``).
        output_node: that node's name; the rewrite gives the unit's float output this name.
        nodes: every node the unit replaces.
        weight: folded float weights (HWIO for Conv2D, (h, w, in, multiplier) for a depthwise conv, (in, out)
            for MatMul).
        bias: folded float bias, one per output channel.
        relu: whether a Relu or Relu6 ends the unit.
        relu6: whether that is a Relu6 (its output never exceeds 6).
        attrs: strides/padding/dilations of a Conv2D.
        summand: the tensor a residual ``Add`` adds before the final Relu (``None`` without one).
        core_nodes: the nodes up to the residual Add (all of :attr:`nodes` without a summand).
    """

    name: str
    op: str
    input: str
    output_node: str
    nodes: list[str]
    weight: np.ndarray = field(repr=False)
    bias: np.ndarray = field(repr=False)
    relu: bool
    attrs: dict[str, Any] = field(default_factory=dict, repr=False)
    summand: str | None = None
    core_nodes: list[str] = field(default_factory=list)
    relu6: bool = False

    @property
    def output(self) -> str:
        return f"{self.output_node}:0"

    @property
    def core_output(self) -> str:
        """The float tensor before the residual Add (the unit's output when it has no summand)."""
        return f"{(self.core_nodes or self.nodes)[-1]}:0"


def consumers(graph_def: Any) -> dict[str, list[Any]]:
    """The nodes reading each node (by name), control inputs included."""
    out: dict[str, list[Any]] = {}
    for node in graph_def.node:
        for ref in node.input:
            out.setdefault(_node_of(ref), []).append(node)
    return out


def _channel_vector(value: np.ndarray, channels: int) -> np.ndarray | None:
    """A constant that broadcasts along the last axis only, as a length-``channels`` vector (else None)."""
    if value.size == 1:
        return np.full(channels, float(value.reshape(())), dtype=np.float64)
    if value.shape[-1] == channels and value.size == channels:
        return value.reshape(channels).astype(np.float64)
    return None


def _other_input(node: Any, current: str) -> str | None:
    data = [i for i in node.input if not i.startswith("^")]
    if len(data) != 2:
        return None
    first, second = data
    if tensor_name(first) == current:
        return second
    if tensor_name(second) == current:
        return first
    return None


def find_units(graph_def: Any, folder: ConstantFolder, outputs: tuple[str, ...]) -> list[Unit]:
    """Every Conv2D/MatMul with constant weights in ``graph_def``, with its folded chain."""
    readers = consumers(graph_def)
    graph_outputs = {_node_of(o) for o in outputs}
    candidates = []
    for node in graph_def.node:
        data = [i for i in node.input if not i.startswith("^")]
        if node.op in ("Conv2D", "DepthwiseConv2dNative") and len(data) == 2:
            if node.attr["data_format"].s not in (b"", b"NHWC") or list(node.attr["dilations"].list.i or [1, 1, 1, 1]) != [1, 1, 1, 1]:
                continue
            if node.attr["padding"].s == b"EXPLICIT":
                continue
        elif node.op == "MatMul" and len(data) == 2:
            if node.attr["transpose_a"].b:
                continue
        else:
            continue
        if node.attr["T"].type not in (0, 1) or folder.is_constant(data[0]) or not folder.is_constant(data[1]):
            continue
        candidates.append((node, data))
    weights = folder.values(d[1] for _, d in candidates)
    units = []
    for node, data in candidates:
        weight = weights[tensor_name(data[1])].astype(np.float64)
        if node.op == "MatMul" and node.attr["transpose_b"].b:
            weight = weight.T
        depthwise = node.op == "DepthwiseConv2dNative"
        # a depthwise conv's output channel c*multiplier+m comes from weight[..., c, m]
        channels = weight.shape[-2] * weight.shape[-1] if depthwise else weight.shape[-1]
        bias = np.zeros(channels, dtype=np.float64)
        chain, relu, relu6, current = [node.name], False, False, f"{node.name}:0"
        summand, core = None, None
        while True:
            users = readers.get(_node_of(current), [])
            if len(users) != 1 or _node_of(current) in graph_outputs:
                break
            user = users[0]
            other = _other_input(user, current)
            if user.op in ("Relu", "Relu6"):
                chain.append(user.name)
                relu, relu6, current = True, user.op == "Relu6", f"{user.name}:0"
                break
            if user.op not in ("BiasAdd", "Add", "AddV2", "Sub", "Mul") or other is None:
                break
            if not folder.is_constant(other):
                after = readers.get(user.name, [])
                if (
                    node.op == "Conv2D" and user.op in ("Add", "AddV2") and tensor_name(other) != current
                    and len(after) == 1 and after[0].op == "Relu" and user.name not in graph_outputs
                ):
                    summand, core = tensor_name(other), list(chain)
                    chain += [user.name, after[0].name]
                    relu, current = True, f"{after[0].name}:0"
                break
            if user.op == "Sub" and tensor_name(user.input[0]) != current:
                break  # c - x flips the sign of x: not a bias
            vector = _channel_vector(folder.values([other])[tensor_name(other)], channels)
            if vector is None:
                break
            if user.op == "Mul":
                # scales every output channel: weights and bias alike
                weight = (weight.reshape(*weight.shape[:-2], channels) * vector).reshape(weight.shape) if depthwise else weight * vector
                bias = bias * vector
            elif user.op == "Sub":
                bias = bias - vector
            else:
                bias = bias + vector
            chain.append(user.name)
            current = f"{user.name}:0"
        attrs: dict[str, Any] = {}
        if node.op != "MatMul":
            attrs = {"strides": list(node.attr["strides"].list.i), "padding": node.attr["padding"].s.decode()}
        units.append(
            Unit(node.name, node.op, tensor_name(data[0]), _node_of(current), chain,
                 weight.astype(np.float32), bias.astype(np.float32), relu, attrs, summand, core or [], relu6)
        )
    return units
