"""Reading and editing ``.tflite`` flatbuffers: the op list, and the calibrated ranges of tensors.

The TF converter's calibration step writes each activation's ``min``/``max`` into the tensor's
quantization parameters; its quantizer (``mlir_quantize``) turns those into int8 scales and zero
points. Writing inc's ranges into those fields is how inc's observers decide the LiteRT model's scales.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["OpRecord", "kept_float_nodes", "op_records", "ranged_tensors", "with_ranges"]


@dataclass(frozen=True)
class OpRecord:
    """One node of the main subgraph: its builtin op and the names and dtypes of its tensors."""

    index: int
    op: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    input_dtypes: tuple[str, ...]
    output_dtypes: tuple[str, ...]
    constant_inputs: tuple[str, ...]


def _model(content: bytes):  # noqa: ANN202 - the flatbuffer object API has no type stubs
    from tensorflow.lite.tools import flatbuffer_utils

    return flatbuffer_utils.read_model_from_bytearray(bytearray(content))


def _dtype_name(tensor_type: int) -> str:
    from tensorflow.lite.tools import flatbuffer_utils

    return str(flatbuffer_utils.type_to_name(tensor_type)).lower()


def _name(tensor) -> str:  # noqa: ANN001
    raw = tensor.name
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def op_records(content: bytes) -> list[OpRecord]:
    """The nodes of the main subgraph in execution order."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = _model(content)
    graph = model.subgraphs[0]
    tensors = graph.tensors
    records = []
    for index, op in enumerate(graph.operators or []):
        ins = tuple(int(i) for i in (op.inputs if op.inputs is not None else []) if i >= 0)
        outs = tuple(int(i) for i in (op.outputs if op.outputs is not None else []))
        constant = tuple(
            _name(tensors[i]) for i in ins if tensors[i].buffer and model.buffers[tensors[i].buffer].data is not None
        )
        records.append(
            OpRecord(
                index=index,
                op=str(flatbuffer_utils.opcode_to_name(model, op.opcodeIndex)),
                inputs=ins,
                outputs=outs,
                input_names=tuple(_name(tensors[i]) for i in ins),
                output_names=tuple(_name(tensors[i]) for i in outs),
                input_dtypes=tuple(_dtype_name(tensors[i].type) for i in ins),
                output_dtypes=tuple(_dtype_name(tensors[i].type) for i in outs),
                constant_inputs=constant,
            )
        )
    return records


# Ops that move, select or round values without computing new ones: a value they carry into a cast to integers is
# still an integer code (a category index, a bucket number), whatever of them it crossed.
_CODE_CARRIERS = frozenset({
    "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE", "STRIDED_SLICE", "SLICE", "GATHER", "CONCATENATION", "PACK",
    "UNPACK", "SPLIT", "TILE", "FLOOR", "ROUND", "MAXIMUM", "MINIMUM",
})


def kept_float_nodes(records: list[OpRecord]) -> list[str]:
    """Output names of the ops whose INT8 form would be wrong: :func:`_integer_code_nodes`, and every ``ONE_HOT``.

    The quantizer gives a ``ONE_HOT``'s on and off values scales of their own (the off value 0.0 gets a scale near
    1e-9 and zero point 0) while the kernel copies their raw int8 values into an output with another scale and
    zero point (-128 for the range [0, 1]): every off position reads 0.5, not 0. In float the op is exact and
    costs nothing; the quantize op after it represents 0 and 1 exactly.
    """
    one_hot = [name for record in records if record.op == "ONE_HOT" for name in record.output_names]
    return [*_integer_code_nodes(records), *one_hot]


def _integer_code_nodes(records: list[OpRecord]) -> list[str]:
    """Output names of the ops that carry integer codes in float tensors on their way to a cast to integers.

    Keras' ``CategoryEncoding`` (and ``Embedding`` fed by a float input) casts its integer input to float, reshapes
    it, and casts it back to integers for ``one_hot``/``gather``. The quantizer makes the reshape int8, and
    dequantized codes are a hair off: 3 comes back as 2.99999, which the cast truncates to 2, so every sample of
    category 3 is encoded as category 2. These ops stay float (they cost nothing); what follows the cast is
    quantized as before.
    """
    producer = {tensor: record for record in records for tensor in record.outputs}
    pending = [
        record.inputs[0]
        for record in records
        if record.op == "CAST" and record.inputs
        and record.input_dtypes[0].startswith("float") and record.output_dtypes[0].startswith(("int", "uint"))
    ]
    seen: set[int] = set()
    found: list[str] = []
    while pending:
        record = producer.get(pending.pop())
        if record is None or record.index in seen or record.op not in _CODE_CARRIERS:
            continue
        seen.add(record.index)
        found.extend(record.output_names)
        pending.extend(t for t, dtype in zip(record.inputs, record.input_dtypes) if dtype.startswith("float"))
    return found


def ranged_tensors(content: bytes) -> dict[int, str]:
    """Index -> name of every tensor of a calibrated model that carries a calibrated min/max."""
    graph = _model(content).subgraphs[0]
    found = {}
    for index, tensor in enumerate(graph.tensors):
        quant = tensor.quantization
        if quant is not None and quant.min is not None and quant.max is not None and len(quant.min) == 1:
            found[index] = _name(tensor)
    return found


def with_ranges(
    content: bytes, ranges: Mapping[int, tuple[float, float]], *, unranged: Collection[int] = ()
) -> bytes:
    """A copy of a calibrated model whose tensors ``ranges`` names carry those (min, max) values, and whose tensors
    ``unranged`` names carry none (the quantizer leaves them float and quantizes each reader's copy on its own)."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = _model(content)
    tensors = model.subgraphs[0].tensors
    for index in unranged:
        tensors[index].quantization = None
    ranges = {index: span for index, span in ranges.items() if index not in set(unranged)}
    spans = [max(high, 0.0) - min(low, 0.0) for low, high in ranges.values()]
    typical = float(np.median([s for s in spans if s > 0])) if any(s > 0 for s in spans) else 1.0
    for index, (low, high) in ranges.items():
        low, high = min(float(low), 0.0), max(float(high), 0.0)
        if high - low <= 0.0:
            # Zero throughout calibration (an RNN's initial state, its product with the recurrent kernel): any
            # scale holds 0 exactly, but the quantizer turns an empty range into a scale near 1e-8, and XNNPACK
            # refuses to add or multiply tensors whose scales differ that much (the model fails at its first run).
            # The model's typical activation range keeps them within its limits.
            high = typical
        quant = tensors[index].quantization
        quant.min = np.array([low], dtype=np.float32)
        quant.max = np.array([high], dtype=np.float32)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def split_inputs_as_slices(content: bytes) -> bytes:
    """A copy of a float flatbuffer in which each SPLIT/SPLIT_V of a model input is one STRIDED_SLICE per part.

    The same values, but the quantizer gives one SPLIT's outputs one shared scale, where slices of a model input can
    each get their own (``ptq._quantize.sliced_inputs``): ``keras.ops.split`` of raw amounts next to standardised
    features gave cosine 0.37. The parts keep their tensors (and calibration records); only the op changes.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = _model(content)
    graph = model.subgraphs[0]
    operators = list(graph.operators or [])
    produced = {int(t) for op in operators for t in (op.outputs if op.outputs is not None else [])}
    kinds = {id(op): str(flatbuffer_utils.opcode_to_name(model, op.opcodeIndex)) for op in operators}
    rewritten: list[Any] = []
    slice_code: int | None = None
    for op in operators:
        kind = kinds[id(op)]
        if kind not in ("SPLIT", "SPLIT_V"):
            rewritten.append(op)
            continue
        data, axis_at = (1, 0) if kind == "SPLIT" else (0, 2)
        source, axis_tensor = int(op.inputs[data]), graph.tensors[int(op.inputs[axis_at])]
        axis_data = model.buffers[axis_tensor.buffer].data if axis_tensor.buffer else None
        shape = graph.tensors[source].shape
        outputs = [graph.tensors[int(t)] for t in op.outputs]
        if (
            source in produced or axis_data is None or shape is None
            or not _dtype_name(graph.tensors[source].type).startswith("float")
        ):
            rewritten.append(op)
            continue
        rank = len(shape)
        axis = int(np.frombuffer(bytes(axis_data), dtype=np.int32)[0]) % rank
        sizes = [int(t.shape[axis]) for t in outputs]
        if any(size <= 0 for size in sizes):
            rewritten.append(op)
            continue
        if slice_code is None:
            slice_code = len(model.operatorCodes)
            model.operatorCodes.append(schema.OperatorCodeT(
                deprecatedBuiltinCode=schema.BuiltinOperator.STRIDED_SLICE, version=1,
                builtinCode=schema.BuiltinOperator.STRIDED_SLICE,
            ))
        every_but_axis = ((1 << rank) - 1) & ~(1 << axis)
        start = 0
        for out, size in zip(op.outputs, sizes):
            begin, end = np.zeros(rank, np.int32), np.zeros(rank, np.int32)
            begin[axis], end[axis] = start, start + size
            start += size
            consts = [_int32_constant(model, graph, f"{_name(graph.tensors[int(out)])}/{part}", value)
                      for part, value in (("begin", begin), ("end", end), ("strides", np.ones(rank, np.int32)))]
            part_op = schema.OperatorT()
            part_op.opcodeIndex = slice_code
            part_op.inputs = [source, *consts]
            part_op.outputs = [int(out)]
            part_op.builtinOptionsType = schema.BuiltinOptions.StridedSliceOptions
            part_op.builtinOptions = schema.StridedSliceOptionsT(beginMask=every_but_axis, endMask=every_but_axis)
            rewritten.append(part_op)
    if len(rewritten) == len(operators):
        return content
    graph.operators = rewritten
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _int32_constant(model: Any, graph: Any, name: str, value: np.ndarray) -> int:
    """Append a constant int32 tensor (and its buffer) to ``graph``; its index."""
    from tensorflow.lite.python import schema_py_generated as schema

    buffer = schema.BufferT()
    buffer.data = np.frombuffer(value.astype(np.int32).tobytes(), dtype=np.uint8).copy()
    model.buffers.append(buffer)
    tensor = schema.TensorT()
    tensor.shape = np.array(value.shape, dtype=np.int32)
    tensor.type = schema.TensorType.INT32
    tensor.buffer = len(model.buffers) - 1
    tensor.name = name
    graph.tensors.append(tensor)
    return len(graph.tensors) - 1


def repaired_quantization(content: bytes) -> bytes:
    """A copy of a quantized model with two of the quantizer's detours through a coarser int8 tensor removed.

    * A ``QUANTIZE`` that requantizes another's int8 output reads that one's float input instead. The quantizer
      quantizes a float tensor read at two scales once at one of them and requantizes that to the other: what the
      first scale clipped is lost to the second (a feature up to 4,000 quantized for a standardised slice at most
      2.5, then requantized for its own slice: every value reads 2.5).
    * A slice or reshape between a ``QUANTIZE`` and a ``DEQUANTIZE`` runs on the float tensor (a float twin takes
      the ``DEQUANTIZE``'s place; the int8 one stays for its int8 readers, if any): its int8 form only rounds what
      a float op (a Discretization's ``BUCKETIZE``) reads next (raw amounts on a step of 15.7 move values across
      bucket boundaries).

    Both cost nothing at run time.
    """
    from tensorflow.lite.tools import flatbuffer_utils

    model = _model(content)
    graph = model.subgraphs[0]
    operators = list(graph.operators or [])
    kind = {id(op): str(flatbuffer_utils.opcode_to_name(model, op.opcodeIndex)) for op in operators}
    is_float = {i for i, tensor in enumerate(graph.tensors) if _dtype_name(tensor.type).startswith("float")}
    float_source = {
        int(op.outputs[0]): int(op.inputs[0]) for op in operators if kind[id(op)] == "QUANTIZE" and op.inputs[0] in is_float
    }
    changed = False
    for op in operators:
        source = float_source.get(int(op.inputs[0])) if kind[id(op)] == "QUANTIZE" else None
        if source is not None:
            op.inputs[0] = source
            changed = True
    float_source = {  # again: the requantizes rewired above now quantize float tensors too
        int(op.outputs[0]): int(op.inputs[0]) for op in operators if kind[id(op)] == "QUANTIZE" and op.inputs[0] in is_float
    }
    readers: dict[int, list] = {}
    for op in operators:
        for tensor in op.inputs if op.inputs is not None else []:
            readers.setdefault(int(tensor), []).append(op)
    outputs = {int(t) for t in graph.outputs}
    in_float: dict[int, Any] = {}  # id of a DEQUANTIZE -> the float op computing its output instead
    for op in operators:
        source = float_source.get(int(op.inputs[0])) if op.inputs is not None and len(op.inputs) else None
        if kind[id(op)] not in _FLOAT_CARRIERS or source is None or len(op.outputs) != 1:
            continue
        for reader in readers.get(int(op.outputs[0]), []):
            if kind[id(reader)] == "DEQUANTIZE":
                twin = copy.deepcopy(op)
                twin.inputs = [source, *(int(t) for t in op.inputs[1:])]
                twin.outputs = [int(reader.outputs[0])]
                in_float[id(reader)] = twin
    if not changed and not in_float:
        return content
    kept = [in_float.get(id(op), op) for op in operators]
    kind.update({id(twin): "float twin" for twin in in_float.values()})
    while True:  # drop the int8 ops nothing reads any more (a slice whose only reader was a DEQUANTIZE, its QUANTIZE)
        read = {int(t) for op in kept for t in (op.inputs if op.inputs is not None else [])} | outputs
        dead = {
            id(op) for op in kept
            if kind[id(op)] in _FLOAT_CARRIERS | {"QUANTIZE"} and not any(int(t) in read for t in op.outputs)
        }
        if not dead:
            break
        kept = [op for op in kept if id(op) not in dead]
    graph.operators = kept
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


# Ops whose int8 form only moves or selects values: between a QUANTIZE and a DEQUANTIZE they run as well in float.
_FLOAT_CARRIERS = frozenset({
    "STRIDED_SLICE", "SLICE", "GATHER", "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE",
})


def with_metadata(content: bytes, key: str, value: bytes) -> bytes:
    """A copy of ``content`` carrying ``value`` in the flatbuffer's metadata table under ``key``."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = _model(content)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(value, dtype=np.uint8).copy()
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = key
    entry.buffer = len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if _meta_name(m) != key] + [entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def read_metadata(content: bytes, key: str) -> bytes | None:
    model = _model(content)
    for entry in model.metadata or []:
        if _meta_name(entry) == key:
            data = model.buffers[entry.buffer].data
            return bytes(np.asarray(data, dtype=np.uint8)) if data is not None else b""
    return None


def _meta_name(entry) -> str:  # noqa: ANN001
    raw = entry.name
    return raw.decode() if isinstance(raw, bytes) else str(raw)
