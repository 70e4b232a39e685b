"""Tuning support: per-op errors for the mse strategy, fallback trials, autotune end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_helpers import calib_data, same_state, split, state, trained_cnn, trained_mlp

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


def _fixed_settings(base: inc.QuantConfig) -> dict[str, tuple[str, ...]]:
    """A search space holding every setting at the base value: only FP32 fallback is searched."""
    return {key: (str(getattr(base, key)),) for key in ("calibration", "granularity", "scheme", "activation_dtype")}


@pytest.mark.parametrize("strategy", ["basic", "mse"])
def test_autotune_falls_back_from_a_base_that_misses_the_goal(strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The goal sits halfway between the base recipe's measured fidelity and FP32, so the base trial misses and
    the strategy has to rank the ops (basic: one trial per op alone in FP32; mse: the backend's per-op errors)
    and put the worst in FP32 first."""
    from inc_core.testing import cosine
    from inc_core.tuning import autotune

    model = trained_cnn()
    before = state(model)
    held_out = torch.from_numpy(split()[2])
    with torch.no_grad():
        reference = model(held_out).numpy()

    def fidelity(candidate: torch.nn.Module) -> float:  # cosine of the logits against FP32 on held-out digits
        with torch.no_grad():
            return cosine(reference, candidate(held_out).numpy())

    base = inc.QuantConfig(format="fx", calib_samples=64)
    first = fidelity(inc.quantize(model, base, dataset=calib_data(64)))
    backend = inc.get_backend("torch")
    calls: dict[str, list] = {"calibrate": [], "op_errors": []}
    calibrate, op_errors = backend.calibrate, backend.op_errors

    def counting_calibrate(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["calibrate"].append(1)
        return calibrate(*args, **kwargs)

    def recording_op_errors(*args, **kwargs):  # type: ignore[no-untyped-def]
        errors = op_errors(*args, **kwargs)
        calls["op_errors"].append(errors)
        return errors

    monkeypatch.setattr(backend, "calibrate", counting_calibrate)
    monkeypatch.setattr(backend, "op_errors", recording_op_errors)
    names = [op.name for op in inc.describe(model, base).ops]
    config = inc.TuningConfig(
        base=base, strategy=strategy, tolerable_loss=(1.0 - first) / 2, loss_type="absolute",
        max_trials=2 * len(names) + 2, search_space=_fixed_settings(base),
    )
    result = autotune(model, config, eval_fn=fidelity, dataset=calib_data(64))
    trials = result.trials
    assert len(calls["calibrate"]) == 1
    assert trials[0].change == "base" and not trials[0].met and trials[0].score == pytest.approx(first, abs=1e-5)
    assert {"conv1", "conv2", "fc1", "fc2"} <= set(names)
    if strategy == "basic":
        assert calls["op_errors"] == []
        singles = trials[1 : 1 + len(names)]
        assert [t.config["exclude"]["names"] for t in singles] == [[n] for n in names]
        gain = {t.config["exclude"]["names"][0]: t.score for t in singles}
        ranked = sorted(names, key=lambda n: -gain[n])
        accumulated = trials[1 + len(names) :]
    else:
        assert len(calls["op_errors"]) == 1, "op_errors must run once, on the settings the search kept"
        errors = calls["op_errors"][0]
        assert set(errors) == set(names) and all(errors[n] > 0 for n in ("conv1", "conv2", "fc1", "fc2"))
        ranked = sorted(names, key=lambda n: -errors[n])
        accumulated = trials[1:]
        # The ranking must mean something: the op measured worst, alone in FP32, brings the score closer to FP32.
        assert accumulated[0].score is not None and accumulated[0].score > trials[0].score
    # Fallback sets: the ranking's prefixes, worst op first (a set already tried is not tried again).
    expected = [set(ranked[:k]) for k in range(1, len(ranked) + 1)]
    assert all(set(t.config["exclude"]["names"]) in expected for t in accumulated)
    assert [len(t.config["exclude"]["names"]) for t in accumulated] == sorted(len(t.config["exclude"]["names"]) for t in accumulated)
    if result.met:
        assert result.score >= result.threshold and result.trial_id > 1
        assert inc_torch.quantized_ops(result.model), "the fallback put every op in FP32"
        assert fidelity(result.model) == pytest.approx(result.score, abs=1e-5)
    else:  # honest: nothing reached the goal
        assert all(t.score is None or t.score < result.threshold for t in trials)
    assert same_state(state(model), before)


def test_a_history_is_not_resumed_for_retrained_weights(tmp_path) -> None:
    # same architecture, other weights (a retrained model): the stored baseline and scores belong to the old ones
    history = tmp_path / "tuning.json"
    _, _, x_test, y_test = split()
    x, y = torch.from_numpy(x_test), torch.from_numpy(y_test)

    def accuracy(model: torch.nn.Module) -> float:
        return float((model(x).argmax(1) == y).float().mean())

    config = inc.TuningConfig(history=str(history), max_trials=1)
    inc.autotune(trained_mlp(), config, eval_fn=accuracy, dataset=calib_data())
    resumed = inc.autotune(trained_mlp(), config, eval_fn=accuracy, dataset=calib_data())
    assert [t.status for t in resumed.trials] == ["resumed"]
    retrained = trained_mlp()
    with torch.no_grad():
        retrained.fc1.weight.add_(0.01)
    with pytest.raises(inc.errors.TuningError, match="this architecture with other weights"):
        inc.autotune(retrained, config, eval_fn=accuracy, dataset=calib_data())
