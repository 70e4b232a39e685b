"""The INT8 paths a TF user would pick, each built from the same Keras model and calibration samples.

Every builder returns a runnable model or, when the tool refuses the model, a one-line reason that the
table prints in place of a figure (a peer that fails is reported, never dropped silently).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import inc_tf
from inc_tf.ptq._convert import float_flatbuffer


def reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {(text[0] if text else '')[:160]}"


class GraphModel:
    """A frozen TF GraphDef (what neural-compressor-tf returns) as a callable on a numpy batch."""

    def __init__(self, graph_def: Any, inputs: list[str], outputs: list[str]) -> None:
        def imported() -> None:
            tf.compat.v1.import_graph_def(graph_def, name="")

        wrapped = tf.compat.v1.wrap_function(imported, [])
        graph = wrapped.graph
        self.fn = wrapped.prune(
            [graph.as_graph_element(_tensor(n)) for n in inputs], [graph.as_graph_element(_tensor(n)) for n in outputs]
        )
        self.graph_def, self.inputs, self.outputs = graph_def, list(inputs), list(outputs)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.fn(tf.constant(x))[0])

    def op_types(self) -> set[str]:
        return {node.op for node in self.graph_def.node}


def _tensor(name: str) -> str:
    return name if ":" in name else f"{name}:0"


class LiteRT:
    """A .tflite run by the LiteRT interpreter (XNNPACK) through its signature, float in and float out.

    ai-edge-quantizer's static recipe also quantizes the model's input and output tensors; such a model
    is fed by quantizing the float batch with the input's own scale and zero point (and its output
    dequantized), inside the timed call, as an application feeding float data would have to.
    """

    def __init__(self, content: bytes, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.content = bytes(content)
        self.interp = Interpreter(model_content=self.content, num_threads=threads)
        self.interp.allocate_tensors()
        key = next(iter(self.interp.get_signature_list()))
        self.runner = self.interp.get_signature_runner(key)
        (self.name, detail), = self.runner.get_input_details().items()
        self.dtype = detail["dtype"]
        self.in_q = detail["quantization"]
        out = next(iter(self.runner.get_output_details().values()))
        self.out_q = out["quantization"] if out["dtype"] != np.float32 else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.dtype != np.float32:
            scale, zero = self.in_q
            info = np.iinfo(self.dtype)
            x = np.clip(np.round(x / scale) + zero, info.min, info.max).astype(self.dtype)
        else:
            x = x.astype(np.float32, copy=False)
        y = next(iter(self.runner(**{self.name: x}).values()))
        if self.out_q is not None:
            y = (y.astype(np.float32) - self.out_q[1]) * self.out_q[0]
        return y

    def op_names(self) -> list[str]:
        from inc_tf._flatbuffer import op_records

        return [record.op for record in op_records(self.content)]


def save_artifact(model: Any, path: Path) -> None:
    """A peer's model as files under ``path`` (a .tflite, or a frozen graph with its tensor names)."""
    staging = path.with_name(path.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    if isinstance(model, LiteRT):
        (staging / "model.tflite").write_bytes(model.content)
    elif isinstance(model, GraphModel):
        (staging / "graph.pb").write_bytes(model.graph_def.SerializeToString())
        (staging / "names.json").write_text(json.dumps({"inputs": model.inputs, "outputs": model.outputs}))
    else:
        return
    staging.rename(path)


def load_artifact(path: Path, threads: int) -> LiteRT | GraphModel:
    if (path / "model.tflite").exists():
        return LiteRT((path / "model.tflite").read_bytes(), threads)
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString((path / "graph.pb").read_bytes())
    names = json.loads((path / "names.json").read_text())
    return GraphModel(graph_def, names["inputs"], names["outputs"])


def litert_fp32(model: keras.Model) -> inc_tf.LiteRTModel:
    return inc_tf.LiteRTModel(content=float_flatbuffer(model))


def converter_int8(model: keras.Model, samples: np.ndarray, approach: str = "static") -> inc_tf.LiteRTModel:
    """The TF converter's default quantization: full-integer with representative data (int8 inside, float
    input/output), or, for ``approach="dynamic"``, its dynamic-range int8 (no representative data)."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if approach == "static":
        converter.representative_dataset = lambda: ([samples[i : i + 1]] for i in range(len(samples)))
    return inc_tf.LiteRTModel(content=bytes(converter.convert()))


def ai_edge_quantizer_int8(model: keras.Model, samples: np.ndarray, approach: str = "static") -> inc_tf.LiteRTModel | str:
    """ai-edge-quantizer's int8 recipe on the converter's float .tflite: ``static_wi8_ai8`` (int8 weights and
    activations), or ``dynamic_wi8_afp32`` for ``approach="dynamic"``."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer, recipe

    try:
        content = float_flatbuffer(model)
        signatures = Interpreter(model_content=content).get_signature_list()
        key = next(iter(signatures))
        name = signatures[key]["inputs"][0]
        if approach == "static":
            qt = quantizer.Quantizer(content, recipe.static_wi8_ai8())
            calibration = qt.calibrate({key: [{name: samples[i : i + 1]} for i in range(len(samples))]})
        else:
            qt, calibration = quantizer.Quantizer(content, recipe.dynamic_wi8_afp32()), None
        result = qt.quantize(calibration, enable_progress_report=False)
        return inc_tf.LiteRTModel(content=bytes(result.quantized_model))
    except Exception as exc:  # noqa: BLE001 - the reason is what the table reports
        return reason(exc)


def keras_int8(model: keras.Model) -> keras.Model | str:
    """Keras 3's own int8 (on a clone): returns the reason when Keras refuses the model."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    try:
        clone.quantize("int8")
    except Exception as exc:  # noqa: BLE001 - the reason is what the table reports
        return reason(exc)
    return clone


def neural_compressor_tf_int8(model: keras.Model, samples: np.ndarray) -> GraphModel | str:
    """neural-compressor-tf 3.10's default static config on the model exported as a SavedModel.

    INC 3.x has two TF paths: a Keras model goes through its Keras adaptor, which wraps layers in
    quantize/dequantize pairs around float kernels (int8 only under Intel Extension for TensorFlow);
    a SavedModel goes through its graph adaptor, which rewrites the graph to stock TF's oneDNN int8 ops
    (QuantizeV2, _QuantizedConv2D...). The graph path is the one that runs int8 on stock TF.
    """
    from neural_compressor.tensorflow import StaticQuantConfig, quantize_model
    from neural_compressor.tensorflow.utils import BaseDataLoader

    logging.getLogger("neural_compressor").setLevel(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory(prefix="inc-bench-nctf-") as tmp:
            path = Path(tmp) / "saved_model"
            model.export(str(path), verbose=False)
            dataset = [(samples[i], 0) for i in range(len(samples))]
            loader = BaseDataLoader(dataset=dataset, batch_size=1)
            q = quantize_model(str(path), StaticQuantConfig(), loader, calib_iteration=len(samples))
            return GraphModel(q.graph_def, list(q.input_tensor_names), list(q.output_tensor_names))
    except Exception as exc:  # noqa: BLE001 - the reason is what the table reports
        return reason(exc)


class SavedModel:
    """A SavedModel directory loaded with ``tf.saved_model.load`` and run through its serving signature."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.loaded = tf.saved_model.load(str(path))
        signature = self.loaded.signatures["serving_default"]
        self.fn = lambda t: signature(t)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(next(iter(self.fn(tf.constant(x)).values())))

    def op_types(self) -> set[str]:
        graph = self.loaded.signatures["serving_default"].graph.as_graph_def()
        ops = {node.op for node in graph.node}
        for function in graph.library.function:
            ops |= {node.op for node in function.node_def}
        return ops


def inc_formats() -> tuple[str, ...]:
    """The int8 output formats of the installed inc-tf (LiteRT only before the SavedModel target existed)."""
    return tuple(getattr(inc_tf.TfBackend, "formats", ()))


def inc_litert_int8(model: keras.Model, samples: np.ndarray, approach: str) -> inc_tf.LiteRTModel:
    import inc_core as inc

    fmt = {"format": "tflite"} if "tflite" in inc_formats() else {}
    config = inc.QuantConfig(approach=approach, calib_samples=len(samples), **fmt)
    return inc.quantize(model, config, dataset=inc.Dataset(samples, batch_size=4))


def inc_savedmodel_int8(model: keras.Model, samples: np.ndarray) -> SavedModel | str:
    """inc's second int8 target: a TF SavedModel whose graph runs TF's oneDNN int8 kernels.

    Written with ``inc.save`` and loaded back with ``tf.saved_model.load``, as it would be served.
    """
    import inc_core as inc

    if "savedmodel" not in inc_formats():
        return "the installed inc-tf has no SavedModel int8 target (LiteRT is its only int8 output)"
    config = inc.QuantConfig(format="savedmodel", calib_samples=len(samples))
    quantized = inc.quantize(model, config, dataset=inc.Dataset(samples, batch_size=4))
    path = Path(tempfile.mkdtemp(prefix="inc-bench-savedmodel-")) / "model"
    inc.save(quantized, path)
    loaded = SavedModel(path)
    from inc_tf._savedmodel import INT8_OPS

    if not loaded.op_types() & set(INT8_OPS):
        return f"the SavedModel inc wrote holds none of TF's int8 ops ({', '.join(INT8_OPS[:3])}...)"
    return loaded
