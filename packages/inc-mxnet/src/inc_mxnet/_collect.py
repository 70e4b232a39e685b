"""Activation statistics, collected once from the fused FP32 graph with its internals as outputs.

Every float tensor of the fused graph (the inputs and each node's output) streams into its own
histogram observer. That is a superset of what any trial's quantization pass asks for: an excluded
layer only changes *which* of these tensors get a quantize node, never which tensors exist, so every
calibration method and every fallback set is answered without running the model again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import mxnet as mx
import numpy as np

from inc_core import Dataset
from inc_core.calibration import HistogramObserver, check_finite_activation
from inc_core.errors import DatasetError
from inc_mxnet._blocks import symbol_block, to_ndarrays
from inc_mxnet._graph import Prepared

__all__ = ["MxnetCalibration", "collect", "observed_tensors"]

log = logging.getLogger("inc")


@dataclass(eq=False)
class MxnetCalibration:
    """Activation statistics of one block, reusable by every trial and calibration method.

    Attributes:
        digest: content hash of the block (symbol and parameters) the statistics belong to.
        observers: one histogram observer per tensor of the fused graph.
        samples: how many samples were fed.
        batches: how many batches were fed.
    """

    digest: str
    observers: dict[str, HistogramObserver] = field(repr=False)
    samples: int
    batches: int
    probe: Any = field(default=None, repr=False)  # the first batch, on which the quantized block is run once

    def range(self, tensor: str, method: str, *, percentile: float, dtype: str, scheme: str) -> tuple[float, float]:
        """The (lo, hi) a calibration method picks for ``tensor`` (the observer memoizes each answer)."""
        low, high = self.observers[tensor].range(method, percentile=percentile, dtype=dtype, scheme=scheme)
        return float(low), float(high)

    def is_signed(self, tensor: str) -> bool:
        """Whether ``tensor`` took negative values on the calibration data."""
        return self.observers[tensor].min < 0.0


def observed_tensors(prepared: Prepared) -> list[str]:
    """The inputs and every op output of the fused graph (parameters left out)."""
    params = set(prepared.params)
    return [n for n in prepared.fused.get_internals().list_outputs() if n not in params]


def _run(block: Any, arrays: list[mx.nd.NDArray]) -> list[np.ndarray]:
    """One run of the internals graph (a seam tests count to prove calibration runs once)."""
    outputs = block(*arrays)
    if isinstance(outputs, mx.nd.NDArray):
        outputs = [outputs]
    return [o.asnumpy() for o in outputs]


def collect(prepared: Prepared, dataset: Dataset, *, samples: int) -> MxnetCalibration:
    """Run up to ``samples`` samples of ``dataset`` through the fused graph into fresh observers.

    Raises:
        DatasetError: the dataset is empty, or a batch does not fit the block's inputs.
        CalibrationError: an activation holds NaN or Inf.
    """
    tensors = observed_tensors(prepared)
    internals = prepared.fused.get_internals()
    block = symbol_block(mx.sym.Group([internals[n] for n in tensors]), prepared.inputs, prepared.params)
    observers: dict[str, HistogramObserver] = {}
    seen = batches = 0
    probe = None
    bar = _progress(samples)
    try:
        for index, batch in enumerate(dataset.inputs(limit=samples)):
            arrays = to_ndarrays(batch, prepared.inputs, where=f"calibration batch {index}")
            probe = batch if probe is None else probe
            try:
                outputs = _run(block, arrays)
            except mx.base.MXNetError as exc:  # shape/type inference failures surface on asnumpy()
                shapes = [tuple(a.shape) for a in arrays]
                raise DatasetError(
                    f"calibration batch {index}: MXNet could not run the block on inputs of shape(s) {shapes}: "
                    f"{_line(exc)}. Give batches shaped as the block expects (batch axis first, e.g. what you "
                    "pass to net(x) for inference)."
                ) from exc
            for name, value in zip(tensors, outputs):
                if not np.issubdtype(value.dtype, np.floating):
                    continue
                check_finite_activation(name, value, index)
                observers.setdefault(name, HistogramObserver(name=name)).update(value)
            size = int(arrays[0].shape[0])
            seen += size
            batches += 1
            if bar is not None:
                bar.update(size)
    finally:
        if bar is not None:
            bar.close()
    log.info("calibration: %d samples in %d batches, %d tensors observed", seen, batches, len(observers))
    return MxnetCalibration(digest=prepared.digest, observers=observers, samples=seen, batches=batches, probe=probe)


def _progress(total: int) -> Any:
    if not log.isEnabledFor(logging.INFO):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="calibrating", unit="sample", leave=False)


def _line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip() and not ln.startswith("Stack trace")]
    return (lines[0] if lines else type(exc).__name__)[:400]
