"""The torch backend passes the shared backend conformance checks (PT2E, the default format)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch_helpers import calib_data, split, state, trained_cnn

import inc_core as inc
import inc_torch
from inc_core.testing import BackendConformance


class TestTorchConformance(BackendConformance):
    backend_name = "torch"
    model_suffix = ".pt2"
    # Measured on the held-out batch (AMD EPYC, VNNI), PT2E static 0.99978, dynamic 0.999985 (IPEX: the same to
    # 1e-9): a 9x and a 60x margin for the rounding of other INT8 kernels.
    min_cosine = 0.998
    min_dynamic_cosine = 0.999

    def make_model(self) -> Any:
        return trained_cnn()

    def make_dataset(self) -> inc.Dataset:
        return calib_data(64, 16)

    def make_eval_batch(self) -> np.ndarray:
        return split()[2][:64]  # the held-out test split: calibration reads training samples

    def make_wrong_shape_dataset(self) -> inc.Dataset:
        x, _, _, _ = split()
        return inc.Dataset(x[:8].reshape(8, 1, 4, 16)[:, :, :, :5], batch_size=4)

    def fingerprint(self, model: Any) -> Any:
        return {k: v.numpy().tobytes() for k, v in state(model).items()}, model.training

    def run(self, model: Any, inputs: Any) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.asarray(inputs, dtype=np.float32))).numpy()

    def int8_ops(self, quantized: Any) -> list[str]:
        return inc_torch.quantized_ops(quantized)

    def is_quantized(self, quantized: Any, op_name: str) -> bool:
        return op_name in inc_torch.quantized_ops(quantized)

    def test_two_benchmark_instances_run_a_dynamic_model(self) -> None:
        """TorchScript (``.pt``) models reach the instances too, not only PT2E ExportedPrograms (``.pt2``)."""
        quantized = self._quantize(self.make_model(), inc.QuantConfig(approach="dynamic"))
        assert inc.get_backend(self.backend_name).file_suffix(quantized) == ".pt"
        result = inc.benchmark(quantized, self._first_batch(), warmup=1, iterations=3, instances=2, backend=self._backend_arg)
        assert result.instances == 2 and len({r.pid for r in result.per_instance}) == 2
        assert all(r.iterations == 3 and r.throughput > 0 for r in result.per_instance)
