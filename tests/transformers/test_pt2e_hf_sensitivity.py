"""Per-op INT8 error of transformers layers on PT2E (what the mse strategy ranks FP32 fallbacks by).

Every listed layer, HF Conv1D included, gets a measured error from the calibration pass, with no trial
compiled; a layer whose input range is stretched is ranked first.
"""

from __future__ import annotations

import torch
from torch_hf_helpers import cosine_metric, small_model, token_batches

import inc_core as inc
from inc_torch import TorchBackend


def _errors(model: torch.nn.Module) -> dict[str, float]:
    backend, config = TorchBackend(), inc.QuantConfig()
    dataset = inc.Dataset(token_batches(2, seed=0))
    calibration = backend.calibrate(model, dataset, config)
    return backend.op_errors(model, config, calibration=calibration, dataset=dataset)


def test_every_gpt2_conv1d_layer_gets_a_measured_error() -> None:
    model = small_model("gpt2")
    errors = _errors(model)
    listed = {op.name for op in inc.describe(model, inc.QuantConfig()).ops}
    assert set(errors) == listed
    assert all(value > 0.0 for value in errors.values()), errors


OUTLIER_READER = "encoder.layer.1.attention.output.dense"  # reads the attention context


def _bert_with_an_outlier_channel() -> torch.nn.Module:
    model = small_model("bert")
    with torch.no_grad():
        # One value channel 40x larger (an outlier, as trained transformers have) and the weight column that
        # reads it 40x smaller: attention is linear in the values, so the FP32 model computes the same
        # function, but the INT8 input range of OUTLIER_READER is stretched 40x, and its rounding error with it.
        value = model.get_submodule("encoder.layer.1.attention.self.value")
        value.weight[7].mul_(40.0)
        value.bias[7].mul_(40.0)
        model.get_submodule(OUTLIER_READER).weight[:, 7].div_(40.0)
    return model


def test_a_layer_fed_by_an_outlier_channel_ranks_first() -> None:
    errors = _errors(_bert_with_an_outlier_channel())
    assert max(errors, key=errors.__getitem__) == OUTLIER_READER, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


def test_mse_strategy_keeps_the_sensitive_layer_in_fp32_at_the_second_trial() -> None:
    """The goal sits halfway between the base INT8 model's cosine and FP32: the mse strategy ranks the
    fallback by measured per-op error, so the second trial already holds the right layer in FP32."""
    model = _bert_with_an_outlier_channel()
    calibration, scored = token_batches(2, seed=0), token_batches(1, seed=1)
    fidelity = cosine_metric(model, scored)
    base = inc.QuantConfig()
    first = fidelity(inc.quantize(model, base, dataset=inc.Dataset(calibration)))
    assert first < 0.9995, first  # the outlier costs the base recipe fidelity
    fixed = {key: (str(getattr(base, key)),) for key in ("calibration", "granularity", "scheme", "activation_dtype")}
    config = inc.TuningConfig(
        base=base, strategy="mse", tolerable_loss=(1.0 - first) / 2, loss_type="absolute", max_trials=4,
        search_space=fixed, history=None,
    )
    result = inc.autotune(model, config, eval_fn=fidelity, dataset=inc.Dataset(calibration))
    assert result.met and len(result.trials) == 2, [t.score for t in result.trials]
    assert tuple(result.config.exclude.names) == (OUTLIER_READER,)
