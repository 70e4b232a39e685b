"""Fixtures of the OpenVINO runtime tests: the digits models of tests/onnx, quantized by inc."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

# One definition of the trained digits models, shared with the ONNX Runtime tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "onnx"))

import onnx_testmodels as models  # noqa: E402

import inc_core as inc  # noqa: E402


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return models.digits()


@pytest.fixture(scope="session")
def int8_cnn(digits: tuple[np.ndarray, ...]) -> onnx.ModelProto:
    """The digits CNN (two Conv + Gemm) as inc's default static INT8 QDQ model."""
    return inc.quantize(models.cnn(), inc.QuantConfig(calib_samples=256), dataset=inc.Dataset(digits[0][:256], batch_size=32))


@pytest.fixture(scope="session")
def int8_mlp(digits: tuple[np.ndarray, ...]) -> onnx.ModelProto:
    """The digits MLP (MatMul + Add) as inc's default static INT8 QDQ model."""
    return inc.quantize(models.mlp(), inc.QuantConfig(calib_samples=256), dataset=inc.Dataset(digits[0][:256], batch_size=32))
