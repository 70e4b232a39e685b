"""Shared checks for the calibration math: tensor validation and NaN/Inf reporting."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from inc_core._checks import check_int
from inc_core.errors import CalibrationError, ConfigError

# Integer range of each activation/weight dtype, as ONNX QuantizeLinear saturates to it.
QRANGES: dict[str, tuple[int, int]] = {"int8": (-128, 127), "uint8": (0, 255)}
MIN_BINS = 16


def label(kind: str, name: str) -> str:
    """How an observer names itself in error messages: its class and, when known, the tensor it watches."""
    return f"{kind} {name!r}" if name else kind


def check_name(owner: str, name: Any) -> str:
    if not isinstance(name, str):
        raise ConfigError(f"{owner}: name must be a string (the tensor or op being observed), got {name!r}.")
    return name


def check_bins(owner: str, bins: Any) -> int:
    check_int(owner, "bins", bins, minimum=MIN_BINS)
    return int(bins)


def check_percentile(owner: str, percentile: Any) -> float:
    # Same bounds as QuantConfig.percentile, so a config value is always accepted here.
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 50.0 < percentile <= 100.0:
        raise ConfigError(f"{owner}: percentile must be a number in (50, 100], got {percentile!r} (e.g. 99.99).")
    return float(percentile)


def as_real_array(owner: str, x: Any, what: str = "activation") -> npt.NDArray[Any]:
    """``x`` as a numpy array of real numbers (bool, int or float); anything else is a CalibrationError."""
    try:
        arr = np.asarray(x)
    except Exception as exc:  # numpy raises many kinds for ragged or odd inputs; report them uniformly
        raise CalibrationError(
            f"{owner}: the {what} could not be read as a numpy array ({type(x).__name__}: {exc}). "
            "Pass a numpy array (convert framework tensors with .numpy() / np.asarray first)."
        ) from exc
    if arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating):
        return arr
    raise CalibrationError(
        f"{owner}: the {what} has dtype {arr.dtype}; expected a real numeric array (float, int or bool). "
        "Complex, string and object tensors cannot be calibrated; exclude the op that produces it."
    )


def finite_extrema(owner: str, arr: npt.NDArray[Any], what: str = "activation") -> tuple[float, float]:
    """Min and max of a non-empty array, raising CalibrationError when it holds NaN or Inf.

    NaN propagates through min/max and an infinity always shows up in one of them, so two
    reductions check the whole tensor; the elements are counted only to write the message.
    """
    lo = float(np.min(arr))
    hi = float(np.max(arr))
    if np.isfinite(lo) and np.isfinite(hi):
        return lo, hi
    raise non_finite_error(owner, arr, what)


def non_finite_error(owner: str, arr: npt.NDArray[Any], what: str = "activation") -> CalibrationError:
    n_nan = int(np.count_nonzero(np.isnan(arr)))
    n_inf = int(np.count_nonzero(np.isinf(arr)))
    if n_nan:
        found = f"{n_nan} NaN value(s)" + (f" and {n_inf} infinite value(s)" if n_inf else "")
        hint = "check the model's inputs and the calibration data for NaN (missing values, 0/0 in preprocessing)"
    else:
        found = f"{n_inf} infinite value(s)"
        hint = "check the calibration data's scale and the op for overflow (float16 inputs, unnormalized data)"
    return CalibrationError(
        f"{owner}: {what} holds {found} out of {arr.size} (shape {tuple(arr.shape)}); {hint}, "
        "or keep the op that produces it in FP32 with exclude=inc.LayerFilter(names=(...))."
    )


def normalize_axis(owner: str, axis: int, ndim: int, what: str, error: type[Exception] = ConfigError) -> int:
    """``axis`` as a non-negative index into a ``ndim``-d array, or ``error`` saying why it does not fit."""
    if not -ndim <= axis < ndim:
        raise error(
            f"{owner}: axis={axis} is out of range for the {ndim}-d {what}; expected -{ndim} <= axis < {ndim} "
            "(the channel axis of the tensor)."
        )
    return axis % ndim


def check_finite_activation(name: str, value: npt.NDArray[Any], batch: int) -> None:
    """Raise CalibrationError naming the tensor and the batch when a floating activation holds NaN or Inf.

    Backends call it on each activation they read during calibration, before feeding observers, so the
    message names the calibration batch to look at (an observer alone cannot know it).
    """
    if not np.issubdtype(value.dtype, np.floating) or np.all(np.isfinite(value)):
        return
    kind = "NaN" if np.isnan(value).any() else "Inf"
    raise CalibrationError(
        f"Activation {name!r} holds {kind} at calibration batch {batch}; quantization ranges would be meaningless. "
        "Check the calibration data (NaN/Inf or unnormalized inputs) and the model's numerics (e.g. log or division "
        "of zero) on this batch."
    )
