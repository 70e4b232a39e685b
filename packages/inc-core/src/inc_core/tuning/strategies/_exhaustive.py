"""The exhaustive strategy: every combination of op-type settings, then every fallback set by size."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import TypeVar

from inc_core._quant_config import QuantConfig
from inc_core.tuning.strategies._base import Strategy

__all__ = ["ExhaustiveStrategy"]

T = TypeVar("T")

# Candidates per batch: big enough for a parallel executor, small enough that proposing never
# materialises a huge product up front.
BATCH = 32


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


class ExhaustiveStrategy(Strategy):
    """Try everything, in a deterministic order, until a config passes or the budget ends.

    1. Every combination of the op-type settings (``itertools.product`` over the tunable settings in
       model order, each with the base value first, so the first trial is the base config).
    2. On the best combination: every set of ops in FP32, single ops first, then pairs, triples, ...
       (``itertools.combinations`` in model order).

    The number of trials grows as the product of the choices times ``2**ops``; ``max_trials`` and
    ``timeout_s`` bound it in practice.
    """

    name = "exhaustive"

    def search(self) -> Iterator[list[QuantConfig]]:
        tunables = self.space.tunables
        size = max(BATCH, self.context.batch_size)  # chunking groups the same order of trials
        points = (dict(zip((t.key for t in tunables), values)) for values in itertools.product(*(t.choices for t in tunables)))
        best: tuple[dict[tuple[str, str], str], float] | None = None
        criterion = self.history.criterion
        for chunk in _chunks(points, size):
            configs = [self.space.config(p) for p in chunk]
            yield configs
            for point, config in zip(chunk, configs):
                score = self.score_of(config)
                if score is not None and (best is None or criterion.better(score, best[1])):
                    best = (point, score)
        settings = best[0] if best is not None else {}
        names = self.space.quantized
        subsets = itertools.chain.from_iterable(itertools.combinations(names, k) for k in range(1, len(names) + 1))
        for chunk_sets in _chunks(subsets, size):
            yield [self.space.config(settings, subset) for subset in chunk_sets]
