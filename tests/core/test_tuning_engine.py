"""The tuning loop: calibration once, the criterion, stopping, the chosen model, errors, the executor seam.

Scores are worked out from the synthetic penalties (see test_tuning_strategies' docstring): the basic
strategy's trials at the default model score .906 .906 .906 .898 .946 .906 .947 .977 .947 .967 .998.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import _synthetic_backend as sb
import numpy as np
import pytest

import inc_core as inc
from inc_core.errors import ConfigError, DatasetError, EvaluationError, SaveError
from inc_core.tuning import Criterion, TuningResult, autotune

sb.register()

BASIC_SCORES = [0.906, 0.906, 0.906, 0.898, 0.946, 0.906, 0.947, 0.977, 0.947, 0.967, 0.998]


def tune(model: sb.SyntheticModel | None = None, eval_fn: Callable[[Any], Any] = sb.score, **kwargs: Any) -> TuningResult:
    return autotune(model or sb.SyntheticModel(), inc.TuningConfig(**kwargs), eval_fn=eval_fn, dataset=sb.calib_data(), backend="synthetic")


# --- calibration ---------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["basic", "mse", "exhaustive", "conservative", "random", "bayesian"])
def test_calibration_runs_once_and_every_trial_reuses_it(strategy: str) -> None:
    model = sb.SyntheticModel()
    base = inc.QuantConfig(calib_samples=3)
    result = tune(model, strategy=strategy, base=base, max_trials=40)
    assert model.calls["calibrate"] == 1
    assert model.calls["quantize"] == len(result.trials)  # the chosen model is kept, not quantized again
    assert result.model.calibration == {"samples": 3}  # what calibrate returned (3 of the 4 samples)


def test_dynamic_quantization_never_calibrates_and_needs_no_dataset() -> None:
    model = sb.SyntheticModel()
    config = inc.TuningConfig(base=inc.QuantConfig(approach="dynamic"))
    result = autotune(model, config, eval_fn=sb.score, backend="synthetic")
    assert "calibrate" not in model.calls and result.model.calibration is None
    assert [round(t.score, 9) for t in result.trials] == BASIC_SCORES


def test_static_tuning_without_a_dataset_is_refused() -> None:
    with pytest.raises(DatasetError, match=r"autotune\(dataset=\.\.\.\) is required for static quantization"):
        autotune(sb.SyntheticModel(), inc.TuningConfig(), eval_fn=sb.score, backend="synthetic")


# --- criterion -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("baseline", "tol", "loss_type", "higher", "threshold"),
    [
        (2.0, 0.01, "relative", True, 1.98),
        (2.0, 0.01, "relative", False, 2.02),
        (2.0, 0.01, "absolute", True, 1.99),
        (2.0, 0.01, "absolute", False, 2.01),
        (-4.0, 0.25, "relative", True, -5.0),  # relative to |baseline|
        (0.0, 0.5, "relative", True, 0.0),
    ],
)
def test_criterion_threshold(baseline: float, tol: float, loss_type: str, higher: bool, threshold: float) -> None:
    c = Criterion(baseline=baseline, tolerable_loss=tol, loss_type=loss_type, higher_is_better=higher)
    assert c.threshold == pytest.approx(threshold)
    step = 1e-6 if higher else -1e-6
    assert c.met(threshold) and c.met(threshold + step) and not c.met(threshold - step)


def test_criterion_passes_a_score_on_the_threshold_despite_rounding() -> None:
    c = Criterion(baseline=0.7, tolerable_loss=0.1, loss_type="relative")
    assert 0.7 - 0.07 != 0.7 * (1 - 0.1)  # the same threshold computed two ways differs in the last bit
    assert c.met(0.7 * (1 - 0.1)) and c.met(0.7 - 0.07)


def test_lower_is_better_scores_walk_the_same_way() -> None:
    # A loss: 2 - score, baseline 1.0; 1% relative means a loss <= 1.01, i.e. the same trials pass.
    result = tune(eval_fn=lambda m: 2.0 - sb.score(m), higher_is_better=False)
    assert [round(t.score, 9) for t in result.trials] == [round(2.0 - s, 9) for s in BASIC_SCORES]
    assert result.met and result.trial_id == 11 and result.threshold == pytest.approx(1.01)


@pytest.mark.parametrize(("tol", "loss_type", "trials"), [(0.02, "relative", 8), (0.04, "absolute", 8), (0.02, "absolute", 11)])
def test_relative_and_absolute_loss(tol: float, loss_type: str, trials: int) -> None:
    # Baseline 2.0: 2% relative allows a penalty of .04 like 0.04 absolute (trial 8, penalty .023, passes);
    # 0.02 absolute does not pass trial 8 and goes on to trial 11 (penalty .002).
    result = tune(sb.SyntheticModel(base_score=2.0), tolerable_loss=tol, loss_type=loss_type)
    assert len(result.trials) == trials and result.met
    assert result.trials[-1].score == pytest.approx(2.0 - (0.023 if trials == 8 else 0.002))


# --- stopping and the chosen model ----------------------------------------------------------------
def test_unreachable_goal_returns_the_best_trial_with_met_false() -> None:
    # Every quantized model loses 0.02 more: nothing reaches .99. Trials 1-11 are BASIC_SCORES - .02,
    # then {conv2, fc2, conv1} .979 and all four ops in FP32 .980, the best.
    model = sb.SyntheticModel(global_penalty=0.02)
    result = tune(model)
    assert [round(t.score, 9) for t in result.trials] == [round(s - 0.02, 9) for s in BASIC_SCORES] + [0.979, 0.98]
    assert not result.met and result.stop_reason == "exhausted"
    assert result.trial_id == 13 and result.score == pytest.approx(0.98)
    assert result.config == result.trials[12].quant_config
    assert result.config.exclude.names == ("conv1", "conv2", "fc1", "fc2")
    assert result.model is not None and result.model.config == result.config
    assert model.calls["quantize"] == 13


def test_trial_budget_returns_the_best_so_far() -> None:
    model = sb.SyntheticModel()
    result = tune(model, max_trials=5)
    assert len(result.trials) == 5 and result.stop_reason == "max_trials"
    assert not result.met and result.trial_id == 5 and result.score == pytest.approx(0.946)
    assert result.model.config == result.config and result.config.overrides == {"MatMul": {"calibration": "kl"}}
    assert model.calls["quantize"] == 5


def test_keep_searching_returns_the_best_passing_trial() -> None:
    result = tune(keep_searching=True)
    # After trial 11 (.998) the accumulation goes on: + conv1 (.999), + fc1 (1.0, every op in FP32).
    assert [round(t.score, 9) for t in result.trials[10:]] == [0.998, 0.999, 1.0]
    assert result.trial_id == 13 and result.met and result.stop_reason == "exhausted"


def test_timeout_stops_after_the_trial_in_progress() -> None:
    result = tune(timeout_s=1e-9)
    assert len(result.trials) == 1 and result.stop_reason == "timeout" and result.trial_id == 1


def test_search_space_limits_the_choices_tried() -> None:
    result = tune(search_space={"calibration": ("minmax", "kl")})
    changes = [t.change for t in result.trials]
    assert not any("percentile" in c for c in changes)
    # 1 base + Conv (kl, per_tensor) + MatMul (kl, sym) + 4 single fallbacks + {conv2, fc2}
    assert len(changes) == 10 and result.met


def test_base_exclusions_stay_and_are_never_tuned() -> None:
    base = inc.QuantConfig(exclude=inc.LayerFilter(names=("conv2",)))
    result = tune(base=base)
    # base .937 (conv1 .001, fc1 .021, fc2 .041), Conv x3, MatMul x2 (kl: .977), singles conv1, fc1, fc2 (.998)
    assert [t.change for t in result.trials][-3:] == [f"MatMul.calibration=kl; fp32: {n}" for n in ("conv1", "fc1", "fc2")]
    assert all("conv2" in t.config["exclude"]["names"] for t in result.trials)
    assert result.config.exclude.names == ("conv2", "fc2") and result.score == pytest.approx(0.998)


def test_backend_is_found_from_the_model_type() -> None:
    result = autotune(sb.SyntheticModel(), inc.TuningConfig(), eval_fn=sb.score, dataset=sb.calib_data())
    assert result.backend is not None and result.backend.name == "synthetic" and result.met


# --- bad input ---------------------------------------------------------------------------------------
def test_eval_fn_raising_on_the_baseline() -> None:
    with pytest.raises(EvaluationError, match="eval_fn raised ZeroDivisionError while evaluating the FP32 baseline") as info:
        tune(eval_fn=lambda m: 1 / 0)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_eval_fn_raising_on_a_trial_ends_the_run(tmp_path: Any) -> None:
    def eval_fn(model: Any) -> float:
        if isinstance(model, sb.QuantizedSynthetic) and model.config.overrides.get("Conv", {}).get("calibration") == "percentile":
            raise KeyError("labels")
        return sb.score(model)

    history = tmp_path / "h.json"
    with pytest.raises(EvaluationError, match=r"KeyError while evaluating trial 3 \(Conv.calibration=percentile\)"):
        tune(eval_fn=eval_fn, history=str(history))
    assert len(sb.history_trials(history)) == 2  # the finished trials are on disk


@pytest.mark.parametrize("bad", [math.nan, math.inf, "0.9", None, True, np.array([0.5, 0.6])])
def test_eval_fn_returning_a_non_finite_or_non_number(bad: Any) -> None:
    with pytest.raises(EvaluationError, match=r"eval_fn returned .* expected a finite real number") as info:
        tune(eval_fn=lambda m: bad)
    assert repr(bad) in str(info.value)


def test_eval_fn_returning_nan_on_a_trial() -> None:
    with pytest.raises(EvaluationError, match=r"eval_fn returned nan .* for trial 1 \(base\)"):
        tune(eval_fn=lambda m: 1.0 if isinstance(m, sb.SyntheticModel) else math.nan)


@pytest.mark.parametrize("value", [np.float32(0.5), np.array(0.5), 1])
def test_eval_fn_may_return_numpy_scalars_and_ints(value: Any) -> None:
    result = tune(eval_fn=lambda m: value, max_trials=1)
    assert result.baseline == 0.5 or result.baseline == 1.0
    assert isinstance(result.score, float) and result.met


def test_exclude_names_matching_no_op_are_rejected_before_any_work() -> None:
    model, calls = sb.SyntheticModel(), []
    base = inc.QuantConfig(exclude=inc.LayerFilter(names=("conv_2",)))
    with pytest.raises(ConfigError, match=r"\['conv_2'\] match no op.*'conv2'"):
        autotune(model, inc.TuningConfig(base=base), eval_fn=calls.append, dataset=sb.calib_data(), backend="synthetic")
    assert calls == [] and model.calls == {}


def test_excluding_every_op_leaves_nothing_to_tune() -> None:
    base = inc.QuantConfig(exclude=inc.LayerFilter(types=("Conv", "MatMul")))
    with pytest.raises(ConfigError, match="keeps every op of the model in FP32"):
        tune(base=base)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"config": inc.QuantConfig()}, ConfigError, "config must be an inc.TuningConfig, got QuantConfig"),
        ({"eval_fn": 0.9}, ConfigError, "eval_fn must be a callable"),
        ({"executor": object()}, ConfigError, "executor must have a map"),
        ({"config": inc.TuningConfig(history="/nonexistent-dir/h.json")}, SaveError, "does not exist"),
        ({"config": inc.TuningConfig(base=inc.QuantConfig(format="qdq"))}, ConfigError, "format='qdq' is not supported"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    args: dict[str, Any] = {"config": None, "eval_fn": sb.score, "dataset": sb.calib_data(), "backend": "synthetic"}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        autotune(sb.SyntheticModel(), **args)


# --- executor seam and progress ----------------------------------------------------------------------
class EagerExecutor:
    """Runs whole batches at once, as a parallel executor would."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def map(self, fn: Callable[[Any], Any], candidates: Sequence[Any]) -> Iterable[Any]:
        self.batches.append(len(candidates))
        return [fn(c) for c in candidates]


def test_an_eager_executor_gets_whole_batches_and_gives_the_same_result() -> None:
    model, executor = sb.SyntheticModel(), EagerExecutor()
    config = inc.TuningConfig()
    result = autotune(model, config, eval_fn=sb.score, dataset=sb.calib_data(), backend="synthetic", executor=executor)
    # base, Conv (3 changes), MatMul (2), single fallbacks (4), accumulated fallbacks (4, one already tried)
    assert executor.batches == [1, 3, 2, 4, 3]
    assert [round(t.score, 9) for t in result.trials] == BASIC_SCORES
    assert model.calls["quantize"] == 13 and model.calls["calibrate"] == 1  # 2 results past the passing one unused


def test_each_trial_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="inc"):
        tune()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("trial ")]
    assert len(lines) == 11
    assert lines[0].startswith("trial 1/100: score 0.906 (below the goal; baseline 1, goal >= 0.99) base")
    assert lines[-1].startswith("trial 11/100: score 0.998 (meets the goal")
