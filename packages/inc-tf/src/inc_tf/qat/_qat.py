"""Quantization-aware training for Keras 3: fake-quant wrappers, a Keras callback, conversion to int8.

``prepare_qat`` clones the model with every layer wrapped in :class:`FakeQuant`: the kernels the int8 targets
quantize (Dense, EinsumDense, every convolution, recurrent cells; inside a user's block too) go through
per-output-channel symmetric int8 fake quantization, and each layer's output through an
activation fake quant whose range follows an exponential moving average of the batch min/max (what
LiteRT's int8 kernels will see); a kernel layer whose activation LiteRT runs as an op of its own (softmax,
sigmoid, swish...) learns the range of its kernel's output before that activation as well. A tensor the int8
model does not have is not rounded: a convolution's output that LiteRT folds a BatchNormalization into, and a
linear kernel's (or such a BatchNormalization's) output that a ReLU after it is fused with. ``convert`` puts the
trained weights back into the user's architecture, has the TF converter fold batch norm as usual, and writes the
*learned* ranges into the calibrated flatbuffer before the int8 quantizer runs; ``format="savedmodel"`` gives them to the
SavedModel target's graph rewrite in place of calibration observers.
"""

from __future__ import annotations

import logging
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from inc_core import QATConfig
from inc_core.errors import ConfigError, UnsupportedModelError

__all__ = ["FakeQuant", "QATCallback", "convert", "prepare_qat", "qat_config_of"]

_EMA = 0.99
# Activations LiteRT fuses into the convolution or fully-connected kernel before them. Any other activation of a
# kernel layer (softmax, sigmoid, swish, gelu, tanh...) runs as an op of its own, so the kernel's output before it
# is an int8 tensor too, with a range of its own: QAT learns that range as well (see FakeQuant).
_FUSED_ACTIVATIONS = frozenset({"linear", "relu", "relu6"})
# The LiteRT ops that compute such a kernel's output (the tensor that takes the learned pre-activation range).
_KERNEL_OPS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "CONV_3D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "BATCH_MATMUL"})
#: the int8 targets ``convert`` builds (the names of ``QuantConfig.format``)
_FORMATS = ("tflite", "savedmodel")
# LiteRT ops whose int8 output takes its input's scale: a range calibrated for it is not used.
_SCALE_KEEPING = frozenset({
    "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE", "STRIDED_SLICE", "SLICE", "GATHER", "PACK", "UNPACK", "SPLIT",
    "SPLIT_V", "MAX_POOL_2D", "TILE",
})
_log = logging.getLogger("inc")


@keras.saving.register_keras_serializable(package="inc_tf")
class FakeQuant(keras.layers.Layer):
    """Wraps one layer: int8 fake quant of the kernels it holds (:func:`kernel_slots`) and of its output.

    Args:
        layer: the wrapped layer (its weights are trained in place of the original's).
        quantize_kernel: fake-quantize its kernels per output channel (symmetric, narrow range).
        quantize_output: fake-quantize the output with a learned (EMA) range.
        per_channel: per-channel kernel ranges (else one range per kernel).
        symmetric: symmetric activation range (``scheme="sym"``).
        qat_config: the :class:`~inc_core.QATConfig` of ``prepare_qat`` as ``to_dict()`` gives it.
    """

    def __init__(
        self,
        layer: keras.layers.Layer,
        *,
        quantize_kernel: bool = True,
        quantize_output: bool = True,
        per_channel: bool = True,
        symmetric: bool = False,
        quantize_input: bool = False,
        qat_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=kwargs.pop("name", layer.name), **kwargs)
        self.layer = layer
        self.quantize_kernel = quantize_kernel
        self.quantize_output = quantize_output
        self.per_channel = per_channel
        self.symmetric = symmetric
        self.quantize_input = quantize_input
        # the QATConfig prepare_qat was given (its dict form), saved with the layer: a QAT model Keras saved and
        # loaded again (ModelCheckpoint) keeps it for QATCallback and convert
        self.qat_config = qat_config

    def build(self, input_shape: Any) -> None:
        if not self.layer.built and self.quantize_output:  # a layer of several inputs builds on its symbolic call
            self.layer.build(input_shape)
        self.range_min = self.add_weight(name="range_min", shape=(), initializer="zeros", trainable=False)
        self.range_max = self.add_weight(name="range_max", shape=(), initializer="zeros", trainable=False)
        self.range_seen = self.add_weight(name="range_seen", shape=(), initializer="zeros", trainable=False)
        self.ranges_frozen = self.add_weight(name="ranges_frozen", shape=(), initializer="zeros", trainable=False)
        self.bn_frozen = self.add_weight(name="bn_frozen", shape=(), initializer="zeros", trainable=False)
        self.input_min = self.add_weight(name="input_min", shape=(), initializer="zeros", trainable=False)
        self.input_max = self.add_weight(name="input_max", shape=(), initializer="zeros", trainable=False)
        self.pre_activation_min = self.add_weight(name="pre_activation_min", shape=(), initializer="zeros", trainable=False)
        self.pre_activation_max = self.add_weight(name="pre_activation_max", shape=(), initializer="zeros", trainable=False)
        super().build(input_shape)

    @property
    def separate_activation(self) -> bool:
        """Whether LiteRT runs the wrapped layer's activation as an op after its kernel (see ``_FUSED_ACTIVATIONS``):
        then the kernel's output is fake-quantized before the activation too, with a range learned like the output's."""
        activation = getattr(self.layer, "activation", None)
        return (
            self.quantize_kernel
            and self.quantize_output
            and callable(activation)
            and getattr(activation, "__name__", "") not in _FUSED_ACTIVATIONS
            and _output_axes(self.layer, "kernel") is not None  # Dense, EinsumDense, convolutions: not RNN cells
        )

    def _call_with_int8_kernels(self, inputs: Any, args: tuple[Any, ...], kwargs: dict[str, Any], training: Any) -> Any:
        """The layer's own call, reading each kernel fake-quantized (straight-through gradient to the float one).

        Keras' StatelessScope hands the layer the fake-quantized values in place of its kernel variables, so every
        layer computes as it always does (causal padding, groups, einsum equations, recurrent steps, a user's
        block). What the call assigns inside the scope (batch-norm statistics, dropout seeds) is assigned after it.
        """
        slots = kernel_slots(self.layer)
        if not slots:
            return self.layer(inputs, *args, training=training, **kwargs)
        mapping = [(v, _fake_quant_kernel(v, axes if self.per_channel else None)) for v, axes in slots]
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
            y = self.layer(inputs, *args, training=training, **kwargs)
        kernels = {id(v) for v, _ in mapping}
        for variable in self.layer.variables:
            updated = None if id(variable) in kernels else scope.get_current_value(variable)
            if updated is not None:
                variable.assign(updated)
        for loss in scope.losses:
            self.add_loss(loss)
        return y

    def call(self, inputs: Any, *args: Any, training: bool | None = None, mask: Any = None, **kwargs: Any) -> Any:
        if self.quantize_input:
            inputs = self._quantize_model_input(inputs, training)
        if self.separate_activation:  # it quantizes the kernel too
            activation = self.layer.activation
            self.layer.activation = keras.activations.linear  # the kernel's output, as LiteRT's kernel op writes it
            try:
                y = self._call_with_int8_kernels(inputs, args, kwargs, training)
            finally:
                self.layer.activation = activation
            if training:
                self._update_range(y, self.pre_activation_min, self.pre_activation_max)
            lo, hi = self._range(self.pre_activation_min, self.pre_activation_max)
            y = activation(tf.cond(self.range_seen > 0.5, lambda: tf.quantization.fake_quant_with_min_max_vars(y, lo, hi), lambda: y))
        elif self.quantize_kernel:
            y = self._call_with_int8_kernels(inputs, args, kwargs, training)
        elif isinstance(self.layer, keras.layers.BatchNormalization):
            frozen = self.bn_frozen > 0.5
            y = tf.cond(
                tf.logical_and(tf.constant(bool(training)), tf.logical_not(frozen)),
                lambda: self.layer(inputs, training=True),
                lambda: self.layer(inputs, training=False),
            )
        else:
            y = self.layer(inputs, *args, training=training, **kwargs)
        if not self.quantize_output or not isinstance(y, tf.Tensor) or not y.dtype.is_floating:
            if training and self.quantize_input:  # the input's range was learned, though this output is not rounded
                self.range_seen.assign(1.0)
            return y
        if training:
            self._update_range(y, self.range_min, self.range_max)
            self.range_seen.assign(1.0)
        lo, hi = self._range(self.range_min, self.range_max)
        return tf.cond(self.range_seen > 0.5, lambda: tf.quantization.fake_quant_with_min_max_vars(y, lo, hi), lambda: y)

    def _quantize_model_input(self, x: Any, training: bool | None) -> Any:
        """The model input, as LiteRT's QUANTIZE op will see it (its range learned like any activation)."""
        if training:
            first = self.range_seen < 0.5
            frozen = self.ranges_frozen > 0.5
            lo, hi = tf.stop_gradient(tf.reduce_min(x)), tf.stop_gradient(tf.reduce_max(x))
            self.input_min.assign(tf.where(frozen, self.input_min, tf.where(first, lo, tf.minimum(self.input_min, lo))))
            self.input_max.assign(tf.where(frozen, self.input_max, tf.where(first, hi, tf.maximum(self.input_max, hi))))
        lo = tf.minimum(self.input_min, 0.0)
        hi = tf.maximum(self.input_max, lo + 1e-6)
        return tf.cond(self.range_seen > 0.5, lambda: tf.quantization.fake_quant_with_min_max_vars(x, lo, hi), lambda: x)

    def learned_input_range(self) -> tuple[float, float] | None:
        if not self.quantize_input or float(self.range_seen.numpy()) < 0.5:
            return None
        return min(float(self.input_min.numpy()), 0.0), max(float(self.input_max.numpy()), 0.0)

    def _range(self, low: Any, high: Any) -> tuple[Any, Any]:
        lo = tf.minimum(low, 0.0)
        hi = tf.maximum(high, lo + 1e-6)
        if self.symmetric:
            bound = tf.maximum(-lo, hi)
            return -bound, bound
        return lo, hi

    def _update_range(self, y: Any, low: Any, high: Any) -> None:
        """Move the range held in ``low``/``high`` toward this batch's (an EMA; the first batch's as it is)."""
        batch_min = tf.stop_gradient(tf.reduce_min(y))
        batch_max = tf.stop_gradient(tf.reduce_max(y))
        first = self.range_seen < 0.5
        frozen = self.ranges_frozen > 0.5
        new_min = tf.where(first, batch_min, _EMA * low + (1 - _EMA) * batch_min)
        new_max = tf.where(first, batch_max, _EMA * high + (1 - _EMA) * batch_max)
        low.assign(tf.where(frozen, low, new_min))
        high.assign(tf.where(frozen, high, new_max))

    def learned_range(self) -> tuple[float, float] | None:
        """The (min, max) this wrapper learned, or ``None`` before any training step."""
        if not self.quantize_output or float(self.range_seen.numpy()) < 0.5:
            return None
        lo, hi = self._range(self.range_min, self.range_max)
        return float(lo.numpy()), float(hi.numpy())

    def learned_pre_activation_range(self) -> tuple[float, float] | None:
        """The range learned for the kernel's output before a separate activation (``None`` without one)."""
        if not self.separate_activation or float(self.range_seen.numpy()) < 0.5:
            return None
        lo, hi = self._range(self.pre_activation_min, self.pre_activation_max)
        return float(lo.numpy()), float(hi.numpy())

    def compute_output_shape(self, input_shape: Any) -> Any:
        return self.layer.compute_output_shape(input_shape)

    def compute_output_spec(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("training", None)
        kwargs.pop("mask", None)
        if not self.layer.built:  # a symbolic call builds it from all of its inputs' shapes
            return self.layer(*args, **kwargs)
        return self.layer.compute_output_spec(*args, **kwargs)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            layer=keras.saving.serialize_keras_object(self.layer),
            quantize_kernel=self.quantize_kernel,
            quantize_output=self.quantize_output,
            per_channel=self.per_channel,
            symmetric=self.symmetric,
            quantize_input=self.quantize_input,
            qat_config=self.qat_config,
        )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FakeQuant:
        config = dict(config)
        config["layer"] = keras.saving.deserialize_keras_object(config["layer"])
        return cls(**config)


def _fake_quant_kernel(kernel: Any, axes: tuple[int, ...] | None) -> Any:
    """Symmetric narrow-range int8 fake quant, one scale per slice over ``axes`` reduced (all of them: per tensor);
    the gradient passes straight through to the float kernel."""
    bound = tf.stop_gradient(tf.reduce_max(tf.abs(kernel), axis=axes, keepdims=True))
    scale = tf.maximum(bound, 1e-8) / 127.0
    rounded = tf.clip_by_value(tf.round(kernel / scale), -127.0, 127.0) * scale
    return kernel + tf.stop_gradient(rounded - kernel)


def _output_axes(layer: keras.layers.Layer, name: str) -> tuple[int, ...] | None:
    """The axes of ``layer``'s variable ``name`` that index output channels (one int8 scale each), or ``None`` for
    a variable the int8 targets do not quantize."""
    layers = keras.layers
    if isinstance(layer, layers.EinsumDense) and name == "kernel":
        inputs, kernel = layer.equation.split("->")[0].split(",")
        return tuple(i for i, letter in enumerate(kernel) if letter not in inputs)
    if isinstance(layer, (layers.Conv1DTranspose, layers.Conv2DTranspose, layers.Conv3DTranspose)):
        return (-2,) if name == "kernel" else None  # kernel (..., out, in)
    if isinstance(layer, (layers.DepthwiseConv1D, layers.DepthwiseConv2D)):
        return (-2, -1) if name == "kernel" else None  # (..., in, multiplier): in x multiplier outputs
    if isinstance(layer, (layers.SeparableConv1D, layers.SeparableConv2D)):
        return {"depthwise_kernel": (-2, -1), "pointwise_kernel": (-1,)}.get(name)
    if isinstance(layer, (layers.Dense, layers.Conv1D, layers.Conv2D, layers.Conv3D)):
        return (-1,) if name == "kernel" else None
    if isinstance(layer, (layers.LSTMCell, layers.GRUCell, layers.SimpleRNNCell)):
        return (-1,) if name in ("kernel", "recurrent_kernel") else None
    return None


def kernel_slots(layer: keras.layers.Layer) -> list[tuple[Any, tuple[int, ...]]]:
    """Each kernel variable ``layer`` and the layers inside it hold, with the axes one int8 scale spans (all but
    the output-channel axes)."""
    from inc_tf._keras_model import sublayers

    slots = []
    for owner in (layer, *sublayers(layer)):
        for variable in owner._trainable_variables:  # its own, not its sublayers' (visited in turn)
            keep = _output_axes(owner, variable.name)
            if keep is None:
                continue
            rank = len(variable.shape)
            kept = {axis % rank for axis in keep}
            slots.append((variable, tuple(axis for axis in range(rank) if axis not in kept)))
    return slots


def holds_kernels(layer: keras.layers.Layer, *, also: frozenset[str] = frozenset()) -> bool:
    """Whether ``layer`` or a layer inside it (built or not) is of a type the int8 targets quantize (or in ``also``)."""
    from inc_tf._keras_model import sublayers
    from inc_tf.ptq._quantize import holds_quantizable

    types = {type(sub).__name__ for sub in (layer, *sublayers(layer))}
    return holds_quantizable(types) or not also.isdisjoint(types)


def _takes_several_arguments(layer: keras.layers.Layer) -> bool:
    """Whether the model calls ``layer`` with more than one tensor argument (a list of tensors counts as one)."""
    for node in layer._inbound_nodes:
        arguments = node.arguments
        tensor_kwargs = [v for v in arguments.kwargs.values() if keras.tree.flatten(v) and all(
            isinstance(t, keras.KerasTensor) for t in keras.tree.flatten(v))]
        if len(arguments.args) + len(tensor_kwargs) > 1:
            return True
    return False


# Kernel layers the TF converter folds a following BatchNormalization into (checked op by op: Conv1D runs as an
# EXPAND_DIMS -> CONV_2D, SeparableConv2D as DEPTHWISE_CONV_2D -> CONV_2D, Conv2DTranspose as TRANSPOSE_CONV).
_BN_FOLDING = (
    keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D,
    keras.layers.Conv2DTranspose,
)


def _is_fused_relu(layer: keras.layers.Layer) -> bool:
    """A ReLU or ReLU6 layer, which LiteRT runs as the fused activation of the kernel op before it."""
    if isinstance(layer, keras.layers.ReLU):
        return not layer.negative_slope and not layer.threshold and layer.max_value in (None, 6.0)
    if isinstance(layer, keras.layers.Activation):
        return getattr(layer.activation, "__name__", "") in ("relu", "relu6")
    return False


def _linear(layer: keras.layers.Layer) -> bool:
    return getattr(getattr(layer, "activation", None), "__name__", "linear") == "linear"


def _folded_into_reader(layer: keras.layers.Layer, model_outputs: set[int]) -> bool:
    """Whether LiteRT computes ``layer``'s output inside the op of the one layer reading it, so that the tensor does
    not exist in the int8 model: a convolution's (or a 2-D Dense's) output, when a BatchNormalization after it is
    folded into its kernel; a linear kernel's or such a BatchNormalization's output, when the ReLU after it is fused
    into the kernel op. Fake-quantizing it trained the model on rounding its int8 form never does."""
    if len(layer._inbound_nodes) != 1 or len(layer._outbound_nodes) != 1:
        return False
    if any(id(t) in model_outputs for t in keras.tree.flatten(layer._inbound_nodes[0].output_tensors)):
        return False
    reader = layer._outbound_nodes[0].operation
    if isinstance(layer, _BN_FOLDING) and _linear(layer):
        return isinstance(reader, keras.layers.BatchNormalization) or _is_fused_relu(reader)
    if isinstance(layer, keras.layers.Dense) and _linear(layer):
        matrix = len(layer._inbound_nodes[0].output_tensors[0].shape) == 2  # BN folds into a 2-D FULLY_CONNECTED
        return (matrix and isinstance(reader, keras.layers.BatchNormalization)) or _is_fused_relu(reader)
    if isinstance(layer, keras.layers.BatchNormalization) and _is_fused_relu(reader):
        producers = layer._inbound_nodes[0].parent_nodes
        return len(producers) == 1 and _folded_into_reader(producers[0].operation, model_outputs)
    return False


def _wrappers(model: keras.Model) -> list[FakeQuant]:
    return [layer for layer in model.layers if isinstance(layer, FakeQuant)]


# Layers that standardise what they read (kept float when they read a model input).
_STANDARDISING = (keras.layers.Normalization, keras.layers.BatchNormalization)


def prepare_qat(model: keras.Model, config: QATConfig | None = None) -> keras.Model:
    """A copy of ``model`` with int8 fake quant, ready for the user's ``compile`` and ``fit``.

    The user's model is not modified. Layers that ``config.exclude`` selects (by the names and types
    ``inc.describe`` reports) are wrapped without fake quant of their kernel.

    Raises:
        UnsupportedModelError: the model is not a functional or Sequential Keras model.
        ConfigError: ``config`` is not a QATConfig, or an exclude name matches no layer.
    """
    from inc_tf._keras_model import check_keras_model, copy_state, full_precision_config, refuse_table_layers
    from inc_tf.ptq._quantize import ACTIVATION_PRODUCTS

    config = config or QATConfig()
    if not isinstance(config, QATConfig):
        raise ConfigError(f"prepare_qat: config must be an inc.QATConfig, got {type(config).__name__}.")
    model = check_keras_model(model)
    refuse_table_layers(model)
    from inc_core.backend import Op

    ops = [  # what describe lists: the quantizable layers, and a user's blocks holding some
        Op(layer.name, type(layer).__name__)
        for layer in model.layers
        if holds_kernels(layer, also=frozenset(ACTIVATION_PRODUCTS))
    ]
    excluded = set(config.exclude.select(ops)) if config.exclude else set()
    per_channel = config.granularity == "per_channel"
    symmetric = config.scheme == "sym"

    # Float inputs only: an integer input (an Embedding's codes) is not quantized, and LiteRT feeds it as it is.
    input_ids = {id(t) for t in model.inputs if "float" in str(getattr(t, "dtype", "float32"))}
    output_ids = {id(t) for t in keras.tree.flatten(model.outputs)}

    def reads_model_input(layer: keras.layers.Layer) -> bool:
        # One tensor argument only: a layer fed a list ([query, value] to Attention, [x, skip] to Add) passes it
        # on as it is, and the converter takes the input's range from calibration instead.
        return any(
            id(t) in input_ids and len(node.arguments.keras_tensors) == 1
            for node in layer._inbound_nodes
            for t in node.input_tensors
        )

    def wrap(layer: keras.layers.Layer) -> keras.layers.Layer:
        if isinstance(layer, keras.layers.InputLayer):
            return layer
        try:
            clone = type(layer).from_config(full_precision_config(layer))
        except Exception as exc:  # Keras raises TypeError, ValueError... from a layer's own __init__
            raise UnsupportedModelError(
                f"prepare_qat: layer {layer.name!r} ({type(layer).__qualname__}) cannot be rebuilt from its "
                f"get_config() ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); QAT trains a copy of the "
                "model built layer by layer from their configs. Make its get_config() return every argument its "
                "__init__ takes."
            ) from exc
        several = _takes_several_arguments(layer)
        if several and not holds_kernels(layer):
            return clone  # Add([x, skip]), x[:, 3:4]: nothing to fake-quantize; convert calibrates its output
        return FakeQuant(
            clone,
            quantize_kernel=layer.name not in excluded,
            # MultiHeadAttention(query, value), a transformer block given its padding mask: kernels fake-quantized,
            # the output range taken from calibration at convert (one range for a layer of several inputs)
            quantize_output=not several and not _folded_into_reader(layer, output_ids),
            per_channel=per_channel,
            symmetric=symmetric,
            # a layer standardising raw features reads them in float in the INT8 model (ptq._quantize's
            # float_layer_nodes): fake-quantizing them per tensor trained on rounded-away features (breast-cancer
            # behind a BatchNormalization: QAT model accuracy 0.965 -> 0.696)
            quantize_input=not several and reads_model_input(layer) and not isinstance(layer, _STANDARDISING),
            qat_config=config.to_dict(),
        )

    try:
        qat = keras.models.clone_model(model, clone_function=wrap)
    except UnsupportedModelError:
        raise
    except Exception as exc:  # subclassed models cannot be cloned layer by layer
        raise UnsupportedModelError(
            f"prepare_qat could not clone Keras model {model.name!r} ({type(model).__qualname__}) layer by layer: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}. QAT needs a functional or Sequential model."
        ) from exc
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        copy = qat.get_layer(layer.name)
        copy_state(layer, copy.layer if isinstance(copy, FakeQuant) else copy)
    qat._inc_qat_config = config
    # convert() rebuilds the user's architecture from this and fills in the trained weights.
    qat._inc_qat_source = model.to_json()
    return qat


class QATCallback(keras.callbacks.Callback):
    """Freezes activation ranges and batch-norm statistics at the configured optimizer steps.

    Reads ``freeze_observer_step`` and ``freeze_bn_step`` from the :class:`~inc_core.QATConfig` given
    here or, when omitted, the one ``prepare_qat`` was called with. Adds ``qat_ranges_frozen`` and
    ``qat_bn_frozen`` (0/1) to Keras' ``logs``, so they show in the progress bar and the History.
    """

    def __init__(self, config: QATConfig | None = None) -> None:
        super().__init__()
        if config is not None and not isinstance(config, QATConfig):
            raise ConfigError(f"QATCallback: config must be an inc.QATConfig, got {type(config).__name__}.")
        self.config = config
        self.step = 0
        self._frozen = (0.0, 0.0)

    def _config(self) -> QATConfig:
        if self.config is not None:
            return self.config
        return qat_config_of(self.model)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if not _wrappers(self.model):
            raise UnsupportedModelError(
                "QATCallback is attached to a model without fake quant; pass the model inc_tf.prepare_qat returned."
            )

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.step += 1
        config = self._config()
        freeze_ranges = config.freeze_observer_step is not None and self.step >= config.freeze_observer_step
        freeze_bn = config.freeze_bn_step is not None and self.step >= config.freeze_bn_step
        for wrapper in _wrappers(self.model):
            if freeze_ranges:
                wrapper.ranges_frozen.assign(1.0)
            if freeze_bn:
                wrapper.bn_frozen.assign(1.0)
        self._frozen = (float(freeze_ranges), float(freeze_bn))
        if logs is not None:
            logs["qat_ranges_frozen"], logs["qat_bn_frozen"] = self._frozen

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None:  # the epoch logs are what History keeps
            logs["qat_ranges_frozen"], logs["qat_bn_frozen"] = self._frozen


def convert(model: keras.Model, *, dataset: Any = None, format: str = "tflite") -> Any:
    """The int8 model of a QAT-trained model, with the ranges it learned.

    Args:
        model: what :func:`prepare_qat` returned, after training.
        dataset: representative inputs (a few hundred training inputs); tensors without a learned range (the
            steps inside a layer that LiteRT runs as several ops, such as LayerNormalization's mean and variance,
            and ops between layers) get their range from these. Without it, from synthetic inputs spread over the
            model input's learned range, with a warning naming how many tensors were calibrated that way.
        format: ``"tflite"`` (a LiteRT int8 model) or ``"savedmodel"`` (a :class:`TFSavedModel` on TF's
            oneDNN int8 kernels), the same targets as ``QuantConfig(format=...)``.

    Raises:
        ConfigError: ``format`` is not one of the targets.
        UnsupportedModelError: ``model`` has no fake quant, or was never trained.
    """
    if format not in _FORMATS:
        raise ConfigError(f"convert: format must be one of {list(_FORMATS)}, got {format!r}.")
    from inc_core import Dataset
    from inc_tf._flatbuffer import with_ranges
    from inc_tf._keras_model import copy_state, prepare_graph
    from inc_tf._litert import LiteRTModel, check_runs
    from inc_tf.ptq._calibrate import collect
    from inc_tf.ptq._convert import quantize_flatbuffer
    from inc_tf.ptq._quantize import describe_graph, float_layer_nodes, layers_of_op, op_owners

    wrappers = _wrappers(model) if isinstance(model, keras.Model) else []
    if not wrappers:
        raise UnsupportedModelError(
            f"convert takes the model inc_tf.prepare_qat returned; got {type(model).__qualname__} without fake quant."
        )
    learned = {w.name: w.learned_range() for w in wrappers}
    pre_activation = {w.name: w.learned_pre_activation_range() for w in wrappers}
    if all(r is None for r in learned.values()):
        raise UnsupportedModelError("convert: the QAT model was never trained (no learned range); fit it first.")
    config = qat_config_of(model)
    input_ranges = _learned_input_ranges(model, wrappers)
    input_range = next(iter(input_ranges.values()), None) if len(input_ranges) == 1 else None
    fp32 = keras.models.model_from_json(_source_architecture(model))
    for layer in model.layers:  # the trained weights, of wrapped and unwrapped layers alike
        if not isinstance(layer, keras.layers.InputLayer):
            trained = layer.layer if isinstance(layer, FakeQuant) else layer
            copy_state(trained, fp32.get_layer(layer.name))
    graph = prepare_graph(fp32)
    synthetic = dataset is None
    if synthetic:
        dataset = Dataset(_synthetic_inputs(graph, input_range or (0.0, 1.0)), batch_size=4)
    dataset = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    if format == "savedmodel":
        return _convert_savedmodel(graph, dataset, config, learned, input_ranges, synthetic=synthetic)
    calibration = collect(graph, dataset, samples=64)
    producer = {out: record for record in calibration.records for out in record.outputs}
    owner_list = op_owners(graph, calibration.records)
    owners = {out: owner for record, owner in zip(calibration.records, owner_list) for out in record.outputs}
    readers: dict[int, set[int | None]] = {}
    for record, owner in zip(calibration.records, owner_list):
        for tensor in record.inputs:
            readers.setdefault(tensor, set()).add(owner)

    def leaves_its_layer(tensor: int, owner: int) -> bool:
        # A learned range is that of the layer's output. The ops inside a layer that LiteRT runs as several
        # (SeparableConv's depthwise step, GroupNormalization's statistics, TimeDistributed's reshapes) keep
        # the calibrated ranges of their own tensors.
        found = readers.get(tensor, set())
        return not found or any(reader != owner for reader in found)

    ranges = {}
    unlearned: list[tuple[int | None, tuple[str, ...]]] = []  # (owner, op) of each tensor given a calibrated range
    for tensor in calibration.observers:
        record = producer.get(tensor)
        owner = owners.get(tensor)
        found = None
        if owner is not None and leaves_its_layer(tensor, owner):
            found = learned.get(graph.layer_names[owner])
        elif owner is not None and record is not None and record.op in _KERNEL_OPS:
            found = pre_activation.get(graph.layer_names[owner])  # before the activation LiteRT runs after it
        if record is None:  # no producer: a model input, named "serving_default_<input name>:0" by the converter
            found = _input_range_of(calibration.names.get(tensor, ""), input_ranges) or found
        if found is None and record is not None and record.op not in _SCALE_KEEPING:
            unlearned.append((owner, record.output_names))
        ranges[tensor] = found or calibration.range(tensor, "minmax", percentile=100.0, dtype="uint8", scheme=config.scheme)
    # Layers the config excluded trained without kernel fake quant: they stay float in LiteRT too.
    excluded = {
        graph.layer_names.index(op.name) for op in describe_graph(graph).ops if config.exclude.matches(op.name, op.op_type)
    }
    excluded_nodes = [
        name
        for record, owner in zip(calibration.records, owner_list)
        if (layers_of_op(graph, record) | {owner}) & excluded
        for name in record.output_names
    ] + float_layer_nodes(graph, calibration.records)
    if synthetic:  # what stays float (excluded, a Normalization) uses no range
        float_ops = set(excluded_nodes)
        calibrated = [owner for owner, names in unlearned if float_ops.isdisjoint(names)]
        if calibrated:
            _warn_synthetic_calibration(graph, calibrated)
    content = quantize_flatbuffer(
        with_ranges(calibration.calibrated, ranges),
        per_channel=config.granularity == "per_channel",
        denylisted_nodes=excluded_nodes,
    )
    quantized = LiteRTModel.with_layers(content, graph.layer_names, renamed=graph.renamed, input_names=graph.input_names)
    check_runs(quantized, calibration.probe, "the first batch of the conversion data")
    return quantized


def _warn_synthetic_calibration(graph: Any, owners: list[int | None]) -> None:
    """Say which tensors convert, given no dataset, calibrated on synthetic inputs (the int8 ops inside a layer that
    LiteRT runs as several, such as LayerNormalization's mean and variance, and ops between layers): noise puts
    their ranges far from the trained model's (ConvNeXtTiny on digits: 0.90 of the int8 model's predictions equal to
    the QAT model's, 0.9975 calibrated on 256 training images)."""
    import warnings

    kinds: dict[str, int] = {}
    for owner in owners:
        kind = f"{graph.layer_types[owner]} layers" if owner is not None else "ops between layers"
        kinds[kind] = kinds.get(kind, 0) + 1
    listed = ", ".join(f"{count} in {kind}" for kind, count in sorted(kinds.items(), key=lambda item: -item[1]))
    message = (
        f"convert: {len(owners)} int8 tensor(s) have no range learned in training ({listed}) and were calibrated on "
        "synthetic inputs spread over the model input's range, not on data, so the int8 model can disagree with the "
        "QAT model there. Pass convert(model, dataset=...) with a few hundred training inputs."
    )
    _log.warning(message)
    warnings.warn(message, UserWarning, stacklevel=3)


def qat_config_of(model: keras.Model) -> QATConfig:
    """The QATConfig ``model`` was prepared with: kept on the model, or, once Keras saved and loaded it, in its
    wrappers' configs; a model of neither kind gets the defaults."""
    config = getattr(model, "_inc_qat_config", None)
    if isinstance(config, QATConfig):
        return config
    for wrapper in _wrappers(model):
        if wrapper.qat_config:
            return QATConfig.from_dict(wrapper.qat_config)
    return QATConfig()


def _source_architecture(model: keras.Model) -> str:
    """The user's architecture (Keras JSON) of a QAT model: kept by prepare_qat, or, once Keras saved and loaded the
    model (which keeps no such attribute), rebuilt by taking each wrapped layer out of its FakeQuant."""
    source = getattr(model, "_inc_qat_source", None)
    if isinstance(source, str):
        return source

    def unwrap(layer: keras.layers.Layer) -> keras.layers.Layer:
        inner = layer.layer if isinstance(layer, FakeQuant) else layer
        return type(inner).from_config(inner.get_config())

    def call(layer: keras.layers.Layer, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("mask", False) is None:  # FakeQuant.call's own keyword, recorded with each call
            del kwargs["mask"]
        return layer(*args, **kwargs)

    try:
        return str(keras.models.clone_model(model, clone_function=unwrap, call_function=call).to_json())
    except Exception as exc:  # Keras raises TypeError, ValueError... from a layer's own __init__ or call
        raise UnsupportedModelError(
            f"convert: the architecture of QAT model {model.name!r} could not be rebuilt without its fake quant "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}); convert the model "
            "prepare_qat returned, or call prepare_qat again on the user's model."
        ) from exc


def _convert_savedmodel(
    graph: Any,
    dataset: Any,
    config: QATConfig,
    learned: dict[str, tuple[float, float] | None],
    input_ranges: dict[str, tuple[float, float]],
    *,
    synthetic: bool,
) -> Any:
    """The SavedModel int8 target: PTQ's graph rewrite (batch norm folded) fed the learned ranges.

    A tensor takes the range of the wrapper whose layer writes it as its final output; a model input takes
    the input range its readers learned. Anything else (a tensor inside a layer) is observed on ``dataset``.
    """
    from inc_core import QuantConfig
    from inc_tf._frozen import freeze_keras
    from inc_tf.ptq._savedmodel_quantize import calibrate_plan, plan_graph, quantize_plan

    plan = plan_graph(freeze_keras(graph.model, graph.input_names, graph.input_shapes, graph.input_dtypes), graph)
    layer_of_node = {}
    for node in plan.frozen.graph_def.node:
        found = graph.layers_in([node.name])
        if found:
            layer_of_node[node.name] = max(found)
    # A tensor read by another node of its own layer is not that layer's output (whose range was learned).
    inner = {
        ref.lstrip("^").split(":")[0]
        for node in plan.frozen.graph_def.node
        for ref in node.input
        if node.name in layer_of_node and layer_of_node.get(ref.lstrip("^").split(":")[0]) == layer_of_node[node.name]
    }
    ranges: dict[str, tuple[float, float]] = {}
    unlearned: dict[str, int | None] = {}  # tensor -> its layer, for the tensors observed on ``dataset``
    for unit in plan.units:
        for tensor in (unit.input, unit.output, unit.core_output, unit.summand):
            if tensor is None:
                continue
            node = tensor.split(":")[0]
            if tensor in plan.frozen.input_tensors:
                found = input_ranges.get(graph.input_names[plan.frozen.input_tensors.index(tensor)])
            elif node in layer_of_node and node not in inner and tensor.endswith(":0"):
                found = learned.get(graph.layer_names[layer_of_node[node]])
            else:
                found = None
            if found is not None:
                ranges[tensor] = found
            else:
                unlearned[tensor] = layer_of_node.get(node)
    if synthetic and unlearned.keys() - ranges.keys():
        _warn_synthetic_calibration(graph, [unlearned[t] for t in unlearned.keys() - ranges.keys()])
    ptq = QuantConfig(
        format="savedmodel", calibration="minmax", granularity=config.granularity, scheme=config.scheme,
        exclude=config.exclude,
    )
    calibration = calibrate_plan(plan, dataset, samples=64)
    return quantize_plan(plan, ptq, calibration, ranges=ranges)


def _learned_input_ranges(model: keras.Model, wrappers: list[FakeQuant]) -> dict[str, tuple[float, float]]:
    """Model input name -> the range learned by the fake quant of the layers reading it (their union when
    several do). Each float input has its own: one range for all would clip the wider ones."""
    names = {id(t): getattr(t, "name", "") for t in model.inputs}
    ranges: dict[str, tuple[float, float]] = {}
    for wrapper in wrappers:
        learned = wrapper.learned_input_range()
        if learned is None:
            continue
        for node in wrapper._inbound_nodes:
            for tensor in node.input_tensors:
                name = names.get(id(tensor))
                if name:
                    low, high = ranges.get(name, learned)
                    ranges[name] = (min(low, learned[0]), max(high, learned[1]))
    return ranges


def _input_range_of(tensor_name: str, ranges: dict[str, tuple[float, float]]) -> tuple[float, float] | None:
    """The learned range of the model input a LiteRT input tensor (``serving_default_numeric:0``) feeds."""
    base = tensor_name.split(":")[0]
    for name, found in ranges.items():
        if base in (name, f"serving_default_{name}"):
            return found
    return next(iter(ranges.values())) if len(ranges) == 1 else None


def _synthetic_inputs(graph: Any, span: tuple[float, float]) -> np.ndarray:
    """Inputs spanning the learned input range: the converter needs a few to create its range fields, which
    inc then overwrites with the learned ranges."""
    if len(graph.input_shapes) != 1 or any(d is None for d in graph.input_shapes[0]):
        raise UnsupportedModelError(
            "convert needs dataset=... (a few representative inputs) for a model with several or variable-shape inputs."
        )
    rng = np.random.default_rng(0)
    shape = (64, *graph.input_shapes[0])  # as many as collect() reads: the lookups' (and LSTM gates') ranges come from them
    dtype = np.dtype(graph.input_dtypes[0]) if graph.input_dtypes else np.dtype(np.float32)
    if np.issubdtype(dtype, np.integer):
        # Token or category codes: every row of the tables they index, so the lookups' outputs (whose ranges
        # are calibrated on these inputs, not learned) see the whole table.
        rows = [layer.input_dim for layer in _all_layers(graph.model) if isinstance(layer, keras.layers.Embedding)]
        if not rows:
            raise UnsupportedModelError(
                f"convert needs dataset=... (a few representative inputs) for a model taking {dtype} inputs that no "
                "Embedding reads: inc cannot tell which codes are valid."
            )
        return rng.integers(0, min(rows), size=shape).astype(dtype)
    return rng.uniform(span[0], span[1], size=shape).astype(np.float32)


def _all_layers(model: Any) -> list[Any]:
    found = []
    for layer in getattr(model, "layers", []):
        found.append(layer)
        found.extend(_all_layers(layer))
    return found
