"""QAT with the user's own compile/fit: within 1% of FP32 after conversion to LiteRT int8 (Adam and SGD)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tf_testmodels as models

import inc_core as inc
import inc_tf
from inc_core.errors import ConfigError, UnsupportedModelError
from inc_tf.qat._qat import qat_config_of


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_qat_fit_then_convert_stays_within_one_percent(optimizer, digits):
    x_train, x_test, y_train, y_test = digits
    model = models.cnn()
    before = models.fingerprint(model)
    fp32 = models.accuracy(model, x_test, y_test)
    config = inc.QATConfig(freeze_observer_step=60, freeze_bn_step=80)
    qat = inc_tf.prepare_qat(model, config)
    assert any(isinstance(layer, inc_tf.FakeQuant) for layer in qat.layers)
    opt = keras.optimizers.Adam(5e-4) if optimizer == "adam" else keras.optimizers.SGD(0.01, momentum=0.9)
    qat.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    history = qat.fit(x_train, y_train, epochs=3, batch_size=32, verbose=0, callbacks=[inc_tf.QATCallback()])
    # The callback reports through Keras' own logs: frozen by the end of the run (43 steps per epoch).
    assert history.history["qat_ranges_frozen"][-1] == 1.0 and history.history["qat_bn_frozen"][-1] == 1.0
    assert models.fingerprint(model) == before, "prepare_qat modified the user's model"
    int8 = inc_tf.convert(qat)
    assert {"conv1", "conv2", "fc1", "logits"} <= set(int8.int8_layers())
    assert "int8" in set(int8.tensor_dtypes().values())
    accuracy = models.accuracy(int8, x_test, y_test)
    assert accuracy >= fp32 - 0.01, f"FP32 {fp32:.4f} vs QAT int8 {accuracy:.4f}"


def test_frozen_ranges_stop_moving(digits):
    x_train, _, y_train, _ = digits
    qat = inc_tf.prepare_qat(models.cnn(), inc.QATConfig(freeze_observer_step=5))
    qat.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x_train[:320], y_train[:320], epochs=1, batch_size=32, verbose=0, callbacks=[inc_tf.QATCallback()])
    frozen = {w.name: w.learned_range() for w in qat.layers if isinstance(w, inc_tf.FakeQuant)}
    qat.fit(x_train[:320] * 3.0, y_train[:320], epochs=1, batch_size=32, verbose=0, callbacks=[inc_tf.QATCallback()])
    assert {w.name: w.learned_range() for w in qat.layers if isinstance(w, inc_tf.FakeQuant)} == frozen


def test_convert_needs_a_trained_qat_model():
    with pytest.raises(UnsupportedModelError, match="prepare_qat"):
        inc_tf.convert(models.cnn())
    untrained = inc_tf.prepare_qat(models.cnn())
    with pytest.raises(UnsupportedModelError, match="never trained"):
        inc_tf.convert(untrained)


def test_prepare_qat_rejects_a_wrong_config_and_unknown_layer():
    with pytest.raises(ConfigError, match="QATConfig"):
        inc_tf.prepare_qat(models.cnn(), inc.QuantConfig())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no_such_layer"):
        inc_tf.prepare_qat(models.cnn(), inc.QATConfig(exclude=inc.LayerFilter(names=("no_such_layer",))))


def test_excluded_layer_trains_and_converts_in_float(digits):
    x_train, _, y_train, _ = digits
    config = inc.QATConfig(exclude=inc.LayerFilter(names=("fc1",)))
    qat = inc_tf.prepare_qat(models.cnn(), config)
    assert not qat.get_layer("fc1").quantize_kernel and qat.get_layer("conv2").quantize_kernel
    qat.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x_train[:320], y_train[:320], epochs=1, batch_size=32, verbose=0)
    int8 = inc_tf.convert(qat)
    layers = set(int8.int8_layers())
    assert "fc1" not in layers and {"conv1", "conv2", "logits"} <= layers


def _attention_model(digits) -> keras.Model:
    """Rows of the digit as 8 tokens, one self-attention block: MultiHeadAttention is called as mha(query, value)."""
    keras.utils.set_random_seed(0)
    tokens = keras.Input((8, 8), name="rows")
    h = keras.layers.Dense(16, name="embed")(tokens)
    attended = keras.layers.MultiHeadAttention(2, 8, name="mha")(h, h)
    h = keras.layers.LayerNormalization(name="norm")(keras.layers.Add(name="residual")([attended, h]))
    model = keras.Model(tokens, keras.layers.Dense(10, name="logits")(keras.layers.Flatten(name="flat")(h)))
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(digits[0].reshape(-1, 8, 8), digits[2], epochs=4, batch_size=32, verbose=0)
    return model


@pytest.mark.parametrize("fmt", ["tflite", "savedmodel"])
def test_qat_of_a_model_with_attention_keeps_its_trained_weights(digits, fmt):
    model = _attention_model(digits)
    x_train, x_test = digits[0].reshape(-1, 8, 8), digits[1].reshape(-1, 8, 8)
    qat = inc_tf.prepare_qat(model, inc.QATConfig())
    mha = qat.get_layer("mha")  # its query/key/value/output kernels train fake-quantized; its output range is calibrated
    assert type(mha.layer).__name__ == "MultiHeadAttention" and not mha.quantize_output
    assert len(inc_tf.qat._fake_quant.kernel_slots(mha.layer)) == 4
    qat.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x_train, digits[2], epochs=2, batch_size=32, verbose=0, callbacks=[inc_tf.QATCallback()])
    q = inc_tf.convert(qat, format=fmt)
    counts = inc.resolve_backend(q).int8_op_counts(q)
    # embed, the attention's query/key/value/output projections, logits
    assert counts.get("FULLY_CONNECTED", counts.get("QuantizedMatMulWithBiasAndDequantize")) == 6, counts

    def agreement(a, b):
        return float((a.argmax(1) == b.argmax(1)).mean())

    int8 = q(x_test)
    # the attention weights QAT trained reach the converted model (not the ones it started from)
    assert agreement(int8, qat.predict(x_test, verbose=0)) > agreement(int8, model.predict(x_test, verbose=0))
    assert agreement(int8, qat.predict(x_test, verbose=0)) >= 0.97


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "float16"])
def test_qat_of_a_mixed_precision_model_trains_in_float32_and_converts(digits, policy):
    """Fake quant of a bfloat16 activation met a float32 range ("Input 'y' of 'AddV2' Op has type bfloat16")."""
    x_train, x_test, y_train, y_test = digits
    model = models.build_mixed_precision_cnn(policy)
    qat = inc_tf.prepare_qat(model, inc.QATConfig())
    assert qat.get_layer("conv").layer.dtype_policy.name == "float32"
    qat.compile(keras.optimizers.Adam(1e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x_train, y_train, epochs=1, verbose=0, callbacks=[inc_tf.QATCallback()])
    q = inc_tf.convert(qat)
    assert inc.resolve_backend(q).int8_op_counts(q).get("CONV_2D") == 1
    assert models.accuracy(q, x_test, y_test) >= models.accuracy(qat, x_test, y_test) - 0.02


def _token_task() -> tuple:
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 50, (1200, 20)).astype("int32")
    return tokens, (tokens == 7).any(axis=1).astype("int32")  # does token 7 occur


@pytest.mark.parametrize("fmt", ["tflite", "savedmodel"])
def test_qat_of_a_model_reading_token_codes_converts_without_a_dataset(fmt):
    # convert made float inputs in [0, 1) for the converter's ranges: an int32 input refused them ("input 0 takes
    # integers ... but the data holds fractions")
    tokens, labels = _token_task()
    inputs = keras.Input((20,), dtype="int32")
    hidden = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(50, 16)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dense(32, activation="relu")(hidden)))
    qat = inc_tf.prepare_qat(model, inc.QATConfig())
    qat.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(tokens[:1000], labels[:1000], epochs=12, batch_size=32, verbose=0, callbacks=[inc_tf.QATCallback()])
    q = inc_tf.convert(qat, format=fmt)
    accuracy = lambda m: float(np.mean(np.argmax(np.asarray(m(tokens[1000:])), axis=1) == labels[1000:]))  # noqa: E731
    assert accuracy(qat) >= 0.9 and accuracy(q) >= accuracy(qat) - 0.02
    assert sum(inc.resolve_backend(q).int8_op_counts(q).values()) >= 2


def test_qat_of_a_recurrent_token_model_converts_without_a_dataset():
    # An LSTM's gates have no learned range: convert calibrates them on its synthetic codes, which were 16 draws
    # (accuracy 0.92-0.94 over three seeds where the QAT model scored 1.0); 64, as many as calibration reads,
    # give 0.97-0.98.
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 50, (1400, 12)).astype("int32")
    labels = (tokens == 7).any(axis=1).astype("int32")
    inputs = keras.Input((12,), dtype="int32")
    hidden = keras.layers.LSTM(16)(keras.layers.Embedding(50, 16)(inputs))
    qat = inc_tf.prepare_qat(keras.Model(inputs, keras.layers.Dense(2)(hidden)), inc.QATConfig())
    qat.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(tokens[:700], labels[:700], epochs=8, batch_size=32, verbose=0, callbacks=[inc_tf.QATCallback()])
    accuracy = lambda m: float(np.mean(np.argmax(np.asarray(m(tokens[700:])), axis=1) == labels[700:]))  # noqa: E731
    assert accuracy(qat) >= 0.98
    assert accuracy(inc_tf.convert(qat)) >= accuracy(qat) - 0.05


def _softmax_head_model(x_train, y_train, *, epochs: int = 2) -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv")(inputs)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(64, activation="relu", name="fc")(h)
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax", name="probabilities")(h))
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    return model


@pytest.mark.parametrize("fmt", ["tflite", "savedmodel"])
def test_qat_of_a_model_ending_in_a_softmax_dense_converts_to_the_same_probabilities(digits, fmt):
    """``Dense(10, activation="softmax")`` (the head of every keras.applications model): LiteRT runs the softmax as
    an op of its own after the Dense, and the layer's learned range, that of its probabilities (0 to 1), was given
    to the logits before the softmax: every logit clipped to [0, 1] (EfficientNetV2B0 trained on digits: QAT model
    0.86, converted 0.40)."""
    x_train, x_test, y_train, y_test = digits
    model = _softmax_head_model(x_train, y_train, epochs=3)
    qat = inc_tf.prepare_qat(model, inc.QATConfig(freeze_observer_step=60))
    qat.compile(keras.optimizers.Adam(5e-4), "sparse_categorical_crossentropy")
    qat.fit(x_train, y_train, epochs=1, batch_size=32, verbose=0, callbacks=[inc_tf.QATCallback()])
    expected = qat.predict(x_test, verbose=0)
    int8 = inc_tf.convert(qat, format=fmt)
    probabilities = np.asarray(int8(x_test))
    assert np.abs(probabilities - expected).max() < 0.1, np.abs(probabilities - expected).max()
    assert models.accuracy(int8, x_test, y_test) >= models.accuracy(qat, x_test, y_test) - 0.01


@pytest.mark.parametrize("flow", ["ptq", "qat"])
def test_an_excluded_softmax_dense_keeps_its_softmax_in_float_too(digits, flow):
    """Excluding ``Dense(10, activation="softmax")`` kept its matmul in float, but the softmax LiteRT runs after it
    (an op named after the model's signature, not the layer) was quantized again for an int8 SOFTMAX: the
    probabilities came back in steps of 1/256."""
    from inc_tf._flatbuffer import op_records

    x_train, x_test, y_train, _ = digits
    model = _softmax_head_model(x_train, y_train)
    exclude = inc.LayerFilter(names=("probabilities",))
    if flow == "ptq":
        int8 = inc.quantize(model, inc.QuantConfig(exclude=exclude), dataset=inc.Dataset(x_train[:256], batch_size=32))
    else:
        qat = inc_tf.prepare_qat(model, inc.QATConfig(freeze_observer_step=20, exclude=exclude))
        qat.compile(keras.optimizers.Adam(5e-4), "sparse_categorical_crossentropy")
        qat.fit(x_train[:640], y_train[:640], epochs=1, batch_size=32, verbose=0, callbacks=[inc_tf.QATCallback()])
        int8 = inc_tf.convert(qat)
    records = op_records(int8.content)
    softmax = [record for record in records if record.op == "SOFTMAX"]
    assert len(softmax) == 1 and softmax[0].input_dtypes == ("float32",), softmax
    assert "conv" in int8.int8_layers() and "probabilities" not in int8.int8_layers()
    probabilities = np.asarray(int8(x_test))
    steps = np.unique(np.round(probabilities.ravel() * 256, 6) % 1)
    assert len(steps) > 2, "the probabilities are multiples of 1/256: an int8 softmax"


@pytest.mark.parametrize("fmt", ["tflite", "savedmodel"])
def test_convert_without_data_says_which_ranges_it_calibrated_on_synthetic_inputs(digits, fmt):
    """A LayerNormalization runs in LiteRT as several int8 ops (mean, variance, rsqrt) whose ranges QAT cannot
    learn, and a Dense on a 4-D tensor (ConvNeXt's pointwise convolutions) computes inner tensors on both targets;
    without ``dataset=`` convert calibrated them on noise, silently (ConvNeXtTiny: 0.90 of the int8 model's
    predictions equal to the QAT model's, 0.9975 with 256 training images)."""
    import warnings

    x_train, _, y_train, _ = digits
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", name="conv")(inputs)
    h = keras.layers.LayerNormalization(name="norm")(h)
    h = keras.layers.Dense(16, activation="relu", name="pointwise")(h)
    model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(keras.layers.Flatten(name="flatten")(h)))
    qat = inc_tf.prepare_qat(model, inc.QATConfig(freeze_observer_step=20))
    qat.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x_train[:640], y_train[:640], epochs=1, batch_size=32, verbose=0, callbacks=[inc_tf.QATCallback()])
    inside = "LayerNormalization" if fmt == "tflite" else "Dense"  # the SavedModel target keeps LayerNorm float
    with pytest.warns(UserWarning, match=rf"in {inside} layers.*\).*synthetic inputs.*dataset=") as caught:
        inc_tf.convert(qat, format=fmt)
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inc_tf.convert(qat, dataset=x_train[:128], format=fmt)
        # every int8 range of a plain CNN was learned: nothing to say
        plain = inc_tf.prepare_qat(models.cnn(), inc.QATConfig(freeze_observer_step=20))
        plain.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        plain.fit(x_train[:320], y_train[:320], epochs=1, batch_size=32, verbose=0, callbacks=[inc_tf.QATCallback()])
        inc_tf.convert(plain, format=fmt)


def test_qat_rounds_only_the_tensors_the_int8_model_has(digits):
    """LiteRT folds a BatchNormalization into the convolution before it and fuses a ReLU into the kernel op, so
    conv -> BN -> ReLU is one int8 CONV_2D whose only int8 tensor is the ReLU's output. QAT fake-quantized the
    conv's and the BN's outputs too: it trained on rounding the int8 model never does, and its logits differed from
    the int8 model's by 0.078 on average (0.032 once only the ReLU's output is rounded)."""
    x_train, x_test, y_train, _ = digits
    x_train, x_test = x_train * 2.0 - 1.0, x_test * 2.0 - 1.0  # MobileNetV2's input range: convert learns it
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="c1")(inputs)
    h = keras.layers.BatchNormalization(momentum=0.9, name="bn1")(h)
    h = keras.layers.ReLU(6.0, name="r1")(h)
    h = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(h)
    h = keras.layers.BatchNormalization(momentum=0.9, name="bn2")(h)
    h = keras.layers.Activation("relu", name="r2")(h)
    h = keras.layers.Conv2D(16, 1, name="c2")(h)
    h = keras.layers.BatchNormalization(momentum=0.9, name="bn3")(h)  # no ReLU after it: its output is int8
    h = keras.layers.Dense(32, name="d1")(keras.layers.Flatten(name="f")(h))
    h = keras.layers.ReLU(name="r3")(h)
    model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(h))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=6, batch_size=32, verbose=0)
    qat = inc_tf.prepare_qat(model, inc.QATConfig(freeze_observer_step=40))
    rounded = {layer.name for layer in qat.layers if isinstance(layer, inc_tf.FakeQuant) and layer.quantize_output}
    assert rounded == {"r1", "r2", "bn3", "f", "r3", "logits"}, rounded
    qat.compile(keras.optimizers.Adam(5e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x_train, y_train, epochs=2, batch_size=32, verbose=0, callbacks=[inc_tf.QATCallback()])
    assert qat.get_layer("c1").learned_input_range() == (-1.0, 1.0)  # the input range, learned without c1's output
    int8 = inc_tf.convert(qat)
    # what the rule assumes of the converter: BN folded, ReLU fused (no op of their own)
    assert [op for op in int8.op_names() if op in ("CONV_2D", "DEPTHWISE_CONV_2D", "MUL", "ADD", "RELU", "RELU6")] == [
        "CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D"]
    gap = float(np.abs(np.asarray(int8(x_test)) - qat.predict(x_test, verbose=0)).mean())
    assert gap < 0.05, f"QAT model and its int8 model differ by {gap:.3f} per logit"


@pytest.mark.parametrize("kind", ["conv1d", "separable", "transposed", "dense"])
def test_each_kernel_the_converter_folds_batch_norm_into_has_its_output_unrounded(kind):
    """The rule of the test above for every kernel layer the converter folds BN into and fuses a ReLU with; the
    converter's op list is checked too, so a converter that stops fusing them fails here."""
    keras.utils.set_random_seed(0)
    shape, layer = {
        "conv1d": ((16, 4), keras.layers.Conv1D(8, 3, padding="same", name="kernel")),
        "separable": ((8, 8, 4), keras.layers.SeparableConv2D(8, 3, padding="same", name="kernel")),
        "transposed": ((8, 8, 4), keras.layers.Conv2DTranspose(8, 3, padding="same", name="kernel")),
        "dense": ((16,), keras.layers.Dense(8, name="kernel")),
    }[kind]
    inputs = keras.Input(shape)
    h = keras.layers.ReLU(name="relu")(keras.layers.BatchNormalization(name="bn")(layer(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(keras.layers.Flatten(name="flatten")(h)))
    qat = inc_tf.prepare_qat(model)
    rounded = {w.name for w in qat.layers if isinstance(w, inc_tf.FakeQuant) and w.quantize_output}
    assert rounded == {"relu", "flatten", "head"}, rounded
    x = np.random.default_rng(0).normal(size=(32, *shape)).astype(np.float32)
    int8 = inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset(x, batch_size=8))
    assert not {"MUL", "ADD", "SUB", "RELU"} & set(int8.op_names()), int8.op_names()  # BN folded, ReLU fused


def test_a_qat_model_saved_by_keras_and_loaded_again_converts_as_before(digits, tmp_path):
    """``ModelCheckpoint`` saves the QAT model during ``fit``; loaded again, it had lost what convert and the
    callback read (the user's architecture, the QATConfig): "this QAT model lost its source architecture"."""
    x_train, x_test, y_train, _ = digits
    config = inc.QATConfig(freeze_observer_step=20, exclude=inc.LayerFilter(names=("fc1",)))
    qat = inc_tf.prepare_qat(models.cnn(), config)
    qat.compile(keras.optimizers.Adam(5e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    path = tmp_path / "qat.keras"
    checkpoint = keras.callbacks.ModelCheckpoint(str(path))
    qat.fit(x_train[:640], y_train[:640], epochs=1, batch_size=32, verbose=0, callbacks=[inc_tf.QATCallback(), checkpoint])
    loaded = keras.models.load_model(path)
    assert qat_config_of(loaded) == config  # what QATCallback() reads when training goes on
    expected = inc_tf.convert(qat)
    converted = inc_tf.convert(loaded)
    np.testing.assert_array_equal(np.asarray(converted(x_test)), np.asarray(expected(x_test)))
    assert "fc1" not in converted.int8_layers() and "conv2" in converted.int8_layers()
