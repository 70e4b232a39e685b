"""Version-sensitive imports and warning filters shared by the torch paths."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from inc_core.errors import BackendNotFoundError

__all__ = ["quiet", "torchao_pt2e", "unwrap_compiled", "PT2E_INSTALL_HINT"]

PT2E_INSTALL_HINT = "pip install 'torchao>=0.13'"


def unwrap_compiled(model: Any) -> Any:
    """The module ``torch.compile(module)`` wrapped (``model`` itself when it is no such wrapper).

    Its op names are the wrapped module's (not ``_orig_mod.``-prefixed), and torch.fx can trace it. A wrapped
    model has loaded torch._dynamo; importing it here would cost every import of inc_torch.
    """
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    while eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        model = model._orig_mod
    return model


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the deprecation notices torch prints for every torch.ao call.

    torch 2.9+ warns on each FX/eager quantization call that those APIs move to torchao; the FX path
    and dynamic quantization are deliberate choices here, so the notice is noise to our users.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=r".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", message=r".*must run observer before calling calculate_qparams.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao\..*")
        # torchao reports each pattern it leaves in FP32 (e.g. a pool after an excluded op) as a warning.
        warnings.filterwarnings("ignore", message=r"The input of .* is not quantized.*")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
        warnings.filterwarnings("ignore", message=r".*To copy construct from a tensor.*")
        yield


@contextlib.contextmanager
def _quiet_import_logs() -> Iterator[None]:
    """Hide torchao's import-time warnings about its CUDA-only kernels (irrelevant on CPU)."""
    names = ("torchao", "torch.utils._pytree")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class _PT2E:
    """The torchao PT2E names this package uses, imported on first use (torchao import is slow)."""

    def __init__(self) -> None:
        try:
            with _quiet_import_logs():
                import torchao  # noqa: F401
            from torchao.quantization import pt2e
            from torchao.quantization.pt2e import quantize_pt2e
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
            from torchao.quantization.pt2e.quantizer.quantizer import QuantizationSpec
        except ImportError as exc:  # torchao is a dependency, but a broken install should say what to do
            raise BackendNotFoundError(
                f"The PT2E path (format='pt2e', the default) needs torchao, which could not be imported ({exc}). "
                f"Install it with `{PT2E_INSTALL_HINT}`, or use QuantConfig(format='fx')."
            ) from exc
        self.pt2e: ModuleType = pt2e
        self.prepare_pt2e: Any = quantize_pt2e.prepare_pt2e
        self.prepare_qat_pt2e: Any = quantize_pt2e.prepare_qat_pt2e
        self.convert_pt2e: Any = quantize_pt2e.convert_pt2e
        self.X86InductorQuantizer: Any = xiq.X86InductorQuantizer
        self.QuantizationConfig: Any = xiq.QuantizationConfig
        self.QuantizationSpec: Any = QuantizationSpec
        self.ObserverBase: Any = pt2e.ObserverBase
        self.FakeQuantize: Any = pt2e.FakeQuantize
        self.FusedMovingAvgObsFakeQuantize: Any = pt2e.FusedMovingAvgObsFakeQuantize
        self.MovingAverageMinMaxObserver: Any = pt2e.MovingAverageMinMaxObserver
        self.MovingAveragePerChannelMinMaxObserver: Any = pt2e.MovingAveragePerChannelMinMaxObserver


_CACHE: dict[str, _PT2E] = {}


def torchao_pt2e() -> _PT2E:
    """torchao's PT2E API, imported once.

    Raises:
        BackendNotFoundError: torchao is not importable; says how to install it.
    """
    if "pt2e" not in _CACHE:
        _CACHE["pt2e"] = _PT2E()
    return _CACHE["pt2e"]
