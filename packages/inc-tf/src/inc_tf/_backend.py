"""TfBackend: the inc backend SPI for Keras 3 models (TensorFlow backend) with LiteRT int8 output."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from inc_core import Dataset, QuantConfig
from inc_core.backend import Backend, TuningSpace
from inc_core.errors import CalibrationError, ModelLoadError, SaveError, UnsupportedModelError
from inc_tf._calibrate import TfCalibration, collect
from inc_tf._keras_model import (
    KerasGraph,
    as_input_list,
    check_keras_backend,
    check_keras_model,
    is_keras_model,
    load_keras_file,
    prepare_graph,
)
from inc_tf._litert import LiteRTModel
from inc_tf._quantize import describe_graph, quantize_dynamic, quantize_static

__all__ = ["TfBackend"]

_FILE_SUFFIXES = (".keras", ".h5", ".tflite")


class TfBackend(Backend):
    """Quantizes Keras 3 models (functional, Sequential, traceable subclassed) to int8 LiteRT models.

    Format ``"tflite"``: an int8 ``.tflite`` flatbuffer from the TF converter, with every activation
    range chosen by inc's observers, run by the ``ai-edge-litert`` interpreter. Quantized models are
    :class:`~inc_tf.LiteRTModel` objects; ``inc.save`` writes them as ``.tflite`` files.
    """

    name: ClassVar[str] = "tf"
    package: ClassVar[str] = "inc-tf"
    formats: ClassVar[tuple[str, ...]] = ("tflite",)

    def __init__(self) -> None:
        self._graphs: dict[int, tuple[Any, KerasGraph]] = {}

    def accepts(self, model: Any) -> bool:
        if isinstance(model, (str, Path)):
            return Path(model).suffix.lower() in _FILE_SUFFIXES
        return is_keras_model(model) or isinstance(model, LiteRTModel)

    def _graph(self, model: Any) -> KerasGraph:
        """The converter's view of ``model``, built once per model object (tuning asks for it every trial)."""
        if isinstance(model, LiteRTModel):
            raise UnsupportedModelError(
                "This model is already a LiteRT model; quantize the Keras model it came from instead."
            )
        if is_keras_model(model):
            check_keras_backend()
        cached = self._graphs.get(id(model))
        if cached is not None and cached[0] is model:
            return cached[1]
        graph = prepare_graph(check_keras_model(model))
        self._graphs = {id(model): (model, graph)}  # one entry: never keep an old model alive
        return graph

    def describe(self, model: Any, config: QuantConfig) -> TuningSpace:
        return describe_graph(self._graph(model), config.approach)

    def calibrate(self, model: Any, dataset: Dataset, config: QuantConfig) -> TfCalibration:
        return collect(self._graph(model), dataset, samples=config.calib_samples, model_id=id(model))

    def quantize(self, model: Any, config: QuantConfig, *, calibration: Any | None, inplace: bool = False) -> Any:
        self.check_format(config.format)
        graph = self._graph(model)
        if config.approach == "dynamic":
            return quantize_dynamic(graph, config)
        if not isinstance(calibration, TfCalibration):
            raise CalibrationError(
                f"The tf backend got calibration of type {type(calibration).__name__}; pass the object "
                "TfBackend.calibrate returned (static quantization needs calibration data)."
            )
        return quantize_static(graph, config, calibration)

    def op_errors(self, model: Any, config: QuantConfig, *, calibration: Any | None, dataset: Dataset) -> dict[str, float]:
        from inc_tf._op_errors import layer_output_errors

        graph = self._graph(model)
        if config.approach != "static":
            raise NotImplementedError("per-layer errors are measured for approach='static' only on the tf backend")
        if not isinstance(calibration, TfCalibration):
            calibration = self.calibrate(model, dataset, config)
        quantized = quantize_static(graph, config, calibration)
        return layer_output_errors(graph, config, calibration, quantized, dataset)

    def int8_op_counts(self, model: Any) -> dict[str, int] | None:
        """LiteRT ops (by builtin name) that read or write int8 tensors, QUANTIZE/DEQUANTIZE left out."""
        if not isinstance(model, LiteRTModel):
            return None
        from inc_tf._flatbuffer import op_records

        counts: dict[str, int] = {}
        for record in op_records(model.content):
            if record.op not in ("QUANTIZE", "DEQUANTIZE") and "int8" in (*record.input_dtypes, *record.output_dtypes):
                counts[record.op] = counts.get(record.op, 0) + 1
        return counts

    def save(self, model: Any, path: Path) -> None:
        if isinstance(model, LiteRTModel):
            path.write_bytes(model.content)
            return
        if is_keras_model(model):
            if path.suffix != ".keras":
                raise SaveError(f"A Keras model is saved as a .keras file; got {str(path)!r}. Use a .keras path.")
            model.save(path)
            return
        raise SaveError(f"The tf backend cannot save a {type(model).__qualname__}; expected a LiteRTModel or keras.Model.")

    def file_suffix(self, model: Any) -> str:
        return ".keras" if is_keras_model(model) else ".tflite"

    def load(self, path: Path) -> Any:
        if path.suffix.lower() == ".tflite":
            return LiteRTModel(content=path.read_bytes())
        if path.suffix.lower() in (".keras", ".h5"):
            return load_keras_file(path)
        raise ModelLoadError(f"The tf backend reads .tflite, .keras and .h5 files; got {str(path)!r}.")

    def runner(self, model: Any, inputs: Any, *, threads: int | None = None) -> Callable[[], Any]:
        if isinstance(model, (str, Path)):
            model = self.load(Path(model))
        if isinstance(model, LiteRTModel):
            run = model.signature_runner(threads=threads)
            feeds = model.feeds(inputs)
            return lambda: run(**feeds)
        keras_model = check_keras_model(model)
        graph = self._graph(keras_model)
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


def _set_tf_threads(threads: int) -> None:
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # already initialized: TF keeps the first setting for the process
        pass


