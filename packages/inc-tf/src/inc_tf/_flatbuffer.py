"""Reading and editing ``.tflite`` flatbuffers: the op list, and the calibrated ranges of tensors.

The TF converter's calibration step writes each activation's ``min``/``max`` into the tensor's
quantization parameters; its quantizer (``mlir_quantize``) turns those into int8 scales and zero
points. Writing inc's ranges into those fields is how inc's observers decide the LiteRT model's scales.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

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


def with_ranges(content: bytes, ranges: Mapping[int, tuple[float, float]]) -> bytes:
    """A copy of a calibrated model whose tensors ``ranges`` names carry those (min, max) values."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = _model(content)
    tensors = model.subgraphs[0].tensors
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
