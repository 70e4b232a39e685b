"""SmoothQuant: the per-channel scales that move activation outliers into the weights.

Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models" (2022). For a linear layer ``Y = X @ W`` (``W`` laid out ``[in, out]``), each input channel
``j`` gets a scale::

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

and the layer computes the same product as ``(X / s) @ (diag(s) W)``. A channel whose activations
are 50x larger than the others stops setting the per-tensor activation range alone; its weight row
grows instead, and per-channel weight quantization absorbs that. ``alpha`` sets how much of the
difficulty moves: 0 keeps the activations as they are, 1 moves all of it to the weights.

The backends fold ``1 / s`` into the op that produces ``X`` (a LayerNorm's gamma and beta) so the
FP32 model computes exactly what it did; this module is the one definition of the scales they use.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from inc_core.errors import CalibrationError, ConfigError

__all__ = [
    "ChannelAbsMax",
    "check_alpha",
    "input_channel_absmax",
    "smooth_scales",
]

# Below this an activation channel or weight row is treated as empty: it carries no outlier to move,
# and dividing by it would only blow the scale up.
TINY = 1e-5
# Bounds on a scale, so one degenerate channel cannot push its weights or activations out of float range.
SCALE_MIN, SCALE_MAX = 1e-4, 1e4


def check_alpha(owner: str, alpha: object) -> float:
    """``alpha`` as a float in [0, 1], or a ConfigError saying what was given."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha) or not 0.0 <= alpha <= 1.0:
        raise ConfigError(
            f"{owner}: alpha must be a number in [0, 1] (the share of activation range moved into the weights; "
            f"0.5 is the usual choice), got {alpha!r}."
        )
    return float(alpha)


def input_channel_absmax(weights: Sequence[np.ndarray], in_axis: int = 0) -> np.ndarray:
    """Per input channel, the largest ``|w|`` over every output of every weight sharing that input.

    Several layers reading the same activation (query, key and value projections after one
    LayerNorm) must share one scale, so their weights are reduced together.

    Args:
        weights: weight arrays with the same number of input channels along ``in_axis``.
        in_axis: the input-channel axis (0 for an ONNX MatMul ``[in, out]``, 1 for a torch Linear ``[out, in]``).

    Raises:
        ValueError: no weights, or weights disagreeing on the number of input channels.
    """
    if not weights:
        raise ValueError("input_channel_absmax needs at least one weight.")
    reduced = []
    for weight in weights:
        array = np.abs(np.asarray(weight, dtype=np.float64))
        moved = np.moveaxis(array, in_axis, 0).reshape(array.shape[in_axis], -1)
        reduced.append(moved.max(axis=1))
    sizes = {r.shape[0] for r in reduced}
    if len(sizes) != 1:
        raise ValueError(f"input_channel_absmax: the weights disagree on the number of input channels: {sorted(sizes)}.")
    return np.max(np.stack(reduced), axis=0)


def smooth_scales(activation_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """The SmoothQuant scale of each input channel: ``max|X_j|^alpha / max|W_j|^(1-alpha)``.

    A channel whose activation or weight maximum is below :data:`TINY` keeps scale 1 (there is
    nothing to move, and its scale would be meaningless); the others are clipped to
    [:data:`SCALE_MIN`, :data:`SCALE_MAX`].

    Args:
        activation_absmax: per input channel, the largest ``|x|`` seen in calibration.
        weight_absmax: per input channel, the largest ``|w|`` (see :func:`input_channel_absmax`).
        alpha: migration strength in [0, 1].

    Returns:
        float32 scales, one per channel: divide the activations by them, multiply the weights' input rows.

    Raises:
        ConfigError: ``alpha`` outside [0, 1].
        CalibrationError: the two vectors differ in length, or hold NaN/Inf.
    """
    alpha = check_alpha("smooth_scales", alpha)
    act = np.asarray(activation_absmax, dtype=np.float64).reshape(-1)
    wgt = np.asarray(weight_absmax, dtype=np.float64).reshape(-1)
    if act.shape != wgt.shape:
        raise CalibrationError(
            f"SmoothQuant: {act.size} activation channels but {wgt.size} weight input channels; the layer's "
            "input and weight do not match."
        )
    if not (np.isfinite(act).all() and np.isfinite(wgt).all()):
        raise CalibrationError("SmoothQuant: the activation or weight maxima hold NaN or Inf; no scale can be computed.")
    act, wgt = np.abs(act), np.abs(wgt)
    live = (act >= TINY) & (wgt >= TINY)
    scales = np.ones_like(act)
    scales[live] = np.power(act[live], alpha) / np.power(wgt[live], 1.0 - alpha)
    return np.clip(scales, SCALE_MIN, SCALE_MAX).astype(np.float32)


class ChannelAbsMax:
    """Streaming per-channel ``max|x|`` along the last axis (the channel axis of a linear layer's input).

    Args:
        name: the tensor observed, for error messages.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.absmax: np.ndarray | None = None
        self.batches = 0

    def update(self, value: np.ndarray) -> None:
        """Fold one batch in (every axis but the last is reduced).

        Raises:
            CalibrationError: NaN/Inf in the batch, or a channel count that changed between batches.
        """
        array = np.abs(np.asarray(value, dtype=np.float32))
        if array.ndim == 0:
            raise CalibrationError(f"SmoothQuant: activation {self.name!r} is a scalar; it has no channels to smooth.")
        current = array.reshape(-1, array.shape[-1]).max(axis=0) if array.size else np.zeros(array.shape[-1], np.float32)
        if not np.isfinite(current).all():
            raise CalibrationError(
                f"SmoothQuant: activation {self.name!r} holds NaN or Inf at calibration batch {self.batches}; "
                "check the calibration data, or keep SmoothQuant off for this model."
            )
        if self.absmax is None:
            self.absmax = current
        elif self.absmax.shape != current.shape:
            raise CalibrationError(
                f"SmoothQuant: activation {self.name!r} had {self.absmax.shape[0]} channels, then {current.shape[0]} "
                f"at calibration batch {self.batches}; its last axis must be the layer's input channels."
            )
        else:
            np.maximum(self.absmax, current, out=self.absmax)
        self.batches += 1

    def result(self) -> np.ndarray:
        """The per-channel maxima so far.

        Raises:
            CalibrationError: nothing was observed.
        """
        if self.absmax is None:
            raise CalibrationError(f"SmoothQuant: no calibration batch reached activation {self.name!r}.")
        return self.absmax.copy()
