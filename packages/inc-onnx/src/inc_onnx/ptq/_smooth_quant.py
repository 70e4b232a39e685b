"""SmoothQuant for ONNX graphs: rescale MatMul/Gemm inputs and weights before static quantization.

A pre-pass on a copy of the prepared graph. Every MatMul (and Gemm without ``transA``) whose weight
is a 2-D initializer used by that node alone is *smoothed*: per input channel ``j`` its weight row
is multiplied by ``s_j`` (:func:`inc_core.calibration._smooth_quant.smooth_scales`, from the
channel maxima of its input on the calibration data) and its input is divided by ``s_j``. Nodes
reading the same activation share one scale (the max over their weights).

The division goes into the LayerNormalization (gamma and beta), or the ``Mul(gamma)`` /
``Add(beta)`` of a decomposed LayerNorm or RMS norm, that produces the activation (a per-channel
constant that other nodes read too, as exporters share equal constants, is copied for this node
first), or into the output channels of the MatMul/Gemm whose output is one factor of the activation
(a gated MLP's ``up_proj`` in ``down_proj(act(gate_proj(x)) * up_proj(x))``), so the tensor quantized is
the rescaled one; readers that are not smoothed (the residual Add of a post-LayerNorm BERT block)
get the original back through a ``Mul`` by ``s``. Where the producer has nothing to fold into (a
GELU, a Reshape, a graph input) a ``Mul`` by ``1/s`` goes in front of the smoothed nodes, and the
producer stays FP32 when only that Mul reads it (else its output would be quantized twice, once
unsmoothed). Inserted Muls stay FP32. The FP32 graph computes what it did, up to float rounding.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from inc_core import Dataset, LayerFilter, QuantConfig, SmoothQuant
from inc_core.calibration._smooth_quant import ChannelAbsMax, input_channel_absmax, smooth_scales
from inc_core.errors import CalibrationError, DatasetError
from inc_onnx._feeds import to_feeds
from inc_onnx._preprocess import Prepared, _float_tensors
from inc_onnx.ptq._collect import OnnxCalibration, _augmented, collect
from inc_onnx.ptq._describe import describe_prepared

__all__ = ["SmoothedCalibration", "calibrate_smoothed", "smooth_graph", "unwrap"]

log = logging.getLogger("inc")

_SUFFIX = "_smooth_quant"


@dataclass(frozen=True)
class _Reader:
    """One smoothed node: which input is the weight and along which axis its input channels run."""

    node: onnx.NodeProto
    weight: str
    in_axis: int


@dataclass(eq=False)
class SmoothedCalibration:
    """What :meth:`OnnxBackend.calibrate` returns for ``QuantConfig(smooth_quant=...)``.

    Attributes:
        smooth_quant: the setting this calibration belongs to.
        prepared: the rescaled graph (what is quantized instead of the user's).
        calibration: activation statistics of the rescaled graph.
        folded: activations whose scale went into their producer.
        inserted: names of the ``Mul`` nodes inserted (kept in FP32): ``1/s`` in front of MatMuls whose input
            could not be folded, ``s`` in front of the other readers of a folded activation.
        float_producers: nodes whose output only an inserted ``1/s`` Mul reads (kept in FP32, so the
            activation is quantized once, rescaled).
    """

    smooth_quant: SmoothQuant
    prepared: Prepared = field(repr=False)
    calibration: OnnxCalibration = field(repr=False)
    folded: tuple[str, ...] = ()
    inserted: tuple[str, ...] = ()
    float_producers: tuple[str, ...] = ()

    @property
    def sample(self) -> dict[str, np.ndarray] | None:
        return self.calibration.sample


def smoothable_inputs(model: onnx.ModelProto) -> dict[str, list[_Reader]]:
    """Activation name -> the MatMul/Gemm nodes reading it that can be smoothed, in graph order."""
    inits = {init.name: init for init in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    for out in model.graph.output:
        uses[out.name] = uses.get(out.name, 0) + 1
    groups: dict[str, list[_Reader]] = {}
    for node in model.graph.node:
        if node.domain or node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        activation, weight = node.input[0], node.input[1]
        if activation in inits or weight not in inits or len(inits[weight].dims) != 2 or uses.get(weight) != 1:
            continue  # an activation x activation product, or a weight shared with another node
        if inits[weight].data_type != onnx.TensorProto.FLOAT:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0):
            continue
        groups.setdefault(activation, []).append(_Reader(node, weight, 1 if attrs.get("transB", 0) else 0))
    return groups


def calibrate_smoothed(
    prepared: Prepared, dataset: Dataset, config: QuantConfig, observe: Callable[[Prepared], list[str]]
) -> SmoothedCalibration:
    """Channel maxima of every smoothable input, the rescaled graph, then its calibration.

    The data is read twice: once for the maxima the scales come from, once through the rescaled
    graph for the activation statistics the quantizer needs.

    Raises:
        CalibrationError: no MatMul/Gemm with a constant weight to smooth, or NaN/Inf in an activation.
        DatasetError: a batch the model cannot run.
    """
    assert config.smooth_quant is not None
    groups = smoothable_inputs(prepared.model)
    if not groups:
        raise CalibrationError(
            "SmoothQuant found no MatMul or Gemm with a constant 2-D weight to rescale in the model; "
            "set smooth_quant=None."
        )
    absmax = _channel_absmax(prepared, dataset, list(groups), config.calib_samples)
    model, folded, inserted, float_producers = smooth_graph(prepared.model, absmax, config.smooth_quant.alpha)
    smoothed = Prepared(
        model=model,
        digest=f"{prepared.digest}{_SUFFIX}:{config.smooth_quant.alpha!r}",
        inputs=prepared.inputs,
        float_tensors=frozenset(_float_tensors(model)),
        value_info=prepared.value_info,
    )
    log.info(
        "SmoothQuant alpha=%s: %d activations rescaled (%d folded into their producer, %d with a Mul)",
        config.smooth_quant.alpha, len(groups), len(folded), len(inserted),
    )
    calibration = collect(smoothed, dataset, observe(smoothed), samples=config.calib_samples)
    return SmoothedCalibration(
        config.smooth_quant, smoothed, calibration, tuple(folded), tuple(inserted), tuple(float_producers)
    )


def _channel_absmax(prepared: Prepared, dataset: Dataset, tensors: list[str], samples: int) -> dict[str, np.ndarray]:
    session = _augmented(prepared, tensors)
    observers = {name: ChannelAbsMax(name) for name in tensors}
    for index, batch in enumerate(dataset.inputs(limit=samples)):
        feeds = to_feeds(batch, prepared.inputs, where=f"calibration batch {index}")
        try:
            outputs = session.run(tensors, feeds)
        except Exception as exc:  # ORT's pybind errors carry the reason in their text only
            text = (str(exc).strip() or type(exc).__name__).splitlines()[0][:400]
            raise DatasetError(
                f"calibration batch {index}: ONNX Runtime could not run the model on it: {text}. The model's inputs "
                f"are {', '.join(s.describe() for s in prepared.inputs)}."
            ) from exc
        for name, value in zip(tensors, outputs):
            observers[name].update(value)
    return {name: obs.result() for name, obs in observers.items()}


def smooth_graph(
    model: onnx.ModelProto, absmax: dict[str, np.ndarray], alpha: float
) -> tuple[onnx.ModelProto, list[str], list[str], list[str]]:
    """A rescaled copy of ``model``.

    Returns:
        (graph, activations folded into their producer, Mul nodes inserted, producers whose output
        only an inserted Mul reads): the last two are to stay FP32.

    ``absmax`` maps each activation to smooth to its per-channel ``max|x|`` (last axis).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    groups = smoothable_inputs(out)
    inits = {init.name: init for init in graph.initializer}
    producers = {name: node for node in graph.node for name in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    names = {node.name for node in graph.node}
    folded: list[str] = []
    inserted: list[str] = []
    # Graph lists are rebuilt once at the end: editing them in the loop would detach the nodes held above.
    new_inits: list[onnx.TensorProto] = []
    muls_before: dict[str, list[onnx.NodeProto]] = {}
    float_producers: list[str] = []
    # Every group's scales from the graph as it is, before a fold changes a weight another group reads (a
    # gated MLP's up projection is rescaled by its own group, along its rows, and by the next, along its columns).
    plans: list[tuple[str, list[_Reader], np.ndarray]] = []
    for activation, group in groups.items():
        if activation not in absmax:
            continue
        weights = [numpy_helper.to_array(inits[r.weight]) for r in group]
        try:
            channels = input_channel_absmax([w.T if r.in_axis else w for w, r in zip(weights, group)], 0)
        except ValueError:
            continue  # the readers disagree on the channel count: not one activation's channels
        if channels.shape[0] != absmax[activation].shape[0]:
            continue
        plans.append((activation, group, smooth_scales(absmax[activation], channels, alpha)))
    edit = _Edit(inits, readers, producers, graph_outputs, new_inits)
    for activation, group, scales in plans:
        for reader in group:
            shape = (-1, 1) if reader.in_axis == 0 else (1, -1)
            weight = numpy_helper.to_array(inits[reader.weight])  # as an earlier fold may have left it
            _replace_initializer(inits[reader.weight], (weight * scales.reshape(shape)).astype(np.float32))
        smoothed_names = {r.node.name for r in group}
        others = [n for n in readers.get(activation, []) if n.name not in smoothed_names]
        producer = producers.get(activation)
        if activation not in graph_outputs and producer is not None and _fold_into(producer, scales, edit):
            # The producer now writes x / s, so the tensor quantized is the smoothed one whatever else reads it;
            # the other readers (a residual Add) get x back through a Mul by s.
            folded.append(activation)
            if others:
                name = _unique(f"{producer.name}{_SUFFIX}_restore", names)
                restored = _unique(f"{activation}{_SUFFIX}_restored", {*inits, *producers, *readers})
                new_inits.append(numpy_helper.from_array(scales.astype(np.float32), f"{name}_scale"))
                mul = onnx.helper.make_node("Mul", [activation, f"{name}_scale"], [restored], name=name)
                muls_before.setdefault(others[0].name, []).append(mul)
                for node in others:
                    for index, value in enumerate(node.input):
                        if value == activation:
                            node.input[index] = restored
                _copy_value_info(graph, activation, restored)
                inserted.append(name)
            continue
        name = _unique(f"{group[0].node.name}{_SUFFIX}_mul", names)
        scaled = _unique(f"{activation}{_SUFFIX}", {*inits, *producers, *readers})
        inverse = f"{name}_inv_scale"
        new_inits.append(numpy_helper.from_array((1.0 / scales).astype(np.float32), inverse))
        muls_before.setdefault(group[0].node.name, []).append(
            onnx.helper.make_node("Mul", [activation, inverse], [scaled], name=name)
        )
        for reader in group:
            reader.node.input[0] = scaled
        _copy_value_info(graph, activation, scaled)
        inserted.append(name)
        if producer is not None and not others:
            # The producer's output is read by the Mul alone: kept float, it is quantized once, after the Mul.
            float_producers.append(producer.name)
    graph.initializer.extend(new_inits)
    if muls_before:
        nodes = []
        for node in graph.node:
            if node.name in muls_before:
                nodes.extend(muls_before[node.name])  # right before the first reader: after the activation's producer
            nodes.append(node)
        copied = [onnx.NodeProto() for _ in nodes]
        for target, node in zip(copied, nodes):
            target.CopyFrom(node)
        del graph.node[:]
        graph.node.extend(copied)
    return out, folded, inserted, float_producers


@dataclass
class _Edit:
    """The graph's lookups while it is rescaled, and the initializers to add at the end."""

    inits: dict[str, onnx.TensorProto]
    readers: dict[str, list[onnx.NodeProto]]
    producers: dict[str, onnx.NodeProto]
    graph_outputs: set[str]
    new_inits: list[onnx.TensorProto]

    def vector(self, name: str, size: int) -> np.ndarray | None:
        """A float32 per-channel constant of ``size`` channels, or None."""
        init = self.inits.get(name)
        if init is None:
            return None
        array = numpy_helper.to_array(init)
        return array if array.shape == (size,) and array.dtype == np.float32 else None

    def own(self, node: onnx.NodeProto, name: str) -> str:
        """The constant ``name`` as ``node`` alone reads it: exporters share one initializer among equal
        constants (every RMS norm weight of a freshly initialised model), and dividing it would change them all."""
        if len(self.readers.get(name, [])) <= 1:
            return name
        copy = _unique(f"{name}{_SUFFIX}_{node.name}", {*self.inits, *self.producers, *self.readers})
        tensor = numpy_helper.from_array(numpy_helper.to_array(self.inits[name]), copy)
        self.new_inits.append(tensor)
        self.inits[copy] = tensor
        for index, value in enumerate(node.input):
            if value == name:
                node.input[index] = copy
        self.readers[name] = [n for n in self.readers[name] if n is not node]
        self.readers[copy] = [node]
        return copy

    def divide(self, node: onnx.NodeProto, name: str, scales: np.ndarray, axis: int = 0) -> None:
        """Divide ``node``'s constant input ``name`` by ``scales`` along ``axis``."""
        owned = self.own(node, name)
        array = numpy_helper.to_array(self.inits[owned])
        shape = [1] * array.ndim
        shape[axis] = -1
        _replace_initializer(self.inits[owned], (array / scales.reshape(shape)).astype(np.float32))

    def only_reader(self, tensor: str, node: onnx.NodeProto) -> bool:
        return tensor not in self.graph_outputs and [n.name for n in self.readers.get(tensor, [])] == [node.name]


def _fold_into(producer: onnx.NodeProto, scales: np.ndarray, edit: _Edit) -> bool:
    """Divide ``producer``'s output channels by ``scales`` through its parameters; False when it has none.

    Folds into a LayerNormalization over the last axis (gamma, beta), an ``Add`` of a per-channel
    constant fed by a ``Mul`` by one (a decomposed LayerNorm), a lone ``Mul`` by one (an RMS norm's
    weight), or a product of two tensors one of which a MatMul/Gemm with a constant weight makes.
    """
    size = scales.shape[0]
    if producer.op_type == "LayerNormalization" and not producer.domain:
        axis = next((onnx.helper.get_attribute_value(a) for a in producer.attribute if a.name == "axis"), -1)
        params = [n for n in producer.input[1:3] if n]
        if axis != -1 or not params or any(edit.vector(n, size) is None for n in params):
            return False
        for name in params:
            edit.divide(producer, name, scales)
        return True
    if producer.op_type == "Add" and not producer.domain and len(producer.input) == 2:
        const = next((n for n in producer.input if n in edit.inits), None)
        other = next((n for n in producer.input if n not in edit.inits), None)
        mul = edit.producers.get(other) if other is not None else None
        if (
            const is None
            or edit.vector(const, size) is None
            or mul is None
            or mul.op_type != "Mul"
            or mul.domain
            or not edit.only_reader(mul.output[0], producer)
            or _mul_constant(mul, edit, size) is None
        ):
            return False
        edit.divide(mul, str(_mul_constant(mul, edit, size)), scales)
        edit.divide(producer, const, scales)
        return True
    if producer.op_type != "Mul" or producer.domain or len(producer.input) != 2:
        return False
    constant = _mul_constant(producer, edit, size)
    if constant is not None:
        edit.divide(producer, constant, scales)
        return True
    for factor in producer.input:
        if factor not in edit.inits and edit.only_reader(factor, producer) and _fold_into_linear(edit.producers.get(factor), scales, edit):
            return True
    return False


def _fold_into_linear(node: onnx.NodeProto | None, scales: np.ndarray, edit: _Edit) -> bool:
    """Divide the output channels of a MatMul/Gemm with a constant 2-D weight (and of its bias, added after)."""
    if node is None or node.domain:
        return False
    size = scales.shape[0]
    if node.op_type == "Add" and len(node.input) == 2:  # MatMul + bias
        bias = next((n for n in node.input if edit.vector(n, size) is not None), None)
        other = next((n for n in node.input if n != bias), None)
        matmul = edit.producers.get(other) if bias is not None and other is not None else None
        if matmul is None or matmul.op_type != "MatMul" or not edit.only_reader(matmul.output[0], node):
            return False
        if not _fold_into_linear(matmul, scales, edit):
            return False
        edit.divide(node, bias, scales)  # type: ignore[arg-type]
        return True
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return False
    weight = node.input[1]
    init = edit.inits.get(weight)
    if init is None or len(init.dims) != 2 or len(edit.readers.get(weight, [])) != 1 or init.data_type != onnx.TensorProto.FLOAT:
        return False  # a weight shared with another node (tied embeddings) would change that node too
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    out_axis = 0 if node.op_type == "Gemm" and attrs.get("transB", 0) else 1
    if init.dims[out_axis] != size or attrs.get("transA", 0):
        return False
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
    if bias is not None and edit.vector(bias, size) is None:
        return False  # a scalar or row-broadcast C: not one value per output channel
    edit.divide(node, weight, scales, axis=out_axis)
    if bias is not None:
        edit.divide(node, bias, scales)
    return True


def _mul_constant(mul: onnx.NodeProto, edit: _Edit, size: int) -> str | None:
    """The per-channel constant input of a ``Mul`` by one, or None."""
    constants = [n for n in mul.input if edit.vector(n, size) is not None]
    others = [n for n in mul.input if n not in edit.inits]
    return constants[0] if len(mul.input) == 2 and len(constants) == 1 and len(others) == 1 else None


def _replace_initializer(init: onnx.TensorProto, array: np.ndarray) -> None:
    init.CopyFrom(numpy_helper.from_array(array, init.name))


def _unique(base: str, taken: set[str] | dict[str, object]) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    if isinstance(taken, set):
        taken.add(name)
    return name


def _copy_value_info(graph: onnx.GraphProto, source: str, target: str) -> None:
    for value in (*graph.value_info, *graph.input):
        if value.name == source:
            copied = onnx.ValueInfoProto()
            copied.CopyFrom(value)
            copied.name = target
            graph.value_info.append(copied)
            return


def unwrap(
    prepared: Prepared, config: QuantConfig, calibration: OnnxCalibration | SmoothedCalibration | None, fmt: str
) -> tuple[Prepared, QuantConfig, OnnxCalibration | None]:
    """For quantization: the graph, config and statistics to hand the quantizer.

    With SmoothQuant on, that is the rescaled graph, its statistics, and the config with the
    inserted ``Mul`` nodes kept in FP32; otherwise what was given.

    Raises:
        CalibrationError: the calibration belongs to another SmoothQuant setting than the config's.
    """
    wanted = config.smooth_quant
    given = calibration.smooth_quant if isinstance(calibration, SmoothedCalibration) else None
    if calibration is None or wanted == given:
        if not isinstance(calibration, SmoothedCalibration):
            return prepared, config, calibration
        listed = {op.name for op in describe_prepared(calibration.prepared.model, config, fmt).ops}
        keep = tuple(name for name in (*calibration.inserted, *calibration.float_producers) if name in listed)
        exclude = config.exclude.union(LayerFilter(names=keep)) if keep else config.exclude
        return calibration.prepared, dataclasses.replace(config, exclude=exclude), calibration.calibration
    raise CalibrationError(
        f"The calibration was collected with smooth_quant={given!r} but the config asks for smooth_quant={wanted!r}; "
        "calibrate again with the config that is quantized (SmoothQuant rescales the model, so its statistics differ)."
    )
