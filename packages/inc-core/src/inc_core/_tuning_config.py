"""TuningConfig: the search (strategy, space, criterion, budget) around a base QuantConfig."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inc_core._checks import check_choice, check_float, check_int
from inc_core._quant_config import OVERRIDABLE, QuantConfig
from inc_core._serde import SerializableConfig
from inc_core.calibration._smooth_quant import check_alpha
from inc_core.errors import ConfigError

__all__ = ["TuningConfig", "STRATEGIES", "LOSS_TYPES", "EXECUTORS", "FALLBACK_PRECISIONS"]

STRATEGIES = ("basic", "mse", "bayesian", "random", "exhaustive", "conservative")
LOSS_TYPES = ("relative", "absolute")
EXECUTORS = ("sequential", "ray")
# What an op the strategies take out of INT8 runs in.
FALLBACK_PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True, kw_only=True)
class TuningConfig(SerializableConfig):
    """Accuracy-driven search for a quantization config.

    Args:
        base: the first config tried; every trial is this config with some settings changed.
        strategy: ``"basic"``, ``"mse"``, ``"bayesian"``, ``"random"``, ``"exhaustive"`` or ``"conservative"``.
        tolerable_loss: how much worse than the FP32 baseline a trial may score and still pass.
        loss_type: ``"relative"`` (fraction of the baseline) or ``"absolute"`` (score units).
        higher_is_better: whether a larger ``eval_fn`` result is better (accuracy) or worse (loss).
        max_trials: stop after this many evaluated trials (resumed trials count).
        timeout_s: stop after this many seconds of tuning (``None``: no limit).
        history: JSON file every trial is written to as it finishes; given again, tuning resumes
            without re-evaluating finished trials. ``None``: keep trials in memory only.
        seed: seed for the randomized strategies.
        keep_searching: go on after the first passing trial and return the best one.
        search_space: per overridable setting, the choices a strategy may try per op type, e.g.
            ``{"calibration": ("minmax", "kl")}``; ``None``: every choice the backend supports.
        executor: ``"sequential"`` (one trial at a time, in this process) or ``"ray"`` (trials as Ray
            tasks on a cluster; needs ``pip install inc-core[ray]``). For more control pass an
            executor object to ``autotune(..., executor=...)`` instead.
        smooth_quant_alphas: SmoothQuant alphas a strategy may try (model-wide, as one more tunable
            setting next to the op types', with "off" as the other choice), e.g. ``(0.5,)`` or
            ``(0.5, 0.75)``; ``()`` (default): the base config's ``smooth_quant`` is kept. Static only,
            on backends that implement SmoothQuant (onnx, torch).
        workers: with ``executor="ray"``, how many trials run at once (``None``: one per CPU of the
            cluster). The result does not depend on it for the basic, mse, exhaustive, conservative
            and random strategies; bayesian proposes ``workers`` configs per batch.
        fallback_precision: what the ops a strategy takes out of INT8 run in: ``"fp32"`` (default, added
            to the trial config's ``exclude``) or ``"bf16"`` (added to its ``bf16`` filter: faster than FP32
            on CPUs with AVX512-BF16/AMX-BF16, on backends that support BF16).
        address: with ``executor="ray"``, the cluster: ``None`` starts a local one, ``"auto"`` joins
            the cluster this machine belongs to, ``"ray://host:port"`` or ``"host:port"`` a remote one.
    """

    base: QuantConfig = field(default_factory=QuantConfig)
    strategy: str = "basic"
    tolerable_loss: float = 0.01
    loss_type: str = "relative"
    higher_is_better: bool = True
    max_trials: int = 100
    timeout_s: float | None = None
    history: str | None = None
    seed: int = 0
    keep_searching: bool = False
    search_space: Mapping[str, tuple[str, ...]] | None = None
    executor: str = "sequential"
    workers: int | None = None
    address: str | None = None
    smooth_quant_alphas: tuple[float, ...] = ()
    fallback_precision: str = "fp32"

    def __post_init__(self) -> None:
        owner = "TuningConfig"
        if not isinstance(self.base, QuantConfig):
            raise ConfigError(f"{owner}: base must be an inc.QuantConfig, got {type(self.base).__name__}.")
        check_choice(owner, "strategy", self.strategy, STRATEGIES)
        check_float(owner, "tolerable_loss", self.tolerable_loss, minimum=0.0)
        check_choice(owner, "loss_type", self.loss_type, LOSS_TYPES)
        if not isinstance(self.higher_is_better, bool):
            raise ConfigError(f"{owner}: higher_is_better must be a bool, got {self.higher_is_better!r}.")
        if self.loss_type == "relative" and self.higher_is_better and self.tolerable_loss >= 1.0:
            # Losing 100% of a score that must stay high accepts any model: almost surely a percent typed as a fraction.
            raise ConfigError(
                f"{owner}: tolerable_loss={self.tolerable_loss!r} with loss_type='relative' allows losing "
                f"{self.tolerable_loss:.0%} of the baseline score, which accepts every model. Give a fraction below 1 "
                "(0.01 = 1%), or use loss_type='absolute'."
            )
        check_int(owner, "max_trials", self.max_trials, minimum=1)
        check_float(owner, "timeout_s", self.timeout_s, minimum=0.0, exclusive_min=True, allow_none=True)
        if isinstance(self.history, Path):
            object.__setattr__(self, "history", str(self.history))
        if self.history is not None and (not isinstance(self.history, str) or not self.history):
            raise ConfigError(f"{owner}: history must be a file path or None, got {self.history!r}.")
        check_int(owner, "seed", self.seed)
        if not isinstance(self.keep_searching, bool):
            raise ConfigError(f"{owner}: keep_searching must be a bool, got {self.keep_searching!r}.")
        if self.search_space is not None:
            object.__setattr__(self, "search_space", self._clean_space(self.search_space))
        self._check_executor()
        self._check_smooth_quant_alphas()
        check_choice(owner, "fallback_precision", self.fallback_precision, FALLBACK_PRECISIONS)

    def _check_smooth_quant_alphas(self) -> None:
        owner = "TuningConfig"
        alphas = self.smooth_quant_alphas
        if isinstance(alphas, (str, bytes)) or not isinstance(alphas, (list, tuple)):
            raise ConfigError(
                f"{owner}: smooth_quant_alphas must be a tuple of alphas in [0, 1], e.g. (0.5,), got {alphas!r}."
            )
        clean = tuple(check_alpha(f"{owner}.smooth_quant_alphas", a) for a in alphas)
        if len(set(clean)) != len(clean):
            raise ConfigError(f"{owner}: smooth_quant_alphas lists an alpha twice: {list(clean)}.")
        if clean and self.base.approach != "static":
            raise ConfigError(
                f"{owner}: smooth_quant_alphas={list(clean)} needs base.approach='static' (SmoothQuant scales come "
                f"from calibration data), got {self.base.approach!r}. Use a static base, or smooth_quant_alphas=()."
            )
        object.__setattr__(self, "smooth_quant_alphas", clean)

    def _check_executor(self) -> None:
        owner = "TuningConfig"
        check_choice(owner, "executor", self.executor, EXECUTORS)
        check_int(owner, "workers", self.workers, minimum=1, allow_none=True)
        if self.executor == "sequential" and (self.workers not in (None, 1) or self.address is not None):
            raise ConfigError(
                f"{owner}: workers={self.workers!r} and address={self.address!r} only apply to a parallel executor, "
                "but executor='sequential'. Set executor='ray' to run trials on a Ray cluster."
            )
        if self.executor == "ray":
            # Imported here: the check is plain string parsing, but the module is the Ray executor's.
            from inc_core.tuning._ray_executor import check_address

            check_address(owner, self.address)

    @staticmethod
    def _clean_space(space: Any) -> dict[str, tuple[str, ...]]:
        owner = "TuningConfig"
        if not isinstance(space, Mapping):
            raise ConfigError(f"{owner}: search_space must be a mapping of setting -> choices, got {space!r}.")
        out: dict[str, tuple[str, ...]] = {}
        for key, choices in space.items():
            if key not in OVERRIDABLE:
                raise ConfigError(
                    f"{owner}: search_space key {key!r} is not a tunable setting; choose from {list(OVERRIDABLE)}."
                )
            if isinstance(choices, str) or not isinstance(choices, (list, tuple)) or not choices:
                raise ConfigError(f"{owner}: search_space[{key!r}] must be a non-empty tuple of choices.")
            for choice in choices:
                check_choice(owner, f"search_space[{key!r}]", choice, OVERRIDABLE[key])
            out[key] = tuple(choices)
        return out
