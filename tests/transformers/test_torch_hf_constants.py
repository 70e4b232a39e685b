"""Parameters read straight into a quantized op (a layer scale, a position embedding) need no calibration data:
their value is their statistics, even when the calibration pass recorded nothing for them."""

from __future__ import annotations

import numpy as np
import torch

import inc_core as inc
import inc_torch
from inc_torch import TorchBackend


class _ScaledEmbedding(torch.nn.Module):
    """fc2((fc1(x) + position) * layer_scale): the shape of a ViT's position embedding and a ConvNeXt layer scale."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)
        self.position = torch.nn.Parameter(torch.randn(1, 8))
        self.layer_scale = torch.nn.Parameter(torch.full((8,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2((self.fc1(x) + self.position) * self.layer_scale)


def test_parameters_observed_by_fx_are_quantized_from_their_values() -> None:
    model = _ScaledEmbedding().eval()
    data = inc.Dataset(np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32), batch_size=8)
    backend, config = TorchBackend(), inc.QuantConfig(format="fx")
    calibration = backend.calibrate(model, data, config)
    parameters = [name for name in calibration.histograms if name in ("position", "layer_scale")]
    assert parameters  # the FX graph observes them (add and mul are quantized)
    for name in parameters:
        del calibration.histograms[name]
    quantized = backend.quantize(model, config, calibration=calibration)
    assert {"fc1", "fc2"} <= set(inc_torch.quantized_ops(quantized))
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(16, 8)).astype(np.float32))
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(quantized(x).flatten(), model(x).flatten(), dim=0)
    assert float(cosine) > 0.99
