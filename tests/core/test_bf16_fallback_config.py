"""BF16 mixed precision in the core: QuantConfig.bf16, TuningConfig.fallback_precision, and what the result reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import _synthetic_backend as sb
import pytest

import inc_core as inc
from inc_core import QuantConfig, autotune, register_backend
from inc_core.errors import ConfigError

BF16_PENALTY = 0.0005  # a BF16 op loses a little, far less than an INT8 op of a sensitive layer


class Bf16SyntheticBackend(sb.SyntheticBackend):
    """The synthetic backend with BF16 ops: an op in ``config.bf16`` is neither INT8 nor free."""

    name = "synthetic_bf16"
    supports_bf16 = True

    def quantize(self, model: Any, config: QuantConfig, *, calibration: Any | None, inplace: bool = False) -> Any:
        return Bf16Quantized(super().quantize(model, config, calibration=calibration, inplace=inplace))


class Bf16Quantized:
    def __init__(self, inner: sb.QuantizedSynthetic) -> None:
        self.inner = inner

    def score(self) -> float:
        src, cfg = self.inner.source, self.inner.config
        total = src.base_score
        for name, op_type in src.ops:
            precision = cfg.precision(name, op_type)
            if precision == "int8":
                total -= sb.op_penalty(src, cfg, name, op_type)
            elif precision == "bf16":
                total -= BF16_PENALTY
        return total


class Bf16ConvsOnly(Bf16SyntheticBackend):
    """BF16 kernels for the convolutions only: a MatMul fallback gains nothing from BF16 here."""

    name = "synthetic_bf16_convs"

    def bf16_candidates(self, model: Any, config: QuantConfig) -> frozenset[str] | None:
        return frozenset(name for name, op_type in model.ops if op_type == "Conv")


class NoBf16OnThisCpu(sb.SyntheticBackend):
    name = "synthetic_no_bf16_cpu"
    supports_bf16 = True

    def bf16_unavailable(self, config: QuantConfig) -> str | None:
        return "this CPU has no BF16 instructions (avx512_bf16, amx_bf16)"


@pytest.fixture(autouse=True)
def _backends() -> None:
    sb.register()
    register_backend("synthetic_bf16", Bf16SyntheticBackend)
    register_backend("synthetic_no_bf16_cpu", NoBf16OnThisCpu)
    register_backend("synthetic_bf16_convs", Bf16ConvsOnly)


def _score(model: Any) -> float:
    return model.score() if isinstance(model, Bf16Quantized) else sb.score(model)


def test_bf16_must_be_a_layer_filter() -> None:
    with pytest.raises(ConfigError, match=r"bf16 must be an inc.LayerFilter of the ops to run in BF16, got tuple"):
        inc.QuantConfig(bf16=("fc1",))  # type: ignore[arg-type]


def test_exclude_wins_over_bf16_and_the_rest_is_int8() -> None:
    config = inc.QuantConfig(exclude=inc.LayerFilter(names=("fc1",)), bf16=inc.LayerFilter(types=("MatMul",)))
    assert config.precision("fc1", "MatMul") == "fp32"
    assert config.precision("fc2", "MatMul") == "bf16"
    assert config.precision("conv1", "Conv") == "int8"


def test_bf16_round_trips_through_json() -> None:
    config = inc.QuantConfig(bf16=inc.LayerFilter(names=("fc2",)))
    again = inc.QuantConfig.from_json(config.to_json())
    assert again == config and again.bf16.names == ("fc2",)


def test_fallback_precision_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"fallback_precision.*'fp16'.*fp32.*bf16"):
        inc.TuningConfig(fallback_precision="fp16")


def test_quantize_refuses_bf16_on_a_backend_without_it() -> None:
    config = inc.QuantConfig(bf16=inc.LayerFilter(names=("fc2",)))
    with pytest.raises(ConfigError, match=r"synthetic backend does not implement BF16 ops.*exclude="):
        inc.quantize(sb.SyntheticModel(), config, dataset=sb.calib_data(), backend="synthetic")


def test_quantize_rejects_bf16_names_matching_no_op() -> None:
    config = inc.QuantConfig(bf16=inc.LayerFilter(names=("fc_2",)))
    with pytest.raises(ConfigError, match=r"\['fc_2'\] match no op"):
        inc.quantize(sb.SyntheticModel(), config, dataset=sb.calib_data(), backend="synthetic_bf16")


def test_autotune_refuses_a_bf16_fallback_the_backend_cannot_run() -> None:
    model = sb.SyntheticModel()
    tuning = inc.TuningConfig(fallback_precision="bf16")
    with pytest.raises(ConfigError, match=r"fallback_precision='bf16'.*synthetic backend does not implement BF16"):
        autotune(model, tuning, eval_fn=_score, dataset=sb.calib_data(), backend="synthetic")
    with pytest.raises(ConfigError, match=r"this CPU has no BF16 instructions.*fallback_precision='fp32'"):
        autotune(model, tuning, eval_fn=_score, dataset=sb.calib_data(), backend="synthetic_no_bf16_cpu")
    assert model.calls["quantize"] == 0


def test_bf16_fallback_puts_the_sensitive_ops_in_bf16_and_reports_each_precision(tmp_path: Path) -> None:
    model = sb.SyntheticModel()
    tuning = inc.TuningConfig(
        strategy="basic", fallback_precision="bf16", base=inc.QuantConfig(exclude=inc.LayerFilter(names=("conv1",)))
    )
    result = autotune(model, tuning, eval_fn=_score, dataset=sb.calib_data(), backend="synthetic_bf16")
    assert result.met
    # conv2 and fc2 lose 0.03/0.02 in INT8: the search moves them to BF16, never to FP32; conv1 stays FP32 as asked.
    assert set(result.config.bf16.names) >= {"conv2"}
    assert result.config.exclude.names == ("conv1",)
    assert result.precisions["conv1"] == "fp32"
    assert result.precisions["conv2"] == "bf16"
    assert "int8" in result.precisions.values()
    changes = [t.change for t in result.trials]
    assert any(c.startswith("bf16: ") or "; bf16: " in c for c in changes), changes
    assert not any("fp32: " in c for c in changes), changes
    report = result.report(tmp_path / "report.md").read_text(encoding="utf-8")
    assert "## Precision per op" in report
    assert "| fp32 | 1: conv1 |" in report
    bf16_row = next(line for line in report.splitlines() if line.startswith("| bf16 |"))
    assert "conv2" in bf16_row
    assert result.to_dict()["precisions"] == dict(result.precisions)


def test_fp32_fallback_is_unchanged_by_default() -> None:
    model = sb.SyntheticModel()
    result = autotune(model, inc.TuningConfig(strategy="basic"), eval_fn=_score, dataset=sb.calib_data(), backend="synthetic_bf16")
    assert result.met and not result.config.bf16
    assert "conv2" in result.config.exclude.names
    assert result.precisions["conv2"] == "fp32"


def test_bf16_fallback_sends_ops_without_a_bf16_gain_to_fp32(tmp_path: Path) -> None:
    # conv2 (Conv) and fc2 (MatMul) both lose accuracy in INT8; the backend's BF16 kernels speed up convolutions
    # only, so conv2 falls back to BF16 and fc2 to FP32, and every trial line says which went where
    model = sb.SyntheticModel()
    tuning = inc.TuningConfig(strategy="basic", fallback_precision="bf16", history=tmp_path / "history.jsonl")
    result = autotune(model, tuning, eval_fn=_score, dataset=sb.calib_data(), backend="synthetic_bf16_convs")
    assert result.met
    assert result.precisions["conv2"] == "bf16" and result.precisions["fc2"] == "fp32", result.precisions
    assert "fc2" not in result.config.bf16.names and "fc2" in result.config.exclude.names
    changes = [t.change for t in result.trials]
    assert any("fp32: fc2" in c and "bf16: conv2" in c for c in changes), changes
    assert not any("bf16: " in c and "fc2" in c.split("bf16: ", 1)[1] for c in changes), changes
    # resumed from its history file, the search repeats no trial and ends on the same config
    again = autotune(model, tuning, eval_fn=_score, dataset=sb.calib_data(), backend="synthetic_bf16_convs")
    assert again.config == result.config


def test_trial_lines_of_an_earlier_history_still_read_bf16() -> None:
    from inc_core.tuning._space import describe_delta

    assert describe_delta({"fallback": ["conv2", "fc2"], "fallback_precision": "bf16"}) == "bf16: conv2, fc2"
    assert describe_delta({"fallback": ["conv2", "fc2"], "fallback_bf16": ["conv2"]}) == "fp32: fc2; bf16: conv2"
    assert describe_delta({"fallback": ["fc2"]}) == "fp32: fc2"
