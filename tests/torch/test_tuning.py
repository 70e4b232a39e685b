"""Tuning support: per-op errors for the mse strategy, fallback trials, autotune end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_helpers import accuracy, calib_data, relative_loss, same_state, state, trained_cnn, trained_mlp

import inc_core as inc
import inc_torch
from inc_core.calibration import compute_qparams, fake_quantize, weight_qparams


def _fc2_inputs_and_outputs(model: torch.nn.Module, data: inc.Dataset) -> tuple[list[np.ndarray], list[np.ndarray]]:
    inputs: list[np.ndarray] = []
    outputs: list[np.ndarray] = []
    handle = model.fc2.register_forward_hook(lambda m, a, out: (inputs.append(a[0].numpy()), outputs.append(out.numpy())))
    with torch.no_grad():
        for batch, _ in data:
            model(torch.from_numpy(batch))
    handle.remove()
    return inputs, outputs


def test_static_op_error_matches_hand_computation() -> None:
    model = trained_cnn()
    data = calib_data(64, 32)
    config = inc.QuantConfig(calib_samples=64)
    backend = inc.get_backend("torch")
    calibration = backend.calibrate(model, data, config)
    errors = backend.op_errors(model, config, calibration=calibration, dataset=data)
    assert set(errors) == {"conv1", "conv2", "fc1", "fc2"}
    inputs, outputs = _fc2_inputs_and_outputs(model, data)
    stacked = np.concatenate(inputs)
    qp = compute_qparams(stacked.min(), stacked.max(), dtype="uint8", scheme="asym")
    weight = model.fc2.weight.detach().numpy()
    w_fq = fake_quantize(weight, weight_qparams(weight, axis=0))
    bias = model.fc2.bias.detach().numpy()
    squared = sum(float(((fake_quantize(x, qp) @ w_fq.T + bias - y) ** 2).sum()) for x, y in zip(inputs, outputs))
    expected = squared / sum(y.size for y in outputs)
    assert errors["fc2"] == pytest.approx(expected, rel=1e-3)
    assert all(e > 0 for e in errors.values())


def test_excluded_ops_report_no_error() -> None:
    model = trained_cnn()
    config = inc.QuantConfig(exclude=inc.LayerFilter(names=("conv2",)))
    backend = inc.get_backend("torch")
    calibration = backend.calibrate(model, calib_data(32), config)
    errors = backend.op_errors(model, config, calibration=calibration, dataset=calib_data(32))
    assert errors["conv2"] == 0.0 and errors["conv1"] > 0.0


def test_dynamic_op_errors_come_from_the_quantized_layers() -> None:
    model = trained_mlp()
    backend = inc.get_backend("torch")
    config = inc.QuantConfig(approach="dynamic")
    errors = backend.op_errors(model, config, calibration=None, dataset=calib_data(32))
    assert set(errors) == {"fc1", "fc2", "fc3"} and all(0.0 < e < 1e-2 for e in errors.values())


@pytest.mark.parametrize("strategy", ["basic", "mse"])
def test_autotune_meets_one_percent_on_digits(strategy: str) -> None:
    from inc_core.tuning import autotune

    model = trained_cnn()
    before = state(model)
    calls = {"calibrate": 0}
    backend = inc.get_backend("torch")
    original = backend.calibrate

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["calibrate"] += 1
        return original(*args, **kwargs)

    backend.calibrate = counting  # type: ignore[method-assign]
    try:
        config = inc.TuningConfig(
            base=inc.QuantConfig(format="fx", calib_samples=64), strategy=strategy, tolerable_loss=0.01, max_trials=4
        )
        result = autotune(model, config, eval_fn=accuracy, dataset=calib_data(64))
    finally:
        del backend.calibrate
    assert calls["calibrate"] == 1
    assert result.met and relative_loss(result.baseline, result.score) <= 0.01
    assert inc_torch.quantized_ops(result.model)
    assert same_state(state(model), before)
