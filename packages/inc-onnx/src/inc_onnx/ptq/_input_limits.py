"""Limits the graph puts on its integer inputs (token ids, sequence length, masks), checked per batch.

A transformer graph looks token ids up in an embedding table and positions up in a position table.
Out-of-range ids make ONNX Runtime fail deep inside a Gather; sequences longer than the position
table fail later, at a broadcast, or silently read clamped positions; an all-padding sample turns
every attention score into -inf and calibrates on nothing. The limits are read from the graph
(table row counts) and checked before a batch is run, so the error names the input and the limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from inc_core.calibration import check_no_empty_samples, check_sequence_length, check_token_ids
from inc_onnx.ptq._masks import analyse_masks

__all__ = ["InputLimits", "input_limits"]

# Ops that pass an input's values through unchanged (up to shape): ids read through them are still ids.
_SAME_VALUES = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten"})


@dataclass(frozen=True)
class _Table:
    table: str
    rows: int


@dataclass(frozen=True)
class _PositionTable:
    table: _Table
    indices: str  # the tensor of positions the Gather reads
    source: str  # the graph input whose sequence axis the positions follow


class InputLimits:
    """The integer-input limits of one prepared graph, and the check of a batch against them."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        producers = {out: node for node in graph.node for out in node.output}
        tables = {
            init.name: int(init.dims[0])
            for init in graph.initializer
            if len(init.dims) == 2 and init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
        }
        inputs = {i.name for i in graph.input if i.name not in tables}
        integer_inputs = {
            i.name for i in graph.input
            if i.name in inputs and i.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
        }
        self.ids: dict[str, list[_Table]] = {}
        positions: list[_PositionTable] = []
        for node in graph.node:
            if node.op_type != "Gather" or len(node.input) < 2 or node.input[0] not in tables:
                continue
            table = _Table(node.input[0], tables[node.input[0]])
            direct = _through_same_values(node.input[1], producers)
            if direct in integer_inputs:
                self.ids.setdefault(direct, []).append(table)
                continue
            source = next(iter(sorted(_ancestor_inputs(node.input[1], producers) & integer_inputs)), None)
            if source is not None:
                positions.append(_PositionTable(table, node.input[1], source))
        self.positions = tuple(positions)
        self.masks = _mask_inputs(model, integer_inputs - set(self.ids))
        self._session: ort.InferenceSession | None = None
        self._probe: dict[str, int] | None = None
        self._model = model if positions else None

    def check(self, feeds: dict[str, np.ndarray], where: str) -> None:
        """Raise DatasetError naming the input and the limit when ``feeds`` breaks one of the graph's limits."""
        for name, tables in self.ids.items():
            values = feeds.get(name)
            if values is None or values.size == 0:
                continue
            for table in tables:
                check_token_ids(
                    values, name=name, rows=table.rows, where=where,
                    table=f"the model's table {table.table!r} of {table.rows} rows",
                )
        for name in self.masks:
            values = feeds.get(name)
            if values is not None:
                check_no_empty_samples(values, name=name, where=where)
        if self.positions:
            self._check_positions(feeds, where)

    def _check_positions(self, feeds: dict[str, np.ndarray], where: str) -> None:
        names = [p.indices for p in self.positions]
        try:
            values = self._run_positions(feeds)
        except Exception:  # ORT fails on lengths the graph cannot broadcast; judged from a probe below
            values = None
        for index, position in enumerate(self.positions):
            source = feeds.get(position.source)
            if source is None or source.ndim < 2:
                continue
            length = int(source.shape[-1])
            if values is not None:
                indices = values[index]
                if indices.size == 0:
                    continue
                top = int(indices.max())
                clamped = indices.shape[-1] < length
                if top < position.table.rows and not clamped:
                    continue
            offset = self._offsets(feeds).get(names[index])
            if offset is None:
                continue  # not indexed by position (a constant lookup such as token types)
            limit = position.table.rows - offset
            check_sequence_length(
                length, name=position.source, limit=limit, where=where,
                table=f"the model's position table {position.table.table!r} ({position.table.rows} rows)",
            )

    def _run_positions(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        session = self._positions_session()
        needed = {i.name for i in session.get_inputs()}
        return list(session.run([p.indices for p in self.positions], {k: v for k, v in feeds.items() if k in needed}))

    def _offsets(self, feeds: dict[str, np.ndarray]) -> dict[str, int]:
        """Per position lookup, the first position index (RoBERTa starts at padding_idx + 1), read from
        1- and 2-token probes of the batch; lookups whose index does not grow with length are left out."""
        if self._probe is None:
            probes = []
            for length in (1, 2):
                cut = {k: v[:, :length] if v.ndim >= 2 else v for k, v in feeds.items()}
                try:
                    probes.append([int(v.max()) if v.size else 0 for v in self._run_positions(cut)])
                except Exception:  # no probe, no limit: the model run reports what ORT says
                    self._probe = {}
                    return self._probe
            self._probe = {
                p.indices: probes[0][i] for i, p in enumerate(self.positions) if probes[1][i] > probes[0][i]
            }
        return self._probe

    def _positions_session(self) -> ort.InferenceSession:
        """A session of just the nodes that compute the position indices (integer arithmetic, cheap)."""
        if self._session is None:
            model = self._model if self._model is not None else onnx.ModelProto()
            self._session = _subgraph_session(model, [p.indices for p in self.positions])
        return self._session


def input_limits(model: onnx.ModelProto) -> InputLimits:
    return InputLimits(model)


def _through_same_values(name: str, producers: dict[str, onnx.NodeProto]) -> str:
    while name in producers and producers[name].op_type in _SAME_VALUES:
        name = producers[name].input[0]
    return name


def _ancestor_inputs(name: str, producers: dict[str, onnx.NodeProto]) -> set[str]:
    seen: set[str] = set()
    stack = [name]
    roots: set[str] = set()
    while stack:
        current = stack.pop()
        if current in seen or not current:
            continue
        seen.add(current)
        node = producers.get(current)
        if node is None:
            roots.add(current)
        else:
            stack.extend(node.input)
    return roots


def _mask_inputs(model: onnx.ModelProto, candidates: set[str]) -> tuple[str, ...]:
    """Integer inputs that reach mask arithmetic (an attention mask) within a few integer/boolean steps."""
    float_only = analyse_masks(model).float_only
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def feeds_mask(name: str, depth: int) -> bool:
        for node in readers.get(name, []):
            if node.name in float_only:
                return True
            # Follow integer/boolean steps; a Gather leads on only when it gathers from this tensor (not by it).
            if node.op_type in ("Gather", "GatherElements") and node.input[0] != name:
                continue
            if depth < 12 and any(feeds_mask(out, depth + 1) for out in node.output):
                return True
        return False

    return tuple(name for name in sorted(candidates) if feeds_mask(name, 0))


def _subgraph_session(model: onnx.ModelProto, outputs: Sequence[str]) -> ort.InferenceSession:
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    needed: set[str] = set()
    stack = list(outputs)
    keep: set[int] = set()
    order = {id(node): index for index, node in enumerate(graph.node)}
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producers.get(name)
        if node is not None and id(node) not in keep:
            keep.add(id(node))
            stack.extend(i for i in node.input if i)
    nodes = sorted((n for n in graph.node if id(n) in keep), key=lambda n: order[id(n)])
    sub = onnx.helper.make_graph(
        nodes,
        "position_indices",
        [i for i in graph.input if i.name in needed],
        [onnx.helper.make_empty_tensor_value_info(name) for name in outputs],
        [init for init in graph.initializer if init.name in needed],
    )
    proto = onnx.helper.make_model(sub, opset_imports=list(model.opset_import))
    proto.ir_version = model.ir_version
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a length the graph cannot broadcast is expected here, and reported by inc
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
