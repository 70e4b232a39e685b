"""TFSavedModel: a TensorFlow graph (the int8 one inc writes, or any SavedModel) served by a signature."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inc_core.errors import DatasetError, SaveError

__all__ = ["INT8_OPS", "TFSavedModel"]

#: the TF ops that run int8 arithmetic (QuantizeV2/Dequantize only convert)
INT8_OPS = (
    "_FusedQuantizedConv2D",
    "_FusedQuantizedDepthwiseConv2D",
    "_QuantizedMatMul",
    "QuantizedConv2DWithBiasAndRequantize",
    "QuantizedConv2DWithBiasAndReluAndRequantize",
    "QuantizedConv2DWithBiasSumAndReluAndRequantize",
    "QuantizedMatMulWithBiasAndDequantize",
    "QuantizedMatMulWithBiasAndReluAndRequantize",
    "QuantizedMatMulWithBiasAndRequantize",
    "QuantizedMaxPool",
    "QuantizedAvgPool",
)
_ASSET = "inc_tf_layers.json"
_POOLS = ("QuantizedMaxPool", "QuantizedAvgPool")


@dataclass(eq=False)
class TFSavedModel:
    """A TensorFlow graph with a serving signature, as ``quantize(..., QuantConfig(format="savedmodel"))`` returns.

    The graph runs TF's own oneDNN INT8 kernels (``QuantizeV2`` -> ``_FusedQuantizedConv2D`` /
    ``QuantizedMatMulWith...`` -> ``Dequantize``). ``inc.save(model, "dir")`` writes a SavedModel directory
    with a ``serving_default`` signature that ``tf.saved_model.load`` (and TF Serving) loads as any other;
    ``inc.load("dir")`` reads it back into this class. Call the model on a numpy batch (or a mapping
    ``input name -> batch``) to run it.

    Attributes:
        graph_def: the frozen graph (weights are constants).
        input_tensors: graph tensor names of the inputs, in signature order.
        input_keys: the signature's input names.
        output_tensors: graph tensor names of the outputs.
        output_keys: the signature's output names.
        layer_names: each int8 kernel node's name mapped to the user's layer it computes (the Keras layer
            name, or the replaced node's name for a SavedModel input).
    """

    graph_def: Any = field(repr=False)
    input_tensors: tuple[str, ...]
    input_keys: tuple[str, ...]
    input_shapes: tuple[tuple[int | None, ...], ...]
    output_tensors: tuple[str, ...]
    output_keys: tuple[str, ...]
    layer_names: dict[str, str] = field(default_factory=dict)
    ordered_inputs: bool = True
    _fn: Any = field(default=None, init=False, repr=False)
    _dtypes: tuple[np.dtype, ...] | None = field(default=None, init=False, repr=False)

    @property
    def function(self) -> Any:
        """The graph as a TF concrete function: positional float32 tensors in, a tuple of output tensors out."""
        if self._fn is None:
            from inc_tf._frozen import graph_function

            self._fn = graph_function(self.graph_def, self.input_tensors, self.output_tensors)
        return self._fn

    @property
    def input_dtypes(self) -> tuple[np.dtype, ...]:
        """Each input's dtype, as the graph's placeholders declare it (an Embedding's codes stay integer)."""
        if self._dtypes is None:
            from inc_tf._frozen import input_dtypes

            self._dtypes = input_dtypes(self.graph_def, self.input_tensors)
        return self._dtypes

    def feeds(self, inputs: Any) -> list[np.ndarray]:
        """``inputs`` (array, tuple/list in input order, or mapping by input name) as arrays in input order."""
        from inc_tf._frozen import refuse_unordered_positional
        from inc_tf._keras_model import cast_input

        if isinstance(inputs, Mapping):
            missing = [k for k in self.input_keys if k not in inputs]
            if missing and len(inputs) == len(self.input_keys) == 1:
                values = [next(iter(inputs.values()))]
            elif missing:
                raise DatasetError(f"Inputs are missing {missing}; the model takes {list(self.input_keys)}.")
            else:
                values = [inputs[k] for k in self.input_keys]
        else:
            refuse_unordered_positional(inputs, self.input_keys, self.ordered_inputs, where="Inputs")
            values = list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]
        if len(values) != len(self.input_keys):
            raise DatasetError(f"Got {len(values)} input array(s); the model takes {list(self.input_keys)}.")
        arrays = [np.asarray(v) for v in values]
        for array, key, shape in zip(arrays, self.input_keys, self.input_shapes):
            # checked here: TF's int8 kernels fail on a wrong shape with errors that do not name the input
            if shape and (array.ndim != len(shape) + 1 or any(d is not None and d != g for d, g in zip(shape, array.shape[1:]))):
                expected = ", ".join("?" if d is None else str(d) for d in shape)
                raise DatasetError(
                    f"Input {key!r} has shape {array.shape}; the model expects (batch, {expected}). The inputs are "
                    f"{list(self.input_keys)}, in this order; pass a mapping input name -> array to feed them by name."
                )
        # shapes first: inputs given in the wrong order show as a shape mismatch, which says so
        return [
            cast_input(array, dtype, where=f"input {key!r}")
            for array, dtype, key in zip(arrays, self.input_dtypes, self.input_keys)
        ]

    def run(self, inputs: Any) -> dict[str, np.ndarray]:
        """Every output of one batch, by output name."""
        import tensorflow as tf

        arrays = self.feeds(inputs)
        try:
            results = self.function(*[tf.constant(a) for a in arrays])
        except (tf.errors.OpError, ValueError, TypeError) as exc:  # oneDNN kernels abort (AbortedError) on bad shapes
            expected = ", ".join(
                f"{key}: (batch, {', '.join('?' if d is None else str(d) for d in shape)})"
                for key, shape in zip(self.input_keys, self.input_shapes)
            )
            raise DatasetError(
                f"TensorFlow could not run the model on inputs of shapes {[a.shape for a in arrays]}: "
                f"{str(exc).strip().splitlines()[-1][:300]} The model takes {expected}, in this order; pass a mapping "
                "input name -> array to feed inputs by name."
            ) from exc
        results = results if isinstance(results, (list, tuple)) else [results]
        return {k: np.asarray(v) for k, v in zip(self.output_keys, results)}

    def __call__(self, inputs: Any) -> Any:
        """Run one batch: its output as numpy, or several as the Keras model returns them (a list, or a dict by
        name; :func:`inc_tf._outputs.as_keras_outputs`)."""
        from inc_tf._outputs import as_keras_outputs

        return as_keras_outputs(self.run(inputs))

    def predict(self, inputs: Any) -> Any:
        """Same as calling the model (named like Keras' ``predict``)."""
        return self(inputs)

    def op_counts(self) -> dict[str, int]:
        """How many nodes of each op type the graph holds."""
        counts: dict[str, int] = {}
        for node in self.graph_def.node:
            counts[node.op] = counts.get(node.op, 0) + 1
        return counts

    def int8_nodes(self) -> list[Any]:
        """The nodes that run int8 arithmetic."""
        return [n for n in self.graph_def.node if n.op in INT8_OPS]

    def int8_layers(self) -> list[str]:
        """The user's layers (Keras layer names, or node names for a SavedModel input) that run in int8."""
        found: dict[str, None] = {}
        for node in self.int8_nodes():
            if node.op not in _POOLS:  # a pool follows its producer's range: not a layer of its own
                found[self.layer_names.get(node.name, node.name)] = None
        return list(found)

    def save(self, path: Path) -> None:
        """Write a SavedModel directory at ``path`` (``inc.save`` makes it atomic)."""
        import tensorflow as tf

        module = _serving_module(self)
        try:
            tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
            (path / "assets").mkdir(exist_ok=True)
            # "inputs": the order positional inputs follow, when it means something (a Keras model's)
            order = list(self.input_keys) if self.ordered_inputs else []
            meta = {"layers": self.layer_names, "inputs": order, "outputs": list(self.output_keys)}
            (path / "assets" / _ASSET).write_text(json.dumps(meta), encoding="utf-8")
        except (OSError, ValueError, tf.errors.OpError) as exc:
            raise SaveError(f"TensorFlow could not write the SavedModel to {str(path)!r}: {exc}") from exc

    @classmethod
    def from_frozen(cls, frozen: Any, layer_names: dict[str, str] | None = None) -> TFSavedModel:
        """A model running the graph of a :class:`~inc_tf._frozen.FrozenGraph`."""
        return cls(
            _inline(frozen.graph_def), frozen.input_tensors, frozen.input_keys, frozen.input_shapes,
            frozen.output_tensors, frozen.output_keys, dict(layer_names or {}), ordered_inputs=frozen.ordered,
        )

    @classmethod
    def load(cls, path: Path) -> TFSavedModel:
        """A SavedModel directory (written by inc or anything else) as a frozen graph with its signature."""
        from inc_tf._frozen import freeze_savedmodel

        frozen = freeze_savedmodel(path, where=f"The SavedModel {str(path)!r}")
        layers: dict[str, str] = {}
        order: tuple[str, ...] = ()
        asset = path / "assets" / _ASSET
        if asset.is_file():
            meta = json.loads(asset.read_text(encoding="utf-8"))
            layers = dict(meta.get("layers", {}))
            order = tuple(meta.get("inputs", ()))
        model = cls.from_frozen(frozen)
        model.ordered_inputs = bool(order) or len(model.input_keys) <= 1
        if order and sorted(order) == sorted(model.input_keys) and order != model.input_keys:
            # A loaded signature lists its inputs sorted by name; positional inputs keep the order they had
            # before saving (the Keras model's), as written in inc's asset.
            at = {key: i for i, key in enumerate(model.input_keys)}
            model.input_tensors = tuple(model.input_tensors[at[key]] for key in order)
            model.input_shapes = tuple(model.input_shapes[at[key]] for key in order)
            model.input_keys = order
        # Saved graphs are imported under the scope "inc" (and a loaded signature wraps them in a call scope).
        int8 = [n.name for n in model.int8_nodes()]
        model.layer_names = {
            name: layer for key, layer in layers.items() for name in int8 if name == key or name.endswith(f"inc/{key}")
        }
        return model


def _inline(graph_def: Any) -> Any:
    """``graph_def`` with its function calls inlined (a loaded SavedModel calls its body through one)."""
    from tensorflow.core.protobuf import config_pb2, meta_graph_pb2, rewriter_config_pb2
    from tensorflow.python.grappler import tf_optimizer

    if not any(n.op in ("PartitionedCall", "StatefulPartitionedCall") for n in graph_def.node):
        return graph_def
    meta = meta_graph_pb2.MetaGraphDef()
    meta.graph_def.CopyFrom(graph_def)
    fetch = meta.collection_def["train_op"].node_list.value
    for node in graph_def.node:
        if not any(node.name in i.split(":")[0] for other in graph_def.node for i in other.input):
            fetch.append(node.name)
    config = config_pb2.ConfigProto()
    rewriter = config.graph_options.rewrite_options
    rewriter.optimizers.append("function")  # inline only: keep the int8 nodes as they are
    rewriter.meta_optimizer_iterations = rewriter_config_pb2.RewriterConfig.ONE
    return tf_optimizer.OptimizeGraph(config, meta)


def _serving_module(model: TFSavedModel) -> Any:
    import tensorflow as tf

    specs = [
        tf.TensorSpec([None, *shape], tf.as_dtype(dtype), name=key)
        for key, shape, dtype in zip(model.input_keys, model.input_shapes, model.input_dtypes)
    ]
    graph_def = model.graph_def
    input_nodes = [t for t in model.input_tensors]

    def serve(*inputs: Any) -> dict[str, Any]:
        results = tf.graph_util.import_graph_def(
            graph_def,
            input_map=dict(zip(input_nodes, inputs)),
            return_elements=list(model.output_tensors),
            name="inc",
        )
        return {k: tf.identity(v, name=k) for k, v in zip(model.output_keys, results)}

    module = tf.Module()
    module.serve = tf.function(serve, input_signature=specs)
    return module
