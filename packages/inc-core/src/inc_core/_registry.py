"""Find backends through the ``inc_core.backends`` entry-point group, loading only the one needed."""

from __future__ import annotations

import functools
import inspect
from importlib import metadata
from pathlib import Path
from typing import Any

from inc_core.backend import Backend
from inc_core.errors import BackendNotFoundError, ConfigError

__all__ = ["get_backend", "resolve_backend", "installed_backends", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "inc_core.backends"
# Only used to tell a user which distribution to install; dispatch never reads it.
_INSTALL_HINTS = {
    "torch": "inc-torch",
    "ipex": "inc-torch[ipex]",
    "onnx": "inc-onnx",
    "keras": "inc-tf",
    "h5": "inc-tf",
    "tflite": "inc-tf",
    "tensorflow": "inc-tf",
    "mxnet": "inc-mxnet",
}
# Backends registered in-process (tests, notebooks) take precedence over entry points.
_LOCAL: dict[str, type[Backend]] = {}


def register_backend(key: str, backend_cls: type[Backend]) -> None:
    """Register a backend class under ``key`` for this process (what an entry point does for installs)."""
    if not (inspect.isclass(backend_cls) and issubclass(backend_cls, Backend)):
        raise ConfigError(
            f"register_backend: {backend_cls!r} is not a Backend subclass; pass a class that derives from "
            "inc_core.Backend (the class itself, not an instance)."
        )
    _LOCAL[key] = backend_cls
    _instance.cache_clear()


def unregister_backend(key: str) -> None:
    _LOCAL.pop(key, None)
    _instance.cache_clear()


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def installed_backends() -> dict[str, str]:
    """Every registered key and the ``module:object`` it points to, without importing any plugin."""
    found = {name: ep.value for name, ep in _entry_points().items()}
    found.update({k: f"{v.__module__}:{v.__qualname__}" for k, v in _LOCAL.items()})
    return dict(sorted(found.items()))


@functools.cache
def _instance(key: str) -> Backend:
    if key in _LOCAL:
        return _LOCAL[key]()
    ep = _entry_points()[key]
    try:
        cls = ep.load()
    except Exception as exc:  # ImportError, or whatever the plugin's import raises (AttributeError, a framework's init)
        raise BackendNotFoundError(
            f"The {key!r} backend is registered ({ep.value}) but could not be imported: {type(exc).__name__}: {exc}. "
            f"Reinstall it with `pip install {_INSTALL_HINTS.get(key, 'inc-' + key)}`."
        ) from exc
    if not (inspect.isclass(cls) and issubclass(cls, Backend)):
        raise BackendNotFoundError(f"Entry point {key!r} = {ep.value} is not an inc_core.backend.Backend subclass.")
    try:
        return cls()
    except BackendNotFoundError as exc:  # the plugin says itself what is missing and how to get it
        raise BackendNotFoundError(f"The {key!r} backend ({ep.value}) could not be started: {exc}") from exc
    except Exception as exc:  # a plugin whose constructor fails (its framework's runtime missing a library, ...)
        raise BackendNotFoundError(
            f"The {key!r} backend ({ep.value}) could not be started: {type(exc).__name__}: {exc}. "
            f"Reinstall it with `pip install {_INSTALL_HINTS.get(key, 'inc-' + key)}`."
        ) from exc


def get_backend(name: str) -> Backend:
    """The backend registered under ``name``.

    Raises:
        BackendNotFoundError: no plugin registers ``name``; the message names the package to install.
    """
    if name in _LOCAL or name in _entry_points():
        return _instance(name)
    raise BackendNotFoundError(
        f"No inc backend named {name!r} is installed. Install it with "
        f"`pip install {_INSTALL_HINTS.get(name, 'inc-' + name)}`. Installed backends: "
        f"{sorted(installed_backends()) or 'none'}."
    )


def _candidate_keys(model: Any) -> list[str]:
    """Lookup keys for a model: file suffix for a path, else top-level packages along its type's MRO."""
    if isinstance(model, (str, Path)):
        suffix = Path(model).suffix.lstrip(".").lower()
        if suffix or not Path(model).is_dir():
            return [suffix] if suffix else []
        # A model directory without a suffix (a SavedModel export): looked up by the suffixes of its files.
        return sorted({p.suffix.lstrip(".").lower() for p in Path(model).iterdir() if p.is_file() and p.suffix})
    keys: list[str] = []
    for cls in type(model).__mro__:
        root = cls.__module__.split(".")[0]
        if root not in ("builtins", "abc", "typing") and root not in keys:
            keys.append(root)
    return keys


def resolve_backend(model: Any, backend: str | Backend | None = None) -> Backend:
    """The backend for ``model``: the one named by ``backend``, else the one registered for its type.

    Raises:
        BackendNotFoundError: nothing installed handles the model; says which package to install.
    """
    if backend is None:
        return _find_for_model(model)
    chosen = backend if isinstance(backend, Backend) else get_backend(backend)
    if not chosen.accepts(model):
        raise BackendNotFoundError(
            f"The {chosen.name!r} backend does not accept a {type(model).__qualname__}; "
            f"installed backends: {sorted(installed_backends()) or 'none'}."
        )
    return chosen


def _find_for_model(model: Any) -> Backend:
    available = set(_LOCAL) | set(_entry_points())
    keys = _candidate_keys(model)
    for key in keys:
        if key in available:
            candidate = _instance(key)
            if candidate.accepts(model):
                return candidate
    hint = next((_INSTALL_HINTS[k] for k in keys if k in _INSTALL_HINTS), None)
    if isinstance(model, (str, Path)):
        what = f"a model file {str(model)!r}"
    else:
        what = f"a {type(model).__module__}.{type(model).__qualname__}"
    fix = (
        f"`pip install {hint}`"
        if hint
        else "the plugin for its framework with `pip install inc-<framework>` (inc-torch, inc-onnx, inc-tf, inc-mxnet)"
    )
    raise BackendNotFoundError(
        f"No installed inc backend handles {what}. Install {fix}, or pass backend=<name>. "
        f"Installed backends: {sorted(installed_backends()) or 'none'}."
    )
