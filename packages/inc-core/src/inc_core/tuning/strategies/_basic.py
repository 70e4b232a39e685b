"""The basic strategy: base config, op-type-wise settings, then FP32 fallback ranked by measured gain."""

from __future__ import annotations

from collections.abc import Iterator

from inc_core._quant_config import QuantConfig
from inc_core.tuning.strategies._base import Strategy
from inc_core.tuning.strategies._phases import accumulated_fallbacks, op_type_wise, single_fallbacks

__all__ = ["BasicStrategy"]


class BasicStrategy(Strategy):
    """The default search, cheap when quantization mostly works.

    1. The base config.
    2. Op-type-wise: for each op type, each other choice of each tunable setting, one change at a
       time; the best change per op type is kept when it improves the score, so changes accumulate.
    3. Each quantized op alone in FP32 (on top of step 2's settings), ranked by the score it gains.
    4. The ranked ops put in FP32 together, 1, 2, ... at a time, until a config passes.

    A failed trial (the backend could not quantize the config) counts as below the goal: in step 2 it
    is never kept, and in step 3 an op whose single fallback failed is ranked after every op that
    produced a score, so it still goes to FP32 in the last configs of step 4.
    """

    name = "basic"

    def search(self) -> Iterator[list[QuantConfig]]:
        yield [self.space.config()]
        settings = yield from op_type_wise(self, {})
        singles = single_fallbacks(self, settings)
        yield singles
        scored = [(name, s) for name, c in zip(self.space.quantized, singles) if (s := self.score_of(c)) is not None]
        ranked = [name for name, _ in self.history.criterion.rank(scored, lambda ns: ns[1])]
        ranked += [name for name in self.space.quantized if name not in ranked]  # failed single fallbacks last
        yield accumulated_fallbacks(self, settings, ranked)
