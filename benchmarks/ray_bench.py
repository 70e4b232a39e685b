"""Distributed tuning: wall time of one eval-dominated search with 1, 2 and 4 Ray workers.

The model is tests/core's toy numpy MLP (trained on scikit-learn's digits); each trial quantizes it
for real and ``eval_fn`` computes its real accuracy, then waits until ``--eval-s`` seconds have
passed: the cost of a validation pass on a real data set (ImageNet, GLUE), which is what makes
tuning slow and what the workers share. The same search (random strategy, every config independent
of the worker count, and bayesian, which asks ``workers`` configs per batch) runs in this process
with the sequential executor, then on a local Ray cluster of 4 one-CPU nodes with 1, 2 and 4
workers. The per-trial overheads (object-store transfer of the model, task scheduling latency) are
measured separately so the cost on a larger cluster can be worked out (see benchmarks/README.md).

Writes results/ray.json and results/ray.md. Run with ``nox -s bench_ray`` (not part of plain ``nox``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CORE_TESTS = HERE.parent / "tests" / "core"
# The workers import the toy backend and this module's eval_fn by name: the nodes inherit PYTHONPATH.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), str(CORE_TESTS), os.environ.get("PYTHONPATH")) if p)
sys.path[:0] = [str(HERE), str(CORE_TESTS)]

import numpy as np  # noqa: E402
import toy_backend  # noqa: E402
from _machine import cpu_name, git_commit, timing_lock  # noqa: E402

import inc_core as inc  # noqa: E402
from inc_core.tuning import RayExecutor, SequentialExecutor, autotune  # noqa: E402

toy_backend.register()
NODES = 4
WORKER_COUNTS = (1, 2, 4)


class SlowAccuracy:
    """``eval_fn``: the quantized model's real digits accuracy, taking ``seconds`` in all (a validation pass)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, seconds: float) -> None:
        self.x, self.y, self.seconds = x, y, seconds

    def __call__(self, model: Any) -> float:
        start = time.perf_counter()
        score = toy_backend.accuracy(model, self.x, self.y)
        time.sleep(max(0.0, self.seconds - (time.perf_counter() - start)))
        return score


def _noop(_: Any = None) -> None:
    return None


def tune(model: Any, data: Any, eval_fn: Any, strategy: str, trials: int, executor: Any) -> dict[str, Any]:
    config = inc.TuningConfig(base=inc.QuantConfig(calibration="percentile", percentile=90.0), strategy=strategy,
                              max_trials=trials, keep_searching=True, tolerable_loss=0.01)
    start = time.perf_counter()
    result = autotune(model, config, eval_fn=eval_fn, dataset=data, executor=executor)
    wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "trials": len(result.trials),
        "chosen_trial": result.trial_id,
        "chosen_change": result.trial.change,
        "score": result.score,
        "workers_used": len({t.worker for t in result.trials if t.worker is not None}),
    }


def overheads(ray: Any, model: Any, calibration: Any, rounds: int) -> dict[str, Any]:
    """Per-trial costs that do not depend on eval_fn: putting the model, scheduling a task, moving bytes."""
    import pickle

    remote_noop = ray.remote(num_cpus=1)(_noop)
    payload = (model, calibration)
    size = len(pickle.dumps(payload))
    start = time.perf_counter()
    ref = ray.put(payload)
    put_s = time.perf_counter() - start
    ray.get([remote_noop.remote(ref) for _ in range(2 * NODES)])  # every node has fetched it once
    latencies = []
    for _ in range(rounds):  # one task at a time: submission -> result on the driver
        start = time.perf_counter()
        ray.get(remote_noop.remote(ref))
        latencies.append(time.perf_counter() - start)
    # Bandwidth between nodes' object stores: a 64 MiB array fetched by tasks on the other nodes.
    big = ray.put(np.ones(64 * 1024**2, dtype=np.uint8))
    start = time.perf_counter()
    ray.get([remote_noop.remote(big) for _ in range(NODES)])
    fetch_s = time.perf_counter() - start
    return {
        "model_and_calibration_bytes": size,
        "put_s": put_s,
        "task_round_trip_ms_median": 1e3 * statistics.median(latencies),
        "task_round_trip_ms_p90": 1e3 * sorted(latencies)[int(0.9 * (len(latencies) - 1))],
        "fetch_64MiB_to_all_nodes_s": fetch_s,
    }


def markdown(out: dict[str, Any]) -> str:
    lines = [
        "# Distributed tuning on Ray: wall time per worker count",
        "",
        f"CPU: {out['cpu']} ({out['cores']} cores visible). Ray {out['ray']}, Python {out['python']}. "
        f"Local cluster: {NODES} nodes x 1 CPU (`ray.cluster_utils.Cluster`). eval_fn: {out['eval_s']:g} s per call "
        "(the real digits accuracy, then waiting out the rest of the time a validation pass would take); "
        f"{out['trials']} trials, keep_searching, FP32 baseline evaluated once on the driver.",
        "",
        "| strategy | executor | workers | wall (s) | speed-up vs sequential | speed-up vs 1 Ray worker | trials | chosen |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in out["runs"]:
        lines.append(
            f"| {row['strategy']} | {row['executor']} | {row['workers']} | {row['wall_s']:.1f} | {row['speedup_vs_sequential']:.2f}x | "
            f"{row['speedup_vs_ray1']:.2f}x | {row['trials']} | trial {row['chosen_trial']} ({row['chosen_change']}) |"
            if row["speedup_vs_ray1"] is not None
            else f"| {row['strategy']} | {row['executor']} | {row['workers']} | {row['wall_s']:.1f} | 1.00x | - | {row['trials']} | "
            f"trial {row['chosen_trial']} ({row['chosen_change']}) |"
        )
    o = out["overheads"]
    lines += [
        "",
        "Per-trial overheads on this machine:",
        "",
        "| | |",
        "|---|---|",
        f"| model + calibration, pickled | {o['model_and_calibration_bytes'] / 1024:.0f} KiB |",
        f"| `ray.put` of them (once per run) | {1e3 * o['put_s']:.1f} ms |",
        f"| task round trip (schedule, run a no-op on a worker, result back), median / p90 | "
        f"{o['task_round_trip_ms_median']:.1f} / {o['task_round_trip_ms_p90']:.1f} ms |",
        f"| 64 MiB object fetched by a task on each of the {NODES} nodes | {o['fetch_64MiB_to_all_nodes_s']:.2f} s |",
        "",
        f"Measured {out['date']} at commit {out['commit']}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-s", type=float, default=2.0, help="seconds one eval_fn call takes")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--strategies", nargs="+", default=["random", "bayesian"])
    parser.add_argument("--rounds", type=int, default=100, help="task round trips timed for the scheduling latency")
    parser.add_argument("--output", type=Path, default=HERE / "results")
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    model, x_train, _, x_test, y_test = toy_backend.train_digits_mlp()
    data = inc.Dataset(x_train, batch_size=32)
    eval_fn = SlowAccuracy(x_test, y_test, args.eval_s)
    runs: list[dict[str, Any]] = []
    sequential: dict[str, float] = {}
    for strategy in args.strategies:
        row = tune(model, data, eval_fn, strategy, args.trials, SequentialExecutor())
        sequential[strategy] = row["wall_s"]
        runs.append({"strategy": strategy, "executor": "sequential", "workers": 1, **row,
                     "speedup_vs_sequential": 1.0, "speedup_vs_ray1": None})
        print(f"{strategy} sequential: {row['wall_s']:.1f} s", flush=True)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(NODES - 1):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        warm = ray.remote(num_cpus=1)(_noop)
        ray.get([warm.remote() for _ in range(4 * NODES)])  # worker processes started before timing
        for strategy in args.strategies:
            ray1 = None
            for workers in WORKER_COUNTS:
                with RayExecutor(workers=workers) as executor:
                    row = tune(model, data, eval_fn, strategy, args.trials, executor)
                ray1 = row["wall_s"] if workers == 1 else ray1
                assert ray1 is not None
                runs.append({"strategy": strategy, "executor": "ray", "workers": workers, **row,
                             "speedup_vs_sequential": sequential[strategy] / row["wall_s"],
                             "speedup_vs_ray1": ray1 / row["wall_s"]})
                print(f"{strategy} ray x{workers}: {row['wall_s']:.1f} s", flush=True)
        calibration = toy_backend.ToyBackend().calibrate(model, data, inc.QuantConfig())
        measured = overheads(ray, model, calibration, args.rounds)
    finally:
        ray.shutdown()
        cluster.shutdown()

    out = {
        "cpu": cpu_name(),
        "commit": git_commit("packages/inc-core", "benchmarks/ray_bench.py"),
        "date": time.strftime("%Y-%m-%d"),
        "cores": os.cpu_count(),
        "ray": ray.__version__,
        "python": sys.version.split()[0],
        "eval_s": args.eval_s,
        "trials": args.trials,
        "nodes": NODES,
        "runs": runs,
        "overheads": measured,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "ray.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.output / "ray.md").write_text(markdown(out) + "\n")
    print(markdown(out))


if __name__ == "__main__":
    with timing_lock():  # one benchmark times at a time (an outer flock on the same file counts)
        main()
