"""The trial history: this run's trials, an earlier run's trials read back, and the JSON file behind both."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from inc_core._files import atomic_write_text, check_output_path
from inc_core._quant_config import QuantConfig
from inc_core.errors import TuningError
from inc_core.tuning._criterion import Criterion
from inc_core.tuning._trial import Trial

__all__ = ["History", "HISTORY_VERSION"]

HISTORY_VERSION = 1


class History:
    """What the strategies read (scores of the configs they proposed) and what the engine persists.

    The file is ``{"version", "backend", "strategy", "model_fingerprint", "weights_digest", "baseline", "trials": [...]}``,
    rewritten atomically after every trial, so a run killed at any point leaves a readable file.
    Trials are keyed by the canonical JSON of their config.

    Args:
        path: the history file, or ``None`` to keep trials in memory only.
        fingerprint: identifies the model (its ops); a file written for another model is refused.
        weights: a hash of the model's weights (``None`` where the backend cannot tell them); a file written
            for other weights is refused (files without one, from earlier versions, are read).
        backend: the backend's name, recorded for the reader.
        strategy: the strategy's name, recorded for the reader.

    Raises:
        SaveError: the file's directory does not exist.
        TuningError: the file exists but cannot be read as a history of this model.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        fingerprint: str,
        backend: str,
        strategy: str,
        weights: str | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.fingerprint = fingerprint
        self.weights = weights
        self._meta = {"backend": backend, "strategy": strategy}
        self._trials: list[Trial] = []
        self._by_key: dict[str, Trial] = {}
        self._stored: dict[str, Trial] = {}
        self._baseline: float | None = None
        self._criterion: Criterion | None = None
        if self.path is not None:
            check_output_path(self.path, what="tuning history")
            if self.path.exists():
                self._load(self.path)

    # --- reading --------------------------------------------------------------------------------
    def _fail(self, reason: str) -> TuningError:
        return TuningError(
            f"Cannot resume from the tuning history {str(self.path)!r}: {reason}. Delete or move the file to "
            "start a new search, or pass TuningConfig(history=...) with another path."
        )

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._fail(f"it is not readable JSON ({exc})") from exc
        if not isinstance(data, dict) or not isinstance(data.get("trials"), list):
            raise self._fail("expected a JSON object with a 'trials' list")
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version > HISTORY_VERSION:
            raise self._fail(f"its version is {version!r}; this inc reads versions <= {HISTORY_VERSION}")
        stored_print = data.get("model_fingerprint")
        if stored_print is not None and stored_print != self.fingerprint:
            raise self._fail(
                f"it was written for a different model (fingerprint {stored_print!r}, this model {self.fingerprint!r})"
            )
        stored_weights = data.get("weights_digest")
        if stored_weights is not None and self.weights is not None and stored_weights != self.weights:
            # Same ops, other weights (retrained, fine-tuned): the stored scores were measured on the old ones.
            raise self._fail(
                "it was written for this architecture with other weights (a retrained or fine-tuned model), whose "
                "baseline and trial scores do not hold for these"
            )
        baseline = data.get("baseline")
        if baseline is not None:
            if isinstance(baseline, bool) or not isinstance(baseline, (int, float)) or not math.isfinite(baseline):
                raise self._fail(f"its baseline is {baseline!r}, not a finite number")
            self._baseline = float(baseline)
        for index, raw in enumerate(data["trials"]):
            try:
                trial = Trial.from_dict(raw)
            except (TuningError, ValueError, TypeError) as exc:  # ConfigError is a ValueError: a config this inc rejects
                raise self._fail(f"trial #{index + 1} is malformed ({exc})") from exc
            self._stored.setdefault(trial.key, trial)

    @property
    def baseline(self) -> float | None:
        """The baseline read from the file or set in this run (``None`` before either)."""
        return self._baseline

    @property
    def criterion(self) -> Criterion:
        """The accuracy criterion of this run (set by the engine once the baseline is known)."""
        if self._criterion is None:
            raise TuningError("History.criterion: the criterion is set once the baseline has been evaluated.")
        return self._criterion

    @property
    def trials(self) -> tuple[Trial, ...]:
        """This run's trials, in order (resumed ones included)."""
        return tuple(self._trials)

    @property
    def resumable(self) -> int:
        """How many trials the file held when it was opened."""
        return len(self._stored)

    def get(self, config: QuantConfig) -> Trial | None:
        """This run's trial of ``config``, if it has been evaluated (or resumed)."""
        return self._by_key.get(config.to_json())

    def score(self, config: QuantConfig) -> float | None:
        """The score of ``config`` in this run, ``None`` when it has not been tried."""
        trial = self.get(config)
        return trial.score if trial is not None else None

    def stored(self, config: QuantConfig) -> Trial | None:
        """The trial of ``config`` recorded by an earlier run, if any."""
        return self._stored.get(config.to_json())

    # --- writing --------------------------------------------------------------------------------
    def start(self, baseline: float, criterion: Criterion) -> None:
        """Record the baseline (written to the file at once, so a resumed run need not evaluate it again)."""
        self._baseline = baseline
        self._criterion = criterion
        self._write()

    def add(self, trial: Trial) -> None:
        """Append a trial and rewrite the file."""
        self._trials.append(trial)
        self._by_key[trial.key] = trial
        self._write()

    def to_dict(self) -> dict[str, Any]:
        # Stored trials this run has not reached yet stay in the file, so a run killed again loses nothing.
        pending = [t.to_dict() for key, t in self._stored.items() if key not in self._by_key]
        return {
            "version": HISTORY_VERSION,
            **self._meta,
            "model_fingerprint": self.fingerprint,
            "weights_digest": self.weights,
            "baseline": self._baseline,
            "trials": [t.to_dict() for t in self._trials] + pending,
        }

    def _write(self) -> None:
        if self.path is not None:
            atomic_write_text(self.path, json.dumps(self.to_dict(), indent=1), what="tuning history")
