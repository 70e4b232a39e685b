"""The Ray tests' workload: the toy numpy MLP of tests/core trained on digits, scored by its accuracy.

Workers import this module (and tests/core's toy backend) through PYTHONPATH, which conftest sets
before the cluster's nodes start, as a real deployment would through its runtime environment.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CORE_TESTS = Path(__file__).resolve().parent.parent / "core"
if str(CORE_TESTS) not in sys.path:
    sys.path.insert(0, str(CORE_TESTS))

import numpy as np  # noqa: E402
import toy_backend  # noqa: E402

import inc_core as inc  # noqa: E402

toy_backend.register()

# A 90th-percentile range clips the activations too hard: the base config misses the 1% goal, so the
# search has work to do (see tests/core/test_conformance_toy.py).
BASE = inc.QuantConfig(calibration="percentile", percentile=90.0)


def tuning(strategy: str = "basic", **kwargs: Any) -> inc.TuningConfig:
    """The search every test runs: keep searching so that every strategy walks several batches."""
    options: dict[str, Any] = {"max_trials": 12, "keep_searching": True, "tolerable_loss": 0.01}
    options.update(kwargs)
    return inc.TuningConfig(base=BASE, strategy=strategy, **options)


@dataclass
class Accuracy:
    """``eval_fn``: top-1 accuracy on the held-out digits, optionally slow or crashing on a worker.

    Attributes:
        x, y: the evaluation split.
        delay_s: seconds each evaluation of a quantized model waits first (a validation pass that
            takes a while, so trials overlap on the workers and a test can act mid-run).
        crash: ``None``; ``"once"``: the first worker to evaluate a quantized model kills its own process
            (SIGKILL) once, recorded by creating ``marker``; ``"kl"``: a worker evaluating a config that
            overrides the calibration to ``kl`` kills its own process, every time.
        marker: the file ``crash="once"`` creates.
    """

    x: np.ndarray
    y: np.ndarray
    delay_s: float = 0.0
    crash: str | None = None
    marker: str | None = None
    driver_pid: int = field(default_factory=os.getpid)

    def __call__(self, model: Any) -> float:
        if isinstance(model, toy_backend.QuantizedMLP) and os.getpid() != self.driver_pid:
            if self.crash == "once" and self.marker is not None and _claim(self.marker):
                os.kill(os.getpid(), signal.SIGKILL)
            if self.crash == "kl" and '"calibration": "kl"' in json.dumps(model.meta.get("config", {}), sort_keys=True):
                os.kill(os.getpid(), signal.SIGKILL)
            if self.delay_s:
                time.sleep(self.delay_s)
        return toy_backend.accuracy(model, self.x, self.y)


def _claim(marker: str) -> bool:
    """True for the one process that creates ``marker`` (O_EXCL: exactly one winner across processes)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def trained() -> tuple[Any, inc.Dataset, np.ndarray, np.ndarray]:
    """The FP32 model, the calibration dataset and the evaluation split."""
    model, x_train, _, x_test, y_test = toy_backend.train_digits_mlp()
    return model, inc.Dataset(x_train, batch_size=32), x_test, y_test


def summary(result: Any) -> list[tuple[str, float | None, bool]]:
    """What two runs must agree on: each trial's config, score and verdict, in order."""
    return [(json.dumps(t.config, sort_keys=True), t.score, t.met) for t in result.trials]
