"""From a calibration and a QuantConfig to a LiteRT int8 model; the layers inc lists as quantizable."""

from __future__ import annotations

from collections.abc import Iterable

from inc_core import QuantConfig
from inc_core.backend import Op, TuningSpace
from inc_core.errors import ConfigError, UnsupportedModelError
from inc_tf._flatbuffer import OpRecord
from inc_tf._keras_model import KerasGraph, input_batch_norms
from inc_tf._litert import LiteRTModel, check_runs
from inc_tf.ptq._calibrate import TfCalibration
from inc_tf.ptq._convert import dynamic_flatbuffer, quantize_flatbuffer

__all__ = ["QUANTIZABLE", "describe_graph", "layer_of_op", "quantize_dynamic", "quantize_static"]

#: Keras layers whose kernels LiteRT runs in int8 (everything else follows its neighbours' scales).
QUANTIZABLE = (
    "Dense",
    "EinsumDense",
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "DepthwiseConv2D",
    "SeparableConv2D",
    "Conv1DTranspose",
    "Conv2DTranspose",
    "Conv3DTranspose",
    "SeparableConv1D",
    "DepthwiseConv1D",
    "TimeDistributed",
    "MultiHeadAttention",
    "GroupedQueryAttention",
    # recurrent layers: converted unrolled (ptq/_convert.py), each step's input and recurrent MatMul in int8
    "LSTM",
    "GRU",
    "SimpleRNN",
    "Bidirectional",
    "ConvLSTM1D",
    "ConvLSTM2D",
    "ConvLSTM3D",
)

_QUANTIZABLE = frozenset(QUANTIZABLE)


def holds_quantizable(layer_types: Iterable[str]) -> bool:
    """Whether a layer (given its own type and the types of the layers inside it) is quantized by the int8 targets.

    A custom layer holding Dense/EinsumDense/conv layers (a keras_hub TransformerEncoder) counts as a whole: the
    one rule describe and QAT's wrapping share.
    """
    return not _QUANTIZABLE.isdisjoint(layer_types)

#: Layers without weights whose products LiteRT runs in int8 (query x key, scores x value): listed in static mode.
ACTIVATION_PRODUCTS = ("Attention", "AdditiveAttention")


#: the TF converter's dynamic-range mode leaves weights with fewer elements than this in float
DYNAMIC_MIN_ELEMENTS = 1024


def describe_graph(graph: KerasGraph, approach: str = "static") -> TuningSpace:
    minimum = DYNAMIC_MIN_ELEMENTS if approach == "dynamic" else 1
    held = graph.sublayer_types or (frozenset(),) * len(graph.layer_names)
    ops = tuple(
        Op(name, op_type)
        for name, op_type, size, inside in zip(graph.layer_names, graph.layer_types, graph.weight_sizes, held)
        if (holds_quantizable({op_type, *inside}) and size >= minimum)
        or (op_type in ACTIVATION_PRODUCTS and approach == "static")
    )
    # The LiteRT quantizer takes per-channel/per-tensor and the activation dtype for the whole model only,
    # so per-layer tuning covers the range choice: calibration method and scheme.
    settings = {"calibration": ("minmax", "kl", "percentile", "mse"), "scheme": ("asym", "sym")}
    return TuningSpace(ops, {op_type: settings for op_type in dict.fromkeys(op.op_type for op in ops)})


def layer_of_op(graph: KerasGraph, record: OpRecord) -> int | None:
    """The user's layer an op computes: the latest layer its names mention (conv+BN+ReLU maps to the ReLU)."""
    found = graph.layers_in((*record.output_names, *record.constant_inputs))
    return max(found) if found else None


def layers_of_op(graph: KerasGraph, record: OpRecord) -> set[int]:
    return graph.layers_in((*record.output_names, *record.constant_inputs))


def op_owners(graph: KerasGraph, records: list[OpRecord]) -> list[int | None]:
    """The layer each op of ``records`` (in execution order) computes: :func:`layer_of_op`, and the last step of an
    output layer, whose op carries no layer name.

    The converter names the tensor an op writes to a model output after the signature, not after its layer. Reading
    only tensors of one output layer, that op is the layer's last step: the softmax that LiteRT runs after a
    ``Dense(activation="softmax")`` (keras.applications' head). Unowned, it took the default settings, was left
    int8 when the layer was excluded, and QAT gave the logits the probabilities' range.
    """
    read = {tensor for record in records for tensor in record.inputs}
    outputs = output_layers(graph)
    owner_of_tensor: dict[int, int | None] = {}
    owners: list[int | None] = []
    for record in records:  # an op's inputs are written before it: their owners are known
        owner = layer_of_op(graph, record)
        if owner is None and not read.intersection(record.outputs):
            found = {owner_of_tensor[t] for t in record.inputs if t in owner_of_tensor}
            if len(found) == 1 and found <= outputs:
                owner = found.pop()
        owner_of_tensor.update(dict.fromkeys(record.outputs, owner))
        owners.append(owner)
    return owners


def output_layers(graph: KerasGraph) -> set[int]:
    """The indices (in ``graph.layer_names``) of the layers that compute the model's outputs."""
    from inc_tf._keras_model import layer_index

    found: set[int] = set()
    for tensor in getattr(graph.model, "outputs", None) or ():  # a subclassed model has no symbolic outputs
        layer = getattr(getattr(tensor, "_keras_history", None), "operation", None)
        if layer is None:
            continue
        # the graph's model names its layers by index (layer_tokens), so that the converter's names can be read
        index = layer_index(layer.name)
        if index is None and layer.name in graph.layer_names:
            index = graph.layer_names.index(layer.name)
        if index is not None:
            found.add(index)
    return found


# Layers every INT8 LiteRT model keeps in float. Normalization standardises raw features whose scales differ by orders
# of magnitude (breast-cancer's 30 run from 0.001 to 4,000): one per-tensor int8 scale on its input rounds the small
# ones to zero (output cosine 0.69 on that model). Its output, standardised, quantizes well; the layer itself is an
# elementwise subtract and multiply, whose float cost is nothing next to the Dense layers that follow. A
# BatchNormalization that reads a model input does the same job (``input_batch_norms``; cosine 0.34 on that model).
FLOAT_LAYER_TYPES = ("Normalization",)


def float_layer_nodes(graph: KerasGraph, records: list[OpRecord]) -> list[str]:
    """Output names of the ops computing a layer of :data:`FLOAT_LAYER_TYPES` or a BatchNormalization reading a model
    input (for the quantizer's denylist)."""
    kept = {i for i, layer_type in enumerate(graph.layer_types) if layer_type in FLOAT_LAYER_TYPES}
    kept |= input_batch_norms(graph)
    if not kept:
        return []
    return [name for record in records if layer_of_op(graph, record) in kept for name in record.output_names]


def float_nodes(graph: KerasGraph, records: list[OpRecord], owners: list[int | None], excluded: set[int]) -> list[str]:
    """Output names of the ops kept float (the quantizer's denylist): those of the ``excluded`` layers (their last
    step too, by ``owners`` of :func:`op_owners`) and :func:`float_layer_nodes`."""
    return [
        name for record, owner in zip(records, owners) if (layers_of_op(graph, record) | {owner}) & excluded
        for name in record.output_names
    ] + float_layer_nodes(graph, records)


#: Ops that hand on a part of their input unchanged: the quantizer gives their outputs their input's scale.
SELECTORS = ("STRIDED_SLICE", "SLICE", "SPLIT", "SPLIT_V", "GATHER", "GATHER_ND", "UNPACK")

#: Ranges further apart than this make one shared scale clip the wide part or round the narrow one away.
_SHARED_SCALE_SPREAD = 4.0


def sliced_inputs(records: list[OpRecord], ranges: dict[int, tuple[float, float]]) -> list[int]:
    """The model inputs read by selectors (:data:`SELECTORS`) whose parts have ranges too far apart for one scale.

    A tabular model slices its feature vector (raw amounts in the thousands next to standardised values) and sends
    the parts to different layers. The quantizer makes a slice share its input's scale, and all slices of one
    input share it with each other: it takes one range for all, so the other parts are clipped (a feature up to
    4,000 read as at most 2.5 by a Discretization: 11% of bucket codes right) or rounded away (standardised
    features on a scale of 15.7: output cosine 0.43). Such an input is left without a range: the quantizer then
    quantizes it once for each reader, each slice with its own range.
    """
    produced = {tensor for record in records for tensor in record.outputs}
    readers: dict[int, list[OpRecord]] = {}
    for record in records:
        if record.inputs and record.inputs[0] not in produced:
            readers.setdefault(record.inputs[0], []).append(record)
    unshared: list[int] = []
    for tensor, ops in readers.items():
        selectors = [record for record in ops if record.op in SELECTORS and record.input_dtypes[0].startswith("float")]
        parts = [tensor, *(out for record in selectors for out in record.outputs)]
        widths = [ranges[t][1] - ranges[t][0] for t in parts if t in ranges]
        if len(widths) < 2 or min(widths) <= 0.0 or max(widths) <= _SHARED_SCALE_SPREAD * min(widths):
            continue
        unshared.append(tensor)
    return unshared


def symmetric_if(scheme: str, span: tuple[float, float]) -> tuple[float, float]:
    """``span`` as the quantizer is to use it: centred on zero for ``scheme="sym"`` (the observers give the data's
    range; the int8 grid is the backend's to choose), as it is for ``"asym"``."""
    if scheme != "sym":
        return span
    bound = max(-min(span[0], 0.0), max(span[1], 0.0))
    return -bound, bound


def _excluded(graph: KerasGraph, config: QuantConfig) -> set[int]:
    ops = describe_graph(graph).ops
    names = set(config.exclude.select(ops)) if config.exclude else set()
    return {graph.layer_names.index(n) for n in names}


def quantize_static(graph: KerasGraph, config: QuantConfig, calibration: TfCalibration) -> LiteRTModel:
    """Write inc's ranges into the calibrated flatbuffer and run the LiteRT int8 quantizer."""
    from inc_tf._flatbuffer import op_records, split_inputs_as_slices, with_ranges

    owners = op_owners(graph, calibration.records)
    owner_of_tensor = {out: owner for record, owner in zip(calibration.records, owners) for out in record.outputs}
    ranges: dict[int, tuple[float, float]] = {}
    for tensor in calibration.observers:
        owner = owner_of_tensor.get(tensor)
        if owner is None:
            method, scheme = config.calibration, config.scheme
        else:
            name, op_type = graph.layer_names[owner], graph.layer_types[owner]
            method = config.setting(name, op_type, "calibration")
            scheme = config.setting(name, op_type, "scheme")
        ranges[tensor] = symmetric_if(scheme, calibration.range(
            tensor, method, percentile=float(config.percentile), dtype=config.activation_dtype, scheme=scheme
        ))
    denylist = float_nodes(graph, calibration.records, owners, _excluded(graph, config))
    calibrated = split_inputs_as_slices(calibration.calibrated)
    records = calibration.records if calibrated is calibration.calibrated else op_records(calibrated)
    content = quantize_flatbuffer(
        with_ranges(calibrated, ranges, unranged=sliced_inputs(records, ranges)),
        per_channel=config.granularity == "per_channel",
        denylisted_nodes=denylist,
    )
    quantized = LiteRTModel.with_layers(content, graph.layer_names, renamed=graph.renamed, input_names=graph.input_names)
    check_runs(quantized, calibration.probe, "the first calibration batch")
    return quantized


def quantize_dynamic(graph: KerasGraph, config: QuantConfig) -> LiteRTModel:
    if config.exclude:
        raise ConfigError(
            "QuantConfig: exclude is not supported with approach='dynamic' on the tf backend: the TF converter's "
            "dynamic-range mode quantizes every large weight. Use approach='static' to keep layers in float."
        )
    if not describe_graph(graph, "dynamic").ops:
        largest = max(range(len(graph.layer_names)), key=lambda i: graph.weight_sizes[i], default=None)
        held = (
            f"its largest weight ({graph.layer_names[largest]!r}) holds {graph.weight_sizes[largest]}"
            if largest is not None and graph.weight_sizes[largest] else "it holds no weight matrix"
        )
        raise UnsupportedModelError(
            f"Nothing to quantize: the TF converter's dynamic-range mode makes int8 only the weights of "
            f"{'/'.join(QUANTIZABLE[:4])}... layers with at least {DYNAMIC_MIN_ELEMENTS} values, and {held}. "
            "Use approach='static' (calibration data), which quantizes every layer inc.describe lists."
        )
    content = dynamic_flatbuffer(graph.model, layer_names=graph.layer_names)
    return LiteRTModel.with_layers(content, graph.layer_names, renamed=graph.renamed, input_names=graph.input_names)
