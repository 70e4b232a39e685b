"""The fake-quant wrapper of Keras QAT: int8 fake quantization of a layer's kernels and of its output.

Kernels (Dense, EinsumDense, every convolution, recurrent cells; inside a user's block too) go through
per-output-channel symmetric int8 fake quantization; the output through an activation fake quant whose range
follows an exponential moving average of the batch min/max (what LiteRT's int8 kernels will see). A kernel layer
whose activation LiteRT runs as an op of its own (softmax, sigmoid, swish...) learns the range of its kernel's
output before that activation as well.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

__all__ = ["FakeQuant", "holds_kernels", "kernel_slots"]

_EMA = 0.99
# Activations LiteRT fuses into the convolution or fully-connected kernel before them. Any other activation of a
# kernel layer (softmax, sigmoid, swish, gelu, tanh...) runs as an op of its own, so the kernel's output before it
# is an int8 tensor too, with a range of its own: QAT learns that range as well (see FakeQuant).
_FUSED_ACTIVATIONS = frozenset({"linear", "relu", "relu6"})


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
