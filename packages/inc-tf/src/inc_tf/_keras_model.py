"""Checks on the user's Keras model, and the renamed copy the converter sees.

The converter names each LiteRT tensor after the TF name scopes it came from (``model/conv1_1/Relu``),
which makes auto-generated names like ``dense`` and ``dense_1`` ambiguous. inc converts a clone whose
layers carry unambiguous names (``incL<index>x``), so every LiteRT op maps back to the user's layer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inc_core._dataset import LABELS_HINT
from inc_core.errors import DatasetError, ModelLoadError, UnsupportedModelError

__all__ = [
    "KerasGraph",
    "check_keras_backend",
    "check_keras_model",
    "copy_state",
    "input_batch_norms",
    "is_keras_model",
    "layer_tokens",
    "prepare_graph",
    "refuse_table_layers",
]

_TOKEN = re.compile(r"incL(\d+)x(?:_\d+)?")


def is_keras_model(model: Any) -> bool:
    try:
        import keras
    except ImportError:  # pragma: no cover - keras is a dependency
        return False
    return isinstance(model, keras.Model)


def load_keras_file(path: Path) -> Any:
    """A ``.keras`` / ``.h5`` file as a Keras model (what the backend works on for a model path)."""
    import keras

    try:
        return keras.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises ValueError, OSError, TypeError... depending on the damage
        custom = _unregistered_class(exc)
        if custom is not None:
            name, module = custom
            where = f" (module {module!r})" if module else ""
            raise ModelLoadError(
                f"{str(path)!r} uses the custom class {name!r}{where}, which Keras cannot find: it is registered when "
                "its module is imported. Import it before loading (in Python: import it, then inc.load; from the "
                f"inc CLI: --import-module {module or 'MODULE'}, run from the module's folder or with it on PYTHONPATH)."
            ) from exc
        raise ModelLoadError(
            f"Keras could not load {str(path)!r}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}. "
            "Expected a model saved with model.save('model.keras'); custom layers must be importable."
        ) from exc


_UNKNOWN_CLASS = re.compile(r"Could not locate (?:class|function) '([^']+)'.*?'module': '([^']*)'", re.S)


def _unregistered_class(exc: BaseException) -> tuple[str, str] | None:
    """(class name, module) of the custom object Keras could not locate, from its exception chain."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 10:
        match = _UNKNOWN_CLASS.search(str(current))
        if match:
            return match.group(1), match.group(2)
        current, seen = current.__cause__ or current.__context__, seen + 1
    return None


def check_keras_model(model: Any) -> Any:
    """The Keras model to quantize (loaded from a file when given a path), or an UnsupportedModelError."""
    import keras

    if isinstance(model, (str, Path)):
        model = load_keras_file(Path(model))
    if not isinstance(model, keras.Model):
        raise UnsupportedModelError(
            f"The tf backend takes a keras.Model or a .keras file, got {type(model).__module__}."
            f"{type(model).__qualname__}."
        )
    check_keras_backend()
    if not model.built or not getattr(model, "inputs", None) and not _has_build_shape(model):
        raise UnsupportedModelError(
            f"Keras model {model.name!r} ({type(model).__qualname__}) is not built: its input shape is unknown. "
            "Call it once on a batch, or build it with model.build(input_shape), before quantizing."
        )
    return model


# Keras layers that look values up in a TF hash table (a resource neither LiteRT's built-in ops nor a frozen graph
# carry), matched on the class and its bases so that user subclasses count too.
_TABLE_LAYERS = ("IndexLookup", "TextVectorization", "Hashing", "HashedCrossing", "FeatureSpace")


def refuse_table_layers(model: Any, layer_names: tuple[str, ...] = ()) -> None:
    """An UnsupportedModelError naming ``model``'s string/category lookup layers, and how to quantize the rest.

    ``TextVectorization``, ``StringLookup``, ``IntegerLookup``, ``Hashing`` keep their vocabulary in a TF hash
    table: LiteRT's built-in ops have no table ops, and a frozen graph (the SavedModel target) loses the table.
    Keras' own advice for on-device models applies: run them in the input pipeline, quantize what follows.
    """
    found = _table_layers(model)
    if not found:
        return

    def user_name(name: str) -> str:  # layer_names: the user's names of a renamed copy's layers
        index = layer_index(name)
        return layer_names[index] if index is not None and index < len(layer_names) else name

    named = ", ".join(f"{user_name(layer.name)!r} ({type(layer).__name__})" for layer in found)
    raise UnsupportedModelError(
        f"Keras model {model.name!r} looks values up in {named}: a TF hash table, which neither LiteRT's built-in "
        "ops nor inc's INT8 SavedModel can carry. Quantize the model that follows the lookup: apply the layer in "
        "the input pipeline (dataset.map(layer), as Keras advises for on-device models) and give inc the rest, "
        "e.g. keras.Model(model.get_layer(NAME).output, model.output) for a lookup that reads the model's only input."
    )


def _table_layers(layer: Any) -> list[Any]:
    """The lookup layers in ``layer``'s sublayers, outermost only (a TextVectorization's own StringLookup is its)."""
    found = []
    for sub in layer._flatten_layers(include_self=False, recursive=False):
        if any(cls.__name__ in _TABLE_LAYERS for cls in type(sub).__mro__):
            found.append(sub)
        else:
            found.extend(_table_layers(sub))
    return found


def check_keras_backend() -> None:
    """UnsupportedModelError unless Keras runs on TensorFlow (the converter traces TF graphs only)."""
    import keras

    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise UnsupportedModelError(
            f"Keras runs on the {backend!r} backend; inc-tf converts through TensorFlow and needs "
            "KERAS_BACKEND=tensorflow. Set the environment variable before importing keras, or quantize the "
            f"model with the inc plugin of {backend} (inc-torch for 'torch')."
        )


def _has_build_shape(model: Any) -> bool:
    return getattr(model, "_build_shapes_dict", None) is not None


@dataclass(frozen=True)
class KerasGraph:
    """The model the converter sees, and how its names map back to the user's layers.

    Attributes:
        model: a renamed clone (functional and Sequential models) or the user's model itself.
        layer_names: the user's layer names, in the model's layer order.
        layer_types: the Keras class name of each layer.
        renamed: whether :attr:`model` carries the ``incL<i>x`` names.
        input_names: the names of the model's inputs (what a mapping of calibration data is keyed by).
        input_shapes: each input's shape without the batch dimension (``None`` for a free dimension).
        input_dtypes: each input's dtype (functional and Sequential models; empty for a subclassed model,
            whose inputs are taken as float32).
        sublayer_types: the Keras class names of the layers each layer holds (a custom transformer block's
            Dense and EinsumDense layers), at any depth.
    """

    model: Any
    layer_names: tuple[str, ...]
    layer_types: tuple[str, ...]
    renamed: bool
    input_names: tuple[str, ...]
    input_shapes: tuple[tuple[int | None, ...], ...]
    weight_sizes: tuple[int, ...] = ()
    input_dtypes: tuple[np.dtype, ...] = ()
    sublayer_types: tuple[frozenset[str], ...] = ()

    def layers_in(self, names: Iterable[str]) -> set[int]:
        """Indices of the layers that tensor/op names mention."""
        found: set[int] = set()
        for name in names:
            for part in re.split(r"[;/:]", name):
                if self.renamed:
                    match = _TOKEN.fullmatch(part)
                    if match:
                        found.add(int(match.group(1)))
                    continue
                scopes = _traced_scopes(self.layer_names)  # small: a few dozen layers
                if part in scopes:
                    found.add(scopes[part])
        return found


def _traced_scopes(layer_names: tuple[str, ...]) -> dict[str, int]:
    """The TF name scope each layer's ops get when a subclassed model is traced, mapped to the layer's index.

    Keras opens a layer's name scope twice per call and TF makes every scope name unique within the
    graph (``dense`` -> ``dense_1``; then layer ``dense_1`` -> ``dense_1_2``). Replaying that in layer
    order recovers which layer a scope belongs to, assuming layers are called once in that order.
    """
    used: set[str] = set()
    scopes: dict[str, int] = {}
    for index, name in enumerate(layer_names):
        for _ in range(2):
            unique, suffix = name, 0
            while unique in used:
                suffix += 1
                unique = f"{name}_{suffix}"
            used.add(unique)
        scopes[unique] = index
    return scopes


def layer_tokens(index: int) -> str:
    return f"incL{index}x"


def layer_index(token: str) -> int | None:
    """The layer index a :func:`layer_tokens` name stands for; None for any other name."""
    match = _TOKEN.fullmatch(token)
    return int(match.group(1)) if match else None


# Float dtypes other than float32: 16-bit ones convert exactly, float64 rounds to the nearest float32.
_OTHER_FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float64"})


def full_precision_config(layer: Any) -> dict[str, Any]:
    """``layer``'s config, computing and keeping its variables in float32 where its policy uses another float type.

    mixed_float16/mixed_bfloat16 layers keep float32 variables and compute in 16 bits; a ``float16``/``bfloat16``
    policy keeps the variables in 16 bits too (every value of which float32 holds exactly), a ``float64`` one in
    64 bits (rounded to float32, far finer than INT8). INT8 quantization (and QAT's fake quant, and the LiteRT
    converter, which cannot take such convolutions and then names every op of the layer as one LiteRT lacks)
    starts from the float32 computation.
    """
    config = layer.get_config()
    policy = getattr(layer, "dtype_policy", None)
    if policy is not None and {policy.compute_dtype, policy.variable_dtype} & _OTHER_FLOAT_DTYPES:
        config["dtype"] = "float32"
    return config


def copy_state(source: Any, target: Any) -> None:
    """Give ``target``, a clone of ``source`` (same layer structure), ``source``'s weights and derived state.

    ``set_weights`` alone is not enough for adapted preprocessing layers: ``Normalization`` computes with the
    mean and variance it derives from its variables when it is adapted or loaded (``finalize_state``), so a
    clone given the variables by ``set_weights`` still normalises with zero mean and unit variance, and a
    ``StringLookup``/``TextVectorization`` keeps its vocabulary outside its variables. Each layer that keeps
    such state gets it the way Keras' own loader hands it over (``save_own_variables``/``load_own_variables``,
    then ``save_assets``/``load_assets``).
    """
    import tempfile

    import keras

    target.set_weights(source.get_weights())
    base = keras.layers.Layer
    pairs = zip(source._flatten_layers(include_self=True), target._flatten_layers(include_self=True), strict=False)
    for src, dst in pairs:
        if type(src) is not type(dst) or isinstance(src, keras.Model):
            continue
        if type(src).load_own_variables is not base.load_own_variables:
            store: dict[str, Any] = {}
            src.save_own_variables(store)
            dst.load_own_variables(store)
        if hasattr(src, "save_assets") and hasattr(dst, "load_assets"):
            with tempfile.TemporaryDirectory() as assets:
                src.save_assets(assets)
                dst.load_assets(assets)


def prepare_graph(model: Any) -> KerasGraph:
    """The converter's view of a checked Keras model (see the module docstring)."""
    import keras

    model = _with_listed_inputs(model)
    layers = list(model.layers)
    names = tuple(layer.name for layer in layers)
    types = tuple(type(layer).__name__ for layer in layers)
    inputs = list(model.inputs) if _is_graph_model(model) else []
    input_names = tuple(getattr(t, "name", f"input_{i}") for i, t in enumerate(inputs))
    input_shapes = tuple(tuple(t.shape[1:]) for t in inputs)
    built_with = next(iter((getattr(model, "_build_shapes_dict", None) or {}).values()), None)
    if not inputs and isinstance(built_with, (tuple, list)) and built_with and not isinstance(built_with[0], (tuple, list)):
        input_shapes = (tuple(built_with[1:]),)  # a subclassed model built with model.build((None, ...))
    sizes = tuple(max((int(np.prod(w.shape)) for w in layer.weights if len(w.shape) >= 2), default=0) for layer in layers)
    dtypes = tuple(_numpy_dtype(getattr(t, "dtype", None)) for t in inputs)
    held = tuple(frozenset(type(sub).__name__ for sub in sublayers(layer)) for layer in layers)
    if not _is_graph_model(model):
        return KerasGraph(model, names, types, False, input_names, input_shapes, sizes, dtypes, held)
    index = {id(layer): i for i, layer in enumerate(layers)}
    from inc_tf._input_norm import converter_layer, reads_model_input

    def rename(layer: Any) -> Any:
        config = full_precision_config(layer)
        config["name"] = layer_tokens(index[id(layer)])
        replaced = converter_layer(layer, config) if reads_model_input(model, layer) else None
        return replaced if replaced is not None else type(layer).from_config(config)

    try:
        clone = keras.models.clone_model(model, clone_function=rename)
        copy_state(model, clone)
    except Exception:  # a custom layer without a faithful get_config: convert the model as it is
        return KerasGraph(model, names, types, False, input_names, input_shapes, sizes, dtypes, held)
    return KerasGraph(clone, names, types, True, input_names, input_shapes, sizes, dtypes, held)


def sublayers(layer: Any) -> list[Any]:
    """The layers ``layer`` holds, at any depth (Keras' own walk; none for a layer without it)."""
    flatten = getattr(layer, "_flatten_layers", None)
    return list(flatten(include_self=False, recursive=True)) if flatten is not None else []


def _with_listed_inputs(model: Any) -> Any:
    """``model`` itself, or, for a functional model that takes a dict of inputs, the same graph (the same layers,
    nothing copied) taking them as a list in ``model.inputs`` order.

    The TF converter and SavedModel export pass a model its inputs as a list; a model built with
    ``keras.Model({"token_ids": ..., "padding_mask": ...}, ...)`` (every keras_hub backbone) refuses that
    ("The structure of `inputs` doesn't match"), and TF's fallback tracer then fails on Keras 3 with
    "'NoneType' object is not callable". inc's calibration batches and the INT8 model take inputs by name either
    way.
    """
    import keras

    if isinstance(model, keras.Sequential) or not _is_graph_model(model) or not isinstance(model.input, dict):
        return model
    return keras.Model(inputs=list(model.inputs), outputs=model.output, name=model.name)


def input_batch_norms(graph: KerasGraph) -> frozenset[int]:
    """Indices of the BatchNormalization layers that read a model input: a tabular model's first layer,
    standardising raw features whose scales differ by orders of magnitude (see ``ptq._quantize.float_layer_nodes``)."""
    from inc_tf._input_norm import reads_model_input

    if not getattr(graph.model, "inputs", None):
        return frozenset()
    return frozenset(
        i for i, layer in enumerate(graph.model.layers)
        if graph.layer_types[i] == "BatchNormalization" and reads_model_input(graph.model, layer)
    )


def _numpy_dtype(dtype: Any) -> np.dtype:
    """A Keras input's dtype (``"int32"``, ``"float32"``...) as numpy's; object for ``"string"``; float32 when
    numpy has no such type."""
    if str(dtype) == "string":
        return np.dtype(object)
    try:
        result = np.dtype(str(dtype)) if dtype is not None else np.dtype(np.float32)
    except TypeError:
        return np.dtype(np.float32)
    return result if result.kind in "fiub" else np.dtype(np.float32)


def _is_graph_model(model: Any) -> bool:
    import keras

    return isinstance(model, keras.Sequential) or type(model).__name__ == "Functional" or (
        isinstance(model, keras.Model) and hasattr(model, "_operations") and bool(getattr(model, "inputs", None))
        and type(model).call is keras.Model.call
    )


def as_input_list(batch: Any, graph: KerasGraph, *, where: str) -> list[np.ndarray]:
    """One calibration batch as float32 arrays in the model's input order, checked against its input shapes."""
    count = max(len(graph.input_shapes), 1)
    if isinstance(batch, dict) and len(batch) == 1 and count == 1:
        values = list(batch.values())  # one input: whatever the key (an .npz of a single array)
    elif isinstance(batch, dict):
        missing = [n for n in graph.input_names if n not in batch]
        if missing:
            raise DatasetError(
                f"{where}: the batch has keys {sorted(batch)}, the model's inputs are {list(graph.input_names)}. "
                "Key the mapping by the Keras input names."
            )
        values = [batch[n] for n in graph.input_names]
    elif isinstance(batch, (tuple, list)):
        values = list(batch)
    else:
        values = [batch]
    if len(values) != count:
        named = f" ({', '.join(graph.input_names)})" if graph.input_names else ""
        raise DatasetError(
            f"{where}: got {len(values)} input array(s); the model takes {count}{named}. A batch is a tuple with one "
            "array per input or a mapping input name -> array; for whole arrays, give inc.Dataset a mapping "
            "(inc.Dataset({name: array, ...}, batch_size=...)): a tuple or list given to inc.Dataset is read as a "
            "sequence of batches." + (f" {LABELS_HINT}" if len(values) == count + 1 else "")
        )
    arrays = []
    for i, value in enumerate(values):
        array = np.asarray(value)
        target = graph.input_dtypes[i] if i < len(graph.input_dtypes) else np.dtype(np.float32)
        check_input_kind(array, target, where=f"{where}: input {i}")
        if graph.input_shapes:
            expected = graph.input_shapes[i]
            shape = array.shape[1:]
            if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
                raise DatasetError(
                    f"{where}: input {i} has shape {array.shape}; the model expects (batch, "
                    f"{', '.join('?' if e is None else str(e) for e in expected)}). Reshape the data to match."
                )
        arrays.append(cast_input(array, target, where=f"{where}: input {i}"))
    return arrays


def is_string_dtype(dtype: np.dtype) -> bool:
    """Whether ``dtype`` (an input's, as :func:`_numpy_dtype` gives it) is TF's string type."""
    return dtype.kind == "O"


def check_input_kind(array: np.ndarray, dtype: np.dtype, *, where: str) -> None:
    """Strings for a string input (what ``TextVectorization``/``StringLookup`` read), numbers for any other.

    Raises:
        DatasetError: the data's kind does not match the input's.
    """
    text = array.dtype.kind in "USO"
    if is_string_dtype(dtype) and not text:
        raise DatasetError(
            f"{where} has dtype {array.dtype}; the model's input takes strings (it feeds a string layer such as "
            "TextVectorization or StringLookup). Pass the raw text as a numpy array of str."
        )
    if not is_string_dtype(dtype) and not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise DatasetError(
            f"{where} has dtype {array.dtype}; the model takes {dtype} numbers. "
            "Convert the data to a numeric numpy array first."
        )


def cast_input(array: np.ndarray, dtype: np.dtype, *, where: str) -> np.ndarray:
    """``array`` as the input's dtype: an integer input (token ids, category codes for an Embedding) keeps
    integers; float data for it must hold whole numbers; strings for a string input stay as they are.

    Raises:
        DatasetError: fractional or non-finite values for an integer input.
    """
    if is_string_dtype(dtype):
        return array
    if dtype.kind in "iub" and array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise DatasetError(
                f"{where} takes integers ({dtype}, e.g. the codes an Embedding looks up) but the data holds "
                "fractions or non-finite values. Pass the integer codes."
            )
    return array.astype(dtype, copy=False)


def feeds_by_name(runner_names: tuple[str, ...], graph: KerasGraph, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Arrays in the Keras model's input order keyed by a LiteRT runner's input names.

    The converter's signature lists the inputs sorted by name, not in the model's order, so a model with
    inputs ``("numeric", "category")`` has the runner names ``("category", "numeric")``: matched by name, not
    position. (A model without input names, a subclassed one, has one input or keeps the order.)
    """
    if set(runner_names) == set(graph.input_names) and len(runner_names) == len(arrays):
        return dict(zip(graph.input_names, arrays))
    return dict(zip(runner_names, arrays))
