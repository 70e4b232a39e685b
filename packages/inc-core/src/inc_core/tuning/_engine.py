"""autotune: the accuracy-driven tuning loop around a backend, a strategy and the user's eval_fn."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from inc_core._api import as_dataset
from inc_core._dataset import Dataset
from inc_core._quant_config import QuantConfig
from inc_core._registry import resolve_backend
from inc_core._tuning_config import TuningConfig
from inc_core.backend import Backend, TuningSpace
from inc_core.errors import CalibrationError, ConfigError, DatasetError, IncError, TuningError
from inc_core.tuning._criterion import Criterion, evaluate
from inc_core.tuning._executor import Executor, executor_for
from inc_core.tuning._history import History
from inc_core.tuning._result import TuningResult
from inc_core.tuning._space import SearchSpace, config_delta, describe_delta
from inc_core.tuning._trial import Trial, describe_failure, trial_score
from inc_core.tuning.strategies import REGISTRY, Strategy, StrategyContext
from inc_core.tuning.strategies._mse import no_op_errors

__all__ = ["autotune"]

log = logging.getLogger("inc")


def autotune(
    model: Any,
    config: TuningConfig | None = None,
    *,
    eval_fn: Callable[[Any], float],
    dataset: Any = None,
    backend: str | Backend | None = None,
    executor: Executor | None = None,
) -> TuningResult:
    """Search for a quantization config whose model scores within the tolerable loss of the FP32 model.

    The FP32 model is evaluated once for the baseline; calibration runs once (static quantization)
    and every trial reuses it. The strategy proposes configs derived from ``config.base``, the
    executor quantizes and evaluates them, and the search stops at the first config that meets the
    goal (or, with ``keep_searching``, returns the best passing one), at ``max_trials``, at
    ``timeout_s``, or when the strategy has nothing left to try. Every trial is written to
    ``config.history`` as it finishes; given the same file again, tuning resumes without
    re-evaluating finished trials (delete the file when the model or ``eval_fn`` changes).

    Args:
        model: the FP32 model (never modified).
        config: the search; ``TuningConfig()`` when omitted.
        eval_fn: ``eval_fn(model) -> float``, the user's evaluation (accuracy, loss, ...), called for
            the FP32 model and for each trial's quantized model.
        dataset: calibration samples (an ``inc.Dataset`` or what it accepts); required for static
            quantization and for the ``mse`` strategy.
        backend: a backend name or instance instead of the one found from the model's type.
        executor: runs trials; default: the one ``config.executor`` names (``"sequential"``: in this
            process, one at a time; ``"ray"``: a :class:`~inc_core.tuning.RayExecutor` created for
            this run and shut down after it).

    A config the backend cannot quantize (its quantizer raises) is a *failed trial*: it is recorded
    in the history and the report with its cause, logged, treated by the strategy like a trial below
    the goal, and the search goes on. A resumed run does not retry it.

    Returns:
        A :class:`TuningResult`; when no trial meets the goal, the best-scoring one with ``met=False``.

    Raises:
        ConfigError: a bad config, ``eval_fn`` not callable, exclude names that match no op.
        DatasetError: no dataset where one is needed.
        CalibrationError: calibration (run once, before the first static trial) failed.
        EvaluationError: ``eval_fn`` raised or returned a non-finite or non-numeric value.
        TuningError: an unusable history file, a strategy the backend cannot serve, or no trial produced
            a model (the message lists the distinct causes).
        SaveError: the history file's directory does not exist.
    """
    started = time.monotonic()
    config = TuningConfig() if config is None else config
    if not isinstance(config, TuningConfig):
        raise ConfigError(f"autotune: config must be an inc.TuningConfig, got {type(config).__name__}.")
    if not callable(eval_fn):
        raise ConfigError(f"autotune: eval_fn must be a callable model -> float, got {type(eval_fn).__name__}.")
    if executor is not None and not isinstance(executor, Executor):
        raise ConfigError(f"autotune: executor must have a map(fn, candidates) method, got {type(executor).__name__}.")
    impl = resolve_backend(model, backend)
    base = config.base
    impl.check_format(base.format)
    impl.check_smooth_quant(base)
    impl.check_bf16(base)
    if config.fallback_precision == "bf16":
        reason = impl.bf16_unavailable(base)
        if reason is not None:
            raise ConfigError(
                f"autotune: fallback_precision='bf16' puts ops that lose accuracy in INT8 into BF16, but {reason}. "
                "Use fallback_precision='fp32'."
            )
    if config.smooth_quant_alphas and not impl.supports_smooth_quant:
        raise ConfigError(
            f"autotune: smooth_quant_alphas={list(config.smooth_quant_alphas)} but the {impl.name} backend does not "
            "implement SmoothQuant (the onnx and torch backends do); set smooth_quant_alphas=()."
        )
    described = impl.describe(model, base)
    base.exclude.select(described.ops)  # a typo in exclude names fails here, before any work
    base.bf16.select(described.ops)
    if not described.ops:
        raise TuningError(
            f"autotune: the {impl.name} backend found no quantizable op in the model (approach={base.approach!r}); "
            "there is nothing to tune. Check the model, or try the other approach."
        )
    space = SearchSpace(
        base,
        described.restricted(config.search_space),
        config.smooth_quant_alphas,
        fallback_precision=config.fallback_precision,
        bf16_candidates=impl.bf16_candidates(model, base) if config.fallback_precision == "bf16" else None,
    )
    if not space.quantized:
        raise ConfigError(
            f"autotune: config.base.exclude keeps every op of the model in FP32 or config.base.bf16 in BF16 "
            f"({list(described.names)}); there is nothing to quantize. Exclude fewer ops."
        )
    data = _dataset_for(config, dataset)
    calibration = _Calibration(impl, model, data, base)
    probe = _first_batch(data) if base.approach == "dynamic" else None
    strategy_cls = REGISTRY.get(config.strategy)
    if strategy_cls is None:
        raise ConfigError(f"autotune: no strategy named {config.strategy!r}; choose one of {sorted(REGISTRY)}.")
    history = History(
        config.history,
        fingerprint=_fingerprint(impl, described),
        backend=impl.name,
        strategy=config.strategy,
        weights=impl.weights_digest(model) if config.history is not None else None,
    )
    owned = executor is None  # created here from the config (a Ray cluster is joined only now): closed here
    executor = executor_for(config) if executor is None else executor
    try:
        strategy = strategy_cls(
            StrategyContext(
                space=space,
                config=config,
                backend=impl,
                op_errors=lambda cfg: _op_errors(impl, model, cfg, calibration, data),
                batch_size=max(1, int(getattr(executor, "workers", 1) or 1)),
            )
        )
        run = _Run(model, config, eval_fn, impl, space, strategy, history, executor, calibration, started, probe)
        try:
            return run.run()
        finally:
            strategy.close()
    finally:
        close = getattr(executor, "close", None)
        if owned and callable(close):
            close()


def _dataset_for(config: TuningConfig, dataset: Any) -> Dataset | None:
    if config.base.approach == "static":
        return as_dataset(dataset, what="autotune(dataset=...)")
    if config.strategy == "mse" and dataset is None:
        raise DatasetError(
            "autotune: strategy='mse' needs dataset= to measure per-op errors; pass inc.Dataset(samples) "
            "or choose strategy='basic'."
        )
    return as_dataset(dataset) if dataset is not None else None


def _first_batch(data: Dataset | None) -> Dataset | None:
    """The dataset's first batch as a dataset of its own: what each dynamic trial's model is run on.

    Static trials are checked on their calibration's example; a dynamic trial has no calibration, so without
    this a model that breaks when called (a layer the code around it reads as float) would reach ``eval_fn``
    and end the run as an :class:`~inc_core.errors.EvaluationError` instead of failing that trial alone. One
    batch, read once here, is also all a distributed executor ships to its workers.
    """
    if data is None:
        return None
    return Dataset([next(data.inputs(limit=1))])  # Dataset.inputs raises DatasetError when it holds none


def _fingerprint(impl: Backend, space: TuningSpace) -> str:
    """Identifies a model by its backend and its ops, so a history file is not applied to another model."""
    payload = json.dumps([impl.name, [[op.name, op.op_type] for op in space.ops]])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def smooth_quant_key(config: QuantConfig) -> str:
    """Which calibration a config needs: SmoothQuant rescales the model, so each alpha has its own."""
    return "off" if config.smooth_quant is None else repr(config.smooth_quant.alpha)


class _Calibration:
    """Runs ``Backend.calibrate`` at most once per SmoothQuant setting, when a static trial first needs it.

    The base config's calibration failing ends the run (no trial could produce a model). A SmoothQuant
    calibration failing is kept as the exception: the trials that need it fail with its cause, and the
    search goes on without SmoothQuant.
    """

    def __init__(self, impl: Backend, model: Any, data: Dataset | None, base: QuantConfig) -> None:
        self._impl, self._model, self._data, self._base = impl, model, data, base
        self._results: dict[str, Any] = {}

    def get(self, config: QuantConfig | None = None) -> Any:
        if self._base.approach != "static":
            return None
        config = self._base if config is None else config
        key = smooth_quant_key(config)
        if key not in self._results:
            self._results[key] = self._calibrate(config, key)
        return self._results[key]

    def _calibrate(self, config: QuantConfig, key: str) -> Any:
        assert self._data is not None  # _dataset_for requires it for static
        wanted = dataclasses.replace(self._base, smooth_quant=config.smooth_quant)
        once = "once for all trials" if key == smooth_quant_key(self._base) else f"for smooth_quant alpha={key}"
        log.info("calibrating %s on up to %d samples (%s)", self._impl.name, self._base.calib_samples, once)
        try:
            return self._impl.calibrate(self._model, self._data, wanted)
        except Exception as exc:
            if wanted.smooth_quant is not None and wanted.smooth_quant != self._base.smooth_quant:
                log.warning("SmoothQuant alpha=%s: calibration failed, its trials fail: %s", key, describe_failure(exc))
                return _FailedCalibration(describe_failure(exc))
            if isinstance(exc, IncError):
                raise
            # every trial needs the calibration: no trial could produce a model
            raise CalibrationError(
                f"autotune: the {self._impl.name} backend failed to calibrate the model ({describe_failure(exc)}). "
                "Check that the dataset's batches are inputs the model accepts."
            ) from exc


@dataclass(frozen=True)
class _FailedCalibration:
    """A SmoothQuant calibration that raised: the trials needing it fail with this cause."""

    cause: str


def _op_errors(impl: Backend, model: Any, cfg: QuantConfig, calibration: _Calibration, data: Dataset | None) -> Mapping[str, float]:
    if data is None:
        raise DatasetError("autotune: per-op errors need dataset=; pass inc.Dataset(samples).")
    collected = calibration.get(cfg)
    if isinstance(collected, _FailedCalibration):
        raise TuningError(f"the {impl.name} backend could not calibrate for SmoothQuant: {collected.cause}")
    try:
        errors = impl.op_errors(model, cfg, calibration=collected, dataset=data)
    except NotImplementedError as exc:
        raise no_op_errors(impl) from exc
    except (DatasetError, TuningError):
        raise  # the user's data does not fit the model; a strategy cannot work around that
    except Exception as exc:  # the backend failing on this config, as in a failed trial: the strategy decides
        raise TuningError(f"the {impl.name} backend failed to measure per-op errors: {describe_failure(exc)}") from exc
    if not isinstance(errors, Mapping) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) for v in errors.values()
    ):
        raise TuningError(
            f"the {impl.name} backend's op_errors returned {type(errors).__name__}; expected a mapping op name -> "
            "error (a number). This is a bug in the backend plugin."
        )
    return {str(k): float(v) for k, v in errors.items()}


@dataclass(frozen=True)
class _Outcome:
    """What one trial gave: a model and its score, or (a failed trial) the backend's error as text."""

    score: float | None
    model: Any
    time_s: float
    error: str | None = None
    worker: str | None = None  # where the trial ran, set by a parallel executor (host:pid)


class _TrialFn:
    """Quantize one config with the shared calibration and evaluate it (what an executor runs).

    A backend failure is caught here, not in the engine, so that it becomes a failed-trial outcome
    whatever executor runs the function (in this process, a pool, a Ray worker): the outcome holds
    plain text, never the exception object. The user's ``eval_fn`` raising is not caught: that is
    an :class:`~inc_core.errors.EvaluationError` and ends the run.
    """

    def __init__(
        self,
        impl: Backend,
        model: Any,
        eval_fn: Callable[[Any], Any],
        calibrations: Mapping[str, Any],
        base: QuantConfig,
        probe: Dataset | None = None,
    ) -> None:
        self.impl, self.model, self.eval_fn, self.base = impl, model, eval_fn, base
        self.calibrations = dict(calibrations)  # smooth_quant_key -> that setting's calibration
        self.probe = probe  # the first batch, for dynamic trials (see _first_batch)

    def __call__(self, candidate: tuple[int, QuantConfig]) -> _Outcome:
        trial_id, config = candidate
        start = time.perf_counter()
        change = describe_delta(config_delta(self.base, config))
        calibration = self.calibrations.get(smooth_quant_key(config))
        if isinstance(calibration, _FailedCalibration):
            return _Outcome(None, None, 0.0, f"SmoothQuant calibration failed: {calibration.cause}")
        try:
            quantized = self.impl.quantize(self.model, config, calibration=calibration)
            if config.approach == "dynamic" and self.probe is not None:
                self.impl.check_quantized_runs(self.model, quantized, self.probe)  # as inc.quantize does with data
        except Exception as exc:  # a framework's quantizer raising, an unsupported op: a failed trial
            log.debug("trial %d (%s): the %s backend failed", trial_id, change, self.impl.name, exc_info=True)
            return _Outcome(None, None, time.perf_counter() - start, describe_failure(exc))
        score = evaluate(self.eval_fn, quantized, f"trial {trial_id} ({change})")
        return _Outcome(score, quantized, time.perf_counter() - start)

    def failure(self, candidate: tuple[int, QuantConfig], reason: str) -> _Outcome:
        """The failed-trial outcome of a candidate the executor lost (its worker process died)."""
        return _Outcome(None, None, 0.0, reason)


class _Run:
    """One tuning run: baseline, the propose/evaluate loop, and the final choice."""

    def __init__(
        self,
        model: Any,
        config: TuningConfig,
        eval_fn: Callable[[Any], Any],
        impl: Backend,
        space: SearchSpace,
        strategy: Strategy,
        history: History,
        executor: Executor,
        calibration: _Calibration,
        started: float,
        probe: Dataset | None = None,
    ) -> None:
        self.model, self.config, self.eval_fn, self.impl = model, config, eval_fn, impl
        self.space, self.strategy, self.history, self.executor = space, strategy, history, executor
        self.calibration, self.started, self.probe = calibration, started, probe
        self.criterion: Criterion | None = None
        self.kept: tuple[int, Any] | None = None  # (trial id, model): only the current choice's model is held
        self.trial_fn: _TrialFn | None = None  # one per run, so a distributed executor ships the model once

    def run(self) -> TuningResult:
        config = self.config
        if self.history.baseline is not None:
            baseline = self.history.baseline
            log.info("baseline %.6g read from %s", baseline, config.history)
        else:
            baseline = evaluate(self.eval_fn, self.model, "the FP32 baseline model")
            log.info("baseline (FP32) score: %.6g", baseline)
        self.criterion = Criterion(
            baseline=baseline,
            tolerable_loss=config.tolerable_loss,
            loss_type=config.loss_type,
            higher_is_better=config.higher_is_better,
        )
        self.history.start(baseline, self.criterion)
        quiet = not log.isEnabledFor(logging.INFO)
        with tqdm(total=config.max_trials, desc="tuning", unit="trial", disable=True if quiet else None) as bar:
            reason = None
            while reason is None:
                reason = self._step(bar)
        return self._finish(reason)

    def _stop_reason(self) -> str | None:
        trials = self.history.trials
        if len(trials) >= self.config.max_trials:
            return "max_trials"
        if trials and self.config.timeout_s is not None and time.monotonic() - self.started >= self.config.timeout_s:
            return "timeout"  # checked only after a first trial, so there is always a result
        return None

    def _step(self, bar: Any) -> str | None:
        """Propose and evaluate one batch; the reason to stop, or None to go on."""
        if (reason := self._stop_reason()) is not None:
            return reason
        batch = self.strategy.propose(self.history)
        if not batch:
            return "exhausted"
        budget = self.config.max_trials - len(self.history.trials)
        todo: dict[str, QuantConfig] = {}
        for candidate in batch:
            key = candidate.to_json()
            if self.history.get(candidate) is None and key not in todo:  # a config is tried once per run
                todo[key] = candidate
        first_id = len(self.history.trials) + 1
        planned = [(first_id + i, c) for i, c in enumerate(list(todo.values())[:budget])]
        fresh = [(i, c) for i, c in planned if self.history.stored(c) is None]
        needed = {smooth_quant_key(c): c for _, c in fresh}
        if needed and (self.trial_fn is None or not needed.keys() <= self.trial_fn.calibrations.keys()):
            # A new SmoothQuant setting needs its own calibration: a new trial function (shipped again to workers).
            known = self.trial_fn.calibrations if self.trial_fn is not None else {}
            calibrations = {**known, **{key: self.calibration.get(c) for key, c in needed.items() if key not in known}}
            self.trial_fn = _TrialFn(self.impl, self.model, self.eval_fn, calibrations, self.space.base, self.probe)
        results: Iterator[_Outcome] = iter(self.executor.map(self.trial_fn, fresh) if self.trial_fn is not None else ())
        try:
            for trial_id, candidate in planned:
                trial, quantized = self._trial(trial_id, candidate, results)
                self._record(trial, quantized, bar)
                if trial.met and self.strategy.stops_at_first_met and not self.config.keep_searching:
                    return "met"
                if (reason := self._stop_reason()) is not None:
                    return reason
        finally:
            close = getattr(results, "close", None)
            if callable(close):
                close()
        return None

    def _trial(self, trial_id: int, config: QuantConfig, results: Iterator[_Outcome]) -> tuple[Trial, Any]:
        assert self.criterion is not None
        stored = self.history.stored(config)
        error = None
        if stored is not None:  # a failed trial is resumed as failed, not retried
            score, time_s, quantized, status, error = stored.score, stored.time_s, None, "resumed", stored.error
            worker = stored.worker
        else:
            try:
                outcome = next(results)
            except StopIteration:
                raise TuningError(
                    f"the executor {type(self.executor).__name__} returned fewer results than candidates; "
                    "Executor.map must yield one result per candidate, in order."
                ) from None
            score, time_s, quantized, error = outcome.score, outcome.time_s, outcome.model, outcome.error
            worker = outcome.worker
            status = "evaluated" if error is None else "failed"
        trial = Trial(
            id=trial_id,
            config=config.to_dict(),
            delta=config_delta(self.space.base, config),
            score=score if error is None else None,
            met=error is None and score is not None and self.criterion.met(score),
            time_s=time_s,
            status=status,
            error=error,
            worker=worker,
        )
        return trial, quantized

    def _choice(self) -> Trial | None:
        """The trial the run would return now; ``None`` while no trial has produced a model."""
        assert self.criterion is not None
        scored = [t for t in self.history.trials if not t.failed]
        passing = [t for t in scored if t.met]
        if passing:
            return self.strategy.pick(passing)
        return self.criterion.best(scored, trial_score) if scored else None

    def _record(self, trial: Trial, quantized: Any, bar: Any) -> None:
        assert self.criterion is not None
        self.history.add(trial)
        chosen = self._choice()
        if chosen is not None and chosen.id == trial.id:
            self.kept = (trial.id, quantized)  # the previous choice's model is released here
        elif self.kept is not None and (chosen is None or self.kept[0] != chosen.id):
            self.kept = None
        if trial.failed:
            log.warning(
                "trial %d/%d: FAILED in the %s backend, going on with the search (%s)%s: %s",
                trial.id,
                self.config.max_trials,
                self.impl.name,
                trial.change,
                " [from history]" if trial.status == "resumed" else "",
                trial.error,
            )
            bar.set_postfix_str((f"best={chosen.score:.4g}" if chosen is not None and chosen.score is not None else "failed") + self._in_flight(), refresh=False)
            bar.update(1)
            return
        log.info(
            "trial %d/%d: score %.6g (%s; baseline %.6g, goal %s %.6g) %s [%.3g s%s]",
            trial.id,
            self.config.max_trials,
            trial.score,
            "meets the goal" if trial.met else "below the goal",
            self.criterion.baseline,
            ">=" if self.criterion.higher_is_better else "<=",
            self.criterion.threshold,
            trial.change,
            trial.time_s,
            ", from history" if trial.status == "resumed" else "",
        )
        best = self.criterion.best([t for t in self.history.trials if not t.failed], trial_score)
        bar.set_postfix_str(f"best={trial_score(best):.4g}{self._in_flight()}", refresh=False)
        bar.update(1)

    def _in_flight(self) -> str:
        """For the progress bar: trials a parallel executor is running now (the bar counts those done)."""
        running = getattr(self.executor, "in_flight", None)
        return f", in flight={running}" if isinstance(running, int) else ""

    def _finish(self, reason: str) -> TuningResult:
        assert self.criterion is not None
        chosen = self._choice()
        if chosen is None:
            raise self._nothing_produced(reason)
        config, score = chosen.quant_config, trial_score(chosen)
        if self.kept is not None and self.kept[0] == chosen.id and self.kept[1] is not None:
            model = self.kept[1]
        else:  # the chosen trial came from the history file: quantize it again
            try:
                model = self.impl.quantize(self.model, config, calibration=self.calibration.get(config))
            except IncError:
                raise
            except Exception as exc:
                raise TuningError(
                    f"autotune: the {self.impl.name} backend failed to quantize again the config of trial {chosen.id} "
                    f"({chosen.change}), read back from the history file {str(self.config.history)!r}, which worked "
                    f"when it was tried ({describe_failure(exc)}). Delete the history file to search again."
                ) from exc
        if chosen.met:
            log.info("tuning done (%s): trial %d, score %.6g meets the goal", reason, chosen.id, score)
        else:
            log.warning(
                "tuning done (%s): no config met the goal (score %s %.6g); returning the best trial %d, score %.6g",
                reason,
                ">=" if self.criterion.higher_is_better else "<=",
                self.criterion.threshold,
                chosen.id,
                score,
            )
        return TuningResult(
            model=model,
            config=config,
            baseline=self.criterion.baseline,
            score=score,
            met=chosen.met,
            trials=self.history.trials,
            trial_id=chosen.id,
            threshold=self.criterion.threshold,
            tuning=self.config,
            stop_reason=reason,
            elapsed_s=time.monotonic() - self.started,
            executor=str(getattr(self.executor, "description", type(self.executor).__name__)),
            backend=self.impl,
            precisions={op.name: config.precision(op.name, op.op_type) for op in self.space.ops},
        )

    def _nothing_produced(self, reason: str) -> TuningError:
        """The error of a run in which the backend failed on every config: the distinct causes, with their trials."""
        trials = self.history.trials
        causes: dict[str, list[int]] = {}
        for trial in trials:
            causes.setdefault(trial.error or "unknown", []).append(trial.id)
        listed = "\n".join(f"  - {cause} (trial{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))})" for cause, ids in causes.items())
        where = f" The trials are recorded in {str(self.config.history)!r}." if self.config.history is not None else ""
        return TuningError(
            f"autotune: none of the {len(trials)} trials produced a model (stopped: {reason}); the {self.impl.name} "
            f"backend failed on every config it was given, with {len(causes)} distinct cause{'s' if len(causes) > 1 else ''}:\n"
            f"{listed}\nFix the cause (or exclude the ops it names with QuantConfig(exclude=...)), or widen the search "
            f"(more max_trials, another strategy or search_space).{where}"
        )
