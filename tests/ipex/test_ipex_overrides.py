"""IPEX fixes weight granularity for the whole model when it prepares it: a per-op granularity override
cannot be honoured and is refused, as are overrides naming no op."""

from __future__ import annotations

import pytest
from torch_helpers import calib_data, trained_cnn

import inc_core as inc
from inc_core.errors import ConfigError


def test_per_op_granularity_override_is_a_config_error() -> None:
    config = inc.QuantConfig(overrides={"conv1": {"granularity": "per_tensor"}})
    with pytest.raises(ConfigError, match=r"'granularity'.*whole model"):
        inc.quantize(trained_cnn(), config, dataset=calib_data(16), backend="ipex")


def test_override_naming_no_op_is_a_config_error() -> None:
    config = inc.QuantConfig(overrides={"fc_2": {"calibration": "kl"}})
    with pytest.raises(ConfigError, match=r"'fc_2'.*close: \['fc2'"):
        inc.quantize(trained_cnn(), config, dataset=calib_data(16), backend="ipex")

