"""Per-op INT8 error of transformers layers on PT2E (what the mse strategy ranks FP32 fallbacks by).

Every listed layer, HF Conv1D included, gets a measured error from the calibration pass, with no trial
compiled; a layer whose input range is stretched is ranked first.
"""

from __future__ import annotations

import torch
from torch_hf_helpers import small_model, token_batches

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


def test_a_layer_fed_by_an_outlier_channel_ranks_first() -> None:
    model = small_model("bert")
    target = "encoder.layer.1.attention.output.dense"  # reads the attention context
    with torch.no_grad():
        # One value channel 40x larger (an outlier, as trained transformers have) and the weight column that
        # reads it 40x smaller: attention is linear in the values, so the FP32 model computes the same
        # function, but the INT8 input range of `target` is stretched 40x, and its rounding error with it.
        value = model.get_submodule("encoder.layer.1.attention.self.value")
        value.weight[7].mul_(40.0)
        value.bias[7].mul_(40.0)
        model.get_submodule(target).weight[:, 7].div_(40.0)
    errors = _errors(model)
    assert max(errors, key=errors.__getitem__) == target, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
