"""OpenVINO as a second runtime for the same ONNX file, called the way an ONNX Runtime session is.

OpenVINO reads the standard ONNX file itself (its ONNX frontend turns each QuantizeLinear/
DequantizeLinear pair into a FakeQuantize, which its CPU plugin folds into int8 kernels), so the
INT8 model inc writes is not changed or converted by the user. The ``openvino`` package is optional
(``pip install inc-onnx[openvino]``); it is imported only when this runtime is asked for.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from inc_core.errors import BackendNotFoundError, ConfigError, DatasetError, IncError, ModelLoadError

__all__ = ["INSTALL_HINT", "PRECISIONS", "OpenVinoSession", "TensorInfo", "compile_openvino", "import_openvino"]

log = logging.getLogger("inc")

INSTALL_HINT = "pip install 'inc-onnx[openvino]'"
# "f32": activations and float ops stay FP32 around the int8 kernels, as on ONNX Runtime (the default:
# without the hint OpenVINO runs float ops in bf16 on CPUs with AVX512-BF16 or AMX, which changes outputs).
# "bf16": OpenVINO's bf16 for float ops. "default": whatever OpenVINO picks for this CPU.
PRECISIONS = ("f32", "bf16", "default")

# OpenVINO element type names -> the type strings ORT's NodeArg.type reports.
_ORT_TYPES = {
    "f32": "tensor(float)", "f16": "tensor(float16)", "bf16": "tensor(bfloat16)", "f64": "tensor(double)",
    "i64": "tensor(int64)", "i32": "tensor(int32)", "i16": "tensor(int16)", "i8": "tensor(int8)",
    "u64": "tensor(uint64)", "u32": "tensor(uint32)", "u16": "tensor(uint16)", "u8": "tensor(uint8)",
    "boolean": "tensor(bool)",
}


def import_openvino() -> Any:
    """The ``openvino`` module, or a BackendNotFoundError naming the extra to install."""
    try:
        import openvino
    except ImportError as exc:
        raise BackendNotFoundError(
            f"runtime='openvino' needs the OpenVINO runtime, which is not installed here ({exc}). Install it with "
            f"`{INSTALL_HINT}` (OpenVINO 2026.4 or later), or use runtime='ort' (ONNX Runtime's CPU provider)."
        ) from exc
    return openvino


@functools.cache
def _core() -> Any:
    # One Core per process: it holds the loaded CPU plugin, whose start-up is the slow part of a compile.
    return import_openvino().Core()


@dataclass(frozen=True)
class TensorInfo:
    """An input or output of an :class:`OpenVinoSession`, with the fields of ORT's ``NodeArg``."""

    name: str
    shape: list[int | None]
    type: str


class OpenVinoSession:
    """An OpenVINO compiled model with ONNX Runtime's calling convention (``run``, ``get_inputs``, ``get_outputs``).

    Inputs and outputs keep the ONNX graph's names and order. One infer request is reused for every
    call, so a session serves one caller at a time (as a benchmark or an evaluation loop uses it).
    """

    runtime = "openvino"

    def __init__(self, compiled: Any, properties: Mapping[str, str], bf16_ops: Sequence[str] = ()) -> None:
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self.properties = dict(properties)
        # The ONNX ops this session runs in bf16 (the model's BF16 list; empty when it has none or runs them in f32).
        self.bf16_ops = tuple(bf16_ops)
        self._inputs = [_info(port) for port in compiled.inputs]
        self._outputs = [_info(port) for port in compiled.outputs]
        self._output_ports = {}
        for port in compiled.outputs:
            for name in port.get_names():
                self._output_ports[name] = port

    @property
    def compiled_model(self) -> Any:
        """The ``openvino.CompiledModel`` (its ``get_runtime_model()`` shows the precision each node runs in)."""
        return self._compiled

    def get_inputs(self) -> list[TensorInfo]:
        return list(self._inputs)

    def get_outputs(self) -> list[TensorInfo]:
        return list(self._outputs)

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any]) -> list[np.ndarray]:
        """Run one inference; returns the outputs named (all, in graph order, for ``None``) as numpy arrays.

        Raises:
            DatasetError: an output or input name the model does not have, a missing input, or inputs
                OpenVINO refuses (shape, dtype).
        """
        names = [o.name for o in self._outputs] if output_names is None else list(output_names)
        unknown = [n for n in names if n not in self._output_ports]
        if unknown:
            raise DatasetError(
                f"OpenVINO session: no output named {unknown}; the model's outputs are {[o.name for o in self._outputs]}."
            )
        expected = [i.name for i in self._inputs]
        if set(input_feed) != set(expected):
            raise DatasetError(
                f"OpenVINO session: inputs {sorted(input_feed)} given, but the model's inputs are {expected}; "
                "feed each of them by name, as for an ONNX Runtime session."
            )
        arrays = {name: np.asarray(value) for name, value in input_feed.items()}
        for info in self._inputs:
            # OpenVINO does not check every shape against the model (a wrong length can run), so check here.
            shape = arrays[info.name].shape
            if len(shape) != len(info.shape) or any(d is not None and d != g for d, g in zip(info.shape, shape)):
                raise DatasetError(
                    f"OpenVINO session: input {info.name!r} has shape {list(shape)}, but the model expects "
                    f"{['?' if d is None else d for d in info.shape]} (? is any size)."
                )
        try:
            results = self._request.infer(arrays)
        except Exception as exc:  # OpenVINO raises RuntimeError with the reason in its text
            text = (str(exc).strip() or type(exc).__name__).splitlines()[0][:400]
            raise DatasetError(
                f"OpenVINO could not run the model on the given inputs: {text}. The model's inputs are "
                f"{', '.join(f'{i.name} {i.type} {i.shape}' for i in self._inputs)}."
            ) from exc
        # Copies: the request's output buffers are overwritten by the next call.
        return [np.array(results[self._output_ports[n]]) for n in names]


def _info(port: Any) -> TensorInfo:
    shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
    kind = port.get_element_type().get_type_name()
    return TensorInfo(name=port.get_any_name(), shape=shape, type=_ORT_TYPES.get(kind, f"tensor({kind})"))


def check_precision(owner: str, precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"{owner}: openvino_precision={precision!r} is not one of {list(PRECISIONS)}.")
    return precision


def compile_openvino(model: Any, proto: onnx.ModelProto, *, threads: int, precision: str = "f32") -> OpenVinoSession:
    """Compile an ONNX model for OpenVINO's CPU plugin with a latency-oriented configuration.

    Args:
        model: what the user gave (a path is read by OpenVINO directly, external data included).
        proto: the same model as a validated ModelProto (written to a temporary file when ``model`` is not a path).
        threads: ``INFERENCE_NUM_THREADS``.
        precision: one of :data:`PRECISIONS`.

    The ops the model's metadata lists for BF16 (``QuantConfig(bf16=...)``) run in bf16 whatever
    ``precision`` is, on CPUs with BF16 instructions (see :mod:`inc_onnx.runtime._bf16`); elsewhere in f32.

    Raises:
        BackendNotFoundError: openvino is not installed.
        ModelLoadError: OpenVINO cannot read or compile the model.
    """
    from inc_onnx.runtime._bf16 import bf16_unavailable, convert_to_bf16, recorded_bf16_ops

    ov = import_openvino()
    bf16_ops = recorded_bf16_ops(proto)
    reason = bf16_unavailable() if bf16_ops else None
    if reason is not None:
        log.info("OpenVINO runs the model's %d BF16 ops in f32: %s.", len(bf16_ops), reason)
        bf16_ops = ()
    properties = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": str(threads)}
    if precision != "default":
        properties["INFERENCE_PRECISION_HINT"] = precision
    try:
        if isinstance(model, (str, os.PathLike)):
            read = _core().read_model(str(model))
        else:
            # OpenVINO's ONNX frontend reads files; the temporary copy is gone once the model is read.
            with tempfile.TemporaryDirectory(prefix="inc-onnx-ov-") as tmp:
                path = Path(tmp) / "model.onnx"
                onnx.save_model(proto, str(path))
                read = _core().read_model(str(path))
        if bf16_ops:
            convert_to_bf16(read, bf16_ops, [node.name for node in proto.graph.node])
        compiled = _core().compile_model(read, "CPU", properties)
    except IncError:
        raise
    except Exception as exc:  # OpenVINO raises RuntimeError (and others from its frontends) with the reason as text
        text = (str(exc).strip() or type(exc).__name__).splitlines()[0][:500]
        raise ModelLoadError(
            f"OpenVINO {ov.__version__} cannot compile the model for its CPU plugin: {text}. Use runtime='ort' for "
            "this model."
        ) from exc
    return OpenVinoSession(compiled, properties, bf16_ops)
