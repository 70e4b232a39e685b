"""backend="ipex" passes the shared backend conformance checks, on the same models and data as the torch backend."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

# A module import, not the class itself: pytest would collect an imported Test* class here a second time.
import test_conformance as torch_conformance
import torch
from test_ipex import _fp32_kernels, _int8_kernels

import inc_core as inc
import inc_torch


def _kernel_kind(op_type: str) -> str:
    """The aten kernel a described torch op type runs as inside an IPEX fusion group."""
    return "_convolution" if "conv" in op_type.lower() else "linear"


class TestIpexConformance(torch_conformance.TestTorchConformance):
    backend_name = "ipex"
    explicit_backend = True
    model_suffix = ".pt"

    def int8_ops(self, quantized: Any) -> list[str]:
        # Dynamic models keep named torch.ao modules; static ones are traced graphs of oneDNN fusion groups.
        return inc_torch.quantized_ops(quantized) or _int8_kernels(quantized)

    def assert_exactly_quantized(self, quantized: Any, ops: Sequence[inc.Op], expected: set[str]) -> None:
        if not isinstance(quantized, torch.jit.ScriptModule):  # dynamic: named torch.ao modules
            super().assert_exactly_quantized(quantized, ops, expected)
            return
        assert set(inc_torch.quantized_ops(quantized)) == expected  # the INT8 ops by name (see _ipex_ops) ...
        # ... and the kernels by kind, INT8 and FP32 both (the frozen graph holds no modules to name FP32 ones).
        want_int8 = Counter(_kernel_kind(op.op_type) for op in ops if op.name in expected)
        want_fp32 = Counter(_kernel_kind(op.op_type) for op in ops if op.name not in expected)
        got_int8 = Counter(_int8_kernels(quantized))
        got_fp32 = Counter("_convolution" if "conv" in kind else "linear" for kind in _fp32_kernels(quantized))
        assert (got_int8, got_fp32) == (want_int8, want_fp32), (
            f"INT8 kernels {dict(got_int8)} and FP32 kernels {dict(got_fp32)}; expected INT8 {dict(want_int8)} and "
            f"FP32 {dict(want_fp32)} (the ops left in FP32: {sorted(op.name for op in ops if op.name not in expected)})"
        )
