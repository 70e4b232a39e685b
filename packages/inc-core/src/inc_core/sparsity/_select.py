"""Which of a model's prunable layers a PruneConfig selects: the same rules and messages for every framework."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from inc_core._prune_config import PruneConfig
from inc_core.backend import Op
from inc_core.errors import ConfigError

__all__ = ["select_layers"]


def select_layers(candidates: Sequence[Op], config: PruneConfig, *, model_types: Iterable[str], model: str) -> list[str]:
    """Names of the candidate layers ``config`` prunes, after ``include_types`` and ``exclude``.

    Args:
        candidates: the layers a plugin can prune (already filtered by ``include_types`` when it is set),
            named and typed as the plugin reports them.
        config: the pruning recipe.
        model_types: every layer type of the model, listed when ``include_types`` names one it lacks.
        model: how to name the model in messages.

    Raises:
        ConfigError: ``include_types`` naming no candidate, ``exclude`` naming nothing (with close names),
            or no layer left to prune.
    """
    if config.include_types:
        found = {op.op_type for op in candidates}
        missing = [t for t in config.include_types if t not in found]
        if missing:
            raise ConfigError(
                f"PruneConfig: include_types {missing} match no prunable layer of {model}; its layer types are "
                f"{sorted(set(model_types))}."
            )
    excluded = set(config.exclude.select(candidates)) if config.exclude else set()
    selected = [op.name for op in candidates if op.name not in excluded]
    if not selected:
        raise ConfigError(
            f"PruneConfig: no layer left to prune in {model} (candidates: {[op.name for op in candidates]}, excluded: "
            f"{sorted(excluded)}). Prune layers with a weight matrix or kernel (dense, convolution) and exclude fewer."
        )
    return selected
