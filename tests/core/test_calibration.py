"""Calibration math: qparams, (fake) quantization, streaming observers and the range searches."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from inc_core._quant_config import CALIBRATIONS
from inc_core.calibration import (
    HistogramObserver,
    KLObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    QParams,
    compute_qparams,
    dequantize,
    fake_quantize,
    make_observer,
    observer_from_state,
    quantize,
    weight_qparams,
)
from inc_core.errors import CalibrationError, ConfigError

COMBOS = [("int8", "sym"), ("uint8", "sym"), ("int8", "asym"), ("uint8", "asym")]


def _heavy_tailed(rng: np.random.Generator, n: int = 100_000) -> np.ndarray:
    x = rng.laplace(size=n)
    x[:4] = [250.0, -300.0, 400.0, -180.0]  # a few huge outliers, as in real transformer activations
    return x


def _fq_mse(x: np.ndarray, lo: float, hi: float, dtype: str, scheme: str) -> float:
    qp = compute_qparams(lo, hi, dtype=dtype, scheme=scheme)
    return float(np.mean((fake_quantize(x, qp).astype(np.float64) - x) ** 2))


# --- MinMaxObserver ---------------------------------------------------------------------------


def test_minmax_streaming_equals_one_shot() -> None:
    rng = np.random.default_rng(0)
    batches = [rng.normal(loc=i, scale=1 + i, size=(3 + i, 5)) for i in range(6)]
    obs = MinMaxObserver()
    for b in batches:
        obs.update(b)
    obs.update(np.empty((0, 5)))  # empty batches carry no information and are skipped
    everything = np.concatenate([b.ravel() for b in batches])
    assert obs.range() == (everything.min(), everything.max())


def test_minmax_per_channel_matches_hand_computation() -> None:
    # shape (N=2, C=3, L=2); channel c's range covers x[:, c, :]
    first = np.array([[[1.0, -2.0], [0.5, 0.5], [3.0, 4.0]], [[0.0, 7.0], [-1.0, 2.0], [3.5, 3.0]]])
    second = np.array([[[-5.0, 0.0], [0.0, 0.0], [10.0, 3.0]]])
    obs = MinMaxObserver(axis=1)
    obs.update(first)
    obs.update(second)
    lo, hi = obs.range()
    np.testing.assert_array_equal(lo, [-5.0, -1.0, 3.0])
    np.testing.assert_array_equal(hi, [7.0, 2.0, 10.0])
    # A negative axis names the same channels.
    neg = MinMaxObserver(axis=-2)
    neg.update(first)
    neg.update(second)
    np.testing.assert_array_equal(neg.range()[0], lo)


def test_minmax_per_channel_rejects_changing_channel_count_and_missing_axis() -> None:
    obs = MinMaxObserver(axis=1, name="fc1.out")
    obs.update(np.zeros((2, 4)))
    with pytest.raises(CalibrationError, match=r"'fc1.out'.*3 channels on axis 1.*earlier batches had 4"):
        obs.update(np.zeros((2, 3)))
    with pytest.raises(CalibrationError, match=r"axis=1 is out of range for the 1-d activation"):
        obs.update(np.zeros(4))


# --- qparams and (fake) quantization ---------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "scheme", "scale", "zero_point"),
    [
        ("int8", "sym", 2.0 / 127, 0),  # amax = max(|-2|, 1) = 2
        ("uint8", "sym", 2.0 / 127, 128),
        ("uint8", "asym", 3.0 / 255, 170),  # zp = round(0 - (-2) / (3/255)) = round(170.0)
        ("int8", "asym", 3.0 / 255, 42),  # zp = round(-128 + 170.0)
    ],
)
def test_qparams_match_hand_computation(dtype: str, scheme: str, scale: float, zero_point: int) -> None:
    qp = compute_qparams(-2.0, 1.0, dtype=dtype, scheme=scheme)
    assert qp.scale.dtype == np.float32 and qp.scale == np.float32(scale)
    assert qp.zero_point == zero_point and qp.axis is None and qp.dtype == dtype
    # Real zero is exactly representable.
    assert quantize(np.zeros(1), qp)[0] == zero_point
    assert fake_quantize(np.zeros(1), qp)[0] == 0.0


def test_asym_zero_point_rounds_and_range_is_widened_to_include_zero() -> None:
    qp = compute_qparams(-1.0, 3.0, dtype="uint8", scheme="asym")
    assert qp.scale == np.float32(4.0 / 255) and qp.zero_point == 64  # round(63.75)
    positive_only = compute_qparams(2.0, 4.0, dtype="uint8", scheme="asym")  # widened to [0, 4]
    assert positive_only.scale == np.float32(4.0 / 255) and positive_only.zero_point == 0
    negative_only = compute_qparams(-4.0, -2.0, dtype="int8", scheme="asym")  # widened to [-4, 0]
    assert negative_only.zero_point == 127


@pytest.mark.parametrize(("dtype", "scheme"), COMBOS)
def test_round_trip_error_is_at_most_half_a_step_and_outside_values_saturate(dtype: str, scheme: str) -> None:
    rng = np.random.default_rng(1)
    lo, hi = -1.5, 4.0
    qp = compute_qparams(lo, hi, dtype=dtype, scheme=scheme)
    scale = float(qp.scale)
    inside_lo = lo if scheme == "asym" else -hi
    x = rng.uniform(inside_lo, hi, 10_000).astype(np.float32)
    q = quantize(x, qp)
    assert q.dtype == (np.int8 if dtype == "int8" else np.uint8)
    err = np.abs(dequantize(q, qp) - x)
    assert err.max() <= scale / 2 * (1 + 1e-5)
    sat = quantize(np.array([-1e6, 1e6, -np.inf, np.inf]), qp)
    np.testing.assert_array_equal(sat, [qp.qmin, qp.qmax, qp.qmin, qp.qmax])


def test_quantize_rounds_half_to_even_like_onnx() -> None:
    qp = QParams(scale=np.array(1.0, dtype=np.float32), zero_point=np.array(0), dtype="int8")
    np.testing.assert_array_equal(quantize([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], qp), [0, 2, 2, 0, -2, -2])


def test_degenerate_ranges_give_a_safe_nonzero_scale() -> None:
    expected_zp = {("int8", "sym"): 0, ("uint8", "sym"): 128, ("int8", "asym"): -128, ("uint8", "asym"): 0}
    for dtype, scheme in COMBOS:
        qp = compute_qparams(0.0, 0.0, dtype=dtype, scheme=scheme)
        assert qp.scale == 1.0 and qp.zero_point == expected_zp[dtype, scheme]
        assert fake_quantize(np.zeros(3), qp).tolist() == [0.0, 0.0, 0.0]
    tiny = compute_qparams(0.0, 1e-12, dtype="uint8", scheme="asym")
    assert tiny.scale == np.finfo(np.float32).eps
    # A backend following ONNX Runtime's floor keeps the steps of a microscopic range.
    for dtype, scheme in COMBOS:
        small = compute_qparams(-1e-7, 1e-7, dtype=dtype, scheme=scheme, min_scale=float(np.finfo(np.float32).tiny))
        assert small.scale < np.finfo(np.float32).eps
        grid = fake_quantize(np.linspace(-1e-7, 1e-7, 1001), small)
        assert len(np.unique(grid)) >= 200
    for bad in (0.0, -1.0, float("nan"), float("inf"), 1e-50):
        with pytest.raises(ConfigError, match="min_scale"):
            compute_qparams(0.0, 1.0, dtype="uint8", scheme="asym", min_scale=bad)
    # A constant tensor is a range [0, c] once zero is included: c comes back within half a step.
    obs = MinMaxObserver()
    obs.update(np.full(10, 3.0))
    qp = compute_qparams(*obs.range(), dtype="uint8", scheme="asym")
    assert abs(fake_quantize(np.array([3.0]), qp)[0] - 3.0) <= float(qp.scale) / 2


def test_weight_qparams_per_tensor_and_per_channel() -> None:
    w = np.array([[1.0, -4.0, 2.0], [0.5, 0.25, -0.125]])
    per_tensor = weight_qparams(w)
    assert per_tensor.scale == np.float32(4.0 / 127) and per_tensor.zero_point == 0
    per_channel = weight_qparams(w, axis=0)
    np.testing.assert_array_equal(per_channel.scale, np.array([4.0 / 127, 0.5 / 127], dtype=np.float32))
    np.testing.assert_array_equal(per_channel.zero_point, [0, 0])
    assert per_channel.axis == 0
    err = np.abs(fake_quantize(w, per_channel) - w)
    assert np.all(err <= per_channel.scale[:, None] / 2 * (1 + 1e-6))
    # Conv weights (O, I, kH, kW) per output channel; the channel extremes map to +-127.
    conv = np.random.default_rng(2).normal(size=(4, 3, 3, 3))
    q = quantize(conv, weight_qparams(conv, axis=0))
    np.testing.assert_array_equal(np.abs(q.astype(np.int32)).reshape(4, -1).max(axis=1), [127] * 4)
    with pytest.raises(ConfigError, match=r"3 channels along axis 0 .* but the QParams hold 2"):
        quantize(np.zeros((3, 3)), per_channel)
    with pytest.raises(CalibrationError, match=r"weight holds 1 NaN"):
        weight_qparams(np.array([1.0, np.nan]))


def test_compute_qparams_rejects_bad_ranges() -> None:
    with pytest.raises(ConfigError, match=r"axis is None; pass axis="):
        compute_qparams([-1.0, -2.0], [1.0, 2.0], dtype="int8", scheme="sym")
    per_channel = compute_qparams([-1.0, -2.0], [1.0, 2.0], dtype="int8", scheme="sym", axis=1)
    np.testing.assert_array_equal(per_channel.scale, np.array([1 / 127, 2 / 127], dtype=np.float32))
    with pytest.raises(ConfigError, match=r"lo=2.0 exceeds hi=1.0"):
        compute_qparams(2.0, 1.0, dtype="uint8", scheme="asym")
    with pytest.raises(CalibrationError, match=r"hi=nan is not finite"):
        compute_qparams(0.0, float("nan"), dtype="uint8", scheme="asym")
    with pytest.raises(ConfigError, match=r"scheme='affine' is not supported; choose one of 'sym', 'asym'"):
        compute_qparams(0.0, 1.0, dtype="uint8", scheme="affine")
    with pytest.raises(ConfigError, match=r"zero_point \[300\] is outside the uint8 range"):
        QParams(scale=np.array([1.0]), zero_point=np.array([300]), dtype="uint8", axis=0)


def test_qparams_round_trip_through_json() -> None:
    qp = compute_qparams([-1.0, -0.3], [2.0, 0.7], dtype="uint8", scheme="asym", axis=0)
    again = QParams.from_dict(json.loads(json.dumps(qp.to_dict())))
    assert again == qp and hash(again) == hash(qp)


# --- HistogramObserver --------------------------------------------------------------------


def test_histogram_streams_batches_of_very_different_ranges_exactly_in_bounded_memory() -> None:
    rng = np.random.default_rng(3)
    batches = [
        np.zeros(50),  # zeros before any range is known
        rng.uniform(0.0, 1e-3, 2_000),
        rng.normal(0.0, 1.0, 3_000),
        rng.uniform(-0.5, 80.0, 1_000),
        rng.normal(0.0, 1.0, 3_000) * 1e-2,
        rng.uniform(-700.0, 2.0, 500),
    ]
    obs = HistogramObserver(bins=512)
    for b in batches:
        obs.update(b)
        counts, edges = obs.histogram()
        assert counts.shape == (512,) and edges.shape == (513,)
    data = np.concatenate(batches)
    counts, edges = obs.histogram()
    assert obs.count == data.size == counts.sum()
    assert (obs.min, obs.max) == (data.min(), data.max())
    assert edges[0] <= data.min() and data.max() < edges[-1]
    # Widening only merges whole bins, so the result equals binning everything on the final grid.
    direct = np.bincount(
        np.floor(data / obs.bin_width).astype(np.int64) - round(edges[0] / obs.bin_width), minlength=512
    )
    np.testing.assert_array_equal(counts, direct)
    # The data spans at least half of the bins.
    assert (data.max() - data.min()) / obs.bin_width >= 512 / 2


@pytest.mark.parametrize("percentile", [90.0, 99.0, 99.9, 99.99])
def test_percentile_is_within_one_bin_of_numpy(percentile: float) -> None:
    rng = np.random.default_rng(4)
    signed = rng.standard_t(df=4, size=120_000)
    obs = HistogramObserver()
    for b in np.array_split(signed * 0.1, 3):
        obs.update(b)
    for b in np.array_split(signed, 4):  # a wider range arrives later: the grid widens mid-stream
        obs.update(b)
    data = np.concatenate([signed * 0.1, signed])
    lo, hi = obs.range("percentile", percentile=percentile)
    assert abs(hi - np.percentile(data, percentile)) <= obs.bin_width
    assert abs(lo - np.percentile(data, 100 - percentile)) <= obs.bin_width
    # Non-negative data: only the top tail is cut.
    relu = np.maximum(signed, 0.0)
    pos = HistogramObserver()
    pos.update(relu)
    lo, hi = pos.range("percentile", percentile=percentile)
    assert lo == 0.0 and abs(hi - np.percentile(relu, percentile)) <= pos.bin_width


def test_kl_clips_heavy_tails_and_keeps_uniform_ranges() -> None:
    rng = np.random.default_rng(5)
    heavy = HistogramObserver()
    for b in np.array_split(_heavy_tailed(rng), 5):
        heavy.update(b)
    amax = max(-heavy.min, heavy.max)
    lo, hi = heavy.range("kl", scheme="sym")
    assert lo == -hi and 2.0 < hi < 0.2 * amax
    lo, hi = heavy.range("kl", scheme="asym")
    assert -0.2 * amax < lo < -2.0 and 2.0 < hi < 0.2 * amax
    relu = HistogramObserver()
    relu.update(np.maximum(_heavy_tailed(rng), 0.0))
    lo, hi = relu.range("kl")
    assert lo == 0.0 and 2.0 < hi < 0.2 * relu.max

    # Data far from zero keeps its range instead of collapsing below it (where KL(P||Q) would be 0).
    for data in (rng.uniform(-1.0, 1.0, 100_000), rng.uniform(0.0, 3.0, 100_000), rng.uniform(100.0, 101.0, 20_000)):
        obs = HistogramObserver()
        obs.update(data)
        for scheme in ("sym", "asym"):
            lo, hi = obs.range("kl", scheme=scheme)
            assert hi >= 0.97 * data.max()
            assert lo <= 0.97 * data.min() if data.min() < 0 else lo == data.min()


def test_mse_range_beats_minmax_on_heavy_tails_in_actual_fake_quant_error() -> None:
    rng = np.random.default_rng(6)
    x = np.concatenate([rng.laplace(size=100_000), [60.0, -45.0]])
    obs = HistogramObserver()
    for b in np.array_split(x, 4):
        obs.update(b)
    for dtype, scheme in COMBOS:
        mse_lo, mse_hi = obs.range("mse", dtype=dtype, scheme=scheme)
        chosen = _fq_mse(x, mse_lo, mse_hi, dtype, scheme)
        minmax = _fq_mse(x, x.min(), x.max(), dtype, scheme)
        assert mse_hi < 0.9 * x.max() and chosen < 0.85 * minmax
        # No other method's range does better than the one searched for the least error.
        for method in ("percentile", "kl"):
            other = _fq_mse(x, *obs.range(method, dtype=dtype, scheme=scheme), dtype, scheme)
            assert chosen <= other * 1.01
    # The search finds the minimum of the actual error over symmetric ranges, not just a better range.
    t = obs.range("mse", dtype="int8", scheme="sym")[1]
    brute = min(_fq_mse(x, -c, c, "int8", "sym") for c in np.linspace(1.0, 60.0, 120))
    assert _fq_mse(x, -t, t, "int8", "sym") <= brute * 1.005
    # Without outliers there is nothing to clip.
    uniform = HistogramObserver()
    uniform.update(rng.uniform(0.0, 2.0, 50_000))
    assert uniform.range("mse")[1] >= 0.99 * uniform.max


def test_only_zeros_give_a_zero_range_for_every_method() -> None:
    obs = HistogramObserver()
    obs.update(np.zeros((4, 4)))
    for method in CALIBRATIONS:
        assert obs.range(method) == (0.0, 0.0)
    obs.update(np.full(8, 5.0))  # the grid appears with the first non-zero value; the zeros stay counted
    counts, edges = obs.histogram()
    assert counts.sum() == 24 and counts[np.searchsorted(edges, 0.0, side="right") - 1] == 16
    assert obs.range("minmax") == (0.0, 5.0)
    # 16 of 24 values are zero: the 60th percentile is in the zero bin, the 99th in the bin of 5.0.
    assert 0.0 <= obs.range("percentile", percentile=60.0)[1] < obs.bin_width
    assert 5.0 - obs.bin_width < obs.range("percentile", percentile=99.0)[1] <= 5.0


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", CALIBRATIONS)
def test_nan_and_inf_raise_calibration_error_naming_the_observer(method: str) -> None:
    obs = make_observer(method, name="layer3.relu")
    with pytest.raises(
        CalibrationError, match=r"'layer3.relu': activation holds 2 NaN value\(s\) out of 4.*check the model's inputs"
    ):
        obs.update(np.array([1.0, np.nan, np.nan, 0.0]))
    with pytest.raises(CalibrationError, match=r"activation holds 1 infinite value\(s\).*overflow"):
        obs.update(np.array([1.0, -np.inf], dtype=np.float32))
    with pytest.raises(CalibrationError, match=r"no data was observed; range\(\) needs at least one update\(\)"):
        obs.range()  # the rejected batches left nothing behind


def test_bad_method_and_settings_raise_config_error_listing_choices() -> None:
    choices = r"choose one of 'minmax', 'kl', 'percentile', 'mse'"
    with pytest.raises(ConfigError, match=r"method='entropy' is not supported; " + choices):
        make_observer("entropy")
    obs = HistogramObserver()
    obs.update(np.arange(10.0))
    with pytest.raises(ConfigError, match=r"method='max' is not supported; " + choices):
        obs.range("max")
    with pytest.raises(ConfigError, match=r"per-channel ranges are supported for 'minmax' only"):
        make_observer("kl", axis=1)
    with pytest.raises(ConfigError, match=r"percentile must be a number in \(50, 100\]"):
        make_observer("percentile", percentile=40)
    with pytest.raises(ConfigError, match=r"bins must be >= 16"):
        HistogramObserver(bins=4)
    with pytest.raises(CalibrationError, match=r"dtype <U1; expected a real numeric array"):
        obs.update(np.array(["a"]))


# --- make_observer, pickling, merging, persistence ------------------------------------------


def test_make_observer_answers_like_the_shared_histogram() -> None:
    rng = np.random.default_rng(7)
    x = _heavy_tailed(rng, 20_000)
    shared = HistogramObserver()
    shared.update(x)
    expected_types = {"minmax": MinMaxObserver, "percentile": PercentileObserver, "kl": KLObserver, "mse": MSEObserver}
    for method in CALIBRATIONS:
        obs = make_observer(method, percentile=99.9, dtype="int8", scheme="sym")
        assert type(obs) is expected_types[method] and obs.method == method
        obs.update(x)
        assert obs.range() == shared.range(method, percentile=99.9, dtype="int8", scheme="sym")
    per_channel = make_observer("minmax", axis=0)
    per_channel.update(np.array([[1.0, 2.0], [-3.0, 4.0]]))
    np.testing.assert_array_equal(per_channel.range()[1], [2.0, 4.0])


def test_observers_pickle_mid_stream_and_continue() -> None:
    rng = np.random.default_rng(8)
    first, second = rng.normal(size=5_000), rng.normal(scale=10.0, size=5_000)
    for obs in (HistogramObserver(bins=256), KLObserver(), MinMaxObserver(axis=0)):
        obs.update(first.reshape(50, 100))
        restored = pickle.loads(pickle.dumps(obs))
        obs.update(second.reshape(50, 100))
        restored.update(second.reshape(50, 100))
        if isinstance(obs, HistogramObserver):
            np.testing.assert_array_equal(obs.histogram()[0], restored.histogram()[0])
        else:
            np.testing.assert_array_equal(obs.range(), restored.range())


def test_merge_matches_observing_everything() -> None:
    rng = np.random.default_rng(9)
    a, b = rng.normal(size=30_000), rng.normal(loc=2.0, scale=5.0, size=30_000)
    left, right = HistogramObserver(), HistogramObserver()
    left.update(a)
    right.update(b)
    left.merge(right)
    data = np.concatenate([a, b])
    assert left.count == data.size == left.histogram()[0].sum()
    assert (left.min, left.max) == (data.min(), data.max())
    lo, hi = left.range("percentile", percentile=99.0)
    assert abs(hi - np.percentile(data, 99.0)) <= left.bin_width
    assert abs(lo - np.percentile(data, 1.0)) <= left.bin_width
    # Observers with the same grid merge bin for bin.
    twin = HistogramObserver()
    twin.update(a)
    alone = pickle.loads(pickle.dumps(twin))
    np.testing.assert_array_equal(twin.merge(alone).histogram()[0], 2 * alone.histogram()[0])
    mm = MinMaxObserver().merge(MinMaxObserver())
    mm.update(a)
    other = MinMaxObserver()
    other.update(b)
    assert mm.merge(other).range() == (data.min(), data.max())


def test_state_dict_round_trips_through_json() -> None:
    rng = np.random.default_rng(10)
    x = _heavy_tailed(rng, 20_000)
    for method in CALIBRATIONS:
        obs = make_observer(method, name="attn.out", scheme="sym", dtype="int8")
        obs.update(x)
        again = observer_from_state(json.loads(json.dumps(obs.state_dict())))
        assert type(again) is type(obs) and again.name == "attn.out"
        assert again.range() == obs.range()
    hist = HistogramObserver()
    hist.update(x)
    restored = observer_from_state(json.loads(json.dumps(hist.state_dict())))
    assert isinstance(restored, HistogramObserver) and restored.range("kl") == hist.range("kl")
    broken = hist.state_dict()
    broken["count"] += 1
    with pytest.raises(ConfigError, match=r"state is inconsistent"):
        observer_from_state(broken)
    with pytest.raises(ConfigError, match=r"got kind='fancy'"):
        observer_from_state({"kind": "fancy"})


def test_check_finite_activation_names_tensor_and_batch() -> None:
    from inc_core.calibration import check_finite_activation
    from inc_core.errors import CalibrationError

    check_finite_activation("relu", np.ones((2, 3), np.float32), 0)  # finite: nothing happens
    check_finite_activation("ids", np.array([1, 2], np.int64), 0)  # integer tensors are not ranges' business
    with pytest.raises(CalibrationError, match="'mask' holds Inf at calibration batch 3"):
        check_finite_activation("mask", np.array([0.0, -np.inf], np.float32), 3)
    with pytest.raises(CalibrationError, match="'x' holds NaN at calibration batch 0.*numerics"):
        check_finite_activation("x", np.array([np.nan, np.inf]), 0)
