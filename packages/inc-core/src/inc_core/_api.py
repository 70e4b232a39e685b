"""The one-shot verbs: quantize, describe, save, load."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from inc_core._dataset import Dataset
from inc_core._files import atomic_write
from inc_core._quant_config import QuantConfig
from inc_core._registry import resolve_backend
from inc_core.backend import Backend, TuningSpace
from inc_core.errors import ConfigError, DatasetError, ModelLoadError

__all__ = ["quantize", "describe", "save", "load", "as_dataset"]

log = logging.getLogger("inc")


def as_dataset(data: Any, *, what: str = "dataset") -> Dataset:
    """Accept a Dataset or anything Dataset() takes."""
    if data is None:
        raise DatasetError(f"{what} is required for static quantization; pass inc.Dataset(samples).")
    return data if isinstance(data, Dataset) else Dataset(data)


def describe(model: Any, config: QuantConfig | None = None, *, backend: str | Backend | None = None) -> TuningSpace:
    """The quantizable ops of ``model`` (names and types usable in LayerFilter and overrides)."""
    config = config or QuantConfig()
    return resolve_backend(model, backend).describe(model, config)


def quantize(
    model: Any,
    config: QuantConfig | None = None,
    *,
    dataset: Any = None,
    backend: str | Backend | None = None,
    inplace: bool = False,
) -> Any:
    """Post-training quantization in one shot.

    Args:
        model: a framework model (or a model file path, for file-based backends such as ONNX).
        config: the recipe; ``QuantConfig()`` when omitted.
        dataset: calibration samples (an :class:`inc.Dataset` or what it accepts); required for static.
            Optional for dynamic, where the quantized model is then run once on its first batch.
        backend: a backend name (``"ipex"``) to use instead of the one found from the model's type.
        inplace: allow the backend to modify ``model`` (never done otherwise).

    Returns:
        The framework-native INT8 model.
    """
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"quantize: config must be an inc.QuantConfig, got {type(config).__name__}.")
    impl = resolve_backend(model, backend)
    impl.check_format(config.format)
    impl.check_smooth_quant(config)
    impl.check_bf16(config)
    space = impl.describe(model, config)
    config.exclude.select(space.ops)  # validates names/patterns before calibration work starts
    config.bf16.select(space.ops)
    calibration = None
    if config.approach == "static":
        data = as_dataset(dataset, what="quantize(dataset=...)")
        log.info("calibrating %s on up to %d samples", impl.name, config.calib_samples)
        calibration = impl.calibrate(model, data, config)
    quantized = impl.quantize(model, config, calibration=calibration, inplace=inplace)
    if config.approach == "dynamic" and dataset is not None:
        impl.check_quantized_runs(model, quantized, as_dataset(dataset, what="quantize(dataset=...)"))
    return quantized


def save(model: Any, path: str | os.PathLike[str], *, backend: str | Backend | None = None) -> Path:
    """Write ``model`` in its framework's native format, atomically (no partial file on error)."""
    impl = resolve_backend(model, backend)
    atomic_write(path, lambda tmp: impl.save(model, tmp), what="model")
    return Path(path)


def load(path: str | os.PathLike[str], *, backend: str | Backend | None = None) -> Any:
    """Read a model saved by :func:`save`; the backend is found from the file suffix unless named."""
    target = Path(path)
    if not target.exists():
        raise ModelLoadError(f"load: no file or directory at {str(target)!r}.")
    impl = resolve_backend(target, backend)
    return impl.load(target)
