"""Frozen float graphs: a Keras model or a TF SavedModel as one GraphDef with its weights as constants.

The SavedModel int8 target rewrites this GraphDef; calibration runs it to watch the tensors the
rewrite quantizes. Inputs and outputs keep the serving signature's names and order.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inc_core.errors import DatasetError, ModelLoadError, UnsupportedModelError

__all__ = [
    "SERVING_KEY",
    "FrozenGraph",
    "freeze_keras",
    "freeze_savedmodel",
    "graph_function",
    "is_savedmodel_dir",
    "is_savedmodel_object",
    "keras_call",
]

#: the signature a SavedModel is served by (what `tf.saved_model.save` and `model.export` write)
SERVING_KEY = "serving_default"


@dataclass(frozen=True, eq=False)
class FrozenGraph:
    """A float graph with every variable folded into a constant, and its signature.

    Attributes:
        graph_def: the ``tf.compat.v1.GraphDef``.
        input_tensors: graph tensor names of the inputs (``"x:0"``), in signature order.
        input_keys: the signature's input names, same order.
        input_shapes: each input's shape without the batch dimension (``None`` for a free dimension).
        output_tensors: graph tensor names of the outputs.
        output_keys: the signature's output names, same order.
        ordered: whether the input order means something to the user (a Keras model's input order); a SavedModel
            signature names its inputs without ordering them (inc lists them sorted), so with several inputs
            positional batches are refused there.
    """

    graph_def: Any = field(repr=False)
    input_tensors: tuple[str, ...]
    input_keys: tuple[str, ...]
    input_shapes: tuple[tuple[int | None, ...], ...]
    output_tensors: tuple[str, ...]
    output_keys: tuple[str, ...]
    ordered: bool = True

    @functools.cached_property
    def input_dtypes(self) -> tuple[np.dtype, ...]:
        """Each input's numpy dtype, read from the graph's placeholders once (every batch is checked against it)."""
        return input_dtypes(self.graph_def, self.input_tensors)


@contextlib.contextmanager
def _tf_quiet() -> Iterator[None]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    yield


def _freeze(concrete: Any, input_keys: tuple[str, ...], output_keys: tuple[str, ...]) -> FrozenGraph:
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    frozen = convert_variables_to_constants_v2(concrete)
    inputs = [t for t in frozen.inputs if t.dtype.name != "resource"]
    outputs = list(frozen.outputs)
    shapes = tuple(tuple(t.shape.as_list()[1:]) if t.shape.rank else () for t in inputs)
    return FrozenGraph(
        frozen.graph.as_graph_def(),
        tuple(t.name for t in inputs),
        input_keys or tuple(f"input_{i}" for i in range(len(inputs))),
        shapes,
        tuple(t.name for t in outputs),
        output_keys or tuple(f"output_{i}" for i in range(len(outputs))),
    )


def freeze_keras(
    model: Any,
    input_names: tuple[str, ...],
    input_shapes: tuple[tuple[int | None, ...], ...],
    input_dtypes: tuple[np.dtype, ...] = (),
) -> FrozenGraph:
    """The inference graph of a Keras model (``training=False``), batch dimension left free; each input in its
    dtype (float32 where not known; strings for a ``TextVectorization``/``StringLookup`` input)."""
    import tensorflow as tf

    if not input_shapes:
        raise UnsupportedModelError(
            f"Keras model {getattr(model, 'name', '?')!r} does not say its input shape, which the SavedModel target "
            "needs to trace it before calibration. Build it with model.build((None, ...)) first, or use format='tflite'."
        )
    def tf_dtype(i: int) -> Any:
        dtype = input_dtypes[i] if i < len(input_dtypes) else np.dtype(np.float32)
        return tf.string if dtype.kind == "O" else tf.as_dtype(dtype)

    specs = [tf.TensorSpec([None, *shape], tf_dtype(i), name=f"input_{i}") for i, shape in enumerate(input_shapes)]
    fn = tf.function(keras_call(model))
    try:
        with _tf_quiet():
            concrete = fn.get_concrete_function(*specs)
    except Exception as exc:  # tracing errors surface as many TF/Python exception types
        raise UnsupportedModelError(
            f"Keras model {getattr(model, 'name', '?')!r} could not be traced to a TF graph: {_last_line(exc)} "
            "Make its call() traceable by tf.function (no Python reads of tensor values)."
        ) from exc
    keys = tuple(n.split(":")[0] for n in input_names) if len(input_names) == len(specs) else ()
    structure = concrete.structured_outputs
    if isinstance(structure, dict) and all(isinstance(k, str) for k in structure):
        outputs = tuple(sorted(structure))  # a model returning a dict: its names, in tf.nest's flattening order
    else:
        outputs = tuple(f"output_{i}" for i in range(len(tf.nest.flatten(structure))))
    return _freeze(concrete, keys, outputs)


def _last_line(exc: BaseException) -> str:
    """The line of a TF error that says what failed (TF puts "in user code:" and a traceback first)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    stated = [line for line in lines if "Error:" in line or "error:" in line]
    line = (stated or lines or [""])[-1][:300]
    return line if type(exc).__name__ in line else f"{type(exc).__name__}: {line}"


def keras_call(model: Any) -> Any:
    """``model``'s inference call on positional inputs, for ``tf.function`` to trace.

    It runs inside a name scope of ours: Keras opens the model's name as a scope, and a name such as
    ``"_net"`` (a class called ``_Net``) is not a valid root scope for TF.
    """
    import tensorflow as tf

    def call(*xs: Any) -> Any:
        with tf.name_scope("inc"):
            return model(xs[0] if len(xs) == 1 else list(xs), training=False)

    return call


def is_savedmodel_dir(path: Any) -> bool:
    return isinstance(path, (str, Path)) and Path(path).is_dir() and (Path(path) / "saved_model.pb").is_file()


def is_savedmodel_object(model: Any) -> bool:
    """A SavedModel loaded with ``tf.saved_model.load`` (it carries a ``signatures`` mapping)."""
    module = type(model).__module__
    return module.startswith("tensorflow.") and isinstance(getattr(model, "signatures", None), Mapping)


def load_savedmodel(path: Path) -> Any:
    import tensorflow as tf

    try:
        with _tf_quiet():
            return tf.saved_model.load(str(path))
    except Exception as exc:  # TF raises OSError, ValueError, NotFoundError... depending on the damage
        raise ModelLoadError(
            f"TensorFlow could not load the SavedModel {str(path)!r}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300] if str(exc) else ''}. Expected a directory written by "
            "tf.saved_model.save or model.export."
        ) from exc


def freeze_savedmodel(model: Any, *, where: str = "the SavedModel") -> FrozenGraph:
    """The serving signature of a SavedModel (directory or loaded object) as a frozen graph."""
    if isinstance(model, (str, Path)):
        model = load_savedmodel(Path(model))
    signatures = getattr(model, "signatures", {}) or {}
    if SERVING_KEY not in signatures:
        raise UnsupportedModelError(
            f"{where} has no {SERVING_KEY!r} signature (it has {sorted(signatures) or 'none'}); inc quantizes the "
            "graph a SavedModel serves. Save it with a serving signature: tf.saved_model.save(module, path, "
            "signatures=module.__call__.get_concrete_function(tf.TensorSpec(...))) or keras_model.export(path)."
        )
    concrete = signatures[SERVING_KEY]
    _, kwargs = concrete.structured_input_signature
    keys = tuple(sorted(kwargs))
    outputs = concrete.structured_outputs
    out_keys = tuple(sorted(outputs)) if isinstance(outputs, Mapping) else ()
    frozen = _freeze(concrete, (), out_keys)
    as_float32_graph_def(frozen.graph_def)
    # A signature's graph inputs follow its keyword names in sorted order, as its specs are flattened.
    by_name = {spec.name: key for key, spec in kwargs.items()}
    if len(frozen.input_tensors) != len(keys):
        raise UnsupportedModelError(f"{where}: its serving signature takes {len(keys)} inputs, the graph has {len(frozen.input_tensors)}.")
    ordered = tuple(by_name.get(t.split(":")[0], k) for t, k in zip(frozen.input_tensors, keys))
    return FrozenGraph(
        frozen.graph_def, frozen.input_tensors, ordered, frozen.input_shapes, frozen.output_tensors, frozen.output_keys,
        ordered=len(ordered) <= 1,
    )


def as_float32_graph_def(graph_def: Any) -> bool:
    """Retype, in place, a frozen graph that computes in float16, bfloat16 or float64 to compute in float32.

    A SavedModel exported from a Keras model under a ``mixed_float16``/``float16``/``float64`` policy runs its
    convolutions and products in that type, and the SavedModel int8 rewrite (TF's INT8 kernels take float32)
    left them out: only a float32 logits layer became INT8. Every such type attribute, type list and constant
    goes to float32 (16-bit values exactly, float64 rounded), in library functions too; Casts between what were
    two float types become float32-to-float32 (identities). Returns whether anything changed.
    """
    from tensorflow.core.framework import types_pb2
    from tensorflow.python.framework import tensor_util

    others = {types_pb2.DT_HALF, types_pb2.DT_BFLOAT16, types_pb2.DT_DOUBLE}
    changed = False

    def retype(nodes: Any) -> None:
        nonlocal changed
        for node in nodes:
            for attr in node.attr.values():
                kind = attr.WhichOneof("value")
                if kind == "type" and attr.type in others:
                    attr.type, changed = types_pb2.DT_FLOAT, True
                elif kind == "list" and any(t in others for t in attr.list.type):
                    retyped = [types_pb2.DT_FLOAT if t in others else t for t in attr.list.type]
                    del attr.list.type[:]
                    attr.list.type.extend(retyped)
                    changed = True
                elif kind == "tensor" and attr.tensor.dtype in others:
                    values = tensor_util.MakeNdarray(attr.tensor).astype(np.float32)
                    attr.tensor.CopyFrom(tensor_util.make_tensor_proto(values, shape=values.shape))
                    changed = True

    retype(graph_def.node)
    for function in graph_def.library.function:
        retype(function.node_def)
        for arg in (*function.signature.input_arg, *function.signature.output_arg):
            if arg.type in others:
                arg.type, changed = types_pb2.DT_FLOAT, True
    return changed


def input_dtypes(graph_def: Any, input_tensors: tuple[str, ...]) -> tuple[np.dtype, ...]:
    """Each input placeholder's numpy dtype (object for strings; float32 where the graph does not say or numpy has no
    such type)."""
    import tensorflow as tf

    placeholders = {n.name: n for n in graph_def.node if n.op == "Placeholder"}
    dtypes = []
    for tensor in input_tensors:
        node = placeholders.get(tensor.split(":")[0])
        dtype = np.dtype(np.float32)
        if node is not None and "dtype" in node.attr:
            found = np.dtype(tf.as_dtype(node.attr["dtype"].type).as_numpy_dtype)
            dtype = found if found.kind in "fiubO" else dtype
        dtypes.append(dtype)
    return tuple(dtypes)


def refuse_unordered_positional(batch: Any, keys: tuple[str, ...], ordered: bool, *, where: str) -> None:
    """A tuple/list batch for a multi-input graph whose inputs have no order the user knows: a DatasetError."""
    if not ordered and len(keys) > 1 and isinstance(batch, (tuple, list)):
        raise DatasetError(
            f"{where}: a tuple of {len(batch)} arrays for a SavedModel whose serving signature names its inputs "
            f"{list(keys)} but does not order them; give a mapping input name -> array."
        )


def graph_function(graph_def: Any, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> Any:
    """A callable concrete function running ``graph_def`` from ``inputs`` to ``outputs`` (tensor names).

    Inputs that are placeholders (every caller's) are mapped onto the function's arguments as the graph is imported,
    and the outputs returned from the import: this skips ``prune``, which copies the whole graph once more
    (~0.6 s of the ~1.9 s a 2-layer encoder's function took to build). Nodes the outputs do not need are left out
    when TF instantiates the function.
    """
    import tensorflow as tf

    nodes = {n.name: n for n in graph_def.node}
    sources = [nodes.get(name.split(":")[0]) for name in inputs]
    if all(node is not None and node.op == "Placeholder" and name.endswith(":0") for node, name in zip(sources, inputs)):
        specs = [
            tf.TensorSpec(tf.TensorShape(node.attr["shape"].shape), tf.as_dtype(node.attr["dtype"].type)) for node in sources
        ]

        def _import_mapped(*args: Any) -> Any:
            return tf.compat.v1.import_graph_def(
                graph_def, input_map=dict(zip(inputs, args)), return_elements=list(outputs), name=""
            )

        return tf.compat.v1.wrap_function(_import_mapped, specs)

    def _import() -> None:
        tf.compat.v1.import_graph_def(graph_def, name="")

    wrapped = tf.compat.v1.wrap_function(_import, [])
    graph = wrapped.graph
    return wrapped.prune([graph.get_tensor_by_name(n) for n in inputs], [graph.get_tensor_by_name(n) for n in outputs])


def check_batch(arrays: list[np.ndarray], frozen: FrozenGraph, *, where: str) -> list[np.ndarray]:
    """Arrays checked against the graph's input count and shapes, in each input's dtype."""
    from inc_tf._keras_model import cast_input, check_input_kind

    if len(arrays) != len(frozen.input_tensors):
        raise DatasetError(f"{where}: got {len(arrays)} input array(s); the model takes {len(frozen.input_tensors)}.")
    out = []
    dtypes = frozen.input_dtypes
    for i, (array, expected) in enumerate(zip(arrays, frozen.input_shapes)):
        array = np.asarray(array)
        check_input_kind(array, dtypes[i], where=f"{where}: input {i}")
        shape = array.shape[1:]
        if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
            raise DatasetError(
                f"{where}: input {i} has shape {array.shape}; the model expects (batch, "
                f"{', '.join('?' if e is None else str(e) for e in expected)}). Reshape the data to match."
            )
        out.append(cast_input(array, dtypes[i], where=f"{where}: input {i}"))
    return out
