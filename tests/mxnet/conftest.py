"""Fixtures of the MXNet backend tests: trained digits models and their data."""

from __future__ import annotations

import json
from typing import Any

import mxnet as mx
import mxnet_testmodels as models
import numpy as np
import pytest
from mxnet import gluon

import inc_core as inc


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return models.digits()


@pytest.fixture
def cnn() -> gluon.HybridBlock:
    return models.cnn()


@pytest.fixture
def calib(digits: tuple[np.ndarray, ...]) -> inc.Dataset:
    return inc.Dataset(digits[0][:128], batch_size=32)


def graph_nodes(block: gluon.SymbolBlock) -> list[dict[str, Any]]:
    """The op nodes of a SymbolBlock's graph, as MXNet's symbol JSON lists them."""
    return [n for n in json.loads(block._cached_graph[1].tojson())["nodes"] if n["op"] != "null"]


def param_snapshot(block: gluon.Block) -> dict[str, bytes]:
    return {name: p.data(mx.cpu()).asnumpy().tobytes() for name, p in block.collect_params().items()}
