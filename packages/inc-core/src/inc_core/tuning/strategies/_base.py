"""The Strategy base class: proposes batches of configs, reads their scores back from the history."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from inc_core._quant_config import QuantConfig
from inc_core._tuning_config import TuningConfig
from inc_core.backend import Backend
from inc_core.errors import TuningError
from inc_core.tuning._history import History
from inc_core.tuning._space import SearchSpace
from inc_core.tuning._trial import Trial, trial_score

__all__ = ["Strategy", "StrategyContext"]


@dataclass(frozen=True, kw_only=True)
class StrategyContext:
    """What a strategy may use besides the history.

    Attributes:
        space: builds configs from op-type settings and fallback sets.
        config: the user's TuningConfig (seed, keep_searching, higher_is_better, ...).
        backend: the backend tuning runs on.
        op_errors: per-op output error of a config (``Backend.op_errors`` with the run's calibration and data).
        batch_size: how many trials the executor runs at once; a strategy that could propose one config
            at a time (bayesian) proposes this many per batch so parallel workers stay busy.
    """

    space: SearchSpace
    config: TuningConfig
    backend: Backend
    op_errors: Callable[[QuantConfig], Mapping[str, float]]
    batch_size: int = 1


class Strategy(abc.ABC):
    """A search over :class:`~inc_core.tuning.SearchSpace` points.

    The engine calls :meth:`propose` until it returns ``[]`` or it decides to stop. Each call
    returns a batch of configs that the engine evaluates (through its executor, possibly in
    parallel) before calling again, so a strategy reads the scores of its previous batch from
    the history it is given. Subclasses write their search as the generator :meth:`search`,
    one ``yield`` per batch; the generator's state carries over between calls.

    Class attributes:
        name: the name ``TuningConfig(strategy=...)`` selects it by.
        stops_at_first_met: whether the engine may stop at the first passing trial. A strategy that
            starts from a trivially passing config (``conservative``) sets it to ``False`` and says
            which passing trial is the answer through :meth:`pick`.
    """

    name: ClassVar[str]
    stops_at_first_met: ClassVar[bool] = True

    def __init__(self, context: StrategyContext) -> None:
        self.context = context
        self.space = context.space
        self._history: History | None = None
        self._batches: Iterator[list[QuantConfig]] | None = None

    @property
    def history(self) -> History:
        """The history given to the latest :meth:`propose` call."""
        if self._history is None:
            raise TuningError(f"{type(self).__name__}.history: the history is available once propose() has been called.")
        return self._history

    def propose(self, history: History) -> list[QuantConfig]:
        """The next batch of configs to evaluate; ``[]`` once the strategy has nothing left to try."""
        self._history = history
        if self._batches is None:
            self._batches = self.search()
        for batch in self._batches:
            if batch:
                return list(batch)
        return []

    @abc.abstractmethod
    def search(self) -> Iterator[list[QuantConfig]]:
        """Yield batches of configs; after each ``yield`` their scores are in :attr:`history`."""

    def pick(self, passing: Sequence[Trial]) -> Trial:
        """Which of the passing trials is the result: the best score, the earliest on ties."""
        return self.history.criterion.best(passing, trial_score)

    def close(self) -> None:
        """Release what the search holds (runs the generator's ``finally`` blocks)."""
        if self._batches is not None and hasattr(self._batches, "close"):
            self._batches.close()

    # --- helpers for subclasses -------------------------------------------------------------------
    def score_of(self, config: QuantConfig) -> float | None:
        """The score of a config proposed earlier (``None`` if the engine did not evaluate it, or it failed)."""
        return self.history.score(config)
