"""HistogramObserver: one bounded-memory histogram per tensor that answers every calibration method."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from inc_core._checks import check_choice
from inc_core._quant_config import CALIBRATIONS, DTYPES, SCHEMES
from inc_core.calibration._common import (
    as_real_array,
    check_bins,
    check_name,
    check_percentile,
    finite_extrema,
    label,
)
from inc_core.calibration._search import HistData, kl_range, mse_range, percentile_range
from inc_core.errors import CalibrationError, ConfigError

__all__ = ["HistogramObserver"]

# Elements binned per step, so a huge activation never needs more than a few MB of temporaries.
_CHUNK = 1 << 20
_STATE_VERSION = 1


def _floordiv(values: npt.NDArray[np.int64], k: int) -> npt.NDArray[np.int64]:
    # A factor beyond int64 can only come from a range jump of many orders of magnitude; every
    # existing bin then lands in the new bin 0 or -1 (the grid always holds zero).
    if k < 2**62:
        return np.floor_divide(values, np.int64(k))
    return np.where(values >= 0, 0, -1).astype(np.int64)


class HistogramObserver:
    """Streams batches into one histogram of fixed size plus the exact running min and max.

    The grid is anchored at zero (bin ``a`` covers ``[a*w, (a+1)*w)``) and always contains zero.
    When a batch falls outside it, the bin width grows by the smallest integer factor that covers the
    old and new data, and old bins are merged whole into new ones: counts are never split, so the
    histogram stays exact up to its resolution however the range grows. Memory is ``bins`` integers.

    One calibration pass answers every method of :meth:`range`, so tuning trials that change the
    method, dtype or scheme reuse it without re-running the model.

    Args:
        bins: number of histogram bins (>= 16). The data spans between ``bins / 2`` and ``bins`` of them.
        name: the tensor or op observed, used in error messages.
    """

    def __init__(self, bins: int = 2048, *, name: str = "") -> None:
        self._bins = check_bins("HistogramObserver", bins)
        self.name = check_name("HistogramObserver", name)
        self._counts: npt.NDArray[np.int64] | None = None
        self._start = 0
        self._width = 0.0
        self._min = math.inf
        self._max = -math.inf
        self._count = 0
        self._zeros = 0  # exact zeros seen before any non-zero value fixed the grid
        self._cache: dict[tuple[Any, ...], tuple[float, float]] = {}

    # --- read-only state --------------------------------------------------------------------
    @property
    def _label(self) -> str:
        return label(type(self).__name__, self.name)

    @property
    def bins(self) -> int:
        """Number of bins (constant for the observer's life)."""
        return self._bins

    @property
    def count(self) -> int:
        """Number of elements observed."""
        return self._count

    @property
    def bin_width(self) -> float:
        """Current bin width (0.0 while only zeros have been seen)."""
        return self._width

    @property
    def min(self) -> float:
        """Exact minimum of everything observed."""
        self._require_data()
        return self._min

    @property
    def max(self) -> float:
        """Exact maximum of everything observed."""
        self._require_data()
        return self._max

    def histogram(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """Copies of the counts (``bins`` of them) and the ``bins + 1`` edges."""
        if self._counts is None:
            counts = np.zeros(self._bins, dtype=np.int64)
            counts[0] = self._zeros
            return counts, np.zeros(self._bins + 1)
        edges = (self._start + np.arange(self._bins + 1)).astype(np.float64) * self._width
        return self._counts.copy(), edges

    # --- streaming --------------------------------------------------------------------------
    def update(self, x: Any) -> None:
        """Add one batch (any shape); empty batches are ignored.

        Raises:
            CalibrationError: ``x`` holds NaN or Inf, or is not a real numeric array.
        """
        arr = as_real_array(self._label, x)
        if arr.size == 0:
            return
        lo, hi = finite_extrema(self._label, arr)
        self._cache.clear()
        self._min, self._max = min(self._min, lo), max(self._max, hi)
        self._count += arr.size
        if self._counts is None:
            if lo == 0.0 and hi == 0.0:
                self._zeros += arr.size
                return
            self._init_grid(lo, hi)
        else:
            self._cover(lo, hi)
        flat = arr.reshape(-1)
        for begin in range(0, flat.size, _CHUNK):
            self._add(flat[begin : begin + _CHUNK].astype(np.float64))

    def merge(self, other: HistogramObserver) -> HistogramObserver:
        """Add another observer's data (e.g. from a parallel calibration worker); returns ``self``.

        Bins of ``other`` are placed by their centres, which is exact when both grids share a width up to
        an integer factor (observers fed similar data) and otherwise within half a bin.
        """
        if not isinstance(other, HistogramObserver):
            raise ConfigError(f"{self._label}.merge expects a HistogramObserver, got {type(other).__name__}.")
        if other._count == 0:
            return self
        self._cache.clear()
        self._min, self._max = min(self._min, other._min), max(self._max, other._max)
        self._count += other._count
        zeros = other._zeros
        if other._counts is not None:
            nz = np.flatnonzero(other._counts)
            centers = (other._start + nz + 0.5) * other._width
            lo, hi = float(centers.min()), float(centers.max())
            if self._counts is None:
                self._init_grid(lo, hi)
            # Bins at least as wide as the other's first, so each of its bins lands whole in one of ours.
            if self._width < other._width:
                self._regrid(math.ceil(other._width / self._width))
            self._cover(lo, hi)
            assert self._counts is not None
            idx = np.clip(np.floor(centers / self._width).astype(np.int64) - self._start, 0, self._bins - 1)
            np.add.at(self._counts, idx, other._counts[nz])
        if self._counts is None:
            self._zeros += zeros
        else:
            self._counts[-self._start] += zeros
        return self

    def _require_data(self) -> None:
        if self._count == 0:
            raise CalibrationError(
                f"{self._label}: no data was observed; range() needs at least one update() with a non-empty "
                "tensor. Check that the calibration dataset is not empty and that this op runs on it."
            )

    def _init_grid(self, lo: float, hi: float) -> None:
        span = max(hi, 0.0) - min(lo, 0.0)
        if not math.isfinite(span):
            raise CalibrationError(
                f"{self._label}: the activation range [{lo:g}, {hi:g}] overflows float64; check the data's scale."
            )
        # bins - 1 leaves room for the floor() of both ends; the tiny margin absorbs rounding.
        self._width = max(span / (self._bins - 1) * (1 + 1e-12), np.finfo(np.float64).tiny)
        self._start = math.floor(min(lo, 0.0) / self._width)
        self._counts = np.zeros(self._bins, dtype=np.int64)
        self._cover(lo, hi)
        self._counts[-self._start] += self._zeros
        self._zeros = 0

    def _cover(self, lo: float, hi: float) -> None:
        """Widen the grid (integer factor, exact merge) until it covers zero, the data so far and [lo, hi]."""
        assert self._counts is not None
        w = self._width
        lo_q, hi_q = lo / w, hi / w
        if not (math.isfinite(lo_q) and math.isfinite(hi_q)):
            raise CalibrationError(
                f"{self._label}: a batch spans [{lo:g}, {hi:g}] while earlier ones fit bins of width {w:g}; "
                "ranges this far apart cannot share a histogram. Check the calibration data's scale."
            )
        nz = np.flatnonzero(self._counts)
        need_lo, need_hi = min(0, math.floor(lo_q)), max(0, math.floor(hi_q))
        if nz.size:
            need_lo = min(need_lo, self._start + int(nz[0]))
            need_hi = max(need_hi, self._start + int(nz[-1]))
        if need_lo >= self._start and need_hi < self._start + self._bins:
            return
        k = self._factor(need_lo, need_hi)
        self._regrid(k, need_lo)

    def _factor(self, need_lo: int, need_hi: int) -> int:
        """Smallest integer width factor (or close to it) whose grid holds absolute bins need_lo..need_hi."""
        k = max(1, -(-(need_hi - need_lo + 1) // self._bins))
        for candidate in range(k, k + 4):
            if need_hi // candidate - need_lo // candidate < self._bins:
                return candidate
        return max(k, -(-(need_hi - need_lo) // (self._bins - 1)))  # always fits

    def _regrid(self, k: int, need_lo: int | None = None) -> None:
        """Merge every ``k`` aligned bins into one and start the grid at ``need_lo``'s new bin."""
        assert self._counts is not None
        if need_lo is None:
            nz = np.flatnonzero(self._counts)
            need_lo = min(0, self._start + int(nz[0])) if nz.size else min(0, self._start)
        new_start = need_lo // k
        nz = np.flatnonzero(self._counts)
        merged = np.zeros(self._bins, dtype=np.int64)
        if nz.size:
            local = _floordiv(self._start + nz.astype(np.int64), k) - new_start
            np.add.at(merged, local, self._counts[nz])
        self._counts, self._start, self._width = merged, int(new_start), self._width * k

    def _add(self, values: npt.NDArray[np.float64]) -> None:
        assert self._counts is not None
        idx = np.floor(values / self._width).astype(np.int64) - self._start
        # Only rounding can put a value outside the grid: _cover already made room for the batch.
        np.clip(idx, 0, self._bins - 1, out=idx)
        self._counts += np.bincount(idx, minlength=self._bins)

    # --- ranges -----------------------------------------------------------------------------
    def range(
        self, method: str, *, percentile: float = 99.999, dtype: str = "uint8", scheme: str = "asym"
    ) -> tuple[float, float]:
        """The clipping range ``(lo, hi)`` that ``method`` picks from the observed data.

        Args:
            method: ``"minmax"`` (exact extremes), ``"percentile"``, ``"kl"`` (entropy threshold search,
                TensorRT style) or ``"mse"`` (least expected quantization-plus-clipping error).
            percentile: for ``"percentile"``; both tails are cut for signed data, the top one otherwise.
            dtype: the activation dtype the range is for (``"mse"`` simulates its exact grid).
            scheme: ``"sym"`` or ``"asym"`` (``"kl"`` and ``"mse"`` search differently for each).

        Returns:
            ``(lo, hi)`` with ``min <= lo <= hi <= max`` of the observed data; pass it to
            :func:`compute_qparams`, which widens it to include zero.

        Raises:
            ConfigError: unknown method, dtype or scheme, or a percentile outside (50, 100].
            CalibrationError: nothing was observed yet.
        """
        owner = f"{self._label}.range"
        check_choice(owner, "method", method, CALIBRATIONS)
        percentile = check_percentile(owner, percentile)
        check_choice(owner, "dtype", dtype, DTYPES)
        check_choice(owner, "scheme", scheme, SCHEMES)
        self._require_data()
        key = (method, percentile, dtype, scheme)
        if key not in self._cache:
            self._cache[key] = self._compute_range(method, percentile, dtype, scheme)
        return self._cache[key]

    def _compute_range(self, method: str, percentile: float, dtype: str, scheme: str) -> tuple[float, float]:
        if method == "minmax":
            return self._min, self._max
        if self._counts is None:
            return 0.0, 0.0
        hist = HistData(self._counts, self._start, self._width, self._min, self._max)
        if method == "percentile":
            lo, hi = percentile_range(hist, percentile)
        elif method == "kl":
            lo, hi = kl_range(hist, scheme)
        else:
            lo, hi = mse_range(hist, dtype, scheme)
        # Searches work in bin edges; the answer never reaches past the data actually seen.
        hi = min(max(hi, self._min), self._max)
        return min(max(lo, self._min), hi), hi

    # --- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state; :meth:`from_state` rebuilds an identical observer."""
        return {
            "kind": "histogram",
            "version": _STATE_VERSION,
            "name": self.name,
            "bins": self._bins,
            "count": self._count,
            "min": self._min if self._count else None,
            "max": self._max if self._count else None,
            "zeros": self._zeros,
            "start": self._start,
            "width": self._width,
            "counts": None if self._counts is None else self._counts.tolist(),
        }

    @classmethod
    def from_state(cls, state: Any) -> HistogramObserver:
        """Rebuild from :meth:`state_dict` output.

        Raises:
            ConfigError: the state is not a histogram observer's, or is inconsistent.
        """
        keys = {"kind", "version", "name", "bins", "count", "min", "max", "zeros", "start", "width", "counts"}
        if not isinstance(state, dict) or set(state) != keys or state["kind"] != "histogram":
            raise ConfigError(
                f"HistogramObserver.from_state expects a dict from state_dict() with keys {sorted(keys)}."
            )
        if state["version"] != _STATE_VERSION:
            raise ConfigError(f"HistogramObserver.from_state: state version {state['version']!r} is not supported.")
        obs = cls(state["bins"], name=state["name"])
        try:
            obs._count, obs._zeros, obs._start = int(state["count"]), int(state["zeros"]), int(state["start"])
            obs._width = float(state["width"])
            if obs._count:
                obs._min, obs._max = float(state["min"]), float(state["max"])
            if state["counts"] is not None:
                obs._counts = np.asarray(state["counts"], dtype=np.int64)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"HistogramObserver.from_state: malformed state ({exc}).") from exc
        counted = obs._zeros + (0 if obs._counts is None else int(obs._counts.sum()))
        grid_ok = obs._counts is None or (
            obs._counts.shape == (obs._bins,) and obs._width > 0 and obs._start <= 0 < obs._start + obs._bins
        )
        if counted != obs._count or not grid_ok or (obs._count and not obs._min <= obs._max):
            raise ConfigError("HistogramObserver.from_state: the state is inconsistent (counts, grid or min/max).")
        return obs
