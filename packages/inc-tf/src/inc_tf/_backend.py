"""TfBackend: the inc backend SPI for Keras 3 models (TensorFlow backend) with LiteRT int8 output."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from inc_core import Dataset, QuantConfig
from inc_core.backend import Backend, TuningSpace, array_digest
from inc_core.errors import CalibrationError, ConfigError, ModelLoadError, SaveError, UnsupportedModelError
from inc_tf._frozen import FrozenGraph, freeze_keras, freeze_savedmodel, is_savedmodel_dir, is_savedmodel_object
from inc_tf._keras_model import (
    KerasGraph,
    as_input_list,
    check_keras_backend,
    check_keras_model,
    is_keras_model,
    load_keras_file,
    prepare_graph,
    refuse_table_layers,
)
from inc_tf._litert import LiteRTModel
from inc_tf._savedmodel import TFSavedModel
from inc_tf.ptq._calibrate import TfCalibration, collect
from inc_tf.ptq._quantize import describe_graph, quantize_dynamic, quantize_static
from inc_tf.ptq._savedmodel_quantize import (
    GraphCalibration,
    GraphPlan,
    calibrate_plan,
    describe_plan,
    plan_graph,
    quantize_plan,
)

__all__ = ["TfBackend"]

_FILE_SUFFIXES = (".keras", ".h5", ".tflite")


class TfBackend(Backend):
    """Quantizes Keras 3 models (functional, Sequential, traceable subclassed) and TF SavedModels to int8.

    Inputs: a ``keras.Model``, a ``.keras``/``.h5`` file, a SavedModel directory (``tf.saved_model.save``,
    ``model.export``) or a SavedModel loaded with ``tf.saved_model.load``; the input is never modified.

    Targets, chosen by ``QuantConfig(format=...)``:

    * ``"savedmodel"``: a :class:`~inc_tf.TFSavedModel` whose graph runs TensorFlow's own oneDNN INT8
      kernels (``QuantizeV2`` -> ``_FusedQuantizedConv2D`` / ``QuantizedMatMulWithBias...`` ->
      ``Dequantize``); ``inc.save(q, "dir")`` writes a SavedModel directory with a ``serving_default``
      signature for ``tf.saved_model.load`` and TF Serving. Static PTQ only; Conv2D, DepthwiseConv2D and
      Dense/MatMul run in int8, BatchNormalization after a convolution is folded into it, a ReLU/ReLU6 fused,
      MultiHeadAttention's projections run as int8 MatMuls, other ops stay float (attention scores among them).
    * ``"tflite"``: an int8 ``.tflite`` flatbuffer from the TF converter (Keras inputs), run by the
      ``ai-edge-litert`` interpreter, as a :class:`~inc_tf.LiteRTModel`.
    * ``"default"``: the first of :attr:`formats` (the faster one on the CPUs measured, see the README);
      a SavedModel input always gets ``"savedmodel"``.

    Both targets take every activation range from inc's observers (one calibration reused by every
    trial), per-layer fallback (``exclude``) and per-layer ``overrides``.

    Example::

        q = inc.quantize(keras_model, inc.QuantConfig(format="savedmodel"), dataset=calib)
        inc.save(q, "model_int8")                       # a SavedModel directory
        served = tf.saved_model.load("model_int8").signatures["serving_default"]
    """

    name: ClassVar[str] = "tf"
    package: ClassVar[str] = "inc-tf"
    formats: ClassVar[tuple[str, ...]] = ("tflite", "savedmodel")

    def __init__(self) -> None:
        self._graphs: dict[int, tuple[Any, KerasGraph]] = {}
        self._plans: dict[int, tuple[Any, GraphPlan]] = {}

    def accepts(self, model: Any) -> bool:
        if isinstance(model, (str, Path)):
            return Path(model).suffix.lower() in _FILE_SUFFIXES or is_savedmodel_dir(model)
        return is_keras_model(model) or isinstance(model, (LiteRTModel, TFSavedModel)) or is_savedmodel_object(model)

    def _target(self, model: Any, config_format: str) -> str:
        """The output format for ``model``: ``QuantConfig.format`` resolved, SavedModel inputs always to SavedModel."""
        chosen = self.check_format(config_format)
        if _is_savedmodel_input(model):
            if config_format == "tflite":
                raise ConfigError(
                    "QuantConfig: format='tflite' takes Keras models (keras.Model or a .keras file); a SavedModel input "
                    "is quantized to format='savedmodel'. Use format='savedmodel' or 'default', or pass the Keras model."
                )
            return "savedmodel"
        return chosen

    def _plan(self, model: Any) -> GraphPlan:
        """The frozen graph and its int8 units, built once per model object (tuning asks for it every trial)."""
        cached = self._plans.get(id(model))
        if cached is not None and cached[0] is model:
            return cached[1]
        if isinstance(model, LiteRTModel) or isinstance(model, TFSavedModel) and model.int8_nodes():
            raise UnsupportedModelError(
                f"This model is already quantized ({type(model).__name__}); quantize the model it came from instead."
            )
        if isinstance(model, TFSavedModel):  # a float SavedModel read by inc.load (the CLI loads before quantizing)
            plan = plan_graph(
                FrozenGraph(model.graph_def, model.input_tensors, model.input_keys, model.input_shapes,
                            model.output_tensors, model.output_keys, ordered=model.ordered_inputs)
            )
        elif _is_savedmodel_input(model):
            where = f"The SavedModel {str(model)!r}" if isinstance(model, (str, Path)) else "The SavedModel object"
            plan = plan_graph(freeze_savedmodel(model, where=where))
        else:
            graph = self._graph(model)
            plan = plan_graph(freeze_keras(graph.model, graph.input_names, graph.input_shapes, graph.input_dtypes), graph)
        self._plans = {id(model): (model, plan)}  # one entry: never keep an old model alive
        return plan

    def _graph(self, model: Any, *, quantizing: bool = True) -> KerasGraph:
        """The converter's view of ``model``, built once per model object (tuning asks for it every trial);
        ``quantizing``: refuse what no INT8 target can carry (the float model still runs in benchmarks)."""
        if isinstance(model, LiteRTModel):
            raise UnsupportedModelError(
                "This model is already a LiteRT model; quantize the Keras model it came from instead."
            )
        if is_keras_model(model):
            check_keras_backend()
        cached = self._graphs.get(id(model))
        if cached is not None and cached[0] is model:
            graph = cached[1]
        else:
            graph = prepare_graph(check_keras_model(model))
            self._graphs = {id(model): (model, graph)}  # one entry: never keep an old model alive
        if quantizing:
            refuse_table_layers(graph.model, graph.layer_names if graph.renamed else ())
        return graph

    def describe(self, model: Any, config: QuantConfig) -> TuningSpace:
        if self._target(model, config.format) == "savedmodel":
            _check_static(config)
            return describe_plan(self._plan(model))
        return describe_graph(self._graph(model), config.approach)

    def calibrate(self, model: Any, dataset: Dataset, config: QuantConfig) -> TfCalibration | GraphCalibration:
        if self._target(model, config.format) == "savedmodel":
            return calibrate_plan(self._plan(model), dataset, samples=config.calib_samples, model_id=id(model))
        return collect(self._graph(model), dataset, samples=config.calib_samples, model_id=id(model))

    def quantize(self, model: Any, config: QuantConfig, *, calibration: Any | None, inplace: bool = False) -> Any:
        if self._target(model, config.format) == "savedmodel":
            _check_static(config)
            if not isinstance(calibration, GraphCalibration):
                raise CalibrationError(
                    f"The tf backend's savedmodel target got calibration of type {type(calibration).__name__}; pass "
                    "the object TfBackend.calibrate returned for the same QuantConfig.format."
                )
            return quantize_plan(self._plan(model), config, calibration)
        graph = self._graph(model)
        if config.approach == "dynamic":
            return quantize_dynamic(graph, config)
        if not isinstance(calibration, TfCalibration):
            raise CalibrationError(
                f"The tf backend got calibration of type {type(calibration).__name__}; pass the object "
                "TfBackend.calibrate returned (static quantization needs calibration data)."
            )
        return quantize_static(graph, config, calibration)

    def check_quantized_runs(self, model: Any, quantized: Any, dataset: Dataset) -> None:
        """Run a dynamic-range LiteRT model on the dataset's first batch (see :meth:`Backend.check_quantized_runs`)."""
        from inc_tf._keras_model import as_input_list
        from inc_tf._litert import check_runs

        if not isinstance(quantized, LiteRTModel):
            return
        batch = next(dataset.inputs(limit=1))  # Dataset.inputs raises DatasetError itself when it holds none
        check_runs(quantized, as_input_list(batch, self._graph(model), where="the first batch"), "the first batch of the dataset")

    def op_errors(self, model: Any, config: QuantConfig, *, calibration: Any | None, dataset: Dataset) -> dict[str, float]:
        from inc_tf.ptq._op_errors import layer_output_errors, unit_output_errors

        if self._target(model, config.format) == "savedmodel":
            _check_static(config)
            plan = self._plan(model)
            if not isinstance(calibration, GraphCalibration):
                calibration = calibrate_plan(plan, dataset, samples=config.calib_samples, model_id=id(model))
            return unit_output_errors(plan, config, quantize_plan(plan, config, calibration, probe=True), dataset)
        graph = self._graph(model)
        if config.approach != "static":
            raise NotImplementedError("per-layer errors are measured for approach='static' only on the tf backend")
        if not isinstance(calibration, TfCalibration):
            calibration = self.calibrate(model, dataset, config)
        quantized = quantize_static(graph, config, calibration)
        return layer_output_errors(graph, config, calibration, quantized, dataset)

    def weights_digest(self, model: Any) -> str | None:
        if is_keras_model(model):
            return array_digest([(weight.path, np.asarray(weight.numpy())) for weight in model.weights])
        return super().weights_digest(model)  # a saved model's files (.keras, SavedModel directory)

    def int8_op_counts(self, model: Any) -> dict[str, int] | None:
        """LiteRT ops (by builtin name) that read or write int8 tensors, QUANTIZE/DEQUANTIZE/SHAPE left out; for a
        SavedModel, the TF nodes that run int8 kernels (QuantizeV2/Dequantize left out)."""
        if isinstance(model, TFSavedModel):
            counts_tf: dict[str, int] = {}
            for node in model.int8_nodes():
                counts_tf[node.op] = counts_tf.get(node.op, 0) + 1
            return counts_tf
        if not isinstance(model, LiteRTModel):
            return None
        from inc_tf._flatbuffer import op_records

        counts: dict[str, int] = {}
        for record in op_records(model.content):
            # SHAPE reads only an int8 tensor's dimensions (a Reshape's target built for a free batch size)
            if record.op not in ("QUANTIZE", "DEQUANTIZE", "SHAPE") and "int8" in (*record.input_dtypes, *record.output_dtypes):
                counts[record.op] = counts.get(record.op, 0) + 1
        return counts

    def save(self, model: Any, path: Path) -> None:
        if isinstance(model, TFSavedModel):
            model.save(path)
            return
        if isinstance(model, LiteRTModel):
            if path.suffix.lower() != ".tflite":  # inc.load finds the backend, and LiteRT tools the format, by it
                raise SaveError(f"A LiteRT model is saved as a .tflite file; got {str(path)!r}. Use a .tflite path.")
            path.write_bytes(model.content)
            return
        if is_keras_model(model):
            if path.suffix != ".keras":
                raise SaveError(f"A Keras model is saved as a .keras file; got {str(path)!r}. Use a .keras path.")
            model.save(path)
            return
        raise SaveError(
            f"The tf backend cannot save a {type(model).__qualname__}; expected a TFSavedModel, LiteRTModel or keras.Model."
        )

    def file_suffix(self, model: Any) -> str:
        if isinstance(model, TFSavedModel):
            return ".savedmodel"  # a SavedModel directory; any directory holding saved_model.pb loads too
        return ".keras" if is_keras_model(model) else ".tflite"

    def load(self, path: Path) -> Any:
        if is_savedmodel_dir(path):
            return TFSavedModel.load(path)
        if path.suffix.lower() == ".tflite":
            return LiteRTModel(content=path.read_bytes())
        if path.suffix.lower() in (".keras", ".h5"):
            return load_keras_file(path)
        raise ModelLoadError(
            f"The tf backend reads SavedModel directories and .tflite, .keras and .h5 files; got {str(path)!r}."
        )

    def runner(self, model: Any, inputs: Any, *, threads: int | None = None) -> Callable[[], Any]:
        if isinstance(model, (str, Path)):
            model = self.load(Path(model))
        if isinstance(model, TFSavedModel):
            import tensorflow as tf

            if threads:
                _set_tf_threads(threads)
            fn = model.function
            tensors = [tf.constant(a) for a in model.feeds(inputs)]
            return lambda: fn(*tensors)
        if is_savedmodel_object(model):
            model = TFSavedModel.from_frozen(freeze_savedmodel(model))
        if isinstance(model, LiteRTModel):
            run = model.signature_runner(threads=threads)
            feeds = model.feeds(inputs)
            return lambda: run(**feeds)
        keras_model = check_keras_model(model)
        graph = self._graph(keras_model, quantizing=False)
        arrays = as_input_list(inputs, graph, where="benchmark inputs")
        import tensorflow as tf

        if threads:
            _set_tf_threads(threads)
        tensors = [tf.constant(a) for a in arrays]
        fn = tf.function(lambda *xs: keras_model(list(xs) if len(xs) > 1 else xs[0], training=False))
        return lambda: fn(*tensors)

    def version(self) -> str:
        import keras
        import tensorflow as tf

        from inc_tf import __version__

        return f"inc-tf {__version__} (tensorflow {tf.__version__}, keras {keras.__version__})"


def _is_savedmodel_input(model: Any) -> bool:
    return is_savedmodel_dir(model) or is_savedmodel_object(model) or isinstance(model, TFSavedModel)


def _check_static(config: QuantConfig) -> None:
    if config.approach != "static":
        raise ConfigError(
            f"QuantConfig: approach={config.approach!r} is not supported by the tf backend's savedmodel target, which "
            "runs static int8 kernels with calibrated ranges. Use approach='static', or format='tflite' for dynamic."
        )


def _set_tf_threads(threads: int) -> None:
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # already initialized: TF keeps the first setting for the process
        pass


