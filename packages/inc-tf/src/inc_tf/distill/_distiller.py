"""Knowledge distillation as a Keras model: ``Distiller(student, teacher, DistillConfig(...))`` with ``compile``/``fit``."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from inc_core._distill_config import DistillConfig
from inc_core.errors import ConfigError, UnsupportedModelError

__all__ = ["Distiller"]

_PARTS = ("hard", "soft", "layer")


def _output_shape(model: keras.Model) -> tuple[Any, ...] | None:
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):  # subclassed models have no symbolic outputs
        return None
    return tuple(outputs[0].shape) if outputs and len(outputs) == 1 else None


def _ends_in_softmax(model: keras.Model) -> bool:
    """Whether the model's one output comes from a softmax: a ``Softmax`` layer, or a layer (``Dense``,
    ``Activation``) whose activation is softmax, as keras.applications builds its classifiers by default."""
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):  # subclassed models have no symbolic outputs
        return False
    if not outputs or len(outputs) != 1:
        return False
    history = getattr(outputs[0], "_keras_history", None)
    layer = history[0] if history else None
    if isinstance(layer, keras.layers.Softmax):
        return True
    activation = getattr(layer, "activation", None)
    return activation is keras.activations.softmax or getattr(activation, "__name__", "") == "softmax"


def _log_probabilities(probabilities: Any) -> Any:
    """log(p) of softmax outputs: the logits up to one constant per sample, which the tempered softmax of the
    soft loss ignores, so distilling from it equals distilling from the logits."""
    tiny = tf.constant(np.finfo(probabilities.dtype.as_numpy_dtype).tiny, probabilities.dtype)
    return tf.math.log(tf.maximum(probabilities, tiny))


def _check_shapes(student: Any, teacher: Any, what: str) -> None:
    s, t = tuple(student), tuple(teacher)
    if len(s) != len(t) or any(a is not None and b is not None and a != b for a, b in zip(s, t)):
        raise ConfigError(
            f"Distiller: the teacher's {what} has shape {t} but the student's has shape {s}; distil between models "
            "with the same output (same number of classes), or map layers whose outputs have the same shape "
            "(or set DistillConfig(layer_projection='linear') to learn a map from a student layer's width to its "
            "teacher layer's)."
        )


class _Projection(keras.layers.Layer):
    """A learned linear map of a student layer's features to its teacher layer's width (FitNets' regressor).

    It maps one axis: the one whose size differs between the two layers' outputs, or the last (Keras
    feature maps are channels-last) when they are equal, where it starts as the identity. On a
    channels-last feature map it is a 1x1 convolution.
    """

    def __init__(self, student_shape: tuple[Any, ...], teacher_shape: tuple[Any, ...], layers: tuple[str, str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        s_name, t_name = layers
        differ = [d for d, (a, b) in enumerate(zip(student_shape, teacher_shape)) if a is not None and b is not None and a != b]
        if len(student_shape) != len(teacher_shape) or len(student_shape) < 2 or len(differ) > 1 or differ == [0]:
            raise ConfigError(
                f"Distiller: student layer {s_name!r} outputs {student_shape} and teacher layer {t_name!r} outputs "
                f"{teacher_shape}; layer_projection='linear' maps one feature axis (channels or hidden size), so map "
                "layers whose outputs differ in that axis alone."
            )
        self.axis = differ[0] if differ else len(student_shape) - 1
        s_width, t_width = student_shape[self.axis], teacher_shape[self.axis]
        if s_width is None or t_width is None:
            raise ConfigError(
                f"Distiller: student layer {s_name!r} ({student_shape}) or teacher layer {t_name!r} ({teacher_shape}) "
                "has no fixed size on its feature axis, which a projection needs; map layers whose width is known."
            )
        same = s_width == t_width
        self.kernel = self.add_weight(
            shape=(s_width, t_width), initializer="identity" if same else "glorot_uniform", name="kernel"
        )
        self.bias = self.add_weight(shape=(t_width,), initializer="zeros", name="bias")

    def call(self, x: Any) -> Any:
        moved = keras.ops.moveaxis(x, self.axis, -1)
        return keras.ops.moveaxis(keras.ops.matmul(moved, self.kernel) + self.bias, -1, self.axis)


def _intermediate_model(model: keras.Model, names: list[str], who: str) -> keras.Model:
    """A model sharing ``model``'s layers that returns its output followed by the named layers' outputs."""
    layers = {layer.name: layer for layer in model._flatten_layers(include_self=False, recursive=True)}
    missing = [n for n in names if n not in layers]
    if missing:
        hints = {m: difflib.get_close_matches(m, list(layers), n=3) for m in missing}
        raise ConfigError(
            f"DistillConfig.layer_mappings: {who} layer(s) {missing} do not exist. Close names: {hints}. "
            f"Use names from [layer.name for layer in {who}.layers]."
        )
    try:
        return keras.Model(model.inputs, [model.outputs[0], *(layers[n].output for n in names)])
    except (AttributeError, ValueError, TypeError) as exc:
        raise UnsupportedModelError(
            f"Distiller: layer_mappings need the {who} as a functional or Sequential model with known inputs "
            f"(got {type(model).__name__}: {exc}); build it with keras.Input, or distil without layer_mappings."
        ) from exc


class _PerPositionLoss(keras.losses.Loss):
    """A loss of per-position values reduced as Keras reduces its own losses, sample weights included."""

    def __init__(self, per_position: Any) -> None:
        super().__init__(reduction="sum_over_batch_size", name="soft")
        self.per_position = per_position

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return self.per_position(y_true, y_pred)


class Distiller(keras.Model):
    """A student trained against a frozen teacher: ``compile`` and ``fit`` it like any Keras model.

    Loss of each batch: ``hard * task_loss(y, student) + soft * T^2 * KL(softmax(teacher/T) ||
    softmax(student/T)) + layer * mean(layer losses)`` (``soft_loss="ce"`` uses the cross-entropy
    against the softened teacher instead of KL). The teacher runs in inference mode
    (``training=False``) and is kept out of the Distiller's weights, so the optimizer never builds
    state for it and its weights never change; only the student's trainable weights are updated.
    ``fit`` logs ``loss`` and the unweighted parts ``hard_loss``, ``soft_loss`` (and ``layer_loss``),
    plus the metrics given to ``compile``, which see the student's logits; ``evaluate`` reports the
    same. Calling the Distiller (or ``predict``) runs the student alone. Keep using ``student``
    afterwards: it is the same object, trained in place.

    Example::

        distiller = inc_tf.Distiller(student, teacher, inc.DistillConfig(temperature=4.0, loss_weights=(0.3, 0.7)))
        distiller.compile(optimizer=keras.optimizers.Adam(3e-3), metrics=["accuracy"])
        distiller.fit(x, y, epochs=10)

    A functional or Sequential model whose output comes from a softmax (``Dense(..., activation="softmax")``,
    a ``Softmax`` layer: keras.applications' default ``classifier_activation``) outputs probabilities; the
    soft loss then reads their logarithm, which equals the logits up to a per-sample constant that the
    tempered softmax cancels, and the default task loss takes probabilities. Subclassed models are taken
    to output logits.

    Args:
        student: the Keras model to train (outputs logits, or probabilities from a final softmax).
        teacher: the trained Keras model to learn from (an output of the student's shape).
        config: temperature, loss weights, soft loss, layer mappings (student layer, teacher layer)
            matched by layer name on functional/Sequential models. With ``layer_projection="linear"``
            each mapped student layer is first taken to its teacher layer's width by a learned projection
            (:attr:`projections`) that ``fit`` trains with the student.
        task_loss: the hard loss ``task_loss(y_true, student_output)``; default: sparse categorical
            cross-entropy (integer labels) from logits, or from probabilities for a student ending in a softmax.

    Raises:
        UnsupportedModelError: student or teacher is not a Keras model.
        ConfigError: a bad config, teacher and student outputs of different shapes, or mapped layers
            that do not exist (close names listed) or whose outputs differ in shape.
    """

    def __init__(
        self,
        student: keras.Model,
        teacher: keras.Model,
        config: DistillConfig | None = None,
        *,
        task_loss: Callable[[Any, Any], Any] | None = None,
        name: str = "distiller",
    ) -> None:
        config = DistillConfig() if config is None else config
        if not isinstance(config, DistillConfig):
            raise ConfigError(f"Distiller: config must be an inc.DistillConfig, got {type(config).__name__}.")
        for who, model in (("student", student), ("teacher", teacher)):
            if not isinstance(model, keras.Model):
                raise UnsupportedModelError(f"Distiller: {who} must be a keras.Model, got {type(model).__name__}.")
        if student is teacher:
            raise ConfigError("Distiller: student and teacher are the same model; pass a separate student to train.")
        super().__init__(name=name)
        weights = config.loss_weights
        self.config = config
        self.weights_by_part = {"hard": weights[0], "soft": weights[1], "layer": weights[2] if len(weights) == 3 else 0.0}
        s_shape, t_shape = _output_shape(student), _output_shape(teacher)
        if self.weights_by_part["soft"] > 0 and s_shape is not None and t_shape is not None:
            _check_shapes(s_shape, t_shape, "output")
        self.student = student
        # Not tracked: the teacher's weights stay out of this model's weights, its optimizer and its checkpoints.
        object.__setattr__(self, "_teacher", teacher)
        # A classifier that ends in a softmax (keras.applications' default) outputs probabilities: the soft loss
        # then reads their logarithm (tempering probabilities as if they were logits flattens the teacher's
        # targets toward uniform), and the default task loss takes probabilities.
        self._student_softmax = _ends_in_softmax(student)
        self._teacher_softmax = _ends_in_softmax(teacher)
        self.task_loss = (
            task_loss
            if task_loss is not None
            else keras.losses.SparseCategoricalCrossentropy(from_logits=not self._student_softmax)
        )
        # The tap models share the student's and teacher's layers; untracked so no weight is listed twice.
        object.__setattr__(self, "_student_taps", None)
        object.__setattr__(self, "_teacher_taps", None)
        # Tracked: the projections train with the student and are saved with the Distiller.
        self.projections: list[_Projection] = []
        if config.layer_mappings:
            s_names, t_names = [s for s, _ in config.layer_mappings], [t for _, t in config.layer_mappings]
            object.__setattr__(self, "_student_taps", _intermediate_model(student, s_names, "student"))
            object.__setattr__(self, "_teacher_taps", _intermediate_model(teacher, t_names, "teacher"))
            assert self._student_taps is not None and self._teacher_taps is not None
            projections = []
            for (s_name, t_name), s_out, t_out in zip(
                config.layer_mappings, self._student_taps.outputs[1:], self._teacher_taps.outputs[1:]
            ):
                if config.layer_projection == "linear":
                    projections.append(
                        _Projection(tuple(s_out.shape), tuple(t_out.shape), (s_name, t_name), name=f"projection_{len(projections)}")
                    )
                else:
                    _check_shapes(s_out.shape, t_out.shape, f"layer {t_name!r} (student layer {s_name!r}) output")
            self.projections = projections
        self.total_tracker = keras.metrics.Mean(name="loss")
        self.part_trackers = {
            part: keras.metrics.Mean(name=f"{part}_loss") for part in _PARTS if self.weights_by_part[part] > 0
        }

    @property
    def teacher(self) -> keras.Model:
        return self._teacher

    def call(self, inputs: Any, training: bool = False) -> Any:
        return self.student(inputs, training=training)

    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        # Our loss trackers replace the compiled "loss" tracker (the task loss alone would be misleading).
        own = [self.total_tracker, *self.part_trackers.values()]
        names = {m.name for m in own}
        return own + [m for m in super().metrics if m.name not in names and m not in own]

    def _forward(self, x: Any, training: bool) -> tuple[Any, Any, list[Any], list[Any]]:
        if self._student_taps is not None and self._teacher_taps is not None:
            s_out = self._student_taps(x, training=training)
            t_out = self._teacher_taps(x, training=False)
            s_layers = list(s_out[1:])
            if self.projections:
                s_layers = [projection(layer) for projection, layer in zip(self.projections, s_layers)]
            return s_out[0], t_out[0], s_layers, list(t_out[1:])
        return self.student(x, training=training), self.teacher(x, training=False), [], []

    def distillation_loss(
        self,
        y: Any,
        student_logits: Any,
        teacher_logits: Any,
        student_layers: Sequence[Any] = (),
        teacher_layers: Sequence[Any] = (),
        sample_weight: Any = None,
    ) -> tuple[Any, dict[str, Any]]:
        """The weighted total loss of one batch and its unweighted parts ``{"hard", "soft", "layer"}``.

        Raises:
            ConfigError: the teacher's logits differ in shape from the student's, or labels are missing
                while the hard loss has a weight.
        """
        teacher_logits = tf.stop_gradient(tf.cast(teacher_logits, student_logits.dtype))
        if self._teacher_softmax:
            teacher_logits = _log_probabilities(teacher_logits)
        parts: dict[str, Any] = {}
        total = tf.zeros((), dtype=student_logits.dtype)
        if self.weights_by_part["hard"] > 0:
            if y is None:
                raise ConfigError(
                    "Distiller: loss_weights gives the task (hard) loss a weight but fit got no labels; pass y to "
                    "fit or set the hard weight to 0."
                )
            if sample_weight is None:  # a plain callable task_loss need not take sample_weight
                parts["hard"] = self.task_loss(y, student_logits)
            else:
                parts["hard"] = self.task_loss(y, student_logits, sample_weight=sample_weight)
        if self.weights_by_part["soft"] > 0:
            _check_shapes(student_logits.shape, teacher_logits.shape, "output")
            t = self.config.temperature
            student_soft = _log_probabilities(student_logits) if self._student_softmax else student_logits

            def per_position(teacher: Any, student: Any) -> Any:
                log_p_student = tf.nn.log_softmax(student / t, axis=-1)
                log_p_teacher = tf.nn.log_softmax(teacher / t, axis=-1)
                p_teacher = tf.exp(log_p_teacher)
                if self.config.soft_loss == "kl":
                    return tf.reduce_sum(p_teacher * (log_p_teacher - log_p_student), axis=-1)
                return -tf.reduce_sum(p_teacher * log_p_student, axis=-1)  # "ce": against the teacher's soft targets

            # Reduced the way Keras reduces the task loss (sum_over_batch_size), sample weights included: a
            # per-token weight that masks padding (batch, tokens) masks it here too; it was ignored before.
            soft = _PerPositionLoss(per_position)
            # T^2 keeps the soft gradients' scale independent of T (Hinton et al., 2015).
            parts["soft"] = soft(teacher_logits, student_soft, sample_weight=sample_weight) * t * t
        if student_layers:
            parts["layer"] = tf.add_n([self._layer_loss(s, t) for s, t in zip(student_layers, teacher_layers)]) / len(
                student_layers
            )
        for part, value in parts.items():
            total = total + self.weights_by_part[part] * tf.cast(value, total.dtype)
        return total, parts

    def _layer_loss(self, s: Any, t: Any) -> Any:
        t = tf.stop_gradient(tf.cast(t, s.dtype))
        if self.config.layer_loss == "mse":
            return tf.reduce_mean(tf.square(s - t))
        if self.config.layer_loss == "kl":
            log_s, log_t = tf.nn.log_softmax(s, axis=-1), tf.nn.log_softmax(t, axis=-1)
            kl = tf.reduce_sum(tf.exp(log_t) * (log_t - log_s), axis=-1)
            return tf.reduce_sum(kl) / tf.cast(tf.shape(s)[0], s.dtype)  # batchmean, as torch's kl_div
        batch = tf.shape(s)[0]
        s_flat, t_flat = tf.reshape(s, (batch, -1)), tf.reshape(t, (batch, -1))
        cosine = tf.reduce_sum(tf.nn.l2_normalize(s_flat, axis=1) * tf.nn.l2_normalize(t_flat, axis=1), axis=1)
        return tf.reduce_mean(1 - cosine)

    def _update_trackers(self, total: Any, parts: dict[str, Any]) -> None:
        self.total_tracker.update_state(total)
        for part, value in parts.items():
            self.part_trackers[part].update_state(value)

    def train_step(self, data: Any) -> dict[str, Any]:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            student_logits, teacher_logits, s_layers, t_layers = self._forward(x, training=True)
            total, parts = self.distillation_loss(y, student_logits, teacher_logits, s_layers, t_layers, sample_weight)
            regularization = self.student.losses
            loss = total + tf.add_n(regularization) if regularization else total
        variables = self.student.trainable_variables + [v for p in self.projections for v in p.trainable_variables]
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        self._update_trackers(total, parts)
        return self.compute_metrics(x, y, student_logits, sample_weight=sample_weight)

    def test_step(self, data: Any) -> dict[str, Any]:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        student_logits, teacher_logits, s_layers, t_layers = self._forward(x, training=False)
        total, parts = self.distillation_loss(y, student_logits, teacher_logits, s_layers, t_layers, sample_weight)
        self._update_trackers(total, parts)
        return self.compute_metrics(x, y, student_logits, sample_weight=sample_weight)
