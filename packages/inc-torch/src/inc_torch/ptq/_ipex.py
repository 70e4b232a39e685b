"""IpexBackend: INT8 through intel-extension-for-pytorch (prepare, calibrate, convert, trace, freeze).

Static calibration runs once: IPEX's prepared model carries inc observers (core histograms) keyed by
IPEX tensor ids. Each trial prepares a fresh model and loads a quantization summary (IPEX's
``qconf_summary`` JSON) whose scales and zero points come from those histograms under the trial's
settings, with the inputs of FP32 fallback ops forced to float32. The converted model is traced, the ops
of ``QuantConfig.bf16`` are rewritten to run in BF16 (:mod:`inc_torch.ptq._bf16_script`), and it is frozen,
so IPEX's oneDNN INT8 (and BF16) fusions run.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from inc_core._dataset import Dataset
from inc_core._quant_config import CALIBRATIONS, SCHEMES, QuantConfig
from inc_core.backend import TuningSpace
from inc_core.calibration import HistogramObserver, compute_qparams
from inc_core.errors import BackendNotFoundError, CalibrationError, DatasetError, UnsupportedModelError
from inc_torch._backend import TorchBackend, _check_model, _check_precision, warn_left_in_float
from inc_torch._compat import quiet
from inc_torch._failures import framework_errors
from inc_torch._hf import drop_label_inputs
from inc_torch._inputs import Inputs, batch_size, describe_inputs, float_dtype, to_inputs
from inc_torch._parametrized import fold_parametrizations
from inc_torch.ptq._bf16 import bf16_names, int8_view
from inc_torch.ptq._bf16_script import run_script_ops_in_bf16
from inc_torch.ptq._calibration import model_signature
from inc_torch.ptq._capture import check_runs, eval_copy
from inc_torch.ptq._dynamic import quantize_dynamic
from inc_torch.ptq._grouped_conv import miscomputed_grouped_convs
from inc_torch.ptq._ipex_ops import name_int8_ops, script_int8_ops
from inc_torch.ptq._ops import ACTIVATION_DTYPES, tuning_space
from inc_torch.ptq._settings import OpSettings, plan

__all__ = ["IpexBackend", "IpexCalibration", "import_ipex"]

log = logging.getLogger("inc")

IPEX_INSTALL_HINT = "pip install inc-torch[ipex]"


def _warn_listed_ops_left_float(config: QuantConfig, ops: Any, int8: list[str]) -> None:
    """Name the listed layers IPEX's graph runs in float (e.g. the Linears inside nn.TransformerEncoderLayer,
    which its trace turns into torch's fused encoder op)."""
    kept = set(config.exclude.select(ops)) | set(config.bf16.select(ops)) | set(int8)
    left = [op.name for op in ops if op.name not in kept]
    if left:
        shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
        log.warning(
            "IPEX left %d of the %d layers inc listed in FP32 (its traced graph runs them in float): %s. "
            "The torch backend's PT2E path (backend=None) quantizes them.", len(left), len(ops), shown,
        )


def _transformers_major() -> int | None:
    from importlib import metadata

    try:
        return int(metadata.version("transformers").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return None


def import_ipex() -> Any:
    """intel_extension_for_pytorch, or BackendNotFoundError saying how to install it (or what breaks its import)."""
    try:
        return importlib.import_module("intel_extension_for_pytorch")
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) or "intel_extension_for_pytorch" in str(exc):
            raise BackendNotFoundError(
                f"backend='ipex' needs intel-extension-for-pytorch, which is not installed ({exc}). Install it with "
                f"`{IPEX_INSTALL_HINT}` (IPEX 2.8 requires torch 2.8 exactly: use a separate environment), or use the "
                "default torch backend (backend=None), which needs no IPEX."
            ) from exc
        failure: Exception = exc
    except Exception as exc:  # IPEX is installed but its own import fails
        failure = exc
    major = _transformers_major()
    if major is not None and major >= 5:
        # IPEX 2.8's LLM module imports transformers at import time, names transformers 5 removed among them
        # (NameError: 'MoeModelOutputWithPast'), so IPEX fails to import at all next to transformers 5.
        cause = (
            f"IPEX 2.8 imports transformers internals that transformers {major} no longer has: install "
            "transformers<5 in this environment (`pip install 'transformers<5'`; inc tests IPEX with 4.51.3)"
        )
    else:
        cause = "IPEX 2.8 needs torch 2.8 exactly (`pip install inc-torch[ipex]` in its own environment)"
    raise BackendNotFoundError(
        f"intel-extension-for-pytorch is installed but could not be imported ({type(failure).__name__}: {failure}). "
        f"{cause}; or use the default torch backend (backend=None), which needs no IPEX."
    ) from failure


def _passed_through(calibrated: dict[str, Any]) -> dict[str, str]:
    """Output tensor id -> input tensor id of the ops IPEX runs on their input's int8 values.

    IPEX marks such ops (pooling, flatten, reshapes) in its calibrated summary by one observer for input and
    output: their int8 kernels keep the input's quantization, so the output's scale must be the input's.
    """
    through: dict[str, str] = {}
    for info in calibrated.values():
        ins, outs = info.get("input_tensor_infos", []), info.get("output_tensor_infos", [])
        if len(outs) != 1 or not ins or ins[0].get("scale") is None or "float32" in str(ins[0].get("inf_dtype", "")):
            continue
        if outs[0].get("scale") == ins[0].get("scale") and outs[0].get("zero_point") == ins[0].get("zero_point"):
            through[str(outs[0].get("id"))] = str(ins[0].get("id"))
    return through


def _root(tensor_id: str, through: dict[str, str]) -> str:
    """The tensor whose quantization ``tensor_id`` carries, up a chain of pass-through ops."""
    seen = set()
    while tensor_id in through and tensor_id not in seen:
        seen.add(tensor_id)
        tensor_id = through[tensor_id]
    return tensor_id


def _pass_qparams_through(infos: dict[str, Any], through: dict[str, str]) -> None:
    """Give every pass-through op's output its chain's first input's scale and zero point.

    A range of its own for such an output (an average pool's is far narrower than its input's) was read as the
    scale of data that still had the input's: a ResNet-shaped net's logits had cosine 0.984 to FP32 against
    1.0000 with IPEX's own recipe, a conv + global average pool + linear head 0.889 against 0.99995.
    """
    tensors: dict[str, list[dict[str, Any]]] = {}
    for info in infos.values():
        for tensor in [*info.get("input_tensor_infos", []), *info.get("output_tensor_infos", [])]:
            tensors.setdefault(str(tensor.get("id")), []).append(tensor)
    for tensor_id in through:
        root = tensors.get(_root(tensor_id, through), [])
        source = next((t for t in root if t.get("scale") is not None), None)
        if source is None:
            continue
        for tensor in tensors.get(tensor_id, []):
            tensor["scale"], tensor["zero_point"] = list(source["scale"]), list(source["zero_point"])


@dataclass(eq=False)
class IpexCalibration:
    """IPEX's quantization summary plus one core histogram per (state, tensor id)."""

    summary: dict[str, Any]
    histograms: dict[tuple[str, str], HistogramObserver]
    example: Inputs
    samples: int
    signature: tuple[Any, ...] = ()
    granularity: str = "per_channel"
    extra: dict[str, Any] = field(default_factory=dict)


def _mapping(settings: OpSettings) -> Any:
    from torch.ao.quantization import QConfig, QConfigMapping

    from inc_torch.ptq._observers import FxActivationObserver, IpexWeightObserver

    return QConfigMapping().set_global(
        QConfig(
            activation=FxActivationObserver.with_args(
                method=settings.calibration, percentile=settings.percentile, scheme=settings.scheme
            ),
            weight=IpexWeightObserver.with_args(per_channel=settings.granularity == "per_channel"),
        )
    )


def _standard_observers(granularity: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Observer entries of a trial's summary: IPEX rebuilds observers by torch class name when loading it,
    and only their declared dtype/scheme matter there, since the summary carries the scales."""
    activation = {
        "name": "MinMaxObserver", "dtype": "torch.quint8", "qscheme": "torch.per_tensor_affine",
        "reduce_range": False, "quant_min": 0, "quant_max": 255, "is_dynamic": False,
    }
    per_channel = granularity == "per_channel"
    weight = {
        "name": "PerChannelMinMaxObserver" if per_channel else "MinMaxObserver",
        "dtype": "torch.qint8",
        "qscheme": "torch.per_channel_symmetric" if per_channel else "torch.per_tensor_symmetric",
        "reduce_range": False, "quant_min": -128, "quant_max": 127, "is_dynamic": False,
    }
    if per_channel:
        weight["ch_axis"] = 0
    return activation, weight


def _standard_mapping(granularity: str) -> Any:
    from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver, QConfig, QConfigMapping

    weight = (
        PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
        if granularity == "per_channel"
        else MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    )
    activation = MinMaxObserver.with_args(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    return QConfigMapping().set_global(QConfig(activation=activation, weight=weight))


def _prepare(ipex: Any, model: nn.Module, mapping: Any, example: Inputs) -> Any:
    args, kwargs = example
    with quiet():
        if kwargs:
            return ipex.quantization.prepare(model, mapping, example_kwarg_inputs=kwargs, inplace=True)
        return ipex.quantization.prepare(model, mapping, example_inputs=args, inplace=True)


def _summary(prepared: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "qconf.json"
        prepared.save_qconf_summary(qconf_summary=str(path))
        return dict(json.loads(path.read_text()))


class IpexBackend(TorchBackend):
    """The ``backend="ipex"`` choice: IPEX static INT8 (TorchScript, frozen) and dynamic INT8.

    Args:
        dynamic_activations: as for :class:`TorchBackend` (the dynamic path is the same).

    Raises on construction:
        BackendNotFoundError: intel-extension-for-pytorch is not installed (``pip install inc-torch[ipex]``).
        ConfigError: a bad ``dynamic_activations``.
    """

    name: ClassVar[str] = "ipex"
    package: ClassVar[str] = "inc-torch[ipex]"
    formats: ClassVar[tuple[str, ...]] = ("torchscript",)
    supports_smooth_quant: ClassVar[bool] = False  # IPEX prepares its own graph; inc's rescaling is not wired in

    def __init__(self, *, dynamic_activations: str = "auto") -> None:
        super().__init__(dynamic_activations=dynamic_activations)
        self._ipex = import_ipex()

    def describe(self, model: Any, config: QuantConfig) -> TuningSpace:
        model = _check_model(model)
        _check_precision(model, "torchscript", config.approach)
        space = tuning_space(model, config, "torchscript")
        if config.approach == "dynamic":
            return space
        # Weight granularity is fixed when IPEX prepares the model; activation settings are per tensor.
        options = {t: {"calibration": CALIBRATIONS, "scheme": SCHEMES, "activation_dtype": ACTIVATION_DTYPES} for t in space.options}
        return TuningSpace(space.ops, options)

    def calibrate(self, model: Any, dataset: Dataset, config: QuantConfig) -> IpexCalibration:  # type: ignore[override]
        model = _check_model(model)
        _, ops = self._ops(model, config)
        alternatives = {"pt2e": "the torch backend (backend=None, format='pt2e')", "fx": "the torch backend with format='fx'"}
        warn_left_in_float(model, "torchscript", label="backend='ipex'", alternatives=alternatives)
        with framework_errors("IPEX calibration (ipex.quantization.prepare)", "torchscript", model, frozenset(op.name for op in ops)):
            return self._calibrate(model, dataset, config)

    def _calibrate(self, model: nn.Module, dataset: Dataset, config: QuantConfig) -> IpexCalibration:
        work = eval_copy(model)
        dtype = float_dtype(work)
        batches = iter(dataset.inputs(limit=config.calib_samples))
        first = next(batches)
        example = drop_label_inputs(model, to_inputs(first, dtype), "calibration")
        check_runs(work, example, "the first calibration batch")
        prepared = _prepare(self._ipex, work, _mapping(OpSettings.of(config)), example)
        samples = 0
        for index, batch in enumerate([first, *batches]):
            inputs = drop_label_inputs(model, to_inputs(batch, dtype))
            try:
                with torch.no_grad():
                    prepared(*inputs[0], **inputs[1])
            except CalibrationError as exc:
                raise CalibrationError(f"Calibration batch {index} ({describe_inputs(inputs)}): {exc}") from exc
            except Exception as exc:
                raise DatasetError(f"Calibration batch {index} ({describe_inputs(inputs)}) does not fit the model: {exc}") from exc
            samples += batch_size(inputs)
        histograms: dict[tuple[str, str], HistogramObserver] = {}
        for state_name, state in prepared._fqn_to_auto_quant_state_map.items():
            for tensor_id, observer in state.tensor_id_to_observer.items():
                if getattr(observer, "histogram", None) is not None and observer.histogram.count:
                    histograms[(state_name, str(tensor_id))] = observer.histogram
        return IpexCalibration(
            summary=_summary(prepared),
            histograms=histograms,
            example=example,
            samples=samples,
            signature=model_signature(model),
            granularity=config.granularity,
        )

    def _trial_summary(
        self, config: QuantConfig, calibration: IpexCalibration, ops: Any, float_only: frozenset[str] = frozenset()
    ) -> dict[str, Any]:
        default, per_op = plan(config, ops)
        per_op.update(dict.fromkeys(float_only))  # layers IPEX would quantize by default that must stay FP32
        summary = copy.deepcopy(calibration.summary)
        activation_observer, weight_observer = _standard_observers(calibration.granularity)
        for state_name, state in summary.items():
            infos = state.get("q_op_infos", {})
            for info in infos.values():
                info["activation_observer"] = dict(activation_observer)
                info["weight_observer"] = dict(weight_observer)
            through = _passed_through(calibration.summary[state_name].get("q_op_infos", {}))
            passes = {str(out) for out in through}
            chosen: dict[str, OpSettings] = {}
            for info in infos.values():
                settings = per_op.get(info.get("fqn", ""), default)
                outputs = {str(t.get("id")) for t in info.get("output_tensor_infos", [])}
                for tensor in info.get("input_tensor_infos", []):
                    if settings is None:
                        tensor["force_dtype"] = "torch.float32"
                        tensor["inf_dtype"] = "torch.float32"
                    elif not outputs & passes:
                        # The op reading int8 data sets how the range is computed, for the tensor whose scale
                        # that data carries (up the chain of pools and reshapes in front of it).
                        chosen.setdefault(_root(str(tensor.get("id")), through), settings)
                if settings is None:
                    for tensor in info.get("weight_tensor_infos", []):
                        tensor["inf_dtype"] = "torch.float32"
            for info in infos.values():
                for tensor in [*info.get("input_tensor_infos", []), *info.get("output_tensor_infos", [])]:
                    key = (state_name, str(tensor.get("id")))
                    histogram = calibration.histograms.get(key)
                    if histogram is None:
                        continue
                    settings = chosen.get(key[1], default)
                    lo, hi = histogram.range(settings.calibration, percentile=settings.percentile, dtype="uint8", scheme=settings.scheme)
                    qp = compute_qparams(lo, hi, dtype="uint8", scheme=settings.scheme)
                    tensor["scale"] = [float(qp.scale)]
                    tensor["zero_point"] = [int(qp.zero_point)]
            _pass_qparams_through(infos, through)
        return summary

    def quantize(self, model: Any, config: QuantConfig, *, calibration: Any | None, inplace: bool = False) -> nn.Module:
        model = _check_model(model)
        self.check_bf16(config)  # also when called without inc.quantize
        _, ops = self._ops(model, config)
        if config.approach == "dynamic":
            with framework_errors("Dynamic quantization (torch.ao quantize_dynamic)", "dynamic", model, frozenset(op.name for op in ops)):
                return quantize_dynamic(model, config, ops, inplace=inplace, activations=self.dynamic_activations)
        step = "IPEX quantization (ipex.quantization.prepare/convert, torch.jit.trace/freeze)"
        with framework_errors(step, "torchscript", model, frozenset(op.name for op in ops)):
            return self._quantize_static(model, config, ops, calibration, inplace)

    def _quantize_static(self, model: nn.Module, config: QuantConfig, ops: Any, calibration: Any, inplace: bool) -> nn.Module:
        if not isinstance(calibration, IpexCalibration):
            raise CalibrationError(
                f"Static IPEX quantization needs the result of IpexBackend.calibrate(); got {type(calibration).__name__}. "
                "Call inc.quantize(model, config, dataset=..., backend='ipex')."
            )
        if calibration.signature != model_signature(model):
            raise CalibrationError("The calibration was collected on a different model (its parameters differ).")
        work = fold_parametrizations((model if inplace else copy.deepcopy(model)).eval())
        prepared = _prepare(self._ipex, work, _standard_mapping(calibration.granularity), calibration.example)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "qconf.json"
            # BF16 ops leave INT8 as excluded ones do; the traced graph runs them in BF16 below.
            # A grouped conv this CPU's INT8 kernel computes wrongly (IPEX's oneDNN as torch's) stays FP32: not listed,
            # so it must be kept out of IPEX's default INT8 here (see _grouped_conv).
            wrong = frozenset(miscomputed_grouped_convs(work))
            path.write_text(json.dumps(self._trial_summary(int8_view(config), calibration, ops, wrong)))
            prepared.load_qconf_summary(qconf_summary=str(path))
        args, kwargs = calibration.example
        with quiet(), torch.no_grad(), warnings.catch_warnings():
            # Tracing IPEX's converted model reads its fixed scales as constants, as intended.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=r".*JIT pass will be deprecated.*")
            converted = self._ipex.quantization.convert(prepared)
            if kwargs:
                traced = torch.jit.trace(converted, example_kwarg_inputs=kwargs, check_trace=False, strict=False)
            else:
                traced = torch.jit.trace(converted, args, check_trace=False, strict=False)
            run_script_ops_in_bf16(traced, bf16_names(config, ops))
            name_int8_ops(traced)  # inc_torch.quantized_ops reads the names back from the frozen graph
            frozen = torch.jit.freeze(traced)
            # IPEX's fusion passes run on the first calls of a frozen module.
            for _ in range(2):
                frozen(*args, **kwargs)
        int8 = script_int8_ops(frozen)
        if not int8:
            raise UnsupportedModelError(
                f"IPEX quantized none of the layers inc listed ({', '.join(op.name for op in ops)}): its traced "
                "graph holds no INT8 convolution or linear op. Check inc.describe(model, backend='ipex') and "
                "exclude=, or use the torch backend (backend=None), whose PT2E and FX paths cover more layers."
            )
        _warn_listed_ops_left_float(config, ops, int8)
        return frozen

    def op_errors(self, model: Any, config: QuantConfig, *, calibration: Any | None, dataset: Dataset) -> dict[str, float]:
        raise NotImplementedError("the ipex backend does not report per-op errors; use the torch backend for strategy='mse'")

    def runner(self, model: Any, inputs: Any, *, threads: int | None = None) -> Callable[[], Any]:
        return super().runner(model, inputs, threads=threads)

    def version(self) -> str:
        return f"{super().version()}, intel-extension-for-pytorch {getattr(self._ipex, '__version__', 'unknown')}"
