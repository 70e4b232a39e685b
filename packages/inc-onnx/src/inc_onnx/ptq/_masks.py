"""Which nodes of a graph compute masks rather than activations, and so stay in float.

Transformer graphs carry arithmetic that is not part of the signal path: an attention mask built from
the integer ``attention_mask`` input (Cast, Sub, Mul by a large negative constant, ``Where(mask, 0,
-inf)``), relative-position buckets (Cast, Div, Log of integer distances, which holds -inf on the
diagonal by design), and the scores once such a mask has been added to them, which hold -inf or
-3.4e38 until the Softmax turns them into probabilities. Quantizing these tensors is meaningless (a
range that spans -inf, or 3.4e38 wide for values of a few units), so they are neither calibrated nor
quantized, whatever the calibration data. Everything else, including a real activation that holds
Inf, goes through calibration and its checks as usual.

The classification is structural, from the graph alone:

- a float tensor is *signal* when it is computed (through float edges) from a float graph input or
  from a parameter (a float initializer or constant with more than one element: a weight, an
  embedding table, a bias); integer tensors (token ids, shapes, masks) never carry signal;
- a float activation that is not signal is *mask arithmetic*: built only from integer inputs, shapes
  and scalar constants;
- a scalar float constant that is not finite or whose magnitude reaches :data:`MASK_MAGNITUDE` is a
  *mask value* (``-inf``, ``finfo.min``, ``-1e4``, ``-65504``);
- a node that reads mask arithmetic, a mask value, or a *masked* tensor stays in float, and its float
  outputs are masked in turn, up to a Softmax, whose probabilities are bounded again;
- except a product of signal by an *integer-valued* float tensor (a Cast of an integer or boolean tensor,
  through reshapes): a 0/1 padding mask multiplying the hidden states (DeBERTa-v2's embeddings, mean
  pooling) keeps them finite and within their own range, so the product is signal again. (Left masked, it
  kept DeBERTa-v2's whole encoder out of INT8.) The Mul itself stays in float;
- a small finite fill shaped at run time (``ConstantOfShape``, a scalar ``Expand``-ed: an RNN's zero initial
  state) is neither signal nor mask: a node reading it with signal computes signal; the nodes building it
  (a Concat of fills included) stay in float;
- a node of another domain (ai.onnx.ml, com.microsoft) is never quantized, but passes signal (or masked
  values) on to its float outputs; an ai.onnx.ml node's float outputs are signal even when it reads only
  strings or integers (a OneHotEncoder of a categorical column).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from inc_onnx._repair import outer_reads

__all__ = ["MASK_MAGNITUDE", "MaskAnalysis", "analyse_masks"]

# Magnitude from which a scalar constant is read as a mask value rather than a coefficient. Masks use
# -1e4 (BERT in fp32 before finfo.min), -65504 (fp16 min), -1e9, finfo.min or -inf; coefficients of
# activations (GELU's 0.044715, sqrt(2/pi), 1/sqrt(d), LayerNorm's epsilon) are far below it.
MASK_MAGNITUDE = 1e4
# Ops whose output is bounded whatever -inf or huge values their input holds.
_BOUNDED_OUTPUT = frozenset({"Softmax"})
# Ops that move an integer-valued tensor's values without changing them.
_SHAPE_ONLY = frozenset({"Unsqueeze", "Squeeze", "Reshape", "Expand", "Transpose", "Identity", "Flatten"})
# Ops whose first input's values reach the output unchanged (a subset of them, or repeated).
_MOVES_VALUES = _SHAPE_ONLY | {"Slice", "Split", "Gather", "Tile"}
_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16})


@dataclass(frozen=True)
class MaskAnalysis:
    """The result of :func:`analyse_masks`.

    Attributes:
        signal: float tensors computed from a float input or a parameter (what calibration may observe).
        float_only: names of the nodes that compute or apply masks (never quantized).
        masked: float activations holding mask arithmetic or masked values (never observed).
    """

    signal: frozenset[str]
    float_only: frozenset[str]
    masked: frozenset[str]


def analyse_masks(model: onnx.ModelProto) -> MaskAnalysis:
    """Classify the float tensors and nodes of ``model`` (see the module docstring)."""
    graph = model.graph
    elem_types = _elem_types(model)
    constants = {init.name: init for init in graph.initializer}
    constant_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.output}
    signal: set[str] = {i.name for i in graph.input if elem_types.get(i.name) in _FLOAT_TYPES and i.name not in constants}
    mask_values: set[str] = set()
    for name, init in constants.items():
        _classify_constant(name, init, signal, mask_values)
    for name, node in constant_nodes.items():
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if value is not None:
            _classify_constant(name, value, signal, mask_values)

    def is_float(name: str) -> bool:
        return elem_types.get(name) in _FLOAT_TYPES

    masked: set[str] = set()
    float_only: set[str] = set()
    integer_valued: set[str] = set()  # float tensors holding a cast of integer/boolean values
    fills = {name for name, init in constants.items() if _is_fill(init)}  # small finite constants (see below)
    fills.update(name for name, node in constant_nodes.items() if _is_fill(_attribute_tensor(node)))
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        if _fills_a_shape(node, fills):
            # A finite fill shaped at run time (an RNN's zero initial state: ConstantOfShape, or a scalar
            # Expanded to the batch) holds no mask value; reading it is not reading a mask. Nor is it signal:
            # the node that builds it stays float (a Concat of the forward and backward zero states of a
            # tf2onnx bidirectional LSTM was listed, and ORT's QDQ quantizer failed on its unobserved inputs).
            fills.update(name for name in node.output if name and is_float(name))
            float_only.add(node.name)
            continue
        # A Loop/If/Scan body reads outer tensors by name: what it computes from signal is signal.
        float_inputs = [name for name in (*node.input, *sorted(outer_reads(node))) if name and is_float(name)]
        float_outputs = [name for name in node.output if name and is_float(name)]
        if node.domain not in ("", "ai.onnx"):
            # Not quantized (ai.onnx.ml, com.microsoft), but what it computes from signal is signal: a
            # StandardScaler's Scaler before an MLP, a fused LayerNorm before the next MatMul.
            # ai.onnx.ml's encoders (OneHotEncoder, LabelEncoder, DictVectorizer) turn categorical data (strings,
            # integer codes) into float features: signal whatever type they read.
            if any(name in masked for name in node.input):
                masked.update(float_outputs)
            elif node.domain == "ai.onnx.ml" or any(name in signal for name in node.input):
                signal.update(float_outputs)
            continue
        if node.op_type == "Cast" and node.input and not is_float(node.input[0]):
            integer_valued.update(float_outputs)
        elif node.op_type in _SHAPE_ONLY and node.input and node.input[0] in integer_valued:
            integer_valued.update(float_outputs)
        if any(name in signal for name in float_inputs):
            signal.update(float_outputs)
        if (
            node.op_type == "Mul"
            and len(float_inputs) == 2
            and any(name in signal and name not in masked for name in float_inputs)
            and any(name in integer_valued for name in float_inputs)
        ):
            float_only.add(node.name)  # signal times a 0/1 mask: still signal (see the module docstring)
            continue
        # A float activation that is not signal and not a constant: mask arithmetic.
        reads_mask = any(
            name in masked
            or name in mask_values
            or (name not in signal and name not in constants and name not in constant_nodes and name not in fills)
            for name in float_inputs
        )
        writes_mask = any(name not in signal for name in float_outputs)
        if reads_mask or writes_mask:
            float_only.add(node.name)
            if node.op_type not in _BOUNDED_OUTPUT or not any(name in signal for name in float_inputs):
                masked.update(float_outputs)
    return MaskAnalysis(signal=frozenset(signal), float_only=frozenset(float_only), masked=frozenset(masked))


def _attribute_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    return next((a.t for a in node.attribute if a.name == "value"), None)


def _is_fill(tensor: onnx.TensorProto | None) -> bool:
    """A float scalar (or one-element) constant that is finite and below :data:`MASK_MAGNITUDE`."""
    if tensor is None or tensor.data_type not in _FLOAT_TYPES or int(np.prod(tensor.dims)) > 1:
        return False
    value = numpy_helper.to_array(tensor)
    return bool(np.all(np.isfinite(value)) and np.all(np.abs(value) < MASK_MAGNITUDE))


def _fills_a_shape(node: onnx.NodeProto, fills: set[str]) -> bool:
    """ConstantOfShape of a small finite value (0 when unset), an empty sequence, or a reshape/slice/concat of
    such fills."""
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "SequenceEmpty":  # the empty sequence a Loop appends its rows to
        return True
    if node.op_type == "ConstantOfShape":
        value = _attribute_tensor(node)
        return value is None or _is_fill(value)
    if node.op_type == "Concat":
        return bool(node.input) and all(name in fills for name in node.input if name)
    return node.op_type in _MOVES_VALUES and bool(node.input) and node.input[0] in fills


def _classify_constant(name: str, tensor: onnx.TensorProto, signal: set[str], mask_values: set[str]) -> None:
    if tensor.data_type not in _FLOAT_TYPES:
        return
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    if count > 1:
        signal.add(name)  # a parameter: its consumers compute signal
        return
    value = numpy_helper.to_array(tensor)
    if not np.all(np.isfinite(value)) or np.any(np.abs(value) >= MASK_MAGNITUDE):
        mask_values.add(name)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor whose type is known (inputs, outputs, value_info, constants).

    A sequence of tensors (a Loop's scan output that a ConcatFromSequence stacks) counts with its element type.
    """
    graph = model.graph
    types = {}
    for v in (*graph.input, *graph.value_info, *graph.output):
        if v.type.HasField("tensor_type"):
            types[v.name] = v.type.tensor_type.elem_type
        elif v.type.HasField("sequence_type") and v.type.sequence_type.elem_type.HasField("tensor_type"):
            types[v.name] = v.type.sequence_type.elem_type.tensor_type.elem_type
    types.update({init.name: init.data_type for init in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                types[node.output[0]] = value.data_type
    return types
