"""Activation statistics, collected once: the calibrated float flatbuffer run by LiteRT over the data.

Every tensor the converter gave a min/max field streams into its own histogram observer, so each
tuning trial (another calibration method, another scheme, another fallback set) only rewrites the
ranges and re-runs the quantizer: the model never runs over the data again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inc_core import Dataset
from inc_core.calibration import HistogramObserver, check_finite_activation
from inc_core.errors import CalibrationError, DatasetError
from inc_tf._flatbuffer import OpRecord, op_records, ranged_tensors
from inc_tf._keras_model import KerasGraph, as_input_list, feeds_by_name
from inc_tf._litert import Invoker, interpreter
from inc_tf.ptq._convert import calibrated_flatbuffer

__all__ = ["TfCalibration", "collect"]

log = logging.getLogger("inc")


@dataclass(eq=False)
class TfCalibration:
    """What every trial reuses: the calibrated flatbuffer and one observer per ranged tensor.

    Attributes:
        calibrated: the float flatbuffer with calibration fields.
        observers: tensor index -> histogram of everything that tensor held.
        names: tensor index -> tensor name.
        records: the flatbuffer's ops.
        samples: how many samples were fed.
    """

    calibrated: bytes = field(repr=False)
    observers: dict[int, HistogramObserver] = field(repr=False)
    names: dict[int, str]
    records: list[OpRecord] = field(repr=False)
    samples: int
    model_id: int = 0
    probe: list[np.ndarray] = field(default_factory=list, repr=False)

    def range(self, tensor: int, method: str, *, percentile: float, dtype: str, scheme: str) -> tuple[float, float]:
        low, high = self.observers[tensor].range(method, percentile=percentile, dtype=dtype, scheme=scheme)
        return float(low), float(high)


def _converter_samples(first: list[np.ndarray], input_names: tuple[str, ...] = ()) -> list[Any]:
    """Up to four single samples of the first batch: enough for the converter to write its range fields.

    A model with several named inputs gets each sample as a mapping by input name: the converter reads a list
    in its interpreter's input order, which is neither the model's nor the sorted one (a model with inputs
    ``("features", "size")`` is run with ``size`` first), and a swapped sample fails or calibrates nonsense.
    """
    count = min(4, int(first[0].shape[0])) if first[0].ndim else 1
    samples = [[array[i : i + 1] for array in first] for i in range(count)]
    if len(first) > 1 and len(input_names) == len(first):
        return [dict(zip(input_names, sample)) for sample in samples]
    return samples


def collect(graph: KerasGraph, dataset: Dataset, *, samples: int, model_id: int = 0) -> TfCalibration:
    """Calibrate ``graph`` on up to ``samples`` samples of ``dataset``.

    Raises:
        DatasetError: empty data, or a batch of the wrong shape or dtype.
        CalibrationError: an activation held NaN or Inf.
    """
    batches = (as_input_list(b, graph, where=f"calibration batch {i}") for i, b in enumerate(dataset.inputs(limit=samples)))
    first = next(batches, None)
    if first is None:
        raise DatasetError("Dataset: no samples were produced; calibration needs at least one batch.")
    _check_finite_inputs(first, 0)
    calibrated = calibrated_flatbuffer(graph.model, _converter_samples(first, graph.input_names), layer_names=graph.layer_names)
    names = ranged_tensors(calibrated)
    interp = interpreter(calibrated, threads=None, preserve_all_tensors=True)
    runner = Invoker(interp)
    input_keys = tuple(runner.input_names)
    observers = {index: HistogramObserver(name=name) for index, name in names.items()}
    records = op_records(calibrated)
    # Every float activation is checked for NaN/Inf, also those of ops LiteRT keeps in float (no range field).
    checked = {i: n for r in records for i, n, d in zip(r.outputs, r.output_names, r.output_dtypes) if d == "float32"}
    checked.update(names)
    seen = 0
    bar = _progress(samples)
    try:
        for index, batch in enumerate(_chain(first, batches)):
            _check_finite_inputs(batch, index)
            try:
                runner(**feeds_by_name(input_keys, graph, batch))
            except (ValueError, RuntimeError) as exc:
                raise DatasetError(
                    f"calibration batch {index}: LiteRT could not run the model on shapes "
                    f"{[a.shape for a in batch]}: {str(exc).splitlines()[0][:300]}."
                ) from exc
            for tensor, name in checked.items():
                value = interp.get_tensor(tensor)
                check_finite_activation(name, value, index)
                if tensor in observers:
                    observers[tensor].update(value)
            size = int(batch[0].shape[0]) if batch[0].ndim else 1
            seen += size
            if bar is not None:
                bar.update(size)
    finally:
        if bar is not None:
            bar.close()
    log.info("calibration: %d samples, %d activations observed", seen, len(observers))
    return TfCalibration(calibrated, observers, names, records, seen, model_id, probe=first)


def _chain(first: list[np.ndarray], rest: Any) -> Any:
    yield first
    yield from rest


def _check_finite_inputs(batch: list[np.ndarray], index: int) -> None:
    for i, array in enumerate(batch):
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            kind = "NaN" if np.isnan(array).any() else "Inf"
            raise CalibrationError(
                f"Calibration batch {index}, input {i} holds {kind}; the activations it produces would make "
                "quantization ranges meaningless. Remove or impute the non-finite values in the calibration data."
            )


def _progress(total: int) -> Any:
    if not log.isEnabledFor(logging.INFO):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total if math.isfinite(total) else None, desc="calibrating", unit="sample", leave=False)
