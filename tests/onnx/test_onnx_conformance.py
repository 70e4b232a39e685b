"""The backend conformance checks every inc plugin passes, on a trained digits CNN."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnx_testmodels as models

import inc_core as inc
from inc_core.testing import BackendConformance
from inc_onnx._int8_ops import int8_ops, runtime_graph

_QUANT_TYPES = {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear"}


def runtime_int8_nodes(model: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """(names of the nodes ONNX Runtime executes, names of those that compute on 8-bit data).

    Judged by the backend's own listing on the graph ORT runs after its QDQ fusions (which keeps node names).
    """
    graph = runtime_graph(model)
    if graph is None:  # ORT could not write its optimized graph: judge the QDQ graph itself
        return {n.name for n in model.graph.node}, set(int8_ops(model, qdq=True))
    return {n.name for n in graph.graph.node}, set(int8_ops(graph, qdq=False))


class TestOnnxConformance(BackendConformance):
    backend_name = "onnx"
    model_suffix = ".onnx"
    # Measured on the held-out batch (AMD EPYC, VNNI): static 0.99988, dynamic 0.99993 (8x and 14x margin).
    min_cosine = 0.999
    min_dynamic_cosine = 0.999

    def make_model(self) -> onnx.ModelProto:
        return models.cnn()

    def make_dataset(self) -> inc.Dataset:
        return inc.Dataset(models.digits()[0][:64], batch_size=16)

    def make_eval_batch(self) -> np.ndarray:
        return models.digits()[0][-64:]  # held out: calibration reads the first 64 samples

    def make_wrong_shape_dataset(self) -> inc.Dataset:
        return inc.Dataset(np.zeros((8, 65), dtype=np.float32), batch_size=4)

    def fingerprint(self, model: onnx.ModelProto) -> Any:
        return model.SerializeToString(deterministic=True)

    def run(self, model: onnx.ModelProto, inputs: Any) -> np.ndarray:
        return models.run(model, inputs)

    def int8_ops(self, quantized: onnx.ModelProto) -> list[str]:
        return [n.name for n in quantized.graph.node if n.op_type in _QUANT_TYPES or self._reads_int8_weight(quantized, n)]

    def is_quantized(self, quantized: onnx.ModelProto, op_name: str) -> bool:
        return self._quantized_names(quantized, [op_name]) == {op_name}

    def assert_exactly_quantized(self, quantized: onnx.ModelProto, ops: Sequence[inc.Op], expected: set[str]) -> None:
        names = self._quantized_names(quantized, [op.name for op in ops])
        assert names == expected, (
            f"INT8 ops {sorted(names)}, expected exactly {sorted(expected)} (in FP32 instead: "
            f"{sorted(expected - names)}; in INT8 though excluded: {sorted(names - expected)})"
        )

    @staticmethod
    def _quantized_names(quantized: onnx.ModelProto, op_names: Sequence[str]) -> set[str]:
        """Of ``op_names``, those that do not run as a float op of their own when ORT runs ``quantized``.

        Judged on the graph ORT executes: a node runs in INT8 when it is (or was rewritten into,
        ``<name>_quant``) an integer kernel or moves 8-bit data; a node ORT removed altogether was
        folded into the INT8 op next to it (a Relu into the range of its QuantizeLinear).
        """
        present, int8 = runtime_int8_nodes(quantized)
        return {
            name for name in op_names if name in int8 or f"{name}_quant" in int8 or name not in present
        }

    @staticmethod
    def _reads_int8_weight(model: onnx.ModelProto, node: onnx.NodeProto) -> bool:
        """A QDQ node whose inputs come from DequantizeLinear of an int8 initializer."""
        int8 = set(models.int8_initializers(model))
        producers = {o: n for n in model.graph.node for o in n.output}
        return any(
            (p := producers.get(i)) is not None and p.op_type == "DequantizeLinear" and p.input[0] in int8
            for i in node.input
        )
