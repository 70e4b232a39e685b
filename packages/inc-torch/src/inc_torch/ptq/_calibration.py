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
import functools
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from inc_core._dataset import Dataset
from inc_core._quant_config import QuantConfig
from inc_core.calibration import HistogramObserver
from inc_core.errors import CalibrationError, DatasetError
from inc_torch._compat import quiet, torchao_pt2e
from inc_torch._exported import shape_hint
from inc_torch._hf import check_hf_inputs, drop_label_inputs, prepare_for_capture
from inc_torch._inputs import Inputs, batch_size, describe_inputs, float_dtype, to_inputs
from inc_torch._module_stack import module_path
from inc_torch.ptq._capture import check_runs, eval_copy, export_graph, fx_prepare, positional
from inc_torch.ptq._conv1d import conv1d_as_conv2d
from inc_torch.ptq._conv_transpose import conv_transpose_as_conv2d
from inc_torch.ptq._kept_float import KeptFloat, keep_float, keyword_weight_scopes, warn_kept_float
from inc_torch.ptq._observers import HISTOGRAM_BINS, is_activation_observer

__all__ = [
    "TorchCalibration", "calibrate", "integer_nodes", "load_statistics", "model_signature",
    "op_nodes", "propagated_fx_graph", "python_value_nodes",
]

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
        kept_float: (FX) modules calibrated, and to be quantized, as opaque float calls
            (:func:`inc_torch.ptq._kept_float.keyword_weight_scopes`).
        non_finite: node name -> why its tensor has no histogram (it held NaN/Inf); an error only for
            a trial that observes that tensor.
        integer: node names whose tensors held integers or booleans (indices and their arithmetic): no
            activation to quantize, so an FX op reading or making one stays FP32.
    """

    format: str
    histograms: dict[str, HistogramObserver]
    example: Inputs
    samples: int
    exported: torch.fx.GraphModule | None = None
    op_inputs: dict[str, str] = field(default_factory=dict)
    signature: tuple[Any, ...] = ()
    non_finite: dict[str, str] = field(default_factory=dict)
    kept_float: tuple[str, ...] = ()
    integer: frozenset[str] = frozenset()


class _Recorder(nn.Module):
    """Inserted after a graph node: streams its floating tensor output into a histogram."""

    def __init__(self, histogram: HistogramObserver, non_finite: dict[str, str], integer: set[str]) -> None:
        super().__init__()
        self.histogram = histogram
        self.non_finite = non_finite
        self.integer = integer

    def forward(self, x: Any) -> Any:
        name = self.histogram.name
        if isinstance(x, torch.Tensor) and not x.is_floating_point():
            self.integer.add(name)
        elif isinstance(x, torch.Tensor) and name not in self.non_finite:
            try:
                self.histogram.update(x.detach().float().cpu().numpy())
            except CalibrationError as exc:
                # Masks (-inf before a softmax, log(0) in position buckets) are graph features: the tensor
                # is an error only if a trial quantizes it, which load_statistics tells.
                self.non_finite[name] = str(exc)
        return x


def op_nodes(graph_module: torch.fx.GraphModule, fmt: str) -> dict[str, torch.fx.Node]:
    """Op (module) name -> the graph node computing it (the aten conv/linear for PT2E, the module call for FX)."""
    found: dict[str, torch.fx.Node] = {}
    for node in graph_module.graph.nodes:
        if fmt == "fx" and node.op == "call_module":
            found.setdefault(str(node.target), node)
        elif fmt == "pt2e" and node.op == "call_function":
            name = getattr(node.target, "__name__", "").split(".")[0]
            path = module_path(node)
            if name in _CONV_LINEAR and path is not None:
                found.setdefault(path, node)
    return found


def _base_graph(work: nn.Module, example: Inputs, fmt: str) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule | None]:
    """The graph trials' observers are keyed on, and (PT2E) the exported graph trials prepare from."""
    if fmt == "pt2e":
        ao = torchao_pt2e()
        exported = export_graph(work, example)
        conv1d_as_conv2d(exported).log()  # INT8 through the conv2d kernels (see _conv1d)
        conv_transpose_as_conv2d(exported).log()  # the same, as sub-pixel convolutions (see _conv_transpose)
        # An empty quantizer annotates nothing; prepare still folds conv-bn exactly as a trial's prepare does.
        with quiet():
            base = ao.prepare_pt2e(copy.deepcopy(exported), ao.X86InductorQuantizer())
        return base, exported
    from torch.ao.quantization import QConfigMapping

    return fx_prepare(work, QConfigMapping(), positional(work, example), leaves=(KeptFloat,)), None


@functools.cache
def pt2e_observed_targets() -> frozenset[Any]:
    """The aten ops whose inputs or outputs the x86 PT2E quantizer may observe (see :mod:`inc_torch.ptq._pt2e`)."""
    torchao_pt2e()
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    aten = torch.ops.aten
    ops = {*xiq.quantizable_ops, *xiq.propagation_quantizable_ops, aten.conv3d.default, aten.add.Tensor, aten.add_.Tensor}
    ops.discard(aten.mul.Tensor)  # inc keeps elementwise mul in FP32 (see _pt2e.float_only_quantizer_class)
    return frozenset(ops)


def _float_value(node: torch.fx.Node) -> bool:
    value = node.meta.get("val")
    return not isinstance(value, torch.Tensor) or value.is_floating_point()


def _observable(node: torch.fx.Node, fmt: str, targets: frozenset[Any]) -> bool:
    """Whether a trial's observers may watch ``node`` (PT2E: a float input or output of an op the x86
    quantizer annotates; FX: every node). Parameters, casts and mask arithmetic are never observed."""
    if node.op not in ("placeholder", "get_attr", "call_function", "call_module", "call_method"):
        return False
    if fmt != "pt2e":
        return True
    if node.op == "get_attr" or not _float_value(node):
        return False
    return node.target in targets or any(user.target in targets for user in node.users)


def _instrument(
    graph_module: torch.fx.GraphModule,
    histograms: dict[str, HistogramObserver],
    non_finite: dict[str, str],
    integer: set[str],
    fmt: str,
) -> None:
    graph = graph_module.graph
    targets = pt2e_observed_targets() if fmt == "pt2e" else frozenset()
    for index, node in enumerate(list(graph.nodes)):
        if not _observable(node, fmt, targets):
            continue
        histograms[node.name] = HistogramObserver(HISTOGRAM_BINS, name=node.name)
        target = f"_inc_record_{index}"
        graph_module.add_submodule(target, _Recorder(histograms[node.name], non_finite, integer))
        with graph.inserting_after(node):
            record = graph.call_module(target, (node,))
        node.replace_all_uses_with(record, delete_user_cb=lambda user, rec=record: user is not rec)
    graph_module.recompile()


def propagated_fx_graph(model: nn.Module, example: Inputs, *, train: bool = False) -> torch.fx.GraphModule:
    """``model``'s FX graph (as traced in ``train`` mode) run once on ``example``, each node's value recorded."""
    from torch.ao.quantization import QConfigMapping
    from torch.fx.passes.shape_prop import ShapeProp
    from torch.utils._pytree import tree_structure

    work = eval_copy(model)
    work.train(train)
    base = fx_prepare(work, QConfigMapping(), positional(work, example), qat=train, leaves=(KeptFloat,))
    # The trace holds the training-mode graph; its modules run in eval mode: a batch norm in training mode cannot
    # take a batch of one sample (an example input often is), and nothing here needs batch statistics.
    base.eval()
    with torch.no_grad():
        outputs = ShapeProp(base).propagate(*positional(work, example))
    base.meta["inc_output_spec"] = tree_structure(outputs)  # what forward returns in the traced (training) mode
    return base


def integer_nodes(graph: torch.fx.GraphModule) -> frozenset[str]:
    """The nodes of a :func:`propagated_fx_graph` whose tensors hold integers or booleans (for QAT's preparation
    what a calibration pass records as :attr:`TorchCalibration.integer`, from one batch)."""
    found = set()
    for node in graph.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "dtype") and not meta.dtype.is_floating_point:
            found.add(node.name)
    return frozenset(found)


def python_value_nodes(graph: torch.fx.GraphModule) -> frozenset[str]:
    """The calls of a :func:`propagated_fx_graph` that compute Python values, not tensors. Traced in training mode,
    timm's ``DropPath`` builds its mask's shape as ``(x.shape[0],) + (1,) * (x.ndim - 1)``: torch.ao takes that
    ``operator.mul`` and ``add`` for tensor arithmetic, and their fake quantization failed on a tuple in the first
    training step (``fused_moving_avg_obs_fake_quant(): argument 'input' must be Tensor, not tuple``)."""
    return frozenset(
        node.name
        for node in graph.graph.nodes
        if node.op in ("call_function", "call_method") and "type" in node.meta
        and not issubclass(node.meta["type"], torch.Tensor)
    )


def calibrate(model: nn.Module, dataset: Dataset, config: QuantConfig, fmt: str) -> TorchCalibration:
    """Capture the model and stream up to ``config.calib_samples`` samples through it once.

    Raises:
        DatasetError: no batch, or a batch the model cannot take.
        CalibrationError: an activation holds NaN or Inf.
        UnsupportedModelError: the model cannot be captured by the chosen path.
    """
    work = eval_copy(model)
    if fmt == "pt2e":
        prepare_for_capture(work)  # HF Conv1D as Linear, no key/value cache in the captured graph
    dtype = float_dtype(work)
    batches = dataset.inputs(limit=config.calib_samples)
    try:
        first = next(batches)
    except StopIteration:  # Dataset.inputs raises DatasetError itself; this guards other iterables
        raise DatasetError("Calibration data is empty; give at least one batch.") from None
    example = drop_label_inputs(model, to_inputs(first, dtype), "calibration")
    check_hf_inputs(model, example, "Calibration batch 0")
    check_runs(work, example, "the first calibration batch")
    base, exported = _base_graph(work, example, fmt)
    kept_float: tuple[str, ...] = ()
    if fmt == "fx" and (hidden := keyword_weight_scopes(base)):
        # traced again with those modules opaque: calibrated as the quantized graph will run them
        warn_kept_float(hidden)
        for scope in hidden:
            keep_float(work, scope)
        kept_float = tuple(hidden)
        base, exported = _base_graph(work, example, fmt)
    op_inputs = {
        name: node.args[0].name
        for name, node in op_nodes(base, fmt).items()
        if node.args and isinstance(node.args[0], torch.fx.Node)
    }
    histograms: dict[str, HistogramObserver] = {}
    non_finite: dict[str, str] = {}
    integer: set[str] = set()
    placed: set[str] = set()  # non-finite records already prefixed with their batch
    _instrument(base, histograms, non_finite, integer, fmt)
    samples = 0
    for index, batch in enumerate(itertools.chain([first], batches)):
        inputs = drop_label_inputs(model, to_inputs(batch, dtype)) if index else example
        if index:
            check_hf_inputs(model, inputs, f"Calibration batch {index}")
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
                "Every batch must have the shape and dtype of the first one (the batch size, and the sequence length of "
                f"integer token inputs where the model allows it, may differ).{shape_hint(work, exc)}"
            ) from exc
        for name in [n for n in non_finite if n not in placed]:
            non_finite[name] = f"Calibration batch {index} ({describe_inputs(inputs)}): {non_finite[name]}"
            placed.add(name)
        samples += batch_size(inputs)
    return TorchCalibration(
        format=fmt,
        histograms={k: v for k, v in histograms.items() if v.count},
        example=example,
        samples=samples,
        exported=exported,
        op_inputs=op_inputs,
        signature=model_signature(model),
        non_finite=non_finite,
        kept_float=kept_float,
        integer=frozenset(integer),
    )


def _readers(prepared: torch.fx.GraphModule, tensor: str) -> list[str]:
    """Module names of the ops reading ``tensor`` through an observer (PT2E: the source module of the node)."""
    names: list[str] = []
    for node in prepared.graph.nodes:
        if node.op == "call_module" and node.args and getattr(node.args[0], "name", None) == tensor:
            for user in node.users:
                names.append(module_path(user) if user.op == "call_function" else str(user.target))
    return [n for n in dict.fromkeys(names) if n]


def _non_finite_message(prepared: torch.fx.GraphModule, tensor: str, cause: str, ops: frozenset[str]) -> str:
    readers = [name for name in _readers(prepared, tensor) if name in ops]
    way_out = (
        f"keep the op(s) reading it in FP32 with exclude=inc.LayerFilter(names={tuple(readers)!r})"
        if readers
        else "check the calibration data's scale (float16 inputs, unnormalized data)"
    )
    return f"The quantized graph observes tensor {tensor!r}, which held non-finite values in calibration ({cause}); {way_out}."


def _constant_histogram(prepared: torch.fx.GraphModule, name: str) -> HistogramObserver | None:
    """The histogram of a parameter or buffer the graph reads (``get_attr``): its value is its statistics.

    A layer scale or a position embedding is the same tensor for every batch; it needs no calibration data.
    """
    node = next((n for n in prepared.graph.nodes if n.name == name), None)
    if node is None or node.op != "get_attr":
        return None
    value: Any = prepared
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return None
    histogram = HistogramObserver(HISTOGRAM_BINS, name=name)
    histogram.update(value.detach().float().cpu().numpy())
    return histogram


def _stored_or_constant(calibration: TorchCalibration, prepared: torch.fx.GraphModule, name: str) -> HistogramObserver | None:
    stored = calibration.histograms.get(name)
    return stored if stored is not None else _constant_histogram(prepared, name)


def load_statistics(prepared: torch.fx.GraphModule, calibration: TorchCalibration, ops: frozenset[str] = frozenset()) -> None:
    """Fill every observer of a trial's prepared graph from the calibration pass (no data is run).

    One observer module may watch several tensors: FX and PT2E share an observer between the input and
    the output of pooling, flatten, reshape or cat, so that the quantized op needs no requantization.
    Run live, such an observer sees every tensor it watches; it gets the merged histogram of them all
    here. (Taking only the last tensor's statistics, e.g. an average pool's narrow output, would clip
    the wide tensor feeding it: that collapsed MobileNetV3's output to cosine 0.1.)

    ``ops``: the names ``inc.describe`` lists, which an exclusion hint may name.

    Raises:
        CalibrationError: an observer watches a tensor the calibration pass never saw, or one that held
            NaN/Inf (naming the listed ops that read it).
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
        poisoned = [name for name in sources if name in calibration.non_finite]
        if poisoned:
            raise CalibrationError(_non_finite_message(prepared, poisoned[0], calibration.non_finite[poisoned[0]], ops))
        found = {name: _stored_or_constant(calibration, prepared, name) for name in sources}
        missing = [name for name, seen in found.items() if seen is None]
        if missing:
            raise CalibrationError(
                f"No calibration statistics for tensor {missing[0]!r}, which the quantized graph observes; "
                "the calibration batches never produced it. Calibrate with data that runs through every branch."
            )
        histogram = found[sources[0]]
        if len(sources) > 1:
            # a fresh observer: merging into the stored one would change the statistics of other trials
            histogram = HistogramObserver(histogram.bins, name=" | ".join(sources))
            for name in sources:
                histogram.merge(found[name])
        module.label = " | ".join(sources)
        module.load_histogram(histogram)
