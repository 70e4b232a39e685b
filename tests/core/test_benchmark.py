"""Benchmark harness: exact call counts, statistics vs numpy, pinned multi-instance runs, validation."""

from __future__ import annotations

import json
import os

import _numpy_backend as nb
import numpy as np
import pytest

import inc_core as inc
from inc_core._benchmark import available_cpus, benchmark, benchmark_callable, plan_cores
from inc_core._benchmark_instances import load_inputs, save_inputs
from inc_core._benchmark_result import LatencyStats, aggregate_results, instance_result
from inc_core.errors import BenchmarkError, ConfigError, ModelLoadError

CPUS = available_cpus()
can_pin_two = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(CPUS) < 2,
    reason="pinned instances need Linux sched_setaffinity and at least 2 available cores",
)


@pytest.fixture
def backend():
    nb.register()
    yield inc.get_backend(nb.KEY)
    nb.unregister()


@pytest.fixture
def model():
    return nb.make_model()


@pytest.fixture
def batch():
    return np.random.default_rng(1).normal(size=(6, 8)).astype(np.float32)


def _check_stats(result):
    lat = np.asarray(result.latencies_ms)
    p50, p90, p99 = np.percentile(lat, [50, 90, 99])
    assert result.latency_ms.p50 == pytest.approx(p50)
    assert result.latency_ms.p90 == pytest.approx(p90)
    assert result.latency_ms.p99 == pytest.approx(p99)
    assert result.latency_ms.mean == pytest.approx(lat.mean())
    assert result.latency_ms.min <= result.latency_ms.p50 <= result.latency_ms.p90 <= result.latency_ms.p99
    assert result.latency_ms.p99 <= result.latency_ms.max


# --- statistics ---------------------------------------------------------------------------------------


def test_latency_stats_match_hand_computed_linear_percentiles():
    stats = LatencyStats.from_samples([float(v) for v in range(1, 11)])
    # numpy's linear rule: position (n - 1) * q, so 4.5 -> 5.5, 8.1 -> 9.1, 8.91 -> 9.91
    assert (stats.p50, stats.p90, stats.p99) == pytest.approx((5.5, 9.1, 9.91))
    assert (stats.mean, stats.min, stats.max) == (5.5, 1.0, 10.0)


def test_instance_result_throughput_counts_samples_over_timed_seconds():
    r = instance_result([0.001, 0.002, 0.003], batch_size=4, warmup=2, pid=7, cpus=[3, 1])
    assert r.throughput == pytest.approx(4 * 3 / 0.006)
    assert r.throughput == pytest.approx(r.batch_size / r.latency_ms.mean * 1000)
    assert r.latencies_ms == pytest.approx((1.0, 2.0, 3.0))
    assert (r.iterations, r.warmup, r.pid, r.cpus) == (3, 2, 7, (1, 3))


def test_aggregate_sums_throughput_and_pools_latencies():
    a = instance_result([0.001, 0.003], batch_size=2, warmup=0, pid=1, cpus=[0])
    b = instance_result([0.002, 0.002], batch_size=2, warmup=0, pid=2, cpus=[1])
    total = aggregate_results([a, b])
    assert total.throughput == pytest.approx(2 * 2 / 0.004 + 2 * 2 / 0.004)
    assert total.instances == 2 and total.per_instance == (a, b)
    assert total.latency_ms.mean == pytest.approx(2.0)
    assert total.latency_ms.max == pytest.approx(3.0)
    assert total.pid is None and total.cpus is None


# --- benchmark_callable ------------------------------------------------------------------------------


def test_benchmark_callable_calls_exactly_warmup_plus_iterations():
    calls = []
    result = benchmark_callable(lambda: calls.append(1), warmup=3, iterations=17, batch_size=8)
    assert len(calls) == 20
    assert result.iterations == 17 and len(result.latencies_ms) == 17 and result.warmup == 3
    assert result.batch_size == 8 and result.instances == 1 and result.backend is None
    assert result.throughput == pytest.approx(8 * 17 / (sum(result.latencies_ms) / 1000))
    assert result.per_instance[0].pid == os.getpid()
    _check_stats(result)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"warmup": -1}, "warmup must be >= 0"),
        ({"iterations": 0}, "iterations must be >= 1"),
        ({"iterations": 2.5}, "iterations must be an int"),
        ({"warmup": True}, "warmup must be an int"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_benchmark_callable_rejects_bad_counts(kwargs, message):
    calls = []
    with pytest.raises(ConfigError, match=message):
        benchmark_callable(lambda: calls.append(1), **kwargs)
    assert calls == []


def test_benchmark_callable_rejects_a_non_callable():
    with pytest.raises(ConfigError, match="zero-argument callable, got int"):
        benchmark_callable(3)  # type: ignore[arg-type]


# --- one instance, in process ----------------------------------------------------------------------


def test_single_instance_runs_the_backend_runner_in_process(backend, model, batch):
    result = benchmark(model, batch, warmup=2, iterations=9, cores_per_instance=1, backend=nb.KEY)
    assert model.calls == 11
    assert backend.runner_threads == [1]
    assert result.batch_size == 6  # first axis of the input
    assert result.iterations == 9 and result.instances == 1 and result.cores_per_instance == 1
    assert result.backend == nb.KEY and result.pid == os.getpid()
    assert result.throughput == pytest.approx(6 / result.latency_ms.mean * 1000)
    _check_stats(result)


def test_backend_found_from_model_type_and_batch_from_first_mapping_input(backend, model, batch):
    result = benchmark(model, {"x": batch[:4]}, warmup=0, iterations=5)
    assert model.calls == 5
    assert result.batch_size == 4 and result.backend == nb.KEY


def test_batch_size_override_scales_throughput(backend, model, batch):
    result = benchmark(model, batch, warmup=0, iterations=5, batch_size=3, backend=nb.KEY)
    assert result.batch_size == 3
    assert result.throughput == pytest.approx(3 * 5 / (sum(result.latencies_ms) / 1000))


def test_to_dict_is_json_and_leaves_latencies_out_unless_asked(backend, model, batch):
    result = benchmark(model, batch, warmup=0, iterations=4, backend=nb.KEY)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["iterations"] == 4 and data["batch_size"] == 6 and data["backend"] == nb.KEY
    assert data["latency_ms"]["p90"] == pytest.approx(result.latency_ms.p90)
    assert len(data["per_instance"]) == 1 and "latencies_ms" not in data
    assert len(result.to_dict(latencies=True)["latencies_ms"]) == 4


# --- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"warmup": -1}, "warmup must be >= 0"),
        ({"iterations": 0}, "iterations must be >= 1"),
        ({"instances": 0}, "instances must be >= 1"),
        ({"instances": "2"}, "instances must be an int"),
        ({"cores_per_instance": 0}, "cores_per_instance must be >= 1"),
        ({"batch_size": -2}, "batch_size must be >= 1"),
    ],
)
def test_bad_parameters_raise_before_running(backend, model, batch, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        benchmark(model, batch, backend=nb.KEY, **kwargs)
    assert model.calls == 0


def test_more_cores_than_available_says_how_many_exist(backend, model, batch):
    n = len(CPUS)
    with pytest.raises(ConfigError, match=rf"needs {n + 1} cores, but only {n} are available"):
        benchmark(model, batch, cores_per_instance=n + 1, backend=nb.KEY)
    with pytest.raises(ConfigError, match=rf"instances={n + 1} needs at least {n + 1} cores, but only {n}"):
        benchmark(model, batch, instances=n + 1, backend=nb.KEY)
    with pytest.raises(ConfigError, match=rf"instances=2 x cores_per_instance={n} needs {2 * n} cores"):
        benchmark(model, batch, instances=2, cores_per_instance=n, backend=nb.KEY)
    assert model.calls == 0


def test_plan_cores_gives_disjoint_sets_in_order():
    assert plan_cores(2, 2, (0, 1, 2, 3, 4)) == [(0, 1), (2, 3)]
    assert plan_cores(3, None, (4, 5, 6, 7, 8, 9, 10)) == [(4, 5), (6, 7), (8, 9)]
    assert plan_cores(1, None, (0, 1)) == [(0, 1)]


def test_batch_size_that_cannot_be_derived_asks_for_it(backend, model):
    with pytest.raises(ConfigError, match="pass batch_size="):
        benchmark(model, {}, backend=nb.KEY)


def test_inputs_round_trip_through_npz_for_instances(tmp_path):
    a = np.arange(6, dtype=np.int64).reshape(2, 3)
    b = np.ones((2, 1), dtype=np.float16)
    for inputs in (a, (a, b), {"in/put:0": a, "mask": b}):
        layout = save_inputs(inputs, tmp_path / "in.npz")
        back = load_inputs(tmp_path / "in.npz", json.loads(json.dumps(layout)))
        assert type(back) is type(inputs)
        if isinstance(inputs, dict):
            assert list(back) == list(inputs)
            pairs = [(back[k], inputs[k]) for k in inputs]
        elif isinstance(inputs, tuple):
            pairs = list(zip(back, inputs))
        else:
            pairs = [(back, inputs)]
        for got, want in pairs:
            assert got.dtype == want.dtype and np.array_equal(got, want)


def test_nested_inputs_keep_their_structure_for_instances(tmp_path):
    # DLRM's batch: dense features, then per table a list of index arrays and a list of offset arrays
    dense, indices, offsets = np.ones((4, 13), np.float32), [np.arange(12)] * 3, [np.arange(4)] * 3
    inputs = (dense, indices, offsets, {"extra": [np.zeros(2, np.float16)]})
    layout = save_inputs(inputs, tmp_path / "in.npz")
    back = load_inputs(tmp_path / "in.npz", json.loads(json.dumps(layout)))
    assert type(back) is tuple and len(back) == 4
    assert type(back[1]) is list and len(back[1]) == 3 and np.array_equal(back[1][2], indices[2])
    assert type(back[3]) is dict and back[3]["extra"][0].dtype == np.float16
    assert np.array_equal(back[0], dense)
    plain = save_inputs(([[1.0, 2.0], [3.0, 4.0]],), tmp_path / "in.npz")  # Python numbers: one array
    assert load_inputs(tmp_path / "in.npz", plain)[0].shape == (2, 2)
    with pytest.raises(ConfigError, match=r"input #1\[2\] \(object\)"):
        save_inputs((dense, [np.arange(3), np.arange(3), object()]), tmp_path / "in.npz")


def test_non_numeric_inputs_cannot_go_to_instances(tmp_path):
    with pytest.raises(ConfigError, match="not a numeric array"):
        save_inputs({"x": object()}, tmp_path / "in.npz")


# --- several pinned instances ----------------------------------------------------------------------


@can_pin_two
def test_two_instances_run_in_separate_pinned_processes_and_add_up(backend, model, batch):
    result = benchmark(model, batch, warmup=2, iterations=7, instances=2, cores_per_instance=1, backend=nb.KEY)
    assert model.calls == 0  # the parent only saved the model; the instances loaded their own copies
    assert result.instances == 2 and result.cores_per_instance == 1 and len(result.per_instance) == 2
    pids = [r.pid for r in result.per_instance]
    assert len(set(pids)) == 2 and os.getpid() not in pids
    cpus = [r.cpus for r in result.per_instance]
    assert all(c is not None and len(c) == 1 for c in cpus)
    assert set(cpus[0]).isdisjoint(cpus[1]) and set(cpus[0]) | set(cpus[1]) <= set(CPUS)
    for r in result.per_instance:
        assert r.iterations == 7 and len(r.latencies_ms) == 7 and r.warmup == 2 and r.batch_size == 6
        assert r.throughput == pytest.approx(6 * 7 / (sum(r.latencies_ms) / 1000))
    assert result.throughput == pytest.approx(sum(r.throughput for r in result.per_instance))
    assert len(result.latencies_ms) == 14
    _check_stats(result)


@can_pin_two
def test_instance_failure_with_an_inc_error_is_raised_in_the_parent(model, batch):
    with pytest.raises(ModelLoadError, match=r"benchmark instance \d failed: npmat: model.npmat is corrupt"):
        benchmark(model, batch, warmup=0, iterations=2, instances=2, backend=nb.BrokenLoadBackend())


@can_pin_two
def test_instances_rebuild_the_backend_with_its_options(model, batch):
    # Built without its option, the backend would run; the instances must get refuse_runs=True.
    with pytest.raises(ModelLoadError, match=r"benchmark instance \d failed: .*configured with refuse_runs=True"):
        benchmark(model, batch, warmup=0, iterations=2, instances=2, cores_per_instance=1, backend=nb.OptionBackend(refuse_runs=True))
    result = benchmark(model, batch, warmup=0, iterations=2, instances=2, cores_per_instance=1, backend=nb.OptionBackend())
    assert result.instances == 2


@can_pin_two
def test_instance_failure_with_a_plain_exception_carries_its_traceback(model, batch):
    with pytest.raises(BenchmarkError, match=r"(?s)runner failed on purpose \(ValueError\).*instances=1.*Traceback"):
        benchmark(model, batch, warmup=0, iterations=2, instances=2, backend=nb.BrokenRunnerBackend())


def test_single_instance_runner_failure_is_a_benchmark_error(model, batch):
    with pytest.raises(BenchmarkError, match=r"could not run the model on the given inputs \(ValueError: runner failed") as info:
        benchmark(model, batch, warmup=0, iterations=2, backend=nb.BrokenRunnerBackend())
    assert isinstance(info.value.__cause__, ValueError)


@can_pin_two
@pytest.mark.parametrize("quantized", [False, True])
def test_instances_get_the_model_under_the_suffix_its_backend_saves(model, batch, quantized):
    # The backend's key ("npmat") is not the suffix its save accepts; each kind of model has its own.
    impl = nb.SuffixPerKindBackend()
    if quantized:
        model = impl.quantize(model, inc.QuantConfig(approach="dynamic"), calibration=None)
    result = benchmark(model, batch, warmup=1, iterations=3, instances=2, cores_per_instance=1, backend=impl)
    assert result.instances == 2 and all(r.iterations == 3 for r in result.per_instance)


@can_pin_two
def test_a_file_suffix_that_is_not_one_is_refused(model, batch):
    with pytest.raises(ConfigError, match=r"file_suffix returned '../model'; expected a suffix such as '.onnx'"):
        benchmark(model, batch, warmup=0, iterations=1, instances=2, cores_per_instance=1, backend=nb.BadSuffixBackend())


def test_default_file_suffix_is_the_backend_name():
    assert nb.NumpyBackend().file_suffix(nb.make_model()) == nb.SUFFIX


@can_pin_two
def test_backend_class_that_instances_cannot_import_is_rejected(model, batch):
    class LocalBackend(nb.NumpyBackend):
        pass

    with pytest.raises(ConfigError, match="instance processes cannot import it"):
        benchmark(model, batch, instances=2, cores_per_instance=1, backend=LocalBackend())
