"""MinMaxObserver: running minimum and maximum, per tensor or per channel."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from inc_core.calibration._common import as_real_array, check_name, finite_extrema, label, normalize_axis
from inc_core.errors import CalibrationError, ConfigError

__all__ = ["MinMaxObserver"]

_STATE_VERSION = 1


class MinMaxObserver:
    """Running min/max over every batch: ``range()`` equals the min/max of all the data at once.

    Args:
        axis: ``None`` for one range per tensor, or the channel axis for one range per channel
            (every batch must then have the same number of channels on that axis).
        name: the tensor or op observed, used in error messages.
    """

    method = "minmax"

    def __init__(self, axis: int | None = None, *, name: str = "") -> None:
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise ConfigError(f"MinMaxObserver: axis must be an int (the channel axis) or None, got {axis!r}.")
        self.axis = axis
        self.name = check_name("MinMaxObserver", name)
        self._min: npt.NDArray[np.float64] | None = None
        self._max: npt.NDArray[np.float64] | None = None

    @property
    def _label(self) -> str:
        return label(type(self).__name__, self.name)

    def update(self, x: Any) -> None:
        """Fold one batch into the running range; empty batches are ignored.

        Raises:
            CalibrationError: ``x`` holds NaN/Inf, is not numeric, lacks the channel axis, or its number
                of channels differs from earlier batches.
        """
        arr = as_real_array(self._label, x)
        if arr.size == 0:
            return
        lo, hi = finite_extrema(self._label, arr)
        if self.axis is None:
            batch_min, batch_max = np.asarray(lo), np.asarray(hi)
        else:
            ax = normalize_axis(self._label, self.axis, arr.ndim, "activation", CalibrationError)
            channels = np.moveaxis(arr, ax, 0).reshape(arr.shape[ax], -1)
            batch_min, batch_max = channels.min(axis=1), channels.max(axis=1)
            if self._min is not None and self._min.shape != batch_min.shape:
                raise CalibrationError(
                    f"{self._label}: this batch has {batch_min.size} channels on axis {self.axis} (shape "
                    f"{arr.shape}) but earlier batches had {self._min.size}; per-channel observation needs the "
                    "same channel count in every batch."
                )
        batch_min = batch_min.astype(np.float64)
        batch_max = batch_max.astype(np.float64)
        if self._min is None or self._max is None:
            self._min, self._max = batch_min, batch_max
        else:
            self._min = np.minimum(self._min, batch_min)
            self._max = np.maximum(self._max, batch_max)

    def range(self) -> tuple[Any, Any]:
        """``(min, max)``: floats per tensor, float64 arrays of shape ``(C,)`` per channel.

        Raises:
            CalibrationError: nothing was observed yet.
        """
        if self._min is None or self._max is None:
            raise CalibrationError(
                f"{self._label}: no data was observed; range() needs at least one update() with a non-empty "
                "tensor. Check that the calibration dataset is not empty and that this op runs on it."
            )
        if self.axis is None:
            return float(self._min), float(self._max)
        return self._min.copy(), self._max.copy()

    def merge(self, other: MinMaxObserver) -> MinMaxObserver:
        """Fold another observer's range into this one (e.g. from a parallel worker); returns ``self``."""
        if not isinstance(other, MinMaxObserver) or other.axis != self.axis:
            raise ConfigError(f"{self._label}.merge expects a MinMaxObserver with axis={self.axis!r}, got {other!r}.")
        if other._min is not None and other._max is not None:
            if self._min is not None and self._min.shape != other._min.shape:
                raise CalibrationError(
                    f"{self._label}.merge: channel counts differ ({self._min.size} vs {other._min.size})."
                )
            self._min = other._min.copy() if self._min is None else np.minimum(self._min, other._min)
            self._max = other._max.copy() if self._max is None else np.maximum(self._max, other._max)
        return self

    def __repr__(self) -> str:
        return f"MinMaxObserver(axis={self.axis!r}, name={self.name!r})"

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state; :meth:`from_state` rebuilds an identical observer."""
        return {
            "kind": "minmax",
            "version": _STATE_VERSION,
            "name": self.name,
            "axis": self.axis,
            "min": None if self._min is None else self._min.tolist(),
            "max": None if self._max is None else self._max.tolist(),
        }

    @classmethod
    def from_state(cls, state: Any) -> MinMaxObserver:
        """Rebuild from :meth:`state_dict` output.

        Raises:
            ConfigError: the state is not a min/max observer's, or is inconsistent.
        """
        keys = {"kind", "version", "name", "axis", "min", "max"}
        if not isinstance(state, dict) or set(state) != keys or state["kind"] != "minmax":
            raise ConfigError(f"MinMaxObserver.from_state expects a dict from state_dict() with keys {sorted(keys)}.")
        if state["version"] != _STATE_VERSION:
            raise ConfigError(f"MinMaxObserver.from_state: state version {state['version']!r} is not supported.")
        obs = cls(state["axis"], name=state["name"])
        if (state["min"] is None) != (state["max"] is None):
            raise ConfigError("MinMaxObserver.from_state: min and max must both be set or both be None.")
        if state["min"] is not None:
            try:
                lo = np.asarray(state["min"], dtype=np.float64)
                hi = np.asarray(state["max"], dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"MinMaxObserver.from_state: malformed min/max ({exc}).") from exc
            expected_ndim = 0 if obs.axis is None else 1
            if (
                lo.shape != hi.shape
                or lo.ndim != expected_ndim
                or not np.all(np.isfinite(lo) & np.isfinite(hi) & (lo <= hi))
            ):
                raise ConfigError("MinMaxObserver.from_state: min/max are inconsistent with axis or each other.")
            obs._min, obs._max = lo, hi
        return obs
