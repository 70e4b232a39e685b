"""Accuracy-driven tuning: search quantization configs until the model scores close enough to FP32.

``autotune`` evaluates the FP32 baseline, calibrates once, and lets a strategy propose configs
(op-type settings as ``overrides``, FP32 fallback as ``exclude``) that an executor quantizes and
scores. Trials are plain JSON, persisted after each one so an interrupted run resumes.
"""

from __future__ import annotations

from inc_core.tuning._criterion import Criterion
from inc_core.tuning._engine import autotune
from inc_core.tuning._executor import Executor, SequentialExecutor
from inc_core.tuning._history import History
from inc_core.tuning._ray_executor import RayExecutor
from inc_core.tuning._result import TuningResult
from inc_core.tuning._space import SearchSpace, Tunable
from inc_core.tuning._trial import Trial
from inc_core.tuning.strategies import REGISTRY as STRATEGY_REGISTRY
from inc_core.tuning.strategies import Strategy, StrategyContext

__all__ = [
    "STRATEGY_REGISTRY",
    "Criterion",
    "Executor",
    "History",
    "RayExecutor",
    "SearchSpace",
    "SequentialExecutor",
    "Strategy",
    "StrategyContext",
    "Trial",
    "Tunable",
    "TuningResult",
    "autotune",
]
