"""backend="ipex" passes the shared backend conformance checks."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from test_ipex import _fp32_kernels, _int8_kernels
from torch_helpers import calib_data, split, state, trained_cnn

import inc_core as inc
import inc_torch
from inc_core.testing import BackendConformance


class TestIpexConformance(BackendConformance):
    backend_name = "ipex"
    explicit_backend = True
    model_suffix = ".pt"
    min_cosine = 0.99

    def make_model(self) -> Any:
        return trained_cnn()

    def make_dataset(self) -> inc.Dataset:
        return calib_data(64, 16)

    def make_wrong_shape_dataset(self) -> inc.Dataset:
        x, _, _, _ = split()
        return inc.Dataset(x[:8].reshape(8, 1, 4, 16)[:, :, :, :5], batch_size=4)

    def fingerprint(self, model: Any) -> Any:
        return {k: v.numpy().tobytes() for k, v in state(model).items()}, model.training

    def run(self, model: Any, inputs: Any) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.asarray(inputs, dtype=np.float32))).numpy()

    def int8_ops(self, quantized: Any) -> list[str]:
        # Dynamic models keep named torch.ao modules; static ones are traced graphs of oneDNN fusion groups.
        return inc_torch.quantized_ops(quantized) or _int8_kernels(quantized)

    def test_excluded_op_stays_fp32(self) -> None:
        # A traced IPEX graph carries no module names: check by kernel kind instead of by name.
        model = self.make_model()
        first = self._ops(model)[0]
        config = inc.QuantConfig(calib_samples=16, exclude=inc.LayerFilter(names=(first,)))
        quantized = self._quantize(model, config, self.make_dataset())
        assert sorted(_int8_kernels(quantized)) == ["_convolution", "linear", "linear"]
        fp32 = _fp32_kernels(quantized)
        assert len(fp32) == 1 and "conv" in fp32[0], fp32  # the excluded conv, and nothing else, runs in FP32
