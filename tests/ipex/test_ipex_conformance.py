"""backend="ipex" passes the shared backend conformance checks, on the same models and data as the torch backend."""

from __future__ import annotations

from typing import Any

# A module import, not the class itself: pytest would collect an imported Test* class here a second time.
import test_conformance as torch_conformance
from test_ipex import _fp32_kernels, _int8_kernels

import inc_core as inc
import inc_torch


class TestIpexConformance(torch_conformance.TestTorchConformance):
    backend_name = "ipex"
    explicit_backend = True
    model_suffix = ".pt"

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
