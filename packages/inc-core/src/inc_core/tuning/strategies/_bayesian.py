"""The bayesian strategy: optuna's TPE sampler over op-type settings and per-op fallback."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

from inc_core._quant_config import QuantConfig
from inc_core.errors import ConfigError
from inc_core.tuning.strategies._base import Strategy, StrategyContext
from inc_core.tuning.strategies._phases import space_size

__all__ = ["BayesianStrategy"]

# TPE may keep suggesting points it has already seen once the good region is small; after this many
# repeats in a row the search is treated as converged.
MAX_REPEATS = 200
_FP32 = "fp32:"


class BayesianStrategy(Strategy):
    """Tree-structured Parzen estimator search (optuna), seeded with ``TuningConfig.seed``.

    The variables: per op type and tunable setting a categorical over its choices, and per
    quantized op a boolean "keep in FP32". The base config is evaluated first and given to the
    sampler as a finished trial. Optuna's ask/tell interface keeps the engine in charge of
    evaluation, budget and stopping; a point optuna suggests again is answered from the history
    without a new trial. A failed trial (the backend could not quantize the point) is told to the
    sampler as ``TrialState.FAIL``, which TPE leaves out of its model of good and bad regions.

    With a parallel executor (``StrategyContext.batch_size`` > 1) each batch holds that many new
    points, asked while the earlier ones of the batch are still pending; TPE's constant liar keeps
    them apart. The search is then reproducible for a given seed and batch size, but it is not the
    sequential search (which tells the sampler each score before the next ask), so its choice may differ.

    Raises:
        ConfigError: optuna is not installed.
    """

    name = "bayesian"

    def __init__(self, context: StrategyContext) -> None:
        super().__init__(context)
        try:
            # Imported here: an optional dependency, and slow to import. Through importlib so that type
            # checking does not need optuna installed.
            optuna = importlib.import_module("optuna")
        except ImportError as exc:
            raise ConfigError(
                "TuningConfig: strategy='bayesian' needs optuna, which is not installed. "
                "Install it with `pip install optuna` (or `pip install inc-core[bayesian]`), or choose another strategy."
            ) from exc
        self._optuna: Any = optuna

    def search(self) -> Iterator[list[QuantConfig]]:
        optuna = self._optuna
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one INFO line per trial is the engine's job
        try:
            yield from self._search(optuna)
        finally:
            optuna.logging.set_verbosity(verbosity)

    def _search(self, optuna: Any) -> Iterator[list[QuantConfig]]:
        space = self.space
        batch_size = max(1, self.context.batch_size)
        distributions = {t.label: optuna.distributions.CategoricalDistribution(t.choices) for t in space.tunables}
        distributions.update(
            {_FP32 + name: optuna.distributions.CategoricalDistribution((False, True)) for name in space.quantized}
        )
        study = optuna.create_study(
            direction="maximize" if self.context.config.higher_is_better else "minimize",
            sampler=optuna.samplers.TPESampler(seed=self.context.config.seed, constant_liar=batch_size > 1),
        )
        base = space.config()
        yield [base]
        base_trial = self.history.get(base)
        base_params: dict[str, Any] = {t.label: space.current(t.op_type, t.setting) for t in space.tunables}
        base_params.update({_FP32 + name: False for name in space.quantized})
        # With a restricted search space the base value may not be one of the choices: then the base
        # config is not a point of the space and the sampler cannot be told about it.
        base_is_point = all(base_params[t.label] in t.choices for t in space.tunables)
        if base_trial is not None and base_is_point:
            if base_trial.failed:
                study.add_trial(
                    optuna.trial.create_trial(
                        params=base_params, distributions=distributions, state=optuna.trial.TrialState.FAIL
                    )
                )
            else:
                study.add_trial(
                    optuna.trial.create_trial(params=base_params, distributions=distributions, value=base_trial.score)
                )
        seen = {base.to_json()} if base_is_point else set()
        total, repeats = space_size(self), 0
        while len(seen) < total and repeats < MAX_REPEATS:
            asked: list[tuple[Any, QuantConfig]] = []  # asked points whose score comes with this batch
            fresh: dict[str, QuantConfig] = {}
            while len(fresh) < batch_size and len(seen) + len(fresh) < total and repeats < MAX_REPEATS:
                trial = study.ask(distributions)
                settings = {t.key: trial.params[t.label] for t in space.tunables}
                fallback = [name for name in space.quantized if trial.params[_FP32 + name]]
                config = space.config(settings, fallback)
                done = self.history.get(config)
                if done is not None:  # seen before: answered from the history at once
                    repeats += 1
                    self._tell(study, trial, done)
                    continue
                repeats = repeats + 1 if config.to_json() in fresh else 0
                fresh.setdefault(config.to_json(), config)
                asked.append((trial, config))
            if not fresh:
                return
            yield list(fresh.values())
            for trial, config in asked:
                done = self.history.get(config)
                if done is None:
                    return  # the engine stopped before evaluating it
                self._tell(study, trial, done)
            seen.update(fresh)

    def _tell(self, study: Any, trial: Any, done: Any) -> None:
        if done.failed:
            study.tell(trial, state=self._optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, done.score)
