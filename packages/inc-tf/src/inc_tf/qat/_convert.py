"""``convert``: the int8 model of a QAT-trained Keras model, with the ranges it learned.

The trained weights go back into the user's architecture, the TF converter folds batch norm as usual, and the
*learned* ranges are written into the calibrated flatbuffer before the int8 quantizer runs; ``format="savedmodel"``
gives them to the SavedModel target's graph rewrite in place of calibration observers. Tensors without a learned
range are calibrated on ``dataset=`` (or synthetic inputs, with a warning).
"""

from __future__ import annotations

import logging
from typing import Any

import keras
import numpy as np

from inc_core import QATConfig
from inc_core.errors import ConfigError, UnsupportedModelError
from inc_tf.qat._fake_quant import FakeQuant
from inc_tf.qat._qat import _wrappers, qat_config_of

__all__ = ["convert"]

# The LiteRT ops that compute such a kernel's output (the tensor that takes the learned pre-activation range).
_KERNEL_OPS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "CONV_3D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "BATCH_MATMUL"})
#: the int8 targets ``convert`` builds (the names of ``QuantConfig.format``)
_FORMATS = ("tflite", "savedmodel")
# LiteRT ops whose int8 output takes its input's scale: a range calibrated for it is not used.
_SCALE_KEEPING = frozenset({
    "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE", "STRIDED_SLICE", "SLICE", "GATHER", "PACK", "UNPACK", "SPLIT",
    "SPLIT_V", "MAX_POOL_2D", "TILE",
})
_log = logging.getLogger("inc")


def convert(model: keras.Model, *, dataset: Any = None, format: str = "tflite") -> Any:
    """The int8 model of a QAT-trained model, with the ranges it learned.

    Args:
        model: what :func:`prepare_qat` returned, after training.
        dataset: representative inputs (a few hundred training inputs); tensors without a learned range (the
            steps inside a layer that LiteRT runs as several ops, such as LayerNormalization's mean and variance,
            and ops between layers) get their range from these. Without it, from synthetic inputs spread over the
            model input's learned range, with a warning naming how many tensors were calibrated that way.
        format: ``"tflite"`` (a LiteRT int8 model) or ``"savedmodel"`` (a :class:`TFSavedModel` on TF's
            oneDNN int8 kernels), the same targets as ``QuantConfig(format=...)``.

    Raises:
        ConfigError: ``format`` is not one of the targets.
        UnsupportedModelError: ``model`` has no fake quant, or was never trained.
    """
    if format not in _FORMATS:
        raise ConfigError(f"convert: format must be one of {list(_FORMATS)}, got {format!r}.")
    from inc_core import Dataset
    from inc_tf._flatbuffer import with_ranges
    from inc_tf._keras_model import copy_state, prepare_graph
    from inc_tf._litert import LiteRTModel, check_runs
    from inc_tf.ptq._calibrate import collect
    from inc_tf.ptq._convert import quantize_flatbuffer
    from inc_tf.ptq._quantize import describe_graph, float_nodes, op_owners

    wrappers = _wrappers(model) if isinstance(model, keras.Model) else []
    if not wrappers:
        raise UnsupportedModelError(
            f"convert takes the model inc_tf.prepare_qat returned; got {type(model).__qualname__} without fake quant."
        )
    learned = {w.name: w.learned_range() for w in wrappers}
    pre_activation = {w.name: w.learned_pre_activation_range() for w in wrappers}
    if all(r is None for r in learned.values()):
        raise UnsupportedModelError("convert: the QAT model was never trained (no learned range); fit it first.")
    config = qat_config_of(model)
    input_ranges = _learned_input_ranges(model, wrappers)
    input_range = next(iter(input_ranges.values()), None) if len(input_ranges) == 1 else None
    fp32 = keras.models.model_from_json(_source_architecture(model))
    for layer in model.layers:  # the trained weights, of wrapped and unwrapped layers alike
        if not isinstance(layer, keras.layers.InputLayer):
            trained = layer.layer if isinstance(layer, FakeQuant) else layer
            copy_state(trained, fp32.get_layer(layer.name))
    graph = prepare_graph(fp32)
    synthetic = dataset is None
    if synthetic:
        dataset = Dataset(_synthetic_inputs(graph, input_range or (0.0, 1.0)), batch_size=4)
    dataset = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    if format == "savedmodel":
        return _convert_savedmodel(graph, dataset, config, learned, input_ranges, synthetic=synthetic)
    calibration = collect(graph, dataset, samples=64)
    producer = {out: record for record in calibration.records for out in record.outputs}
    owner_list = op_owners(graph, calibration.records)
    owners = {out: owner for record, owner in zip(calibration.records, owner_list) for out in record.outputs}
    readers: dict[int, set[int | None]] = {}
    for record, owner in zip(calibration.records, owner_list):
        for tensor in record.inputs:
            readers.setdefault(tensor, set()).add(owner)

    def leaves_its_layer(tensor: int, owner: int) -> bool:
        # A learned range is that of the layer's output. The ops inside a layer that LiteRT runs as several
        # (SeparableConv's depthwise step, GroupNormalization's statistics, TimeDistributed's reshapes) keep
        # the calibrated ranges of their own tensors.
        found = readers.get(tensor, set())
        return not found or any(reader != owner for reader in found)

    ranges = {}
    unlearned: list[tuple[int | None, tuple[str, ...]]] = []  # (owner, op) of each tensor given a calibrated range
    for tensor in calibration.observers:
        record = producer.get(tensor)
        owner = owners.get(tensor)
        found = None
        if owner is not None and leaves_its_layer(tensor, owner):
            found = learned.get(graph.layer_names[owner])
        elif owner is not None and record is not None and record.op in _KERNEL_OPS:
            found = pre_activation.get(graph.layer_names[owner])  # before the activation LiteRT runs after it
        if record is None:  # no producer: a model input, named "serving_default_<input name>:0" by the converter
            found = _input_range_of(calibration.names.get(tensor, ""), input_ranges) or found
        if found is None and record is not None and record.op not in _SCALE_KEEPING:
            unlearned.append((owner, record.output_names))
        ranges[tensor] = found or calibration.range(tensor, "minmax", percentile=100.0, dtype="uint8", scheme=config.scheme)
    # Layers the config excluded trained without kernel fake quant: they stay float in LiteRT too.
    excluded = {
        graph.layer_names.index(op.name) for op in describe_graph(graph).ops if config.exclude.matches(op.name, op.op_type)
    }
    excluded_nodes = float_nodes(graph, calibration.records, owner_list, excluded)
    if synthetic:  # what stays float (excluded, a Normalization) uses no range
        float_ops = set(excluded_nodes)
        calibrated = [owner for owner, names in unlearned if float_ops.isdisjoint(names)]
        if calibrated:
            _warn_synthetic_calibration(graph, calibrated)
    content = quantize_flatbuffer(
        with_ranges(calibration.calibrated, ranges),
        per_channel=config.granularity == "per_channel",
        denylisted_nodes=excluded_nodes,
    )
    quantized = LiteRTModel.with_layers(content, graph.layer_names, renamed=graph.renamed, input_names=graph.input_names)
    check_runs(quantized, calibration.probe, "the first batch of the conversion data")
    return quantized


def _warn_synthetic_calibration(graph: Any, owners: list[int | None]) -> None:
    """Say which tensors convert, given no dataset, calibrated on synthetic inputs (the int8 ops inside a layer that
    LiteRT runs as several, such as LayerNormalization's mean and variance, and ops between layers): noise puts
    their ranges far from the trained model's (ConvNeXtTiny on digits: 0.90 of the int8 model's predictions equal to
    the QAT model's, 0.9975 calibrated on 256 training images)."""
    import warnings

    kinds: dict[str, int] = {}
    for owner in owners:
        kind = f"{graph.layer_types[owner]} layers" if owner is not None else "ops between layers"
        kinds[kind] = kinds.get(kind, 0) + 1
    listed = ", ".join(f"{count} in {kind}" for kind, count in sorted(kinds.items(), key=lambda item: -item[1]))
    message = (
        f"convert: {len(owners)} int8 tensor(s) have no range learned in training ({listed}) and were calibrated on "
        "synthetic inputs spread over the model input's range, not on data, so the int8 model can disagree with the "
        "QAT model there. Pass convert(model, dataset=...) with a few hundred training inputs."
    )
    _log.warning(message)
    warnings.warn(message, UserWarning, stacklevel=3)


def _source_architecture(model: keras.Model) -> str:
    """The user's architecture (Keras JSON) of a QAT model: kept by prepare_qat, or, once Keras saved and loaded the
    model (which keeps no such attribute), rebuilt by taking each wrapped layer out of its FakeQuant."""
    source = getattr(model, "_inc_qat_source", None)
    if isinstance(source, str):
        return source

    def unwrap(layer: keras.layers.Layer) -> keras.layers.Layer:
        inner = layer.layer if isinstance(layer, FakeQuant) else layer
        return type(inner).from_config(inner.get_config())

    def call(layer: keras.layers.Layer, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("mask", False) is None:  # FakeQuant.call's own keyword, recorded with each call
            del kwargs["mask"]
        return layer(*args, **kwargs)

    try:
        return str(keras.models.clone_model(model, clone_function=unwrap, call_function=call).to_json())
    except Exception as exc:  # Keras raises TypeError, ValueError... from a layer's own __init__ or call
        raise UnsupportedModelError(
            f"convert: the architecture of QAT model {model.name!r} could not be rebuilt without its fake quant "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}); convert the model "
            "prepare_qat returned, or call prepare_qat again on the user's model."
        ) from exc


def _convert_savedmodel(
    graph: Any,
    dataset: Any,
    config: QATConfig,
    learned: dict[str, tuple[float, float] | None],
    input_ranges: dict[str, tuple[float, float]],
    *,
    synthetic: bool,
) -> Any:
    """The SavedModel int8 target: PTQ's graph rewrite (batch norm folded) fed the learned ranges.

    A tensor takes the range of the wrapper whose layer writes it as its final output; a model input takes
    the input range its readers learned. Anything else (a tensor inside a layer) is observed on ``dataset``.
    """
    from inc_core import QuantConfig
    from inc_tf._frozen import freeze_keras
    from inc_tf.ptq._savedmodel_quantize import calibrate_plan, plan_graph, quantize_plan

    plan = plan_graph(freeze_keras(graph.model, graph.input_names, graph.input_shapes, graph.input_dtypes), graph)
    layer_of_node = {}
    for node in plan.frozen.graph_def.node:
        found = graph.layers_in([node.name])
        if found:
            layer_of_node[node.name] = max(found)
    # A tensor read by another node of its own layer is not that layer's output (whose range was learned).
    inner = {
        ref.lstrip("^").split(":")[0]
        for node in plan.frozen.graph_def.node
        for ref in node.input
        if node.name in layer_of_node and layer_of_node.get(ref.lstrip("^").split(":")[0]) == layer_of_node[node.name]
    }
    ranges: dict[str, tuple[float, float]] = {}
    unlearned: dict[str, int | None] = {}  # tensor -> its layer, for the tensors observed on ``dataset``
    for unit in plan.units:
        for tensor in (unit.input, unit.output, unit.core_output, unit.summand):
            if tensor is None:
                continue
            node = tensor.split(":")[0]
            if tensor in plan.frozen.input_tensors:
                found = input_ranges.get(graph.input_names[plan.frozen.input_tensors.index(tensor)])
            elif node in layer_of_node and node not in inner and tensor.endswith(":0"):
                found = learned.get(graph.layer_names[layer_of_node[node]])
            else:
                found = None
            if found is not None:
                ranges[tensor] = found
            else:
                unlearned[tensor] = layer_of_node.get(node)
    if synthetic and unlearned.keys() - ranges.keys():
        _warn_synthetic_calibration(graph, [unlearned[t] for t in unlearned.keys() - ranges.keys()])
    ptq = QuantConfig(
        format="savedmodel", calibration="minmax", granularity=config.granularity, scheme=config.scheme,
        exclude=config.exclude,
    )
    calibration = calibrate_plan(plan, dataset, samples=64)
    return quantize_plan(plan, ptq, calibration, ranges=ranges)


def _learned_input_ranges(model: keras.Model, wrappers: list[FakeQuant]) -> dict[str, tuple[float, float]]:
    """Model input name -> the range learned by the fake quant of the layers reading it (their union when
    several do). Each float input has its own: one range for all would clip the wider ones."""
    names = {id(t): getattr(t, "name", "") for t in model.inputs}
    ranges: dict[str, tuple[float, float]] = {}
    for wrapper in wrappers:
        learned = wrapper.learned_input_range()
        if learned is None:
            continue
        for node in wrapper._inbound_nodes:
            for tensor in node.input_tensors:
                name = names.get(id(tensor))
                if name:
                    low, high = ranges.get(name, learned)
                    ranges[name] = (min(low, learned[0]), max(high, learned[1]))
    return ranges


def _input_range_of(tensor_name: str, ranges: dict[str, tuple[float, float]]) -> tuple[float, float] | None:
    """The learned range of the model input a LiteRT input tensor (``serving_default_numeric:0``) feeds."""
    base = tensor_name.split(":")[0]
    for name, found in ranges.items():
        if base in (name, f"serving_default_{name}"):
            return found
    return next(iter(ranges.values())) if len(ranges) == 1 else None


def _synthetic_inputs(graph: Any, span: tuple[float, float]) -> np.ndarray:
    """Inputs spanning the learned input range: the converter needs a few to create its range fields, which
    inc then overwrites with the learned ranges."""
    if len(graph.input_shapes) != 1 or any(d is None for d in graph.input_shapes[0]):
        raise UnsupportedModelError(
            "convert needs dataset=... (a few representative inputs) for a model with several or variable-shape inputs."
        )
    rng = np.random.default_rng(0)
    shape = (64, *graph.input_shapes[0])  # as many as collect() reads: the lookups' (and LSTM gates') ranges come from them
    dtype = np.dtype(graph.input_dtypes[0]) if graph.input_dtypes else np.dtype(np.float32)
    if np.issubdtype(dtype, np.integer):
        # Token or category codes: every row of the tables they index, so the lookups' outputs (whose ranges
        # are calibrated on these inputs, not learned) see the whole table.
        rows = [layer.input_dim for layer in _all_layers(graph.model) if isinstance(layer, keras.layers.Embedding)]
        if not rows:
            raise UnsupportedModelError(
                f"convert needs dataset=... (a few representative inputs) for a model taking {dtype} inputs that no "
                "Embedding reads: inc cannot tell which codes are valid."
            )
        return rng.integers(0, min(rows), size=shape).astype(dtype)
    return rng.uniform(span[0], span[1], size=shape).astype(np.float32)


def _all_layers(model: Any) -> list[Any]:
    found = []
    for layer in getattr(model, "layers", []):
        found.append(layer)
        found.extend(_all_layers(layer))
    return found
