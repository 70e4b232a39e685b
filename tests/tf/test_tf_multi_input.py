"""Keras models with several inputs, one of them integer codes for an Embedding (a wide-and-deep tabular model).

The converter's signature lists inputs sorted by name, not in the Keras model's order, and the integer input
must stay integer: LiteRT refuses float32 for an int32 input. Both targets, through quantize, call, save and load.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

import inc_core as inc
from inc_core.errors import DatasetError
from inc_core.testing import cosine

# Keras order differs from the sorted order (aux, category, numeric); numeric and aux have the same shape, so
# feeding one for the other runs and only the outputs tell
NAMES = ("numeric", "category", "aux")


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    numeric = keras.Input((4,), name="numeric")
    category = keras.Input((1,), dtype="int32", name="category")
    aux = keras.Input((4,), name="aux")
    embedded = keras.layers.Flatten()(keras.layers.Embedding(10, 4, name="embed")(category))
    aux_features = keras.layers.Dense(8, activation="relu", name="aux_fc")(aux)
    features = keras.layers.Concatenate()([keras.layers.Dense(8, activation="relu", name="num_fc")(numeric), embedded, aux_features])
    hidden = keras.layers.Dense(32, activation="relu", name="fc")(features)
    return keras.Model([numeric, category, aux], keras.layers.Dense(3, name="logits")(hidden))


def _keyed_model() -> keras.Model:
    """The same network taking its inputs as a dict (how keras_hub's backbones and many Keras users build one)."""
    model = _model()
    return keras.Model(dict(zip(NAMES, model.inputs)), model.output)


def _data(rows: int = 128) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "numeric": rng.normal(size=(rows, 4)).astype(np.float32),
        "category": rng.integers(0, 10, (rows, 1)).astype(np.int32),
        "aux": (3 * rng.normal(size=(rows, 4)) + 2).astype(np.float32),
    }


@pytest.mark.parametrize("fmt", ["tflite", "savedmodel"])
def test_tuple_inputs_follow_the_keras_order_through_quantize_save_and_load(fmt: str, tmp_path: Path) -> None:
    model, data = _model(), _data()
    as_tuple = tuple(data[name] for name in NAMES)
    calib = inc.Dataset([tuple(array[i : i + 32] for array in as_tuple) for i in range(0, 128, 32)])
    quantized = inc.quantize(model, inc.QuantConfig(format=fmt), dataset=calib)
    want = model.predict(list(as_tuple), verbose=0)
    assert cosine(want, quantized(as_tuple)) >= 0.99
    swapped = (data["aux"], data["category"], data["numeric"])
    assert cosine(want, quantized(swapped)) < 0.9  # the check above can tell the inputs apart
    path = tmp_path / ("model.tflite" if fmt == "tflite" else "model.savedmodel")
    inc.save(quantized, str(path))
    loaded = inc.load(str(path))
    np.testing.assert_allclose(loaded(as_tuple), quantized(as_tuple), rtol=1e-5, atol=1e-5)
    # by name, with the codes as int64 (numpy's default integer)
    by_name = {**data, "category": data["category"].astype(np.int64)}
    np.testing.assert_allclose(loaded(by_name), quantized(as_tuple), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["tflite", "savedmodel"])
def test_a_model_built_on_a_dict_of_inputs_quantizes_and_trains_aware(fmt: str) -> None:
    # the TF converter and SavedModel export call a model with its inputs as a list, which a dict-input model
    # refuses; TF's fallback tracer then failed with "'NoneType' object is not callable"
    import inc_tf

    model, data = _keyed_model(), _data()
    quantized = inc.quantize(model, inc.QuantConfig(format=fmt), dataset=inc.Dataset(data, batch_size=32))
    want = model.predict(data, verbose=0)
    assert cosine(want, quantized(data)) >= 0.99
    qat = inc_tf.prepare_qat(model, inc.QATConfig())
    qat.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    labels = np.random.default_rng(1).integers(0, 3, len(data["numeric"]))
    qat.fit(data, labels, epochs=1, batch_size=32, verbose=0, callbacks=[inc_tf.QATCallback()])
    int8 = inc_tf.convert(qat, dataset=inc.Dataset(data, batch_size=32), format=fmt)
    assert cosine(qat.predict(data, verbose=0), int8(data)) >= 0.99


@pytest.mark.parametrize("config", [inc.QuantConfig(), inc.QuantConfig(format="savedmodel")], ids=["litert", "savedmodel"])
def test_an_input_no_output_reads_is_still_taken(config: inc.QuantConfig, tmp_path: Path) -> None:
    # a head on an encoder-decoder's encoder output leaves the decoder inputs unread; the INT8 SavedModel's graph
    # had dropped their placeholders and its first call raised a KeyError ("'input_1:0' ... does not exist")
    model = _model()
    unread = keras.Input((6,), name="unread")
    head = keras.Model([*model.inputs, unread], model.output)
    data = {**_data(), "unread": np.zeros((128, 6), np.float32)}
    quantized = inc.quantize(head, config, dataset=inc.Dataset(data, batch_size=32))
    assert cosine(head.predict(data, verbose=0), quantized(data)) >= 0.99
    path = tmp_path / ("model.tflite" if config.format == "default" else "model.savedmodel")
    inc.save(quantized, str(path))
    np.testing.assert_allclose(inc.load(str(path))(data), quantized(data), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["tflite", "savedmodel"])
@pytest.mark.parametrize("structure", ["list", "dict"])
def test_a_model_with_several_outputs_returns_them_all_as_keras_does(structure: str, fmt: str, tmp_path: Path) -> None:
    # the INT8 model returned its first output only (LiteRT: the first signature name sorted, "box" of
    # {"cls", "box"}), silently
    model = _model()
    hidden = model.get_layer("fc").output
    heads = {"cls": model.output, "box": keras.layers.Dense(4, name="box")(hidden)}
    several = keras.Model(model.inputs, heads if structure == "dict" else [heads["cls"], heads["box"]])
    data = _data()
    want = several.predict(data, verbose=0)
    quantized = inc.quantize(several, inc.QuantConfig(format=fmt), dataset=inc.Dataset(data, batch_size=32))
    path = tmp_path / ("model.tflite" if fmt == "tflite" else "model.savedmodel")
    inc.save(quantized, str(path))
    for got in (quantized(data), inc.load(str(path))(data)):
        assert type(got) is type(want)
        pairs = [(want[k], got[k]) for k in ("cls", "box")] if structure == "dict" else list(zip(want, got))
        assert len(got) == 2 and all(cosine(w, g) >= 0.99 for w, g in pairs)


def test_outputs_numbered_past_ten_come_back_in_order() -> None:
    from inc_tf._outputs import as_keras_outputs

    named = {f"output_{i}": np.full(1, i) for i in sorted(range(12), key=str)}  # output_10 before output_2
    assert [int(a[0]) for a in as_keras_outputs(named)] == list(range(12))


def test_fractional_codes_for_the_integer_input_are_a_dataset_error() -> None:
    data = _data()
    data["category"] = data["category"] + np.float32(0.5)
    with pytest.raises(DatasetError, match=r"input 1 takes integers \(int32.*holds fractions"):
        inc.quantize(_model(), inc.QuantConfig(), dataset=inc.Dataset(data, batch_size=32))


def test_a_tuple_of_whole_arrays_given_to_dataset_explains_the_mapping() -> None:
    data = _data()
    with pytest.raises(DatasetError, match=r"takes 3 \(numeric, category, aux\).*give inc.Dataset a mapping"):
        inc.quantize(_model(), inc.QuantConfig(), dataset=inc.Dataset(tuple(data[n] for n in NAMES)))


def test_a_savedmodel_run_on_inputs_it_cannot_take_is_a_dataset_error() -> None:
    model, data = _model(), _data()
    quantized = inc.quantize(model, inc.QuantConfig(format="savedmodel"), dataset=inc.Dataset(data, batch_size=32))
    with pytest.raises(DatasetError, match=r"Input 'numeric' has shape \(128, 1\); the model expects \(batch, 4\).* in this order"):
        quantized((data["category"], data["numeric"], data["aux"]))


@pytest.mark.parametrize("fmt", ["tflite", "savedmodel"])
def test_qat_learns_a_range_per_float_input_and_leaves_the_integer_one_alone(fmt: str) -> None:
    # prepare_qat put a fake quant on the integer input (a TypeError in the first step), and convert gave every
    # model input the range learned on the first one: aux (about 2 +- 3) clipped to numeric's range, cosine 0.92
    import inc_tf

    data = _data()
    labels = np.random.default_rng(1).integers(0, 3, len(data["numeric"]))
    qat = inc_tf.prepare_qat(_model(), inc.QATConfig())
    qat.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(data, labels, epochs=2, batch_size=32, verbose=0, callbacks=[inc_tf.QATCallback()])
    int8 = inc_tf.convert(qat, dataset=inc.Dataset(data, batch_size=32), format=fmt)
    assert cosine(qat.predict(data, verbose=0), int8(data)) >= 0.99


def test_a_savedmodel_directory_with_an_integer_input_takes_mappings_only(tmp_path: Path) -> None:
    # model.export writes a signature that names its inputs without ordering them (inc lists them sorted: aux,
    # category, numeric). The integer input was cast to float32 (every batch refused by TF), and a tuple in the
    # Keras order would have fed numeric's data to aux, which has its shape.
    model, data = _model(), _data()
    exported = tmp_path / "exported"
    model.export(str(exported), verbose=False)
    tuples = inc.Dataset([tuple(data[name][i : i + 32] for name in NAMES) for i in range(0, 128, 32)])
    with pytest.raises(DatasetError, match=r"names its inputs \['aux', 'category', 'numeric'\] but does not order them"):
        inc.quantize(str(exported), inc.QuantConfig(format="savedmodel"), dataset=tuples)
    quantized = inc.quantize(str(exported), inc.QuantConfig(format="savedmodel"), dataset=inc.Dataset(data, batch_size=32))
    assert quantized.input_dtypes == (np.dtype(np.float32), np.dtype(np.int32), np.dtype(np.float32))
    assert cosine(model.predict(data, verbose=0), quantized(data)) >= 0.99
    inc.save(quantized, str(tmp_path / "int8.savedmodel"))
    loaded = inc.load(str(tmp_path / "int8.savedmodel"))
    np.testing.assert_allclose(loaded(data), quantized(data), rtol=1e-5, atol=1e-5)
    with pytest.raises(DatasetError, match="give a mapping input name -> array"):
        loaded(tuple(data[name] for name in NAMES))
