"""Failed trials: a config the backend cannot quantize is recorded with its cause and the search goes on.

The synthetic backend's quantizer raises numpy's "truth value of an array is ambiguous" ValueError
whenever conv2 is quantized per channel (the default), the way ONNX Runtime's QDQ quantizer fails on
a per-channel MatMul with a bias Add. Per-tensor Conv works. With the basic strategy (scores from the
synthetic penalties, see _synthetic_backend):

    1 base                      FAILED (conv2 per channel)
    2 Conv.calibration=kl       FAILED
    3 Conv.calibration=percentile FAILED
    4 Conv.granularity=per_tensor .898  (kept)
    5 + MatMul.calibration=kl    .938  (kept)   6 + MatMul.scheme=sym .898
    7-10 single fallbacks conv1 .943, conv2 .973, fc1 .939, fc2 .959
    11 fp32 {conv2} (tried as trial 8), so 11 = {conv2, fc2} .994 meets the goal
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import _synthetic_backend as sb
import pytest

import inc_core as inc
from inc_core.errors import CalibrationError, EvaluationError, TuningError
from inc_core.tuning import TuningResult, autotune
from inc_core.tuning._trial import Trial

sb.register()

CAUSE = "ValueError: The truth value of an array with more than one element is ambiguous"


def failing_model(**kwargs: Any) -> sb.SyntheticModel:
    return sb.SyntheticModel(fails=sb.per_channel_conv2_fails, **kwargs)


def tune(model: sb.SyntheticModel, **kwargs: Any) -> TuningResult:
    return autotune(model, inc.TuningConfig(**kwargs), eval_fn=sb.score, dataset=sb.calib_data(), backend="synthetic")


def test_a_failing_base_config_does_not_stop_the_search() -> None:
    model = failing_model()
    result = tune(model)
    failed = [t for t in result.trials if t.failed]
    assert [t.id for t in failed] == [1, 2, 3]
    assert all(t.status == "failed" and t.score is None and not t.met and t.error.startswith(CAUSE) for t in failed)
    assert [round(t.score, 9) for t in result.trials[3:]] == [0.898, 0.938, 0.898, 0.943, 0.973, 0.939, 0.959, 0.994]
    assert result.met and result.trial_id == 11 and result.score == pytest.approx(0.994)
    assert result.config.overrides["Conv"] == {"granularity": "per_tensor"}
    assert result.config.exclude.names == ("conv2", "fc2")
    assert result.model.config == result.config
    assert model.calls["failed"] == 3


def test_failed_trials_are_logged_as_warnings_with_their_cause(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="inc"):
        tune(failing_model())
    failed = [r for r in caplog.records if "FAILED" in r.getMessage()]
    assert len(failed) == 3 and all(r.levelno == logging.WARNING for r in failed)
    assert failed[0].getMessage().startswith("trial 1/100: FAILED in the synthetic backend, going on with the search (base)")
    assert CAUSE in failed[0].getMessage()
    assert "Conv.calibration=kl" in failed[1].getMessage()


def test_failed_trials_are_plain_json_in_the_history(tmp_path: Path) -> None:
    history = tmp_path / "h.json"
    tune(failing_model(), history=str(history))
    trials = sb.history_trials(history)
    assert trials[0]["status"] == "failed" and trials[0]["score"] is None and trials[0]["met"] is False
    assert trials[0]["error"].startswith(CAUSE)
    assert trials[3]["error"] is None and trials[3]["score"] == pytest.approx(0.898)
    json.dumps(trials)  # plain JSON through and through


def test_resume_does_not_retry_failed_trials(tmp_path: Path) -> None:
    history = tmp_path / "h.json"
    # Three trials, all of them failed: nothing produced a model, so this first run raises.
    with pytest.raises(TuningError, match="none of the 3 trials produced a model"):
        tune(failing_model(), history=str(history), max_trials=3)
    assert [t["status"] for t in sb.history_trials(history)] == ["failed"] * 3
    model = failing_model()
    result = tune(model, history=str(history))
    assert model.calls["failed"] == 0, "a failed trial from the history was quantized again"
    assert [t.status for t in result.trials[:4]] == ["resumed", "resumed", "resumed", "evaluated"]
    assert all(t.failed and t.error.startswith(CAUSE) for t in result.trials[:3])
    assert result.met and result.trial_id == 11


def test_every_trial_failing_raises_tuning_error_with_the_distinct_causes(tmp_path: Path) -> None:
    def fails(config: inc.QuantConfig) -> BaseException:
        if not config.exclude.matches("conv1", "Conv"):
            return RuntimeError("no INT8 kernel for Conv with dilation 2")
        return ValueError("Failed to find proper ai.onnx domain")

    history = tmp_path / "h.json"
    with pytest.raises(TuningError) as info:
        tune(sb.SyntheticModel(fails=fails), history=str(history))
    message = str(info.value)
    assert "none of the 13 trials produced a model (stopped: exhausted)" in message
    assert "2 distinct causes" in message
    assert "RuntimeError: no INT8 kernel for Conv with dilation 2 (trials 1, 2, 3, 4, 5, 6, 8, 9, 10)" in message
    assert "ValueError: Failed to find proper ai.onnx domain (trials 7, 11, 12, 13)" in message
    assert str(history) in message
    assert len(sb.history_trials(history)) == 13  # every failure is on disk


def test_all_failing_within_the_budget_says_it_stopped_there() -> None:
    with pytest.raises(TuningError, match=r"none of the 2 trials produced a model \(stopped: max_trials\)"):
        tune(failing_model(), max_trials=2)


@pytest.mark.parametrize("strategy", ["basic", "mse", "bayesian", "random", "exhaustive", "conservative"])
def test_every_strategy_treats_a_failed_trial_as_below_the_goal_and_goes_on(strategy: str) -> None:
    model = failing_model()
    result = tune(model, strategy=strategy, max_trials=60, keep_searching=strategy in ("random", "bayesian"))
    failed = [t for t in result.trials if t.failed]
    assert failed, "the per-channel conv2 configs were never tried"
    assert any(t.id > failed[0].id and not t.failed for t in result.trials), "the search stopped at a failure"
    assert not result.trial.failed and result.model is not None and result.model.config == result.config
    # The chosen config avoids the failure: conv2 per tensor, or conv2 in FP32.
    assert sb.per_channel_conv2_fails(result.config) is None
    assert result.met


def test_conservative_keeps_an_op_type_in_fp32_when_quantizing_it_fails() -> None:
    result = tune(failing_model(), strategy="conservative")
    changes = {t.change: t for t in result.trials}
    # Conv back as a type fails (conv2 per channel): the type is rejected, then conv1 alone comes back.
    assert changes["fp32: fc1, fc2"].failed
    assert "conv2" in result.config.exclude.names and "conv1" not in result.config.exclude.names


def test_bayesian_tells_optuna_the_trial_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    optuna = pytest.importorskip("optuna")
    states: list[Any] = []
    original = optuna.study.Study.tell

    def tell(self: Any, trial: Any, values: Any = None, state: Any = None, **kwargs: Any) -> Any:
        states.append(state)
        return original(self, trial, values, state=state, **kwargs)

    monkeypatch.setattr(optuna.study.Study, "tell", tell)
    result = tune(failing_model(), strategy="bayesian", max_trials=30, keep_searching=True)
    told_failed = states.count(optuna.trial.TrialState.FAIL)
    assert told_failed >= sum(1 for t in result.trials if t.failed and t.id > 1) > 0


def test_mse_ranks_in_model_order_when_op_errors_fail(caplog: pytest.LogCaptureFixture) -> None:
    def fails(config: inc.QuantConfig) -> BaseException | None:
        if not config.exclude.names and config.setting("conv1", "Conv", "calibration") == "minmax":
            return RuntimeError("op_errors broke")
        return None

    model = sb.SyntheticModel(fails=fails)
    with caplog.at_level(logging.WARNING, logger="inc"):
        result = tune(model, strategy="mse", search_space={"calibration": ("minmax",), "granularity": ("per_channel",)})
    assert model.calls["op_errors"] == 1
    assert any("per-op errors could not be measured" in r.getMessage() and "op_errors broke" in r.getMessage() for r in caplog.records)
    # base and MatMul.scheme=sym failed; the ops go to FP32 in model order (1, 2, then all 4), with no
    # single-op trials
    assert [t.change for t in result.trials[2:]] == ["fp32: conv1", "fp32: conv1, conv2", "fp32: conv1, conv2, fc1, fc2"]
    assert result.trials[0].failed and result.trials[1].failed and result.met


class PicklingExecutor:
    """Sends every outcome through pickle, as a process pool or a Ray cluster would."""

    def map(self, fn: Callable[[Any], Any], candidates: Sequence[Any]) -> Iterable[Any]:
        return [pickle.loads(pickle.dumps(fn(c))) for c in candidates]


def test_failures_are_captured_inside_the_trial_function_for_any_executor() -> None:
    result = autotune(
        failing_model(), inc.TuningConfig(), eval_fn=sb.score, dataset=sb.calib_data(), backend="synthetic",
        executor=PicklingExecutor(),
    )
    assert [t.id for t in result.trials if t.failed] == [1, 2, 3] and result.met and result.trial_id == 11


def test_eval_fn_raising_is_still_an_evaluation_error_not_a_failed_trial() -> None:
    def eval_fn(model: Any) -> float:
        if isinstance(model, sb.QuantizedSynthetic):
            raise IndexError("labels out of range")
        return 1.0

    with pytest.raises(EvaluationError, match="IndexError while evaluating trial 4"):
        autotune(failing_model(), inc.TuningConfig(), eval_fn=eval_fn, dataset=sb.calib_data(), backend="synthetic")


def test_a_third_party_calibration_failure_is_a_calibration_error() -> None:
    model = sb.SyntheticModel(calibrate_error=IndexError("index 3 is out of bounds for axis 1 with size 3"))
    with pytest.raises(CalibrationError, match=r"failed to calibrate the model \(IndexError: index 3 is out of bounds") as info:
        tune(model)
    assert isinstance(info.value.__cause__, IndexError)


def test_report_shows_failed_trials_and_their_causes(tmp_path: Path) -> None:
    result = tune(failing_model())
    md = result.report(tmp_path / "tuning.md")
    text = md.read_text(encoding="utf-8")
    assert "| 1 | base | - | - |" in text and "| no | FAILED |" in text
    assert "11 (stopped: met), 3 failed" in text
    assert "## Failed trials" in text and f"- trials 1, 2, 3: `{CAUSE}" in text
    data = json.loads((tmp_path / "tuning.json").read_text(encoding="utf-8"))
    assert data["failed_trials"] == 3 and data["trials"][0]["error"].startswith(CAUSE)
    if (tmp_path / "tuning.png").exists():  # with matplotlib installed
        assert (tmp_path / "tuning.png").read_bytes()[:4] == b"\x89PNG"


def test_a_failed_trial_record_round_trips_and_a_malformed_one_is_refused() -> None:
    trial = Trial(id=1, config=inc.QuantConfig().to_dict(), delta={}, score=None, met=False, time_s=0.1, status="failed", error="E: x")
    back = Trial.from_dict(json.loads(json.dumps(trial.to_dict())))
    assert back == trial and back.failed
    with pytest.raises(TuningError, match="a failed trial has a text cause and no score"):
        Trial.from_dict({**trial.to_dict(), "score": 0.5})
