"""Inference sessions for INT8 models on CPU: ONNX Runtime set up for int8, or OpenVINO on the same file."""

from __future__ import annotations

import logging
import os
from typing import Any

import onnx
import onnxruntime as ort

from inc_core.errors import ConfigError, ModelLoadError
from inc_onnx._int8_ops import float_qdq_ops
from inc_onnx._model_io import as_model_proto

__all__ = ["create_session", "session_options"]

log = logging.getLogger("inc")

_LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


def session_options(
    *,
    threads: int | None = None,
    optimization: str = "all",
    spinning: bool = True,
    denormal_as_zero: bool = True,
    log_severity: int = 3,
    qdq_cleanup: bool = True,
) -> ort.SessionOptions:
    """``SessionOptions`` suited to running an INT8 model on CPU.

    What it sets, and why:

    - graph optimization ``ORT_ENABLE_ALL`` (``optimization="all"``): the QDQ node groups are fused into
      int8 kernels (QLinearConv, QLinearMatMul, MatMulIntegerToFloat, ...) only at the extended levels,
      and layout transforms (NCHWc) come with "all";
    - ``session.enable_quant_qdq_cleanup`` (``qdq_cleanup=True``): drops QuantizeLinear/DequantizeLinear pairs
      that cancel out between fused int8 kernels, so activations stay int8 from one kernel to the next. Not for a
      model with a ConvTranspose between DequantizeLinear and QuantizeLinear (QDQ made for OpenVINO, or by ORT's
      own quantizer): ORT runs it in float, folds the Relu after it into the QuantizeLinear, and the clean-up then
      drops that pair and the Relu with it (a DCGAN generator's output cosine fell to 0.69).
      :func:`create_session` leaves it off for such models;
    - ``session.qdqisint8allowed`` left to ORT: on x86 ORT rewrites int8 activations to uint8, the operand
      type the VNNI dot-product instructions take;
    - ``session.set_denormal_as_zero``: float ops around the int8 kernels never hit slow denormal paths;
    - sequential execution with ``threads`` intra-op threads (default: all CPUs this process may use)
      and one inter-op thread, spinning worker threads for low latency.

    Args:
        threads: intra-op threads; ``None`` uses every CPU in this process's affinity mask.
        optimization: ``"all"``, ``"extended"``, ``"basic"`` or ``"disabled"``.
        spinning: let idle worker threads spin (lower latency, more CPU use while idle).
        denormal_as_zero: flush denormal floats to zero.
        log_severity: ORT's log level (0 verbose ... 4 fatal).
        qdq_cleanup: drop cancelling QDQ pairs between fused kernels (see above).

    Raises:
        ConfigError: an argument is out of range.
    """
    if optimization not in _LEVELS:
        raise ConfigError(f"session_options: optimization={optimization!r} is not one of {sorted(_LEVELS)}.")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"session_options: threads must be an int >= 1 or None, got {threads!r}.")
    if isinstance(log_severity, bool) or not isinstance(log_severity, int) or not 0 <= log_severity <= 4:
        raise ConfigError(f"session_options: log_severity must be an int in 0..4, got {log_severity!r}.")
    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS[optimization]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads if threads is not None else available_cpus()
    options.inter_op_num_threads = 1
    options.log_severity_level = log_severity
    options.add_session_config_entry("session.enable_quant_qdq_cleanup", "1" if qdq_cleanup else "0")
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.set_denormal_as_zero", "1" if denormal_as_zero else "0")
    return options


def create_session(
    model: Any,
    options: ort.SessionOptions | None = None,
    *,
    runtime: str = "auto",
    threads: int | None = None,
    openvino_precision: str = "f32",
) -> Any:
    """A CPU inference session for a ModelProto or .onnx path, on ONNX Runtime or OpenVINO.

    The model file is the same standard ONNX for both runtimes. ``runtime``:

    - ``"ort"``: an ``onnxruntime.InferenceSession`` on the CPU provider with :func:`session_options`;
    - ``"openvino"``: an :class:`~inc_onnx.OpenVinoSession`, the model compiled by OpenVINO's CPU plugin with
      the ``LATENCY`` performance hint and ``threads`` inference threads; it has ORT's ``run(output_names,
      feeds)``, ``get_inputs()`` and ``get_outputs()``. Needs ``pip install 'inc-onnx[openvino]'``;
    - ``"auto"`` (the default): the faster of the two on this model and this CPU, measured once per
      process by :func:`inc_onnx.choose_runtime` (about a second, then cached); ONNX Runtime when OpenVINO
      is not installed. Given ``options`` (ORT's own), "auto" means ONNX Runtime.

    Args:
        model: an ``onnx.ModelProto`` or the path of an ``.onnx`` file.
        options: ONNX Runtime session options; default :func:`session_options` with ``threads``.
        runtime: ``"auto"``, ``"ort"`` or ``"openvino"``.
        threads: intra-op / inference threads (``None``: every CPU this process may use).
        openvino_precision: precision OpenVINO runs float ops in: ``"f32"`` (the default: outputs as close
            to ONNX Runtime's as the int8 kernels allow), ``"bf16"``, or ``"default"`` (OpenVINO's own
            choice, bf16 on CPUs with AVX512-BF16 or AMX). The ops a model quantized with
            ``QuantConfig(bf16=...)`` lists run in bf16 on OpenVINO whatever this is (on CPUs with BF16
            instructions), and in FP32 on ONNX Runtime, whose CPU provider has no BF16 kernels for them.

    Raises:
        ConfigError: an unknown runtime or precision, or ``options`` with runtime="openvino".
        BackendNotFoundError: runtime="openvino" and OpenVINO is not installed (names the extra to install).
        ModelLoadError: the model cannot be read or the runtime cannot load it.
    """
    from inc_onnx.runtime._openvino import check_precision, compile_openvino
    from inc_onnx.runtime._runtime import check_runtime, measure

    check_runtime("create_session", runtime)
    check_precision("create_session", openvino_precision)
    if options is not None and threads is not None:
        raise ConfigError("create_session: pass either options= or threads=, not both (set threads in session_options).")
    if options is not None and runtime == "openvino":
        raise ConfigError(
            "create_session: options= are ONNX Runtime SessionOptions, which OpenVINO does not take; with "
            "runtime='openvino' pass threads= (and openvino_precision=) instead."
        )
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"create_session: threads must be an int >= 1 or None, got {threads!r}.")
    proto = as_model_proto(model)
    if options is not None or runtime == "ort":
        from inc_onnx.runtime._bf16 import recorded_bf16_ops

        bf16_ops = recorded_bf16_ops(proto)
        if bf16_ops:
            # The file stays standard ONNX; ORT's CPU provider has no BF16 kernels for these ops.
            log.info("ONNX Runtime runs the model's %d BF16 ops in FP32 (OpenVINO runs them in BF16).", len(bf16_ops))
        return ort_session(proto, options, threads=threads)
    if runtime == "openvino":
        return compile_openvino(model, proto, threads=threads or available_cpus(), precision=openvino_precision)
    choice, session = measure(proto, threads=threads, openvino_precision=openvino_precision)
    if session is not None:
        return session
    return create_session(proto, runtime=choice.runtime, threads=threads, openvino_precision=openvino_precision)


def ort_session(
    proto: onnx.ModelProto, options: ort.SessionOptions | None = None, *, threads: int | None = None
) -> ort.InferenceSession:
    """An ORT CPU-provider session for a validated ModelProto, or a ModelLoadError."""
    if options is None:
        options = session_options(threads=threads, qdq_cleanup=not float_qdq_ops(proto))
    try:
        return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's pybind exception types carry the reason in their text
        raise ModelLoadError(f"ONNX Runtime {ort.__version__} cannot create a session for the model: {exc}") from exc


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1
