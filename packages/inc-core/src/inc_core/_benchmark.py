"""The benchmark harness: latency and throughput of a model, in one process or as several pinned instances.

The harness is backend-neutral. It asks the model's backend for a zero-argument callable
(:meth:`Backend.runner`) and times calls of it. Several instances reproduce the usual
"N instances x C cores" deployment: each runs in its own process pinned to its own disjoint
set of cores, all start their timed loop together, and their throughputs add up.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from inc_core._benchmark_instances import run_instances
from inc_core._benchmark_result import BenchmarkResult, LatencyStats, aggregate_results, instance_result
from inc_core._checks import check_int
from inc_core._dataset import Dataset, _batch_size
from inc_core._registry import resolve_backend
from inc_core.backend import Backend
from inc_core.errors import BenchmarkError, ConfigError, IncError

__all__ = [
    "BenchmarkResult",
    "LatencyStats",
    "available_cpus",
    "benchmark",
    "benchmark_callable",
    "plan_cores",
    "run_warmup",
    "time_calls",
]

log = logging.getLogger("inc")


def available_cpus() -> tuple[int, ...]:
    """CPU ids this process may run on (its affinity mask on Linux, else every CPU)."""
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


def run_warmup(fn: Callable[[], Any], count: int) -> None:
    """Call ``fn`` ``count`` times untimed (lazy init, caches, thread pools, JIT)."""
    for _ in range(count):
        fn()


def time_calls(fn: Callable[[], Any], count: int) -> np.ndarray:
    """Per-call latencies in seconds of ``count`` back-to-back calls of ``fn``.

    One timestamp is taken between consecutive calls, so the latencies add up exactly to the
    wall time of the whole loop and ``throughput = batch / mean latency`` holds without a gap.
    """
    clock = time.perf_counter
    stamps = [0.0] * (count + 1)
    stamps[0] = clock()
    for i in range(1, count + 1):
        fn()
        stamps[i] = clock()
    return np.diff(np.asarray(stamps, dtype=np.float64))


def _check_counts(owner: str, warmup: Any, iterations: Any) -> None:
    check_int(owner, "warmup", warmup, minimum=0)
    check_int(owner, "iterations", iterations, minimum=1)


def benchmark_callable(
    fn: Callable[[], Any],
    *,
    warmup: int = 10,
    iterations: int = 100,
    batch_size: int = 1,
) -> BenchmarkResult:
    """Time a zero-argument callable in the calling process.

    This is the building block plugins use and what a user calls to time a plain function.

    Args:
        fn: runs one inference (or whatever is measured) per call; its result is discarded.
        warmup: untimed calls first.
        iterations: timed calls.
        batch_size: samples one call processes (throughput counts samples, not calls).

    Returns:
        The result of a single instance (``instances == 1``, ``backend is None``).

    Raises:
        ConfigError: ``fn`` is not callable, or a count is not an int in range.
    """
    owner = "benchmark_callable"
    if not callable(fn):
        raise ConfigError(f"{owner}: fn must be a zero-argument callable, got {type(fn).__name__}.")
    _check_counts(owner, warmup, iterations)
    check_int(owner, "batch_size", batch_size, minimum=1)
    log.info("benchmark: %d warmup + %d timed calls", warmup, iterations)
    run_warmup(fn, warmup)
    latencies = time_calls(fn, iterations)
    result = instance_result(latencies, batch_size=batch_size, warmup=warmup, pid=os.getpid(), cpus=available_cpus())
    _log_result(result)
    return aggregate_results([result])


def plan_cores(instances: int, cores_per_instance: int | None, cpus: Sequence[int]) -> list[tuple[int, ...]]:
    """Disjoint core sets, one per instance, taken in order from ``cpus``.

    ``cores_per_instance=None`` splits the available cores evenly. A single instance with
    ``cores_per_instance=None`` gets every available core.

    Raises:
        ConfigError: the instances need more cores than ``cpus`` holds.
    """
    available = len(cpus)
    if cores_per_instance is None:
        cores_per_instance = available // instances
        if cores_per_instance == 0:
            raise ConfigError(
                f"benchmark: instances={instances} needs at least {instances} cores, but only {available} "
                f"are available to this process (CPUs {list(cpus)}). Use instances <= {available}."
            )
    needed = instances * cores_per_instance
    if needed > available:
        raise ConfigError(
            f"benchmark: instances={instances} x cores_per_instance={cores_per_instance} needs {needed} cores, "
            f"but only {available} are available to this process (CPUs {list(cpus)}). Lower instances or "
            f"cores_per_instance so that their product is at most {available}."
        )
    return [tuple(cpus[i * cores_per_instance : (i + 1) * cores_per_instance]) for i in range(instances)]


def benchmark(
    model: Any,
    inputs: Any,
    *,
    warmup: int = 10,
    iterations: int = 100,
    instances: int = 1,
    cores_per_instance: int | None = None,
    batch_size: int | None = None,
    backend: str | Backend | None = None,
) -> BenchmarkResult:
    """Measure latency and throughput of ``model`` on ``inputs``.

    One instance runs in the calling process with ``cores_per_instance`` threads (the backend's
    default when ``None``); the process is not pinned, as that would change the caller's own affinity.
    Several instances each run in a fresh process pinned (Linux) to its own disjoint set of
    ``cores_per_instance`` cores, with that many threads; the model reaches them through the backend's
    ``save``/``load`` and the inputs as numpy arrays. All instances finish their warmup before any starts
    timing, so the timed loops overlap, and the reported throughput is the sum of theirs.

    Args:
        model: a model the backend accepts (framework object or model file, as for :func:`inc.quantize`).
        inputs: one batch of inputs as the backend's runner takes them: an array, a tuple of arrays or a
            mapping input name -> array.
        warmup: untimed calls per instance before timing.
        iterations: timed calls per instance.
        instances: concurrent instances.
        cores_per_instance: cores (and threads) per instance; ``None`` splits the available cores evenly
            between several instances, or lets the backend choose for one.
        batch_size: samples per call; by default the first axis of the first input array.
        backend: a backend name or instance to use instead of the one found from the model's type.

    Returns:
        The aggregate :class:`BenchmarkResult`; ``per_instance`` holds each instance's own result.

    Raises:
        ConfigError: a count is not an int in range, or the instances need more cores than are available.
        BackendNotFoundError: no installed backend handles the model.
        BenchmarkError: the model could not run on the inputs, or an instance process failed.
    """
    owner = "benchmark"
    if isinstance(inputs, Dataset):
        raise ConfigError(
            f"{owner}: inputs is an inc.Dataset; give one batch of inputs, as the model takes it (the dataset's "
            "first: next(dataset.inputs())). Every timed call runs that batch."
        )
    _check_counts(owner, warmup, iterations)
    check_int(owner, "instances", instances, minimum=1)
    check_int(owner, "cores_per_instance", cores_per_instance, minimum=1, allow_none=True)
    check_int(owner, "batch_size", batch_size, minimum=1, allow_none=True)
    if batch_size is None:
        batch_size = _derive_batch_size(inputs)
    core_sets = plan_cores(instances, cores_per_instance, available_cpus())
    impl = resolve_backend(model, backend)

    if instances == 1:
        log.info(
            "benchmark: %s backend, batch %d, %d warmup + %d timed calls, %s threads",
            impl.name, batch_size, warmup, iterations, cores_per_instance or "default",
        )
        try:
            fn = impl.runner(model, inputs, threads=cores_per_instance)
            run_warmup(fn, warmup)
            latencies = time_calls(fn, iterations)
        except IncError:
            raise
        except Exception as exc:  # the framework's runtime refusing the model or the inputs
            raise BenchmarkError(
                f"benchmark: the {impl.name} backend could not run the model on the given inputs "
                f"({type(exc).__name__}: {exc}). Check that the inputs have the shapes, dtypes and names the model "
                "expects (one batch, as the backend's runner takes it)."
            ) from exc
        result = instance_result(
            latencies,
            batch_size=batch_size,
            warmup=warmup,
            cores_per_instance=cores_per_instance,
            backend=impl.name,
            pid=os.getpid(),
            cpus=available_cpus(),
        )
        _log_result(result)
        return aggregate_results([result])

    threads = len(core_sets[0])
    log.info(
        "benchmark: %s backend, batch %d, %d instances x %d cores, %d warmup + %d timed calls each",
        impl.name, batch_size, instances, threads, warmup, iterations,
    )
    results = run_instances(
        impl,
        backend if isinstance(backend, str) else impl.name,
        model,
        inputs,
        core_sets=core_sets,
        warmup=warmup,
        iterations=iterations,
        batch_size=batch_size,
    )
    aggregate = aggregate_results(results)
    _log_result(aggregate)
    return aggregate


def _derive_batch_size(inputs: Any) -> int:
    size = _batch_size(inputs)
    if size < 1:
        raise ConfigError(
            "benchmark: cannot tell the batch size from the inputs (no input array, or an empty first axis); "
            "pass batch_size=<samples per call>."
        )
    return size


def _log_result(result: BenchmarkResult) -> None:
    log.info(
        "benchmark: %.2f samples/s, latency p50 %.3f ms, p99 %.3f ms",
        result.throughput, result.latency_ms.p50, result.latency_ms.p99,
    )
