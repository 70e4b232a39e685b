"""Quantization parameters and (fake) quantization: the single definition every backend tests against.

Conventions (those of ONNX ``QuantizeLinear``/``DequantizeLinear`` and x86 INT8 kernels):

* ``q = saturate(round_half_to_even(x / scale) + zero_point)``, ``x' = (q - zero_point) * scale``,
  computed in float32 with a float32 scale.
* The quantized range always includes real 0, so zero padding and ReLU zeros are exact.
* Symmetric: ``scale = amax / 127``; the zero point is 0 for int8 and 128 for uint8 (uint8 is the
  int8 grid shifted by 128, so both cover ``[-amax, amax]``).
* Asymmetric: ``scale = (hi - lo) / 255`` and an integer zero point in the dtype's range.
* A zero-width range (all zeros) gets ``scale = 1``; other scales are floored (``min_scale``) so that
  ``1 / scale`` and the requantization multipliers kernels derive from it stay finite. The default,
  float32 epsilon, is torch.ao's floor; ONNX Runtime's own quantizer floors at float32 ``tiny`` instead, which
  keeps all 255 steps for tensors whose whole range is below ~3e-5 (see the onnx backend).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from inc_core._checks import check_choice
from inc_core._quant_config import DTYPES, SCHEMES
from inc_core.calibration._common import QRANGES, as_real_array, non_finite_error, normalize_axis
from inc_core.errors import CalibrationError, ConfigError

__all__ = ["QParams", "compute_qparams", "quantize", "dequantize", "fake_quantize", "weight_qparams"]

SYM_LEVELS = 127
MIN_SCALE = float(np.finfo(np.float32).eps)


def affine(
    lo: npt.ArrayLike, hi: npt.ArrayLike, dtype: str, scheme: str, *, min_scale: float = MIN_SCALE
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]:
    """Scale and zero point for validated ranges (scalars or arrays of equal shape); no checks here."""
    qmin, qmax = QRANGES[dtype]
    lo_a = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi_a = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if scheme == "sym":
        amax = np.maximum(-lo_a, hi_a)
        scale = np.where(amax > 0, np.maximum(amax / SYM_LEVELS, min_scale), 1.0).astype(np.float32)
        zp = np.full(amax.shape, 0 if dtype == "int8" else 128, dtype=np.int32)
        return scale, zp
    width = hi_a - lo_a
    scale = np.where(width > 0, np.maximum(width / (qmax - qmin), min_scale), 1.0).astype(np.float32)
    # The zero point comes from the float32 scale actually stored, so real 0 maps exactly to it.
    zp = np.clip(np.rint(qmin - lo_a / scale.astype(np.float64)), qmin, qmax).astype(np.int32)
    return scale, zp


@dataclass(frozen=True, kw_only=True, eq=False)
class QParams:
    """Scale and zero point of one quantized tensor, per tensor or per channel.

    Args:
        scale: positive float32 scale(s); a 0-d array per tensor, shape ``(C,)`` per channel.
        zero_point: integer zero point(s) of the same shape, inside ``dtype``'s range. Stored as int32;
            ``zero_point.astype(qp.np_dtype)`` gives what an ONNX ``QuantizeLinear`` node stores.
        dtype: ``"int8"`` or ``"uint8"``.
        axis: the channel axis for per-channel parameters, ``None`` per tensor.
    """

    scale: npt.NDArray[np.float32]
    zero_point: npt.NDArray[np.int32]
    dtype: str
    axis: int | None = None

    def __post_init__(self) -> None:
        owner = "QParams"
        check_choice(owner, "dtype", self.dtype, DTYPES)
        if self.axis is not None and (isinstance(self.axis, bool) or not isinstance(self.axis, int)):
            raise ConfigError(f"{owner}: axis must be an int (the channel axis) or None, got {self.axis!r}.")
        scale_raw, zp_raw = np.asarray(self.scale), np.asarray(self.zero_point)
        if not (np.issubdtype(scale_raw.dtype, np.integer) or np.issubdtype(scale_raw.dtype, np.floating)):
            raise ConfigError(f"{owner}: scale must hold numbers, got {scale_raw!r} (dtype {scale_raw.dtype}).")
        integral = np.issubdtype(zp_raw.dtype, np.integer) or (
            np.issubdtype(zp_raw.dtype, np.floating) and np.array_equal(zp_raw, np.rint(zp_raw))
        )
        if not integral:
            raise ConfigError(f"{owner}: zero_point must hold integers, got {zp_raw!r} (dtype {zp_raw.dtype}).")
        scale = scale_raw.astype(np.float64)
        if scale.shape != zp_raw.shape:
            raise ConfigError(
                f"{owner}: scale has shape {scale.shape} but zero_point has shape {zp_raw.shape}; they must match."
            )
        expected_ndim = 0 if self.axis is None else 1
        if scale.ndim != expected_ndim or (expected_ndim == 1 and scale.size == 0):
            kind = (
                "per-tensor (axis=None): 0-d arrays"
                if self.axis is None
                else f"per-channel (axis={self.axis}): 1-d arrays, one value per channel"
            )
            raise ConfigError(f"{owner}: scale has shape {scale.shape}; expected {kind}.")
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise ConfigError(f"{owner}: scale must be finite and > 0, got {scale.tolist()!r}.")
        qmin, qmax = QRANGES[self.dtype]
        if np.any(zp_raw < qmin) or np.any(zp_raw > qmax):
            raise ConfigError(
                f"{owner}: zero_point {zp_raw.tolist()!r} is outside the {self.dtype} range [{qmin}, {qmax}]."
            )
        object.__setattr__(self, "scale", scale.astype(np.float32))
        object.__setattr__(self, "zero_point", zp_raw.astype(np.int32))

    @property
    def qmin(self) -> int:
        """Smallest integer of ``dtype``."""
        return QRANGES[self.dtype][0]

    @property
    def qmax(self) -> int:
        """Largest integer of ``dtype``."""
        return QRANGES[self.dtype][1]

    @property
    def np_dtype(self) -> type[np.integer[Any]]:
        """The numpy integer type of quantized values (``np.int8`` or ``np.uint8``)."""
        return np.int8 if self.dtype == "int8" else np.uint8

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QParams):
            return NotImplemented
        return (
            self.dtype == other.dtype
            and self.axis == other.axis
            and np.array_equal(self.scale, other.scale)
            and np.array_equal(self.zero_point, other.zero_point)
        )

    def __hash__(self) -> int:
        return hash((self.dtype, self.axis, self.scale.tobytes(), self.zero_point.tobytes()))

    def __repr__(self) -> str:
        return (
            f"QParams(scale={self.scale.tolist()!r}, zero_point={self.zero_point.tolist()!r}, "
            f"dtype={self.dtype!r}, axis={self.axis!r})"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; :meth:`from_dict` restores the exact float32 scales."""
        return {
            "scale": self.scale.tolist(),
            "zero_point": self.zero_point.tolist(),
            "dtype": self.dtype,
            "axis": self.axis,
        }

    @classmethod
    def from_dict(cls, data: Any) -> QParams:
        """Rebuild from :meth:`to_dict` output (validated like the constructor)."""
        if not isinstance(data, dict) or set(data) != {"scale", "zero_point", "dtype", "axis"}:
            raise ConfigError(
                f"QParams.from_dict expects a dict with keys scale, zero_point, dtype, axis; got {data!r}."
            )
        return cls(
            scale=np.asarray(data["scale"]),
            zero_point=np.asarray(data["zero_point"]),
            dtype=data["dtype"],
            axis=data["axis"],
        )


def compute_qparams(
    lo: npt.ArrayLike,
    hi: npt.ArrayLike,
    *,
    dtype: str,
    scheme: str,
    axis: int | None = None,
    min_scale: float = MIN_SCALE,
) -> QParams:
    """Scale and zero point that map the range ``[lo, hi]`` (widened to include 0) onto ``dtype``.

    Args:
        lo: range minimum: a scalar, or one value per channel.
        hi: range maximum, same shape as ``lo``.
        dtype: ``"int8"`` or ``"uint8"``.
        scheme: ``"sym"`` (zero point 0 for int8, 128 for uint8) or ``"asym"``.
        axis: the channel axis when ``lo``/``hi`` hold one value per channel; ``None`` for scalars.
        min_scale: the smallest scale returned for a non-empty range (a positive float32 number).

    Returns:
        The :class:`QParams`.

    Raises:
        ConfigError: unknown dtype/scheme, ``lo > hi``, shapes that do not match ``axis``.
        CalibrationError: a NaN or infinite bound (the observer saw no usable data).
    """
    owner = "compute_qparams"
    check_choice(owner, "dtype", dtype, DTYPES)
    check_choice(owner, "scheme", scheme, SCHEMES)
    lo_a = as_real_array(owner, lo, "lo").astype(np.float64)
    hi_a = as_real_array(owner, hi, "hi").astype(np.float64)
    if lo_a.shape != hi_a.shape:
        raise ConfigError(f"{owner}: lo has shape {lo_a.shape} but hi has shape {hi_a.shape}; they must match.")
    if lo_a.ndim > 1 or (lo_a.ndim == 1 and lo_a.size == 0):
        raise ConfigError(f"{owner}: lo/hi have shape {lo_a.shape}; expected scalars or 1-d per-channel arrays.")
    if lo_a.ndim == 1 and axis is None:
        raise ConfigError(
            f"{owner}: lo/hi hold {lo_a.size} per-channel values but axis is None; pass axis= (the channel axis)."
        )
    if lo_a.ndim == 0 and axis is not None:
        raise ConfigError(f"{owner}: axis={axis} was given for a per-tensor (scalar) range; pass axis=None.")
    for bound, arr in (("lo", lo_a), ("hi", hi_a)):
        if not np.all(np.isfinite(arr)):
            raise CalibrationError(
                f"{owner}: {bound}={arr.tolist()!r} is not finite; the range must come from finite calibration data."
            )
    if np.any(lo_a > hi_a):
        raise ConfigError(f"{owner}: lo={lo_a.tolist()!r} exceeds hi={hi_a.tolist()!r}; expected lo <= hi.")
    if not (np.isfinite(min_scale) and np.float32(min_scale) > 0):
        raise ConfigError(f"{owner}: min_scale={min_scale!r}; expected a positive float32 number (e.g. {MIN_SCALE}).")
    scale, zp = affine(lo_a, hi_a, dtype, scheme, min_scale=min_scale)
    return QParams(scale=scale, zero_point=zp, dtype=dtype, axis=axis)


def weight_qparams(w: npt.ArrayLike, *, axis: int | None = None, dtype: str = "int8") -> QParams:
    """Symmetric min/max parameters of a weight tensor, per tensor or per channel along ``axis``.

    Raises:
        ConfigError: unknown dtype, empty weight, ``axis`` out of range.
        CalibrationError: the weight holds NaN or Inf.
    """
    owner = "weight_qparams"
    check_choice(owner, "dtype", dtype, DTYPES)
    arr = as_real_array(owner, w, "weight").astype(np.float64)
    if arr.size == 0:
        raise ConfigError(f"{owner}: the weight is empty (shape {arr.shape}); nothing to quantize.")
    if not np.all(np.isfinite(arr)):
        raise non_finite_error(owner, arr, "weight")
    if axis is None:
        amax: npt.NDArray[np.float64] = np.asarray(np.max(np.abs(arr)))
    else:
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ConfigError(f"{owner}: axis must be an int (the output-channel axis) or None, got {axis!r}.")
        ax = normalize_axis(owner, axis, arr.ndim, "weight")
        amax = np.abs(np.moveaxis(arr, ax, 0)).reshape(arr.shape[ax], -1).max(axis=1)
    scale, zp = affine(-amax, amax, dtype, "sym")
    return QParams(scale=scale, zero_point=zp, dtype=dtype, axis=axis)


def _broadcast(
    owner: str, qp: QParams, shape: tuple[int, ...]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]:
    """Scale and zero point shaped to broadcast against a tensor of ``shape``."""
    if not isinstance(qp, QParams):
        raise ConfigError(f"{owner}: qp must be an inc_core.calibration.QParams, got {type(qp).__name__}.")
    if qp.axis is None:
        return qp.scale, qp.zero_point
    ax = normalize_axis(owner, qp.axis, len(shape), "tensor")
    if shape[ax] != qp.scale.size:
        raise ConfigError(
            f"{owner}: the tensor has {shape[ax]} channels along axis {qp.axis} (shape {shape}) "
            f"but the QParams hold {qp.scale.size}; use the parameters computed for this tensor."
        )
    view = [1] * len(shape)
    view[ax] = -1
    return qp.scale.reshape(view), qp.zero_point.reshape(view)


def quantize(x: npt.ArrayLike, qp: QParams) -> npt.NDArray[Any]:
    """``saturate(round_half_to_even(x / scale) + zero_point)`` as ``qp.np_dtype``; infinities saturate.

    Raises:
        CalibrationError: ``x`` holds NaN (its quantized value would be undefined).
        ConfigError: per-channel ``qp`` that does not match ``x``'s shape.
    """
    owner = "quantize"
    arr = as_real_array(owner, x, "input").astype(np.float32)
    scale, zp = _broadcast(owner, qp, arr.shape)
    if np.isnan(arr).any():
        raise non_finite_error(owner, arr, "input")
    with np.errstate(over="ignore"):  # huge values overflow to inf, which then saturates like ONNX does
        q = np.rint(arr / scale) + zp
    return np.clip(q, qp.qmin, qp.qmax).astype(qp.np_dtype)


def dequantize(q: npt.ArrayLike, qp: QParams) -> npt.NDArray[np.float32]:
    """``(q - zero_point) * scale`` in float32.

    Raises:
        ConfigError: ``q`` does not hold integers, or per-channel ``qp`` does not match its shape.
    """
    owner = "dequantize"
    arr = np.asarray(q)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"{owner}: q must hold integers (the output of quantize), got dtype {arr.dtype}.")
    scale, zp = _broadcast(owner, qp, arr.shape)
    return ((arr.astype(np.int32) - zp).astype(np.float32) * scale).astype(np.float32)


def fake_quantize(x: npt.ArrayLike, qp: QParams) -> npt.NDArray[np.float32]:
    """``dequantize(quantize(x, qp), qp)``: what the INT8 model computes in place of ``x``."""
    return dequantize(quantize(x, qp), qp)
