"""INT8 accuracy on trained digits models stays within 1% (relative) of FP32."""

from __future__ import annotations

import onnx_testmodels as models
import pytest

import inc_core as inc
from inc_core.tuning import autotune


def _relative_loss(fp32: float, int8: float) -> float:
    return (fp32 - int8) / fp32


@pytest.mark.parametrize(
    ("which", "config"),
    [
        ("cnn", inc.QuantConfig(calib_samples=256)),
        ("cnn", inc.QuantConfig(format="qoperator", calibration="percentile", calib_samples=256)),
        ("cnn", inc.QuantConfig(calibration="mse", scheme="sym", activation_dtype="int8", calib_samples=256)),
        ("mlp", inc.QuantConfig(calib_samples=256)),
        ("mlp", inc.QuantConfig(approach="dynamic")),
    ],
    ids=["cnn-qdq-minmax", "cnn-qoperator-percentile", "cnn-qdq-mse-sym-int8", "mlp-qdq-minmax", "mlp-dynamic"],
)
def test_int8_accuracy_within_one_percent(which, config, digits):
    x_train, x_test, _, y_test = digits
    model = getattr(models, which)()
    fp32 = models.accuracy(model, x_test, y_test)
    assert fp32 > 0.95, "the FP32 model should be well trained"
    q = inc.quantize(model, config, dataset=inc.Dataset(x_train[:256], batch_size=32))
    int8 = models.accuracy(q, x_test, y_test)
    assert _relative_loss(fp32, int8) <= 0.01, f"FP32 {fp32:.4f} vs INT8 {int8:.4f}"


def test_autotune_meets_the_goal_on_held_out_data(digits, tmp_path):
    x_train, x_test, y_train, y_test = digits
    model = models.cnn()
    x_val, y_val = x_train[-300:], y_train[-300:]

    def eval_fn(candidate):
        return models.accuracy(candidate, x_val, y_val)

    tuning = inc.TuningConfig(
        base=inc.QuantConfig(calibration="kl", calib_samples=256), tolerable_loss=0.01, max_trials=20,
        history=str(tmp_path / "tuning.json"),
    )
    result = autotune(model, tuning, eval_fn=eval_fn, dataset=inc.Dataset(x_train[:256], batch_size=32))
    assert result.met, [(t.change, t.score) for t in result.trials]
    assert result.score >= result.threshold
    fp32, int8 = models.accuracy(model, x_test, y_test), models.accuracy(result.model, x_test, y_test)
    assert _relative_loss(fp32, int8) <= 0.01
    assert "DequantizeLinear" in models.op_types(result.model)
