"""SmoothQuant in inc-core: the scale math, the config value, and the tuner trying it.

A one-layer numpy "model" ``y = x @ W`` whose input has a few channels 50x larger than the rest
stands in for a LayerNorm -> Linear block; its backend quantizes for real (uint8 per-tensor
activations from calibration ranges, int8 per-channel weights), so SmoothQuant's effect on the
error is measured, not assumed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import inc_core as inc
from inc_core.backend import Backend, Op, TuningSpace
from inc_core.calibration import compute_qparams, fake_quantize, weight_qparams
from inc_core.calibration._smooth_quant import ChannelAbsMax, input_channel_absmax, smooth_scales
from inc_core.errors import CalibrationError, ConfigError

OUTLIERS = (3, 11, 17)


def _outlier_inputs(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, 24)).astype(np.float32)
    x[:, OUTLIERS] *= 50.0
    return x


@dataclass
class LinearModel:
    weight: np.ndarray  # [in, out]
    scales: np.ndarray | None = None  # SmoothQuant scales folded in (x / s, diag(s) W)
    act: Any = None  # activation QParams of the (scaled) input; None: FP32
    weight_q: np.ndarray | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.act is None:
            return x @ self.weight
        xs = x / self.scales if self.scales is not None else x
        assert self.weight_q is not None
        return fake_quantize(xs, self.act) @ self.weight_q


class SmoothLinearBackend(Backend):
    name = "smoothlinear"
    package = "tests"
    supports_smooth_quant = True

    def __init__(self) -> None:
        self.calibrated: list[Any] = []

    def accepts(self, model: Any) -> bool:
        return isinstance(model, LinearModel)

    def describe(self, model: Any, config: inc.QuantConfig) -> TuningSpace:
        return TuningSpace((Op("fc", "MatMul"),), {"MatMul": {"calibration": ("minmax", "percentile")}})

    def calibrate(self, model: Any, dataset: inc.Dataset, config: inc.QuantConfig) -> Any:
        self.calibrated.append(config.smooth_quant)
        absmax = ChannelAbsMax("x")
        batches = [np.asarray(b) for b in dataset.inputs(limit=config.calib_samples)]
        for batch in batches:
            absmax.update(batch)
        scales = None
        if config.smooth_quant is not None:
            scales = smooth_scales(absmax.result(), input_channel_absmax([model.weight], 0), config.smooth_quant.alpha)
        xs = np.concatenate(batches) / (scales if scales is not None else 1.0)
        return {"alpha": config.smooth_quant, "scales": scales, "lo": float(xs.min()), "hi": float(xs.max())}

    def quantize(self, model: Any, config: inc.QuantConfig, *, calibration: Any | None, inplace: bool = False) -> Any:
        if calibration["alpha"] != config.smooth_quant:
            raise CalibrationError("calibration of another smooth_quant setting")
        scales = calibration["scales"]
        weight = model.weight * scales[:, None] if scales is not None else model.weight
        wq = weight_qparams(weight, axis=1)  # one scale per output channel
        weight_q = fake_quantize(weight, wq)
        act = compute_qparams(calibration["lo"], calibration["hi"], dtype="uint8", scheme="asym")
        return LinearModel(model.weight, scales, act, weight_q)

    def save(self, model: Any, path: Path) -> None:
        raise NotImplementedError

    def load(self, path: Path) -> Any:
        raise NotImplementedError

    def runner(self, model: Any, inputs: Any, *, threads: int | None = None) -> Callable[[], Any]:
        return lambda: model(inputs)


def _model() -> LinearModel:
    # As in trained transformers, the outlier channels' weights are small: every channel matters to the output.
    weight = np.random.default_rng(1).normal(size=(24, 8)).astype(np.float32) * 0.2
    weight[OUTLIERS, :] /= 50.0
    return LinearModel(weight)


def _fidelity(model: LinearModel, quantized: LinearModel) -> float:
    x = _outlier_inputs(256, seed=9)
    ref, out = model(x), quantized(x)
    return 1.0 - float(np.mean((out - ref) ** 2) / np.mean(ref**2))


# --- the math ---------------------------------------------------------------------------------------
def test_scales_follow_the_paper_formula_and_keep_the_product() -> None:
    act = np.array([1.0, 50.0, 0.2, 4.0])
    wgt = np.array([0.5, 0.1, 2.0, 1.0])
    for alpha in (0.0, 0.5, 0.8, 1.0):
        s = smooth_scales(act, wgt, alpha)
        np.testing.assert_allclose(s, act**alpha / wgt ** (1 - alpha), rtol=1e-6)
    x = _outlier_inputs(16, seed=0)
    w = _model().weight
    s = smooth_scales(np.abs(x).max(axis=0), input_channel_absmax([w]), 0.5)
    np.testing.assert_allclose((x / s) @ (w * s[:, None]), x @ w, rtol=1e-4, atol=1e-4)
    # alpha 0.5 balances the two maxima channel by channel
    np.testing.assert_allclose(np.abs(x / s).max(axis=0), np.abs(w * s[:, None]).max(axis=1), rtol=1e-5)


def test_empty_channels_keep_scale_one_and_extremes_are_clipped() -> None:
    s = smooth_scales(np.array([0.0, 3.0, 1e12, 2.0]), np.array([1.0, 0.0, 1e-4, 1.0]), 0.5)
    assert s[0] == 1.0 and s[1] == 1.0  # nothing to move on a dead channel or a zero weight row
    assert s[2] == pytest.approx(1e4)  # clipped, not 1e8
    assert np.isfinite(s).all() and s.dtype == np.float32


def test_shared_input_takes_the_max_over_every_weight() -> None:
    a = np.array([[1.0, -5.0], [0.5, 0.1]])  # [in=2, out=2]
    b = np.array([[-3.0], [0.2]])
    np.testing.assert_allclose(input_channel_absmax([a, b]), [5.0, 0.5])
    np.testing.assert_allclose(input_channel_absmax([a.T], in_axis=1), [5.0, 0.5])  # torch layout [out, in]
    with pytest.raises(ValueError, match="input channels"):
        input_channel_absmax([a, np.ones((3, 1))])


def test_math_rejects_bad_alpha_mismatched_and_non_finite_input() -> None:
    with pytest.raises(ConfigError, match=r"alpha must be a number in \[0, 1\].*got 1.5"):
        smooth_scales(np.ones(2), np.ones(2), 1.5)
    with pytest.raises(CalibrationError, match="3 activation channels but 2"):
        smooth_scales(np.ones(3), np.ones(2), 0.5)
    with pytest.raises(CalibrationError, match="NaN or Inf"):
        smooth_scales(np.array([1.0, np.inf]), np.ones(2), 0.5)


def test_channel_absmax_streams_over_batches_and_checks_them() -> None:
    obs = ChannelAbsMax("ln.out")
    obs.update(np.array([[[1.0, -7.0, 2.0]], [[0.5, 1.0, -3.0]]]))
    obs.update(np.array([[4.0, 0.0, 0.0]]))
    np.testing.assert_allclose(obs.result(), [4.0, 7.0, 3.0])
    with pytest.raises(CalibrationError, match="'ln.out' had 3 channels, then 2"):
        obs.update(np.ones((1, 2)))
    with pytest.raises(CalibrationError, match="NaN or Inf at calibration batch"):
        obs.update(np.array([[np.nan, 1.0, 1.0]]))
    with pytest.raises(CalibrationError, match="no calibration batch reached"):
        ChannelAbsMax("never").result()


# --- the config -------------------------------------------------------------------------------------
def test_config_round_trips_and_validates_alpha() -> None:
    config = inc.QuantConfig(smooth_quant=inc.SmoothQuant(alpha=0.75))
    again = inc.QuantConfig.from_json(config.to_json())
    assert again == config and again.smooth_quant == inc.SmoothQuant(alpha=0.75)
    assert json.loads(config.to_json())["smooth_quant"] == {"type": "SmoothQuant", "version": 1, "alpha": 0.75}
    assert inc.QuantConfig.from_dict(inc.QuantConfig().to_dict()).smooth_quant is None
    for bad in (-0.1, 1.01, float("nan"), True, "0.5"):
        with pytest.raises(ConfigError, match=r"SmoothQuant: alpha must be a number in \[0, 1\]"):
            inc.SmoothQuant(alpha=bad)
    with pytest.raises(ConfigError, match="smooth_quant must be an inc.SmoothQuant"):
        inc.QuantConfig(smooth_quant=0.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="smooth_quant needs approach='static'"):
        inc.QuantConfig(approach="dynamic", smooth_quant=inc.SmoothQuant())
    with pytest.raises(TypeError):
        inc.SmoothQuant(0.5)  # type: ignore[misc]  # keyword-only, like every config
    assert "SmoothQuant" in inc.__all__


def test_tuning_config_alphas_round_trip_and_validate() -> None:
    config = inc.TuningConfig(smooth_quant_alphas=[0.5, 0.8])  # type: ignore[arg-type]
    assert config.smooth_quant_alphas == (0.5, 0.8)
    assert inc.TuningConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match=r"smooth_quant_alphas: alpha must be a number in \[0, 1\]"):
        inc.TuningConfig(smooth_quant_alphas=(2.0,))
    with pytest.raises(ConfigError, match="lists an alpha twice"):
        inc.TuningConfig(smooth_quant_alphas=(0.5, 0.5))
    with pytest.raises(ConfigError, match="must be a tuple of alphas"):
        inc.TuningConfig(smooth_quant_alphas=0.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs base.approach='static'"):
        inc.TuningConfig(base=inc.QuantConfig(approach="dynamic"), smooth_quant_alphas=(0.5,))


# --- a backend applying it, and the tuner ----------------------------------------------------------
@pytest.fixture()
def backend() -> SmoothLinearBackend:
    return SmoothLinearBackend()


def _data() -> inc.Dataset:
    return inc.Dataset(_outlier_inputs(64, seed=3), batch_size=16)


def test_smoothing_brings_the_int8_model_closer_to_fp32(backend: SmoothLinearBackend) -> None:
    model = _model()
    plain = inc.quantize(model, inc.QuantConfig(), dataset=_data(), backend=backend)
    smooth = inc.quantize(model, inc.QuantConfig(smooth_quant=inc.SmoothQuant(alpha=0.5)), dataset=_data(), backend=backend)
    before, after = _fidelity(model, plain), _fidelity(model, smooth)
    assert after > before and (1 - after) < 0.5 * (1 - before), (before, after)


def test_tuner_tries_smooth_quant_when_the_base_misses_the_goal(backend: SmoothLinearBackend) -> None:
    model = _model()
    plain = _fidelity(model, inc.quantize(model, inc.QuantConfig(), dataset=_data(), backend=backend))
    goal = 1.0 - 0.5 * (1.0 - plain)  # half the base config's error
    config = inc.TuningConfig(smooth_quant_alphas=(0.5,), tolerable_loss=1.0 - goal, loss_type="absolute")
    backend.calibrated.clear()
    result = inc.autotune(model, config, eval_fn=lambda q: 1.0 if q is model else _fidelity(model, q), dataset=_data(), backend=backend)
    assert [t.change for t in result.trials] == ["base", "smooth_quant(alpha=0.5)"]
    assert result.met and result.config.smooth_quant == inc.SmoothQuant(alpha=0.5)
    assert backend.calibrated == [None, inc.SmoothQuant(alpha=0.5)]  # one calibration per setting
    assert result.trials[1].delta == {"smooth_quant": {"type": "SmoothQuant", "version": 1, "alpha": 0.5}}


def test_backends_without_smooth_quant_refuse_it() -> None:
    class Plain(SmoothLinearBackend):
        supports_smooth_quant = False

    with pytest.raises(ConfigError, match="not implemented by the smoothlinear backend"):
        inc.quantize(_model(), inc.QuantConfig(smooth_quant=inc.SmoothQuant()), dataset=_data(), backend=Plain())
    with pytest.raises(ConfigError, match="smooth_quant_alphas=\\[0.5\\] but the smoothlinear backend"):
        inc.autotune(_model(), inc.TuningConfig(smooth_quant_alphas=(0.5,)), eval_fn=lambda m: 1.0, dataset=_data(), backend=Plain())


@pytest.mark.parametrize("strategy", ["exhaustive", "random"])
def test_every_settings_strategy_reaches_smooth_quant(strategy: str, backend: SmoothLinearBackend) -> None:
    model = _model()
    plain = _fidelity(model, inc.quantize(model, inc.QuantConfig(), dataset=_data(), backend=backend))
    config = inc.TuningConfig(
        strategy=strategy, smooth_quant_alphas=(0.5, 0.75), tolerable_loss=0.5 * (1.0 - plain), loss_type="absolute"
    )
    result = inc.autotune(model, config, eval_fn=lambda q: 1.0 if q is model else _fidelity(model, q), dataset=_data(), backend=backend)
    assert result.met and result.config.smooth_quant is not None, [t.change for t in result.trials]
    assert result.trials[0].change == "base"
