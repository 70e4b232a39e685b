"""Calibration math: quantization parameters, fake quantization and streaming range observers.

This is the single numpy definition of the math every backend uses and tests against::

    from inc_core.calibration import HistogramObserver, compute_qparams, fake_quantize

    obs = HistogramObserver(name="conv1.out")
    for batch in activations:            # any number of batches, memory stays bounded
        obs.update(batch)
    lo, hi = obs.range("kl", scheme="asym", dtype="uint8")   # or "minmax", "percentile", "mse"
    qp = compute_qparams(lo, hi, dtype="uint8", scheme="asym")
    y = fake_quantize(x, qp)             # what the INT8 model computes in place of x

``make_observer(config.calibration, ...)`` gives an observer for one method; weights use
:func:`weight_qparams` (symmetric, per tensor or per channel).
"""

from __future__ import annotations

from inc_core.calibration._common import check_finite_activation
from inc_core.calibration._histogram import HistogramObserver
from inc_core.calibration._minmax import MinMaxObserver
from inc_core.calibration._observers import (
    KLObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
    observer_from_state,
)
from inc_core.calibration._qparams import (
    QParams,
    compute_qparams,
    dequantize,
    fake_quantize,
    quantize,
    weight_qparams,
)
from inc_core.calibration._token_inputs import check_no_empty_samples, check_sequence_length, check_token_ids

__all__ = [
    "HistogramObserver",
    "KLObserver",
    "MSEObserver",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "QParams",
    "check_finite_activation",
    "check_no_empty_samples",
    "check_sequence_length",
    "check_token_ids",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "make_observer",
    "observer_from_state",
    "quantize",
    "weight_qparams",
]
