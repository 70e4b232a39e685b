"""Fixtures of the ONNX backend tests: trained digits models and their data."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnx_testmodels as models
import pytest

import inc_core as inc


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return models.digits()


@pytest.fixture
def mlp() -> onnx.ModelProto:
    return models.mlp()


@pytest.fixture
def cnn() -> onnx.ModelProto:
    return models.cnn()


@pytest.fixture
def calib(digits: tuple[np.ndarray, ...]) -> inc.Dataset:
    return inc.Dataset(digits[0][:256], batch_size=32)


@pytest.fixture
def cnn_file(tmp_path: Path, cnn: onnx.ModelProto) -> Path:
    path = tmp_path / "cnn.onnx"
    onnx.save_model(cnn, str(path))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
