"""The executor seam: how a batch of candidate configs is turned into trial outcomes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from inc_core._tuning_config import TuningConfig

__all__ = ["Executor", "SequentialExecutor", "executor_for"]

C = TypeVar("C")
R = TypeVar("R")


@runtime_checkable
class Executor(Protocol):
    """Runs the engine's trial function over a batch of candidates.

    ``map`` must yield one result per candidate, in the candidates' order. The engine reads the
    results one at a time and stops reading as soon as it has what it needs (a passing trial, the
    trial budget, the timeout), so a lazy executor never runs the rest of the batch; a parallel
    one (a process pool, a Ray cluster) may run the whole batch at once and the engine ignores
    the results it no longer needs. The function it is given is self-contained: it quantizes one
    config with the calibration already collected and evaluates it.

    Optional members the engine uses when present: ``description`` (a line for the log and the
    report), ``in_flight`` (trials running now, shown in the progress bar), ``workers`` (how many
    trials run at once: the batch size hint for strategies) and ``close()`` (called when ``autotune``
    created the executor from the TuningConfig). An executor that loses a trial (a worker process
    died) calls ``fn.failure(candidate, reason)`` when ``fn`` has it, to yield a failed-trial result.
    """

    def map(self, fn: Callable[[C], R], candidates: Sequence[C]) -> Iterable[R]:
        """Results of ``fn`` for each candidate, in order."""
        ...


class SequentialExecutor:
    """The default executor: one trial at a time, in this process, only as far as the engine reads."""

    description = "sequential (in this process)"
    workers = 1

    def map(self, fn: Callable[[C], R], candidates: Sequence[C]) -> Iterable[R]:
        return (fn(candidate) for candidate in candidates)


def executor_for(config: TuningConfig) -> Executor:
    """The executor ``TuningConfig.executor`` names (Ray is imported only for ``"ray"``).

    Raises:
        BackendNotFoundError: ``executor="ray"`` without Ray installed.
        TuningError: the Ray cluster cannot be reached.
    """
    if config.executor == "ray":
        from inc_core.tuning._ray_executor import RayExecutor

        return RayExecutor(workers=config.workers, address=config.address)
    return SequentialExecutor()
