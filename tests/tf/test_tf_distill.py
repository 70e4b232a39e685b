"""Distillation with keras fit: the loss against a hand computation, a student trained on digits, bad input."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tf_testmodels as models

import inc_core as inc
import inc_tf
from inc_core.errors import ConfigError, UnsupportedModelError


def mlp(hidden: int, classes: int = 10, *, seed: int, name: str) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(hidden, activation="relu", name="hidden"),
            keras.layers.Dense(classes, name="logits"),
        ],
        name=name,
    )


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_loss_matches_a_hand_computation() -> None:
    teacher, student = mlp(12, seed=0, name="t"), mlp(6, seed=1, name="s")
    config = inc.DistillConfig(temperature=3.0, loss_weights=(0.3, 0.7))
    distiller = inc_tf.Distiller(student, teacher, config)
    x, _, y, _ = models.digits()
    x, y = x[:16], y[:16]
    s, t = student.predict(x, verbose=0).astype(np.float64), teacher.predict(x, verbose=0).astype(np.float64)
    total, parts = distiller.distillation_loss(y, student(x), teacher(x))
    hard = -np.mean(log_softmax(s)[np.arange(16), y])
    ls, lt = log_softmax(s / 3.0), log_softmax(t / 3.0)
    soft = np.mean(np.sum(np.exp(lt) * (lt - ls), axis=1)) * 9.0
    assert float(parts["hard"]) == pytest.approx(hard, rel=1e-5)
    assert float(parts["soft"]) == pytest.approx(soft, rel=1e-4)
    assert float(total) == pytest.approx(0.3 * hard + 0.7 * soft, rel=1e-4)
    ce = inc_tf.Distiller(student, teacher, inc.DistillConfig(temperature=3.0, soft_loss="ce", loss_weights=(0.0, 1.0)))
    _, parts = ce.distillation_loss(y, student(x), teacher(x))
    assert float(parts["soft"]) == pytest.approx(-np.mean(np.sum(np.exp(lt) * ls, axis=1)) * 9.0, rel=1e-4)


def _with_softmax(model: keras.Model, *, as_layer: bool) -> keras.Model:
    """The same classifier ending in a softmax, sharing ``model``'s weights: a Softmax layer after it, or its last
    Dense rebuilt with ``activation="softmax"`` (keras.applications' default head)."""
    if as_layer:
        return keras.Sequential([model, keras.layers.Softmax()], name=f"{model.name}_softmax")
    last = model.layers[-1]
    head = keras.layers.Dense(last.units, activation="softmax", name=f"{last.name}_softmax")
    inputs = keras.Input(model.input_shape[1:])
    features = inputs
    for layer in model.layers[:-1]:
        features = layer(features)
    outputs = head(features)
    head.set_weights(last.get_weights())
    return keras.Model(inputs, outputs, name=f"{model.name}_softmax_dense")


@pytest.mark.parametrize("as_layer", [True, False], ids=["softmax-layer", "dense-softmax"])
def test_models_ending_in_softmax_distil_as_their_logits_would(as_layer: bool) -> None:
    # keras.applications classifiers end in a softmax by default. Tempering their probabilities as if they
    # were logits flattened the teacher's targets (a soft loss ~100x too small at T=3) and the default task
    # loss read probabilities as logits.
    teacher, student = mlp(12, seed=0, name="t"), mlp(6, seed=1, name="s")
    config = inc.DistillConfig(temperature=3.0, loss_weights=(0.3, 0.7))
    x, _, y, _ = models.digits()
    x, y = x[:16], y[:16]
    _, want = inc_tf.Distiller(student, teacher, config).distillation_loss(y, student(x), teacher(x))
    teacher_p, student_p = _with_softmax(teacher, as_layer=as_layer), _with_softmax(student, as_layer=as_layer)
    np.testing.assert_allclose(teacher_p(x).numpy().sum(axis=1), 1.0, rtol=1e-5)
    _, got = inc_tf.Distiller(student_p, teacher_p, config).distillation_loss(y, student_p(x), teacher_p(x))
    assert float(got["soft"]) == pytest.approx(float(want["soft"]), rel=1e-4)
    assert float(got["hard"]) == pytest.approx(float(want["hard"]), rel=1e-4)
    # the mixed pairs read the same way: a logits student distils from a softmax teacher
    _, mixed = inc_tf.Distiller(student, teacher_p, config).distillation_loss(y, student(x), teacher_p(x))
    assert float(mixed["soft"]) == pytest.approx(float(want["soft"]), rel=1e-4)


def test_layer_mappings_add_the_mean_layer_loss() -> None:
    teacher, student = mlp(8, seed=0, name="t"), mlp(8, seed=1, name="s")
    config = inc.DistillConfig(loss_weights=(0.0, 0.0, 1.0), layer_mappings=(("hidden", "hidden"), ("logits", "logits")))
    distiller = inc_tf.Distiller(student, teacher, config)
    x = models.digits()[0][:10]
    distiller.compile(optimizer="sgd")
    result = distiller.evaluate(x, np.zeros(10), batch_size=10, verbose=0, return_dict=True)
    hidden = lambda m: keras.Model(m.inputs, m.get_layer("hidden").output).predict(x, verbose=0)  # noqa: E731
    expected = (
        np.mean((hidden(student) - hidden(teacher)) ** 2)
        + np.mean((student.predict(x, verbose=0) - teacher.predict(x, verbose=0)) ** 2)
    ) / 2
    assert result["layer_loss"] == pytest.approx(expected, rel=1e-5)
    assert result["loss"] == pytest.approx(expected, rel=1e-5)


def test_distilled_student_trains_with_fit_and_the_teacher_stays_frozen() -> None:
    teacher = models.cnn()
    before = models.fingerprint(teacher)
    student = mlp(32, seed=0, name="student")
    distiller = inc_tf.Distiller(student, teacher, inc.DistillConfig(temperature=4.0, loss_weights=(0.5, 0.5)))
    assert {id(v) for v in distiller.trainable_variables} == {id(v) for v in student.trainable_variables}
    distiller.compile(optimizer=keras.optimizers.Adam(3e-3), metrics=["accuracy"])
    x_train, x_test, y_train, y_test = models.digits()
    keras.utils.set_random_seed(0)
    history = distiller.fit(x_train, y_train, batch_size=50, epochs=10, verbose=0)
    assert {"loss", "hard_loss", "soft_loss", "accuracy"} <= set(history.history)
    assert history.history["soft_loss"][-1] < history.history["soft_loss"][0]
    assert models.fingerprint(teacher) == before  # the teacher's weights (and BN statistics) never change
    result = distiller.evaluate(x_test, y_test, verbose=0, return_dict=True)
    assert result["accuracy"] == pytest.approx(models.accuracy(student, x_test, y_test))
    assert result["accuracy"] >= 0.9
    np.testing.assert_allclose(distiller.predict(x_test[:5], verbose=0), student.predict(x_test[:5], verbose=0))


# --- bad input -------------------------------------------------------------------------------------


def test_teacher_output_shape_differs_from_student() -> None:
    with pytest.raises(ConfigError, match=r"teacher's output has shape \(None, 7\) but the student's has shape \(None, 10\)"):
        inc_tf.Distiller(mlp(4, seed=0, name="s"), mlp(4, 7, seed=0, name="t"), inc.DistillConfig())


def test_missing_labels_with_a_hard_weight() -> None:
    distiller = inc_tf.Distiller(mlp(4, seed=0, name="s"), mlp(4, seed=1, name="t"), inc.DistillConfig())
    distiller.compile(optimizer="sgd")
    with pytest.raises(ConfigError, match="fit got no labels"):
        distiller.fit(models.digits()[0][:8], epochs=1, verbose=0)


def test_unknown_mapped_layer_lists_close_names() -> None:
    config = inc.DistillConfig(loss_weights=(0.0, 1.0, 1.0), layer_mappings=(("hiden", "hidden"),))
    with pytest.raises(ConfigError, match=r"student layer\(s\) \['hiden'\] do not exist.*'hidden'"):
        inc_tf.Distiller(mlp(4, seed=0, name="s"), mlp(4, seed=1, name="t"), config)


def test_mapped_layers_of_different_shapes() -> None:
    config = inc.DistillConfig(loss_weights=(0.0, 1.0, 1.0), layer_mappings=(("hidden", "hidden"),))
    with pytest.raises(ConfigError, match=r"teacher's layer 'hidden' .* has shape \(None, 8\) but the student's has shape \(None, 6\).*layer_projection='linear'"):
        inc_tf.Distiller(mlp(6, seed=0, name="s"), mlp(8, seed=1, name="t"), config)


def test_teacher_that_is_not_a_keras_model() -> None:
    with pytest.raises(UnsupportedModelError, match="teacher must be a keras.Model"):
        inc_tf.Distiller(mlp(4, seed=0, name="s"), lambda x: x, inc.DistillConfig())  # type: ignore[arg-type]


class SevenWay(keras.Model):
    """A subclassed teacher (no symbolic output): its shape is checked when fit traces the step."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = keras.layers.Flatten()
        self.dense = keras.layers.Dense(7)

    def call(self, x: object) -> object:
        return self.dense(self.flatten(x))


def test_subclassed_teacher_of_another_shape_fails_at_the_first_step() -> None:
    teacher = SevenWay()
    teacher(models.digits()[0][:1])
    distiller = inc_tf.Distiller(mlp(4, seed=0, name="s"), teacher, inc.DistillConfig())
    distiller.compile(optimizer="sgd")
    x, _, y, _ = models.digits()
    with pytest.raises(ConfigError, match=r"teacher's output has shape \(\w+, 7\) but the student's has shape \(\w+, 10\)"):
        distiller.fit(x[:8], y[:8], epochs=1, verbose=0)


# --- layer projection: a narrower student matched to a wider teacher ---------------------------------


def narrow_cnn(seed: int) -> keras.Model:
    """The test CNN's layout at a quarter of its widths: conv2 8 channels (teacher 32), fc1 16 units (64)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(inputs)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.Flatten()(keras.layers.MaxPooling2D()(h))
    h = keras.layers.Dense(16, activation="relu", name="fc1")(h)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(h), name="narrow")


def test_a_projection_maps_the_student_width_to_the_teachers_in_the_loss() -> None:
    teacher, student = models.cnn(), narrow_cnn(0)
    config = inc.DistillConfig(
        loss_weights=(0.0, 0.0, 1.0), layer_mappings=(("conv2", "conv2"), ("fc1", "fc1")), layer_projection="linear"
    )
    distiller = inc_tf.Distiller(student, teacher, config)
    assert [tuple(p.kernel.shape) for p in distiller.projections] == [(8, 32), (16, 64)]
    projection_vars = {id(v) for p in distiller.projections for v in p.trainable_variables}
    assert projection_vars <= {id(v) for v in distiller.trainable_variables}  # fit trains them with the student
    x = models.digits()[0][:10]
    distiller.compile(optimizer="sgd")
    result = distiller.evaluate(x, np.zeros(10), batch_size=10, verbose=0, return_dict=True)
    tap = lambda m, name: keras.Model(m.inputs, m.get_layer(name).output).predict(x, verbose=0)  # noqa: E731
    expected = []
    for projection, name in zip(distiller.projections, ("conv2", "fc1")):
        kernel, bias = projection.kernel.numpy(), projection.bias.numpy()
        expected.append(np.mean((tap(student, name) @ kernel + bias - tap(teacher, name)) ** 2))  # a 1x1 conv on conv2
    assert result["layer_loss"] == pytest.approx(np.mean(expected), rel=1e-4)


def test_a_narrower_student_learns_from_the_teachers_hidden_layers() -> None:
    teacher = models.cnn()
    before = models.fingerprint(teacher)
    student = narrow_cnn(0)
    config = inc.DistillConfig(
        temperature=4.0, loss_weights=(0.5, 0.5, 1.0), layer_mappings=(("conv2", "conv2"), ("fc1", "fc1")),
        layer_projection="linear",
    )
    distiller = inc_tf.Distiller(student, teacher, config)
    start = [p.kernel.numpy().copy() for p in distiller.projections]
    distiller.compile(optimizer=keras.optimizers.Adam(5e-3), metrics=["accuracy"])
    x_train, x_test, y_train, y_test = models.digits()
    keras.utils.set_random_seed(0)
    history = distiller.fit(x_train, y_train, batch_size=50, epochs=10, verbose=0)
    assert history.history["layer_loss"][-1] < 0.5 * history.history["layer_loss"][0], history.history["layer_loss"]
    assert all(not np.allclose(p.kernel.numpy(), k) for p, k in zip(distiller.projections, start))
    assert models.accuracy(student, x_test, y_test) >= 0.85
    assert models.fingerprint(teacher) == before


def test_a_projection_maps_one_axis_only() -> None:
    teacher, student = models.cnn(), narrow_cnn(0)
    config = inc.DistillConfig(loss_weights=(0.0, 1.0, 1.0), layer_mappings=(("conv2", "fc1"),), layer_projection="linear")
    with pytest.raises(ConfigError, match=r"outputs \(None, 8, 8, 8\) and teacher layer 'fc1' outputs \(None, 64\); layer_projection='linear' maps one feature axis"):
        inc_tf.Distiller(student, teacher, config)


def _tagger(width: int, *, seed: int) -> keras.Model:
    """Per-token logits (batch, tokens, 5) from token ids: a token tagger."""
    keras.utils.set_random_seed(seed)
    ids = keras.Input((6,), dtype="int32")
    x = keras.layers.Embedding(20, width)(ids)
    return keras.Model(ids, keras.layers.Dense(5)(keras.layers.Dense(width, activation="relu")(x)))


def test_sample_weights_mask_padding_in_the_soft_loss_as_in_the_task_loss() -> None:
    """fit(x, y, sample_weight=mask) with a (batch, tokens) padding mask: the task loss honoured it, the soft loss
    distilled the padded positions too."""
    teacher, student = _tagger(16, seed=0), _tagger(4, seed=1)
    distiller = inc_tf.Distiller(student, teacher, inc.DistillConfig(temperature=2.0, loss_weights=(0.5, 0.5)))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 20, (4, 6)).astype("int32")
    labels = rng.integers(0, 5, (4, 6))
    mask = np.ones((4, 6), "float32")
    mask[:, 4:] = 0.0
    s, t = student(ids), teacher(ids)
    _, parts = distiller.distillation_loss(labels, s, t, sample_weight=mask)
    # by hand: the per-token KL, zero where masked, summed and divided by every position (Keras' reduction)
    ls, lt = (log_softmax_last(np.asarray(v, np.float64) / 2.0) for v in (s, t))
    kl = (np.exp(lt) * (lt - ls)).sum(-1)
    assert float(parts["soft"]) == pytest.approx(float((kl * mask).sum() / mask.size * 4.0), rel=1e-3)
    # what the padded positions hold does not matter any more
    scrambled = np.asarray(s).copy()
    scrambled[:, 4:] = rng.normal(size=scrambled[:, 4:].shape) * 10
    _, again = distiller.distillation_loss(labels, keras.ops.convert_to_tensor(scrambled), t, sample_weight=mask)
    assert float(again["soft"]) == pytest.approx(float(parts["soft"]), rel=1e-5)
    # without weights every position counts, as before
    _, unweighted = distiller.distillation_loss(labels, s, t)
    assert float(unweighted["soft"]) == pytest.approx(float(kl.mean() * 4.0), rel=1e-3)


def log_softmax_last(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
