"""inc-mxnet: accuracy-driven INT8 quantization of MXNet Gluon models through oneDNN (MKLDNN).

The backend registers under the ``inc_core.backends`` entry point ``mxnet``, so ``inc.quantize``,
``inc.autotune``, ``inc.benchmark``, ``inc.save``/``inc.load`` and the ``inc`` command line take a
Gluon ``HybridBlock`` directly and give back an INT8 ``gluon.SymbolBlock``. Saved models are MXNet's
own export, which ``gluon.SymbolBlock.imports`` reads without inc.
"""

from __future__ import annotations

from inc_mxnet._backend import MODEL_SUFFIX, MxnetBackend
from inc_mxnet._collect import MxnetCalibration
from inc_mxnet._quantize import mxnet_dtype

__version__ = "0.1.0"

__all__ = ["MODEL_SUFFIX", "MxnetBackend", "MxnetCalibration", "__version__", "mxnet_dtype"]
