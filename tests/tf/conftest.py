"""Fixtures of the tf backend tests: Keras models trained on digits, and their data."""

from __future__ import annotations

import numpy as np
import pytest
import tf_testmodels as models

import inc_core as inc


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return models.digits()


@pytest.fixture
def calib(digits: tuple[np.ndarray, ...]) -> inc.Dataset:
    return inc.Dataset(digits[0][:128], batch_size=32)
