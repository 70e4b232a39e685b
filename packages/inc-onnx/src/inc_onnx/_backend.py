"""OnnxBackend: the inc backend SPI for ONNX models on ONNX Runtime."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import onnx
import onnxruntime as ort

from inc_core import Dataset, QuantConfig
from inc_core.backend import Backend, TuningSpace
from inc_core.errors import CalibrationError, DatasetError, ModelLoadError
from inc_onnx._feeds import to_feeds
from inc_onnx._int8_ops import int8_op_counts
from inc_onnx._model_io import as_model_proto, is_onnx_model, save_model
from inc_onnx._preprocess import _input_specs, prepare
from inc_onnx.ptq._collect import OnnxCalibration, collect, tensors_to_observe
from inc_onnx.ptq._describe import describe_prepared, nothing_to_quantize, op_types_for
from inc_onnx.ptq._op_errors import op_output_errors
from inc_onnx.ptq._quantize import _stamp, check_selection, quantize_prepared
from inc_onnx.ptq._smooth_quant import SmoothedCalibration, calibrate_smoothed, unwrap
from inc_onnx.ptq._verify import check_has_int8_ops, check_runs
from inc_onnx.runtime._bf16 import bf16_compute_ops, bf16_unavailable, int8_config, record_bf16_ops
from inc_onnx.runtime._openvino import check_precision
from inc_onnx.runtime._runtime import RuntimeChoice, check_runtime, choose_runtime
from inc_onnx.runtime._session import create_session, session_options

__all__ = ["OnnxBackend"]

_LABELS = {"ort": "ONNX Runtime", "openvino": "OpenVINO"}


class OnnxBackend(Backend):
    """Quantizes ``onnx.ModelProto`` models and ``.onnx`` files with ONNX Runtime.

    Formats: ``"qdq"`` (the default; QuantizeLinear/DequantizeLinear pairs that ORT fuses into int8
    kernels) and ``"qoperator"`` (QLinearConv, QLinearMatMul, ...). ``approach="dynamic"`` gives
    MatMulInteger/ConvInteger with DynamicQuantizeLinear whatever the format. Quantized models are
    returned as ``onnx.ModelProto``.
    """

    name: ClassVar[str] = "onnx"
    package: ClassVar[str] = "inc-onnx"
    formats: ClassVar[tuple[str, ...]] = ("qdq", "qoperator")
    supports_smooth_quant: ClassVar[bool] = True
    # QuantConfig(bf16=...): the ops stay float in the standard file and run in BF16 on OpenVINO.
    supports_bf16: ClassVar[bool] = True

    def __init__(self, *, runtime: str = "auto", openvino_precision: str = "f32") -> None:
        """
        Args:
            runtime: what runs the model in ``inc.benchmark``: ``"ort"`` (ONNX Runtime's CPU provider),
                ``"openvino"`` (OpenVINO's CPU plugin, ``pip install 'inc-onnx[openvino]'``) or ``"auto"``
                (the faster of the two on the benchmark inputs, measured on this CPU; ONNX Runtime when
                OpenVINO is not installed). Calibration and the checks of quantized models always run on
                ONNX Runtime. Pass the backend explicitly:
                ``inc.benchmark(model, x, backend=OnnxBackend(runtime="openvino"))``. With several benchmark
                instances, each rebuilds the backend with these options; under "auto" each measures on its own
                cores, so name the runtime to be sure every instance runs the same one.
            openvino_precision: precision of OpenVINO's float ops (see :func:`inc_onnx.create_session`).

        Raises:
            ConfigError: an unknown runtime or precision.
        """
        self.runtime = check_runtime("OnnxBackend", runtime)
        self.openvino_precision = check_precision("OnnxBackend", openvino_precision)
        # What "auto" picked in the last runner() (None before, or for a named runtime).
        self.last_choice: RuntimeChoice | None = None
        # ONNX Runtime's CPU provider has no INT8 ConvTranspose, so for it each one is quantized as its sub-pixel
        # Conv; OpenVINO quantizes ConvTranspose itself, and runs the sub-pixel form slower (measured:
        # benchmarks/results/onnx_conv_transpose.md). "auto" prepares for ONNX Runtime, which runs the checks.
        self.subpixel = self.runtime != "openvino"

    def options(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "openvino_precision": self.openvino_precision}

    def bf16_unavailable(self, config: QuantConfig) -> str | None:
        """BF16 ops run on OpenVINO's CPU plugin: it must be installed and the CPU must have BF16 instructions.

        ``OnnxBackend(runtime="ort")`` refuses them: ONNX Runtime's CPU provider has no BF16 kernels for
        them, so it would measure and run them in FP32.
        """
        if self.runtime == "ort":
            return (
                "OnnxBackend(runtime='ort') runs models on ONNX Runtime's CPU provider, which has no BF16 kernels for "
                "these ops (they would run in FP32); use OnnxBackend(runtime='openvino') or runtime='auto'"
            )
        return bf16_unavailable()

    def bf16_candidates(self, model: Any, config: QuantConfig) -> frozenset[str] | None:
        """Convolutions and matrix products by a weight: what OpenVINO's BF16 kernels speed up.

        A tuner's fallback op of another kind (a Gather, an Add, a product of two activations) goes to
        FP32 under ``fallback_precision="bf16"``.
        """
        prepared = prepare(model, subpixel=self.subpixel).model
        return bf16_compute_ops(prepared, describe_prepared(prepared, config, self.check_format(config.format)).ops)

    def accepts(self, model: Any) -> bool:
        return is_onnx_model(model)

    def describe(self, model: Any, config: QuantConfig) -> TuningSpace:
        return describe_prepared(prepare(model, subpixel=self.subpixel).model, config, self.check_format(config.format))

    def calibrate(self, model: Any, dataset: Dataset, config: QuantConfig) -> OnnxCalibration | SmoothedCalibration:
        prepared = prepare(model, subpixel=self.subpixel)
        fmt = self.check_format(config.format)
        space = describe_prepared(prepared.model, config, fmt)
        if not space.ops:
            raise nothing_to_quantize(prepared.model, config.approach, fmt)
        # A selection that names no op, or leaves none in INT8, is refused before the calibration pass, not after it.
        check_selection(int8_config(config, space.ops)[0], space, fmt)
        # Observe what either static format quantizes, so one calibration serves both.
        def observe(graph: Any) -> list[str]:
            return tensors_to_observe(graph, {*op_types_for("static", "qdq"), *op_types_for("static", "qoperator")})

        if config.smooth_quant is not None:
            return calibrate_smoothed(prepared, dataset, config, observe)
        return collect(prepared, dataset, observe(prepared), samples=config.calib_samples)

    def quantize(self, model: Any, config: QuantConfig, *, calibration: Any | None, inplace: bool = False) -> Any:
        if calibration is not None and not isinstance(calibration, (OnnxCalibration, SmoothedCalibration)):
            raise CalibrationError(
                f"The onnx backend got calibration of type {type(calibration).__name__}; pass the object "
                "OnnxBackend.calibrate returned."
            )
        fmt = self.check_format(config.format)
        prepared = prepare(model, subpixel=self.subpixel)
        # BF16 ops stay float nodes in the file, listed in its metadata (see inc_onnx.runtime._bf16).
        int8, bf16_ops = int8_config(config, describe_prepared(prepared.model, config, fmt).ops)
        # SmoothQuant: the rescaled graph and its statistics take the place of the user's graph.
        graph, applied, calibration = unwrap(prepared, int8, calibration, fmt)
        result = quantize_prepared(graph, applied, fmt, calibration)
        if applied is not config:
            _stamp(result, config, fmt)  # the user's recipe, not the exclusions SmoothQuant or BF16 added
        record_bf16_ops(result, bf16_ops)
        # Never hand out a model ORT refuses, or one with no INT8 op (see inc_onnx.ptq._verify).
        mode = "dynamic" if config.approach == "dynamic" else f"static {fmt}"
        check_runs(result, mode, calibration.sample if calibration is not None else None)
        selected = [op.name for op in describe_prepared(prepared.model, config, fmt).ops]
        check_has_int8_ops(result, mode, selected, qdq_conv_transpose=not self.subpixel)
        if inplace and isinstance(model, onnx.ModelProto):
            model.CopyFrom(result)
            return model
        return result

    def op_errors(self, model: Any, config: QuantConfig, *, calibration: Any | None, dataset: Dataset) -> dict[str, float]:
        prepared = prepare(model, subpixel=self.subpixel)
        fmt = self.check_format(config.format)
        if config.approach == "static" and calibration is None:
            calibration = self.calibrate(model, dataset, config)
        int8, _ = int8_config(config, describe_prepared(prepared.model, config, fmt).ops)
        graph, applied, calibration = unwrap(prepared, int8, calibration, fmt)
        return op_output_errors(graph, applied, fmt, calibration, dataset)

    def weights_digest(self, model: Any) -> str | None:
        """The content hash the calibrations are matched with (external data included)."""
        return prepare(model, subpixel=self.subpixel).digest

    def int8_op_counts(self, model: Any) -> dict[str, int]:
        """Per op type, the nodes of a quantized model that run INT8 kernels in ONNX Runtime.

        Counted on the graph ORT executes after its QDQ fusions, so a QDQ group ORT cannot fuse (it
        runs in float) does not count; ``QLinear*``, ``QGemm``, ``MatMulInteger`` / ``DynamicQuantizeMatMul``,
        ``ConvInteger`` and ops moving 8-bit data (a Gather of a uint8 table, a Reshape between
        QLinear ops) do.
        """
        return int8_op_counts(as_model_proto(model))

    def save(self, model: Any, path: Path) -> None:
        save_model(model, path)

    def file_suffix(self, model: Any) -> str:
        return ".onnx"

    def load(self, path: Path) -> onnx.ModelProto:
        proto = as_model_proto(path)
        _check_loads(proto, path)
        return proto

    def runner(self, model: Any, inputs: Any, *, threads: int | None = None) -> Callable[[], Any]:
        proto = model if isinstance(model, onnx.ModelProto) else as_model_proto(model)
        feeds = to_feeds(inputs, _input_specs(proto), where="benchmark inputs")
        runtime = self.runtime
        if runtime == "auto":
            # Chosen on the benchmark's own inputs and thread count.
            self.last_choice = choose_runtime(proto, feeds, threads=threads, openvino_precision=self.openvino_precision)
            runtime = self.last_choice.runtime
        session = create_session(model, runtime=runtime, threads=threads, openvino_precision=self.openvino_precision)
        names = [o.name for o in session.get_outputs()]
        try:
            # One run now: the timed runs repeat it on the same feeds, so a failure shows here, as inc's error.
            session.run(names, feeds)
        except Exception as exc:  # ORT's pybind errors (and the OpenVINO session's DatasetError) carry the reason as text
            text = (str(exc).strip() or type(exc).__name__).splitlines()[0][:400]
            raise DatasetError(
                f"benchmark inputs: {_LABELS[runtime]} could not run the model on them: {text}. The model's inputs are "
                f"{', '.join(s.describe() for s in _input_specs(proto))}."
            ) from exc
        return lambda: session.run(names, feeds)

    def version(self) -> str:
        from inc_onnx import __version__

        return f"inc-onnx {__version__} (onnx {onnx.__version__}, onnxruntime {ort.__version__}{_openvino_version()})"


def _openvino_version() -> str:
    try:
        import openvino
    except ImportError:
        return ""
    return f", openvino {openvino.__version__}"


def _check_loads(proto: onnx.ModelProto, path: Path) -> None:
    try:
        create_session(proto, session_options(threads=1), runtime="ort")
    except ModelLoadError as exc:
        raise ModelLoadError(f"{str(path)!r}: {exc}") from exc
