"""BenchmarkResult: throughput and latency of one benchmark run, per instance and in aggregate."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inc_core.errors import ConfigError

__all__ = ["BenchmarkResult", "LatencyStats", "instance_result", "aggregate_results"]


@dataclass(frozen=True, kw_only=True)
class LatencyStats:
    """Latency of one inference call, in milliseconds.

    Percentiles use linear interpolation between samples (``numpy.percentile``'s default).
    """

    p50: float
    p90: float
    p99: float
    mean: float
    min: float
    max: float

    @classmethod
    def from_samples(cls, latencies_ms: Sequence[float] | np.ndarray) -> LatencyStats:
        """Statistics of a non-empty sequence of per-call latencies in milliseconds."""
        values = np.asarray(latencies_ms, dtype=np.float64)
        p50, p90, p99 = (float(v) for v in np.percentile(values, [50.0, 90.0, 99.0]))
        return cls(
            p50=p50,
            p90=p90,
            p99=p99,
            mean=float(values.mean()),
            min=float(values.min()),
            max=float(values.max()),
        )

    def to_dict(self) -> dict[str, float]:
        return {"p50": self.p50, "p90": self.p90, "p99": self.p99, "mean": self.mean, "min": self.min, "max": self.max}


@dataclass(frozen=True, kw_only=True)
class BenchmarkResult:
    """The outcome of :func:`inc.benchmark` (or of one of its instances).

    Attributes:
        throughput: samples per second. For one instance: ``batch_size * iterations / timed seconds``,
            which equals ``batch_size / latency_ms.mean * 1000`` because the timed calls run back to back.
            For several instances: the sum of the instances' throughputs (they run at the same time).
        latency_ms: per-call latency statistics; for several instances, over every call of every instance.
        batch_size: samples per call.
        iterations: timed calls per instance.
        warmup: untimed calls per instance before timing started.
        instances: how many instances ran concurrently.
        cores_per_instance: CPU cores (and threads) given to each instance; ``None`` when the backend chose.
        per_instance: one result per instance (for a single instance, that instance's own result).
        backend: name of the backend that ran the model (``None`` for :func:`benchmark_callable`).
        pid: process id that ran this instance (``None`` for an aggregate of several instances).
        cpus: CPU ids the instance was allowed to run on (``None`` for an aggregate of several instances).
        latencies_ms: every timed call's latency, in call order (instance after instance for an aggregate).
    """

    throughput: float
    latency_ms: LatencyStats
    batch_size: int
    iterations: int
    warmup: int
    instances: int = 1
    cores_per_instance: int | None = None
    per_instance: tuple[BenchmarkResult, ...] = ()
    backend: str | None = None
    pid: int | None = None
    cpus: tuple[int, ...] | None = None
    latencies_ms: tuple[float, ...] = field(default=(), repr=False)

    def to_dict(self, *, latencies: bool = False) -> dict[str, Any]:
        """A JSON-ready dict; ``latencies=True`` also includes every call's latency."""
        out: dict[str, Any] = {
            "throughput": self.throughput,
            "latency_ms": self.latency_ms.to_dict(),
            "batch_size": self.batch_size,
            "iterations": self.iterations,
            "warmup": self.warmup,
            "instances": self.instances,
            "cores_per_instance": self.cores_per_instance,
            "backend": self.backend,
            "pid": self.pid,
            "cpus": list(self.cpus) if self.cpus is not None else None,
            "per_instance": [r.to_dict(latencies=latencies) for r in self.per_instance],
        }
        if latencies:
            out["latencies_ms"] = list(self.latencies_ms)
        return out


def instance_result(
    latencies_s: Sequence[float] | np.ndarray,
    *,
    batch_size: int,
    warmup: int,
    cores_per_instance: int | None = None,
    backend: str | None = None,
    pid: int | None = None,
    cpus: Sequence[int] | None = None,
) -> BenchmarkResult:
    """The result of one instance from its per-call latencies in seconds."""
    seconds = np.asarray(latencies_s, dtype=np.float64)
    total = float(seconds.sum())
    # A clock too coarse to see any call would give 0 s; report an infinite rate rather than divide by 0.
    throughput = batch_size * len(seconds) / total if total > 0 else float("inf")
    millis = seconds * 1000.0
    return BenchmarkResult(
        throughput=throughput,
        latency_ms=LatencyStats.from_samples(millis),
        batch_size=batch_size,
        iterations=len(seconds),
        warmup=warmup,
        instances=1,
        cores_per_instance=cores_per_instance,
        backend=backend,
        pid=pid,
        cpus=tuple(sorted(cpus)) if cpus is not None else None,
        latencies_ms=tuple(float(v) for v in millis),
    )


def aggregate_results(results: Sequence[BenchmarkResult]) -> BenchmarkResult:
    """Combine instances that ran concurrently: throughputs add up, latencies pool."""
    if not results:
        raise ConfigError("aggregate_results: no instance result was given; pass at least one BenchmarkResult.")
    first = results[0]
    if len(results) == 1:
        return BenchmarkResult(
            throughput=first.throughput,
            latency_ms=first.latency_ms,
            batch_size=first.batch_size,
            iterations=first.iterations,
            warmup=first.warmup,
            instances=1,
            cores_per_instance=first.cores_per_instance,
            per_instance=(first,),
            backend=first.backend,
            pid=first.pid,
            cpus=first.cpus,
            latencies_ms=first.latencies_ms,
        )
    pooled = tuple(v for r in results for v in r.latencies_ms)
    return BenchmarkResult(
        throughput=float(sum(r.throughput for r in results)),
        latency_ms=LatencyStats.from_samples(pooled),
        batch_size=first.batch_size,
        iterations=first.iterations,
        warmup=first.warmup,
        instances=len(results),
        cores_per_instance=first.cores_per_instance,
        per_instance=tuple(results),
        backend=first.backend,
        latencies_ms=pooled,
    )
