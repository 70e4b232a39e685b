"""Pruning in model.fit: masks follow the optimizer's steps, schedules, patterns, and the zeros survive strip and PTQ."""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest
import tf_testmodels as models

import inc_core as inc
import inc_tf
from inc_core.errors import ConfigError
from inc_core.sparsity import Schedule

BATCH = 50
STEPS_PER_EPOCH = 27  # 1347 training samples / 50, rounded up


def wide_mlp() -> keras.Model:
    """Over-parameterised for digits (83k weights), so 70% of them can go at no accuracy cost."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(256, activation="relu", name="fc1"),
            keras.layers.Dense(256, activation="relu", name="fc2"),
            keras.layers.Dense(10, name="fc3"),
        ],
        name="wide_mlp",
    )


def make_optimizer(kind: str) -> keras.optimizers.Optimizer:
    if kind == "adam":
        return keras.optimizers.Adam(1e-3)
    return keras.optimizers.SGD(0.02, momentum=0.9, weight_decay=1e-4)


def fit(model: keras.Model, optimizer: keras.optimizers.Optimizer, epochs: int, callbacks: list | None = None,
        *, seed: int = 1) -> keras.callbacks.History:
    """A plain compile + fit: nothing but the callback list knows about pruning."""
    x, _, y, _ = models.digits()
    keras.utils.set_random_seed(seed)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model.fit(x, y, batch_size=BATCH, epochs=epochs, callbacks=callbacks or [], verbose=0)


def accuracy(model: keras.Model) -> float:
    _, x_test, _, y_test = models.digits()
    return models.accuracy(model, x_test, y_test)


@functools.cache
def _trained_weights(build, learning_rate: float, epochs: int) -> tuple[np.ndarray, ...]:  # noqa: ANN001
    keras.utils.set_random_seed(0)
    model = build()
    fit(model, keras.optimizers.Adam(learning_rate), epochs, seed=0)
    return tuple(model.get_weights())


def trained(build, learning_rate: float, epochs: int) -> keras.Model:  # noqa: ANN001
    """A fresh ``build()`` holding the weights of one training run, trained once per process."""
    model = build()
    model.set_weights(list(_trained_weights(build, learning_rate, epochs)))
    return model


def dense() -> keras.Model:
    return trained(wide_mlp, 2e-3, 12)


@functools.cache
def _dense_finetuned(kind: str) -> float:
    """The dense model trained for the same extra epochs: what the pruned model is compared with."""
    model = dense()
    fit(model, make_optimizer(kind), 5)
    return accuracy(model)


# Sparsity ramps over the first 2 of 5 fine-tuning epochs; the last 3 recover at the final sparsity.
SEVENTY = inc.PruneConfig(target_sparsity=0.7, schedule="iterative", start_step=0, end_step=2 * STEPS_PER_EPOCH, frequency=9)


def int8_matrices(q: inc_tf.LiteRTModel) -> dict[tuple[int, ...], np.ndarray]:
    """The int8 2-D constants (FULLY_CONNECTED weights, stored (out, in)) of a LiteRT model, by shape."""
    interp = q.interpreter(threads=1)
    found = {}
    for detail in interp.get_tensor_details():
        if np.dtype(detail["dtype"]) == np.int8 and len(detail["shape"]) == 2:
            try:
                found[tuple(int(d) for d in detail["shape"])] = interp.get_tensor(detail["index"])
            except ValueError:  # activations are not readable; weights are constants
                continue
    return found


def core_view(kernel: np.ndarray) -> np.ndarray:
    """A Dense kernel (in, out) in inc-core's output-first layout (out, in)."""
    return kernel.T


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_seventy_percent_magnitude_within_one_percent_of_dense(kind: str) -> None:
    model = dense()
    callback = inc_tf.PruningCallback(SEVENTY)
    history = fit(model, make_optimizer(kind), 5, [callback])
    assert history.history["sparsity"][-1] == pytest.approx(0.7, abs=1e-3)  # logged for the progress bar
    sparse = inc_tf.strip(model)
    report = inc_tf.sparsity_report(sparse)
    assert [layer.name for layer in report.layers] == ["fc1", "fc2", "fc3"]
    for layer in report.layers:  # each layer reaches the target on its own
        assert layer.sparsity == pytest.approx(0.7, abs=1 / layer.size)
    reference = _dense_finetuned(kind)
    pruned = accuracy(sparse)
    assert (reference - pruned) / reference <= 0.01, f"pruned {pruned:.4f} vs dense {reference:.4f} ({kind})"
    # The optimizer's slots never grow behind a pruned weight: Adam's m/v and SGD's momentum are zero there.
    kernel = model.get_layer("fc2").kernel
    prefix = kernel.path.replace("/", "_") + "_"
    slots = [v for v in model.optimizer.variables if v.name.startswith(prefix)]
    assert slots, [v.name for v in model.optimizer.variables]
    pruned_positions = keras.ops.convert_to_numpy(kernel) == 0
    for slot in slots:
        assert np.all(keras.ops.convert_to_numpy(slot)[pruned_positions] == 0), slot.name


def test_two_of_four_keeps_exactly_two_of_every_four_weights() -> None:
    model = dense()
    callback = inc_tf.PruningCallback(inc.PruneConfig(pattern="2:4", schedule="oneshot", start_step=0))
    fit(model, make_optimizer("adam"), 1, [callback])
    sparse = inc_tf.strip(model)
    for name in ("fc1", "fc2", "fc3"):
        mask = core_view(callback.masks[name]).reshape(-1, 4)
        assert np.all(mask.sum(axis=1) == 2), name  # exactly 2 kept in every group of 4 (output-first view)
        groups = core_view(keras.ops.convert_to_numpy(sparse.get_layer(name).kernel)).reshape(-1, 4)
        assert np.all((groups != 0).sum(axis=1) <= 2), name
        assert np.all(groups[~mask] == 0), name
    assert accuracy(sparse) >= 0.9


def test_conv_structured_pattern_uses_input_channels_innermost() -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((8, 8, 4)), keras.layers.Conv2D(8, 3, name="conv"), keras.layers.Flatten(), keras.layers.Dense(4, name="out")]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    callback = inc_tf.PruningCallback(inc.PruneConfig(pattern="2:4", schedule="oneshot", include_types=("Conv2D",)))
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(4, 8, 8, 4)), rng.normal(size=(4, 4)), batch_size=4, epochs=1, callbacks=[callback], verbose=0)
    kernel = keras.ops.convert_to_numpy(model.get_layer("conv").kernel)  # (kh, kw, in, out)
    # At each kernel position and output channel, the 4 input channels form one 2:4 group.
    assert np.all((kernel != 0).sum(axis=2) == 2)
    assert np.all(keras.ops.convert_to_numpy(model.get_layer("out").kernel) != 0)  # not in include_types


def test_schedule_sparsity_at_given_steps() -> None:
    config = inc.PruneConfig(target_sparsity=0.6, schedule="iterative", start_step=3, end_step=23, frequency=5, ramp="cubic")
    schedule = Schedule.from_config(config)
    seen: list[float] = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            kernel = keras.ops.convert_to_numpy(self.model.get_layer("fc2").kernel)
            seen.append(float(np.mean(kernel == 0)))

    model = dense()
    fit(model, make_optimizer("adam"), 1, [inc_tf.PruningCallback(config), Record()])
    assert len(seen) == STEPS_PER_EPOCH
    expected, current = [], 0.0
    for step in range(STEPS_PER_EPOCH):
        if schedule.should_update(step):
            current = schedule.sparsity_at(step)
        expected.append(current)
    assert expected[2] == 0.0 and expected[3] == pytest.approx(0.0) and expected[-1] == pytest.approx(0.6)
    assert seen == pytest.approx(expected, abs=1 / (256 * 256))
    assert seen[8] == pytest.approx(schedule.sparsity_at(8), abs=1e-4) and 0 < seen[8] < seen[13] < 0.6


def test_strip_keeps_the_zeros_and_leaves_a_plain_model() -> None:
    model = dense()
    callback = inc_tf.PruningCallback(inc.PruneConfig(target_sparsity=0.5, schedule="oneshot", start_step=2))
    fit(model, make_optimizer("sgd"), 1, [callback])
    sparse = inc_tf.strip(model)
    assert sparse is not model and sparse.optimizer is not model.optimizer  # compiled afresh (Keras' clone_model)
    assert int(sparse.optimizer.iterations.numpy()) == 0
    for name, mask in callback.masks.items():
        kernel = keras.ops.convert_to_numpy(sparse.get_layer(name).kernel)
        assert np.all(kernel[~mask] == 0) and np.mean(~mask) == pytest.approx(0.5, abs=1e-3)
    for a, b in zip(sparse.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    # After fit the optimizer is the user's again: training without the callback revives weights.
    assert "apply" not in vars(model.optimizer)
    model.fit(*models.digits()[0::2], batch_size=BATCH, epochs=1, verbose=0)
    assert inc_tf.sparsity_report(model).overall < 0.5


def test_snip_momentum_scores_with_the_gradients_of_each_step() -> None:
    config = inc.PruneConfig(target_sparsity=0.7, criterion="snip_momentum", schedule="iterative", start_step=0,
                             end_step=2 * STEPS_PER_EPOCH, frequency=9)
    model = dense()
    callback = inc_tf.PruningCallback(config)
    fit(model, make_optimizer("adam"), 4, [callback])
    criterion = callback.pruner.criteria["fc1"]
    assert criterion.needs_grad
    report = inc_tf.sparsity_report(model)
    for layer in report.layers:
        assert layer.sparsity == pytest.approx(0.7, abs=1 / layer.size)
    # fc1's inputs include the digits' always-blank border pixels: their gradients are zero, so snip prunes
    # those rows first, which magnitude alone would not (their weights keep their random init).
    x = models.digits()[0].reshape(-1, 64)
    blank = np.all(x == 0, axis=0)
    assert blank.any()
    kernel = keras.ops.convert_to_numpy(model.get_layer("fc1").kernel)
    assert np.all(kernel[blank] == 0)
    assert accuracy(model) >= 0.93


def test_prune_then_ptq_keeps_the_zeros_in_the_int8_weights(calib: inc.Dataset) -> None:
    model = dense()
    fit(model, make_optimizer("adam"), 4, [inc_tf.PruningCallback(SEVENTY)])
    sparse = inc_tf.strip(model)
    q = inc.quantize(sparse, inc.QuantConfig(), dataset=calib)
    int8 = int8_matrices(q)
    for name in ("fc1", "fc2", "fc3"):
        kernel = core_view(keras.ops.convert_to_numpy(sparse.get_layer(name).kernel))  # LiteRT stores (out, in)
        weights = int8[kernel.shape]
        assert np.all(weights[kernel == 0] == 0), name
        assert np.mean(weights == 0) >= 0.7 - 1e-3, name
    assert accuracy(sparse) - accuracy(q) <= 0.01


# --- layouts ----------------------------------------------------------------------------------------


def test_kernel_layouts_round_trip_to_output_first() -> None:
    inputs = keras.Input((6, 6, 4))
    h = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(inputs)
    h = keras.layers.Conv2D(8, 3, name="conv")(h)
    up = keras.layers.Conv2DTranspose(5, 3, name="up")(h)  # kernel (kh, kw, out, in)
    seq = keras.layers.Reshape((36, 4))(inputs)
    seq = keras.layers.DepthwiseConv1D(3, depth_multiplier=2, name="dw1d")(seq)  # (k, in, mult)
    seq = keras.layers.SeparableConv1D(6, 3, name="sep")(seq)  # depthwise (k, in, 1) + pointwise (1, in, out)
    frames = keras.layers.ConvLSTM1D(4, 3, name="convlstm")(keras.layers.Reshape((8, 4, 6))(seq))  # cell kernels (k, in, 4 * units)
    h = keras.layers.EinsumDense("abc,cde->abde", output_shape=(None, 3, 4), name="einsum")(keras.layers.Reshape((2, 2 * 8))(h))
    model = keras.Model(inputs, [h, up, frames])
    from inc_tf.prune._layers import prunable_kernels

    kernels = {k.name: k for k in prunable_kernels(model, inc.PruneConfig())}
    assert kernels["dw"].core_shape == (8, 1, 3, 3)
    assert kernels["conv"].core_shape == (8, 8, 3, 3)
    assert kernels["einsum"].core_shape == (12, 16)
    assert kernels["up"].core_shape == (5, 8, 3, 3)
    assert kernels["dw1d"].core_shape == (8, 1, 3)
    assert (kernels["sep.depthwise_kernel"].core_shape, kernels["sep.pointwise_kernel"].core_shape) == ((8, 1, 3), (6, 8, 1))
    assert (kernels["convlstm.kernel"].core_shape, kernels["convlstm.recurrent_kernel"].core_shape) == ((16, 6, 3), (16, 4, 3))
    for k in kernels.values():
        w = keras.ops.convert_to_numpy(k.variable)
        np.testing.assert_array_equal(k.from_core(k.to_core(w)), w)
    conv = keras.ops.convert_to_numpy(model.get_layer("conv").kernel)
    np.testing.assert_array_equal(kernels["conv"].to_core(conv), np.transpose(conv, (3, 2, 0, 1)))
    dw = keras.ops.convert_to_numpy(model.get_layer("dw").kernel)  # (kh, kw, in, mult): output channel c*mult+m
    np.testing.assert_array_equal(kernels["dw"].to_core(dw)[5, 0], dw[:, :, 2, 1])
    up = keras.ops.convert_to_numpy(model.get_layer("up").kernel)
    np.testing.assert_array_equal(kernels["up"].to_core(up), np.transpose(up, (2, 3, 0, 1)))


# --- bad input -------------------------------------------------------------------------------------


def test_unknown_excluded_layer_names_close_names() -> None:
    callback = inc_tf.PruningCallback(inc.PruneConfig(exclude=inc.LayerFilter(names=("fc_2",))))
    model = dense()
    before = model.get_weights()
    with pytest.raises(ConfigError, match=r"\['fc_2'\] match no op.*'fc2'"):
        fit(model, make_optimizer("adam"), 1, [callback])
    for a, b in zip(model.get_weights(), before):  # failed before the first batch: the model is untouched
        np.testing.assert_array_equal(a, b)
    assert "apply" not in vars(model.optimizer)


def test_pattern_that_does_not_divide_a_layer_names_the_layer_and_shape() -> None:
    model = dense()
    with pytest.raises(ConfigError, match=r"Layer 'fc3'.*\(10, 256\)") as info:
        fit(model, make_optimizer("adam"), 1, [inc_tf.PruningCallback(inc.PruneConfig(pattern="4x1"))])
    # the way out, then the misfit layer in Keras's (in, out) layout; the layers that fit are not listed
    assert "To leave it dense: PruneConfig(exclude=inc.LayerFilter(names=('fc3',)))." in str(info.value)
    assert str(info.value).endswith("Their Keras kernel shapes: {'fc3': (256, 10)}.")


def test_target_sparsity_outside_zero_one() -> None:
    with pytest.raises(ConfigError, match="target_sparsity"):
        inc.PruneConfig(target_sparsity=1.0)


def test_callback_without_a_compiled_optimizer() -> None:
    callback = inc_tf.PruningCallback(inc.PruneConfig())
    callback.set_model(dense())
    with pytest.raises(ConfigError, match="no compiled optimizer.*model.compile"):
        callback.on_train_begin()


def test_include_types_that_are_not_prunable_or_absent() -> None:
    with pytest.raises(ConfigError, match=r"\['Embedding'\] are not prunable"):
        fit(dense(), make_optimizer("adam"), 1, [inc_tf.PruningCallback(inc.PruneConfig(include_types=("Embedding",)))])
    with pytest.raises(ConfigError, match=r"\['Conv2D'\] match no prunable layer"):
        fit(dense(), make_optimizer("adam"), 1, [inc_tf.PruningCallback(inc.PruneConfig(include_types=("Conv2D",)))])


def test_config_that_is_not_a_prune_config() -> None:
    with pytest.raises(ConfigError, match="must be an inc.PruneConfig"):
        inc_tf.PruningCallback(inc.QuantConfig())  # type: ignore[arg-type]


def test_pattern_lock_keeps_the_zeros_through_qat_into_the_int8_model(calib: inc.Dataset) -> None:
    model = dense()
    fit(model, make_optimizer("adam"), 4, [inc_tf.PruningCallback(SEVENTY)])
    sparse = inc_tf.strip(model)
    zeros = {name: keras.ops.convert_to_numpy(sparse.get_layer(name).kernel) == 0 for name in ("fc1", "fc2", "fc3")}
    qat = inc_tf.prepare_qat(sparse, inc.QATConfig(freeze_observer_step=20, freeze_bn_step=20))
    lock = inc_tf.PruningCallback(inc.PruneConfig(criterion="pattern_lock"))
    fit(qat, keras.optimizers.Adam(5e-4), 2, [inc_tf.QATCallback(), lock])
    for name, zero in zeros.items():  # the zeros the sparse model had are the ones kept, no more, no fewer
        np.testing.assert_array_equal(core_view(~lock.masks[name]), core_view(zero), err_msg=name)
    q = inc_tf.convert(qat)
    int8 = int8_matrices(q)
    for name, zero in zeros.items():
        assert np.all(int8[core_view(zero).shape][core_view(zero)] == 0), name
    assert accuracy(q) >= accuracy(sparse) - 0.01


def test_snip_on_a_frozen_layer_has_no_gradients() -> None:
    model = dense()
    model.get_layer("fc1").trainable = False
    before = model.get_weights()
    with pytest.raises(ConfigError, match=r"'snip'.*\['fc1'\] are not trainable.*exclude=inc.LayerFilter"):
        fit(model, make_optimizer("adam"), 1, [inc_tf.PruningCallback(inc.PruneConfig(criterion="snip"))])
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("compile_options", [{"run_eagerly": True}, {"jit_compile": True}, {"steps_per_execution": 4}])
def test_masks_follow_the_steps_in_every_execution_mode(compile_options: dict) -> None:
    x, _, y, _ = models.digits()
    model = dense()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  **compile_options)
    callback = inc_tf.PruningCallback(inc.PruneConfig(target_sparsity=0.6, start_step=0, end_step=20, frequency=5))
    model.fit(x, y, batch_size=BATCH, epochs=2, callbacks=[callback], verbose=0)
    assert callback.step == 2 * STEPS_PER_EPOCH  # optimizer steps, also when one execution runs several
    for layer in inc_tf.sparsity_report(model).layers:
        assert layer.sparsity == pytest.approx(0.6, abs=1 / layer.size)


# --- recurrent layers ----------------------------------------------------------------------------------


def row_lstm() -> keras.Model:
    """Digits as 8 rows of 8 pixels read by a bidirectional LSTM: its kernels hold most of the weights."""
    inputs = keras.Input((8, 8, 1))
    rows = keras.layers.Reshape((8, 8), name="rows")(inputs)
    h = keras.layers.Bidirectional(keras.layers.LSTM(64, return_sequences=True, name="lstm"), name="rnn")(rows)
    h = keras.layers.GlobalAveragePooling1D(name="pool")(h)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(h), name="row_lstm")


def dense_lstm() -> keras.Model:
    return trained(row_lstm, 1e-2, 10)


RECURRENT = [f"{direction}_lstm.{kernel}" for direction in ("forward", "backward") for kernel in ("kernel", "recurrent_kernel")]


def test_recurrent_kernels_are_pruned_each_to_the_target_and_stay_zero_in_int8(calib: inc.Dataset) -> None:
    reference = dense_lstm()
    fit(reference, make_optimizer("adam"), 5)
    model = dense_lstm()
    # half: a recurrent net this small has less slack than wide_mlp
    config = inc.PruneConfig(target_sparsity=0.5, schedule="iterative", start_step=0, end_step=2 * STEPS_PER_EPOCH, frequency=9)
    fit(model, make_optimizer("adam"), 5, [inc_tf.PruningCallback(config)])
    sparse = inc_tf.strip(model)
    report = {layer.name: (layer.op_type, layer.sparsity, layer.size) for layer in inc_tf.sparsity_report(sparse).layers}
    assert sorted(report) == sorted([*RECURRENT, "logits"])
    for name in RECURRENT:
        op_type, sparsity, size = report[name]
        assert op_type == "LSTM" and sparsity == pytest.approx(0.5, abs=1 / size), name
    assert accuracy(sparse) >= accuracy(reference) - 0.02
    # unrolled for LiteRT, each step's input and recurrent MatMul reads the pruned kernel with its zeros
    q = inc.quantize(sparse, inc.QuantConfig(), dataset=calib)
    interp = q.interpreter(threads=1)
    constants = [
        interp.get_tensor(d["index"]) for d in interp.get_tensor_details()
        if np.dtype(d["dtype"]) == np.int8 and tuple(d["shape"]) == (256, 64)  # recurrent kernels, (out, in)
    ]
    for direction in ("forward_layer", "backward_layer"):
        kernel = core_view(keras.ops.convert_to_numpy(getattr(sparse.get_layer("rnn"), direction).cell.recurrent_kernel))
        assert any(np.all(c[kernel == 0] == 0) and np.mean(c == 0) >= 0.5 for c in constants), direction
    assert accuracy(sparse) - accuracy(q) <= 0.02


def test_recurrent_kernels_take_two_of_four_and_are_excluded_by_type() -> None:
    model = dense_lstm()
    callback = inc_tf.PruningCallback(inc.PruneConfig(pattern="2:4", schedule="oneshot", start_step=0))
    fit(model, make_optimizer("adam"), 1, [callback])
    for name in RECURRENT:
        assert np.all(core_view(callback.masks[name]).reshape(-1, 4).sum(axis=1) == 2), name
    model = dense_lstm()
    config = inc.PruneConfig(target_sparsity=0.5, schedule="oneshot", exclude=inc.LayerFilter(types=("LSTM",)))
    callback = inc_tf.PruningCallback(config)
    fit(model, make_optimizer("adam"), 1, [callback])
    assert sorted(callback.masks) == ["logits"]


def test_channel_pattern_on_a_transposed_conv_zeroes_whole_output_channels() -> None:
    """Conv2DTranspose stores (kh, kw, out, in): a pruned channel is one slice along axis 2, not axis 3."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="down"),
        keras.layers.Conv2DTranspose(8, 3, strides=2, padding="same", name="up"),
        keras.layers.Conv2D(1, 1, name="out"),
    ])
    x = models.digits()[0]
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    config = inc.PruneConfig(pattern="channel", target_sparsity=0.5, schedule="oneshot", include_types=("Conv2DTranspose",))
    model.fit(x, x, batch_size=BATCH, epochs=1, verbose=0, callbacks=[inc_tf.PruningCallback(config)])
    kernel = keras.ops.convert_to_numpy(model.get_layer("up").kernel)
    zero_channels = np.all(kernel == 0, axis=(0, 1, 3))
    assert zero_channels.sum() == 4
    assert np.all(np.any(kernel[:, :, ~zero_channels, :] != 0, axis=(0, 1, 3)))
