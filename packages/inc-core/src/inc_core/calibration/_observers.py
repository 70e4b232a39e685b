"""One observer per calibration method, and ``make_observer`` to pick one from a config value."""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

from inc_core._checks import check_choice
from inc_core._quant_config import CALIBRATIONS, DTYPES, SCHEMES
from inc_core.calibration._common import check_percentile
from inc_core.calibration._histogram import HistogramObserver
from inc_core.calibration._minmax import MinMaxObserver
from inc_core.errors import ConfigError

__all__ = ["Observer", "PercentileObserver", "KLObserver", "MSEObserver", "make_observer", "observer_from_state"]

_STATE_VERSION = 1


@runtime_checkable
class Observer(Protocol):
    """What every observer offers: stream batches in, read one range out."""

    @property
    def method(self) -> str:
        """The calibration method (one of ``CALIBRATIONS``)."""

    @property
    def name(self) -> str:
        """The tensor or op observed."""

    def update(self, x: Any) -> None:
        """Add one batch of the observed tensor."""

    def range(self) -> tuple[Any, Any]:
        """The ``(lo, hi)`` range for :func:`compute_qparams`."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state."""


class _HistogramMethod:
    """A :class:`HistogramObserver` bound to one method and its settings."""

    method: ClassVar[str]

    def __init__(self, *, bins: int, name: str, percentile: float, dtype: str, scheme: str) -> None:
        owner = type(self).__name__
        self._percentile = check_percentile(owner, percentile)
        check_choice(owner, "dtype", dtype, DTYPES)
        check_choice(owner, "scheme", scheme, SCHEMES)
        self._dtype, self._scheme = dtype, scheme
        self.histogram = HistogramObserver(bins, name=name)

    @property
    def name(self) -> str:
        """The tensor or op observed."""
        return self.histogram.name

    def update(self, x: Any) -> None:
        """Add one batch (see :meth:`HistogramObserver.update`)."""
        self.histogram.update(x)

    def range(self) -> tuple[float, float]:
        """``(lo, hi)`` chosen by this observer's method.

        Raises:
            CalibrationError: nothing was observed yet.
        """
        return self.histogram.range(self.method, percentile=self._percentile, dtype=self._dtype, scheme=self._scheme)

    def merge(self, other: _HistogramMethod) -> _HistogramMethod:
        """Add another observer's histogram (see :meth:`HistogramObserver.merge`); returns ``self``."""
        if not isinstance(other, _HistogramMethod):
            raise ConfigError(f"{type(self).__name__}.merge expects a histogram-based observer, got {other!r}.")
        self.histogram.merge(other.histogram)
        return self

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state; :func:`observer_from_state` rebuilds an identical observer."""
        return {
            "kind": self.method,
            "version": _STATE_VERSION,
            "percentile": self._percentile,
            "dtype": self._dtype,
            "scheme": self._scheme,
            "histogram": self.histogram.state_dict(),
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(bins={self.histogram.bins}, percentile={self._percentile!r}, "
            f"dtype={self._dtype!r}, scheme={self._scheme!r}, name={self.name!r})"
        )


class PercentileObserver(_HistogramMethod):
    """Range at a percentile of the data (both tails for signed data, the top one otherwise).

    Args:
        percentile: in (50, 100]; 100 is min/max.
        bins: histogram bins; the range is accurate to about one bin width.
        name: the tensor or op observed, used in error messages.
    """

    method = "percentile"

    def __init__(self, percentile: float = 99.999, *, bins: int = 2048, name: str = "") -> None:
        super().__init__(bins=bins, name=name, percentile=percentile, dtype="uint8", scheme="asym")


class KLObserver(_HistogramMethod):
    """Entropy calibration: the clipping threshold that minimizes KL(P || Q) (TensorRT's method).

    Args:
        scheme: ``"sym"`` searches ``|x|``; ``"asym"`` searches each side of signed data separately.
        bins: histogram bins; more than 256 are needed for any clipping to happen.
        name: the tensor or op observed, used in error messages.
    """

    method = "kl"

    def __init__(self, *, scheme: str = "asym", bins: int = 2048, name: str = "") -> None:
        super().__init__(bins=bins, name=name, percentile=99.999, dtype="uint8", scheme=scheme)


class MSEObserver(_HistogramMethod):
    """The range whose quantization grid gives the least expected squared error (rounding plus clipping).

    Args:
        dtype: ``"uint8"`` or ``"int8"``: the grid whose error is measured.
        scheme: ``"sym"`` or ``"asym"``.
        bins: histogram bins.
        name: the tensor or op observed, used in error messages.
    """

    method = "mse"

    def __init__(self, *, dtype: str = "uint8", scheme: str = "asym", bins: int = 2048, name: str = "") -> None:
        super().__init__(bins=bins, name=name, percentile=99.999, dtype=dtype, scheme=scheme)


def make_observer(
    method: str,
    *,
    axis: int | None = None,
    bins: int = 2048,
    percentile: float = 99.999,
    dtype: str = "uint8",
    scheme: str = "asym",
    name: str = "",
) -> Observer:
    """The observer for one calibration method, e.g. ``make_observer(config.calibration, ...)``.

    To answer several methods from one pass (tuning), use :class:`HistogramObserver` directly.

    Args:
        method: one of ``"minmax"``, ``"kl"``, ``"percentile"``, ``"mse"``.
        axis: channel axis for per-channel ranges (``"minmax"`` only); ``None`` per tensor.
        bins: histogram bins for the histogram methods.
        percentile: for ``"percentile"``.
        dtype: activation dtype (used by ``"mse"``).
        scheme: activation scheme (used by ``"kl"`` and ``"mse"``).
        name: the tensor or op observed, used in error messages.

    Raises:
        ConfigError: unknown method, dtype or scheme, or ``axis`` with a histogram method.
    """
    owner = "make_observer"
    check_choice(owner, "method", method, CALIBRATIONS)
    check_choice(owner, "dtype", dtype, DTYPES)
    check_choice(owner, "scheme", scheme, SCHEMES)
    if method == "minmax":
        return MinMaxObserver(axis, name=name)
    if axis is not None:
        raise ConfigError(
            f"{owner}: method={method!r} with axis={axis!r}: per-channel ranges are supported for 'minmax' only. "
            "Pass axis=None for a per-tensor range, or use method='minmax'."
        )
    if method == "percentile":
        return PercentileObserver(percentile, bins=bins, name=name)
    if method == "kl":
        return KLObserver(scheme=scheme, bins=bins, name=name)
    return MSEObserver(dtype=dtype, scheme=scheme, bins=bins, name=name)


def observer_from_state(state: Any) -> Observer | HistogramObserver:
    """Rebuild any observer from its ``state_dict()`` (e.g. after ``json.load``).

    Raises:
        ConfigError: the state is not an observer's, or is inconsistent.
    """
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind == "minmax":
        return MinMaxObserver.from_state(state)
    if kind == "histogram":
        return HistogramObserver.from_state(state)
    if kind not in ("percentile", "kl", "mse"):
        raise ConfigError(
            f"observer_from_state: expected a dict from an observer's state_dict() whose 'kind' is one of "
            f"'minmax', 'histogram', 'percentile', 'kl', 'mse'; got kind={kind!r}."
        )
    keys = {"kind", "version", "percentile", "dtype", "scheme", "histogram"}
    if set(state) != keys or state["version"] != _STATE_VERSION:
        raise ConfigError(
            f"observer_from_state: a {kind!r} state needs keys {sorted(keys)} and version {_STATE_VERSION}."
        )
    histogram = HistogramObserver.from_state(state["histogram"])
    obs: _HistogramMethod
    if kind == "percentile":
        obs = PercentileObserver(state["percentile"], bins=histogram.bins, name=histogram.name)
    elif kind == "kl":
        obs = KLObserver(scheme=state["scheme"], bins=histogram.bins, name=histogram.name)
    else:
        obs = MSEObserver(dtype=state["dtype"], scheme=state["scheme"], bins=histogram.bins, name=histogram.name)
    obs.histogram = histogram
    return obs
