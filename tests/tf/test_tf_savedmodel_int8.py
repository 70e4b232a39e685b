"""The SavedModel INT8 target: TF's own oneDNN int8 kernels in a SavedModel, from Keras models and SavedModels."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_testmodels as models

import inc_core as inc
from inc_core.errors import ConfigError, DatasetError, SaveError, UnsupportedModelError
from inc_core.tuning import autotune
from inc_tf import TFSavedModel

SAVEDMODEL = inc.QuantConfig(format="savedmodel", calib_samples=128)
INT8_KERNELS = ("_FusedQuantizedConv2D", "QuantizedMatMulWithBiasAndReluAndRequantize", "QuantizedMatMulWithBiasAndDequantize")


def _loaded_op_counts(path: Path) -> dict[str, int]:
    """Op types in a SavedModel's serving signature as TF loads it, function bodies included."""
    graph_def = tf.saved_model.load(str(path)).signatures["serving_default"].graph.as_graph_def()
    counts: dict[str, int] = {}
    nodes = [*graph_def.node, *(n for f in graph_def.library.function for n in f.node_def)]
    for node in nodes:
        counts[node.op] = counts.get(node.op, 0) + 1
    return counts


def _served_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    (logits,) = serve(tf.constant(x)).values()
    return float(np.mean(np.argmax(logits.numpy(), axis=1) == y))


def test_int8_kernels_in_the_saved_graph_and_accuracy(digits, calib, tmp_path):
    x_train, x_test, _, y_test = digits
    model = models.cnn()
    q = inc.quantize(model, SAVEDMODEL, dataset=calib)
    assert isinstance(q, TFSavedModel)
    # conv1 (+BN+ReLU folded), conv2, fc1 and logits all run in int8.
    assert sorted(q.int8_layers()) == ["conv1", "conv2", "fc1", "logits"]
    path = inc.save(q, tmp_path / "digits.savedmodel")
    counts = _loaded_op_counts(path)
    assert counts.get("QuantizeV2", 0) >= 2 and counts.get("_FusedQuantizedConv2D") == 2, counts
    assert counts.get("QuantizedMatMulWithBiasAndReluAndRequantize") == 1, counts
    assert counts.get("QuantizedMatMulWithBiasAndDequantize") == 1, counts
    assert "Conv2D" not in counts and "MatMul" not in counts and "FusedBatchNormV3" not in counts, counts
    assert inc.get_backend("tf").int8_op_counts(q) == {
        "_FusedQuantizedConv2D": 2,
        "QuantizedMatMulWithBiasAndReluAndRequantize": 1,
        "QuantizedMatMulWithBiasAndDequantize": 1,
        "QuantizedMaxPool": 1,  # runs on conv2's int8 output
    }
    fp32 = models.accuracy(model, x_test, y_test)
    served = _served_accuracy(path, x_test, y_test)
    assert served >= fp32 - 0.01, f"SavedModel int8 accuracy {served:.4f} vs FP32 {fp32:.4f}"
    # inc.load reads the directory back: same outputs, same int8 layers.
    loaded = inc.load(path)
    assert isinstance(loaded, TFSavedModel)
    np.testing.assert_allclose(loaded(x_test[:64]), q(x_test[:64]), rtol=1e-5, atol=1e-5)
    assert sorted(loaded.int8_layers()) == sorted(q.int8_layers())


def test_autotune_on_the_savedmodel_target(digits):
    x_train, x_test, y_train, y_test = digits
    model = models.cnn()
    x_val, y_val = x_train[-300:], y_train[-300:]
    tuning = inc.TuningConfig(base=SAVEDMODEL, tolerable_loss=0.01, loss_type="absolute", max_trials=4, history=None)
    result = autotune(model, tuning, eval_fn=lambda m: models.accuracy(m, x_val, y_val), dataset=inc.Dataset(x_train[:256], batch_size=32))
    assert result.met and isinstance(result.model, TFSavedModel)
    assert result.model.int8_nodes(), "the tuned model runs no int8 kernel"
    fp32, int8 = models.accuracy(model, x_test, y_test), models.accuracy(result.model, x_test, y_test)
    assert int8 >= fp32 - 0.01, f"tuned int8 {int8:.4f} vs FP32 {fp32:.4f}"


def _int8_breaking_cnn() -> keras.Model:
    """The digits CNN with one fc1 unit scaled up 1000x and the logits weights that read it scaled down alike.

    The FP32 function is the same (ReLU commutes with a positive scale), but fc1's output, the logits' input,
    now spans a range where one 8-bit step is wider than every other unit's activations (and fc1's per-tensor
    int8 weights keep only that unit's column).
    """
    source = models.cnn()
    model = keras.models.clone_model(source)
    model.set_weights(source.get_weights())
    hidden = keras.Model(model.inputs, model.get_layer("fc1").output)(models.digits()[0][:256])
    unit = int(np.argmax(np.mean(np.asarray(hidden), axis=0)))
    kernel, bias = model.get_layer("fc1").get_weights()
    kernel[:, unit] *= 1000.0
    bias[unit] *= 1000.0
    model.get_layer("fc1").set_weights([kernel, bias])
    kernel, bias = model.get_layer("logits").get_weights()
    kernel[unit, :] /= 1000.0
    model.get_layer("logits").set_weights([kernel, bias])
    return model


def test_savedmodel_op_errors_are_each_layers_own(digits):
    x_train, _, y_train, _ = digits
    model = _int8_breaking_cnn()
    assert abs(models.accuracy(model, x_train, y_train) - models.accuracy(models.cnn(), x_train, y_train)) < 0.005
    data = inc.Dataset(x_train[:256], batch_size=32)
    backend = inc.get_backend("tf")
    assert models.accuracy(inc.quantize(model, SAVEDMODEL, dataset=data), x_train, y_train) < 0.3  # all-int8 breaks
    errors = backend.op_errors(model, SAVEDMODEL, calibration=None, dataset=data)
    assert set(errors) == {"conv1", "conv2", "fc1", "logits"}
    # Each layer is fed the float model's input, so the error shows where it arises: the logits' input range,
    # whose one huge unit leaves every other unit below an 8-bit step. fc1's output keeps that unit and with
    # it nearly all of its energy, so its relative error stays small (a limit of output-MSE ranking).
    assert errors["logits"] > 0.5, errors
    assert max(errors["conv1"], errors["conv2"], errors["fc1"]) < 0.01, errors
    kept = inc.QuantConfig(format="savedmodel", calib_samples=128, exclude=inc.LayerFilter(names=("conv2",)))
    assert set(backend.op_errors(model, kept, calibration=None, dataset=data)) == {"conv1", "fc1", "logits"}


def test_a_relu_layer_read_only_by_float_ops_gives_a_float_output(digits):
    """fc1 with the logits kept in float: its kernel dequantizes and the Relu runs in float, so its output is
    not rounded to 8 bits (a requantized output holds at most 256 values) though nothing int8 reads it."""
    from inc_tf._frozen import graph_function

    x_train, x_test, _, y_test = digits
    model = models.cnn()
    config = inc.QuantConfig(format="savedmodel", calib_samples=128, exclude=inc.LayerFilter(names=("logits",)))
    q = inc.quantize(model, config, dataset=inc.Dataset(x_train[:256], batch_size=32))
    assert sorted(q.int8_layers()) == ["conv1", "conv2", "fc1"]
    counts = q.op_counts()
    assert counts.get("QuantizedMatMulWithBiasAndDequantize") == 1 and "QuantizedMatMulWithBiasAndReluAndRequantize" not in counts, counts
    assert counts.get("MatMul") == 1, counts  # the logits
    (kernel,) = [n.name for n in q.graph_def.node if n.op == "QuantizedMatMulWithBiasAndDequantize"]
    (relu,) = [n.name for n in q.graph_def.node if n.op == "Relu" and n.input[0] == f"{kernel}:0"]
    fc1 = np.asarray(graph_function(q.graph_def, q.input_tensors, (f"{relu}:0",))(tf.constant(x_test)))
    assert len(np.unique(fc1)) > 1000, len(np.unique(fc1))
    assert models.accuracy(q, x_test, y_test) >= models.accuracy(model, x_test, y_test) - 0.01


def test_inputs_a_few_1e_4_wide_keep_their_calibrated_range():
    # TF's QuantizeV2 widens any range below 0.01 to 0.01 unless told otherwise (ensure_minimum_range): an input
    # 3e-4 wide kept ~8 of its 256 levels (output cosine 0.9937; ~1e-6 wide inputs became zero)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((16,)), keras.layers.Rescaling(1e-4), keras.layers.Dense(32, activation="relu", name="fc1"),
        keras.layers.Dense(4, name="fc2"),
    ])
    x = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    q = inc.quantize(model, inc.QuantConfig(format="savedmodel"), dataset=inc.Dataset(x, batch_size=16))
    assert sorted(q.int8_layers()) == ["fc1", "fc2"]
    quantize = [n for n in q.graph_def.node if n.op == "QuantizeV2"]
    # (a missing attribute would read 0.0 too: TF's default of 0.01 applies then)
    assert quantize and all("ensure_minimum_range" in n.attr and n.attr["ensure_minimum_range"].f == 0.0 for n in quantize)
    want, got = model.predict(x, verbose=0), np.asarray(q(x))
    assert float((want * got).sum() / np.linalg.norm(want) / np.linalg.norm(got)) >= 0.999


def test_excluded_layer_stays_float(calib, digits):
    q = inc.quantize(models.cnn(), inc.QuantConfig(format="savedmodel", exclude=inc.LayerFilter(names=("conv2",))), dataset=calib)
    assert sorted(q.int8_layers()) == ["conv1", "fc1", "logits"]
    counts = q.op_counts()
    assert counts.get("Conv2D") == 1 and counts.get("_FusedQuantizedConv2D") == 1, counts
    x_test, y_test = digits[1], digits[3]
    assert models.accuracy(q, x_test, y_test) >= models.accuracy(models.cnn(), x_test, y_test) - 0.01


def test_per_layer_override_changes_only_that_layer(calib, digits):
    base = inc.quantize(models.cnn(), SAVEDMODEL, dataset=calib)
    tuned = inc.quantize(
        models.cnn(),
        inc.QuantConfig(format="savedmodel", calib_samples=128, overrides={"conv1": {"granularity": "per_tensor"}}),
        dataset=calib,
    )

    def filter_ranges(model: TFSavedModel) -> dict[str, int]:
        return {n.name: tf.make_ndarray(n.attr["value"].tensor).size for n in model.graph_def.node if n.name.endswith("/weight_max")}

    before, after = filter_ranges(base), filter_ranges(tuned)
    changed = sorted(name for name in before if before[name] != after[name])
    assert len(changed) == 1 and after[changed[0]] == 1 and before[changed[0]] == 16, (before, after)


@pytest.mark.parametrize("how", ["export", "tf.saved_model.save"])
def test_savedmodel_directory_is_accepted_and_quantized(how, digits, calib, tmp_path):
    x_test, y_test = digits[1], digits[3]
    model = models.cnn()
    source = tmp_path / "exported"
    if how == "export":
        model.export(str(source), verbose=False)
    else:
        module = tf.Module()
        module.net = model
        module.serve = tf.function(lambda x: {"logits": model(x, training=False)}, input_signature=[tf.TensorSpec([None, 8, 8, 1], tf.float32, name="x")])
        tf.saved_model.save(module, str(source), signatures={"serving_default": module.serve})
    before = sorted((p.relative_to(source), p.stat().st_mtime_ns) for p in source.rglob("*"))
    q = inc.quantize(source, inc.QuantConfig(calib_samples=128), dataset=calib)  # found from the directory alone
    assert isinstance(q, TFSavedModel)
    assert len(q.int8_layers()) == 4, q.op_counts()
    assert models.accuracy(q, x_test, y_test) >= models.accuracy(model, x_test, y_test) - 0.01
    assert sorted((p.relative_to(source), p.stat().st_mtime_ns) for p in source.rglob("*")) == before
    # A SavedModel as tf.saved_model.load returns it is taken too.
    loaded = tf.saved_model.load(str(source))
    assert len(inc.quantize(loaded, inc.QuantConfig(calib_samples=32), dataset=calib).int8_layers()) == 4


@pytest.mark.parametrize("policy", ["mixed_float16", "float16", "float64"])
def test_a_savedmodel_exported_from_a_16_or_64_bit_model_gets_its_conv_in_int8(policy, digits, tmp_path):
    """A SavedModel exported from a Keras model computing in float16 (or float64) runs its Conv2D in that type, and
    the int8 rewrite (TF's INT8 kernels read float32) left it out: only the float32 logits layer became INT8. The
    frozen graph is retyped to float32 first."""
    x_train, x_test = digits[0], digits[1]
    model = models.build_mixed_precision_cnn(policy)
    model.export(str(tmp_path / "exported"), verbose=False)

    q = inc.quantize(tmp_path / "exported", inc.QuantConfig(calib_samples=128), dataset=inc.Dataset(x_train[:128], batch_size=32))

    assert q.op_counts().get("_FusedQuantizedConv2D") == 1, q.op_counts()
    reference = np.asarray(model.predict(x_test, verbose=0)).argmax(1)
    assert float(np.mean(np.asarray(q(x_test)).argmax(1) == reference)) >= 0.98


def test_savedmodel_without_serving_signature_is_explained(tmp_path, calib):
    module = tf.Module()
    module.v = tf.Variable(1.0)
    tf.saved_model.save(module, str(tmp_path / "bare"))
    with pytest.raises(UnsupportedModelError, match="no 'serving_default' signature.*model.export"):
        inc.quantize(tmp_path / "bare", inc.QuantConfig(), dataset=calib, backend="tf")


def test_savedmodel_input_refuses_the_tflite_target(tmp_path, calib):
    models.cnn().export(str(tmp_path / "exported"), verbose=False)
    with pytest.raises(ConfigError, match="format='savedmodel'"):
        inc.quantize(tmp_path / "exported", inc.QuantConfig(format="tflite"), dataset=calib)


@pytest.mark.parametrize(
    ("data", "message"),
    [(np.zeros((8, 64), np.float32), r"shape \(4, 64\).*\(batch, 8, 8, 1\)"), (np.array([["a"] * 64] * 4).reshape(4, 8, 8, 1), "dtype")],
)
def test_wrong_calibration_data_is_a_dataset_error(data, message):
    with pytest.raises(DatasetError, match=message):
        inc.quantize(models.cnn(), inc.QuantConfig(format="savedmodel"), dataset=inc.Dataset(data, batch_size=4))


def test_unwritable_output_leaves_no_partial_directory(tmp_path, calib, monkeypatch):
    q = inc.quantize(models.cnn(), inc.QuantConfig(format="savedmodel", calib_samples=32), dataset=calib)
    with pytest.raises(SaveError, match="does not exist"):
        inc.save(q, tmp_path / "missing" / "model.savedmodel")
    (tmp_path / "taken.savedmodel").write_text("a file the user keeps")
    with pytest.raises(SaveError):
        inc.save(q, tmp_path / "taken.savedmodel")
    assert (tmp_path / "taken.savedmodel").read_text() == "a file the user keeps"

    def fail_after_writing(self: TFSavedModel, path: Path) -> None:
        original(self, path)  # a complete SavedModel in the staging directory, then the disk fills up
        raise OSError("disk full")

    original = TFSavedModel.save
    monkeypatch.setattr(TFSavedModel, "save", fail_after_writing)
    with pytest.raises(SaveError, match="disk full"):
        inc.save(q, tmp_path / "model.savedmodel")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.savedmodel"]


_RESIDUAL_VARIANTS = ("unsigned-summand", "signed-summand", "conv-shortcut", "signed-input")


def _residual_cnn(variant: str) -> keras.Model:
    """conv, then a residual block ``ReLU(Add(block_b(block_a(h)), shortcut))`` on digits, trained.

    ``unsigned-summand``: the stem ends in a ReLU, the shortcut is ``h`` itself. ``signed-summand``: the stem has no
    ReLU, so the summand is signed and also read by block_a. ``conv-shortcut``: the shortcut is a 1x1 conv + BN (a
    ResNet's downsampling path), signed and read by the Add only. ``signed-input``: block_a has no ReLU, so block_b
    reads a signed input, which TF's fused-sum kernel cannot take: the Add stays float.
    """
    keras.utils.set_random_seed(2)
    inputs = keras.Input((8, 8, 1))
    stem_relu = variant != "signed-summand"
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu" if stem_relu else None, name="stem")(inputs)
    y = keras.layers.Conv2D(16, 3, padding="same", activation=None if variant == "signed-input" else "relu", name="block_a")(h)
    y = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="block_b")(y)
    y = keras.layers.BatchNormalization(name="block_bn")(y)
    shortcut = h
    if variant == "conv-shortcut":
        shortcut = keras.layers.Conv2D(16, 1, use_bias=False, name="shortcut")(h)
        shortcut = keras.layers.BatchNormalization(name="shortcut_bn")(shortcut)
    h = keras.layers.ReLU(name="block_relu")(keras.layers.Add(name="residual")([y, shortcut]))
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(h), name="residual_cnn")
    x_train, _, y_train, _ = models.digits()
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=15, batch_size=32, verbose=0)
    return model


@pytest.mark.parametrize("variant", _RESIDUAL_VARIANTS[:3])
def test_residual_add_and_relu_fused_into_the_int8_conv(digits, calib, variant):
    """The Add + ReLU run inside the int8 conv, a signed summand shifted to unsigned (by its producing conv when
    only the Add reads it, else by a float Sub), with outputs that stay those of the float model."""
    x_test, y_test = digits[1], digits[3]
    model = _residual_cnn(variant)
    q = inc.quantize(model, SAVEDMODEL, dataset=calib)
    counts = q.op_counts()
    assert counts.get("QuantizedConv2DWithBiasSumAndReluAndRequantize") == 1, counts
    convs = 3 if variant == "conv-shortcut" else 2
    assert counts.get("_FusedQuantizedConv2D") == convs and "AddV2" not in counts and "Relu" not in counts, counts
    # only the stem's signed output, which block_a reads too, is shifted in float
    assert counts.get("Sub", 0) == (1 if variant == "signed-summand" else 0), counts
    # int8 from the input's QuantizeV2 to the Dequantize before the pooling, at most the stem's output besides
    assert counts.get("Dequantize") == (2 if variant == "signed-summand" else 1), counts
    expected = ["block_a", "block_b", "logits", "stem"] + (["shortcut"] if variant == "conv-shortcut" else [])
    assert sorted(q.int8_layers()) == sorted(expected)
    fp32 = models.accuracy(model, x_test, y_test)
    assert fp32 > 0.9 and models.accuracy(q, x_test, y_test) >= fp32 - 0.01
    reference, got = np.asarray(model(x_test, training=False)), np.asarray(q(x_test))
    cosine = np.sum(reference * got, 1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(got, axis=1))
    assert cosine.min() > 0.99, cosine.min()


@pytest.mark.parametrize("variant", _RESIDUAL_VARIANTS)
def test_residual_op_errors_are_each_convs_own(digits, calib, variant):
    """With the Add left in float it reads the summand from upstream int8 layers: block_b's error is read before it."""
    model = _residual_cnn(variant)
    q = inc.quantize(model, SAVEDMODEL, dataset=calib)
    fused = q.op_counts().get("QuantizedConv2DWithBiasSumAndReluAndRequantize") == 1
    assert fused == (variant != "signed-input") and ("AddV2" in q.op_counts()) != fused, q.op_counts()
    errors = inc.get_backend("tf").op_errors(model, SAVEDMODEL, calibration=None, dataset=calib)
    layers = {"stem", "block_a", "block_b", "logits"} | ({"shortcut"} if variant == "conv-shortcut" else set())
    assert set(errors) == layers
    assert all(0.0 < value < 0.05 for value in errors.values()), errors


def test_cli_quantizes_a_savedmodel_directory(tmp_path, capsys):
    from inc_core.cli import main

    source = tmp_path / "export"
    models.cnn().export(str(source), verbose=False)
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=models.digits()[0][:64])
    out = tmp_path / "cnn.int8.savedmodel"
    code = main(["quantize", str(source), "-o", str(out), "--calib", str(calib), "--calib-batch-size", "16"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "2 _FusedQuantizedConv2D" in printed.out, printed.out
    assert _loaded_op_counts(out).get("_FusedQuantizedConv2D") == 2


class _SubclassedMLP(keras.Model):
    def __init__(self) -> None:
        super().__init__()
        self.flat = keras.layers.Flatten()
        self.hidden = keras.layers.Dense(32, activation="relu")
        self.out = keras.layers.Dense(10)

    def call(self, x):
        return self.out(self.hidden(self.flat(x)))


class _ReadsValues(_SubclassedMLP):
    def call(self, x):
        return super().call(x) * float(np.asarray(x).mean())  # a Python read of a tensor: not traceable


def test_subclassed_models_traced_or_explained(digits, calib):
    x = digits[1][:64]
    model = _SubclassedMLP()
    model.build((None, 8, 8, 1))
    q = inc.quantize(model, inc.QuantConfig(format="savedmodel", calib_samples=64), dataset=calib)
    assert sorted(q.int8_layers()) == sorted([model.hidden.name, model.out.name])
    assert np.mean(np.argmax(q(x), 1) == np.argmax(np.asarray(model(x)), 1)) > 0.9
    # The class name makes the model "__subclassed_mlp", no valid root scope for TF: LiteRT traces it too.
    assert inc.quantize(model, inc.QuantConfig(format="tflite", calib_samples=32), dataset=calib).int8_layers()
    untraceable = _ReadsValues()
    untraceable(x[:2])
    with pytest.raises(UnsupportedModelError, match="could not be traced.*tf.function"):
        inc.quantize(untraceable, inc.QuantConfig(format="savedmodel"), dataset=calib)


def test_folded_constants_are_evaluated_without_the_rest_of_the_graph():
    """A weight computed from constants (Transpose of a Const) is evaluated on its own subgraph.

    The constant carries a control input from a node that reads the placeholder: evaluating it must not need
    the graph's input, and the value must be the one TF computes.
    """
    from inc_tf.ptq._int8_units import ConstantFolder

    weight = np.arange(12, dtype=np.float32).reshape(3, 4)
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, (None, 4), name="x")
        seen = tf.identity(x, name="seen")
        with tf.control_dependencies([seen]):
            w = tf.transpose(tf.constant(weight, name="w"), name="w_t")
        tf.matmul(x, w, name="y")
    folder = ConstantFolder(graph.as_graph_def())
    assert folder.is_constant("w_t") and not folder.is_constant("y")
    subgraph = folder._constant_subgraph(["w_t:0"])
    # the constants hold a control input (^seen) from the placeholder's side of the graph: dropped with it
    assert {n.name: list(n.input) for n in subgraph.node} == {"w": [], "w_t/perm": [], "w_t": ["w", "w_t/perm"]}
    np.testing.assert_array_equal(folder.values(["w_t"])["w_t:0"], weight.T)


def test_graph_function_feeds_placeholders_or_inner_tensors_and_fetches_the_inputs_too():
    """Placeholder inputs are mapped at import; an inner tensor fed instead (pruned path) replaces what computes it."""
    from inc_tf._frozen import graph_function

    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, (None, 3), name="x")
        y = tf.multiply(x, 2.0, name="y")
        tf.add(y, 1.0, name="z")
    graph_def = graph.as_graph_def()
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    z, fed = graph_function(graph_def, ("x:0",), ("z:0", "x:0"))(tf.constant(data))
    np.testing.assert_array_equal(np.asarray(z), data * 2 + 1)
    np.testing.assert_array_equal(np.asarray(fed), data)  # a fetched input is the value fed, not a dangling placeholder
    (z_from_y,) = graph_function(graph_def, ("y:0",), ("z:0",))(tf.constant(data))
    np.testing.assert_array_equal(np.asarray(z_from_y), data + 1)
