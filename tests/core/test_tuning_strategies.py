"""Each strategy's walk through the synthetic space, checked trial by trial against hand computation.

The synthetic model (see _synthetic_backend) has ops conv1, conv2 (Conv) and fc1, fc2 (MatMul).
A quantized op costs 0.001; conv2 costs 0.03 more and fc2 0.02 more (sensitive ops); a MatMul op
costs 0.02 more unless its calibration is "kl"; a per-tensor Conv op costs 0.004 more. The FP32
baseline is 1.0 and the goal (1% relative) is a score >= 0.99.

Per-op penalties at the base config:   conv1 .001  conv2 .031  fc1 .021  fc2 .041  (sum .094)
... with MatMul calibration = kl:      conv1 .001  conv2 .031  fc1 .001  fc2 .021  (sum .054)
"""

from __future__ import annotations

import sys
from typing import Any

import _synthetic_backend as sb
import pytest

import inc_core as inc
from inc_core._tuning_config import STRATEGIES
from inc_core.errors import ConfigError, TuningError
from inc_core.tuning import STRATEGY_REGISTRY, TuningResult, autotune

sb.register()

KL = "MatMul.calibration=kl"


def tune(strategy: str, model: sb.SyntheticModel | None = None, backend: str = "synthetic", **kwargs: Any) -> tuple[TuningResult, sb.SyntheticModel]:
    model = model or sb.SyntheticModel()
    config = inc.TuningConfig(strategy=strategy, **kwargs)
    result = autotune(model, config, eval_fn=sb.score, dataset=sb.calib_data(), backend=backend)
    return result, model


def walk(result: TuningResult) -> list[tuple[str, float]]:
    return [(t.change, round(t.score, 9)) for t in result.trials]


def test_every_configurable_strategy_is_registered() -> None:
    assert sorted(STRATEGY_REGISTRY) == sorted(STRATEGIES)
    assert all(cls.name == name for name, cls in STRATEGY_REGISTRY.items())


def test_basic_walks_base_then_op_types_then_ranked_fallback() -> None:
    result, model = tune("basic")
    assert walk(result) == [
        ("base", 0.906),  # 1 - .094
        # Conv: calibration does not matter for Conv, per-tensor costs 2 x .004: nothing beats .906, nothing kept
        ("Conv.calibration=kl", 0.906),
        ("Conv.calibration=percentile", 0.906),
        ("Conv.granularity=per_tensor", 0.898),
        # MatMul: kl removes 2 x .02 and is kept; sym changes nothing
        (KL, 0.946),
        ("MatMul.scheme=sym", 0.906),
        # each op alone in FP32 on top of kl: gains conv2 .031 > fc2 .021 > conv1 = fc1 .001
        (f"{KL}; fp32: conv1", 0.947),
        (f"{KL}; fp32: conv2", 0.977),
        (f"{KL}; fp32: fc1", 0.947),
        (f"{KL}; fp32: fc2", 0.967),
        # accumulated in that order: {conv2} was trial 8 (not repeated), {conv2, fc2} passes
        (f"{KL}; fp32: conv2, fc2", 0.998),
    ]
    assert [t.met for t in result.trials] == [False] * 10 + [True]
    assert result.met and result.trial_id == 11 and result.stop_reason == "met"
    assert result.score == pytest.approx(0.998)
    assert result.config.exclude.names == ("conv2", "fc2")
    assert result.config.overrides == {"MatMul": {"calibration": "kl"}}
    assert result.model.config == result.config  # the model kept from trial 11, not re-quantized
    assert model.calls == {"calibrate": 1, "quantize": 11}


def test_mse_ranks_fallback_by_backend_op_errors_without_single_op_trials() -> None:
    result, model = tune("mse")
    # Trials 1-6 are basic's; op_errors at the kl config rank conv2 (.031) > fc2 (.021) > conv1 = fc1 (.001).
    assert walk(result)[6:] == [(f"{KL}; fp32: conv2", 0.977), (f"{KL}; fp32: conv2, fc2", 0.998)]
    assert len(result.trials) == 8 and result.met and result.trial_id == 8
    assert result.config.exclude.names == ("conv2", "fc2")
    assert model.calls == {"calibrate": 1, "quantize": 8, "op_errors": 1}


def test_mse_ranks_highest_error_first() -> None:
    # Make fc2 the worst op (.071 at the kl config, conv2 .031; sum .104): it goes to FP32 first, then conv2.
    model = sb.SyntheticModel(sensitive={"conv2": 0.03, "fc2": 0.07})
    result, _ = tune("mse", model)
    # (fallback names are stored in model order, whatever order they were added in)
    assert walk(result)[6:] == [(f"{KL}; fp32: fc2", 0.967), (f"{KL}; fp32: conv2, fc2", 0.998)]


def test_mse_refuses_a_backend_without_op_errors_before_any_work() -> None:
    model = sb.SyntheticModel()
    calls = []
    with pytest.raises(TuningError, match=r"the synthetic_plain backend does not report per-op errors; use strategy='basic'"):
        autotune(model, inc.TuningConfig(strategy="mse"), eval_fn=calls.append, dataset=sb.calib_data(), backend="synthetic_plain")
    assert calls == [] and model.calls == {}


def test_exhaustive_tries_every_setting_combination_then_fallback_sets_by_size() -> None:
    result, model = tune("exhaustive")
    # 3 Conv calibrations x 2 granularities x 2 MatMul calibrations x 2 schemes = 24 combinations, base first.
    assert result.trials[0].change == "base"
    assert result.trials[23].change == (
        "Conv.calibration=percentile; Conv.granularity=per_tensor; MatMul.calibration=kl; MatMul.scheme=sym"
    )
    assert len({t.key for t in result.trials[:24]}) == 24
    # The best combination (.946) is the first with kl: (minmax, per_channel, kl, asym), trial 3.
    assert result.trials[2].change == KL
    # Then on it: 4 single ops (25-28), then pairs in model order until {conv2, fc2} (29-33) passes.
    assert [t.change for t in result.trials[24:]] == [
        f"{KL}; fp32: {s}"
        for s in ("conv1", "conv2", "fc1", "fc2", "conv1, conv2", "conv1, fc1", "conv1, fc2", "conv2, fc1", "conv2, fc2")
    ]
    assert len(result.trials) == 33 and result.met and result.score == pytest.approx(0.998)
    assert model.calls["calibrate"] == 1


def test_conservative_starts_fp32_and_returns_the_most_quantized_passing_config() -> None:
    result, _ = tune("conservative")
    assert walk(result) == [
        ("fp32: conv1, conv2, fc1, fc2", 1.0),  # passes trivially; the search goes on
        ("fp32: fc1, fc2", 0.968),  # Conv back: conv1 .001 + conv2 .031 -> rejected
        ("fp32: conv1, conv2", 0.938),  # MatMul back: fc1 .021 + fc2 .041 -> rejected
        ("fp32: conv2, fc1, fc2", 0.999),  # conv1 alone back: kept
        # conv2 alone back would be trial 2 again: not repeated
        ("fp32: conv2, fc2", 0.978),  # fc1 back: rejected
        ("fp32: conv2, fc1", 0.958),  # fc2 back: rejected
    ]
    assert result.trial_id == 4 and result.met and result.stop_reason == "exhausted"
    assert result.config.exclude.names == ("conv2", "fc1", "fc2")
    assert result.model.config == result.config


@pytest.mark.parametrize("strategy", ["random", "bayesian"])
def test_sampling_strategies_find_a_passing_config_reproducibly(strategy: str) -> None:
    # A 0.5% goal: conv2 and fc2 in FP32 and fc1 in FP32 or kl (about 1 point in 7 of 384).
    result, _ = tune(strategy, tolerable_loss=0.005, max_trials=40, seed=3)
    assert result.met and result.score >= 0.995 - 1e-12
    assert {"conv2", "fc2"} <= set(result.config.exclude.names)
    assert result.trials[0].change == "base"
    assert len({t.key for t in result.trials}) == len(result.trials)  # never the same config twice
    again, _ = tune(strategy, tolerable_loss=0.005, max_trials=40, seed=3)
    assert [t.key for t in again.trials] == [t.key for t in result.trials]


@pytest.mark.parametrize("strategy", ["random", "bayesian", "exhaustive"])
def test_strategies_end_when_the_space_is_exhausted(strategy: str) -> None:
    # One Conv op: 3 calibrations x 2 granularities x {quantized, FP32} = 12 points (exhaustive: 6 + 1).
    model = sb.SyntheticModel(ops=(("conv1", "Conv"),), sensitive={}, global_penalty=0.5)
    result, _ = tune(strategy, model, max_trials=100)
    expected = 7 if strategy == "exhaustive" else 12
    assert len(result.trials) == expected and len({t.key for t in result.trials}) == expected
    assert result.stop_reason == "exhausted" and not result.met
    assert result.config.exclude.names == ("conv1",) and result.score == pytest.approx(0.5)


def test_bayesian_without_optuna_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # makes `import optuna` fail
    with pytest.raises(ConfigError, match=r"pip install optuna.*inc-core\[bayesian\]"):
        tune("bayesian")


def test_bayesian_restores_optuna_logging() -> None:
    import optuna

    before = optuna.logging.get_verbosity()
    tune("bayesian", max_trials=3)
    assert optuna.logging.get_verbosity() == before
