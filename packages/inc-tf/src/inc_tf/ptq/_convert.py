"""The TF converter steps: a calibrated float flatbuffer, the int8 quantizer, and dynamic-range output."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from inc_core.errors import TuningError, UnsupportedModelError
from inc_tf._keras_model import sublayers

__all__ = ["calibrated_flatbuffer", "dynamic_flatbuffer", "quantize_flatbuffer"]

log = logging.getLogger("inc")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The converter prints SavedModel summaries and MLIR notes to stdout/stderr; keep library use quiet."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _converter(model: Any, example: list[np.ndarray] | None = None) -> Any:
    """The converter for ``model``; a subclassed model is traced through a tf.function on ``example``'s shapes."""
    import tensorflow as tf

    try:
        with _quiet():
            if getattr(model, "inputs", None):
                return tf.lite.TFLiteConverter.from_keras_model(model)
            specs = _subclassed_specs(model, example)
            from inc_tf._frozen import keras_call

            fn = tf.function(keras_call(model))
            from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

            # Frozen weights: a concrete function's resource variables would become LiteRT variable ops.
            concrete = convert_variables_to_constants_v2(fn.get_concrete_function(*specs))
            return tf.lite.TFLiteConverter.from_concrete_functions([concrete])
    except UnsupportedModelError:
        raise
    except Exception as exc:  # tracing errors surface as many TF/Python exception types
        raise _untraceable(model, exc) from exc


def _subclassed_specs(model: Any, example: list[np.ndarray] | None) -> list[Any]:
    """Input specs of a subclassed model: from a calibration batch, else from the shape it was built with."""
    import tensorflow as tf

    if example is not None:
        return [tf.TensorSpec([None, *a.shape[1:]], tf.float32) for a in example]
    shapes = getattr(model, "_build_shapes_dict", None) or {}
    shape = next(iter(shapes.values()), None)
    if shape is None:
        raise UnsupportedModelError(
            f"Subclassed Keras model {model.name!r} has no known input shape for dynamic quantization. Build it "
            "with model.build((None, ...)) first, or use approach='static' with calibration data."
        )
    return [tf.TensorSpec([None, *tuple(shape)[1:]], tf.float32)]


# A converter error for TF ops without a LiteRT kernel, and the op locations it gives ("fused["Op:", "path/Op@fn"]").
_NOT_BUILTIN = re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op")
_LOCATION = re.compile(r'fused\["(\w+):", "([^"@]+)')
# The op in a form LiteRT's STRIDED_SLICE lacks: a new axis (``x[:, None]``) on a tensor of unknown dimensions.
_NEW_AXIS_ON_FREE_SHAPE = re.compile(r'"tf\.StridedSlice".*new_axis_mask = [1-9].*tensor<[^>]*\?')


def _layers_named(text: str, ops: list[str], layer_names: tuple[str, ...]) -> list[str]:
    """The user's layers that hold ``ops`` in a converter error's op locations: ``model_1/incL3x_1/Op`` (inc's
    renamed copy) or ``model_1/determinant_1/Op`` (a model converted under its own names; TF appends ``_1``)."""
    found = set()
    for op, path in _LOCATION.findall(text):
        if op not in ops:
            continue
        for part in path.split("/"):
            name = _user_name(part, layer_names)
            bare = re.sub(r"_\d+$", "", part)
            if name != part or part in layer_names:
                found.add(name)
            elif bare in layer_names:
                found.add(bare)
    return sorted(found)


def _untraceable(model: Any, exc: BaseException, layer_names: tuple[str, ...] = ()) -> UnsupportedModelError:
    text = str(exc)
    ops = sorted(set(_NOT_BUILTIN.findall(text)))
    if ops:  # the graph traced; LiteRT has no kernel for some of its TF ops
        layers = _layers_named(text, ops, layer_names)
        where = f" (in layer {', '.join(repr(n) for n in layers)})" if layers else ""
        if ops == ["StridedSlice"] and _NEW_AXIS_ON_FREE_SHAPE.search(text):
            return UnsupportedModelError(
                f"Keras model {getattr(model, 'name', '?')!r} inserts an axis into a tensor whose dimensions are not "
                f"fixed (x[:, None], a TF StridedSlice with new_axis_mask){where}: LiteRT's STRIDED_SLICE takes "
                "that only on fixed shapes. Give the model inputs a fixed size (keras.Input(shape=(128,)) for a "
                "sequence length), or use QuantConfig(format='savedmodel'), where TensorFlow runs every op."
            )
        return UnsupportedModelError(
            f"Keras model {getattr(model, 'name', '?')!r} uses TF op {', '.join(ops)}{where}, which LiteRT's "
            "built-in ops do not include (the ai-edge-litert interpreter runs no TF/Flex ops). Use "
            "QuantConfig(format='savedmodel'), where TensorFlow runs every op, or compute it outside the model."
        )
    return UnsupportedModelError(
        f"TensorFlow could not trace Keras model {getattr(model, 'name', '?')!r} ({type(model).__qualname__}) into a "
        f"graph: {type(exc).__name__}: {_line(exc)}. Subclassed models must be traceable by tf.function: no "
        ".numpy() calls or Python branches on tensor values in call(); or build the model with the functional API."
    )


@contextlib.contextmanager
def _rnns_unrolled(model: Any, layer_names: tuple[str, ...] = ()) -> Iterator[None]:
    """Every Keras RNN layer of ``model`` unrolled while the converter traces it; restored afterwards.

    Keras 3 runs an RNN as a ``while`` loop over TensorList ops, which the LiteRT converter can only lower with a
    static batch size (and then cannot quantize). Unrolled over its known number of time steps, the same layer is
    a chain of MatMuls and gate ops that LiteRT runs in INT8 at any batch size. The weights are the layer's own:
    only the ``unroll`` flag its ``call`` reads is set, for the duration of the trace, on the layers of the model
    the converter reads (inc's renamed copy of a functional model; a subclassed model's own layers).
    ``layer_names`` maps the converter copy's ``incL<i>x`` names back to the user's, for errors.
    """
    import keras

    rnns = [layer for layer in sublayers(model) if isinstance(layer, keras.layers.RNN) and not layer.unroll]
    for layer in rnns:
        _check_unrollable(model, layer, _user_name(layer.name, layer_names))
    try:
        for layer in rnns:
            layer.unroll = True
        yield
    finally:
        for layer in rnns:
            layer.unroll = False


def _user_name(name: str, layer_names: tuple[str, ...]) -> str:
    from inc_tf._keras_model import layer_index

    index = layer_index(name)
    return layer_names[index] if index is not None and index < len(layer_names) else name


def _check_unrollable(model: Any, layer: Any, name: str) -> None:
    """An RNN unrolls only over a known number of time steps and without state carried between calls."""
    if getattr(layer, "stateful", False):
        raise UnsupportedModelError(
            f"Keras model {getattr(model, 'name', '?')!r}: RNN layer {name!r} is stateful; LiteRT INT8 needs "
            "its state reset per call. Build the inference model with stateful=False (same weights), or use "
            "QuantConfig(format='savedmodel')."
        )
    steps = _time_steps(layer)
    if steps is None:
        raise UnsupportedModelError(
            f"Keras model {getattr(model, 'name', '?')!r}: RNN layer {name!r} reads sequences of unknown "
            "length, and LiteRT converts a Keras RNN only unrolled over a fixed number of time steps. Give the "
            "model's Input a fixed length (keras.Input((steps, features)), padding shorter sequences), or use "
            "QuantConfig(format='savedmodel'), which runs the RNN in float and its Dense/Conv layers in INT8."
        )


def _time_steps(layer: Any) -> int | None:
    """The time dimension of ``layer``'s input (time-major layers read it first), None if unknown."""
    try:
        shape = layer.input.shape
    except (AttributeError, ValueError):  # a layer of a subclassed model has no symbolic input
        shape = getattr(layer, "_build_shapes_dict", {}) or {}
        shape = next(iter(shape.values()), None)
    if shape is None or len(shape) < 3:
        return None
    return shape[0] if getattr(layer, "time_major", False) else shape[1]


def calibrated_flatbuffer(model: Any, samples: Iterable[Any], *, layer_names: tuple[str, ...] = ()) -> bytes:
    """A float ``.tflite`` whose activations carry calibration min/max fields, ready for :func:`quantize_flatbuffer`.

    ``samples`` only has to make the converter create the fields: inc overwrites every range with
    its own observers' answer before quantizing.
    """
    import tensorflow as tf

    fixed = list(samples)
    with _rnns_unrolled(model, layer_names):
        converter = _converter(model, fixed[0] if fixed else None)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: iter(fixed)
        converter._experimental_calibrate_only = True  # the documented path of TF's own QuantizationDebugger
        return _convert(model, converter, layer_names)


def dynamic_flatbuffer(model: Any, *, layer_names: tuple[str, ...] = ()) -> bytes:
    """Dynamic-range quantization: int8 weights, activations quantized at run time by LiteRT's hybrid kernels."""
    import tensorflow as tf

    with _rnns_unrolled(model, layer_names):
        converter = _converter(model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        return _convert(model, converter, layer_names)


def float_flatbuffer(model: Any) -> bytes:
    """The FP32 ``.tflite`` (for comparisons and benchmarks)."""
    with _rnns_unrolled(model):
        return _convert(model, _converter(model))


def _convert(model: Any, converter: Any, layer_names: tuple[str, ...] = ()) -> bytes:
    try:
        with _quiet():
            return bytes(converter.convert())
    except Exception as exc:
        raise _untraceable(model, exc, layer_names) from exc


def quantize_flatbuffer(calibrated: bytes, *, per_channel: bool, denylisted_nodes: list[str]) -> bytes:
    """Int8 weights and activations from a calibrated flatbuffer, keeping ``denylisted_nodes`` in float, and the
    ops whose INT8 form would be wrong (:func:`inc_tf._flatbuffer.kept_float_nodes`).

    Raises:
        TuningError: the quantizer rejected the model (recorded as a failed trial by autotune).
    """
    from tensorflow.lite.python import convert

    from inc_tf._flatbuffer import kept_float_nodes, op_records, repaired_quantization

    denylisted_nodes = [*denylisted_nodes, *kept_float_nodes(op_records(calibrated))]
    try:
        with _quiet():
            quantized = bytes(
                convert.mlir_quantize(
                    calibrated,
                    disable_per_channel=not per_channel,
                    denylisted_nodes=denylisted_nodes or None,
                )
            )
    except Exception as exc:
        raise TuningError(
            f"The TF LiteRT quantizer failed on the calibrated model: {type(exc).__name__}: {_line(exc)}. "
            "Exclude the layer it names with QuantConfig(exclude=inc.LayerFilter(names=(...)))."
        ) from exc
    return repaired_quantization(quantized)


def _line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:400]
