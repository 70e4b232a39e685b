"""Accuracy-driven tuning of a Gluon digits classifier trained in the test: INT8 within 1% of FP32."""

from __future__ import annotations

import json
from pathlib import Path

import mxnet_testmodels as models
import numpy as np
from conftest import graph_nodes, param_snapshot
from mxnet import gluon

import inc_core as inc


def test_autotune_keeps_accuracy_within_one_percent(cnn: gluon.HybridBlock, digits: tuple[np.ndarray, ...], tmp_path: Path) -> None:
    _, x_test, _, y_test = digits
    fp32 = models.accuracy(cnn, x_test, y_test)
    assert fp32 >= 0.95, f"the trained FP32 model is too weak to say anything ({fp32:.3f})"
    before = param_snapshot(cnn)

    def eval_fn(model: gluon.Block) -> float:
        return models.accuracy(model, x_test, y_test)

    tuning = inc.TuningConfig(
        base=inc.QuantConfig(calib_samples=256), tolerable_loss=0.01, max_trials=6, history=str(tmp_path / "tuning.json")
    )
    result = inc.autotune(cnn, tuning, eval_fn=eval_fn, dataset=inc.Dataset(digits[0][:256], batch_size=32))
    assert result.met
    assert result.baseline == fp32
    int8 = models.accuracy(result.model, x_test, y_test)
    assert int8 >= fp32 - 0.01, f"INT8 {int8:.4f} vs FP32 {fp32:.4f}"
    assert [n for n in graph_nodes(result.model) if n["op"] == "_sg_mkldnn_conv" and n["attrs"].get("quantized") == "true"]
    assert param_snapshot(cnn) == before and not cnn._active
    # The chosen model saves in MXNet's format and the history is plain JSON.
    saved = result.save(tmp_path / "digits.mxnet")
    assert models.accuracy(inc.load(saved), x_test, y_test) == int8
    assert json.loads((tmp_path / "tuning.json").read_text())


def test_autotune_falls_back_a_layer_when_the_goal_needs_it(cnn: gluon.HybridBlock, digits: tuple[np.ndarray, ...]) -> None:
    _, x_test, _, y_test = digits
    reference = models.predict(cnn, x_test)

    def agreement(model: gluon.Block) -> float:
        """Fraction of test logits within 0.02 of FP32's: INT8 everywhere cannot reach 1.0."""
        return float(np.mean(np.abs(models.predict(model, x_test) - reference) < 0.02))

    tuning = inc.TuningConfig(
        base=inc.QuantConfig(calib_samples=128), strategy="basic", tolerable_loss=0.0, max_trials=40,
        loss_type="absolute",
    )
    result = inc.autotune(cnn, tuning, eval_fn=agreement, dataset=inc.Dataset(digits[0][:128], batch_size=32))
    failed = [t for t in result.trials if t.status != "evaluated"]
    assert not failed, [t.error for t in failed]
    # The strategy's per-layer fallback: later trials keep named layers of the block in FP32.
    assert not result.trials[0].config["exclude"]["names"]
    fallbacks = [t.config["exclude"]["names"] for t in result.trials[1:] if t.config["exclude"]["names"]]
    assert fallbacks and all(set(names) <= {op.name for op in inc.describe(cnn).ops} for names in fallbacks)


def test_per_layer_errors_drive_the_mse_strategy(cnn: gluon.HybridBlock, digits: tuple[np.ndarray, ...]) -> None:
    from inc_mxnet import MxnetBackend

    calib = inc.Dataset(digits[0][:64], batch_size=32)
    backend = MxnetBackend()
    errors = backend.op_errors(cnn, inc.QuantConfig(calib_samples=64), calibration=None, dataset=calib)
    assert set(errors) == {op.name for op in inc.describe(cnn).ops}
    # Read from the INT8 kernels' own outputs: small, but not zero (a wrong dequantization scale gives ~1).
    assert all(0.0 < e < 0.01 for e in errors.values()), errors
    excluded = backend.op_errors(
        cnn, inc.QuantConfig(calib_samples=64, exclude=inc.LayerFilter(names=("cnn_conv1_fwd",))), calibration=None, dataset=calib
    )
    assert excluded["cnn_conv1_fwd"] == 0.0 and excluded["cnn_dense0_fwd"] > 0.0
    _, x_test, _, y_test = digits
    result = inc.autotune(
        cnn, inc.TuningConfig(strategy="mse", tolerable_loss=0.01, max_trials=4),
        eval_fn=lambda m: models.accuracy(m, x_test, y_test), dataset=calib,
    )
    assert result.met and all(t.status == "evaluated" for t in result.trials)
