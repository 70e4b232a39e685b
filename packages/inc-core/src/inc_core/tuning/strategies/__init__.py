"""Tuning strategies, registered by name: ``TuningConfig(strategy=name)`` selects one."""

from __future__ import annotations

from inc_core.tuning.strategies._base import Strategy, StrategyContext
from inc_core.tuning.strategies._basic import BasicStrategy
from inc_core.tuning.strategies._bayesian import BayesianStrategy
from inc_core.tuning.strategies._conservative import ConservativeStrategy
from inc_core.tuning.strategies._exhaustive import ExhaustiveStrategy
from inc_core.tuning.strategies._mse import MseStrategy
from inc_core.tuning.strategies._random import RandomStrategy

__all__ = [
    "REGISTRY",
    "BasicStrategy",
    "BayesianStrategy",
    "ConservativeStrategy",
    "ExhaustiveStrategy",
    "MseStrategy",
    "RandomStrategy",
    "Strategy",
    "StrategyContext",
]

# name -> class; the engine looks strategies up here (no chain of ifs over names).
REGISTRY: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (BasicStrategy, MseStrategy, BayesianStrategy, RandomStrategy, ExhaustiveStrategy, ConservativeStrategy)
}
