"""Search phases shared by several strategies: op-type-wise settings and ranked fallback."""

from __future__ import annotations

from collections.abc import Generator, Sequence

from inc_core._quant_config import QuantConfig
from inc_core.tuning._space import MODEL_WIDE, SearchSpace, Settings
from inc_core.tuning.strategies._base import Strategy

__all__ = ["op_type_wise", "single_fallbacks", "accumulated_fallbacks", "doubling_fallbacks", "space_size"]


def op_type_wise(strategy: Strategy, settings: Settings) -> Generator[list[QuantConfig], None, dict[tuple[str, str], str]]:
    """Tune each op type's settings one change at a time; the best change per type is kept if it helps.

    For each op type, one batch holds every single change of one setting to one of its other choices,
    on top of what earlier op types kept. The best-scoring change of the batch is kept when it beats
    the current point, so changes accumulate across op types. Op types holding more quantized ops come
    first (ties in model order): a change to them moves more of the model, and under a trial budget the
    search must not spend it on a transformer's single patch-embedding Conv or Concat while its dozens
    of MatMuls and Adds wait.

    Returns (as the generator's value): the accumulated settings.
    """
    space = strategy.space
    current = dict(settings)
    current_score = strategy.score_of(space.config(current))
    for op_type in sorted(space.op_types, key=lambda t: -_ops_moved(space, t)):
        points: list[dict[tuple[str, str], str]] = []
        for tunable in space.tunables_of(op_type):
            now = space.value(current, tunable)
            points.extend({**current, tunable.key: choice} for choice in tunable.choices if choice != now)
        if not points:
            continue
        configs = [space.config(p) for p in points]
        yield configs
        scored = [(p, s) for p, c in zip(points, configs) if (s := strategy.score_of(c)) is not None]
        if not scored:
            continue
        point, score = strategy.history.criterion.best(scored, lambda ps: ps[1])
        if current_score is None or strategy.history.criterion.better(score, current_score):
            current, current_score = point, score
    return current


def _ops_moved(space: SearchSpace, op_type: str) -> int:
    """How many quantized ops a setting of ``op_type`` changes (a model-wide setting, SmoothQuant, changes all)."""
    return len(space.quantized) if op_type == MODEL_WIDE else len(space.ops_of(op_type))


def single_fallbacks(strategy: Strategy, settings: Settings) -> list[QuantConfig]:
    """One config per quantized op with that op alone kept in FP32, in model order."""
    return [strategy.space.config(settings, [name]) for name in strategy.space.quantized]


def accumulated_fallbacks(strategy: Strategy, settings: Settings, ranked: Sequence[str]) -> list[QuantConfig]:
    """Configs with the first 1, 2, ... ops of ``ranked`` in FP32 (the engine stops at the first that passes)."""
    return [strategy.space.config(settings, ranked[:k]) for k in range(1, len(ranked) + 1)]


def doubling_fallbacks(strategy: Strategy, settings: Settings, ranked: Sequence[str]) -> list[QuantConfig]:
    """Configs with the first 1, 2, 4, 8, ... ops of ``ranked`` in FP32, the last with all of them.

    For a ranking by measured error: on a model whose error is spread over many ops (a transformer's
    residual adds and feed-forward outputs, dozens of ops in all) the passing set is found in about
    log2(ops) trials instead of one trial per op, at the price of at most twice the ops the one-by-one
    walk would have kept in FP32 along the same ranking.
    """
    sizes: list[int] = []
    size = 1
    while size < len(ranked):
        sizes.append(size)
        size *= 2
    sizes.append(len(ranked))
    return [strategy.space.config(settings, ranked[:k]) for k in sizes if k > 0]


def space_size(strategy: Strategy) -> int:
    """How many distinct points the random and bayesian strategies can draw (settings x fallback sets)."""
    size = 2 ** len(strategy.space.quantized)
    for tunable in strategy.space.tunables:
        size *= len(tunable.choices)
    return size
