"""Trial: the plain-JSON record of one evaluated (or failed) config."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from inc_core._quant_config import QuantConfig
from inc_core.errors import TuningError
from inc_core.tuning._space import describe_delta

__all__ = ["Trial", "TRIAL_STATUSES", "describe_failure", "trial_score"]

# "evaluated": quantized and scored in this run; "failed": the backend could not quantize the config in
# this run; "resumed": read back from the history file (a resumed trial keeps its score or its error).
TRIAL_STATUSES = ("evaluated", "failed", "resumed")
# Longest error text kept per trial: enough for the exception's first lines, small enough for a JSON record.
MAX_ERROR_CHARS = 2000


def describe_failure(exc: BaseException) -> str:
    """The cause of a failed trial as one line of plain text: the exception's type and message."""
    message = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


@dataclass(frozen=True, kw_only=True)
class Trial:
    """One tuning trial, as written to the history file and the report.

    A *failed* trial is one the backend could not quantize (its quantizer raised): it has no score,
    never meets the goal, and :attr:`error` says why. Strategies treat it like a trial below the goal.

    Attributes:
        id: 1-based position in the run.
        config: the full QuantConfig as JSON (``QuantConfig.to_dict()``); ``quant_config`` rebuilds it.
        delta: only what differs from the base config (see :attr:`change`).
        score: what ``eval_fn`` returned for the quantized model; ``None`` for a failed trial.
        met: whether ``score`` meets the accuracy goal (``False`` for a failed trial).
        time_s: seconds spent quantizing and evaluating this config.
        status: ``"evaluated"`` or ``"failed"`` in this run, or ``"resumed"`` from the history file.
        error: for a failed trial, the cause (exception type and message); ``None`` otherwise.
        worker: where a parallel executor ran the trial (``host:pid``); ``None`` in this process.
    """

    id: int
    config: dict[str, Any]
    delta: dict[str, Any]
    score: float | None
    met: bool
    time_s: float
    status: str = "evaluated"
    error: str | None = None
    worker: str | None = None

    @property
    def failed(self) -> bool:
        """True when the backend could not produce a model for this config (see :attr:`error`)."""
        return self.error is not None

    @property
    def quant_config(self) -> QuantConfig:
        """The trial's config as a :class:`~inc_core.QuantConfig`."""
        return QuantConfig.from_dict(self.config)

    @property
    def key(self) -> str:
        """Canonical JSON of the config: equal configs, equal keys."""
        return json.dumps(self.config, sort_keys=True)

    @property
    def change(self) -> str:
        """The delta as one readable line (``"base"`` for the base config)."""
        return describe_delta(self.delta)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "config": self.config,
            "delta": self.delta,
            "score": self.score,
            "met": self.met,
            "time_s": self.time_s,
            "status": self.status,
            "error": self.error,
            **({"worker": self.worker} if self.worker is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Trial:
        """Rebuild a trial from :meth:`to_dict` output.

        Raises:
            TuningError: a field is missing or of the wrong type (the history loader reports it).
            ConfigError: the config is one this inc rejects.
        """
        if not isinstance(data, Mapping):
            raise TuningError(f"a trial must be a JSON object, got {type(data).__name__}")
        missing = [k for k in ("id", "config", "score") if k not in data]
        if missing:
            raise TuningError(f"trial {data.get('id', '?')} lacks {missing}")
        score, error = data["score"], data.get("error")
        if error is not None and (not isinstance(error, str) or score is not None):
            raise TuningError(f"trial {data['id']} has error {error!r} with score {score!r}; a failed trial has a text cause and no score")
        if error is None and (isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score)):
            raise TuningError(f"trial {data['id']} has score {score!r}; expected a finite number")
        if not isinstance(data["config"], Mapping):
            raise TuningError(f"trial {data['id']} config must be a JSON object")
        config = QuantConfig.from_dict(data["config"]).to_dict()  # re-validates; ConfigError is a ValueError
        delta = data.get("delta", {})
        time_s = data.get("time_s", 0.0)
        if not isinstance(delta, Mapping) or isinstance(time_s, bool) or not isinstance(time_s, (int, float)):
            raise TuningError(f"trial {data['id']} has a malformed delta or time_s")
        status = data.get("status", "evaluated")
        return cls(
            id=int(data["id"]),
            config=config,
            delta=dict(delta),
            score=None if error is not None else float(score),
            met=error is None and bool(data.get("met", False)),
            time_s=float(time_s),
            status=status if status in TRIAL_STATUSES else ("failed" if error is not None else "evaluated"),
            error=error,
            worker=data["worker"] if isinstance(data.get("worker"), str) else None,
        )


def trial_score(trial: Trial) -> float:
    """The score of a trial that produced a model (callers filter failed trials out first)."""
    assert trial.score is not None, f"trial {trial.id} failed ({trial.error}) and has no score"
    return trial.score
