"""The SavedModel int8 target: the quantizable units of a frozen graph, one calibration, and each trial's rewrite.

Calibration runs the float graph once over the data and streams every tensor a unit reads or writes
into its own histogram observer; each trial (another calibration method, scheme, granularity or
fallback set) only picks ranges from those observers and rewrites the graph.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from inc_core import Dataset, QuantConfig
from inc_core.backend import Op, TuningSpace
from inc_core.calibration import HistogramObserver, check_finite_activation
from inc_core.errors import CalibrationError, DatasetError, UnsupportedModelError
from inc_tf._frozen import FrozenGraph, check_batch, graph_function, refuse_unordered_positional
from inc_tf._keras_model import KerasGraph
from inc_tf._savedmodel import TFSavedModel
from inc_tf.ptq._einsum_lowering import lower_einsums
from inc_tf.ptq._int8_rewrite import UnitSettings, rewrite_int8
from inc_tf.ptq._int8_units import ConstantFolder, Unit, find_units
from inc_tf.ptq._quantize import symmetric_if

__all__ = ["GraphCalibration", "GraphPlan", "as_input_arrays", "calibrate_plan", "describe_plan", "plan_graph", "quantize_plan"]

log = logging.getLogger("inc")

#: op types of the tuning space for a SavedModel input (Keras inputs use their layer classes)
_OP_TYPES = {"Conv2D": "Conv2D", "DepthwiseConv2dNative": "DepthwiseConv2D", "MatMul": "MatMul"}


@dataclass(eq=False)
class GraphPlan:
    """A frozen float graph, its quantizable units, and the user-facing name and type of each unit.

    Attributes:
        frozen: the float graph.
        units: the quantizable units, in graph order.
        op_names: unit name -> the op name tuning and ``exclude`` use (the Keras layer name when known).
        op_types: unit name -> that op's type (the Keras layer class, else the TF op).
    """

    frozen: FrozenGraph
    units: list[Unit] = field(repr=False)
    op_names: dict[str, str]
    op_types: dict[str, str]


def plan_graph(frozen: FrozenGraph, keras_graph: KerasGraph | None = None) -> GraphPlan:
    """Find the units of ``frozen``; with ``keras_graph``, name each after the Keras layer that holds it."""
    lowered, count = lower_einsums(frozen.graph_def)
    if count:
        frozen = replace(frozen, graph_def=lowered)
    folder = ConstantFolder(frozen.graph_def)
    units = find_units(frozen.graph_def, folder, frozen.output_tensors)
    names, types = {}, {}
    for unit in units:
        layer = None
        if keras_graph is not None:
            found = keras_graph.layers_in([unit.name])
            layer = max(found) if found else None
        if layer is not None and keras_graph is not None:
            names[unit.name] = keras_graph.layer_names[layer]
            types[unit.name] = keras_graph.layer_types[layer]
        else:
            names[unit.name], types[unit.name] = unit.name, _OP_TYPES[unit.op]
    # Two units in one layer (a custom layer with two matmuls) share the layer's name: fallback is per layer.
    return GraphPlan(frozen, units, names, types)


def describe_plan(plan: GraphPlan) -> TuningSpace:
    ops = tuple(dict.fromkeys(Op(plan.op_names[u.name], plan.op_types[u.name]) for u in plan.units))
    settings: dict[str, tuple[str, ...]] = {
        "calibration": ("minmax", "kl", "percentile", "mse"),
        "scheme": ("asym", "sym"),
    }
    conv_settings = {**settings, "granularity": ("per_channel", "per_tensor")}
    by_type = {}
    for unit in plan.units:
        by_type[plan.op_types[unit.name]] = conv_settings if unit.op != "MatMul" else settings
    return TuningSpace(ops, by_type)


@dataclass(eq=False)
class GraphCalibration:
    """What every SavedModel trial reuses: one histogram per tensor a unit reads or writes.

    Attributes:
        observers: tensor name -> histogram of everything it held.
        samples: how many samples were fed.
    """

    observers: dict[str, HistogramObserver] = field(repr=False)
    samples: int
    model_id: int = 0


def calibrate_plan(plan: GraphPlan, dataset: Dataset, *, samples: int, model_id: int = 0) -> GraphCalibration:
    """Run the float graph over up to ``samples`` samples and observe every unit's input and output.

    Raises:
        DatasetError: empty data, or a batch of the wrong shape or dtype.
        CalibrationError: an input or an observed activation held NaN or Inf.
    """
    import tensorflow as tf

    frozen = plan.frozen
    watched = tuple(
        dict.fromkeys(t for u in plan.units for t in (u.input, u.output, u.core_output, u.summand or u.output))
    )
    if not watched:
        raise UnsupportedModelError(
            "The model has no Conv2D, DepthwiseConv2D or MatMul with constant weights, so the SavedModel int8 target has nothing "
            "to quantize. Quantize it with QuantConfig(format='tflite') instead."
        )
    run = graph_function(frozen.graph_def, frozen.input_tensors, watched)
    observers = {name: HistogramObserver(name=name) for name in watched}
    seen = 0
    for index, batch in enumerate(dataset.inputs(limit=samples)):
        arrays = check_batch(as_input_arrays(batch, frozen), frozen, where=f"calibration batch {index}")
        for i, array in enumerate(arrays):
            if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
                raise CalibrationError(
                    f"Calibration batch {index}, input {i} holds NaN or Inf; the activations it produces would make "
                    "quantization ranges meaningless. Remove or impute the non-finite values in the calibration data."
                )
        try:
            values = run(*[tf.constant(a) for a in arrays])
        except (tf.errors.OpError, ValueError) as exc:
            raise DatasetError(
                f"calibration batch {index}: TensorFlow could not run the model on shapes {[a.shape for a in arrays]}: "
                f"{str(exc).splitlines()[0][:300]}."
            ) from exc
        for name, value in zip(watched, values if isinstance(values, (list, tuple)) else [values]):
            value = np.asarray(value)
            check_finite_activation(name, value, index)
            observers[name].update(value)
        seen += int(arrays[0].shape[0]) if arrays[0].ndim else 1
    if seen == 0:
        raise DatasetError("Dataset: no samples were produced; calibration needs at least one batch.")
    log.info("calibration: %d samples, %d tensors observed", seen, len(observers))
    return GraphCalibration(observers, seen, model_id)


def as_input_arrays(batch: Any, frozen: FrozenGraph) -> list[np.ndarray]:
    refuse_unordered_positional(batch, frozen.input_keys, frozen.ordered, where="calibration batch")
    if isinstance(batch, dict):
        if len(batch) == 1 and len(frozen.input_keys) == 1:
            return [next(iter(batch.values()))]
        missing = [k for k in frozen.input_keys if k not in batch]
        if missing:
            raise DatasetError(
                f"calibration batch: the mapping has keys {sorted(batch)}, the model's inputs are "
                f"{list(frozen.input_keys)}. Key the mapping by the input names."
            )
        return [batch[k] for k in frozen.input_keys]
    return list(batch) if isinstance(batch, (tuple, list)) else [batch]


def quantize_plan(
    plan: GraphPlan,
    config: QuantConfig,
    calibration: GraphCalibration,
    *,
    ranges: Mapping[str, tuple[float, float]] | None = None,
    probe: bool = False,
) -> TFSavedModel:
    """The int8 graph for one trial: ranges from ``config``'s per-op settings, excluded ops left in float.

    ``ranges`` (tensor name -> (min, max)) are taken as they are in place of the observers' answer: QAT
    passes the ranges its fake quant learned, and the observers only cover the tensors it has none for.
    ``probe`` builds the graph per-op errors are measured on (see ``rewrite_int8``): each unit reads its float
    input from a placeholder, and keeps its float output, read or not.
    """
    given = dict(ranges or {})
    excluded = set(config.exclude.select(describe_plan(plan).ops)) if config.exclude else set()
    producers = {t: u for u in plan.units for t in (u.output, u.core_output)}
    settings: dict[str, UnitSettings] = {}

    def tensor_range(tensor: str, reader: Unit) -> tuple[float, float]:
        # A tensor's range follows the unit that writes it, so producer and reader agree on it exactly.
        if tensor in given:
            low, high = given[tensor]
            return float(low), float(high)
        owner = producers.get(tensor, reader)
        name, op_type = plan.op_names[owner.name], plan.op_types[owner.name]
        method = config.setting(name, op_type, "calibration")
        scheme = config.setting(name, op_type, "scheme")
        observer = calibration.observers[tensor]
        dtype = "uint8" if observer.min >= 0.0 else "int8"
        low, high = observer.range(method, percentile=float(config.percentile), dtype=dtype, scheme=scheme)
        return symmetric_if(scheme, (float(low), float(high)))

    for unit in plan.units:
        name, op_type = plan.op_names[unit.name], plan.op_types[unit.name]
        if name in excluded:
            continue
        settings[unit.name] = UnitSettings(
            input_range=tensor_range(unit.input, unit),
            output_range=tensor_range(unit.output, unit),
            per_channel=config.setting(name, op_type, "granularity") == "per_channel",
            core_output_range=tensor_range(unit.core_output, unit),
            summand_range=tensor_range(unit.summand, unit) if unit.summand else None,
        )
    # Every model input stays, read or not (a head on a keras_hub encoder-decoder's encoder output leaves the
    # decoder inputs unread): the signature takes them. Probes keep each unit's float output too.
    keep = tuple(t.split(":")[0] for t in plan.frozen.input_tensors)
    if probe:
        keep += tuple(t.split(":")[0] for t in (u.output for u in plan.units if u.name in settings))
    graph_def, kernels = rewrite_int8(
        plan.frozen.graph_def, plan.units, settings, plan.frozen.output_tensors, keep=keep, probe=probe
    )
    frozen = plan.frozen
    layers = {node: plan.op_names[unit] for node, unit in kernels.items()}
    return TFSavedModel(
        graph_def, frozen.input_tensors, frozen.input_keys, frozen.input_shapes, frozen.output_tensors,
        frozen.output_keys, layers, ordered_inputs=frozen.ordered,
    )
