"""One calibration pass that serves every tuning trial.

The model is captured once (torch.export for PT2E, FX tracing for FX) and brought to the graph that
``prepare`` produces before it inserts observers (conv-bn folded, FX modules fused). Every tensor of
that graph is streamed into an inc-core :class:`~inc_core.calibration.HistogramObserver` keyed by its
node name. A trial's prepared graph keeps those node names, so each of its observers is filled from
the histogram of the tensor it watches: no trial re-runs the model, whatever it changes (method,
scheme, granularity, fallbacks).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from inc_core._dataset import Dataset
from inc_core._quant_config import QuantConfig
from inc_core.calibration import HistogramObserver
from inc_core.errors import CalibrationError, DatasetError
from inc_torch._capture import check_runs, eval_copy, export_graph, fx_prepare, positional
from inc_torch._compat import quiet, torchao_pt2e
from inc_torch._inputs import Inputs, batch_size, describe_inputs, float_dtype, to_inputs
from inc_torch._observers import HISTOGRAM_BINS, is_activation_observer

__all__ = ["TorchCalibration", "calibrate", "load_statistics", "model_signature", "op_nodes"]

_CONV_LINEAR = ("conv1d", "conv2d", "conv3d", "linear")


def model_signature(model: nn.Module) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Parameter names and shapes: enough to tell that a calibration belongs to another model."""
    return tuple((name, tuple(p.shape)) for name, p in model.named_parameters())


@dataclass(eq=False)
class TorchCalibration:
    """Activation statistics of one calibration pass (opaque to the core, reused across trials).

    Attributes:
        format: ``"pt2e"`` or ``"fx"``: the graph the statistics are keyed on.
        histograms: node name -> histogram of that node's output.
        example: the first calibration batch, as ``(args, kwargs)`` tensors.
        samples: number of samples fed.
        exported: for PT2E, the exported graph module every trial prepares a copy of.
        op_inputs: op (module) name -> node name of its input activation.
        signature: parameter names and shapes of the calibrated model.
    """

    format: str
    histograms: dict[str, HistogramObserver]
    example: Inputs
    samples: int
    exported: torch.fx.GraphModule | None = None
    op_inputs: dict[str, str] = field(default_factory=dict)
    signature: tuple[Any, ...] = ()


class _Recorder(nn.Module):
    """Inserted after a graph node: streams its floating tensor output into a histogram."""

    def __init__(self, histogram: HistogramObserver) -> None:
        super().__init__()
        self.histogram = histogram

    def forward(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            self.histogram.update(x.detach().float().cpu().numpy())
        return x


def _module_path(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return str(list(stack.values())[-1][0])


def op_nodes(graph_module: torch.fx.GraphModule, fmt: str) -> dict[str, torch.fx.Node]:
    """Op (module) name -> the graph node computing it (the aten conv/linear for PT2E, the module call for FX)."""
    found: dict[str, torch.fx.Node] = {}
    for node in graph_module.graph.nodes:
        if fmt == "fx" and node.op == "call_module":
            found.setdefault(str(node.target), node)
        elif fmt == "pt2e" and node.op == "call_function":
            name = getattr(node.target, "__name__", "").split(".")[0]
            path = _module_path(node)
            if name in _CONV_LINEAR and path is not None:
                found.setdefault(path, node)
    return found


def _base_graph(work: nn.Module, example: Inputs, fmt: str) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule | None]:
    """The graph trials' observers are keyed on, and (PT2E) the exported graph trials prepare from."""
    if fmt == "pt2e":
        ao = torchao_pt2e()
        exported = export_graph(work, example)
        # An empty quantizer annotates nothing; prepare still folds conv-bn exactly as a trial's prepare does.
        with quiet():
            base = ao.prepare_pt2e(copy.deepcopy(exported), ao.X86InductorQuantizer())
        return base, exported
    from torch.ao.quantization import QConfigMapping

    return fx_prepare(work, QConfigMapping(), positional(work, example)), None


def _instrument(graph_module: torch.fx.GraphModule, histograms: dict[str, HistogramObserver]) -> None:
    graph = graph_module.graph
    for index, node in enumerate(list(graph.nodes)):
        if node.op not in ("placeholder", "get_attr", "call_function", "call_module", "call_method"):
            continue
        histograms[node.name] = HistogramObserver(HISTOGRAM_BINS, name=node.name)
        target = f"_inc_record_{index}"
        graph_module.add_submodule(target, _Recorder(histograms[node.name]))
        with graph.inserting_after(node):
            record = graph.call_module(target, (node,))
        node.replace_all_uses_with(record, delete_user_cb=lambda user, rec=record: user is not rec)
    graph_module.recompile()


def calibrate(model: nn.Module, dataset: Dataset, config: QuantConfig, fmt: str) -> TorchCalibration:
    """Capture the model and stream up to ``config.calib_samples`` samples through it once.

    Raises:
        DatasetError: no batch, or a batch the model cannot take.
        CalibrationError: an activation holds NaN or Inf.
        UnsupportedModelError: the model cannot be captured by the chosen path.
    """
    work = eval_copy(model)
    dtype = float_dtype(work)
    batches = dataset.inputs(limit=config.calib_samples)
    try:
        first = next(batches)
    except StopIteration:  # Dataset.inputs raises DatasetError itself; this guards other iterables
        raise DatasetError("Calibration data is empty; give at least one batch.") from None
    example = to_inputs(first, dtype)
    check_runs(work, example, "the first calibration batch")
    base, exported = _base_graph(work, example, fmt)
    op_inputs = {
        name: node.args[0].name
        for name, node in op_nodes(base, fmt).items()
        if node.args and isinstance(node.args[0], torch.fx.Node)
    }
    histograms: dict[str, HistogramObserver] = {}
    _instrument(base, histograms)
    samples = 0
    for index, batch in enumerate(itertools.chain([first], batches)):
        inputs = to_inputs(batch, dtype)
        args, kwargs = inputs
        if fmt == "fx":
            args, kwargs = positional(work, inputs), {}
        try:
            with torch.no_grad():
                base(*args, **kwargs)
        except CalibrationError as exc:
            raise CalibrationError(f"Calibration batch {index} ({describe_inputs(inputs)}): {exc}") from exc
        except Exception as exc:
            raise DatasetError(
                f"Calibration batch {index} ({describe_inputs(inputs)}) does not fit the model: "
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}. "
                "Every batch must have the shape and dtype of the first one (the batch size may differ)."
            ) from exc
        samples += batch_size(inputs)
    return TorchCalibration(
        format=fmt,
        histograms={k: v for k, v in histograms.items() if v.count},
        example=example,
        samples=samples,
        exported=exported,
        op_inputs=op_inputs,
        signature=model_signature(model),
    )


def load_statistics(prepared: torch.fx.GraphModule, calibration: TorchCalibration) -> None:
    """Fill every observer of a trial's prepared graph from the calibration pass (no data is run).

    One observer module may watch several tensors: FX and PT2E share an observer between the input and
    the output of pooling, flatten, reshape or cat, so that the quantized op needs no requantization.
    Run live, such an observer sees every tensor it watches; it gets the merged histogram of them all
    here. (Taking only the last tensor's statistics, e.g. an average pool's narrow output, would clip
    the wide tensor feeding it: that collapsed MobileNetV3's output to cosine 0.1.)

    Raises:
        CalibrationError: an observer watches a tensor the calibration pass never saw.
    """
    watched: dict[int, tuple[Any, list[str]]] = {}
    for node in prepared.graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        module = prepared.get_submodule(str(node.target))
        if is_activation_observer(module):
            sources = watched.setdefault(id(module), (module, []))[1]
            if node.args[0].name not in sources:
                sources.append(node.args[0].name)
    for module, sources in watched.values():
        missing = [name for name in sources if name not in calibration.histograms]
        if missing:
            raise CalibrationError(
                f"No calibration statistics for tensor {missing[0]!r}, which the quantized graph observes; "
                "the calibration batches never produced it. Calibrate with data that runs through every branch."
            )
        histogram = calibration.histograms[sources[0]]
        if len(sources) > 1:
            # a fresh observer: merging into the stored one would change the statistics of other trials
            histogram = HistogramObserver(histogram.bins, name=" | ".join(sources))
            for name in sources:
                histogram.merge(calibration.histograms[name])
        module.label = " | ".join(sources)
        module.load_histogram(histogram)
