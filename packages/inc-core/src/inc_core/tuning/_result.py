"""TuningResult: the chosen model and config, the baseline, and every trial."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inc_core._quant_config import QuantConfig
from inc_core._tuning_config import TuningConfig
from inc_core.backend import Backend
from inc_core.tuning._criterion import Criterion
from inc_core.tuning._trial import Trial

__all__ = ["TuningResult", "STOP_REASONS"]

# Why the search ended.
STOP_REASONS = ("met", "max_trials", "timeout", "exhausted")


@dataclass(frozen=True, kw_only=True)
class TuningResult:
    """What :func:`inc_core.autotune` found.

    Attributes:
        model: the quantized model of the chosen trial (never ``None``: when no trial met the goal,
            the best-scoring one).
        config: the chosen trial's QuantConfig; ``inc.quantize(model, config, ...)`` reproduces ``model``.
        baseline: the FP32 model's score.
        score: the chosen trial's score.
        met: whether ``score`` meets the accuracy goal.
        trials: every trial of the run, in order, failed ones included (``Trial.failed``, ``Trial.error``).
        trial_id: the id of the chosen trial.
        threshold: the worst score that meets the goal.
        tuning: the TuningConfig the run used.
        stop_reason: ``"met"``, ``"max_trials"``, ``"timeout"`` or ``"exhausted"``.
        elapsed_s: wall time of the run, baseline included.
        backend: the backend that quantized the model (used by :meth:`save`).
        executor: what ran the trials (``"sequential (in this process)"``, ``"ray (4 workers, ...)"``).
        precisions: op name -> what it runs in under ``config`` (``"int8"``, ``"bf16"`` or ``"fp32"``), for
            every op ``inc.describe`` lists, in model order.
    """

    model: Any = field(repr=False)
    config: QuantConfig
    baseline: float
    score: float
    met: bool
    trials: tuple[Trial, ...] = field(repr=False)
    trial_id: int
    threshold: float
    tuning: TuningConfig = field(repr=False)
    stop_reason: str
    elapsed_s: float = field(repr=False)
    backend: Backend | None = field(default=None, repr=False, compare=False)
    executor: str = field(default="sequential (in this process)", repr=False, compare=False)
    precisions: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def criterion(self) -> Criterion:
        """The accuracy criterion the run used (baseline, tolerance, direction)."""
        return Criterion(
            baseline=self.baseline,
            tolerable_loss=self.tuning.tolerable_loss,
            loss_type=self.tuning.loss_type,
            higher_is_better=self.tuning.higher_is_better,
        )

    @property
    def trial(self) -> Trial:
        """The chosen trial."""
        return next(t for t in self.trials if t.id == self.trial_id)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the chosen model with ``inc.save`` (framework-native format, atomic)."""
        from inc_core._api import save  # the verbs module imports configs only; imported here to keep layers apart

        return save(self.model, path, backend=self.backend)

    def report(self, path: str | os.PathLike[str]) -> Path:
        """Write a markdown summary at ``path``, the same data as JSON beside it (``.json``) and, when
        matplotlib is installed, a plot of the score per trial (``.png``). Returns the markdown path.

        Raises:
            SaveError: the directory does not exist or is not writable (nothing is written).
            ConfigError: ``path`` ends in ``.json`` or ``.png`` (those names are taken by the companions).
        """
        from inc_core.tuning._report import write_report

        return write_report(self, path)

    def to_dict(self) -> dict[str, Any]:
        """The result without the model, as plain JSON."""
        return {
            "backend": self.backend.name if self.backend is not None else None,
            "strategy": self.tuning.strategy,
            "executor": self.executor,
            "criterion": {
                "tolerable_loss": self.tuning.tolerable_loss,
                "loss_type": self.tuning.loss_type,
                "higher_is_better": self.tuning.higher_is_better,
                "threshold": self.threshold,
            },
            "baseline": self.baseline,
            "chosen_trial": self.trial_id,
            "score": self.score,
            "met": self.met,
            "stop_reason": self.stop_reason,
            "failed_trials": sum(1 for t in self.trials if t.failed),
            "elapsed_s": self.elapsed_s,
            "config": self.config.to_dict(),
            "precisions": dict(self.precisions),
            "trials": [t.to_dict() for t in self.trials],
        }
