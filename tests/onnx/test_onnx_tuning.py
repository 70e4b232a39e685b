"""Tuning on the ONNX backend: calibration collected once, per-op errors for mse, resume after a kill."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx_testmodels as models
import pytest
from onnx import numpy_helper

import inc_core as inc
import inc_onnx.ptq._collect as collect_module
from inc_core.errors import TuningError
from inc_core.testing import cosine
from inc_core.tuning import autotune

HERE = Path(__file__).parent


def _fp32_or_int8_score(model) -> float:
    """1.0 for the FP32 model, 0.5 for any INT8 one: no trial ever meets the goal, so tuning runs on."""
    return 0.5 if "DequantizeLinear" in models.op_types(model) or "QuantizeLinear" in models.op_types(model) else 1.0


def test_calibration_runs_once_across_trials(cnn, digits, monkeypatch):
    runs = {"n": 0}
    original = collect_module._run

    def counting(*args, **kwargs):
        runs["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(collect_module, "_run", counting)
    calib = inc.Dataset(digits[0][:96], batch_size=32)  # 3 batches
    tuning = inc.TuningConfig(base=inc.QuantConfig(calib_samples=96), max_trials=6, search_space={"calibration": ("minmax", "kl", "mse")})
    result = autotune(cnn, tuning, eval_fn=_fp32_or_int8_score, dataset=calib)
    assert len(result.trials) == 6
    configs = [t.quant_config for t in result.trials]
    assert len({c.to_json() for c in configs}) == 6  # six different configs, one calibration
    assert runs["n"] == 3, f"{runs['n']} augmented-graph runs for 6 trials; expected one pass of 3 batches"


def test_op_errors_rank_ops(cnn, digits):
    backend = inc.get_backend("onnx")
    calib = inc.Dataset(digits[0][:64], batch_size=32)
    config = inc.QuantConfig(calib_samples=64)
    calibration = backend.calibrate(cnn, calib, config)
    errors = backend.op_errors(cnn, config, calibration=calibration, dataset=calib)
    assert {"conv1", "conv2", "fc"} <= set(errors)
    assert all(math.isfinite(v) and v >= 0 for v in errors.values())
    assert 0 < errors["conv1"] < 0.05  # small but real quantization error
    # excluding an op leaves only the error coming from its inputs: less than when it is quantized
    fallback = inc.QuantConfig(calib_samples=64, exclude=inc.LayerFilter(names=("fc",)))
    assert backend.op_errors(cnn, fallback, calibration=calibration, dataset=calib)["fc"] < errors["fc"]


def _fixed_settings(base: inc.QuantConfig) -> dict[str, tuple[str, ...]]:
    """A search space holding every setting at the base value: only FP32 fallback is searched."""
    return {key: (str(getattr(base, key)),) for key in ("calibration", "granularity", "scheme", "activation_dtype")}


def test_mse_strategy_falls_back_in_op_error_order_from_a_base_that_misses(cnn, digits, monkeypatch):
    """The goal sits halfway between the base recipe's measured fidelity and FP32, so the base trial misses
    and the mse strategy has to measure per-op errors and put the worst ops in FP32, worst first."""
    x_train = digits[0]
    held_out = x_train[-300:]
    reference = models.run(cnn, held_out)

    def fidelity(model) -> float:  # cosine of the logits against FP32 on held-out digits
        return cosine(reference, models.run(model, held_out))

    calib = inc.Dataset(x_train[:128], batch_size=32)
    base = inc.QuantConfig(calibration="kl", calib_samples=128)
    first = fidelity(inc.quantize(cnn, base, dataset=calib))
    backend = inc.get_backend("onnx")
    measured: list[dict[str, float]] = []
    original = backend.op_errors

    def spy(*args, **kwargs):
        errors = original(*args, **kwargs)
        measured.append(errors)
        return errors

    monkeypatch.setattr(backend, "op_errors", spy)
    tuning = inc.TuningConfig(
        base=base, strategy="mse", tolerable_loss=(1.0 - first) / 2, loss_type="absolute", max_trials=12,
        search_space=_fixed_settings(base),
    )
    result = autotune(cnn, tuning, eval_fn=fidelity, dataset=calib)
    trials = result.trials
    assert trials[0].change == "base" and not trials[0].met and trials[0].score == pytest.approx(first, abs=1e-6)
    assert len(measured) == 1, "op_errors must run once, on the settings the search kept"
    errors = measured[0]
    names = [op.name for op in inc.describe(cnn, base).ops]
    ranked = sorted(names, key=lambda name: -errors.get(name, 0.0))
    assert errors[ranked[0]] > 0
    # No single-op trials: the fallback sets are the error ranking's prefixes of 1, 2, 4, ... ops, worst op first.
    fallbacks = [set(t.config["exclude"]["names"]) for t in trials[1:]]
    sizes = [k for k in (1, 2, 4, 8, 16) if k < len(ranked)] + [len(ranked)]
    assert fallbacks == [set(ranked[:k]) for k in sizes[: len(fallbacks)]]
    if result.met:
        assert result.score >= result.threshold and result.trial_id > 1
        assert models.int8_initializers(result.model), "the chosen model holds no int8 weight"
    else:
        assert all(t.score is None or t.score < result.threshold for t in trials)
    # The ranking must mean something: the op measured worst, alone in FP32, brings the score closer to FP32.
    assert trials[1].score is not None and trials[1].score > trials[0].score, (
        f"op_errors ranked {ranked[0]!r} worst ({errors}), but putting it in FP32 moved the score from "
        f"{trials[0].score:.6f} to {trials[1].score}"
    )


_KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {here!r})
    import inc_core as inc, onnx_testmodels as models
    from inc_core.tuning import autotune
    from test_onnx_tuning import _fp32_or_int8_score
    calls = 0
    def eval_fn(model):
        global calls
        calls += 1
        if calls == 4:  # baseline + 2 finished trials, then die in the middle of the third
            os.kill(os.getpid(), signal.SIGKILL)
        return _fp32_or_int8_score(model)
    tuning = inc.TuningConfig(base=inc.QuantConfig(calib_samples=32), max_trials=5, history={history!r})
    autotune(models.cnn(), tuning, eval_fn=eval_fn, dataset=inc.Dataset(models.digits()[0][:32], batch_size=16))
    """
)


def test_resume_after_a_killed_tuning_run(tmp_path, cnn, digits):
    history = tmp_path / "tuning.json"
    script = _KILLED_RUN.format(here=str(HERE), history=str(history))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == -9, proc.stderr[-2000:]
    saved = json.loads(history.read_text())
    assert len(saved["trials"]) == 2
    calls = {"n": 0}

    def eval_fn(model):
        calls["n"] += 1
        return _fp32_or_int8_score(model)

    tuning = inc.TuningConfig(base=inc.QuantConfig(calib_samples=32), max_trials=5, history=str(history))
    result = autotune(cnn, tuning, eval_fn=eval_fn, dataset=inc.Dataset(digits[0][:32], batch_size=16))
    statuses = [t.status for t in result.trials]
    assert statuses == ["resumed", "resumed", "evaluated", "evaluated", "evaluated"]
    assert calls["n"] == 3, "the baseline and the finished trials must not be evaluated again"
    assert result.baseline == 1.0


def test_cli_quantize_with_eval(tmp_path, cnn_file, digits):
    x_train, _, y_train, _ = digits
    np.savez(tmp_path / "calib.npz", pixels=x_train[:64])
    np.savez(tmp_path / "val.npz", x=x_train[-300:], y=y_train[-300:])
    (tmp_path / "evaluate.py").write_text(
        textwrap.dedent(
            f"""
            import numpy as np, onnxruntime as ort
            data = np.load({str(tmp_path / 'val.npz')!r})
            def accuracy(model):
                s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
                return float(np.mean(np.argmax(s.run(None, {{"pixels": data["x"]}})[0], axis=1) == data["y"]))
            """
        )
    )
    out = tmp_path / "cnn.int8.onnx"
    proc = subprocess.run(
        [
            sys.executable, "-m", "inc_core.cli", "quantize", str(cnn_file), "-o", str(out), "--calib",
            str(tmp_path / "calib.npz"), "--calib-batch-size", "32", "--eval", f"{tmp_path / 'evaluate.py'}:accuracy",
            "--format", "qoperator", "--max-trials", "5",
        ],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import onnx

    assert "QLinearConv" in models.op_types(onnx.load_model(str(out)))


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_inc_benchmark_runs_onnx_models(cnn, digits, fmt):
    q = inc.quantize(cnn, inc.QuantConfig(format=fmt, calib_samples=32), dataset=inc.Dataset(digits[0][:32]))
    result = inc.benchmark(q, digits[0][:8], warmup=2, iterations=5)
    assert result.batch_size == 8 and result.throughput > 0


def test_a_history_is_not_resumed_for_a_model_file_with_other_weights(tmp_path, cnn, digits):
    history, path = tmp_path / "tuning.json", tmp_path / "model.onnx"
    onnx.save_model(cnn, str(path))
    tuning = inc.TuningConfig(base=inc.QuantConfig(calib_samples=32), max_trials=1, history=str(history))
    data = inc.Dataset(digits[0][:32], batch_size=16)

    def score(model):  # the baseline is the path given
        return _fp32_or_int8_score(onnx.load(model) if isinstance(model, str) else model)

    autotune(str(path), tuning, eval_fn=score, dataset=data)
    assert [t.status for t in autotune(str(path), tuning, eval_fn=score, dataset=data).trials] == ["resumed"]
    weight = next(init for init in cnn.graph.initializer if len(init.dims) > 1)
    changed = numpy_helper.to_array(weight) * 1.01
    weight.CopyFrom(numpy_helper.from_array(changed.astype(np.float32), weight.name))
    onnx.save_model(cnn, str(path))  # retrained in place: the same file name, other weights
    with pytest.raises(TuningError, match="this architecture with other weights"):
        autotune(str(path), tuning, eval_fn=score, dataset=data)
