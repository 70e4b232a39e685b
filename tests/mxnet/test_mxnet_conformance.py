"""The backend conformance checks every inc plugin passes, on a trained digits CNN."""

from __future__ import annotations

from typing import Any

import mxnet as mx
import mxnet_testmodels as models
import numpy as np
from conftest import graph_nodes, param_snapshot
from mxnet import gluon

import inc_core as inc
from inc_core.testing import BackendConformance


def _is_int8_node(node: dict[str, Any]) -> bool:
    attrs = node.get("attrs", {})
    return node["op"].startswith(("_contrib_quantize", "_contrib_quantized")) or attrs.get("quantized", "").lower() == "true"


class TestMxnetConformance(BackendConformance):
    backend_name = "mxnet"
    model_suffix = ".mxnet"
    min_cosine = 0.99
    min_dynamic_cosine = 0.99

    def make_model(self) -> gluon.HybridBlock:
        return models.cnn()

    def make_dataset(self) -> inc.Dataset:
        return inc.Dataset(models.digits()[0][:64], batch_size=16)

    def make_wrong_shape_dataset(self) -> inc.Dataset:
        return inc.Dataset(np.zeros((8, 3, 8, 8), dtype=np.float32), batch_size=4)

    def fingerprint(self, model: gluon.HybridBlock) -> Any:
        return sorted(param_snapshot(model).items()), model._active

    def run(self, model: gluon.Block, inputs: Any) -> np.ndarray:
        return model(mx.nd.array(inputs)).asnumpy()

    def int8_ops(self, quantized: gluon.SymbolBlock) -> list[str]:
        return [n["name"] for n in graph_nodes(quantized) if _is_int8_node(n)]

    def is_quantized(self, quantized: gluon.SymbolBlock, op_name: str) -> bool:
        for node in graph_nodes(quantized):
            inner = {m["name"] for g in node.get("subgraphs", []) for m in g["nodes"]}
            if node["name"] == f"quantized_{op_name}" or op_name in inner:
                return _is_int8_node(node)
        return False
