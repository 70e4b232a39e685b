"""The random strategy: seeded uniform sampling of settings and fallback sets, never repeating a config."""

from __future__ import annotations

import random
from collections.abc import Iterator

from inc_core._quant_config import QuantConfig
from inc_core.tuning.strategies._base import Strategy
from inc_core.tuning.strategies._phases import space_size

__all__ = ["RandomStrategy"]

# Configs per batch, so a parallel executor has work to share; the engine still stops at the first pass.
BATCH = 8


class RandomStrategy(Strategy):
    """Uniform samples over the same variables as ``bayesian``, reproducible from ``TuningConfig.seed``.

    The variables: per op type, each tunable setting (one of its choices); per quantized op, whether
    it stays in FP32. The base config comes first; after that, points are drawn without replacement
    (a point's index in the mixed-radix space is drawn until an unseen one comes up), so no config is
    evaluated twice and the strategy ends once the whole space has been seen.
    """

    name = "random"

    def search(self) -> Iterator[list[QuantConfig]]:
        rng = random.Random(self.context.config.seed)
        total = space_size(self)
        base = self.space.config()
        seen = {base.to_json()}
        yield [base]
        drawn: set[int] = set()
        # As many as the executor runs at once: the draws (and so the trials) do not depend on it.
        size = max(BATCH, self.context.batch_size)
        while len(drawn) < total:
            batch: list[QuantConfig] = []
            while len(batch) < size and len(drawn) < total:
                index = rng.randrange(total)
                if index in drawn:
                    continue
                drawn.add(index)
                config = self._decode(index)
                if config.to_json() not in seen:  # the base point may have an index of its own
                    seen.add(config.to_json())
                    batch.append(config)
            yield batch

    def _decode(self, index: int) -> QuantConfig:
        settings: dict[tuple[str, str], str] = {}
        for tunable in self.space.tunables:
            index, digit = divmod(index, len(tunable.choices))
            settings[tunable.key] = tunable.choices[digit]
        fallback = []
        for name in self.space.quantized:
            index, bit = divmod(index, 2)
            if bit:
                fallback.append(name)
        return self.space.config(settings, fallback)
