"""The executor seam: how a batch of candidate configs is turned into trial outcomes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, TypeVar, runtime_checkable

__all__ = ["Executor", "SequentialExecutor"]

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
    """

    def map(self, fn: Callable[[C], R], candidates: Sequence[C]) -> Iterable[R]:
        """Results of ``fn`` for each candidate, in order."""
        ...


class SequentialExecutor:
    """The default executor: one trial at a time, in this process, only as far as the engine reads."""

    def map(self, fn: Callable[[C], R], candidates: Sequence[C]) -> Iterable[R]:
        return (fn(candidate) for candidate in candidates)
