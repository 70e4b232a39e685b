"""inc-tf: INT8 quantization and quantization-aware training for Keras 3 models on TensorFlow.

The backend registers under the ``inc_core.backends`` entry points ``keras`` (Keras models and
``.keras`` files), ``tensorflow``, ``tflite`` (``.tflite`` files) and ``inc_tf`` (the LiteRT models it
returns), ``savedmodel``/``pb`` (SavedModel directories), so ``inc.quantize``, ``inc.autotune``,
``inc.save``/``inc.load`` and ``inc.benchmark`` take Keras models and SavedModels directly. Two int8
targets (``QuantConfig(format=...)``): ``"savedmodel"``, a :class:`TFSavedModel` running TensorFlow's own
oneDNN INT8 kernels, saved as a SavedModel directory; and ``"tflite"``, a :class:`LiteRTModel` run by the
``ai-edge-litert`` interpreter.

Training-loop compression: ``model.fit(..., callbacks=[PruningCallback(inc.PruneConfig(...))])`` then
``strip``/``sparsity_report`` for pruning, and ``Distiller(student, teacher, inc.DistillConfig(...))``
for knowledge distillation with ``compile``/``fit``.
"""

from __future__ import annotations

from inc_tf._backend import TfBackend
from inc_tf._litert import METADATA_KEY, LiteRTModel
from inc_tf._savedmodel import TFSavedModel
from inc_tf.distill import Distiller
from inc_tf.prune import PruningCallback, sparsity_report, strip
from inc_tf.ptq._calibrate import TfCalibration
from inc_tf.qat._convert import convert
from inc_tf.qat._fake_quant import FakeQuant
from inc_tf.qat._qat import QATCallback, prepare_qat

__version__ = "0.1.0"

__all__ = [
    "METADATA_KEY",
    "Distiller",
    "FakeQuant",
    "LiteRTModel",
    "PruningCallback",
    "QATCallback",
    "TFSavedModel",
    "TfBackend",
    "TfCalibration",
    "__version__",
    "convert",
    "prepare_qat",
    "sparsity_report",
    "strip",
]
