"""A BatchNormalization that reads a model input, as the converter's copy computes it.

Such a layer is a tabular model's standardisation of raw features, whose scales differ by orders of magnitude
(scikit-learn's breast-cancer: 0.001 to 4,000). Keras computes it in inference as ``x * a + (beta - mean * a)``, and
the LiteRT converter folds both into the next Dense: ``W * a`` per input column and a bias. Quantized per output
channel, those weights round most columns to zero; and the folded offset leaves the Dense's input uncentred
(``x * a`` still spans the features' means), which one per-tensor int8 scale cannot resolve either (output cosine
0.32-0.34 against FP32 on breast-cancer). Computed as ``(x - mean) * a + beta`` from the same four variables with
constants shaped ``(1, features)``, which the converter leaves out of the Dense, the layer stays three float
elementwise ops (``ptq._quantize.float_layer_nodes``) and the INT8 Dense reads centred, standardised features.
"""

from __future__ import annotations

from typing import Any

import keras

__all__ = ["InputBatchNorm", "reads_model_input"]


class InputBatchNorm(keras.layers.Layer):
    """Inference-mode BatchNormalization over the last axis, holding the same variables in the same order."""

    def __init__(self, *, epsilon: float, center: bool, scale: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epsilon, self.center, self.scale = epsilon, center, scale

    def build(self, input_shape: Any) -> None:
        shape = (input_shape[-1],)
        # BatchNormalization's variables, in its order: set_weights copies them one to one
        self.gamma = self.add_weight(shape=shape, name="gamma", initializer="ones") if self.scale else None
        self.beta = self.add_weight(shape=shape, name="beta", initializer="zeros") if self.center else None
        self.moving_mean = self.add_weight(shape=shape, name="moving_mean", initializer="zeros", trainable=False)
        self.moving_variance = self.add_weight(shape=shape, name="moving_variance", initializer="ones", trainable=False)

    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:  # BatchNormalization's signature
        ops = keras.ops
        factor = ops.rsqrt(self.moving_variance + self.epsilon)
        if self.gamma is not None:
            factor = factor * self.gamma
        # Constants shaped (1, features), as Normalization's: LiteRT's quantizer folds a multiplication by a
        # constant of shape (features,) into the next Dense's weights, and then none of this would stay float.
        out = (inputs - ops.reshape(self.moving_mean, (1, -1))) * ops.reshape(factor, (1, -1))
        return out + ops.reshape(self.beta, (1, -1)) if self.beta is not None else out

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "epsilon": self.epsilon, "center": self.center, "scale": self.scale}


def reads_model_input(model: Any, layer: Any) -> bool:
    """Whether ``layer`` of the functional ``model`` is called on one of the model's inputs."""
    inputs = {id(t) for t in getattr(model, "inputs", None) or []}
    return any(id(t) in inputs for node in layer._inbound_nodes for t in node.input_tensors)


def converter_layer(layer: Any, config: dict[str, Any]) -> Any:
    """The converter copy's layer for ``layer`` (a BatchNormalization over the last axis of a 2-D input, reading a
    model input), or None to clone it as it is."""
    if not isinstance(layer, keras.layers.BatchNormalization) or config.get("axis") not in (-1, [-1], 1, [1]):
        return None
    if len(layer.input.shape) != 2:
        return None
    return InputBatchNorm(
        epsilon=config["epsilon"], center=config["center"], scale=config["scale"], name=config["name"],
        dtype=config.get("dtype"),
    )
