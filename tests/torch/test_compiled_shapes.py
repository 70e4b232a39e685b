"""A PT2E INT8 model called with many input shapes: each compiles once, beyond dynamo's default of 8 per model.

Before, the 9th distinct shape (batch sizes here; sequence lengths in NLP serving) and every later one ran
uncompiled, through the reference graph, silently: a 2-layer BERT went from 0.96 ms to 2.9 ms a call, slower than
its FP32 model.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import inc_core as inc
from inc_torch.ptq import _compiled


def _int8_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    calib = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    return inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset(calib, batch_size=8))


def test_more_input_shapes_than_dynamos_default_each_run_compiled() -> None:
    quantized = _int8_model()
    # dynamo raises instead of running a shape uncompiled once a model's compiled programs reach the limit
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), torch.no_grad():
        for batch in range(1, 12):  # 11 shapes, with the calibration batch's 8 (compiled by the check run)
            out = quantized(torch.randn(batch, 16))
            assert out.shape == (batch, 4)


def test_shapes_beyond_the_limit_are_said_to_run_uncompiled(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(_compiled, "MAX_COMPILED_SHAPES", 2)
    quantized = _int8_model()  # one shape compiled by the check run
    with caplog.at_level(logging.DEBUG, logger="inc"), torch.no_grad():
        for batch in (1, 2, 3, 1):
            quantized(torch.randn(batch, 16))
    messages = [r.getMessage() for r in caplog.records if r.name == "inc"]
    assert sum("for a new input shape (2 shapes so far" in m for m in messages) == 1
    warnings = [m for m in messages if "compiled for 2 input shapes, the most it keeps" in m]
    assert len(warnings) == 1 and "Pad inputs to a few fixed lengths" in warnings[0]
