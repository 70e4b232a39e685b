"""The conservative strategy: start with every op in FP32 and quantize back what keeps the goal."""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence

from inc_core._quant_config import QuantConfig
from inc_core.tuning._trial import Trial, trial_score
from inc_core.tuning.strategies._base import Strategy

__all__ = ["ConservativeStrategy"]


class ConservativeStrategy(Strategy):
    """Accuracy first: the result is the most-quantized config found that still meets the goal.

    1. Every quantized op in FP32 (a check that the pipeline itself keeps the score).
    2. Op types back one at a time, in model order: a type whose ops can all be quantized together
       and still pass stays quantized, otherwise it goes back to FP32.
    3. For each op type that did not pass as a whole, its ops one at a time, kept when they pass.

    Base settings are used throughout; this strategy decides only which ops are quantized. It
    does not stop at the first passing trial (step 1 passes trivially): it runs to the end and
    :meth:`pick` returns the passing trial with the most ops quantized.
    """

    name = "conservative"
    stops_at_first_met = False

    def search(self) -> Iterator[list[QuantConfig]]:
        space = self.space
        fp32 = list(space.quantized)
        yield [space.config(fallback=fp32)]
        rejected: list[str] = []
        for op_type in space.quantized_types:
            trial_fp32 = [name for name in fp32 if name not in space.ops_of(op_type)]
            if (yield from self._passes(trial_fp32)):
                fp32 = trial_fp32
            else:
                rejected.append(op_type)
        for op_type in rejected:
            ops = space.ops_of(op_type)
            if len(ops) < 2:
                continue  # the single op was tried as its type
            for name in ops:
                trial_fp32 = [n for n in fp32 if n != name]
                if (yield from self._passes(trial_fp32)):
                    fp32 = trial_fp32

    def _passes(self, fallback: list[str]) -> Generator[list[QuantConfig], None, bool]:
        config = self.space.config(fallback=fallback)
        yield [config]
        trial = self.history.get(config)
        return trial is not None and trial.met

    def pick(self, passing: Sequence[Trial]) -> Trial:
        """The passing trial with the fewest ops in FP32; the best score among those."""
        fewest = min(len(t.delta.get("fallback", ())) for t in passing)
        return self.history.criterion.best([t for t in passing if len(t.delta.get("fallback", ())) == fewest], trial_score)
