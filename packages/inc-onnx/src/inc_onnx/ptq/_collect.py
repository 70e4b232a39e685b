"""Activation statistics, collected once: an augmented graph streams every activation into an observer.

The graph gets every float activation that a quantizable node reads or writes as an extra output.
Batches are run one at a time and each activation updates its own histogram observer, so memory
stays bounded by one batch. The observers answer every calibration method afterwards, which is
what lets tuning trials switch methods or fall back ops without running the model again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from inc_core import Dataset
from inc_core.calibration import HistogramObserver, check_finite_activation
from inc_core.errors import CalibrationError, DatasetError
from inc_onnx._feeds import to_feeds
from inc_onnx._preprocess import Prepared
from inc_onnx.ptq._input_limits import input_limits
from inc_onnx.ptq._masks import analyse_masks

__all__ = ["OnnxCalibration", "collect", "tensors_to_observe"]

log = logging.getLogger("inc")


@dataclass(eq=False)
class OnnxCalibration:
    """Activation statistics of one model, reusable by every trial and calibration method.

    Attributes:
        digest: content hash of the model the statistics belong to.
        observers: one histogram observer per observed activation.
        samples: how many samples were fed.
        batches: how many batches (augmented-graph runs) were fed.
        sample: the first batch's feeds, on which every INT8 model is run once before it is returned.
    """

    digest: str
    observers: dict[str, HistogramObserver] = field(repr=False)
    samples: int
    batches: int
    sample: dict[str, np.ndarray] | None = field(default=None, repr=False)

    def range(self, tensor: str, method: str, *, percentile: float, dtype: str, scheme: str) -> tuple[float, float]:
        """The (lo, hi) a calibration method picks for ``tensor`` (the observer memoizes each answer)."""
        low, high = self.observers[tensor].range(method, percentile=percentile, dtype=dtype, scheme=scheme)
        return float(low), float(high)


def tensors_to_observe(prepared: Prepared, op_types: Iterable[str]) -> list[str]:
    """Float activations read or written by nodes of the given types, in first-use order.

    Only nodes that may be quantized count, and only signal tensors: mask arithmetic, masked
    attention scores (see :mod:`inc_onnx.ptq._masks`), parameters and constants are never observed.
    """
    wanted = set(op_types)
    masks = analyse_masks(prepared.model)
    initializers = {init.name for init in prepared.model.graph.initializer}
    names: dict[str, None] = {}
    for node in prepared.model.graph.node:
        if node.op_type not in wanted or node.domain or node.name in masks.float_only:
            continue
        for name in (*node.input, *node.output):
            if (
                name
                and name not in initializers
                and name in prepared.float_tensors
                and name in masks.signal
                and name not in masks.masked
            ):
                names[name] = None
    return list(names)


def _augmented(prepared: Prepared, tensors: list[str]) -> ort.InferenceSession:
    model = prepared.copy()
    present = {o.name for o in model.graph.output}
    value_info = {v.name: v for v in (*model.graph.value_info, *model.graph.input)}
    for name in tensors:
        if name not in present:
            model.graph.output.append(value_info.get(name) or onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    # Basic optimizations only: fusions at higher levels would hide the tensors we asked for.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's pybind errors carry the reason in their text only
        raise CalibrationError(
            f"ONNX Runtime could not load the model with {len(tensors)} activations added as outputs for "
            f"calibration: {_line(exc)}. Use approach='dynamic', or exclude the ops reading the tensor ORT names."
        ) from exc


def _run(session: ort.InferenceSession, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """One augmented-graph run (a seam tests count to prove calibration runs once)."""
    return session.run(names, feeds)


def collect(prepared: Prepared, dataset: Dataset, tensors: list[str], *, samples: int) -> OnnxCalibration:
    """Run up to ``samples`` samples of ``dataset`` through the augmented graph into fresh observers.

    Raises:
        DatasetError: the dataset is empty, or a batch does not fit the model's inputs.
        CalibrationError: an activation holds NaN or Inf, or nothing was observed.
    """
    if not tensors:
        raise CalibrationError(
            "Calibration found no float activation to observe: no node of a quantizable type reads or writes a "
            "float32 tensor with a known type. Check the model's op types against inc.describe(model)."
        )
    session = _augmented(prepared, tensors)
    limits = input_limits(prepared.model)
    observers = {name: HistogramObserver(name=name) for name in tensors}
    seen = batches = 0
    first: dict[str, np.ndarray] | None = None
    bar = _progress(samples)
    try:
        for index, batch in enumerate(dataset.inputs(limit=samples)):
            feeds = to_feeds(batch, prepared.inputs, where=f"calibration batch {index}")
            limits.check(feeds, f"calibration batch {index}")
            try:
                outputs = _run(session, tensors, feeds)
            except Exception as exc:  # ORT's pybind errors carry the reason in their text only
                raise DatasetError(
                    f"calibration batch {index}: ONNX Runtime could not run the model on it: {_line(exc)}. "
                    f"The model's inputs are {', '.join(s.describe() for s in prepared.inputs)}."
                ) from exc
            for name, value in zip(tensors, outputs):
                check_finite_activation(name, value, index)
                observers[name].update(value)
            if first is None:
                first = feeds
            size = _batch_size(feeds)
            seen += size
            batches += 1
            if bar is not None:
                bar.update(size)
    finally:
        if bar is not None:
            bar.close()
    log.info("calibration: %d samples in %d batches, %d activations observed", seen, batches, len(tensors))
    return OnnxCalibration(digest=prepared.digest, observers=observers, samples=seen, batches=batches, sample=first)


def _batch_size(feeds: dict[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()))
    return int(first.shape[0]) if first.ndim else 1


def _progress(total: int) -> Any:
    if not log.isEnabledFor(logging.INFO):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total if math.isfinite(total) else None, desc="calibrating", unit="sample", leave=False)


def _line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:400]
