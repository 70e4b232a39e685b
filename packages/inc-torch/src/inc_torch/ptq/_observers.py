"""torch observers whose ranges come from inc-core's calibration math.

Activation observers stream tensors into :class:`inc_core.calibration.HistogramObserver` and answer
``calculate_qparams`` with the range the configured method (minmax, percentile, KL, MSE) picks and
:func:`~inc_core.calibration.compute_qparams`; weight observers use
:func:`~inc_core.calibration.weight_qparams`. The same mixins serve the FX path (torch.ao's
``ObserverBase``) and the PT2E path (torchao's ``ObserverBase``), which are distinct classes.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.ao.quantization.observer import ObserverBase as _AOObserverBase
from torch.ao.quantization.observer import PerChannelMinMaxObserver

from inc_core.calibration import HistogramObserver, QParams, compute_qparams, weight_qparams
from inc_core.errors import CalibrationError

__all__ = [
    "FxActivationObserver",
    "FxWeightObserver",
    "IpexWeightObserver",
    "pt2e_observer_classes",
    "is_activation_observer",
    "is_weight_observer",
    "HISTOGRAM_BINS",
]

HISTOGRAM_BINS = 2048


class _ActivationMixin:
    """Streams a tensor into a core HistogramObserver; qparams from the chosen calibration method."""

    histogram: HistogramObserver | None

    def _setup(self, method: str, percentile: float, scheme: str, label: str) -> None:
        self.method = method
        self.percentile = float(percentile)
        self.scheme = scheme
        self.label = label
        # Always declared affine: a symmetric uint8 range is the affine grid with zero point 128,
        # which every x86 kernel accepts, while the symmetric qscheme is rejected by some lowerings.
        self.qscheme = torch.per_tensor_affine
        self.quant_min, self.quant_max = 0, 255
        self.histogram = None
        self.frozen = False

    def forward(self, x: Any) -> Any:
        if not self.frozen and isinstance(x, torch.Tensor) and x.is_floating_point():
            if self.histogram is None:
                self.histogram = HistogramObserver(HISTOGRAM_BINS, name=self.label)
            self.histogram.update(x.detach().float().cpu().numpy())
        return x

    def load_histogram(self, histogram: HistogramObserver) -> None:
        """Use statistics collected earlier (one calibration pass serves every tuning trial)."""
        self.histogram = histogram
        self.frozen = True

    def qparams(self) -> QParams:
        if self.histogram is None or self.histogram.count == 0:
            raise CalibrationError(
                f"No calibration data reached the observer of {self.label or 'an activation'}; "
                "feed at least one batch that runs through this op."
            )
        lo, hi = self.histogram.range(self.method, percentile=self.percentile, dtype="uint8", scheme=self.scheme)
        return compute_qparams(lo, hi, dtype="uint8", scheme=self.scheme)

    def calculate_qparams(self, **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
        qp = self.qparams()
        return (
            torch.tensor([float(qp.scale)], dtype=torch.float32),
            torch.tensor([int(qp.zero_point)], dtype=torch.int64),
        )

    def extra_repr(self) -> str:
        return f"method={self.method!r}, scheme={self.scheme!r}, frozen={self.frozen}"


class _WeightMixin:
    """Symmetric int8 weight qparams (``scale = amax / 127``), per output channel or per tensor."""

    def _setup(self, per_channel: bool, reduce_range: bool = False) -> None:
        self.per_channel = per_channel
        self.qscheme = torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric
        self.ch_axis = 0
        # reduce_range: 7-bit weights (-64..64), for a kernel that adds pairs of u8 x s8 products in int16
        # (FBGEMM's depthwise convolutions): 255 * 64 * 2 still fits, 255 * 127 * 2 saturates.
        self.reduce_range = reduce_range
        self.quant_min, self.quant_max = (-64, 64) if reduce_range else (-128, 127)
        self.weight: torch.Tensor | None = None

    def forward(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            self.weight = x.detach()
        return x

    def calculate_qparams(self, **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.weight is None:
            raise CalibrationError("A weight observer saw no weight; the op's weight did not reach it.")
        qp = weight_qparams(self.weight.float().cpu().numpy(), axis=self.ch_axis if self.per_channel else None)
        scale = torch.from_numpy(qp.scale.reshape(-1).copy()).to(torch.float32)
        if self.reduce_range:
            scale = scale * 2.0  # the same range on half the levels
        zero_point = torch.zeros(scale.shape, dtype=torch.int64)
        return scale, zero_point

    def extra_repr(self) -> str:
        return f"per_channel={self.per_channel}, reduce_range={self.reduce_range}"


class FxActivationObserver(_ActivationMixin, _AOObserverBase):
    """Activation observer for the FX path (quint8)."""

    def __init__(
        self, method: str = "minmax", percentile: float = 99.999, scheme: str = "asym", label: str = "", **_: Any
    ) -> None:
        _AOObserverBase.__init__(self, dtype=torch.quint8)
        self._setup(method, percentile, scheme, label)


class FxWeightObserver(_WeightMixin, _AOObserverBase):
    """Weight observer for the FX path (qint8, symmetric)."""

    def __init__(self, per_channel: bool = True, reduce_range: bool = False, **_: Any) -> None:
        _AOObserverBase.__init__(self, dtype=torch.qint8)
        self._setup(per_channel, reduce_range)


class IpexWeightObserver(_WeightMixin, PerChannelMinMaxObserver):
    """Weight observer for IPEX's calibration (qint8, symmetric).

    A ``PerChannelMinMaxObserver`` by class because IPEX recognises one by that: for a transposed
    convolution (weight ``[in, out / groups, ...]``) it builds it again with ``ch_axis=1``, one scale per
    output channel; any other class keeps axis 0 and IPEX's INT8 ConvTranspose2d then refuses the scales
    ("length of scales must equal to channel").
    """

    def __init__(self, per_channel: bool = True, ch_axis: int = 0, **_: Any) -> None:
        PerChannelMinMaxObserver.__init__(self, ch_axis=ch_axis, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
        self._setup(per_channel)
        self.ch_axis = ch_axis


@functools.cache
def pt2e_observer_classes() -> tuple[type, type]:
    """``(activation, weight)`` observer classes for the PT2E path, built on torchao's ObserverBase."""
    from inc_torch._compat import torchao_pt2e

    base = torchao_pt2e().ObserverBase

    class Pt2eActivationObserver(_ActivationMixin, base):  # type: ignore[misc,valid-type]
        """Activation observer for the PT2E path (uint8)."""

        def __init__(
            self, method: str = "minmax", percentile: float = 99.999, scheme: str = "asym", label: str = "", **_: Any
        ) -> None:
            base.__init__(self, dtype=torch.uint8)
            self._setup(method, percentile, scheme, label)

    class Pt2eWeightObserver(_WeightMixin, base):  # type: ignore[misc,valid-type]
        """Weight observer for the PT2E path (int8, symmetric)."""

        def __init__(self, per_channel: bool = True, **_: Any) -> None:
            base.__init__(self, dtype=torch.int8)
            self._setup(per_channel)

    return Pt2eActivationObserver, Pt2eWeightObserver


def is_activation_observer(module: Any) -> bool:
    return isinstance(module, _ActivationMixin)


def is_weight_observer(module: Any) -> bool:
    return isinstance(module, _WeightMixin)
