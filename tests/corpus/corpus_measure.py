"""What the corpus measures, independently of inc's own accounting.

* Fidelity: per-sample cosine similarity of the INT8 model's float outputs against the FP32 model's on
  held-out inputs (mean and min over samples).
* INT8 kernels: counted in what actually runs. PT2E: the int8 convolutions and linears inductor lowered to
  oneDNN kernels (its weight-prepack pattern counters). FX and dynamic: the torch.ao quantized modules and
  quantized ops in the graph. ONNX: the integer kernels left in the graph ONNX Runtime optimises and runs.
* References: the framework's own flow on the same model and data (plain torch.ao FX, torchao PT2E with
  X86InductorQuantizer, torch.ao dynamic, onnxruntime's quantize_static/quantize_dynamic; for QAT torchao's
  prepare_qat_pt2e with X86InductorQuantizer(is_qat=True) and torch.ao's prepare_qat_fx, trained by the same loop).
* QAT: a user's loop (``qat_train``) on the calibration crops; the INT8 model is scored against the QAT model
  it was converted from, in eval mode (what the user validated before converting).
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "cosines",
    "counting_inductor_kernels",
    "fake_quant_off",
    "onnx_int8_kernels",
    "onnx_outputs",
    "qat_train",
    "reference_onnx",
    "reference_qat",
    "reference_torch",
    "torch_int8_kernels",
    "torch_outputs",
]

# Integer kernels that carry a weight (the counterpart of a quantized Conv/Linear), as ORT names them.
ONNX_INT8_KERNELS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "ConvInteger",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "QGemm",
        "QAttention",
        "DynamicQuantizeLSTM",
    }
)


def cosines(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """Mean and min over samples of the cosine between two (N, ...) output arrays."""
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = candidate.reshape(len(candidate), -1).astype(np.float64)
    if not np.isfinite(b).all():
        return float("nan"), float("nan")
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(denom > 0, (a * b).sum(axis=1) / np.maximum(denom, 1e-30), 0.0)
    return float(cos.mean()), float(cos.min())


BATCH = 8  # every torch batch the corpus runs has this size (compiled INT8 graphs specialise on shapes)


def torch_outputs(model: Callable[..., Any], inputs: np.ndarray, batch: int = BATCH) -> np.ndarray:
    outs = []
    with torch.no_grad():
        for start in range(0, len(inputs), batch):
            out = model(torch.from_numpy(inputs[start : start + batch]))
            outs.append(out.detach().float().numpy())
    return np.concatenate(outs)


@contextlib.contextmanager
def counting_inductor_kernels() -> Iterator[Callable[[], int]]:
    """Count the int8 conv/linear kernels inductor builds inside the block (its weight-prepack pattern counters).

    inc compiles a PT2E model when it checks it before returning it, so the block must hold the
    ``inc.quantize`` call. Inductor's on-disk caches are off: a graph served from them skips the pattern
    passes and their counters. The corpus runs every batch at one shape, so each model is compiled once.
    """
    from torch._dynamo.utils import counters

    counters["inductor"].clear()
    with torch._inductor.config.patch(force_disable_caches=True):
        yield lambda: int(
            counters["inductor"]["qconv_weight_prepack_matcher_count"]
            + counters["inductor"]["qlinear_weight_prepack_matcher_count"]
        )


_QUANTIZED_MODULE_ROOTS = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")


def _eager_int8_kernels(model: nn.Module) -> int:
    count = 0
    for module in model.modules():
        # A quantized Linear keeps its packed int8 weight in a LinearPackedParams child: one op, not two.
        if type(module).__name__.endswith("PackedParams"):
            continue
        if type(module).__module__.startswith(_QUANTIZED_MODULE_ROOTS) and (
            hasattr(module, "_packed_params") or hasattr(module, "_all_weight_values") or callable(getattr(module, "weight", None))
        ):
            count += 1
    if isinstance(model, torch.fx.GraphModule):  # functional conv/linear lowered to quantized ops
        count += sum(
            1
            for n in model.graph.nodes
            if n.op == "call_function" and str(n.target).startswith(("quantized.conv", "quantized.linear"))
        )
    return count


def _converted_pt2e_int8_ops(graph: torch.fx.GraphModule) -> int:
    """Conv/linear nodes of a converted PT2E graph whose weight is an int8 constant, dequantized."""
    count = 0
    for node in graph.graph.nodes:
        if node.op != "call_function" or not str(node.target).startswith(("aten.conv", "aten.linear")) or len(node.args) < 2:
            continue
        weight = node.args[1]
        source = weight.args[0] if isinstance(weight, torch.fx.Node) and "dequantize" in str(weight.target) else None
        if isinstance(source, torch.fx.Node) and source.op == "get_attr":
            value: Any = graph
            for part in str(source.target).split("."):
                value = getattr(value, part)
            count += int(isinstance(value, torch.Tensor) and value.dtype == torch.int8)
    return count


def torch_int8_kernels(model: Callable[..., Any]) -> int:
    """INT8 conv/linear kernels of a converted PT2E graph or an eager torch.ao quantized model."""
    if isinstance(model, torch.fx.GraphModule) and any("quantized_decomposed" in str(n.target) for n in model.graph.nodes):
        return _converted_pt2e_int8_ops(model)
    return _eager_int8_kernels(model)


def onnx_outputs(model: Any, inputs: Any) -> np.ndarray:
    """The first float output of an ONNX model (proto or path) on ``inputs`` (an array or a feed dict)."""
    import onnxruntime as ort

    raw = model if isinstance(model, (str, Path)) else model.SerializeToString()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(raw if isinstance(raw, bytes) else str(raw), options, providers=["CPUExecutionProvider"])
    feeds = inputs if isinstance(inputs, dict) else {session.get_inputs()[0].name: inputs}
    outputs = session.run(None, feeds)
    floats = [o for o in outputs if isinstance(o, np.ndarray) and o.dtype.kind == "f"]
    return floats[0]


def onnx_int8_kernels(model: Any) -> int:
    """Integer conv/matmul kernels in the graph ONNX Runtime runs (after its QDQ fusions)."""
    import onnx
    import onnxruntime as ort

    raw = model.SerializeToString() if not isinstance(model, (str, Path)) else Path(model).read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(raw, options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    return sum(1 for node in optimized.graph.node if node.op_type in ONNX_INT8_KERNELS)


# ---------------------------------------------------------------------------------------------- references


def reference_torch(path: str, model: nn.Module, calib: np.ndarray) -> Callable[..., Any]:
    """The framework's own flow for ``path`` (pt2e/fx/dynamic) on a copy of ``model``."""
    model = copy.deepcopy(model).eval()
    batches = [torch.from_numpy(calib[i : i + BATCH]) for i in range(0, len(calib), BATCH)]
    example = (batches[0],)
    if path == "torch_dynamic":
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    if path == "torch_fx":
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), example)
        with torch.no_grad():
            for b in batches:
                prepared(b)
        return convert_fx(prepared)
    if path == "torch_pt2e":
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        # strict (dynamo) export: the x86 quantizer needs one source partition per call site, and non-strict
        # export merges the calls of a shared module (ResNet's reused ReLU: "Input partition has more than
        # one output node"). Shapes are static: every batch the corpus runs has BATCH samples.
        exported = torch.export.export(model, example, strict=True).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for b in batches:
                prepared(b)
        # The converted graph runs the reference numerics (int8 values through quantize/dequantize ops):
        # the fidelity torchao's flow gives, without an inductor compile per case.
        return convert_pt2e(prepared)
    raise ValueError(path)


QAT_STEPS = 8
QAT_FREEZE_STEP = 6  # observers (and inc's batch-norm statistics) stop moving for the last steps, as in a schedule


def qat_train(model: nn.Module, calib: np.ndarray, teacher: np.ndarray, on_step: Callable[[int], None] | None = None) -> None:
    """A user's QAT loop (model in training mode): SGD towards the FP32 logits (no labels), gradients clipped.

    The corpus models have random weights: a plain step size diverges on some (EfficientNet's FP32 training
    alone gives NaN at lr 1e-4), so each step is bounded by the clipped gradient norm. Seeded: dropout and
    stochastic depth draw the same masks whichever cases a pytest worker ran before, so the table is reproducible.
    """
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    starts = range(0, len(calib), BATCH)
    for step in range(QAT_STEPS):
        if on_step is not None:
            on_step(step)
        start = starts[step % len(starts)]
        x = torch.from_numpy(calib[start : start + BATCH])
        loss = nn.functional.mse_loss(model(x), torch.from_numpy(teacher[start : start + BATCH]))
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()


@contextlib.contextmanager
def fake_quant_off(model: nn.Module) -> Iterator[None]:
    """Fake quantization and observers off in the block (torch.ao's and torchao's fake-quant modules alike)."""
    saved = []
    for module in model.modules():
        for flag in ("fake_quant_enabled", "observer_enabled"):
            value = getattr(module, flag, None)
            if isinstance(value, torch.Tensor):
                saved.append((value, value.clone()))
                value.fill_(0)
    try:
        yield
    finally:
        for value, old in saved:
            value.copy_(old)


def reference_qat(
    fmt: str, model: nn.Module, calib: np.ndarray, teacher: np.ndarray, held: np.ndarray
) -> dict[str, Any]:
    """The framework's own QAT flow for ``fmt`` (torchao's prepare_qat_pt2e with X86InductorQuantizer, or torch.ao's
    prepare_qat_fx with the x86 QAT defaults), trained by ``qat_train``: its QAT model's outputs (twice, in eval
    mode) and its INT8 model's. Observers are disabled at QAT_FREEZE_STEP as inc's schedule does, and FX's batch-norm
    statistics frozen there too (torchao has no batch-norm freeze for PT2E)."""
    example = (torch.from_numpy(calib[:BATCH]),)
    if fmt == "pt2e":
        import torchao.quantization.pt2e as ao
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

        exported = torch.export.export(copy.deepcopy(model).train(), example, strict=True).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=True))
        prepared = prepare_qat_pt2e(exported, quantizer)

        def on_step(step: int) -> None:
            if step == QAT_FREEZE_STEP:
                prepared.apply(ao.disable_observer)

        ao.move_exported_model_to_train(prepared)
        qat_train(prepared, calib, teacher, on_step)
        ao.move_exported_model_to_eval(prepared)
        convert: Callable[[Any], Any] = convert_pt2e
    else:
        from torch.ao.quantization import get_default_qat_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

        prepared = prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), example)

        def on_step(step: int) -> None:
            if step == QAT_FREEZE_STEP:
                prepared.apply(torch.ao.quantization.disable_observer)
                prepared.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)

        qat_train(prepared, calib, teacher, on_step)
        prepared.eval()
        convert = convert_fx
    qat = (torch_outputs(prepared, held), torch_outputs(prepared, held))
    if fmt == "pt2e":
        from inc_torch.qat._fold_bn import folding_only_qat_conv_bn_pairs

        # torchao's convert exports its conv-bn patterns for four conv kinds; skipping the kinds the graph lacks
        # leaves the graph as torchao builds it (tests/torch/test_qat_batch_norm.py checks that) and saves ~20 s a row
        with folding_only_qat_conv_bn_pairs():
            converted = convert(prepared)
    else:
        converted = convert(prepared)
    return {"qat": qat, "int8": torch_outputs(converted, held), "int8_ops": torch_int8_kernels(converted)}


class _Reader:
    """onnxruntime CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def reference_onnx(path: str, model_file: Path, calib_feeds: Sequence[dict[str, np.ndarray]], out: Path) -> Path:
    """onnxruntime's own quantizer for ``path`` (onnx_qdq/onnx_qoperator/onnx_dynamic) with its defaults."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if path == "onnx_dynamic":
        quantize_dynamic(str(model_file), str(out), weight_type=QuantType.QInt8)
    else:
        fmt = QuantFormat.QDQ if path == "onnx_qdq" else QuantFormat.QOperator
        quantize_static(
            str(model_file), str(out), _Reader(calib_feeds), quant_format=fmt, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )
    return out
