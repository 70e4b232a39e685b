"""QuantConfig and QATConfig: what one quantization run does (never a search space)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from inc_core._checks import check_choice, check_int
from inc_core._layer_filter import LayerFilter
from inc_core._serde import SerializableConfig
from inc_core._smooth_quant_config import SmoothQuant
from inc_core.errors import ConfigError

__all__ = ["QuantConfig", "QATConfig", "APPROACHES", "CALIBRATIONS", "GRANULARITIES", "SCHEMES", "DTYPES"]

APPROACHES = ("static", "dynamic")
CALIBRATIONS = ("minmax", "kl", "percentile", "mse")
GRANULARITIES = ("per_channel", "per_tensor")
SCHEMES = ("sym", "asym")
DTYPES = ("uint8", "int8")
WEIGHT_DTYPES = ("int8",)
# The settings an override may change for one op or one op type.
OVERRIDABLE = {
    "calibration": CALIBRATIONS,
    "granularity": GRANULARITIES,
    "scheme": SCHEMES,
    "activation_dtype": DTYPES,
}


def _frozen_overrides(owner: str, value: Any) -> dict[str, dict[str, str]]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{owner}: overrides must be a mapping of op name/type -> settings, got {value!r}.")
    out: dict[str, dict[str, str]] = {}
    for key, settings in value.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{owner}: override keys are op names or op types (strings), got {key!r}.")
        if not isinstance(settings, Mapping) or not settings:
            raise ConfigError(f"{owner}: overrides[{key!r}] must be a non-empty mapping, got {settings!r}.")
        clean: dict[str, str] = {}
        for setting, choice in settings.items():
            if setting not in OVERRIDABLE:
                raise ConfigError(
                    f"{owner}: overrides[{key!r}] sets {setting!r}; an override may set "
                    f"{', '.join(OVERRIDABLE)}. Use exclude= to keep an op in FP32."
                )
            check_choice(owner, f"overrides[{key!r}][{setting!r}]", choice, OVERRIDABLE[setting])
            clean[setting] = choice
        out[key] = clean
    return out


def _check_int8_recipe(owner: str, config: Any) -> None:
    """The fields QuantConfig and QATConfig share: weight/activation formats, exclude, format."""
    check_choice(owner, "granularity", config.granularity, GRANULARITIES)
    check_choice(owner, "scheme", config.scheme, SCHEMES)
    check_choice(owner, "activation_dtype", config.activation_dtype, DTYPES)
    check_choice(owner, "weight_dtype", config.weight_dtype, WEIGHT_DTYPES)
    if not isinstance(config.exclude, LayerFilter):
        raise ConfigError(f"{owner}: exclude must be an inc.LayerFilter, got {type(config.exclude).__name__}.")
    if not isinstance(config.format, str) or not config.format:
        raise ConfigError(f"{owner}: format must be a non-empty string, got {config.format!r}.")


def _check_smooth_quant(owner: str, config: QuantConfig) -> None:
    if config.smooth_quant is None:
        return
    if not isinstance(config.smooth_quant, SmoothQuant):
        raise ConfigError(
            f"{owner}: smooth_quant must be an inc.SmoothQuant(alpha=...) or None, got {config.smooth_quant!r}."
        )
    if config.approach != "static":
        # The scales come from calibration maxima, which dynamic quantization never collects.
        raise ConfigError(
            f"{owner}: smooth_quant needs approach='static' (its scales come from calibration data), got "
            f"approach={config.approach!r}. Use approach='static' with a dataset, or smooth_quant=None."
        )


@dataclass(frozen=True, kw_only=True)
class QuantConfig(SerializableConfig):
    """One post-training quantization recipe.

    Args:
        approach: ``"static"`` (activations calibrated ahead of time) or ``"dynamic"``
            (activation ranges computed at run time; weights only are calibrated).
        calibration: how activation ranges are chosen from calibration data: ``"minmax"``,
            ``"kl"`` (entropy threshold search), ``"percentile"`` or ``"mse"``.
        granularity: weight quantization ``"per_channel"`` or ``"per_tensor"``.
        scheme: activation scheme, ``"sym"`` (zero point 0 / 128) or ``"asym"``. Weights are
            always symmetric int8, as x86 INT8 kernels expect; embedding tables (weights only: a
            lookup computes nothing) follow their backend's lookup kernels (torch: 8 bits per row with
            the row's own scale and offset, whatever ``granularity`` and ``scheme`` say).
        activation_dtype: ``"uint8"`` (fast VNNI path on x86) or ``"int8"``.
        weight_dtype: ``"int8"``.
        calib_samples: how many calibration samples (not batches) to feed.
        percentile: the percentile used by ``calibration="percentile"``.
        exclude: ops kept in FP32.
        bf16: ops kept out of INT8 that run in BF16 instead of FP32 (mixed precision on CPUs with
            AVX512-BF16 or AMX-BF16, on backends that support it: torch PT2E, ONNX run by OpenVINO).
            An op matched by both ``exclude`` and ``bf16`` stays FP32.
        overrides: per op name or op type, settings that differ from the above, e.g.
            ``{"MatMul": {"calibration": "percentile"}}``. Names win over types.
        format: backend-specific output format (``"qdq"``/``"qoperator"`` for ONNX, ``"pt2e"``/``"fx"``
            for torch); ``"default"`` lets the backend choose its fastest format.
        smooth_quant: an :class:`inc.SmoothQuant` to migrate activation outliers into the weights before
            static quantization; ``None`` (default) leaves the model's scales alone.
    """

    approach: str = "static"
    calibration: str = "minmax"
    granularity: str = "per_channel"
    scheme: str = "asym"
    activation_dtype: str = "uint8"
    weight_dtype: str = "int8"
    calib_samples: int = 100
    percentile: float = 99.999
    exclude: LayerFilter = field(default_factory=LayerFilter)
    overrides: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    format: str = "default"
    smooth_quant: SmoothQuant | None = None
    bf16: LayerFilter = field(default_factory=LayerFilter)

    def __post_init__(self) -> None:
        owner = "QuantConfig"
        check_choice(owner, "approach", self.approach, APPROACHES)
        check_choice(owner, "calibration", self.calibration, CALIBRATIONS)
        _check_int8_recipe(owner, self)
        check_int(owner, "calib_samples", self.calib_samples, minimum=1)
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) or not (
            50.0 < float(self.percentile) <= 100.0
        ):
            raise ConfigError(f"{owner}: percentile must be in (50, 100], got {self.percentile!r}.")
        object.__setattr__(self, "overrides", _frozen_overrides(owner, self.overrides))
        _check_smooth_quant(owner, self)
        if not isinstance(self.bf16, LayerFilter):
            raise ConfigError(
                f"{owner}: bf16 must be an inc.LayerFilter of the ops to run in BF16, got {type(self.bf16).__name__}."
            )

    def precision(self, op_name: str, op_type: str) -> str:
        """What one op of ``describe`` runs in under this config: ``"fp32"``, ``"bf16"`` or ``"int8"``."""
        if self.exclude.matches(op_name, op_type):
            return "fp32"  # exclude wins: FP32 is the safe choice when both filters match
        if self.bf16.matches(op_name, op_type):
            return "bf16"
        return "int8"

    def setting(self, op_name: str, op_type: str, key: str) -> str:
        """The effective value of an overridable setting for one op (name override > type override > global)."""
        if key not in OVERRIDABLE:
            raise ConfigError(f"QuantConfig.setting: {key!r} is not overridable; choose one of {list(OVERRIDABLE)}.")
        for selector in (op_name, op_type):
            if selector in self.overrides and key in self.overrides[selector]:
                return self.overrides[selector][key]
        return str(getattr(self, key))

    def calibrations_used(self) -> set[str]:
        """Every calibration method this config needs (global plus overrides)."""
        used = {self.calibration}
        used.update(s["calibration"] for s in self.overrides.values() if "calibration" in s)
        return used


@dataclass(frozen=True, kw_only=True)
class QATConfig(SerializableConfig):
    """Quantization-aware training: fake-quant inserted for training, INT8 after ``convert``.

    Args:
        granularity: weight quantization ``"per_channel"`` or ``"per_tensor"``.
        scheme: activation scheme ``"sym"`` or ``"asym"``.
        activation_dtype: ``"uint8"`` or ``"int8"``.
        weight_dtype: ``"int8"``.
        freeze_observer_step: optimizer step after which activation ranges stop updating
            (``None``: never frozen before convert).
        freeze_bn_step: optimizer step after which batch-norm statistics are frozen (``None``: never).
        exclude: layers left in FP32.
        format: backend-specific format (``"default"`` lets the backend choose).
    """

    granularity: str = "per_channel"
    scheme: str = "asym"
    activation_dtype: str = "uint8"
    weight_dtype: str = "int8"
    freeze_observer_step: int | None = None
    freeze_bn_step: int | None = None
    exclude: LayerFilter = field(default_factory=LayerFilter)
    format: str = "default"

    def __post_init__(self) -> None:
        owner = "QATConfig"
        _check_int8_recipe(owner, self)
        check_int(owner, "freeze_observer_step", self.freeze_observer_step, minimum=0, allow_none=True)
        check_int(owner, "freeze_bn_step", self.freeze_bn_step, minimum=0, allow_none=True)
