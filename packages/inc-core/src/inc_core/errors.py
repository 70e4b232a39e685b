"""Errors raised by inc and its plugins.

Every error is an :class:`IncError` and also the builtin a caller would expect, so
``except ValueError`` keeps working. Messages say what failed, what was given, what
was expected and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "IncError",
    "ConfigError",
    "DatasetError",
    "BackendNotFoundError",
    "UnsupportedModelError",
    "ModelLoadError",
    "CalibrationError",
    "EvaluationError",
    "TuningError",
    "SaveError",
    "BenchmarkError",
]


class IncError(Exception):
    """Base class of every error inc raises on purpose."""


class ConfigError(IncError, ValueError):
    """A config value is out of range, of the wrong type, or names something that does not exist."""


class DatasetError(IncError, ValueError):
    """Calibration or evaluation data is empty, or of the wrong shape, dtype or input name."""


class BackendNotFoundError(IncError, ImportError):
    """No installed plugin handles the given model (or the named backend is not installed)."""


class UnsupportedModelError(IncError, TypeError):
    """The model is of a kind the backend cannot quantize (not traceable, wrong type, ...)."""


class ModelLoadError(IncError, ValueError):
    """A model file is missing, corrupt, or cannot be loaded by its runtime."""


class CalibrationError(IncError, RuntimeError):
    """Calibration failed: no data reached an observer, or activations held NaN/Inf."""


class EvaluationError(IncError, RuntimeError):
    """The user's ``eval_fn`` raised, or returned something that is not a finite number."""


class TuningError(IncError, RuntimeError):
    """The tuning loop cannot go on (unusable history file, strategy needs what the backend lacks, ...)."""


class SaveError(IncError, OSError):
    """A model or report could not be written (missing directory, unwritable path, ...)."""


class BenchmarkError(IncError, RuntimeError):
    """The model could not be run for a benchmark (the runner raised, or an instance process failed)."""
