"""SmoothQuant: the config value that turns activation-to-weight scale migration on for one run."""

from __future__ import annotations

from dataclasses import dataclass

from inc_core._serde import SerializableConfig
from inc_core.calibration._smooth_quant import check_alpha

__all__ = ["SmoothQuant"]


@dataclass(frozen=True, kw_only=True)
class SmoothQuant(SerializableConfig):
    """SmoothQuant (Xiao et al. 2022) before static INT8: ``QuantConfig(smooth_quant=inc.SmoothQuant(alpha=0.5))``.

    Per input channel ``j`` of each linear layer (MatMul/Gemm, ``nn.Linear``) whose input the backend
    can rescale, the activation is divided and the weight row multiplied by
    ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (maxima from the calibration data), so activation
    outliers move into the per-channel-quantized weights. The division is folded into the op producing
    the activation (a LayerNorm's gamma and beta) where the backend can; the FP32 model's output is
    unchanged. The calibration data is run once more through the rescaled model.

    Args:
        alpha: share of the activation range moved to the weights, in [0, 1]; 0.5 suits most transformers.
    """

    alpha: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", check_alpha("SmoothQuant", self.alpha))
