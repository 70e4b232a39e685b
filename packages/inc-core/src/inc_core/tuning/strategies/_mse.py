"""The mse strategy: like basic, but ranks FP32 fallbacks by the backend's per-op output error."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping

from inc_core._quant_config import QuantConfig
from inc_core.backend import Backend
from inc_core.errors import TuningError
from inc_core.tuning.strategies._base import Strategy, StrategyContext
from inc_core.tuning.strategies._phases import doubling_fallbacks, op_type_wise

__all__ = ["MseStrategy"]

log = logging.getLogger("inc")


class MseStrategy(Strategy):
    """Fallback order from measured per-op error instead of one trial per op.

    1. The base config. 2. Op-type-wise settings, as in ``basic``. 3. ``Backend.op_errors`` on the
    resulting config ranks the quantized ops, highest output error first; no single-op fallback is
    evaluated. 4. The top 1, 2, 4, 8, ... ranked ops go to FP32 together until a config passes.
    On models with many ops this saves one trial per op, and the doubling finds a fallback spread
    over dozens of ops (a transformer's residual adds and feed-forward outputs) in a few trials. When the backend cannot measure the errors
    of that config (its quantizer fails on it), the ops are ranked in model order, with a warning.

    Raises:
        TuningError: the backend does not implement ``op_errors``.
    """

    name = "mse"

    def __init__(self, context: StrategyContext) -> None:
        super().__init__(context)
        # Fail before the baseline is evaluated rather than halfway through the search.
        if type(context.backend).op_errors is Backend.op_errors:
            raise no_op_errors(context.backend)

    def search(self) -> Iterator[list[QuantConfig]]:
        yield [self.space.config()]
        settings = yield from op_type_wise(self, {})
        errors: Mapping[str, float]
        try:
            errors = self.context.op_errors(self.space.config(settings))
        except TuningError as exc:  # the backend failed on this config; fallback still has to be searched
            log.warning("mse: per-op errors could not be measured, ranking the ops in model order: %s", exc)
            errors = {}
        ranked = sorted(self.space.quantized, key=lambda name: -errors.get(name, 0.0))
        yield doubling_fallbacks(self, settings, ranked)


def no_op_errors(backend: Backend) -> TuningError:
    """The error for a backend that cannot measure per-op output error."""
    return TuningError(
        f"the {backend.name} backend does not report per-op errors; use strategy='basic' "
        "(or another strategy that ranks fallbacks by measured score)."
    )
