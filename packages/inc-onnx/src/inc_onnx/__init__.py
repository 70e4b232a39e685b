"""inc-onnx: accuracy-driven INT8 quantization of ONNX models for ONNX Runtime.

The backend registers under the ``inc_core.backends`` entry point ``onnx``, so ``inc.quantize``,
``inc.autotune``, ``inc.benchmark`` and the ``inc`` command line take ``onnx.ModelProto`` models
and ``.onnx`` paths directly. This package adds sessions suited to the INT8 model, on ONNX Runtime's CPU
provider or on OpenVINO (``pip install 'inc-onnx[openvino]'``), chosen by measurement unless named.
"""

from __future__ import annotations

from inc_onnx._backend import OnnxBackend
from inc_onnx.ptq._collect import OnnxCalibration
from inc_onnx.ptq._quantize import METADATA_KEY
from inc_onnx.runtime._openvino import OpenVinoSession
from inc_onnx.runtime._runtime import RUNTIMES, RuntimeChoice, choose_runtime
from inc_onnx.runtime._session import create_session, session_options

__version__ = "0.1.0"

__all__ = [
    "METADATA_KEY",
    "RUNTIMES",
    "OnnxBackend",
    "OnnxCalibration",
    "OpenVinoSession",
    "RuntimeChoice",
    "__version__",
    "choose_runtime",
    "create_session",
    "session_options",
]
