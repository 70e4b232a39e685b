"""Distributed tuning on a local 3-node Ray cluster: same choice as sequential, faults, resume, bad input.

The workload is tests/core's toy backend (a numpy MLP with an int8 kernel) on scikit-learn's digits;
every trial runs as a Ray task on one of the nodes, the driver (this process) writes the history.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import _workload
import pytest

import inc_core as inc
from inc_core.errors import BackendNotFoundError, ConfigError, EvaluationError, TuningError
from inc_core.tuning import RayExecutor, SequentialExecutor, TuningResult, autotune

HERE = Path(__file__).resolve().parent
_REFERENCE: dict[str, TuningResult] = {}


def sequential(workload: Any, strategy: str) -> TuningResult:
    """The in-process run every Ray run is compared with (computed once per strategy)."""
    if strategy not in _REFERENCE:
        model, data, x, y = workload
        _REFERENCE[strategy] = autotune(model, _workload.tuning(strategy), eval_fn=_workload.Accuracy(x, y), dataset=data,
                                        executor=SequentialExecutor())
    return _REFERENCE[strategy]


def on_ray(workload: Any, strategy: str = "basic", *, workers: int = 3, eval_fn: Any = None, **kwargs: Any) -> TuningResult:
    model, data, x, y = workload
    with RayExecutor(workers=workers) as executor:
        return autotune(model, _workload.tuning(strategy, **kwargs), eval_fn=eval_fn or _workload.Accuracy(x, y),
                        dataset=data, executor=executor)


def history_trials(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text(encoding="utf-8"))["trials"]


# --- same choice as sequential ---------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["basic", "exhaustive", "conservative", "random"])
def test_three_workers_choose_what_the_sequential_run_chooses(cluster: Any, workload: Any, strategy: str) -> None:
    reference = sequential(workload, strategy)
    result = on_ray(workload, strategy)
    assert len(reference.trials) >= 3  # several batches, so the comparison means something
    assert _workload.summary(result) == _workload.summary(reference)
    assert (result.trial_id, result.config, result.score) == (reference.trial_id, reference.config, reference.score)
    assert result.met and result.score >= result.baseline * 0.99
    driver = f":{os.getpid()}"
    assert all(t.worker is not None and not t.worker.endswith(driver) for t in result.trials)  # ran on workers
    assert result.executor.startswith("ray (3 workers")


def test_bayesian_with_one_worker_is_the_sequential_search(cluster: Any, workload: Any) -> None:
    assert _workload.summary(on_ray(workload, "bayesian", workers=1)) == _workload.summary(sequential(workload, "bayesian"))


def test_bayesian_batches_are_reproducible_for_a_seed_and_worker_count(cluster: Any, workload: Any) -> None:
    first, second = on_ray(workload, "bayesian"), on_ray(workload, "bayesian")
    assert _workload.summary(first) == _workload.summary(second)
    assert len({t.key for t in first.trials}) == len(first.trials)  # batched asks never repeat a config
    assert first.met


def test_tuning_config_executor_ray_uses_the_cluster(cluster: Any, workload: Any, tmp_path: Path) -> None:
    model, data, x, y = workload
    config = _workload.tuning("basic", executor="ray", workers=2, history=str(tmp_path / "h.json"))
    result = autotune(model, config, eval_fn=_workload.Accuracy(x, y), dataset=data)
    assert _workload.summary(result) == _workload.summary(sequential(workload, "basic"))
    assert result.executor.startswith("ray (2 workers")
    assert all("worker" in t for t in history_trials(tmp_path / "h.json"))
    report = result.report(tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| executor | ray (2 workers" in report and f"on {result.trials[0].worker}" in report


def test_the_model_goes_to_the_object_store_once_per_run(cluster: Any, workload: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="inc"):
        result = on_ray(workload, "basic")
    batches = 4  # basic with keep_searching: base, op-type-wise, single fallbacks, accumulated fallbacks
    assert len(result.trials) > batches
    assert sum("put in the object store" in r.getMessage() for r in caplog.records) == 1


# --- faults ------------------------------------------------------------------------------------------
def test_a_worker_killed_mid_trial_costs_one_retry_and_changes_nothing(cluster: Any, workload: Any, tmp_path: Path) -> None:
    model, data, x, y = workload
    marker = tmp_path / "killed"
    result = on_ray(workload, eval_fn=_workload.Accuracy(x, y, crash="once", marker=str(marker)))
    assert marker.exists()  # a worker did kill itself (SIGKILL) in the middle of a trial
    assert not any(t.failed for t in result.trials)
    assert _workload.summary(result) == _workload.summary(sequential(workload, "basic"))


def test_a_trial_whose_worker_dies_again_is_a_failed_trial_and_the_search_goes_on(cluster: Any, workload: Any) -> None:
    model, data, x, y = workload
    result = on_ray(workload, eval_fn=_workload.Accuracy(x, y, crash="kl"))
    failed = [t for t in result.trials if t.failed]
    assert [t.change for t in failed] == ["Dense.calibration=kl"]
    assert "worker running this trial died after 1 retry" in (failed[0].error or "")
    reference = [s for s in _workload.summary(sequential(workload, "basic")) if '"kl"' not in s[0]]
    assert [s for s in _workload.summary(result) if '"kl"' not in s[0]] == reference
    assert result.met and result.config == sequential(workload, "basic").config


def test_an_eval_fn_error_on_a_worker_stops_the_run_as_in_process(cluster: Any, workload: Any) -> None:
    def broken(model: Any) -> float:
        if type(model).__name__ == "QuantizedMLP":
            raise ValueError("validation set not found")
        return 1.0

    with pytest.raises(EvaluationError, match="validation set not found"):
        on_ray(workload, eval_fn=broken)


def test_an_eval_fn_that_cannot_travel_to_the_workers_is_a_clear_error(cluster: Any, workload: Any) -> None:
    model, data, x, y = workload
    lock = threading.Lock()  # what a closure over an open session or a data loader's worker pool looks like

    def holds_a_lock(model: Any) -> float:
        with lock:
            return _workload.Accuracy(x, y)(model)

    with pytest.raises(TuningError, match=r"cannot be sent to the Ray workers \(TypeError: .*lock.*make eval_fn a module-level"):
        on_ray(workload, eval_fn=holds_a_lock)


def test_a_module_the_workers_cannot_import_is_a_clear_error(cluster: Any, workload: Any, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "driver_only_metric.py").write_text(
        "import _workload\n\nclass Metric(_workload.Accuracy):\n    pass\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # on the driver's path only, not on the workers'
    import driver_only_metric

    model, data, x, y = workload
    with pytest.raises(TuningError, match=r"could not run on its Ray worker \(.*driver_only_metric.*runtime_env"):
        on_ray(workload, eval_fn=driver_only_metric.Metric(x, y))


def _start_child(cluster: Any, history: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HERE / "_ray_tuning_child.py"), cluster.address, str(history), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _wait_for_trials(child: subprocess.Popen[str], history: Path, count: int) -> None:
    deadline = time.monotonic() + 120  # a guard against a hung child, not a timing assertion
    while time.monotonic() < deadline and child.poll() is None:
        if history.exists() and len(history_trials(history)) >= count:
            return
        time.sleep(0.05)
    child.kill()
    pytest.fail(f"the child driver ended or hung before {count} trials: {child.communicate()[0][-3000:]}")


def _resume_and_check(workload: Any, history: Path, done_before: int) -> None:
    model, data, x, y = workload
    with RayExecutor(workers=3) as executor:
        result = autotune(model, _workload.tuning(history=str(history)), eval_fn=_workload.Accuracy(x, y), dataset=data,
                          executor=executor)
    statuses = [t.status for t in result.trials]
    assert statuses[:done_before] == ["resumed"] * done_before
    assert statuses[done_before:] == ["evaluated"] * (len(statuses) - done_before)
    assert _workload.summary(result) == _workload.summary(sequential(workload, "basic"))


def test_history_resumes_after_the_driver_is_killed(cluster: Any, workload: Any, tmp_path: Path) -> None:
    history = tmp_path / "tuning.json"
    child = _start_child(cluster, history)
    _wait_for_trials(child, history, 2)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    done_before = len(history_trials(history))  # the file is whole: every write is atomic
    assert 2 <= done_before < len(sequential(workload, "basic").trials)
    _resume_and_check(workload, history, done_before)


def test_ctrl_c_cancels_the_trials_in_flight_and_the_history_resumes(cluster: Any, workload: Any, tmp_path: Path) -> None:
    history = tmp_path / "tuning.json"
    child = _start_child(cluster, history, "--interrupt-after", "2")  # KeyboardInterrupt in the driver, trials in flight
    output = child.communicate(timeout=180)[0]
    assert child.returncode == 130 and "INTERRUPTED" in output, output[-3000:]
    assert "ray: cancelled" in output  # the outstanding tasks were cancelled, not left running
    done_before = len(history_trials(history))
    assert done_before < len(sequential(workload, "basic").trials)
    _resume_and_check(workload, history, done_before)


# --- bad input ---------------------------------------------------------------------------------------
def test_executor_ray_without_ray_installed_names_the_extra(workload: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError, as without the package
    model, data, x, y = workload
    calls: list[Any] = []
    with pytest.raises(BackendNotFoundError, match=r"pip install inc-core\[ray\]"):
        autotune(model, _workload.tuning(executor="ray"), eval_fn=calls.append, dataset=data)
    assert calls == []  # nothing was evaluated
    with pytest.raises(ImportError, match=r"inc-core\[ray\]"):  # BackendNotFoundError is an ImportError too
        RayExecutor()


def test_an_unreachable_address_is_a_clear_error_before_anything_runs(tmp_path: Path) -> None:
    # A fresh process: this one is already connected to the test cluster.
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import _workload\n"
        "from inc_core.tuning import autotune\n"
        "from inc_core.errors import TuningError\n"
        "model, data, x, y = _workload.trained(); calls = []\n"
        "try:\n"
        "    autotune(model, _workload.tuning(executor='ray', address='127.0.0.1:1', history=sys.argv[2]),\n"
        "             eval_fn=calls.append, dataset=data)\n"
        "except TuningError as exc:\n"
        "    print('ERROR', exc, 'CALLS', len(calls))\n"
    )
    history = tmp_path / "h.json"
    out = subprocess.run([sys.executable, "-c", script, str(HERE), str(history)], capture_output=True, text=True, timeout=300)
    assert "ERROR RayExecutor: cannot reach a Ray cluster at address '127.0.0.1:1'" in out.stdout, out.stdout + out.stderr
    assert "nothing was run" in out.stdout and out.stdout.rstrip().endswith("CALLS 0")
    assert not history.exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"executor": "dask"}, r"executor"),
        ({"executor": "ray", "workers": 0}, r"workers must be >= 1"),
        ({"executor": "ray", "workers": 2.5}, r"workers must be an int"),
        ({"executor": "ray", "address": "not an address"}, r"address 'not an address' names no host and port"),
        ({"executor": "ray", "address": "ray://head"}, None),  # the Ray client's default port
        ({"executor": "ray", "address": "http://head:8265"}, r"names no host and port"),
        ({"workers": 4}, r"executor='sequential'. Set executor='ray'"),
        ({"address": "auto"}, r"executor='sequential'"),
    ],
)
def test_executor_settings_are_validated(kwargs: dict[str, Any], message: str | None) -> None:
    if message is None:
        inc.TuningConfig(**kwargs)
        return
    with pytest.raises(ConfigError, match=message):
        inc.TuningConfig(**kwargs)


def test_executor_settings_round_trip_through_json() -> None:
    config = inc.TuningConfig(executor="ray", workers=4, address="ray://head:10001")
    data = config.to_dict()
    assert data["type"] == "TuningConfig" and (data["executor"], data["workers"], data["address"]) == ("ray", 4, "ray://head:10001")
    assert inc.TuningConfig.from_json(config.to_json()) == config
    old = {k: v for k, v in inc.TuningConfig().to_dict().items() if k not in ("executor", "workers", "address")}
    assert inc.TuningConfig.from_dict(old).executor == "sequential"  # payloads written before these fields


@pytest.mark.parametrize(("kwargs", "message"), [({"workers": 0}, "workers"), ({"max_retries": -1}, "max_retries"),
                                                 ({"address": "nowhere"}, "address"), ({"cpus_per_trial": 0}, "cpus_per_trial")])
def test_ray_executor_arguments_are_validated(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RayExecutor(**kwargs)
