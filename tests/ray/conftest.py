"""A local multi-node Ray cluster (3 nodes, 1 CPU each) shared by the Ray tests, and the trained toy model."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
CORE_TESTS = HERE.parent / "core"
# Workers import the toy backend and the eval_fn's module by name: the nodes inherit this environment.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), str(CORE_TESTS), os.environ.get("PYTHONPATH")) if p)
for path in (str(HERE), str(CORE_TESTS)):
    if path not in sys.path:
        sys.path.insert(0, path)

NODES = 3
NODE_OPTIONS = {"num_cpus": 1, "object_store_memory": 128 * 1024**2}


@pytest.fixture(scope="session")
def cluster() -> Iterator[Any]:
    """Three raylets on this machine with one CPU each: three trials run at once, one per node."""
    import ray
    from ray.cluster_utils import Cluster

    local = Cluster(initialize_head=True, head_node_args={**NODE_OPTIONS, "include_dashboard": False})
    for _ in range(NODES - 1):
        local.add_node(**NODE_OPTIONS)
    local.wait_for_nodes()
    ray.init(address=local.address, logging_level="WARNING")
    try:
        yield local
    finally:
        ray.shutdown()
        local.shutdown()


@pytest.fixture(scope="session")
def workload() -> tuple[Any, Any, Any, Any]:
    import _workload

    return _workload.trained()
