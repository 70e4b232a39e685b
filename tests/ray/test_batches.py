"""Batch sizes follow the executor's worker count without changing what the search tries (no cluster needed)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import _workload

from inc_core.tuning import SequentialExecutor, autotune


class RecordingExecutor(SequentialExecutor):
    """Runs in this process but reports ``workers`` like a parallel executor, and records each batch's size."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.batches: list[int] = []

    def map(self, fn: Callable[[Any], Any], candidates: Sequence[Any]) -> Iterable[Any]:
        self.batches.append(len(candidates))
        return super().map(fn, candidates)


def run(workload: Any, strategy: str, workers: int, **kwargs: Any) -> tuple[Any, list[int]]:
    model, data, x, y = workload
    executor = RecordingExecutor(workers)
    result = autotune(model, _workload.tuning(strategy, **kwargs), eval_fn=_workload.Accuracy(x, y), dataset=data,
                      executor=executor)
    return result, executor.batches


def test_bayesian_asks_one_config_per_worker_and_one_worker_is_the_sequential_search(workload: Any) -> None:
    one, batches_one = run(workload, "bayesian", 1)
    four, batches_four = run(workload, "bayesian", 4)
    assert set(batches_one) == {1}
    assert batches_four[0] == 1 and batches_four[1:-1] == [4] * (len(batches_four) - 2) and 1 <= batches_four[-1] <= 4
    model, data, x, y = workload
    plain = autotune(model, _workload.tuning("bayesian"), eval_fn=_workload.Accuracy(x, y), dataset=data)
    assert _workload.summary(one) == _workload.summary(plain)
    assert len({t.key for t in four.trials}) == len(four.trials) == 12
    assert _workload.summary(run(workload, "bayesian", 4)[0]) == _workload.summary(four)  # reproducible


def test_random_batches_grow_with_the_workers_and_try_the_same_configs(workload: Any) -> None:
    few, few_batches = run(workload, "random", 1, max_trials=40)  # the toy space has 32 points: all of them
    many, many_batches = run(workload, "random", 16, max_trials=40)
    assert max(few_batches) == 8 and max(many_batches) == 16
    assert len(few.trials) == 32 and _workload.summary(many) == _workload.summary(few)
