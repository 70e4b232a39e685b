"""inc: post-training quantization, QAT, pruning, distillation and accuracy-driven tuning, one API for every framework.

``import inc_core as inc`` gives the whole public surface; framework plugins register backends
under the ``inc_core.backends`` entry-point group and are loaded only when a model needs them.
"""

from __future__ import annotations

import logging

from inc_core import calibration, errors, metrics, sparsity
from inc_core._api import describe, load, quantize, save
from inc_core._benchmark import BenchmarkResult, LatencyStats, benchmark, benchmark_callable
from inc_core._dataset import Dataset
from inc_core._distill_config import DistillConfig
from inc_core._layer_filter import LayerFilter
from inc_core._prune_config import PruneConfig
from inc_core._quant_config import CALIBRATIONS, QATConfig, QuantConfig
from inc_core._registry import get_backend, installed_backends, register_backend, resolve_backend
from inc_core._smooth_quant_config import SmoothQuant
from inc_core._tuning_config import TuningConfig
from inc_core.backend import Backend, Op, TuningSpace
from inc_core.tuning import Trial, TuningResult, autotune

__version__ = "0.1.0"

# Library use is quiet by default; the CLI attaches a handler.
logging.getLogger("inc").addHandler(logging.NullHandler())

__all__ = [
    "CALIBRATIONS",
    "Backend",
    "BenchmarkResult",
    "Dataset",
    "DistillConfig",
    "LatencyStats",
    "LayerFilter",
    "Op",
    "PruneConfig",
    "QATConfig",
    "QuantConfig",
    "SmoothQuant",
    "Trial",
    "TuningConfig",
    "TuningResult",
    "TuningSpace",
    "__version__",
    "autotune",
    "benchmark",
    "benchmark_callable",
    "calibration",
    "describe",
    "errors",
    "get_backend",
    "installed_backends",
    "load",
    "metrics",
    "quantize",
    "register_backend",
    "resolve_backend",
    "save",
    "sparsity",
]
