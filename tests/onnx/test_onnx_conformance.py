"""The backend conformance checks every inc plugin passes, on a trained digits CNN."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_testmodels as models

import inc_core as inc
from inc_core.testing import BackendConformance

_QUANT_TYPES = {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear"}


class TestOnnxConformance(BackendConformance):
    backend_name = "onnx"
    model_suffix = ".onnx"
    min_cosine = 0.99

    def make_model(self) -> onnx.ModelProto:
        return models.cnn()

    def make_dataset(self) -> inc.Dataset:
        return inc.Dataset(models.digits()[0][:64], batch_size=16)

    def make_wrong_shape_dataset(self) -> inc.Dataset:
        return inc.Dataset(np.zeros((8, 65), dtype=np.float32), batch_size=4)

    def fingerprint(self, model: onnx.ModelProto) -> Any:
        return model.SerializeToString(deterministic=True)

    def run(self, model: onnx.ModelProto, inputs: Any) -> np.ndarray:
        return models.run(model, inputs)

    def int8_ops(self, quantized: onnx.ModelProto) -> list[str]:
        return [n.name for n in quantized.graph.node if n.op_type in _QUANT_TYPES or self._reads_int8_weight(quantized, n)]

    def is_quantized(self, quantized: onnx.ModelProto, op_name: str) -> bool:
        nodes = {n.name: n for n in quantized.graph.node}
        if f"{op_name}_quant" in nodes:  # QOperator and dynamic rename the node they replace
            return True
        node = nodes.get(op_name)
        return node is not None and self._reads_int8_weight(quantized, node)

    @staticmethod
    def _reads_int8_weight(model: onnx.ModelProto, node: onnx.NodeProto) -> bool:
        """A QDQ node whose inputs come from DequantizeLinear of an int8 initializer."""
        int8 = set(models.int8_initializers(model))
        producers = {o: n for n in model.graph.node for o in n.output}
        return any(
            (p := producers.get(i)) is not None and p.op_type == "DequantizeLinear" and p.input[0] in int8
            for i in node.input
        )
