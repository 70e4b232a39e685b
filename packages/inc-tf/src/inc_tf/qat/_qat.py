"""Quantization-aware training for Keras 3: ``prepare_qat`` and the Keras callback that freezes ranges and BN.

``prepare_qat`` clones the model with every layer wrapped in :class:`~inc_tf.qat._fake_quant.FakeQuant` (int8 fake
quant of its kernels and of its output). A tensor the int8 model does not have is not rounded: a convolution's
output that LiteRT folds a BatchNormalization into, and a linear kernel's (or such a BatchNormalization's) output
that a ReLU after it is fused with. ``convert`` (``_convert``) turns the trained model into int8.
"""

from __future__ import annotations

from typing import Any

import keras

from inc_core import QATConfig
from inc_core.errors import ConfigError, UnsupportedModelError
from inc_tf.qat._fake_quant import FakeQuant, holds_kernels

__all__ = ["QATCallback", "prepare_qat", "qat_config_of"]


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
